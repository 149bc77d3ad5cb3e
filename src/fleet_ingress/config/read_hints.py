"""What to do about a file of ours that cannot be read: one wording for the
configuration file and the fleets file. Light on imports (`init` uses it)."""

from __future__ import annotations

PERMISSION_DENIED = (
    "permission denied: run this as root or as a member of the group that owns "
    "it (sudo, or `usermod -aG fleet-ingress $USER` and log in again); if "
    "that group cannot read it either, make it theirs: `chgrp fleet-ingress "
    "FILE && chmod 0640 FILE` (its directory 2770, docs/INSTALL.md section 2)"
)
