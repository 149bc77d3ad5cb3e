"""The supervisor's record of one worker process: what it is (its process,
generation, channel key, CPU) and where it is in its life (joined, serving,
left, retiring). Kept by the workers' pool (`service.worker_pool`), and
made by the upgrade's sequence (`service.upgrade_sequence`) for the workers
the previous image started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any

from fleet_ingress.service.upgrade import AdoptedProcess, process_start

# Every worker must have joined the coordinator within this at start, or `run` fails.
WORKER_START_TIMEOUT = 30.0
# A worker's rank in its generation (process.accept, `core.accept_order`), set
# by the supervisor that starts it; absent: 0.
WORKER_RANK_ENV = "INGRESS_WORKER_RANK"


@dataclass(eq=False)
class WorkerProcess:
    proc: asyncio.subprocess.Process | AdoptedProcess  # adopted: started by the previous image
    generation: int
    key: int  # its channel in the coordinator
    started_at: float = field(default_factory=time.monotonic)
    joined: asyncio.Event = field(default_factory=asyncio.Event)
    serving: asyncio.Event = field(default_factory=asyncio.Event)  # accepting carriers
    left: asyncio.Event = field(default_factory=asyncio.Event)  # its channel closed
    calls_lost: int = 0  # slots it held when its channel closed
    # The calls open on its channel when it closed, by lease: what it said of
    # each (`SlotServer.take_calls`), "fleet" where it held a slot. Lost with
    # it if it did not drain: the supervisor writes their access lines.
    calls_at_leave: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Its table of live calls (`net.call_table_map`, a memfd made for it):
    # read once it is dead, closed then. None: a worker without one (started
    # by a previous image that made none, or taken up after a crash).
    call_table_fd: int | None = None
    # Its channel ended while its process ran: its slots stay counted until it exits.
    channel_lost: bool = False
    # Its channel ended while its process seemed to run, not confirmed yet
    # (`channel_lost` is said LOST_CHANNEL_CONFIRM later): an exit 0 before
    # then is a drain without its channel too, not a death.
    channel_closed_first: bool = False
    replaced: bool = False
    # Of a new generation not yet known to serve: not replaced if it dies.
    candidate: bool = False
    retiring: bool = False  # an older generation told to drain and exit: not replaced
    # Retiring: killed if still there at this (CLOCK_MONOTONIC, the same over an exec).
    retire_by: float | None = None
    # Retiring: the drain its stop gave it (timeouts.upgrade_drain then, math.inf: until
    # its calls end), which a later reload or upgrade does not change for it.
    drain_told: float | None = None
    cpu: int | None = None  # the CPU it runs on (process.cpu_affinity = "auto")
    # Its rank in its generation, 0..N-1 (process.accept = "first": the order in
    # which workers take new connections); a replacement takes the one it replaces.
    # None: started by a release that gave none.
    rank: int | None = None
    hung: bool = False  # killed by the supervisor: it answered no report request for a minute
    # Killed by the supervisor (`kill`: hung, its drain's end, a failed start, a stop).
    killed_here: bool = False
    oom_killed: bool = False  # died of SIGKILL as the kernel counted an OOM kill (`oom_kills`)
    # ...counted where other processes' kills are counted too (`OomCounter.broad`): possibly.
    oom_possibly: bool = False
    # ...named by the kernel's own record of its pid (/dev/kmsg): no doubt.
    oom_logged: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL from the supervisor, marked as its own (`killed_here`): its
        death is never taken for the kernel's OOM killer's, whatever the count
        of OOM kills says (`OomVerdict.oom_killed`)."""
        self.killed_here = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    @functools.cached_property
    def process_start(self) -> int | None:
        """When its process started (`upgrade.process_start`), read once: a
        supervisor started after a crash tells it by this from a process given
        its pid since (`fd_store.crash_state`)."""
        return process_start(self.pid)

    @property
    def exit_status_known(self) -> bool:
        """False for a worker taken up after a supervisor died (systemd's
        child, `AdoptedProcess.status_known`) once it exited: its exit code is
        not its own."""
        return not isinstance(self.proc, AdoptedProcess) or self.proc.status_known
