"""The `/stats` HTML page: what an operator reads at a glance. No I/O.

Rendered from the same snapshot as `/stats.json` and `fleet-ingress stat`.
It refreshes itself; it has no script and loads nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from html import escape
from typing import Any

from fleet_ingress.ops.fleet_display import (
    REMOVED_NOTE,
    REMOVED_ROW,
    RESERVED_NOTE,
    admin_saved,
    calls_ended_summary,
    certificate_chain_doubted,
    certificate_not_served,
    certificate_refused,
    certificate_served_refused,
    edits_not_applied,
    ended_otherwise,
    fd_store_short,
    fleets_summary,
    oom_count_broad,
    probed,
    queue_waits,
    removed_shown,
    shown_free,
    shown_health,
    supervisor_oom_killed,
    upgrade_failed,
    workers_missing,
    workers_oom_killed_not_replaced,
    workers_replaced,
)
from fleet_ingress.ops.reload_outcome import (
    edits_hidden_warning,
    listeners_not_moved,
    reload_warning,
)

REFRESH_SECONDS = 2
# Fleets' rows made between two turns of the loop (render_stats_page_in_turns).
ROWS_PER_TURN = 100

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.3em;margin:0 0 .2em} .sub{color:#667;margin-bottom:1em}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002;margin-bottom:1.2em}
th,td{padding:.35em .7em;border-bottom:1px solid #e4e6ea;text-align:right;white-space:nowrap}
th{background:#eef0f3;font-weight:600;white-space:normal;vertical-align:bottom}
td.l,th.l{text-align:left}
.state{display:inline-block;min-width:4.5em;text-align:center;border-radius:3px;
 padding:0 .4em;font-weight:600;color:#fff}
.UP{background:#2e9e44}.DOWN{background:#d0342c}.INIT{background:#8a8f98}
.FULL{background:#e08a00}.READY{background:#3b6fd6}.DRAIN{background:#e08a00}
.MAINT{background:#7a4fc0}.fail{color:#d0342c}.muted{color:#8a8f98}
.stopping{background:#fde2e1;border-left:4px solid #d0342c;padding:.4em .8em}
"""


def _cell(value: Any, cls: str = "") -> str:
    text = "-" if value is None else escape(str(value))
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def _badge(state: str) -> str:
    return f'<span class="state {escape(state)}">{escape(state)}</span>'


_STOPPING = (
    '<p class="stopping" id="stopping"><b>Stopping:</b> new calls are refused; '
    "the calls below may finish (timeouts.drain).</p>"
)


def _refused_reload(snap: dict[str, Any]) -> str:
    warning = reload_warning(snap)
    shown = "" if warning is None else f'<p class="stopping" id="reload">{escape(warning)}</p>'
    if (waiting := certificate_not_served(snap)) is not None:
        shown += f'<p class="stopping" id="certificate">{escape(waiting)}</p>'
    if (refused := certificate_refused(snap)) is not None:
        shown += f'<p class="stopping" id="certificate-refused">{escape(refused)}</p>'
    if (bad := certificate_served_refused(snap)) is not None:
        shown += f'<p class="stopping" id="certificate-served">{escape(bad)}</p>'
    if (doubted := certificate_chain_doubted(snap)) is not None:
        shown += f'<p class="stopping" id="certificate-chain">{escape(doubted)}</p>'
    if (edited := edits_not_applied(snap)) is not None:
        shown += f'<p class="muted" id="edits">{escape(edited)}</p>'
    if (hidden := edits_hidden_warning(snap)) is not None:
        shown += f'<p class="stopping" id="edits-hidden">{escape(hidden)}</p>'
    if (moved := listeners_not_moved(snap)) is not None:
        shown += f'<p class="stopping" id="restart-needed">{escape(moved)}</p>'
    return shown


