"""What the health poller reads of its own thread's wait for a CPU (net/cpu_wait.py),
on the real /proc: in a child process, whose descriptor limit and forks touch
nothing of the test runner's."""

from __future__ import annotations

import pytest

from fleet_ingress.net.cpu_wait import cpu_wait
from tests.support import python_child

pytestmark = pytest.mark.skipif(cpu_wait() is None, reason="the kernel keeps no schedstat")


def test_a_process_out_of_descriptors_still_reads_its_wait():
    """The probes judged against starvation are those of a supervisor that may be
    out of descriptors too (`not_judged_out_of`): its wait is read on the
    descriptor opened at the first read, not on a new one each probe (which
    failed then, and cost nine system calls a probe where one pread does)."""
    out = python_child(
        """
        import os, resource
        from fleet_ingress.net.cpu_wait import cpu_wait
        first = cpu_wait()
        used = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own, closed
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (used, hard))
        try:
            os.close(os.open("/dev/null", os.O_RDONLY))
            print("a descriptor could still be opened")
        except OSError:
            later = cpu_wait()
            print(first is not None and later is not None and later >= first)
        """
    )
    assert out == "True"


def test_a_forked_child_reads_its_own_thread_not_its_parents():
    """The descriptor opened by the parent names the parent's thread; a child
    forked after it reads its own (between two direct reads of its own file)."""
    out = python_child(
        """
        import os, time
        from fleet_ingress.net.cpu_wait import cpu_wait

        def direct():
            with open("/proc/thread-self/schedstat", "rb") as f:
                return int(f.read().split()[1]) / 1e9

        end = time.monotonic() + 0.2
        while time.monotonic() < end:  # the parent's wait grows past a new child's
            cpu_wait()
        parent = cpu_wait()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            before = direct()
            mine = cpu_wait()
            after = direct()
            os.write(w, f"{before <= mine <= after} {mine}".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 200).decode(), parent)
        """
    )
    ok, mine, parent = out.split()
    assert ok == "True", (mine, parent)
