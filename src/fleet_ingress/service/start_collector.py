"""The cyclic garbage collector off while a process of `fleet-ingress` starts.

Importing the modules and building what serves allocates objects by the
hundred thousand, next to none of them garbage, and the collector's passes
over them (110 of generation 0 and 10 of generation 1 while a worker imported
its modules) were 9 % of that import's CPU (session 50). `entry.main` turns it
off first (this module imports nothing else, so none of the imports after it
pay a pass); it is on again (`collector_back_on`) once the command's start is
done: a worker's at serving (its full collection and freeze there), the
supervisor's after its imports, another command's after its own (`cli`).
"""

from __future__ import annotations

import gc

_collector_held = False


def start_without_collector() -> None:
    """The collector off (once a process, and only if it was on)."""
    global _collector_held
    if _collector_held or not gc.isenabled():
        return
    gc.disable()
    _collector_held = True


def collector_back_on() -> None:
    """The collector on again if `start_without_collector` turned it off (and
    not since: `reexec_steps.collector_off_over_exec` keeps it off over an
    upgrade's exec on its own, then turns it on itself)."""
    global _collector_held
    if _collector_held:
        _collector_held = False
        gc.enable()
