"""A supervisor restarted after a crash in an upgrade's exec window counts
each worker's grant budget until the worker says what it holds: the budget
goes in the crash snapshot written before the exec (after the hand-over that
sent it), through `fd_store.crash_state`, into `adopt_workers`. In one
process: real Supervisors built as `run` builds them, a real worker
(`SlotClient`) on a real socketpair, the exec itself left out (it would
replace the test). The snapshot is taken as `write_snapshot` takes it
(`crash_snapshot`); systemd's fd store is tests/e2e/test_under_systemd.py's."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from fleet_ingress.service import upgrade_sequence
from fleet_ingress.service.fd_store import crash_state
from tests.e2e.test_upgrade import _close_adopting, _new_image_of, _supervisor
from tests.support import TLSFiles, eventually


async def test_a_crash_in_the_exec_window_leaves_each_budget_counted_until_its_worker_answers(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    old, image, worker, theirs = await _new_image_of(tls_files, tmp_path, answering=True)
    restarted = None
    try:
        assert worker is not None
        await image.upgrade.adopt_workers(image.handed)
        (fleet,) = image.balancer.fleets
        held = await asyncio.wait_for(worker.lease(), 5)
        assert fleet.active == 1
        (key,) = image.server._channels
        budgets = image.server.plan_budgets({key})
        assert budgets == {key: {"a": fleet.maxconn - 1}}  # the free slots, all its own
        kept = image.server.handover(budgets)  # `_reexec`'s steps, but the exec
        snapshot = image.upgrade.crash_snapshot()
        await eventually(lambda: worker._budget is not None)
        assert worker._transport is not None
        worker._transport.pause_reading()  # slow to say what it holds (a stopped process)
        (entry,) = snapshot["workers"]
        assert (entry["held"], entry["budget"]) == (["a"], ["a"] * (fleet.maxconn - 1))

        # The new image died in the exec window; systemd starts a supervisor
        # again with the channels from its fd store and that snapshot.
        state = crash_state(kept, worker_target=1, snapshot=snapshot)
        assert state is not None
        restarted = _supervisor(tmp_path, handed=kept, carried=state)
        adopting = asyncio.create_task(restarted.upgrade.adopt_workers(restarted.handed))
        await eventually(lambda: bool(restarted.pool.workers))
        # Should this one die too before the worker answers: the same again.
        (entry,) = restarted.upgrade.crash_snapshot()["workers"]
        assert (entry["held"], entry["budget"]) == (["a"], ["a"] * (fleet.maxconn - 1))
        await adopting
        (again,) = restarted.balancer.fleets
        # Silent: what it held and its whole budget (it may have granted it all).
        assert again.active == fleet.maxconn
        worker._transport.resume_reading()
        await eventually(lambda: again.active == 1, timeout=10)  # its own word now
        held.release()
    finally:
        if worker is not None:
            worker.close()
        theirs.close()
        if restarted is not None:
            await _close_adopting(restarted)
        await _close_adopting(image)
        await old.close()


async def test_the_snapshot_written_before_the_exec_carries_the_budgets_a_take_back_ends_them(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_reexec` writes the crash snapshot with the budgets it sent; the exec
    fails (here: refused as the kernel may refuse it), the channels are taken
    back, the worker answers: no budget in the snapshot from then on."""
    old, image, worker, theirs = await _new_image_of(tls_files, tmp_path, answering=True)
    written: list[dict[str, Any]] = []
    try:
        assert worker is not None
        await image.upgrade.adopt_workers(image.handed)
        (fleet,) = image.balancer.fleets
        monkeypatch.setattr(
            image, "write_snapshot", lambda: written.append(image.upgrade.crash_snapshot())
        )

        def exec_refused(*args: Any, **kw: Any) -> None:
            raise OSError(7, "Argument list too long")

        monkeypatch.setattr(upgrade_sequence, "reexec", exec_refused)
        image.upgrade.statuses["u1"] = {"id": "u1", "state": "re-executing"}  # (its log names it)
        with pytest.raises(upgrade_sequence._ExecFailed) as failed:
            image.upgrade._reexec()
        (entry,) = written[-1]["workers"]
        assert entry["pid"] == os.getpid() and entry["budget"] == ["a"] * fleet.maxconn
        await image.upgrade._take_back(failed.value.kept)
        (entry,) = image.upgrade.crash_snapshot()["workers"]
        assert entry["budget"] == [] and fleet.active == 0
    finally:
        if worker is not None:
            worker.close()
        theirs.close()
        await _close_adopting(image)
        await old.close()
