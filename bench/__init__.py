"""Load benchmark of fleet-ingress against HAProxy and a direct baseline (``python -m bench``).

Modules: :mod:`bench.procfs` (/proc figures), :mod:`bench.children` (child
processes), :mod:`bench.tlsfiles`, :mod:`bench.fleets` (a simulated fleet
process), :mod:`bench.carrier` and :mod:`bench.worker` (the lean load
generator), :mod:`bench.targets` (direct, fleet-ingress, HAProxy, bare splice;
config rendering), :mod:`bench.scenarios` (steady, ramp, idle, churn),
:mod:`bench.report` (JSON, Markdown, PNG). ``bare_splice.py`` is the floor a
minimal uvloop TLS relay sets; ``memhook/`` profiles a target's memory from
the inside.
"""
