"""The heap trim that keeps RSS flat under churn (see glibc_malloc's docstring)."""

import platform

import pytest

from fleet_ingress.service import glibc_malloc


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_trim_gives_freed_heap_memory_back():
    assert glibc_malloc._LIBC is not None
    glibc_malloc.pin_mmap_threshold()
    # Many small blocks (below the mmap threshold: they live in the heap), then
    # keep every 64th alive so the heap cannot simply shrink from the top.
    blocks = [bytearray(4000) for _ in range(40_000)]
    kept = blocks[::64]
    for block in blocks:
        block[0] = 1  # touch: resident
    del blocks
    before = _rss_kib()
    glibc_malloc.trim()
    after = _rss_kib()
    assert before - after > 50_000, (before, after)  # ~150 MB was freed; most returns
    assert len(kept) == 625


def test_finding_the_c_library_starts_no_process():
    """Imported by the supervisor, every worker and every upgrade's trial run:
    it must not run a program (`find_library` runs `ldconfig -p`)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "spawned = []\n"
        "sys.addaudithook(lambda event, args: spawned.append(event) "
        "if event in ('subprocess.Popen', 'os.posix_spawn', 'os.fork', 'os.exec') else None)\n"
        "import fleet_ingress.service.glibc_malloc as m\n"
        "print(len(spawned), m._LIBC is not None)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out[0] == "0", out
    if platform.libc_ver()[0] == "glibc":
        assert out[1] == "True", out
