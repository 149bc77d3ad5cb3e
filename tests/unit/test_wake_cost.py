"""bench/wake_cost.py's pure parts: perf's command line and counts, callgrind's call
counts, and the table a message."""

from __future__ import annotations

from pathlib import Path

from bench import wake_cost


def test_a_filter_follows_its_own_event_alone() -> None:
    """perf applies a --filter to every event of the -e before it: the empty-wait
    counts must be their own -e, or raw_syscalls would be filtered (perf refuses)."""
    argv = wake_cost.perf_argv(123, 2.5, Path("/tmp/x"), by_name=False)
    for i, arg in enumerate(argv):
        if arg == "--filter":
            assert argv[i - 2] == "-e"
            assert argv[i - 1].startswith("syscalls:sys_exit_epoll")
            assert argv[i + 1] == "ret == 0"
    assert argv.count("--filter") == 2
    assert argv[-4:] == ["-o", "/tmp/x", "--timeout", "2500"]
    assert "syscalls:sys_enter_*" in wake_cost.perf_argv(1, 1, Path("/x"), by_name=True)


def test_perf_counts_become_the_tables_figures() -> None:
    counted = {
        "raw_syscalls:sys_enter": 300.0,
        "syscalls:sys_enter_epoll_wait": 5.0,
        "syscalls:sys_enter_epoll_pwait": 7.0,
        "syscalls:sys_exit_epoll_pwait": 2.0,  # counted with ret == 0
        "syscalls:sys_enter_read": 100.0,
        "syscalls:sys_enter_recvfrom": 50.0,
        "syscalls:sys_enter_getsockopt": 3.0,  # --syscalls: by name
    }
    got = wake_cost.perf_figures(counted)
    assert got["syscalls"] == 300
    assert got["epoll_waits"] == 12
    assert got["epoll_waits_empty"] == 2
    assert got["reads"] == 150
    assert got["by_name:getsockopt"] == 3
    assert "by_name:read" not in got  # one of the named rows already


CALLGRIND = """\
events: Ir
fl=(1) /src/uv/core.c
fn=(10) uv_run
cfl=(2) epoll.c
cfn=(11) uv__io_poll
calls=3 0
5 900
fn=(11)
cfn=(12) epoll_pwait
calls=4 0
7 80
cfn=(12)
calls=6 0
8 120
cfn=(13) epoll_ctl
calls=9 0
9 10
"""


def test_calls_to_reads_compressed_names(tmp_path: Path) -> None:
    """A name is given once, then its (id) alone: both mentions count."""
    cg = tmp_path / "callgrind.out"
    cg.write_text(CALLGRIND)
    got = wake_cost.calls_to(cg, ("epoll_pwait", "epoll_wait", "uv__io_poll"))
    assert got == {"epoll_pwait": 10, "epoll_wait": 0, "uv__io_poll": 3}


def level(target: str, messages: int, **parts: dict[str, float]) -> dict[str, object]:
    return {
        "round": 1,
        "calls": 100,
        "target": target,
        "window_s": 10.0,
        "messages": messages,
        "errors": 0,
        "parts": {role: {"pid": 1, "counts": counts} for role, counts in parts.items()},
    }


def test_table_sums_the_ingress_processes_over_haproxy() -> None:
    levels = [
        level(
            "ingress",
            1000,
            supervisor={"syscalls": 200.0, "ctx_voluntary_main": 0.0},
            **{"worker 1": {"syscalls": 3000.0, "ctx_voluntary_main": 100.0}},
        ),
        level("haproxy", 1000, haproxy={"syscalls": 4000.0, "ctx_voluntary_main": 200.0}),
    ]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in wake_cost.table(levels, 100).splitlines()
        if line.startswith("|")
    }
    assert rows["system calls"][1:] == ["0.200", "3.000", "4.000", "0.800 |"]
    # A wake each 10 messages against each 5: the ingress serves 2x the messages a wake.
    assert rows["messages a wake (main thread)"][-1] == "2.000 |"


def test_stored_runs_give_their_wake_ups_a_message() -> None:
    """Session 46's quiet steady run, as stored: the ingress slept 0.197 times a
    message in round 1 and made 3 reads and writes; HAProxy's io is not readable."""
    from bench.harness.children import REPO

    text = wake_cost.stored_wakes([REPO / "bench" / "results" / "steady-100-twilio-s46"])
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    ingress = next(r for r in rows if r[1] == "ingress" and r[3] == "1")
    assert ingress[5:] == ["0.197", "3.001 |"]
    assert {r[1] for r in rows} == {"ingress", "ingress@base", "haproxy"}
