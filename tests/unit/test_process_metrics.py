"""The process_* metrics: prometheus_client's names and values, without listing
/proc/self/fd on every scrape (no sockets)."""

import os

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleet_ingress.ops.metrics import _ProcessCollector


def _values(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_same_series_as_prometheus_client_with_the_open_descriptors_counted():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    _ProcessCollector(ours)
    ProcessCollector(registry=theirs)
    files = [open(os.devnull) for _ in range(50)]  # held open: counted
    try:
        a, b = _values(ours), _values(theirs)
    finally:
        for f in files:
            f.close()
    assert a.keys() == b.keys()
    # prometheus_client's listing counts the descriptor it lists with.
    assert abs(a["process_open_fds"] - b["process_open_fds"]) <= 1
    assert a["process_max_fds"] == b["process_max_fds"]
    assert a["process_start_time_seconds"] == b["process_start_time_seconds"]
    assert abs(a["process_resident_memory_bytes"] - b["process_resident_memory_bytes"]) < 2**22
