"""Where a Python target's memory per call goes, from ``bench/memhook`` snapshots.

Given the hook's ``baseline`` and ``calls`` snapshots (before the calls, and with
all of them established) it reports per call: glibc heap bytes in use
(``mallinfo2``: uordblks for brk/arena chunks, hblkhd for mmapped chunks), RSS
by kind of mapping, live Python objects by type, and with tracemalloc the
allocation sites that grew (Python objects and PyMem_RawMalloc; OpenSSL's
mallocs are not traced, they show as heap growth tracemalloc cannot explain).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any


async def probe(directory: Path, name: str, timeout: float = 60.0) -> dict[str, Any] | None:
    """Ask the hook in the target for a snapshot; None if it does not answer in time."""
    out = directory / f"{name}.json"
    out.unlink(missing_ok=True)
    (directory / f"{name}.req").write_text("")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists():
            return dict(json.loads(out.read_text()))
        if (directory / f"{name}.error").exists():
            return {"error": (directory / f"{name}.error").read_text()}
        await asyncio.sleep(0.2)
    return None


def heap(snap: dict[str, Any] | None) -> dict[str, Any]:
    """glibc's heap (in use / free) and live objects by type, from one snapshot."""
    if snap is None or "error" in snap:
        return {"error": (snap or {}).get("error", "no answer")}
    mi = snap["mallinfo2"]
    types = snap["gc_objects_by_type"]
    return {
        "malloc_in_use_kib": (mi["uordblks"] + mi["hblkhd"]) // 1024,
        "malloc_free_kib": mi["fordblks"] // 1024,
        "heap_arena_kib": mi["arena"] // 1024,
        "mmapped_chunks_kib": mi["hblkhd"] // 1024,
        "gc_objects_top60": sum(types.values()),
        "gc_objects_by_type": types,
        "tracemalloc_current": snap.get("tracemalloc_current"),
    }


def per_call(before: dict[str, Any], after: dict[str, Any], calls: int, directory: Path) -> dict:
    calls = max(calls, 1)
    mb, ma = before["mallinfo2"], after["mallinfo2"]
    out: dict[str, Any] = {
        "calls": calls,
        "malloc_in_use_kib_per_call": {
            "uordblks (heap chunks)": round((ma["uordblks"] - mb["uordblks"]) / 1024 / calls, 2),
            "hblkhd (mmapped chunks)": round((ma["hblkhd"] - mb["hblkhd"]) / 1024 / calls, 2),
            "arena (heap size)": round((ma["arena"] - mb["arena"]) / 1024 / calls, 2),
            "fordblks (free in heap)": round((ma["fordblks"] - mb["fordblks"]) / 1024 / calls, 2),
        },
        "rss_kib_per_call_by_mapping": {
            k: round((after["rss_kib_by_mapping"].get(k, 0) - v) / calls, 2)
            for k, v in before["rss_kib_by_mapping"].items()
            if after["rss_kib_by_mapping"].get(k, 0) != v
        },
        "objects_per_call": {
            k: round((v - before["gc_objects_by_type"].get(k, 0)) / calls, 2)
            for k, v in after["gc_objects_by_type"].items()
            if (v - before["gc_objects_by_type"].get(k, 0)) / calls >= 0.5
        },
    }
    snap_a, snap_b = directory / "baseline.snapshot", directory / "calls.snapshot"
    if snap_b.exists():
        import tracemalloc

        b = tracemalloc.Snapshot.load(str(snap_b))
        # Tracing starts once the baseline is written: the calls' snapshot then holds
        # only what came after it, compared with nothing.
        a = (
            tracemalloc.Snapshot.load(str(snap_a))
            if snap_a.exists()
            else tracemalloc.Snapshot((), b.traceback_limit)
        )
        # Not tracemalloc's own, nor the probe's (it loads procfs for each snapshot).
        filters = [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "*/memhook/sitecustomize.py", all_frames=True),
        ]
        a, b = a.filter_traces(filters), b.filter_traces(filters)
        stats = b.compare_to(a, "lineno")
        total = sum(s.size_diff for s in stats)
        out["tracemalloc_kib_per_call"] = round(total / 1024 / calls, 2)
        out["tracemalloc_top_sites_per_call"] = [
            {
                "site": f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
                "kib_per_call": round(s.size_diff / 1024 / calls, 3),
                "blocks_per_call": round(s.count_diff / calls, 2),
            }
            for s in stats[:25]
            if s.size_diff > 0
        ]
        tb = b.compare_to(a, "traceback")[:8]
        out["tracemalloc_top_tracebacks"] = [
            {
                "kib_per_call": round(s.size_diff / 1024 / calls, 3),
                "traceback": [f"{_short(f.filename)}:{f.lineno}" for f in s.traceback][:8],
            }
            for s in tb
            if s.size_diff > 0
        ]
    return out


def _short(path: str) -> str:
    for marker in ("site-packages" + os.sep, "src" + os.sep, "lib" + os.sep + "python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path
