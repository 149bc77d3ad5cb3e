"""The host-wide stats a supervisor renders (ops.host_stats), no sockets: the
same JSON keys and metric names and labels as the one-process ingress (so
dashboards, alert rules and `stat` keep working), the sums of the workers'
reports, and a row per worker."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.core.host_view import Counts, HostView, ReportError, WorkerReport
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.dispatch import Dispatcher
from fleet_ingress.ops.admin_client import format_stat_table
from fleet_ingress.ops.fleet_display import upgrade_failed
from fleet_ingress.ops.host_stats import (
    HostMetrics,
    WorkerReporter,
    host_snapshot,
    with_drain_end,
)
from fleet_ingress.ops.local_counts import REMOVED_FLEETS, fold_fleets_gone, local_counts
from fleet_ingress.ops.metrics import IngressMetrics
from fleet_ingress.ops.reload_outcome import reload_outcome
from fleet_ingress.ops.snapshot import snapshot
from fleet_ingress.ops.stats_page import render_stats_page
from tests.support import python_child

FLEETS = "https://a.test name=a\nhttps://b.test name=b\n"


def balancer() -> Balancer:
    return Balancer(FleetSet.from_specs(parse_fleets_text(FLEETS, default_maxconn=16)))


def a_worker(
    seq_counts: int, pid: int, generation: int, *, draining: bool = False, closing: int = 0
):
    """A worker's registry, fleet records and histograms with `seq_counts` of
    everything (`closing` calls ended whose sides are still closing), and its
    report as the supervisor reads it."""
    registry = Registry()
    registry.closing = {object() for _ in range(closing)}  # type: ignore[misc]
    fleets = balancer().fleets
    # Also the one-process ingress's metrics, had it counted the same.
    metrics = IngressMetrics(
        Balancer(FleetSet(fleets)), registry, _no_queue(), reloads=lambda: {"applied": 1}
    )
    n = seq_counts
    registry.connections_total = n
    registry.tls_handshake_failures = n
    registry.refused_connections = 1
    registry.acme.members = dict.fromkeys(object() for _ in range(n))  # n open
    registry.acme.refused, registry.acme.evicted = 2 * n, 3 * n
    registry.accepts_paused_ms = 250 * n
    registry.new_connection_cpu.spent = 0.5 * n
    registry.requests[("/ws/", 101)] += n
    registry.requests[("/ws/", 503)] += 1
    registry.ended[("a", "carrier_closed")] += n
    registry.ended_bytes_from_carrier = 1000 * n
    registry.ended_bytes_to_carrier = 2000 * n
    fleets[0].calls_total = n
    fleets[0].responses[101] += n
    fleets[0].responses[429] += 1
    fleets[1].retries = 2
    fleets[1].redispatches = 1
    for _ in range(n):
        metrics.handshake_seconds.observe(0.02)
        metrics.call_seconds.observe(42)
    reporter = WorkerReporter(
        registry, lambda: fleets, metrics.histograms, draining=lambda: draining
    )
    wire = {"pid": pid, "generation": generation, "seq": 1, **reporter()}
    return registry, fleets, metrics, WorkerReport.from_wire(wire)


def _no_queue() -> Dispatcher:
    return Dispatcher(Balancer(FleetSet.from_specs([])), queue_timeout=1, max_queue=1)


def families(registry) -> dict[str, dict[tuple, float]]:
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def host_with(*reports: WorkerReport) -> tuple[HostSlots, HostView]:
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    view = HostView()
    for i, report in enumerate(reports):
        slots.join(i, pid=report.pid, generation=report.generation)
        view.report(report, now=0.0)
    return slots, view


def test_host_metrics_are_the_one_process_names_and_labels_with_the_workers_summed(monkeypatch):
    from fleet_ingress.net import event_loop

    # Each process's own count of errors its loop saw uncaught (others of this
    # test run's loops may have some): none, as a fresh process has.
    monkeypatch.setattr(event_loop, "_unexpected", 0)
    *_, r1 = a_worker(3, pid=101, generation=1, draining=True)
    *_, r2 = a_worker(4, pid=202, generation=2)
    slots, view = host_with(r1, r2)
    host = families(
        HostMetrics(slots, view, reloads=lambda: {"applied": 1}, calls_lost=lambda: 3).prometheus
    )

    # One process that counted both workers' worth: what the host must show.
    registry, fleets, one, _ = a_worker(7, pid=1, generation=0)
    registry.refused_connections = 2
    registry.requests[("/ws/", 503)] += 1
    fleets[0].responses[429] += 1
    fleets[1].retries, fleets[1].redispatches = 4, 2
    one_process = families(one.prometheus)
    assert not [name for name in one_process if name.endswith("_created")]

    worker_only = {n for n in host if n.startswith("fleet_ingress_worker")}
    worker_only |= {"fleet_ingress_slots_reclaimed_total", "fleet_ingress_workers_retired_total"}
    worker_only.add("fleet_ingress_slots_granted_past_cut_total")
    worker_only.add("fleet_ingress_supervisor_task_failures_total")
    worker_only.add("fleet_ingress_supervisor_deaths_total")
    worker_only.add("fleet_ingress_supervisor_oom_kills_total")
    assert set(host) - worker_only == set(one_process)
    for name, samples in one_process.items():
        if not name.startswith("process_"):
            assert host[name] == samples, name
    assert host["fleet_ingress_relayed_bytes_total"][(("direction", "carrier_to_fleet"),)] == 7000
    assert host["fleet_ingress_handshake_duration_seconds_count"][()] == 7
    assert host["fleet_ingress_accepts_paused_seconds_total"][()] == 1.75  # seconds, summed
    assert host["fleet_ingress_new_connection_cpu_seconds_total"][()] == 3.5
    assert host["fleet_ingress_worker_calls_lost_total"][()] == 3  # the supervisor's count

    rows = {k: v for k, v in host["fleet_ingress_worker_draining"].items()}
    assert rows == {
        (("generation", "1"), ("pid", "101")): 1.0,
        (("generation", "2"), ("pid", "202")): 0.0,
    }
    assert host["fleet_ingress_workers"] == {
        (("generation", "1"),): 1.0,
        (("generation", "2"),): 1.0,
    }


def test_a_handshake_of_a_few_milliseconds_has_a_bucket_of_its_own():
    """Fleets near the ingress answer in 1-3 ms (the docs audit of session 12: every
    handshake in its first bucket, 5 ms, and the dashboard's p50 and p99 made up
    by interpolation inside it)."""
    registry = Registry()
    metrics = IngressMetrics(Balancer(FleetSet([])), registry, _no_queue())
    for seconds in (0.0011, 0.0015, 0.0029, 0.02):
        metrics.handshake_seconds.observe(seconds)
    samples = {
        s.labels["le"]: s.value
        for family in text_string_to_metric_families(generate_latest(metrics.prometheus).decode())
        for s in family.samples
        if s.name == "fleet_ingress_handshake_duration_seconds_bucket"
    }
    assert (samples["0.001"], samples["0.002"], samples["0.003"], samples["0.005"]) == (0, 2, 3, 3)


def test_host_snapshot_has_the_one_process_keys_plus_a_row_per_worker():
    *_, r1 = a_worker(3, pid=101, generation=1, draining=True)
    *_, r2 = a_worker(4, pid=202, generation=2)
    slots, view = host_with(r1, r2)
    slots.acquire(1, 1, [], now=0.0)  # worker 202 holds a slot
    snap = host_snapshot(slots, view, started_at=0.0)

    registry, fleets, _, _ = a_worker(7, pid=1, generation=0)
    one = snapshot(Balancer(FleetSet(fleets)), registry, _no_queue(), started_at=0.0)
    assert set(snap) == set(one) | {"workers"}
    assert set(snap["frontend"]) == set(one["frontend"])
    assert snap["frontend"]["connections_total"] == 7
    assert snap["frontend"]["requests"] == {"/ws/": {"101": 7, "503": 2}}
    a = next(f for f in snap["fleets"] if f["name"] == "a")
    assert (a["calls_total"], a["responses"], a["responses_429"]) == (7, {"101": 7, "429": 2}, 2)
    assert a["active"] + next(f["active"] for f in snap["fleets"] if f["name"] == "b") == 1
    # What only /metrics had (session 15's accounting audit): failed handshakes,
    # refusals, and how calls ended, the host's and each fleet's.
    fe = snap["frontend"]
    assert (fe["tls_handshake_failures"], fe["refused_connections"]) == (7, 2)
    # And :80's, what /metrics alone had (the :80 audit of session 32).
    assert (fe["acme_connections"], fe["acme_refused_connections"]) == (3 + 4, 2 * (3 + 4))
    assert fe["acme_evicted_connections"] == 3 * (3 + 4)
    assert fe["calls_ended"] == {"carrier_closed": 7} == a["calls_ended"]
    assert next(f for f in snap["fleets"] if f["name"] == "b")["calls_ended"] == {}
    assert [
        (w["pid"], w["generation"], w["calls"], w["draining"], w["state"]) for w in snap["workers"]
    ] == [(101, 1, 0, True, "draining"), (202, 2, 1, False, "serving")]

    table = format_stat_table(snap)
    assert "worker  gen  calls" in table
    assert "101     1    0      0      0        0         draining" in table
    page = render_stats_page(snap)
    assert '<table id="workers">' in page and "<td>202</td>" not in page
    assert 'port 80 (ACME, redirects)</td><td class="l">7 open' in page
    assert "(14 reset at accept,\n 21 closed for newer ones)" in page
    assert '<td class="l">202</td>' in page
    # The one-process page and table have no workers section.
    assert "workers" not in render_stats_page(one) and "worker " not in format_stat_table(one)


def test_calls_closing_are_the_workers_summed_and_each_ones_in_stat_and_the_page():
    *_, r1 = a_worker(1, pid=101, generation=1, closing=2)
    *_, r2 = a_worker(1, pid=202, generation=1)
    slots, view = host_with(r1, r2)
    snap = host_snapshot(slots, view, started_at=0.0)
    assert snap["frontend"]["closing_calls"] == 2
    assert [(w["pid"], w["closing_calls"]) for w in snap["workers"]] == [(101, 2), (202, 0)]
    table = format_stat_table(snap)
    assert "frontend: 0 calls, 2 closing, " in table
    page = render_stats_page(snap)
    assert '<td class="l">calls closing</td><td class="l">2\n' in page
    # The workers table: pid, generation, calls, connections, then closing.
    assert '<td class="l">101</td><td>1</td><td>0</td><td>0</td><td>2</td>' in page
    assert '<td class="l">202</td><td>1</td><td>0</td><td>0</td><td>0</td>' in page


def test_a_worker_that_has_joined_but_not_yet_reported_has_a_row():
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    slots.join("k", pid=55, generation=3)
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    assert snap["workers"] == [
        {
            "pid": 55,
            "generation": 3,
            "calls": 0,
            "connections": None,
            "closing_calls": None,
            "reserved": 0,
            "reserved_by_fleet": {},
            "draining": None,
            "channel_lost": False,
            "state": None,
            "started": None,
            "last_report_age_s": None,
            "report_overdue": False,
            "cpu_seconds": None,
            "resident_bytes": None,
            "code": None,
            "drain_ends_in_s": None,
        }
    ]
    format_stat_table(snap)
    render_stats_page(snap)


def test_a_worker_whose_asked_report_is_overdue_is_shown_unresponsive_with_its_last_counts():
    """Session 40's host-view audit: a stopped worker was shown unresponsive
    only after two pulls (15-20 s). A report asked and judged overdue (unread
    REPORT_OVERDUE in time the supervisor ran: net.slot_server's timer) makes it
    so at once; its counts stay its last report's, neither dropped nor counted
    twice."""
    *_, r1 = a_worker(3, pid=101, generation=1)
    *_, r2 = a_worker(4, pid=202, generation=1)
    slots, view = host_with(r1, r2)
    before = host_snapshot(slots, view, started_at=0.0)
    row = slots.find_row(1)
    assert row is not None
    snap = host_snapshot(slots, view, started_at=0.0)
    assert [(w["pid"], w["state"], w["report_overdue"]) for w in snap["workers"]] == [
        (101, "serving", False),
        (202, "serving", False),
    ]
    row.report_overdue = True
    snap = host_snapshot(slots, view, started_at=0.0)
    assert [(w["pid"], w["state"], w["report_overdue"]) for w in snap["workers"]] == [
        (101, "serving", False),
        (202, "unresponsive", True),
    ]
    assert snap["frontend"] == before["frontend"] and snap["fleets"] == before["fleets"]
    assert "unresponsive  " in format_stat_table(snap)
    assert "s ago, overdue" in format_stat_table(snap)
    assert ", overdue</td>" in render_stats_page(snap)
    host = families(HostMetrics(slots, view, reloads=dict, calls_lost=lambda: 0).prometheus)
    assert host["fleet_ingress_worker_report_overdue"] == {
        (("generation", "1"), ("pid", "101")): 0.0,
        (("generation", "1"), ("pid", "202")): 1.0,
    }
    assert host["fleet_ingress_connections_total"][()] == 7  # 3 + 4, as before


def test_a_worker_whose_channel_was_lost_shows_its_slots_and_draining_until_it_exits():
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    slots.join("k", pid=55, generation=3)
    assert slots.acquire("k", 1, (), 0.0) is not None
    slots.leave("k", keep_held=True)  # its process runs on
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    assert [
        (w["pid"], w["calls"], w["draining"], w["channel_lost"], w["state"])
        for w in snap["workers"]
    ] == [(55, 1, True, True, "draining, channel lost")]
    assert sum(f["active"] for f in snap["fleets"]) == 1
    assert "draining, channel lost" in format_stat_table(snap)
    assert "draining, channel lost" in render_stats_page(snap)
    # Its last report went with its channel: no report age, so FleetIngressWorkerHung
    # (report age over 20 s) does not page for a worker that is not hung.
    host = families(HostMetrics(slots, HostView(), reloads=dict, calls_lost=lambda: 0).prometheus)
    assert host["fleet_ingress_worker_calls"] == {(("generation", "3"), ("pid", "55")): 1.0}
    assert host.get("fleet_ingress_worker_report_age_seconds", {}) == {}
    slots.release_kept("k")  # it exited
    assert host_snapshot(slots, HostView(), started_at=0.0)["workers"] == []


def test_local_counts_read_live_calls_bytes_too():
    registry = Registry()
    registry.ended_bytes_from_carrier = 10
    counts = local_counts(registry, [])
    assert counts.counter("bytes_from_carrier") == 10


def test_a_fleet_in_maint_shows_no_stale_health_or_free_count():
    """MAINT stops its probes: what the last one said is not shown as now."""
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    a, b = slots.balancer.fleets
    for f in (a, b):
        f.health, f.reported_available = Health.UP, 9
    b.set_admin(Admin.MAINT)
    b.spec = replace(b.spec, admin=Admin.MAINT)  # and saved in the fleets file
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    for row in snap["fleets"]:  # both probed before b went into MAINT
        row["last_check"], row["last_check_age_s"] = "pass: fleet_available=9", 30.0
    rows = {line.split()[0]: line.split() for line in format_stat_table(snap).splitlines()[1:3]}
    assert rows["a"][1:3] == ["UP", "READY"] and rows["a"][4] == "9/9"
    assert rows["b"][1:3] == ["-", "MAINT"] and rows["b"][4] == "-/-"
    assert " ".join(rows["a"]).endswith("pass: fleet_available=9 30.0s ago")
    assert "pass:" not in " ".join(rows["b"]) and rows["b"][-1] == "-"
    assert "MAINT: not probed" in format_stat_table(snap)
    page = render_stats_page(snap)
    b_row = page[page.index("<b>b</b>") :].split("</tr>")[0]
    assert ">UP<" not in b_row and "<td>9</td>" not in b_row and "pass:" not in b_row
    a_row = page[page.index("<b>a</b>") :].split("</tr>")[0]
    assert ">UP<" in a_row and "<td>9</td>" in a_row
    # The raw figures stay in /stats.json, where the age of the last check shows.
    assert next(f for f in snap["fleets"] if f["name"] == "b")["health"] == "UP"


def test_workers_replaced_and_the_calls_they_took_are_shown_in_stat_and_the_page():
    """Before, only /stats.json and /metrics said a worker had been killed (the docs
    audit of session 12: a kill -9 showed in stat as a new pid, nothing more)."""
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    slots.join("k", pid=55, generation=1)
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    assert "replaced" not in format_stat_table(snap)
    assert 'id="replaced"' not in render_stats_page(snap)
    snap["worker_restarts"], snap["worker_calls_lost"] = {"killed": 1, "hung": 0, "crashed": 2}, 5
    line = "workers replaced since start: crashed 2, killed 1; 5 calls lost with workers that died"
    assert line in format_stat_table(snap)
    assert line in render_stats_page(snap)
    # None replaced (an old generation's worker killed as it drained), calls lost all the
    # same: before, nothing said (the accounting audit of session 31).
    snap["worker_restarts"], snap["worker_calls_lost"] = {"killed": 0}, 2
    line = "2 calls lost with workers that died since start (none replaced"
    assert line in format_stat_table(snap)
    assert line in render_stats_page(snap)


def test_oom_kills_are_shown_in_stat_and_the_page_with_what_to_change():
    """A worker or a supervisor the kernel's OOM killer took: said so, with the
    limit to raise, in stat and on the page (before session 35: `killed 1`, as
    for a kill -9, and nothing of a supervisor's death)."""
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    slots.join("k", pid=55, generation=1)
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    snap["worker_restarts"], snap["worker_calls_lost"] = {"killed": 1}, 1
    snap["supervisor_oom_kills"] = 0
    for shown in (format_stat_table(snap), render_stats_page(snap)):
        assert "OOM" not in shown
    snap["worker_restarts"], snap["worker_calls_lost"] = {"oom": 1, "killed": 1}, 3
    snap["supervisor_oom_kills"] = 2
    for shown in (format_stat_table(snap), render_stats_page(snap).replace("&#x27;", "'")):
        assert "workers replaced since start: killed 1, oom 1;" in shown
        assert "oom: killed by the kernel's OOM killer" in shown
        assert "the supervisor was killed by the kernel's OOM killer 2 times" in shown
        assert "MemoryMax=" in shown
        assert "not replaced" not in shown  # each OOM-killed worker was
    # One more not replaced (an upgrade's old generation draining): said too.
    snap["worker_oom_kills"] = 2
    for shown in (format_stat_table(snap), render_stats_page(snap).replace("&#x27;", "'")):
        assert "1 worker killed by the kernel's OOM killer and not replaced" in shown


def test_oom_kills_read_from_a_count_of_others_too_are_said_possibly():
    """Where the supervisor reads the host's count (no memory cgroup of its
    own, and no kernel log to name the pid), stat and the page say that an
    `oom` there is only possibly the OOM killer's."""
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    slots.join("k", pid=55, generation=1)
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    snap["worker_restarts"], snap["worker_calls_lost"] = {}, 0
    snap["oom_kills_broad"] = None
    for shown in (format_stat_table(snap), render_stats_page(snap)):
        assert "OOM kills read from" not in shown
    snap["oom_kills_broad"] = "the whole host (/proc/vmstat: any process's OOM kill)"
    for shown in (format_stat_table(snap), render_stats_page(snap).replace("&#x27;", "'")):
        assert "OOM kills read from the whole host (/proc/vmstat" in shown
        assert "'possibly the OOM killer'" in shown and "kill -9" in shown


def test_a_failed_upgrade_is_shown_in_stat_and_the_page_until_one_succeeds():
    """The last upgrade's state as the supervisor's snapshot has it: a line while
    it failed, whoever began it, and while the next is under way; none once one is done."""
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    slots.join("k", pid=55, generation=2)
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    snap["generation"] = 2
    assert "UPGRADE" not in format_stat_table(snap)  # none yet
    error = "the trial run of the installed code failed: SyntaxError in routing.py"
    snap["upgrade"] = {"state": "failed", "source": "command", "finished": 0.0, "error": error}
    line = (
        "LAST UPGRADE FAILED at 1970-01-01 00:00 UTC (begun by `fleet-ingress upgrade`): "
        f"{error}; generation 2 serves on"
    )
    assert line in format_stat_table(snap)
    assert 'id="upgrade-failed"' in render_stats_page(snap)
    assert "then `fleet-ingress upgrade`" in render_stats_page(snap)
    # A trial run's error, several lines: its first and the run's last on the line,
    # not the traceback nor the fix's words (before: "stat: WORKERS MISSING" read
    # as that line to whatever looks for it).
    snap["upgrade"]["error"] = (
        "the installed code failed its trial run (exit 1; python importing fleet_ingress):\n"
        'Traceback (most recent call last):\n  File "routing.py", line 9\n'
        "SyntaxError: invalid syntax\n"
        "reinstall from the release's source; meanwhile (`fleet-ingress stat`: WORKERS MISSING)"
    )
    shown = format_stat_table(snap)
    assert (
        "(begun by `fleet-ingress upgrade`): the installed code failed its trial run (exit 1; "
        "python importing fleet_ingress): SyntaxError: invalid syntax (the whole error: "
    ) in shown, shown
    assert "WORKERS MISSING" not in shown and "Traceback" not in shown
    # The next upgrade under way: the failed one is still the last outcome (as
    # fleet_ingress_upgrade_failed says), and the line says one is under way.
    # Before, the line went while the next upgrade was checked.
    snap["upgrade_last_finished"] = failed = snap["upgrade"]
    for state in ("checking", "starting workers"):
        snap["upgrade"] = {"state": state, "source": "SIGUSR2"}
        shown = format_stat_table(snap)
        assert "LAST UPGRADE FAILED at 1970-01-01 00:00 UTC (begun by `fleet-ingress" in shown
        assert f"an upgrade begun since is under way ({state})" in shown, shown
        assert 'id="upgrade-failed"' in render_stats_page(snap)
    assert "under way" not in format_stat_table({**snap, "upgrade": failed})
    # It succeeded: no line, from this supervisor's snapshot or an older one's.
    snap["upgrade"] = snap["upgrade_last_finished"] = {"state": "done", "finished": 9.0}
    assert "UPGRADE FAILED" not in format_stat_table(snap)
    assert 'id="upgrade-failed"' not in render_stats_page(snap)
    del snap["upgrade_last_finished"]
    assert "UPGRADE FAILED" not in format_stat_table(snap)


def test_workers_missing_are_shown_with_what_to_do_while_replacements_die_at_start():
    """Fewer workers serving than wanted: a line in stat and on the page, which
    says what to do once replacements die as they start; none while stopping
    (every worker is leaving then) or from a one-process snapshot."""
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    slots.join("k", pid=55, generation=1)
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    assert "WORKERS MISSING" not in format_stat_table(snap)  # no supervisor figures
    snap.update(workers_wanted=2, workers_serving=2, workers_dying_at_start=0, code="abc123")
    assert "WORKERS MISSING" not in format_stat_table(snap)
    snap["workers_serving"] = 1
    for shown in (format_stat_table(snap), render_stats_page(snap)):
        assert "WORKERS MISSING: 1 of 2 serving; a replacement is being started" in shown
    snap["workers_dying_at_start"] = 3
    for shown in (format_stat_table(snap), render_stats_page(snap)):
        assert "replacements die soon after they start" in shown
        assert "reinstall the release the supervisor runs (code abc123)" in shown
    snap["worker_start_error"] = "[Errno 24] Too many open files"
    assert "a worker cannot be started: [Errno 24] Too many open files" in format_stat_table(snap)
    snap["state"] = "draining"
    assert "WORKERS MISSING" not in format_stat_table(snap)


def test_a_refused_reload_is_shown_until_one_applies():
    slots, view = host_with()
    refused = reload_outcome("fleets.txt line 3: 'nmae=x' is not an option")
    snap = host_snapshot(slots, view, started_at=0.0, last_reload=refused)
    assert snap["last_reload"]["result"] == "refused"
    for shown in (format_stat_table(snap), render_stats_page(snap)):
        assert "LAST RELOAD REFUSED" in shown and "nmae=x" in shown
    applied = host_snapshot(
        slots, view, started_at=0.0, last_reload=reload_outcome(None, "fleet c added")
    )
    for shown in (format_stat_table(applied), render_stats_page(applied)):
        assert "RELOAD REFUSED" not in shown


def test_a_fleet_reporting_a_count_past_a_floats_range_does_not_break_the_scrape():
    # SPEC 4: no upper bound on fleet_available; a probe passes with 10**400.
    slots = HostSlots(balancer(), queue_timeout=1, max_queue=1)
    a = slots.balancer.fleets[0]
    a.reported_available, a.opened_at_probe = 10**400, a.opened_total
    seen = families(HostMetrics(slots, HostView()).prometheus)
    fleet_a = (("fleet", "a"),)
    assert seen["fleet_ingress_fleet_reported_available"][fleet_a] == float("inf")
    assert seen["fleet_ingress_fleet_estimated_available"][fleet_a] == float("inf")
    assert fleet_a in seen["fleet_ingress_fleet_up"]  # the rest is rendered as ever


def test_log_lines_dropped_are_the_workers_and_the_supervisors_own(monkeypatch):
    """Each process counts the lines its stderr did not take (logs.StderrSink): a
    worker's reach the supervisor in its report, summed with its own."""
    from fleet_ingress import logs

    class Sink:
        dropped = 0

    monkeypatch.setattr(logs, "_sink", Sink())
    Sink.dropped = 5  # each worker's, as it reports
    *_, r1 = a_worker(1, pid=101, generation=1)
    *_, r2 = a_worker(1, pid=202, generation=1)
    slots, view = host_with(r1, r2)
    Sink.dropped = 2  # the supervisor's own
    host = families(HostMetrics(slots, view).prometheus)
    assert host["fleet_ingress_log_lines_dropped_total"][()] == 5 + 5 + 2


def test_unexpected_errors_are_the_workers_and_the_supervisors_own(monkeypatch):
    """Each process counts what reached its event loop's handler uncaught: a
    worker's reach the supervisor in its report, summed with its own, and a
    worker gone keeps its part (folded, as every counter of a worker gone)."""
    from fleet_ingress.net import event_loop

    monkeypatch.setattr(event_loop, "_unexpected", 3)  # each worker's, as it reports
    *_, r1 = a_worker(1, pid=101, generation=1)
    *_, r2 = a_worker(1, pid=202, generation=1)
    slots, view = host_with(r1, r2)
    monkeypatch.setattr(event_loop, "_unexpected", 1)  # the supervisor's own
    host = families(HostMetrics(slots, view).prometheus)
    assert host["fleet_ingress_unexpected_errors_total"][()] == 3 + 3 + 1
    assert view.leave((202, 1)) is not None
    host = families(HostMetrics(slots, view).prometheus)
    assert host["fleet_ingress_unexpected_errors_total"][()] == 3 + 3 + 1


def test_a_removed_fleets_ended_calls_leave_metrics_as_its_other_series_do():
    *_, report = a_worker(3, pid=101, generation=1)
    wire = report.counts.to_wire()
    wire["counters"] += [
        ["calls_ended", "gone", "carrier_closed", 5],  # a fleet removed since
        ["calls_ended", "", "error", 1],  # no fleet answered: stays
    ]
    again = {"pid": 101, "generation": 1, "seq": 1, "started": report.started, "calls": 0}
    slots, view = host_with(WorkerReport.from_wire({**again, "counts": wire}))
    ended = families(HostMetrics(slots, view).prometheus)["fleet_ingress_calls_ended_total"]
    assert {dict(labels)["fleet"] for labels in ended} == {"a", ""}
    assert view.totals().counter("calls_ended", "gone", "carrier_closed") == 5  # still counted
    # Until the supervisor forgets it, its series stays: its last calls end as it
    # leaves the set, reported after (the accounting audit of session 31).
    metrics = HostMetrics(slots, view, fleets_gone=lambda: {"gone"})
    ended = families(metrics.prometheus)["fleet_ingress_calls_ended_total"]
    assert ended[(("fleet", "gone"), ("reason", "carrier_closed"))] == 5


def test_a_workers_report_names_only_the_fleets_it_has_its_ended_calls_all_kept():
    """Fleets that came and went under new names (one per autoscaled instance)
    stayed in every report by name, and the channel cuts a report past
    slot_wire.MAX_LINE: their ended calls now count under one label."""
    registry, fleets, _, _ = a_worker(3, pid=101, generation=1)
    for i in range(2000):
        registry.ended[(f"instance-{i}", "carrier_closed")] += 1
        registry.ended[(f"instance-{i}", "drain")] += 2
    registry.ended[("", "error")] += 1  # no fleet answered: its own label, kept
    reporter = WorkerReporter(registry, lambda: fleets, {})
    for _ in range(2):  # read twice: folded once, not counted again
        counts = Counts.from_wire(reporter()["counts"])
        ended = dict(counts.family("calls_ended", 2))
        assert ended == {
            ("", "error"): 1,
            ("a", "carrier_closed"): 3,
            (REMOVED_FLEETS, "carrier_closed"): 2000,
            (REMOVED_FLEETS, "drain"): 4000,
        }
    assert len(json.dumps(reporter())) < 4096
    assert set(registry.ended) == {
        ("a", "carrier_closed"),
        ("", "error"),
        *((REMOVED_FLEETS, r) for r in ("carrier_closed", "drain")),
    }
    # Every call still counts in the frontend's total by reason; per fleet, a
    # removed fleet shows nowhere, as before.
    report = WorkerReport.from_wire({"pid": 101, "generation": 1, "seq": 2, **reporter()})
    slots, view = host_with(report)
    snap = host_snapshot(slots, view, started_at=time.monotonic())
    assert snap["frontend"]["calls_ended"] == {"carrier_closed": 2003, "drain": 4000, "error": 1}
    ended_metric = families(HostMetrics(slots, view).prometheus)["fleet_ingress_calls_ended_total"]
    assert {dict(labels)["fleet"] for labels in ended_metric} == {"a", ""}


def test_the_counts_of_workers_gone_keep_a_removed_fleets_counts_under_removed():
    """Folded, not dropped: the removed fleets' row (`removed_fleets`) keeps a
    fleet's lifetime totals once it is forgotten; dropped, its calls and 429s
    went from every view but the frontend's totals."""
    counts = Counts()
    c = counts.counters
    c[("fleet_calls", "a")] = 5
    c[("fleet_calls", "gone")] = 7
    c[("fleet_responses", "gone", "101")] = 7
    c[("fleet_retries", "gone")] = 1
    c[("fleet_redispatches", "gone")] = 1
    c[("calls_ended", "gone", "drain")] = 4
    c[("calls_ended", REMOVED_FLEETS, "drain")] = 10  # folded by a worker before
    c[("calls_ended", "", "error")] = 2
    c[("requests", "/ws/", "101")] = 12  # not by fleet: untouched
    for _ in range(2):
        fold_fleets_gone(counts, {"a"})
        assert dict(c) == {
            ("fleet_calls", "a"): 5,
            ("fleet_calls", REMOVED_FLEETS): 7,
            ("fleet_responses", REMOVED_FLEETS, "101"): 7,
            ("fleet_retries", REMOVED_FLEETS): 1,
            ("fleet_redispatches", REMOVED_FLEETS): 1,
            ("calls_ended", REMOVED_FLEETS, "drain"): 14,
            ("calls_ended", "", "error"): 2,
            ("requests", "/ws/", "101"): 12,
        }


def test_probe_durations_carried_over_an_exec_are_kept_for_the_fleets_still_there():
    from prometheus_client import CollectorRegistry

    from fleet_ingress.ops.metrics import FleetChecks

    old = FleetChecks(CollectorRegistry())
    for fleet, seconds in [("a", 0.003), ("a", 0.3), ("gone", 0.02)]:
        old.check_observed(fleet, seconds)
    carried = old.to_json()
    new_registry = CollectorRegistry()
    new = FleetChecks(new_registry)
    new.check_observed("a", 3.0)
    new.restore(carried, {"a", "b"})  # "gone" left the fleets file before the exec
    counts = families(new_registry)["fleet_ingress_fleet_check_duration_seconds_count"]
    assert counts == {(("fleet", "a"),): 3.0}
    buckets = families(new_registry)["fleet_ingress_fleet_check_duration_seconds_bucket"]
    assert buckets[(("fleet", "a"), ("le", "0.005"))] == 1.0
    assert buckets[(("fleet", "a"), ("le", "0.5"))] == 2.0


def test_probe_durations_of_another_shape_are_left_out_not_raised():
    from prometheus_client import CollectorRegistry

    from fleet_ingress.ops.metrics import FleetChecks

    bounds = list(FleetChecks.BUCKETS)
    ten = [1] * (len(bounds) + 1)
    for data in [
        None,
        [],
        {"buckets": [1, 2], "fleets": {"a": [ten, 1.0]}},  # another release's bounds
        {"buckets": bounds, "fleets": [["a", ten]]},
        {"buckets": bounds, "fleets": {"a": {"counts": ten}}},
        {"buckets": bounds, "fleets": {"a": [ten[:-1], 1.0]}},
        {"buckets": bounds, "fleets": {"a": [[-1, *ten[1:]], 1.0]}},
        {"buckets": bounds, "fleets": {"a": [ten, float("nan")]}},
        {"buckets": bounds, "fleets": {"a": [ten, "x"]}},
    ]:
        checks = FleetChecks(CollectorRegistry())
        checks.restore(data, {"a"})
        assert checks.to_json()["fleets"] == {}, data


def test_a_huge_free_count_is_shown_capped_in_stat_and_the_page_and_whole_in_stats_json():
    """A fleet reporting fleet_available 10**30 stretched stat's free column to
    61 characters and broke the table (the audit of session 15)."""
    slots = HostSlots(balancer(), queue_timeout=1, max_queue=1)
    a, b = slots.balancer.fleets
    for f in (a, b):
        f.health = Health.UP
    a.reported_available, a.opened_at_probe = 10**30, a.opened_total
    b.reported_available, b.opened_at_probe = 7, b.opened_total
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    lines = format_stat_table(snap).splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["a"][4] == "99999+/99999+" and rows["b"][4] == "7/7"
    assert max(len(line) for line in lines[:3]) < 120
    page = render_stats_page(snap)
    a_row = page[page.index("<b>a</b>") :].split("</tr>")[0]
    assert "<td>99999+</td>" in a_row and str(10**30) not in page
    assert next(f for f in snap["fleets"] if f["name"] == "a")["reported_available"] == 10**30


def test_which_code_each_worker_and_the_supervisor_run_is_shown():
    """Every release said version 0.1.0: after an upgrade or a rollback no view
    told which code ran (the cross-version audit of session 16). Each worker
    says its code's digest in its reports; a worker of a release before that
    says nothing, shown as "-"."""
    from fleet_ingress.release import code_digest

    *_, new = a_worker(1, pid=202, generation=2)
    *_, old = a_worker(1, pid=101, generation=1, draining=True)
    old_wire = old.to_wire()
    del old_wire["code"]  # a release before the digest
    slots, view = host_with(WorkerReport.from_wire(old_wire), new)
    snap = host_snapshot(slots, view, started_at=0.0)
    assert snap["code"] == code_digest() and len(code_digest()) == 12
    assert {w["pid"]: w["code"] for w in snap["workers"]} == {101: None, 202: code_digest()}
    table = format_stat_table(snap)
    header = next(line for line in table.splitlines() if line.startswith("worker"))
    assert header.split()[-1] == "code"
    rows = {line.split()[0]: line.split() for line in table.splitlines()}
    assert rows["202"][-1] == code_digest() and rows["101"][-1] == "-"
    page = render_stats_page(snap)
    assert f'<td class="l">{code_digest()}</td></tr>' in page and page.count("<th") >= 8
    build = families(HostMetrics(slots, view).prometheus)["fleet_ingress_build_info"]
    assert list(build) == [(("code", code_digest()), ("version", "0.1.0"))]


def test_stat_and_the_page_count_the_fleets_by_state_in_one_line():
    """At 300 fleets the table alone did not say how many were DOWN (the scale
    audit of session 16)."""
    text = "".join(f"https://f{i}.test name=f{i}\n" for i in range(6))
    slots = HostSlots(
        Balancer(FleetSet.from_specs(parse_fleets_text(text, default_maxconn=16))),
        queue_timeout=1,
        max_queue=1,
    )
    f = slots.balancer.fleets
    for fleet in f[:4]:
        fleet.health, fleet.reported_available = Health.UP, 9
    f[1].reported_available = 0  # FULL
    f[2].set_admin(Admin.DRAIN)
    f[3].set_admin(Admin.MAINT)
    f[4].health, f[5].health = Health.DOWN, Health.INIT
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    line = "fleets: 6 (2 UP, 1 FULL, 1 DOWN, 1 INIT, 1 not probed (MAINT)); 1 drained"
    assert line in format_stat_table(snap).splitlines()
    assert line in render_stats_page(snap)


def test_ages_do_not_move_when_the_wall_clock_steps(monkeypatch):
    """uptime_s and a fleet's last_check_age_s were wall-clock differences:
    after NTP stepped the clock back an hour, uptime was -3567 s for the rest of
    the process's life, and a MAINT fleet (never probed again) kept a wrong age
    (the clock audit of session 19)."""
    import time

    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    fleet = slots.balancer.fleets[0]
    fleet.last_probe_at, fleet.last_probe_monotonic = time.time() - 2, time.monotonic() - 2
    started = time.monotonic() - 30
    before = host_snapshot(slots, HostView(), started_at=started)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)  # stepped back an hour
    after = host_snapshot(slots, HostView(), started_at=started)
    assert 30 <= before["uptime_s"] <= after["uptime_s"] < 35
    ages = [s["fleets"][0]["last_check_age_s"] for s in (before, after)]
    assert 2 <= ages[0] <= ages[1] < 7


def test_an_admin_state_the_fleets_file_lacks_is_marked_until_it_is_written():
    """`admin_saved`: the running admin state against the fleet as its file has
    it (`spec`). `stat` of a running ingress older than the key (the CLI
    upgraded first) marks nothing."""
    fleets = balancer()
    a, b = fleets.fleets
    fleets.members.set_admin(a, Admin.MAINT)  # applied; its write failed
    snap = snapshot(fleets, Registry(), _no_queue(), started_at=0.0)
    assert [f["admin_saved"] for f in snap["fleets"]] == [False, True]
    table = format_stat_table(snap)
    assert "MAINT!" in table and "! = admin state not saved" in table
    assert render_stats_page(snap).count("not saved</span>") == 1
    a.spec = replace(a.spec, admin=Admin.MAINT)  # a later write saved it
    assert not a.admin_unsaved and not b.admin_unsaved
    for row in snap["fleets"]:
        del row["admin_saved"]
    assert "!" not in format_stat_table(snap) and "not saved" not in render_stats_page(snap)


def test_the_age_of_a_fleets_last_probe_is_counted_here_not_across_two_clocks():
    """The dashboard drew time() - last_check_timestamp_seconds: Prometheus's clock
    against this host's, so a skew of minutes showed every fleet unprobed for
    minutes (or a negative age). The age is now the host's own monotonic count."""
    fleets = balancer()
    a, _never_probed = fleets.fleets
    a.last_probe_monotonic = time.monotonic() - 7.0
    a.last_probe_at = time.time() - 600.0  # this host's wall clock stepped since
    metrics = IngressMetrics(fleets, Registry(), _no_queue())
    ages = {
        s.labels["fleet"]: s.value
        for family in text_string_to_metric_families(generate_latest(metrics.prometheus).decode())
        for s in family.samples
        if s.name == "fleet_ingress_fleet_last_check_age_seconds"
    }
    assert set(ages) == {"a"}  # b: never probed, no age
    assert 7.0 <= ages["a"] < 9.0


@pytest.mark.parametrize(
    ("ends_in", "seconds", "state"),
    [
        (250.4, 250, "draining, calls closed in 4m10s"),
        (7260.0, 7260, "draining, calls closed in 2h01m"),
        (9.6, 10, "draining, calls closed in 10s"),
        (-3.0, 0, "draining, calls closed in 0s"),  # past: closing now
        (None, None, "draining, until its calls end"),  # upgrade_drain = 0
    ],
)
def test_a_draining_workers_row_says_when_its_calls_are_closed(ends_in, seconds, state):
    row = {"state": "draining", "drain_ends_in_s": None}
    with_drain_end(row, ends_in)
    assert (row["drain_ends_in_s"], row["state"]) == (seconds, state)


def test_a_report_with_keys_of_another_shape_leaves_every_stats_page_and_an_exec_working():
    """A worker's report is read as any strings; the pages unpack each key.
    One counter key with a label more or less (a worker's bug, or a release
    with other labels draining beside this one) made /stats.json, /metrics,
    /stats and `stat` a 500 for good (kept in the retired counts once its
    worker left), and the next upgrade's image exit at its first metric: no
    supervisor, every call cut (the channel audit of session 24). Such keys
    are left out of what is shown; a start time no page can show is refused."""
    *_, good = a_worker(3, pid=101, generation=1)
    wire = good.to_wire()
    wire["counts"]["counters"] += [
        ["requests", "/ws/", "101", "x", 3],
        ["fleet_responses", "a", 5],
        ["calls_ended", "a", "carrier_closed", "extra", 1],
        ["requests", 7],
    ]
    odd = WorkerReport.from_wire({**wire, "pid": 202, "generation": 1, "seq": 1})
    slots, view = host_with(good, odd)
    view.leave((202, 1))  # into the retired counts, for good

    def shown(view: HostView) -> None:
        snap = host_snapshot(slots, view, started_at=0.0)
        assert snap["frontend"]["requests"]["/ws/"]["101"] == 2 * 3  # the good keys, both
        format_stat_table(snap)
        render_stats_page(snap)
        exposition = families(HostMetrics(slots, view).prometheus)
        codes = exposition["fleet_ingress_requests_total"]
        assert codes[(("code", "101"), ("route", "/ws/"))] == 2 * 3

    shown(view)
    # Over an upgrade's exec: the new image reads the view and builds its metrics.
    shown(HostView.from_json(json.loads(json.dumps(view.to_json(1.0))), 1.0))
    for started in (1e300, float("nan"), -1.0):
        with pytest.raises(ReportError, match="started"):
            WorkerReport.from_wire({**wire, "started": started})


def test_the_supervisors_task_failures_are_a_counter_by_task():
    *_, r1 = a_worker(1, pid=101, generation=1)
    slots, view = host_with(r1)
    failures = {"reloader": 2, "watchdog pings": 0}
    host = families(HostMetrics(slots, view, task_failures=lambda: failures).prometheus)
    assert host["fleet_ingress_supervisor_task_failures_total"] == {
        (("task", "reloader"),): 2.0,
        (("task", "watchdog pings"),): 0.0,
    }


def test_the_stats_page_says_each_certificate_state_stat_says():
    """The certificate file refused, the certificate served refused by carriers,
    and a chain served that carriers may fail to verify: the page has each
    line stat has (escaped), under its own id, and none while the state is off."""
    slots, view = host_with()
    snap = host_snapshot(slots, view, started_at=0.0)
    quiet = render_stats_page(snap)
    states = {
        "certificate_file": {"not_after": None, "not_served": False, "refused": "tls.cert <x>"},
        "certificate_served_refused": "expired on 2026-01-01 00:00:00 UTC",
        "certificate_served_chain": "tls.cert holds the server's certificate alone",
    }
    page = render_stats_page({**snap, **states})
    for element, said in (
        ("certificate-refused", "CERTIFICATE ON DISK REFUSED: tls.cert &lt;x&gt;"),
        ("certificate-served", "CERTIFICATE SERVED IS REFUSED BY CARRIERS: it expired on"),
        ("certificate-chain", "CARRIERS MAY FAIL TO VERIFY THE CERTIFICATE SERVED: tls.cert holds"),
    ):
        assert f'id="{element}">{said}' in page, element
        assert f'id="{element}"' not in quiet


def test_no_fleet_at_all_is_said_with_what_to_do_in_stat_and_the_page():
    """A start with a fleets file listing none serves (its :80 renews the
    certificate) and answers every call 503: the journal said so once at
    start, stat and the page only "fleets: 0" (the CLI audit of session 32)."""
    slots = HostSlots(Balancer(FleetSet.from_specs([])), queue_timeout=3, max_queue=8)
    slots.join("k", pid=55, generation=1)
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    line = "fleets: 0: every call gets 503 until `fleet-ingress add-fleet URL` adds one"
    assert line in format_stat_table(snap)
    assert line in render_stats_page(snap)


@pytest.mark.parametrize(
    ("cause", "fix", "wrong"),
    [
        (None, "fix the install or put back the release running, then", "not at fault"),
        ("files", "the installed code is not at fault: fix what it names, then", "fix the install"),
        ("service", "the installed code is not at fault: do what it says, then", "fix the install"),
        ("release", "or restart the service in a quiet hour", "fix the install"),
    ],
)
def test_a_failed_upgrade_s_line_names_the_fix_its_cause_takes(
    cause: str | None, fix: str, wrong: str
) -> None:
    """Only a broken install is fixed by fixing the install. A release that
    cannot take over by `upgrade` (its state format) said "fix the install or put
    back the release running, then `fleet-ingress upgrade`", refused again the
    same way, where its error said to restart; an upgrade abandoned for the
    workers' state (a start not settled) sent a sound release to be rolled back
    (the review of session 32)."""
    status = {"state": "failed", "source": "SIGUSR2", "finished": 0.0, "error": "it failed"}
    if cause is not None:
        status["cause"] = cause
    snap = {"generation": 2, "upgrade": status, "upgrade_last_finished": status}
    line = upgrade_failed(snap)
    assert line is not None and line.startswith("LAST UPGRADE FAILED at "), line
    assert fix in line and wrong not in line, line
    assert ("then `fleet-ingress upgrade` (this line stays" in line) is (cause != "release")


def test_an_unresponsive_worker_is_not_counted_serving_and_is_named():
    """A worker that answers no report request runs but takes no call: the line
    names it and when it is killed, rather than "a replacement is being
    started" (none is, until it is killed); a worker also missing still says so."""
    slots = HostSlots(balancer(), queue_timeout=3, max_queue=8)
    snap = host_snapshot(slots, HostView(), started_at=0.0)
    snap.update(
        workers_wanted=2,
        workers_serving=1,
        workers_dying_at_start=0,
        workers_unresponsive=[77],
        worker_hang_timeout=60.0,
    )
    for shown in (format_stat_table(snap), render_stats_page(snap)):
        assert (
            "WORKERS MISSING: 1 of 2 serving; 1 running but unresponsive (pid 77): answering "
            "no report request, its calls likely frozen; killed and replaced once silent 60s "
            "(process.worker_hang_timeout)"
        ) in shown
        assert "a replacement is being started" not in shown
    snap["worker_hang_timeout"] = 0.0
    assert "never killed (process.worker_hang_timeout = 0)" in format_stat_table(snap)
    snap["workers_wanted"] = 3  # one unresponsive, one gone
    assert "; a replacement is being started" in format_stat_table(snap)


def test_calls_ended_by_why_are_in_stat_and_the_page_where_the_fleets_totals_are():
    """/stats.json and /metrics alone said why calls ended (removed, admin,
    error, refused...): `stat` and /stats now say it beside each fleet's
    total, the hang-ups left out there (most calls end so), and every reason
    for the host on a line of its own (the queue audit of session 37)."""
    fleets = balancer().fleets
    registry = Registry()
    registry.ended[("a", "carrier closed")] += 40
    registry.ended[("a", "fleet closed")] += 2
    registry.ended[("a", "removed")] += 3
    registry.ended[("a", "error")] += 1
    registry.ended[("a", "carrier_silent")] += 1
    registry.ended[("b", "carrier closed")] += 7
    registry.ended[("", "refused")] += 4  # no fleet answered (503 from the queue)
    snap = snapshot(Balancer(FleetSet(fleets)), registry, _no_queue(), started_at=0.0)
    table = format_stat_table(snap)
    header, *lines = table.splitlines()
    assert header.split()[5:7] == ["total", "ended"]
    rows = {line.split()[0]: line.split() for line in lines[:2]}
    assert rows["a"][6] == "removed:3,carrier_silent:1,error:1", table
    assert rows["b"][6] == "-", table
    assert (
        "calls ended: carrier closed 47, refused 4, removed 3, fleet closed 2, "
        "carrier_silent 1, error 1"
    ) in lines, table
    page = render_stats_page(snap)
    a_row = page[page.index("<b>a</b>") :].split("</tr>")[0]
    assert '<td class="l">removed:3, carrier_silent:1, error:1</td>' in a_row, a_row
    b_row = page[page.index("<b>b</b>") :].split("</tr>")[0]
    assert '<td class="l">-</td>' in b_row
    assert (
        '<td class="l">calls ended</td><td class="l">carrier closed 47, refused 4, removed 3, '
        "fleet closed 2, carrier_silent 1, error 1</td>"
    ) in page


def test_a_worker_out_of_descriptors_still_reports_its_cpu_and_memory():
    """A worker's report (every second while it holds calls) reads /proc/self/stat
    on the descriptor opened at its first read, not a new one each time (nine
    system calls, and /proc/stat's nine more for a boot time no report used):
    out of descriptors (EMFILE), when the counts matter most, its process
    figures still go (before: none). In a child, whose limit is its own."""
    out = python_child(
        """
        import os, resource
        from fleet_ingress.net.calls import Registry
        from fleet_ingress.ops.host_stats import WorkerReporter
        reporter = WorkerReporter(Registry(), lambda: [], {})
        first = reporter()["process"]
        used = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own, closed
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (used, hard))
        try:
            os.close(os.open("/dev/null", os.O_RDONLY))
            print("a descriptor could still be opened")
        except OSError:
            later = reporter()["process"]
            print(bool(later) and later["cpu_seconds"] >= first["cpu_seconds"]
                  and later["resident_bytes"] > 0)
        """
    )
    assert out == "True"


def test_a_forked_child_reports_its_own_process_figures():
    """The descriptor a parent opened names the parent: a child forked after
    its first report reads its own /proc/self/stat."""
    out = python_child(
        """
        import os
        from fleet_ingress.ops import host_stats
        host_stats._process_figures()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            mine = host_stats._OwnStat.read().split()[0].decode()
            os.write(w, f"{mine == str(os.getpid())}".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 20).decode())
        """
    )
    assert out == "True"


def test_a_workers_histograms_are_read_from_their_buckets_as_collect_gives_them() -> None:
    """`histo_of` reads each histogram's bucket values, not its `collect()`
    samples (1.3 M instructions a report for four histograms, sent every
    second while calls are live: session 39), and gives what `collect()`
    gives: every bound, each cumulative count, the sum, for values on a
    bound, between, past the last bound and none."""
    from prometheus_client import CollectorRegistry, Histogram

    from fleet_ingress.ops import local_counts as local_counts_module
    from fleet_ingress.ops.metrics import HISTOGRAMS, _histogram

    class NoSamples(Histogram):
        def collect(self):  # type: ignore[override]
            raise AssertionError("read through collect()")

    for key, (_doc, buckets) in HISTOGRAMS.items():
        registry = CollectorRegistry()
        histogram = _histogram(key, registry)
        quick = NoSamples(f"quick_{key[0]}", "", buckets=buckets, registry=registry)
        for h in (histogram, quick):
            assert local_counts_module.histo_of(h).count == 0
        for value in (0.0, buckets[0], buckets[0] * 1.5, buckets[-1], buckets[-1] * 10, 0.3):
            histogram.observe(value)
            quick.observe(value)
            read = local_counts_module.histo_of(quick)
            # What collect() gives, read as before (the fallback's path).
            collected = local_counts_module.histo_of(_Sampled(histogram))
            assert read == collected and read.count > 0
            assert read.bounds == tuple(float(b) for b in buckets)


class _Sampled:
    """A histogram seen only through `collect()` (as another client release's)."""

    def __init__(self, histogram) -> None:
        self.collect = histogram.collect


def test_slots_reserved_for_standing_budgets_are_shown_per_fleet_and_per_worker():
    """A fleet at maxconn showed fewer calls than maxconn while workers held
    standing budgets on it, and nothing said why (docs/WORKERS.md "Standing
    budgets", session 43): its reserved slots are in /stats.json, `stat`,
    /stats and /metrics, the fleet's the workers' summed."""
    *_, r1 = a_worker(1, pid=101, generation=1)
    *_, r2 = a_worker(1, pid=202, generation=1)
    slots, view = host_with(r1, r2)
    slots.give_standing(0, {"a": 5, "b": 2})
    slots.give_standing(1, {"a": 3})
    slots.grant_standing(0, 1, "a")  # a call granted from worker 101's budget
    slots.acquire(1, 7, [], now=0.0)  # and one asked of the supervisor

    snap = host_snapshot(slots, view, started_at=0.0)
    fleets = {f["name"]: f for f in snap["fleets"]}
    assert {n: (f["reserved"], f["maxconn"]) for n, f in fleets.items()} == {
        "a": (5 + 3 - 1, 16),
        "b": (2, 16),
    }
    # Reserved slots are no calls: a's call from the budget and the one asked.
    assert fleets["a"]["active"] >= 1 and fleets["a"]["active"] + fleets["b"]["active"] == 2
    workers = {w["pid"]: (w["reserved"], w["reserved_by_fleet"]) for w in snap["workers"]}
    assert workers == {101: (6, {"a": 4, "b": 2}), 202: (3, {"a": 3})}
    json.dumps(snap)

    table = format_stat_table(snap)
    assert "reserved: a 7, b 2" in table.splitlines()
    assert any(line.startswith("reserved = ") for line in table.splitlines())
    header = next(line for line in table.splitlines() if line.startswith("worker "))
    assert header.split()[:6] == ["worker", "gen", "calls", "conns", "closing", "reserved"]
    row = next(line for line in table.splitlines() if line.startswith("101 "))
    assert row.split()[2:6] == ["1", "0", "0", "6"]  # calls, conns, closing, reserved

    page = render_stats_page(snap)
    assert "+7 reserved</span></td>" in page and "+2 reserved</span></td>" in page
    assert "<th" in page and ">reserved</th>" in page
    assert '<td class="l">101</td><td>1</td><td>1</td><td>0</td><td>0</td><td>6</td>' in page

    m = families(HostMetrics(slots, view).prometheus)
    assert m["fleet_ingress_fleet_reserved_slots"] == {
        (("fleet", "a"),): 7.0,
        (("fleet", "b"),): 2.0,
    }
    assert m["fleet_ingress_worker_reserved_slots"] == {
        (("fleet", "a"), ("generation", "1"), ("pid", "101")): 4.0,
        (("fleet", "b"), ("generation", "1"), ("pid", "101")): 2.0,
        (("fleet", "a"), ("generation", "1"), ("pid", "202")): 3.0,
    }

    # Taken back ("budget-dropped"): nothing reserved, nothing said.
    slots.drop_standing(0)
    slots.drop_standing(1)
    snap = host_snapshot(slots, view, started_at=0.0)
    assert [f["reserved"] for f in snap["fleets"]] == [0, 0]
    assert [w["reserved"] for w in snap["workers"]] == [0, 0]
    assert "reserved:" not in format_stat_table(snap)
    assert " reserved</span>" not in render_stats_page(snap)


def test_grants_past_a_cut_lone_budget_are_a_host_counter():
    """A lone worker's grants told after its budget's unused slots were taken
    back (`HostSlots.grants_past_cut_total`) reach Prometheus: an operator sees
    that a fleet's maxconn was passed, without reading the logs."""
    *_, report = a_worker(1, pid=101, generation=1)
    slots, view = host_with(report)
    metrics = HostMetrics(slots, view, reloads=lambda: {}, calls_lost=lambda: 0)
    name = "fleet_ingress_slots_granted_past_cut_total"
    assert families(metrics.prometheus)[name] == {(): 0.0}
    slots.grants_past_cut_total = 2
    assert families(metrics.prometheus)[name] == {(): 2.0}
