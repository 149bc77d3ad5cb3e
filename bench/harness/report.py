"""From the results of a run to figures: summary over rounds, ratios, JSON, Markdown, PNG."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from . import load_side
from .targets import base, builtin_variant, label

# (key, header, digits) of the steady table, read from each target's result.
STEADY_COLUMNS = [
    ("cpu_s_per_1000_msgs", "CPU s / 1000 msgs", 5),
    ("proxy_cores", "proxy cores", 3),
    ("rss_kib_per_call", "RSS KiB / call", 1),
    ("rss_kib_per_call_end_of_window", "RSS KiB / call at the window's end", 1),
    ("sleeps_per_msg", "wakes / msg", 2),
    ("handshake_ms_p50", "handshake p50 ms", 2),
    ("handshake_ms_p99", "handshake p99 ms", 2),
    ("rtt_ms_p50", "RTT p50 ms", 2),
    ("rtt_ms_p99", "RTT p99 ms", 2),
    ("added_rtt_ms_p50", "added p50 ms", 2),
    ("added_rtt_ms_p99", "added p99 ms", 2),
    ("failed", "failed calls", 0),
    ("lost_frames", "lost frames", 0),
    ("corrupt_frames", "corrupt", 0),
]
IDLE_COLUMNS = [
    ("rss_kib_per_call", "RSS KiB / call", 1),
    ("rss_kib_per_call_end_of_hold", "RSS KiB / call at the hold's end", 1),
    ("established_at_sample", "calls held", 0),
    ("rss_kib_baseline", "RSS baseline KiB", 0),
    ("rss_kib_with_calls", "RSS with calls KiB", 0),
    ("idle_cpu_ms_per_call_minute", "idle CPU ms / call / min", 2),
    ("handshake_ms_p50", "handshake p50 ms", 2),
    ("handshake_ms_p99", "handshake p99 ms", 2),
    ("failed", "failed calls", 0),
    ("lost_frames", "lost frames", 0),
]
CHURN_COLUMNS = [
    ("cpu_ms_per_call", "CPU ms / call", 3),
    ("proxy_cores", "proxy cores", 3),
    ("handshake_ms_p50", "handshake p50 ms", 2),
    ("handshake_ms_p99", "handshake p99 ms", 2),
    ("added_handshake_ms_p50", "added handshake p50 ms", 2),
    ("added_handshake_ms_p99", "added handshake p99 ms", 2),
    ("rtt_ms_p99", "RTT p99 ms", 2),
    ("failed", "failed calls", 0),
    ("lost_frames", "lost frames", 0),
]
LOAD_COLUMNS = [
    ("generator_cores", "generator cores"),
    ("generator_max_process_cores", "busiest generator process"),
    ("generator_processes", "generator processes"),
    ("fleets_cores", "fleets cores"),
    ("host_busy_cores", "host busy cores"),
    ("other_procs_cores", "other processes' cores"),
]
RATIO_KEYS = {
    "steady": ["cpu_s_per_1000_msgs", "rss_kib_per_call", "handshake_ms_p50", "rtt_ms_p99"],
    "idle": ["rss_kib_per_call"],
    "churn": ["cpu_ms_per_call", "handshake_ms_p50", "handshake_ms_p99"],
}
COLUMNS = {"steady": STEADY_COLUMNS, "idle": IDLE_COLUMNS, "churn": CHURN_COLUMNS}
# Columns added after runs were stored: shown (and summarized) only for runs that have them.
OPTIONAL_COLUMNS = frozenset(
    {"sleeps_per_msg", "rss_kib_per_call_end_of_window", "rss_kib_per_call_end_of_hold"}
)


def write_json(rep: dict[str, Any], path: Path) -> None:
    """The whole report, as every run writes it (``default=str``: paths and the like)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=2, default=str) + "\n")


def value(r: dict[str, Any], key: str) -> Any:
    if key in r:
        return r[key]
    return r.get("loads", {}).get(key)


