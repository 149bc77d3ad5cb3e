"""The load benchmark (``python -m bench``) still runs end to end, in a tiny configuration.

A few calls for a second, directly, through fleet-ingress (one worker, then two:
``ingress@w2``) and through HAProxy (when installed; CI installs it), checking only
that it works and writes its results, not what it measures: figures from a run
this small mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(110)
def test_bench_steady_tiny(tmp_path: Path) -> None:
    targets = ["direct", "ingress", "ingress@w2"]
    if shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists() or os.environ.get("CI"):
        targets.append("haproxy")  # in CI a missing haproxy fails the run, as it should
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "steady",
            "--calls",
            "4",
            # 4 s, not 1: CPU is read from /proc in clock ticks (10 ms), and
            # HAProxy relays 400 messages of 4 calls in about 8 ms: over 1 s it
            # read 0 ticks in 2 of 5 CI runs, and its ratio had nothing to divide by.
            "--seconds",
            "4",
            "--ramp-seconds",
            "0.5",
            "--targets",
            ",".join(targets),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    (rnd,) = report["rounds"]
    assert list(rnd) == targets
    for name, r in rnd.items():
        assert r["established"] == 4, (name, r["errors"])
        assert r["failed"] == 0 and r["lost_frames"] == 0 and r["corrupt_frames"] == 0, name
        assert r["msgs_window"] > 0, name
        if name != "direct":
            assert r["cpu_s_per_1000_msgs"] is not None and r["rss_kib_per_call"] is not None
    if "haproxy" in rnd:
        assert report["ratios"]["ingress/haproxy"]["cpu_s_per_1000_msgs"]["median"] is not None
    # Two workers: both served (each was warmed up), and the CPU is split by process.
    w2 = rnd["ingress@w2"]
    assert not [n for n in w2["notes"] if "warm-up" in n], w2["notes"]
    assert set(w2["loads"]["proxy_cores_by_process"]) == {"supervisor", "worker 1", "worker 2"}
    assert "[process]\nworkers = 2\n" in (out / "ingress-w2.toml").read_text()
    assert "[process]\nworkers = 1\n" in (out / "ingress.toml").read_text()
    md = (out / "results.md").read_text()
    assert "| fleet-ingress |" in md and "| fleet-ingress@w2 | supervisor " in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "results.png").stat().st_size > 0


@pytest.mark.timeout(90)
def test_bench_ramp_tiny(tmp_path: Path) -> None:
    """A ramp of a few calls runs to the end and says, for fleet-ingress, its limit (or that
    none was found) and why it stopped, each level with direct's round trip beside it and
    the load side's CPU a message."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "ramp",
            "--ramp-start",
            "2",
            "--ramp-step",
            "2",
            "--ramp-fine",
            "1",
            "--ramp-max",
            "4",
            "--hold",
            "0.5",
            "--targets",
            "direct,ingress",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["round_orders"] == [["direct", "ingress"]]
    (rnd,) = report["rounds"]
    assert rnd["direct"]["levels"] and not rnd["direct"]["failed"]
    r = rnd["ingress"]
    assert r["levels"] and r["failed"] == 0, r["errors"]
    assert {"limit", "first_over", "resolution"} <= r.keys()
    for level in r["levels"]:
        assert level["generator_us_per_msg"] is not None, level
        assert {"direct_p99_ms", "added_p99_ms", "over_budget"} <= level.keys()
    assert set(report["ramp_summary"]) == {"direct (round 1)", "ingress (round 1)"}
    md = (out / "results.md").read_text()
    assert "| calls | RTT p50 ms | RTT p99 ms | direct p99 ms | added p99 ms | over |" in md
