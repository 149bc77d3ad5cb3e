"""Load benchmark of fleet-ingress against HAProxy and a direct baseline (``python -m bench``).

:mod:`bench.harness` is the machinery every run shares: child processes,
/proc readings, TLS files, fleets, targets, load generators, statistics and
reports. :mod:`bench.scenarios` holds one thin file per scenario (steady, ramp,
idle, churn, soak) that says which calls to make when and which figures to
take. ``bare_splice.py`` is the floor a minimal uvloop TLS relay sets;
``memhook/`` profiles a target's memory from the inside.
"""