def add_relative(rounds: list[dict[str, dict[str, Any]]]) -> None:
    """Per round: each proxy's added round trip (and handshake) over direct's."""
    for rnd in rounds:
        direct = rnd.get("direct")
        for r in rnd.values():
            for src, dst in (
                ("rtt_ms_p50", "added_rtt_ms_p50"),
                ("rtt_ms_p99", "added_rtt_ms_p99"),
                ("handshake_ms_p50", "added_handshake_ms_p50"),
                ("handshake_ms_p99", "added_handshake_ms_p99"),
            ):
                a, b = r.get(src), (direct or {}).get(src)
                r[dst] = None if a is None or b is None else round(a - b, 3)


def stats(values: list[Any]) -> dict[str, Any]:
    nums = [v for v in values if isinstance(v, int | float)]
    if not nums:
        return {"median": None, "min": None, "max": None, "values": values}
    return {
        "median": round(statistics.median(nums), 6),
        "min": min(nums),
        "max": max(nums),
        "spread_pct": round(100 * (max(nums) - min(nums)) / statistics.median(nums), 1)
        if statistics.median(nums)
        else None,
        "values": values,
    }


def summarize_rounds(scenario: str, rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    cols = [k for k, _, _ in COLUMNS.get(scenario, [])] + [k for k, _ in LOAD_COLUMNS]
    present = {k for rnd in rounds for result in rnd.values() for k in result}
    cols = [k for k in cols if k not in OPTIONAL_COLUMNS or k in present]
    targets = list(dict.fromkeys(t for rnd in rounds for t in rnd))
    summary = {
        t: {k: stats([value(rnd[t], k) for rnd in rounds if t in rnd]) for k in cols}
        for t in targets
    }
    ratios: dict[str, Any] = {}
    for num, den in ratio_pairs(targets):
        if num in targets and den in targets:
            per_key = {}
            for key in RATIO_KEYS.get(scenario, []):
                per_round = []
                for rnd in rounds:
                    a, b = value(rnd.get(num, {}), key), value(rnd.get(den, {}), key)
                    per_round.append(None if a is None or not b else round(a / b, 3))
                per_key[key] = stats(per_round)
            # Only between variants of one program: the load side's work is then
            # the same. Between programs it is not (HAProxy opens a connection to
            # a fleet for each health check, the ingress's poller keeps one).
            key = WORKERS_KEY.get(scenario, ("", ""))[0]
            if key in per_key and base(num) == base(den):
                per_key[CONTROLLED] = stats(
                    [controlled(rnd.get(num, {}), rnd.get(den, {}), key) for rnd in rounds]
                )
            # Between programs, by the generator alone (load_side); runs that recorded the
            # load side's CPU seconds unrounded only (stored runs summarize as written).
            if scenario == "steady" and (num, den) in load_side.program_pairs(targets):
                if any(recorded_load_side(rnd.get(num, {})) for rnd in rounds):
                    per_key[load_side.GEN_CONTROLLED] = stats(
                        [
                            load_side.gen_controlled(rnd.get(num, {}), rnd.get(den, {}))
                            for rnd in rounds
                        ]
                    )
            ratios[f"{num}/{den}"] = per_key
    by_process = cpu_by_process(rounds)
    memory = memory_split(rounds)
    return (
        {"summary": summary, "ratios": ratios}
        | ({"cpu_by_process": by_process} if by_process else {})
        | ({"memory_per_call": memory} if memory else {})
    )


def recorded_load_side(result: dict[str, Any]) -> bool:
    """Whether a result recorded the load side's CPU seconds unrounded (since session 46):
    the load side's section and the generator-controlled ratio are shown for those."""
    return "generator_cpu_s" in result.get("loads", {})


# The CPU ratio over the load side's (`controlled`).
CONTROLLED = "cpu_controlled"
# What one window's work is counted in, for the load side's CPU per unit of it.
WORK_DONE = ("msgs_window", "calls_started_window")


def controlled(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    """Target `a`'s CPU (`key`) over target `b`'s in one round, divided by the
    same ratio for the processes that do the same work in both windows: the
    generator's and the fleets' CPU per message (steady) or per call started
    (churn), their geometric mean. On a shared host the speed of a window
    (other VMs, CPU frequency, what else runs) moves every process's CPU per
    unit of work alike; what this ratio keeps is the proxy's own difference.
    (It also takes out the load side's own slowdown that the proxy's extra
    processes cause on a host with no spare core.) For variants of one program
    only (`summarize_rounds`). None when a figure is missing."""
    a_cpu, b_cpu = value(a, key), value(b, key)
    work = next((w for w in WORK_DONE if value(a, w) and value(b, w)), None)
    if not a_cpu or not b_cpu or work is None:
        return None
    sides = []
    for side in ("generator_cores", "fleets_cores"):
        a_side, b_side = value(a, side), value(b, side)
        if not a_side or not b_side:
            return None
        sides.append((a_side / value(a, work)) / (b_side / value(b, work)))
    return round((a_cpu / b_cpu) / (sides[0] * sides[1]) ** 0.5, 3)


def ratio_pairs(targets: list[str]) -> list[tuple[str, str]]:
    """Which targets to divide by which: fleet-ingress by HAProxy and by the bare splice;
    a variant by its plain target, or else by the first variant of the same program listed
    (ingress@w2 / ingress@w1, haproxy@nt2 / haproxy@nt1); a fleet-ingress variant by
    HAProxy, and ingress@wN by haproxy@ntN (N processes against N threads)."""
    pairs = [("ingress", "haproxy"), ("ingress", "bare"), ("ingress1p", "haproxy")]
    pairs += [(t, "ingress1p") for t in targets if base(t) == "ingress"]
    variants = [t for t in targets if "@" in t]
    pairs += [(t, base(t)) for t in variants if base(t) in targets]
    pairs += [(t, "haproxy") for t in variants if base(t) == "ingress"]
    for t in variants:
        first = next(u for u in targets if base(u) == base(t))
        if base(t) not in targets and first != t:
            pairs.append((t, first))
        built_in = builtin_variant(t)
        if base(t) == "ingress" and built_in is not None:
            pinned = "pin" if built_in.get("ingress_pinned") else ""
            pairs.append((t, f"haproxy@nt{built_in['ingress_workers']}{pinned}"))
    return [p for p in dict.fromkeys(pairs) if p[0] in targets and p[1] in targets]


LOAD_SIDE = ("generator_cores", "generator_max_process_cores", "fleets_cores", "harness_cores")


def cpu_by_process(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per target: the cores of each of its processes (or threads) and of the load side
    (generators, fleets, this harness) during the windows, over rounds. Results written
    before the split have none."""
    out: dict[str, dict[str, Any]] = {}
    targets = list(dict.fromkeys(t for rnd in rounds for t in rnd))
    for t in targets:
        loads = [rnd[t].get("loads", {}) for rnd in rounds if t in rnd]
        if not any("proxy_cores_by_process" in ld for ld in loads):
            continue
        parts = [ld.get("proxy_cores_by_process", {}) for ld in loads]
        roles = list(dict.fromkeys(r for p in parts for r in p))
        out[t] = {
            "proxy": {r: stats([p.get(r) for p in parts]) for r in roles},
            "load": {k: stats([ld.get(k) for ld in loads]) for k in LOAD_SIDE},
        }
    return out


# smaps_rollup's counters shown beside the mappings: what the tree holds (Pss) and of it
# what is anonymous (not backed by a file).
ROLLUP_SHOWN = ("Pss", "Anonymous")


def memory_split(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per target: RSS KiB a call by kind of mapping (``procfs.mapping_kind``), by process
    (supervisor, worker N) and smaps_rollup's counters, over rounds. Results written before
    the split (no ``rss_kib_per_call_by_process``) have none."""
    out: dict[str, dict[str, Any]] = {}
    targets = list(dict.fromkeys(t for rnd in rounds for t in rnd))
    for t in targets:
        results = [rnd[t] for rnd in rounds if t in rnd]
        if not any(r.get("rss_kib_per_call_by_process") for r in results):
            continue
        split: dict[str, Any] = {}
        for key, name in (
            ("rss_kib_per_call_by_mapping", "by_mapping"),
            ("rss_kib_per_call_by_process", "by_process"),
            ("smaps_rollup_kib_per_call", "smaps_rollup"),
        ):
            parts = [r.get(key) or {} for r in results]
            names = list(dict.fromkeys(n for p in parts for n in p))
            split[name] = {n: stats([p.get(n, 0.0) for p in parts]) for n in names}
        out[t] = split
    return out


def memory_table(by_target: dict[str, dict[str, Any]]) -> list[str]:
    """RSS KiB a call by kind of mapping and by process, one row a target (median over
    rounds; kinds that move less than 0.05 KiB a call in every target left out)."""
    if not by_target:
        return []
    kinds = list(
        dict.fromkeys(
            k
            for v in by_target.values()
            for k, st in v["by_mapping"].items()
            if st["median"] is not None and abs(st["median"]) >= 0.05
        )
    )
    lines = [
        "",
        "RSS KiB a call by kind of mapping (/proc/PID/smaps, summed over the target's "
        "processes), by process, and smaps_rollup's "
        + " and ".join(ROLLUP_SHOWN)
        + " (median over rounds):",
        "",
        "| target | " + " | ".join(kinds) + " | by process | " + " | ".join(ROLLUP_SHOWN) + " |",
        "|---|" + "---|" * (len(kinds) + 1 + len(ROLLUP_SHOWN)),
    ]
    for t, v in by_target.items():
        cells = [_cell(v["by_mapping"].get(k, {}), 1) for k in kinds]
        procs = ", ".join(f"{role} {_cell(st, 1)}" for role, st in v["by_process"].items())
        rollup = [_cell(v["smaps_rollup"].get(k, {}), 1) for k in ROLLUP_SHOWN]
        lines.append(f"| {label(t)} | " + " | ".join([*cells, procs or "-", *rollup]) + " |")
    return lines


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if digits else f"{v:.0f}"
    return str(v)


def _cell(st: dict[str, Any], digits: int) -> str:
    med = st.get("median")
    if med is None:
        return "-"
    text = _fmt(float(med), digits)
    if len([v for v in st["values"] if v is not None]) > 1 and st["min"] != st["max"]:
        text += f" ({_fmt(float(st['min']), digits)}-{_fmt(float(st['max']), digits)})"
    return text


def targets_check(scenario: str, report: dict[str, Any]) -> list[str]:
    """The issue's targets, judged on what was measured (never adjusted)."""
    out: list[str] = workers_check(scenario, report)
    if scenario not in ("steady", "idle"):
        return out
    summ, ratios = report["summary"], report["ratios"].get("ingress/haproxy", {})
    p = report["params"]
    if scenario == "steady" and "ingress" in summ:
        cpu = ratios.get("cpu_s_per_1000_msgs", {})
        ctl = ratios.get(load_side.GEN_CONTROLLED)
        if cpu.get("median") is not None and ctl is not None:
            # Runs since session 46: #13's point as it stands (<= 1.05x, the median of the
            # rounds), the generator-controlled reading beside it (never instead of it).
            rounds = len([v for v in cpu["values"] if v is not None])
            verdict = (
                ("MET" if cpu["median"] <= STEADY_WITHIN else "MISSED")
                if rounds >= STEADY_ROUNDS
                else f"NOT JUDGED ({rounds} rounds: #13 asks {STEADY_ROUNDS} or more)"
            )
            out.append(
                f"CPU per relayed message <= {STEADY_WITHIN}x HAProxy (nbthread "
                f"{p['haproxy_nbthread']}) at {p['calls']} calls {p['profile']}, median of "
                f"{rounds} rounds: ingress/HAProxy = {cpu['median']} (rounds "
                f"{cpu['values']}) -> {verdict}; controlled by the "
                f"generator: {ctl['median']} (rounds {ctl['values']})"
            )
        elif cpu.get("median") is not None:
            ok = cpu["max"] <= 1.3
            out.append(
                f"CPU per relayed message <= 1.3x HAProxy (nbthread {p['haproxy_nbthread']}) at "
                f"{p['calls']} calls {p['profile']}: ingress/HAProxy = {cpu['median']} "
                f"(rounds {cpu['values']}) -> {'MET' if ok else 'MISSED'}"
            )
        failed = summ["ingress"]["failed"]["values"]
        lost = summ["ingress"]["lost_frames"]["values"]
        ok = not any(failed) and not any(lost)
        out.append(
            f"zero lost frames and failed calls at {p['calls']} calls: failed {failed}, "
            f"lost {lost} -> {'MET' if ok else 'MISSED'}"
        )
    if "ingress" in summ:
        rss = summ["ingress"]["rss_kib_per_call"]
        if rss["median"] is not None:
            ok = rss["max"] <= 64
            hap = summ.get("haproxy", {}).get("rss_kib_per_call", {}).get("median")
            out.append(
                f"RSS <= 64 KiB per established call ({scenario}): fleet-ingress "
                f"{rss['median']} KiB (HAProxy {hap}) -> {'MET' if ok else 'MISSED'}"
            )
    return out


STEADY_WITHIN = 1.05  # issue #13: CPU per relayed message, median of >= 3 rounds
STEADY_ROUNDS = 3
WORKERS_KEY = {"steady": ("cpu_s_per_1000_msgs", "message"), "churn": ("cpu_ms_per_call", "call")}
WORKERS_WITHIN = 1.10  # issue #14: CPU per call and per message with 2 workers within 10 %


def workers_check(scenario: str, report: dict[str, Any]) -> list[str]:
    """CPU per message (steady) or per call (churn) of ingress@wN within 10 % of
    ingress@w1's, judged on the largest per-round ratio."""
    if scenario not in WORKERS_KEY:
        return []
    key, unit = WORKERS_KEY[scenario]
    out = []
    for name, per_key in report["ratios"].items():
        num, _, den = name.partition("/")
        built_in = builtin_variant(num)
        if den != "ingress@w1" or built_in is None or base(num) != "ingress":
            continue
        cpu = per_key.get(key, {})
        if cpu.get("median") is None:
            continue
        ok = cpu["max"] <= WORKERS_WITHIN
        steadied = per_key.get(CONTROLLED, {})
        out.append(
            f"CPU per {unit} with {built_in['ingress_workers']} workers"
            f"{' (pinned)' if built_in.get('ingress_pinned') else ''} within 10 % of 1 worker: "
            f"{name} = {cpu['median']} (rounds {cpu['values']}) -> {'MET' if ok else 'MISSED'}"
            + (
                f"; over the load side's CPU per {unit} in the same windows "
                f"({CONTROLLED}): {steadied['median']} (rounds {steadied['values']})"
                if steadied.get("median") is not None
                else ""
            )
        )
    return out


def ramp_check(report: dict[str, Any]) -> list[str]:
    """#13's ramp point, per round: fleet-ingress in budget at least as far as HAProxy,
    judged on each target's own limit (``bench.harness.ramp_steps``); NOT KNOWN when the
    limits found do not decide it (HAProxy never over, the ingress over above where HAProxy
    stopped: raise ``--ramp-max``)."""
    out = []
    targets = list(dict.fromkeys(t for rnd in report["rounds"] for t in rnd))
    for num, den in load_side.program_pairs(targets):
        verdicts = []
        for rnd in report["rounds"]:
            a, b = rnd.get(num), rnd.get(den)
            if a is None or b is None:
                continue
            verdicts.append(_ramp_verdict(a, b))
        if not verdicts:
            continue
        words = {v for v, _ in verdicts}
        overall = "MISSED" if "MISSED" in words else "NOT KNOWN" if "NOT KNOWN" in words else "MET"
        rounds = "; ".join(f"round {i}: {text}" for i, (_, text) in enumerate(verdicts, 1))
        out.append(
            f"ramp: {label(num)} in budget at least as far as {label(den)}: {rounds} -> {overall}"
        )
    return out


def _ramp_verdict(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str]:
    """(MET | MISSED | NOT KNOWN, what it rests on) for target ``a`` against ``b`` in a round."""

    def limit(r: dict[str, Any]) -> str:
        if r.get("limit") is None:
            return "none in budget" if r.get("first_over") is not None else "not judged"
        if r.get("first_over") is None:
            return f">= {r['limit']} (never over)"
        return f"{r['limit']} (step {r['resolution']})"

    text = f"{limit(a)} against {limit(b)}"
    if a.get("limit") is None and b.get("limit") is None:  # lower --ramp-start
        return "NOT KNOWN", text
    la, lb = a.get("limit") or 0, b.get("limit") or 0
    a_found, b_found = a.get("first_over") is not None, b.get("first_over") is not None
    if a_found and b_found:
        return ("MET" if la >= lb else "MISSED"), text
    if a_found:  # b never went over (the cap, the load side's limit, a stop): as far as b got
        return ("MISSED" if la < lb else "NOT KNOWN"), text
    if b_found:
        return ("MET" if la >= lb else "NOT KNOWN"), text
    return "NOT KNOWN", text


def round_order(report: dict[str, Any]) -> str:
    """How the rounds ordered the targets. Runs since session 46 rotate the order each
    round (``round_orders``): a target always first would ride the host's warm-up."""
    orders = report.get("round_orders")
    if not orders:
        return "targets interleaved each round"
    text = "; ".join(f"round {i}: {', '.join(order)}" for i, order in enumerate(orders, 1) if order)
    return f"targets interleaved, the order rotated each round ({text})"


def markdown(report: dict[str, Any]) -> str:
    sc = report["scenario"]
    p, m = report["params"], report["machine"]
    lines = [
        f"## {sc}: {report['title']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {m['nproc']} cores ({m['cpu_model']}), {m['mem_total_mib']} MiB, "
        f"kernel {m['kernel']}, Python {m['python']}, {m['haproxy']}, "
        f"{m['busy_cores_before_start']} cores busy before the start",
        f"- code: fleet_ingress {report['code'].get('git_head')} "
        f"(src sha256 {report['code'].get('src_sha256')}, "
        f"{report['code'].get('src_uncommitted_changes')} uncommitted files in src/)",
        f"- TLS both sides; profile {p['profile']}; rounds {p['repeat']} "
        f"({round_order(report)}); CPU pinning {'on' if p['pin'] else 'off'}",
        "",
    ]
    if sc in COLUMNS:
        cols = [
            c
            for c in COLUMNS[sc]
            if c[0] not in OPTIONAL_COLUMNS or any(c[0] in st for st in report["summary"].values())
        ]
        lines.append(
            "cells: median over rounds (min-max when rounds differ); added = target - direct "
            "in the same round"
        )
        lines.append("")
        lines.append("| target | " + " | ".join(h for _, h, _ in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for t, st in report["summary"].items():
            cells = [_cell(st.get(k, {}), d) for k, _, d in cols]
            lines.append(f"| {label(t)} | " + " | ".join(cells) + " |")
        lines.append("")
        for name, per_key in report["ratios"].items():
            parts = [
                f"{k} {v['median']} (rounds {v['values']})"
                for k, v in per_key.items()
                if v.get("median") is not None
            ]
            if parts:
                lines.append(f"- ratio {name}: " + "; ".join(parts))
        if sc == "steady" and any(
            recorded_load_side(r) for rnd in report["rounds"] for r in rnd.values()
        ):
            lines += load_side.lines(report["rounds"])
        lines += ["", "Load during the measurement windows (cores, median over rounds):", ""]
        lines.append("| target | " + " | ".join(h for _, h in LOAD_COLUMNS) + " |")
        lines.append("|---|" + "---|" * len(LOAD_COLUMNS))
        for t, st in report["summary"].items():
            cells = [_cell(st.get(k, {}), 3) for k, _ in LOAD_COLUMNS]
            lines.append(f"| {label(t)} | " + " | ".join(cells) + " |")
        lines += by_process_table(report.get("cpu_by_process", {}))
        lines += memory_table(report.get("memory_per_call", {}))
    if sc == "ramp":
        budget = p.get("budget_ms")
        lines.append(
            f"Added p99 budget: {budget} ms "
            f"({'one frame interval' if budget == p.get('frame_interval_ms') else '--budget-ms'}"
            "); added = target p99 - direct "
            "p99 at the same number of calls."
            + (
                f" Levels by {p['ramp_step']} from {p['ramp_start']} to at most {p['ramp_max']} "
                f"calls; after a target's first level over, back to its last level in budget "
                f"and up by {p['ramp_fine']} to the edge (direct's p99 interpolated between "
                "its levels; direct ends where its own p99 passes the budget: past that no "
                f"target is judged). {load_side.RULE}."
                if "ramp_fine" in p
                else ""
            )
        )
        lines.append("")
        for rnd_i, rnd in enumerate(report["rounds"], 1):
            direct = {lv["calls"]: lv for lv in rnd.get("direct", {}).get("levels", [])}
            if any("added_p99_ms" in lv for r in rnd.values() for lv in r["levels"]):
                lines += ramp_round(rnd_i, rnd)
                continue
            for t, r in rnd.items():
                lines.append(f"### round {rnd_i}: {label(t)} (stopped: {r['stop_reason']})")
                lines.append("")
                lines.append(
                    "| calls | RTT p50 ms | RTT p99 ms | added p99 ms | proxy cores | "
                    "CPU s / 1000 msgs | RSS KiB / call | generator cores | fleets cores | "
                    "host busy |"
                )
                lines.append("|---|---|---|---|---|---|---|---|---|---|")
                for lv in r["levels"]:
                    d = direct.get(lv["calls"], {})
                    added = (
                        round(lv["rtt_ms_p99"] - d["rtt_ms_p99"], 2)
                        if lv.get("rtt_ms_p99") is not None and d.get("rtt_ms_p99") is not None
                        else None
                    )
                    ld = lv["loads"]
                    lines.append(
                        f"| {lv['calls']} | {_fmt(lv['rtt_ms_p50'], 2)} | "
                        f"{_fmt(lv['rtt_ms_p99'], 2)} | {_fmt(added, 2)} | "
                        f"{_fmt(ld['proxy_cores'], 3)} | {_fmt(lv['cpu_s_per_1000_msgs'], 5)} | "
                        f"{_fmt(lv['rss_kib_per_call'], 1)} | {_fmt(ld['generator_cores'], 3)} | "
                        f"{_fmt(ld['fleets_cores'], 3)} | {_fmt(ld['host_busy_cores'], 2)} |"
                    )
                lines.append("")
        for t, s in report.get("ramp_summary", {}).items():
            lines.append(f"- {label(t)}: {s}")
    lines.append("")
    for line in report.get("targets_check", []):
        lines.append(f"- target: {line}")
    if report.get("warnings"):
        lines += ["", "Warnings:", ""]
        lines += [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def ramp_round(rnd_i: int, rnd: dict[str, Any]) -> list[str]:
    """A round of a ramp run since session 46: each target's levels in the order measured
    (a level dropped back from and climbed again by the fine step shows twice), added p99
    over direct's (interpolated between direct's levels), the load side's CPU a message,
    then fleet-ingress's CPU a message over HAProxy's at the levels both measured."""
    lines = []
    for t, r in rnd.items():
        lines += [
            f"### round {rnd_i}: {label(t)} (stopped: {r['stop_reason']})",
            "",
            "| calls | RTT p50 ms | RTT p99 ms | direct p99 ms | added p99 ms | over | "
            "proxy cores | CPU s / 1000 msgs | RSS KiB / call | generator µs / msg | "
            "fleets µs / msg | host busy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for lv in r["levels"]:
            ld = lv["loads"]
            lines.append(
                f"| {lv['calls']} | {_fmt(lv['rtt_ms_p50'], 2)} | {_fmt(lv['rtt_ms_p99'], 2)} | "
                f"{_fmt(lv.get('direct_p99_ms'), 2)} | {_fmt(lv.get('added_p99_ms'), 2)} | "
                f"{'over' if lv.get('over_budget') else ''} | {_fmt(ld['proxy_cores'], 3)} | "
                f"{_fmt(lv['cpu_s_per_1000_msgs'], 5)} | {_fmt(lv['rss_kib_per_call'], 1)} | "
                f"{_fmt(lv.get('generator_us_per_msg'), 2)} | "
                f"{_fmt(lv.get('fleets_us_per_msg'), 2)} | {_fmt(ld['host_busy_cores'], 2)} |"
            )
        lines.append("")
    for num, den in load_side.program_pairs(list(rnd)):
        a = {lv["calls"]: lv for lv in rnd[num]["levels"] if not lv.get("over_budget")}
        b = {lv["calls"]: lv for lv in rnd[den]["levels"] if not lv.get("over_budget")}
        cells = []
        for n in sorted(set(a) & set(b)):
            ka, kb = a[n]["cpu_s_per_1000_msgs"], b[n]["cpu_s_per_1000_msgs"]
            raw = round(ka / kb, 3) if ka and kb else None
            ctl = load_side.gen_controlled(a[n], b[n], work="msgs")
            cells.append(f"{n}: {_fmt(raw, 3)} / {_fmt(ctl, 3)}")
        if cells:
            lines += [
                f"- round {rnd_i}, {num}/{den} CPU a message at the same calls in budget, raw / "
                f"controlled by the generator: " + "; ".join(cells),
                "",
            ]
    return lines


def by_process_table(by_target: dict[str, dict[str, Any]]) -> list[str]:
    """The proxy's cores by process (fleet-ingress's supervisor and workers) or by thread
    (HAProxy nbthread > 1), beside the load side's own; only when some target has more
    than one part."""
    rows = {t: v for t, v in by_target.items() if v["proxy"]}
    if not any(len(v["proxy"]) > 1 for v in rows.values()):
        return []
    lines = [
        "",
        "CPU by process during the windows (cores, median over rounds): the proxy's parts, "
        "then the load generators (all, busiest process), the fleets and this harness:",
        "",
        "| target | proxy by part | generators | busiest generator | fleets | bench harness |",
        "|---|---|---|---|---|---|",
    ]
    for t, v in rows.items():
        parts = ", ".join(f"{role} {_cell(st, 3)}" for role, st in v["proxy"].items())
        load = [_cell(v["load"][k], 3) for k in LOAD_SIDE]
        lines.append(f"| {label(t)} | {parts} | " + " | ".join(load) + " |")
    return lines


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Latency and proxy CPU against concurrent calls, one series per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sc = report["scenario"]
    series: dict[str, dict[str, list[float]]] = {}

    def add(t: str, x: float, lat: Any, cpu: Any, cpu_per: Any) -> None:
        s = series.setdefault(t, {"x": [], "lat": [], "cpu": [], "cpu_per": []})
        s["x"].append(x)
        s["lat"].append(float("nan") if lat is None else lat)
        s["cpu"].append(float("nan") if cpu is None else cpu)
        s["cpu_per"].append(float("nan") if cpu_per is None else cpu_per)

    for rnd in report["rounds"]:
        for t, r in rnd.items():
            if sc == "ramp":
                for lv in r["levels"]:
                    add(
                        t,
                        lv["calls"],
                        lv["rtt_ms_p99"],
                        lv["loads"]["proxy_cores"],
                        lv["cpu_s_per_1000_msgs"],
                    )
            elif sc == "churn":
                add(
                    t,
                    r["concurrent_calls"],
                    r["handshake_ms_p99"],
                    r["loads"]["proxy_cores"],
                    r.get("cpu_ms_per_call"),
                )
            elif sc == "idle":
                add(
                    t,
                    r["calls"],
                    r.get("handshake_ms_p99"),
                    r["loads"]["proxy_cores"],
                    r.get("rss_kib_per_call"),
                )
            else:
                add(
                    t,
                    r["calls"],
                    r["rtt_ms_p99"],
                    r["loads"]["proxy_cores"],
                    r["cpu_s_per_1000_msgs"],
                )
    lat_label = {"churn": "handshake p99 (ms)", "idle": "handshake p99 (ms)"}.get(
        sc, "round trip p99 (ms)"
    )
    per_label = {"churn": "proxy CPU ms per call", "idle": "proxy RSS KiB per call"}.get(
        sc, "proxy CPU s per 1000 msgs"
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    style = "o-" if sc == "ramp" else "o"
    for t, s in series.items():
        order = sorted(range(len(s["x"])), key=lambda i: s["x"][i])
        xs = [s["x"][i] for i in order]
        for ax, key in zip(axes, ("lat", "cpu", "cpu_per"), strict=True):
            ax.plot(xs, [s[key][i] for i in order], style, label=label(t))
    for ax, ylabel in zip(axes, (lat_label, "proxy CPU (cores)", per_label), strict=True):
        ax.set_xlabel("concurrent calls")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend()
    if sc == "ramp" and report["params"].get("budget_ms"):
        axes[0].set_title(f"budget: direct + {report['params']['budget_ms']} ms")
    fig.suptitle(f"{sc}: {report['title']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
