"""Build and load bench/c_relay/relay.c (``_c_relay``) on demand: a bench floor only.

Compiled with the host's C compiler (``CC``, else sysconfig's, else ``cc``),
the running Python's headers and OpenSSL's headers, linked against the very
libssl file that CPython's ``_ssl`` module has mapped in this process, into
``bench/c_relay/build/`` (git-ignored), once per Python ABI and libssl: built
again when relay.c is newer. Nothing in src/, the package install or CI builds
it. ``python bench/c_relay/build.py`` builds it and says where, or why not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "relay.c"
BUILD = HERE / "build"


class CannotBuild(RuntimeError):
    """No compiler, no headers, or the compile failed: the message says which and the fix."""


def _libssl_path() -> str:
    """The libssl CPython's ``_ssl`` is linked against, as this process mapped it."""
    import _ssl  # noqa: F401  (maps libssl)

    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/libssl.so" in line:
                return line.split()[-1]
    raise CannotBuild("no libssl mapped in this process after importing _ssl")


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    argv = shlex.split(cc)
    if shutil.which(argv[0]) is None:
        argv = ["cc"]
    if shutil.which(argv[0]) is None:
        raise CannotBuild(f"no C compiler ({cc!r} nor cc): apt-get install gcc")
    return argv


def target() -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = hashlib.sha256(f"{sys.version}|{_libssl_path()}".encode()).hexdigest()[:12]
    return BUILD / f"_c_relay-{key}{suffix}"


def build() -> Path:
    """The built extension's path (compiled now if missing or older than relay.c)."""
    out = target()
    if out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        raise CannotBuild(f"no Python.h in {include}: install this Python's headers")
    cc = _compiler()
    libssl = _libssl_path()
    BUILD.mkdir(exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    argv = [*cc, "-O2", "-fPIC", "-shared", "-Wall", "-Werror", f"-I{include}"]
    argv += [str(SOURCE), libssl, "-o", str(tmp)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        hint = " (apt-get install libssl-dev)" if "openssl/" in done.stderr else ""
        raise CannotBuild(f"{shlex.join(argv)} failed{hint}:\n{done.stderr.strip()}")
    tmp.replace(out)  # atomic: two bench processes building at once both load a whole file
    return out


def load() -> ModuleType:
    """``_c_relay``, built if need be; its OpenSSL (built against, loaded) must agree."""
    path = build()
    spec = importlib.util.spec_from_file_location("_c_relay", path)
    if spec is None or spec.loader is None:
        raise CannotBuild(f"{path}: not loadable as an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built, loaded = module.openssl_versions()
    if built >> 20 != loaded >> 20:  # major and minor (0xMNN00PP0L)
        raise CannotBuild(
            f"relay.c was built against OpenSSL {built:#x}, _ssl runs {loaded:#x}: "
            "install the headers of the libssl _ssl uses"
        )
    return module


if __name__ == "__main__":
    try:
        print(build())
    except CannotBuild as exc:
        sys.exit(f"bench/c_relay: {exc}")
