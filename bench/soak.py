"""``python -m bench.soak`` (or ``python bench/soak.py``): the soak, :mod:`bench.scenarios.soak`.

.venv/bin/python -m bench.soak --calls 200 --minutes 10 --call-seconds 20
.venv/bin/python bench/soak.py --calls 20 --minutes 1          # a quick check
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # ``python bench/soak.py``: run as the package's module
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from .scenarios.soak import main

if __name__ == "__main__":
    sys.exit(main())
