"""Whether a worker dead of SIGKILL was the kernel's OOM killer's rather than
an operator's or the supervisor's own: the kernel's log of whom it killed
where it can be read, else its count of OOM kills (`service.oom_kills`
reads both); and what the operator is told of it (docs/INSTALL.md, "Memory")."""

from __future__ import annotations

import asyncio
import signal
import time

from fleet_ingress.service.oom_kills import KernelLog, OomKills, find_oom_counter
from fleet_ingress.service.worker_process import WorkerProcess

# A worker the kernel's OOM killer took: what ran out, and what the operator
# can change (docs/INSTALL.md, "Memory"). The kernel's own lines name the
# limit hit (a cgroup's: "memory: usage ... limit ...", or the host's).
OOM_KILLED_WORKER = (
    "worker killed by the kernel's OOM killer: its calls are lost; a new worker replaces "
    "it. The service's memory limit (the unit's MemoryMax=) or the host's memory ran out: "
    "raise MemoryMax= (`systemctl edit fleet-ingress`) or give the host memory, or carry "
    "fewer calls on this host (limits.max_connections, the fleets' maxconn); "
    "`journalctl -k | grep -i -A20 oom` says which limit and what each process held"
)
# The same, where the kernel's count of OOM kills covers processes outside the
# service (the whole host's /proc/vmstat, a group above the service's, the v1
# root memory group): an operator's kill -9 within OOM_CREDIT_S of any OOM kill
# there reads the same (INSTALL.md, Memory: which hosts count where).
OOM_POSSIBLY_KILLED_WORKER = (
    "worker killed by SIGKILL, possibly by the kernel's OOM killer (an OOM kill was "
    "counted where other processes' are counted too, oom_kills_counted_in; an "
    "operator's kill -9 reads the same): its calls are lost; a new worker replaces it. "
    "`journalctl -k | grep -i 'killed process'` says whether this pid was the OOM "
    "killer's; if so, the service's memory limit or the host's memory ran out"
)
# How long a SIGKILL death waits for the kernel's "Killed process PID" record
# once the count rose: logged just after the signal is sent (readable when
# waitpid returned in 8 of 8 real OOM kills measured), read within it. The
# worker's replacement waits with it, so it is kept short.
KERNEL_LOG_WAIT = 0.1


class OomVerdict:
    """The supervisor's reading of the kernel's OOM kills (its count, its log),
    and the verdict on each worker dead of SIGKILL."""

    def __init__(self) -> None:
        # Where the kernel counts OOM kills for this service (its memory cgroup,
        # else the host), read every second and at each SIGKILL death: a worker
        # OOM-killed is told from one killed by an operator (`service.oom_kills`).
        self.oom_counter = find_oom_counter()
        self.oom_kills = OomKills()
        # The kernel's log of whom it OOM-killed, by pid, where it can be read:
        # what decides, over a count that takes in other processes' kills.
        self.kernel_log = KernelLog()
        self.look_for_oom_kills()

    def _oom_count(self) -> int | None:
        return None if self.oom_counter is None else self.oom_counter.read()

    def look_for_oom_kills(self) -> None:
        """Every second (`_write_snapshots`): OOM kills counted since are
        kept for the SIGKILL deaths read next, for OOM_CREDIT_S."""
        now = time.monotonic()
        self.oom_kills.seen(self._oom_count(), now)
        self.kernel_log.read(now)

    async def oom_killed(self, worker: WorkerProcess, code: int | None) -> bool:
        """Whether `worker`, dead of SIGKILL, was the OOM killer's rather than
        an operator's (a `kill -9` is counted nowhere) or this supervisor's own.
        Where the kernel's log can be read, its record of the pid decides; else
        the count (`worker.oom_possibly` where it takes in other processes')."""
        if code != -signal.SIGKILL or worker.hung or worker.killed_here:
            return False
        if not worker.exit_status_known:
            return False
        log_ = self.kernel_log
        if log_.usable and log_.complete:
            if log_.killed(worker.pid, time.monotonic()):
                self.oom_kills.claim(self._oom_count(), time.monotonic())
                worker.oom_logged = True
                return True
            if not self.oom_kills.pending(self._oom_count(), time.monotonic()):
                return False  # counted before the SIGKILL is sent: none, no OOM kill
            # Counted, and logged just after the signal: a moment for the record.
            deadline = time.monotonic() + KERNEL_LOG_WAIT
            while time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                if log_.killed(worker.pid, time.monotonic()):
                    self.oom_kills.claim(self._oom_count(), time.monotonic())
                    worker.oom_logged = True
                    return True
            if log_.complete:
                return False  # another process's OOM kill
        worker.oom_possibly = self.oom_counter is not None and self.oom_counter.broad
        return self.oom_kills.claim(self._oom_count(), time.monotonic())

    def counted_in(self) -> str | None:
        """Where the OOM kills are counted (None: nowhere this process can read)."""
        return None if self.oom_counter is None else self.oom_counter.covers

    def broad(self) -> str | None:
        """Where the OOM kills are counted, when that counts other processes' too.
        (None where the kernel's log names the pids killed: it decides there.)"""
        return (
            None
            if self.oom_counter is None
            or not self.oom_counter.broad
            or (self.kernel_log.usable and self.kernel_log.complete)
            else self.oom_counter.covers
        )
