"""Which code this process runs: the version number, and a digest of the
package's own source files.

Every release says version 0.1.0 (the number is not bumped for each change),
so after an upgrade or a rollback an operator could not tell which code runs
(the cross-version audit of session 16). The digest can: the same source gives
the same digest wherever it is installed, any change to a file another. It
is computed once a process, on first use (5-10 ms for the whole package, more
on a cold disk cache): the supervisor and each worker before they serve.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from fleet_ingress import __version__

# Hex digits shown: enough to tell releases apart at a glance.
CODE_DIGITS = 12


@functools.cache
def code_digest(package: Path | None = None) -> str:
    """SHA-256 over every file of the package (its modules and templates; not
    what Python compiled from them), by relative path and content, in path
    order; `package`: another copy's directory (tests)."""
    root = package or Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        try:
            digest.update(path.read_bytes() + b"\0")
        except OSError:  # a stray file this process may not read: named, not read
            digest.update(b"unreadable\0")
    return digest.hexdigest()[:CODE_DIGITS]


def version_line() -> str:
    """What `fleet-ingress --version` prints."""
    return f"fleet-ingress {__version__} (code {code_digest()})"
