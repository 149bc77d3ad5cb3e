"""bench/kernel_cost.py's pure parts, and its two readers of a real process (/proc, the GC hook)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import kernel_cost

# `perf stat -x,` as perf 6.x writes it: value, unit, event, run time, share, metric...
PERF_STAT = """\
# started on Sun Dec  6 22:55:01 2026

1403.52,msec,task-clock,1403518234,100.00,0.117,CPUs utilized
3,,page-faults,1403518234,100.00,2.137,/sec
4004,,context-switches,1403518234,100.00,2.853,K/sec
<not counted>,,cpu-migrations,0,0.00,,
<not supported>,,cycles,0,100.00,,
117912,,raw_syscalls:sys_enter,1403518234,100.00,84.013,K/sec
0,,syscalls:sys_enter_mmap,1403518234,100.00,0.000,/sec
"""


def test_perf_stat_counts_by_event_and_leaves_out_what_perf_could_not_count() -> None:
    counted = kernel_cost.parse_perf_stat(PERF_STAT)
    assert counted == {
        "task-clock": 1403.52,
        "page-faults": 3.0,
        "context-switches": 4004.0,
        "raw_syscalls:sys_enter": 117912.0,
        "syscalls:sys_enter_mmap": 0.0,
    }


def test_gc_totals_a_call_are_the_difference_over_the_calls() -> None:
    a = {"collections": [10, 1, 0], "collected": [5, 0, 0], "cpu_s": [0.01, 0.002, 0.0]}
    b = {"collections": [30, 3, 1], "collected": [25, 10, 0], "cpu_s": [0.03, 0.006, 0.01]}
    assert kernel_cost.gc_delta(a, b, 10) == {
        "collections": [2.0, 0.2, 0.1],
        "collected": [2.0, 1.0, 0.0],
        "cpu_s": [0.002, 0.0004, 0.001],
    }
    assert kernel_cost.gc_delta(None, b, 10) == {}  # no file yet: no figure, not zero
    assert kernel_cost.gc_delta(a, b, 0) == {}


def test_on_cpu_time_is_split_by_each_objects_share_of_the_samples() -> None:
    shares = {"libpython3.11.so.1.0": 50.0, "[kernel.kallsyms]": 25.0, "libcrypto.so.3": 25.0}
    assert kernel_cost.dso_ms(shares, 4.0) == {
        "libpython3.11.so.1.0": 2.0,
        "[kernel.kallsyms]": 1.0,
        "libcrypto.so.3": 1.0,
    }
    assert kernel_cost.dso_ms(shares, None) == {}


def _part(utime: float, stime: float, minflt: float) -> dict[str, object]:
    keys = ("sched_run_s", "sched_wait_s", "sched_slices", "majflt")
    proc = {"utime_s": utime, "stime_s": stime, "minflt": minflt} | dict.fromkeys(keys, 0.0)
    proc |= {"ctx_voluntary": 2.0, "ctx_involuntary": 0.0}
    return {"proc": proc, "beyond_idle": proc, "perf": {}, "gc": {}}


def test_the_table_sums_the_ingress_processes_against_haproxy_round_by_round() -> None:
    rounds = [
        {
            "round": n,
            "targets": {
                "ingress": {
                    "parts": {
                        "supervisor": _part(0.0005, 0.0001, 0.0),
                        "worker 1": _part(0.0045 * n, 0.0013, 1.0),
                    }
                },
                "haproxy": {"parts": {"haproxy": _part(0.0027 * n, 0.0012, 1.0)}},
            },
        }
        for n in (1, 2)
    ]
    rows = {
        line.split(" | ")[0].strip("| "): line for line in kernel_cost.table(rounds).splitlines()
    }
    # CPU a call: ingress (0.6 + 5.8 ms) over HAProxy (3.9 ms) in round 1, (0.6 + 10.3) / 6.6 in 2
    cpu = rows["CPU ms (utime+stime)"].split(" | ")
    assert cpu[1:4] == ["0.60 (0.60, 0.60)", "8.05 (5.80, 10.30)", "5.25 (3.90, 6.60)"]
    assert cpu[4] == "1.65 (1.64, 1.65) |"  # 6.4 / 3.9 and 10.9 / 6.6
    assert rows["mmap"].endswith("| - | - | - | - |")  # no perf figures: none made up


def test_proc_counters_see_a_processs_minor_faults_and_cpu(tmp_path: Path) -> None:
    """The /proc reader on a real process: touching 64 MiB of fresh memory is
    16384 minor faults (4 KiB pages), and the CPU it took is user + system."""
    script = (
        "import sys; b = bytearray(64 << 20); sys.stdout.write('x'); sys.stdout.flush(); input()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        child.stdout.read(1)
        counted = kernel_cost.proc_counters(child.pid)
        assert counted["minflt"] >= 64 * 256  # every page of the buffer, once
        assert counted["utime_s"] + counted["stime_s"] > 0
        assert counted["sched_run_s"] > 0
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=10)


def test_the_gc_hook_counts_a_real_processs_collections(tmp_path: Path) -> None:
    """The sitecustomize the runs put on the ingress's PYTHONPATH, in a real
    interpreter: a full collection is counted in generation 2 and written out."""
    hook, out = tmp_path / "hook", tmp_path / "gc"
    hook.mkdir()
    out.mkdir()
    (hook / "sitecustomize.py").write_text(kernel_cost.GC_HOOK)
    env = dict(os.environ, PYTHONPATH=str(hook), KERNEL_COST_GC_DIR=str(out))
    script = (
        "import gc; x = [[] for _ in range(1000)]; gc.collect(); print(__import__('os').getpid())"
    )
    pid = int(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, check=True, timeout=30).stdout)  # fmt: skip
    totals = json.loads((out / f"gc-{pid}.json").read_text())
    assert totals["collections"][2] >= 1
    assert totals["cpu_s"][2] >= 0.0
    assert kernel_cost.read_gc(out, pid) == totals
    assert kernel_cost.read_gc(out, pid + 1) is None
