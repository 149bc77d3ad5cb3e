"""Memory probe for a Python target, loaded from outside: no change to the code measured.

``python -m bench ... --ingress-env PYTHONPATH={repo}/bench/memhook:{repo}
--ingress-env BENCH_MEMHOOK_DIR=/tmp/x`` makes Python import this module at
start-up (``sitecustomize``) in the fleet-ingress process. Then:

- ``BENCH_TRACEMALLOC=N`` starts tracemalloc with N frames once the ``baseline``
  snapshot is written (0 or unset: off), so that what it traces is what came
  after the baseline and the start is not slowed (traced from the start, the
  supervisor missed the harness's 20 s for READY=1 on a busy host); it traces
  PyMem_RawMalloc too; OpenSSL's own mallocs it cannot see;
- ``BENCH_MEMHOOK_PROCESS=supervisor`` probes fleet-ingress's supervisor instead
  of its worker (``--memhook-process``): what it keeps per call of the slot table;
- a daemon thread watches ``BENCH_MEMHOOK_DIR`` for ``NAME.req``; for each it
  writes ``NAME.json`` (glibc ``mallinfo2``, RSS by mapping, live objects by
  type, tracemalloc totals) and, with tracemalloc on, ``NAME.snapshot``.

- ``BENCH_PATCH_BUFFERED=1`` turns fleet_ingress.net.proxy's ``_Side`` (both call
  sides) into an ``asyncio.BufferedProtocol`` reading into one buffer shared by
  every connection, each read copied out and handed to its ``data_received``:
  the change bench/README.md proposes, tried on the real ingress without
  editing src/ (uvloop's SSL layer then decrypts into that buffer instead of
  allocating a 256 KiB ``bytes`` per read).

Nothing happens unless ``BENCH_MEMHOOK_DIR`` or ``BENCH_PATCH_BUFFERED`` is set.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("BENCH_MEMHOOK_DIR")


def _mallinfo2() -> dict[str, int]:
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return {name: int(getattr(info, name)) for name, _ in MallInfo2._fields_}


def _rss_by_mapping() -> dict[str, int]:
    """``bench.harness.procfs.rss_by_mapping`` of this process, its module loaded by path
    (this directory alone is on the target's PYTHONPATH; procfs needs only the stdlib)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "harness", "procfs.py")
    spec = importlib.util.spec_from_file_location("_bench_procfs", path)
    assert spec is not None and spec.loader is not None
    procfs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(procfs)
    return procfs.rss_by_mapping("self")


def _snapshot(directory: str, name: str) -> None:
    import gc
    import json
    import sys
    import tracemalloc

    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        cls = type(obj)
        key = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"
        counts[key] = counts.get(key, 0) + 1
    report = {
        "mallinfo2": _mallinfo2(),
        "rss_kib_by_mapping": _rss_by_mapping(),
        "gc_objects_by_type": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:60]),
        "sys_allocated_blocks": sys.getallocatedblocks(),
        "tracemalloc": tracemalloc.is_tracing(),
    }
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        report["tracemalloc_current"] = current
        report["tracemalloc_peak"] = peak
        tracemalloc.take_snapshot().dump(os.path.join(directory, name + ".snapshot"))
    tmp = os.path.join(directory, name + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(directory, name + ".json"))
    frames = int(os.environ.get("BENCH_TRACEMALLOC", "0") or 0)
    if name == "baseline" and frames > 0 and not tracemalloc.is_tracing():
        tracemalloc.start(frames)


def _watch(directory: str) -> None:
    import time

    while True:
        for entry in sorted(os.listdir(directory)):
            if entry.endswith(".req"):
                name = entry[:-4]
                os.unlink(os.path.join(directory, entry))
                try:
                    _snapshot(directory, name)
                except Exception as exc:  # a probe must never take the target down
                    with open(os.path.join(directory, name + ".error"), "w") as f:
                        f.write(repr(exc))
        time.sleep(0.2)


class _PatchProxy:
    """Import hook: patch fleet_ingress.net.proxy right after it is executed."""

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name != "fleet_ingress.net.proxy":
            return None
        import importlib.util
        import sys

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module: object) -> None:
            exec_module(module)
            _make_buffered(module)

        spec.loader.exec_module = patched  # type: ignore[method-assign]
        return spec


def _make_buffered(proxy: object) -> None:
    import asyncio

    shared = memoryview(bytearray(256 * 1024))
    side = proxy._Side  # type: ignore[attr-defined]

    def get_buffer(self: object, sizehint: int) -> memoryview:
        return shared

    def buffer_updated(self: object, nbytes: int) -> None:
        self.data_received(bytes(shared[:nbytes]))  # type: ignore[attr-defined]

    side.get_buffer = get_buffer
    side.buffer_updated = buffer_updated
    # uvloop takes the buffered path only for a protocol that is no asyncio.Protocol.
    side.__bases__ = (asyncio.BufferedProtocol,)


if os.environ.get("BENCH_PATCH_BUFFERED") == "1":
    import sys

    sys.meta_path.insert(0, _PatchProxy())


def probed(argv: list[str], process: str | None) -> bool:
    """Whether this process is the one probed: fleet-ingress's worker (``process``
    unset or "worker"), or its supervisor (``python -m fleet_ingress run``; argv is
    ``["-m", "run", ...]`` at start-up, as bench starts it) with "supervisor". Not
    both: they would watch one directory, and whichever took a request answered it
    (a baseline from the worker and the calls from the supervisor gave -9.7 KiB
    malloc'd a call, session 36). Any other Python target (a bare splice) counts as a
    worker. (With more than one worker each still answers some: profile with one.)"""
    supervisor = argv[1:2] == ["run"]
    return supervisor if process == "supervisor" else not supervisor


if _DIR:
    import sys

    if probed(sys.argv, os.environ.get("BENCH_MEMHOOK_PROCESS")):
        import threading

        os.makedirs(_DIR, exist_ok=True)
        threading.Thread(target=_watch, args=(_DIR,), name="bench-memhook", daemon=True).start()
