"""Steps the wall clock of a process a test starts, and of its children, without
touching the host's: with this directory first on PYTHONPATH and
WALL_CLOCK_STEP_FILE naming a file, `time.time()` reads the host's
clock plus the seconds that file holds (none, 0), read at each call, so that a
test steps it forward or back while the processes run (what chrony does at
boot, or a VM resumed after a pause). CLOCK_MONOTONIC is left alone, as a step
leaves it."""

import os
import time

_STEP_FILE = os.environ.get("WALL_CLOCK_STEP_FILE")

if _STEP_FILE:
    _host_time = time.time

    def _stepped() -> float:
        try:
            with open(_STEP_FILE) as f:
                step = float(f.read() or 0)
        except (OSError, ValueError):
            step = 0.0
        return _host_time() + step

    time.time = _stepped
