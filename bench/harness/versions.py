"""Which fleet_ingress a run measured: the commit, and the source as it was on disk."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import fleet_ingress


def code_version() -> dict[str, Any]:
    src = Path(fleet_ingress.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        digest.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes())
    git = ["git", "-C", str(src)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
    )
    return {
        "package_dir": str(src),
        "src_sha256": digest.hexdigest()[:16],
        "git_head": head.stdout.strip() or None,
        "src_uncommitted_changes": len(dirty.stdout.splitlines()),
    }