def _workers_table(snap: dict[str, Any]) -> str:
    """A row per worker process (a supervisor's snapshot; none in one process)."""
    workers = snap.get("workers")
    if workers is None:
        return ""
    replaced = workers_replaced(snap)
    missing = workers_missing(snap)
    upgrade = upgrade_failed(snap)
    oom = supervisor_oom_killed(snap)
    fd_store = fd_store_short(snap)
    oom_workers = workers_oom_killed_not_replaced(snap)
    oom_broad = oom_count_broad(snap)
    rows = []
    for w in workers:
        started = (
            None
            if w["started"] is None
            else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(w["started"]))
        )
        state = w.get("state")
        age = None if w["last_report_age_s"] is None else f"{w['last_report_age_s']}s"
        if age is not None and w.get("report_overdue"):  # its counts are that report's
            age += ", overdue"
        rows.append(
            "<tr>"
            + _cell(w["pid"], "l")
            + _cell(w["generation"])
            + _cell(w["calls"])
            + _cell(w["connections"])
            + _cell(w.get("closing_calls"))
            + _cell(w.get("reserved"))
            + _cell(state, "l")
            + _cell(started, "l")
            + _cell(age)
            + _cell(w.get("code"), "l")
            + "</tr>"
        )
    return (
        '<table id="workers">\n<tr><th class="l">worker pid</th><th>generation</th>'
        "<th>calls</th><th>connections</th>"
        '<th title="calls ended whose connections are still closing">closing</th>'
        f'<th title="{escape(RESERVED_NOTE)}">reserved</th>'
        '<th class="l">state</th>'
        '<th class="l">started (UTC)</th><th>last report</th><th class="l">code</th></tr>\n'
        + ("".join(rows) or '<tr><td class="l" colspan="10">no workers</td></tr>')
        + "\n</table>\n"
        + (f'<div class="muted" id="replaced">{escape(replaced)}</div>\n' if replaced else "")
        + (f'<p class="stopping" id="missing">{escape(missing)}</p>\n' if missing else "")
        + (f'<p class="stopping" id="upgrade-failed">{escape(upgrade)}</p>\n' if upgrade else "")
        + (f'<p class="stopping" id="supervisor-oom">{escape(oom)}</p>\n' if oom else "")
        + (f'<p class="stopping" id="fd-store">{escape(fd_store)}</p>\n' if fd_store else "")
        + (
            f'<p class="stopping" id="workers-oom">{escape(oom_workers)}</p>\n'
            if oom_workers
            else ""
        )
        + (f'<div class="muted" id="oom-count">{escape(oom_broad)}</div>\n' if oom_broad else "")
    )


_NOT_SAVED = (
    '<br><span class="fail" title="the fleets file could not be written: a restart would '
    'not keep this state; the next fleet change that can write the file saves it">'
    "not saved</span>"
)


def _acme_row(fe: dict[str, Any]) -> str:
    """The :80 listener's row; with none open (listen.acme = ""), said so rather
    than "0 open", which read as a listener nobody used (the CLI text audit)."""
    if not fe.get("acme_listening", True):  # a release before the key: it listened
        return (
            '<tr><td class="l">port 80 (ACME, redirects)</td><td class="l muted">'
            'not listening (listen.acme = "")</td></tr>'
        )
    return (
        f'<tr><td class="l">port 80 (ACME, redirects)</td><td class="l">'
        f'{fe["acme_connections"]} open\n <span class="muted">'
        f"({fe['acme_refused_connections']} reset at accept,\n"
        f" {fe.get('acme_evicted_connections', 0)} closed for newer ones)</span></td></tr>"
    )


def _closing_row(fe: dict[str, Any]) -> str:
    """The calls ended whose connections are still closing: why connections
    stay open, and a drain waits, with no call up."""
    return (
        f'<tr><td class="l">calls closing</td><td class="l">{fe.get("closing_calls", 0)}'
        '\n <span class="muted">(ended and logged; a close frame and the TLS close '
        "flushed to a peer slow to read or gone, 10 s at most each)</span></td></tr>"
    )


def _fleet_row(f: dict[str, Any]) -> str:
    health = shown_health(f)
    reported, estimated = shown_free(f)
    check = f["last_check"] or "no probe yet"
    age = "" if f["last_check_age_s"] is None else f" {f['last_check_age_s']}s ago"
    check_cls = "l fail" if f["last_check_passed"] is False else "l"
    if not probed(f):  # MAINT: what its last probe said is stale
        check, age, check_cls = "not probed (MAINT)", "", "l"
    return (
        "<tr>"
        f'<td class="l"><b>{escape(f["name"])}</b><br>'
        f'<span class="muted">{escape(f["url"])}</span></td>'
        f"<td>{_badge(health)}</td><td>{_badge(f['admin'])}"
        f"{'<br><span class=muted>removing</span>' if f['removing'] else ''}"
        f"{'' if admin_saved(f) else _NOT_SAVED}</td>"
        f"<td>{f['active']}/{f['maxconn']}{_reserved(f)}</td>"
        + _cell(reported)
        + _cell(estimated)
        + f'<td class="{check_cls}">{escape(check)}'
        f'<span class="muted">{escape(age)}</span></td>'
        + _cell(f["calls_total"])
        + _cell(ended_otherwise(f).replace(",", ", "), "l")
        + _cell(f["responses_429"])
        + _cell(f["retries"])
        + _cell(f["check_failures"])
        + "</tr>"
    )


