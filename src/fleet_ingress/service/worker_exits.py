"""How a worker's exit reads (`service.worker_pool` watches each worker):
whether a child still runs, its exit status said, the fields every line
about its exit carries, and the reason its restart is counted under."""

from __future__ import annotations

import contextlib
import os
import signal
import time

from fleet_ingress.service.upgrade import process_state
from fleet_ingress.service.worker_process import WorkerProcess


def child_running(pid: int) -> bool:
    """Whether child `pid` still runs: not exited (a zombie not reaped yet
    has; the exit status is left for its watcher to read), nor reaped."""
    if pid <= 0:  # a channel that claimed no real pid: nothing to wait for
        return False
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        # Not our child: reaped already, or a worker taken up after the previous
        # supervisor died (`fd_store`), whose parent is systemd now: alive while
        # its process is there and not a zombie.
        state = process_state(pid)
        return state is not None and state[0] != "Z"
    except OSError:
        return False


def restart_reason(code: int | None, known: bool = True) -> str:
    """`fleet_ingress_worker_restarts_total{reason}`: killed (a signal: an
    operator's; an OOM kill is "oom", said by its caller), crashed (a
    non-zero exit), exited (0, unasked),
    unknown (taken up after a supervisor died, and not killed by this one:
    systemd read its status); and hung (killed by the supervisor itself:
    `WorkerPool.worker_silent`), said by its caller."""
    if code is not None and code < 0:
        return "killed"
    if not known:
        return "unknown"
    return "crashed" if code else "exited"


def exit_fields(worker: WorkerProcess, code: int | None) -> dict[str, object]:
    """What every line about a worker's exit says."""
    known = worker.exit_status_known
    return {
        "pid": worker.pid,
        "generation": worker.generation,
        "exit_status": exit_status(code, oom=worker.oom_killed, possibly=worker.oom_possibly)
        if known or (code is not None and code < 0)
        else "unknown (taken up after a supervisor died: systemd read it)",
        "calls_lost": worker.calls_lost,
    }


def lived_s(worker: WorkerProcess) -> float:
    return round(time.monotonic() - worker.started_at, 1)


def exit_status(code: int | None, *, oom: bool = False, possibly: bool = False) -> str:
    if code is None:
        return "running"
    if oom and possibly:
        return "killed by SIGKILL, possibly from the kernel's OOM killer"
    if oom:
        return "killed by SIGKILL from the kernel's OOM killer"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit {code}"
