"""The scenarios, each a thin file on :mod:`bench.harness`: which calls to make when,
and which figures to take. ``python -m bench SCENARIO`` runs steady, ramp, idle and
churn against every target in turn; ``python -m bench.soak`` runs the soak."""

from .churn import churn
from .idle import idle
from .ramp import ramp
from .steady import steady

__all__ = ["churn", "idle", "ramp", "steady"]