def _reserved(f: dict[str, Any]) -> str:
    """Under a fleet's calls/maxconn, its slots held for workers' standing
    budgets: why a fleet at maxconn shows fewer calls."""
    reserved = f.get("reserved") or 0  # a release before the key: none
    if not reserved:
        return ""
    return f'<br><span class="muted" title="{escape(RESERVED_NOTE)}">+{reserved} reserved</span>'


def _removed_row(snap: dict[str, Any]) -> str:
    """Every fleet removed since the start, its lifetime totals summed: the
    fleets' rows add up to the frontend's totals."""
    gone = removed_shown(snap)
    if gone is None:
        return ""
    return (
        '<tr id="removed-fleets">'
        f'<td class="l" title="{escape(REMOVED_NOTE)}"><b>{escape(REMOVED_ROW)}</b><br>'
        '<span class="muted">fleets removed since the start</span></td>'
        + _cell(None) * 6  # health, admin, calls/maxconn, free (2), last check
        + _cell(gone["calls_total"])
        + _cell(ended_otherwise(gone).replace(",", ", "), "l")
        + _cell(gone["responses_429"])
        + _cell(gone["retries"])
        + _cell(None)
        + "</tr>"
    )


def render_stats_page(snap: dict[str, Any]) -> str:
    return _page(snap, [_fleet_row(f) for f in snap["fleets"]])


async def render_stats_page_in_turns(snap: dict[str, Any]) -> str:
    """render_stats_page(snap), the same text, the loop let run after each
    ROWS_PER_TURN fleets' rows: at 500 fleets the page took 3 ms of the
    supervisor's loop in one piece (the scale audit of session 34)."""
    fleets = snap["fleets"]
    rows: list[str] = []
    for start in range(0, len(fleets), ROWS_PER_TURN):
        rows.extend(_fleet_row(f) for f in fleets[start : start + ROWS_PER_TURN])
        await asyncio.sleep(0)
    return _page(snap, rows)


def _page(snap: dict[str, Any], rows: list[str]) -> str:
    fe = snap["frontend"]
    requests = ", ".join(
        f"{escape(route)} " + " ".join(f"{code}:{n}" for code, n in codes.items())
        for route, codes in fe["requests"].items()
    )
    ended = escape(calls_ended_summary(fe).removeprefix("calls ended: "))
    not_after = snap.get("certificate_not_after")
    cert = (
        "-"
        if not_after is None
        else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
        + f" ({(not_after - snap['time']) / 86400:.0f} days)"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>fleet-ingress stats</title><style>{_CSS}</style></head>
<body>
<h1>fleet-ingress</h1>
<div class="sub">version {escape(snap["version"])} &middot; up {snap["uptime_s"]:.0f}s &middot;
{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap["time"]))} &middot;
refreshes every {REFRESH_SECONDS}s</div>
{_STOPPING if snap.get("state") == "draining" else ""}{_refused_reload(snap)}
<table id="fleets">
<tr><th class="l">fleet</th><th>health</th><th>admin</th><th>calls/maxconn</th>
<th>reported free</th><th>estimated free</th><th class="l">last check</th>
<th>calls total</th>
<th class="l" title="calls ended other than by a hang-up (carrier or fleet closed), by why">
ended, not hung up</th><th>429s</th><th>retries</th><th>check failures</th></tr>
{"".join(rows) or '<tr><td class="l" colspan="12">no fleets configured</td></tr>'}
{_removed_row(snap)}</table>
<div class="muted" id="fleets-summary">{escape(fleets_summary(snap["fleets"]))}</div>
<table id="frontend">
<tr><th class="l">frontend</th><th class="l"></th></tr>
<tr><td class="l">active calls</td><td class="l">{fe["active_calls"]}</td></tr>
{_closing_row(fe)}
<tr><td class="l">open connections</td><td class="l">{fe["connections"]}
 <span class="muted">({fe["connections_total"]} since start)</span></td></tr>
{_acme_row(fe)}
<tr><td class="l">queue</td><td class="l">{fe["queue_length"]} waiting,
 {escape(queue_waits(fe))}, {fe["queue_timeouts"]} timed out</td></tr>
<tr><td class="l">calls ended</td><td class="l">{ended}</td></tr>
<tr><td class="l">requests</td><td class="l">{requests or "-"}</td></tr>
<tr><td class="l">bytes relayed</td><td class="l">{fe["bytes_from_carrier"]} from carriers,
 {fe["bytes_to_carrier"]} to carriers <span class="muted">(a fleet's answer passed through
 counts, the ingress's own answers do not)</span></td></tr>
<tr><td class="l">certificate expires</td><td class="l">{escape(cert)}</td></tr>
</table>
{_workers_table(snap)}<div class="muted">/stats.json and /metrics hold the same data.</div>
</body></html>
"""
