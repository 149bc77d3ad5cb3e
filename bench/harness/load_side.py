"""The load side's CPU a relayed message, and a proxy ratio controlled by the generator's.

The load side is the generator processes (the carriers) and the two fleets, on the
same two cores as the proxy. Its CPU a message says how fast the host ran in a
window: a window where every process is 5 % slower a message reads the proxy 5 %
dearer too. Of the two, only the **generator** does the same work whichever proxy
is in front (the same calls, frames and TLS to the proxy); the fleets do not:
HAProxy's health checks open a TLS connection to each fleet every second, the
ingress's poller keeps one. So between programs (fleet-ingress / HAProxy) the rule is:

    controlled = (proxy A's CPU a message / proxy B's) /
                 (generator's CPU a message in A's window / in B's), in one round

and between variants of one program :func:`bench.harness.report.controlled` also
uses the fleets. Pure functions of stored results; ``python -m bench.harness.load_side
DIR...`` prints the table for runs already in bench/results.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from .targets import base, label

SIDES = ("generator", "fleets")
GEN_CONTROLLED = "cpu_gen_controlled"
RULE = (
    "controlled by the generator: (proxy A's CPU a message / proxy B's) / (the generators' "
    "CPU a message in A's window / in B's), each round; the generators do the same work "
    "whichever proxy is in front, so their ratio is the host's speed between the two windows; "
    "the fleets' is shown, not used (HAProxy's health checks add to their work)"
)


def cpu_s(loads: dict[str, Any], side: str) -> float | None:
    """CPU seconds of ``side`` (generator or fleets) in a window: the unrounded figure
    when the run recorded it, else its cores x the window (3 digits)."""
    raw = loads.get(f"{side}_cpu_s")
    if raw is not None:
        return float(raw)
    cores, window = loads.get(f"{side}_cores"), loads.get("window_s")
    return None if cores is None or not window else cores * window


def us_per_msg(result: dict[str, Any], side: str, work: str = "msgs_window") -> float | None:
    """Microseconds of ``side``'s CPU a relayed message in the window (steady results:
    ``msgs_window``; a ramp level: ``msgs``)."""
    msgs = result.get(work)
    cpu = cpu_s(result.get("loads", {}), side)
    return None if not msgs or cpu is None else round(cpu / msgs * 1e6, 3)


def gen_controlled(
    a: dict[str, Any],
    b: dict[str, Any],
    key: str = "cpu_s_per_1000_msgs",
    work: str = "msgs_window",
) -> float | None:
    """Target ``a``'s CPU a message over ``b``'s in one round, over the generators' CPU a
    message in the same two windows; None when a figure is missing."""
    a_cpu, b_cpu = a.get(key), b.get(key)
    a_gen, b_gen = us_per_msg(a, "generator", work), us_per_msg(b, "generator", work)
    if not a_cpu or not b_cpu or not a_gen or not b_gen:
        return None
    return round((a_cpu / b_cpu) / (a_gen / b_gen), 3)


def program_pairs(targets: list[str]) -> list[tuple[str, str]]:
    """fleet-ingress targets over HAProxy targets: ingress/haproxy, ingress@wN/haproxy@ntN
    (N processes against N threads), and every other ingress variant over plain haproxy."""
    hap = [t for t in targets if base(t) == "haproxy"]
    pairs = []
    for t in targets:
        if base(t) != "ingress" or not hap:
            continue
        workers = t.partition("@")[2]
        same_n = f"haproxy@nt{workers[1:]}" if workers.startswith("w") else ""
        pairs.append((t, same_n if same_n in hap else "haproxy" if "haproxy" in hap else hap[0]))
    return pairs


def _median(values: list[float | None]) -> float | None:
    nums = [v for v in values if v is not None]
    return round(statistics.median(nums), 3) if nums else None


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def lines(rounds: list[dict[str, dict[str, Any]]]) -> list[str]:
    """The Markdown section: each target's and round's generator and fleets CPU a message,
    then per pair of programs and round the raw ratio, the generators' and fleets' ratios
    and the generator-controlled ratio; [] for a run with no proxy pair or no messages."""
    targets = list(dict.fromkeys(t for rnd in rounds for t in rnd))
    if not any(us_per_msg(rnd[t], "generator") for rnd in rounds for t in rnd):
        return []
    out = [
        "",
        "The load side's CPU a relayed message (µs, generator / fleets), each round:",
        "",
        "| target | " + " | ".join(f"round {i}" for i in range(1, len(rounds) + 1)) + " |",
        "|---|" + "---|" * len(rounds),
    ]
    for t in targets:
        cells = [
            f"{_f(us_per_msg(rnd[t], 'generator'))} / {_f(us_per_msg(rnd[t], 'fleets'))}"
            if t in rnd
            else "-"
            for rnd in rounds
        ]
        out.append(f"| {label(t)} | " + " | ".join(cells) + " |")
    for num, den in program_pairs(targets):
        raw, gen, fleets, ctl = [], [], [], []
        for rnd in rounds:
            a, b = rnd.get(num, {}), rnd.get(den, {})
            ka, kb = a.get("cpu_s_per_1000_msgs"), b.get("cpu_s_per_1000_msgs")
            raw.append(round(ka / kb, 3) if ka and kb else None)
            for side, acc in (("generator", gen), ("fleets", fleets)):
                sa, sb = us_per_msg(a, side), us_per_msg(b, side)
                acc.append(round(sa / sb, 3) if sa and sb else None)
            ctl.append(gen_controlled(a, b))
        out += [
            "",
            f"- {num}/{den}, CPU a message: raw {_median(raw)} (rounds {raw}); the generators' "
            f"{_median(gen)} (rounds {gen}); the fleets' {_median(fleets)} (rounds {fleets}); "
            f"**controlled by the generator {_median(ctl)}** (rounds {ctl})",
        ]
    if program_pairs(targets):
        out += ["", f"Rule: {RULE}."]
    out += tls_lines(rounds, targets)
    return out


def tls_lines(rounds: list[dict[str, dict[str, Any]]], targets: list[str]) -> list[str]:
    """What TLS the carriers got from each target (version and cipher, calls over rounds),
    and whether the proxies differ: then the generators' work is not the same behind them."""
    seen: dict[str, dict[str, int]] = {}
    for rnd in rounds:
        for t, r in rnd.items():
            for key, n in (r.get("tls") or {}).items():
                seen.setdefault(t, {})[key] = seen.setdefault(t, {}).get(key, 0) + n
    proxies = {t: set(v) for t, v in seen.items() if base(t) != "direct"}
    if not proxies:
        return []
    kinds = {frozenset(v) for v in proxies.values()}
    text = "; ".join(
        f"{label(t)} " + ", ".join(f"{k} ({n} calls)" for k, n in seen[t].items())
        for t in targets
        if t in seen
    )
    same = (
        "the same behind every proxy"
        if len(kinds) == 1
        else "**not the same behind every proxy: the generators' work differs**"
    )
    return ["", f"TLS the carriers were given: {text}: {same}."]


def main(argv: list[str] | None = None) -> int:
    """Print the section for stored runs: ``python -m bench.harness.load_side DIR...``."""
    for directory in argv if argv is not None else sys.argv[1:]:
        rep = json.loads((Path(directory) / "results.json").read_text())
        print(f"## {directory}\n\n`{rep['command']}`")
        print("\n".join(lines(rep["rounds"])) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
