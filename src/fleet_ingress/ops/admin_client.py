"""The CLI side of the admin socket: `stat`, `drain`/`ready`/`maint`,
`add-fleet`, `remove-fleet`. Each prints a clear line and exits non-zero when
the ingress is not running or refuses the change."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import aiohttp

DEFAULT_ADMIN_SOCKET = Path("/run/fleet-ingress/admin.sock")
# add-fleet waits for the new fleet to read UP; leave it time to.
REQUEST_TIMEOUT = 60.0


class AdminUnreachable(Exception):
    pass


async def admin_request(
    socket_path: Path, method: str, path: str, payload: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    connector = aiohttp.UnixConnector(path=str(socket_path))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.request(method, f"http://ingress{path}", json=payload) as response:
                return response.status, await response.json(content_type=None)
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise AdminUnreachable(
            f"cannot reach the admin socket {socket_path}: {_why(exc)}. Is fleet-ingress "
            "running? Point at its socket with --admin-socket PATH or -c CONFIG."
        ) from None


def _why(exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", exc)
    return getattr(os_error, "strerror", None) or str(os_error)


def run_admin(
    socket_path: Path,
    method: str,
    path: str,
    payload: dict[str, Any] | None,
    *,
    out: TextIO | None = None,
    as_json: bool = False,
) -> int:
    out = out or sys.stdout
    try:
        status, body = asyncio.run(admin_request(socket_path, method, path, payload))
    except AdminUnreachable as exc:
        print(f"fleet-ingress: {exc}", file=sys.stderr)
        return 2
    if status >= 400:
        print(f"fleet-ingress: {body.get('error', body)}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(body, indent=2), file=out)
    elif path == "/stat":
        print(format_stat_table(body), file=out)
    else:
        print(describe_result(body), file=out)
    return 0


def describe_result(body: dict[str, Any]) -> str:
    if "admin" in body:
        change = (
            f"already {body['admin']}"
            if body["was"] == body["admin"]
            else f"{body['was']} -> {body['admin']}"
        )
        line = f"fleet {body['fleet']}: {change} ({_calls(body['calls'])})"
        if body.get("fleets_file"):
            return f"{line}; saved to {body['fleets_file']}"
        if body.get("not_saved"):
            return f"{line}\nwarning: not saved to the fleets file: {body['not_saved']}"
        return line
    if body.get("dry_run"):
        return (
            f"dry run: would add fleet {body['fleet']} ({body['url']}, maxconn {body['maxconn']});"
            f" pre-check {body['precheck']}; would append to {body['fleets_file']}:\n"
            f"  {body['line']}\nnothing changed"
        )
    if "health" in body:
        return (
            f"added fleet {body['fleet']} ({body['url']}): {body['health']}, "
            f"saved to {body['fleets_file']} (backup {body['backup']})"
        )
    if body.get("removed"):
        return f"removed fleet {body['fleet']} ({_calls(body['closed_calls'])} closed)"
    where = (
        f"already gone from {body['fleets_file']}"
        if body.get("fleets_file")
        else "not in the fleets file any more"
    )
    return (
        f"fleet {body['fleet']} is draining: removed once its "
        f"{_calls(body['draining_calls'])} {'ends' if body['draining_calls'] == 1 else 'end'}; "
        f"{where}"
    )


def format_stat_table(snap: dict[str, Any]) -> str:
    """A table in the spirit of HAProxy's `show stat`."""
    header = (
        "fleet",
        "health",
        "admin",
        "cur/max",
        "free",
        "calls",
        "429",
        "retries",
        "chkfail",
        "last check",
    )
    rows = [header]
    for f in snap["fleets"]:
        health = "FULL" if f["health"] == "UP" and f["full"] else f["health"]
        free = f"{_dash(f['reported_available'])}/{_dash(f['estimated_available'])}"
        age = "" if f["last_check_age_s"] is None else f" {f['last_check_age_s']}s ago"
        rows.append(
            (
                f["name"],
                health,
                f["admin"] + ("*" if f["removing"] else ""),
                f"{f['active']}/{f['maxconn']}",
                free,
                str(f["calls_total"]),
                str(f["responses_429"]),
                str(f["retries"]),
                str(f["check_failures"]),
                (f["last_check"] or "-") + age,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    fe = snap["frontend"]
    lines.append(
        f"frontend: {_calls(fe['active_calls'])}, {fe['connections']} connections, "
        f"queue {fe['queue_length']} ({fe['queue_timeouts']} timed out)"
        + ("   * = being removed" if any(f["removing"] for f in snap["fleets"]) else "")
    )
    lines.append(
        "free = reported by the fleet's last probe / estimated now (reported - calls since)"
    )
    workers = snap.get("workers")
    if workers is not None:
        lines.append(_workers_lines(workers))
    if snap.get("state") == "draining":
        lines.append("STOPPING: new calls are refused; the calls above may finish (timeouts.drain)")
    return "\n".join(lines)


def _workers_lines(workers: list[dict[str, Any]]) -> str:
    """A row per worker process (a supervisor's snapshot)."""
    rows = [("worker", "gen", "calls", "conns", "state", "report")]
    for w in workers:
        state = "-" if w["draining"] is None else ("draining" if w["draining"] else "serving")
        age = "-" if w["last_report_age_s"] is None else f"{w['last_report_age_s']}s ago"
        rows.append(
            (
                str(w["pid"]),
                str(w["generation"]),
                str(w["calls"]),
                _dash(w["connections"]),
                state,
                age,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _calls(n: int) -> str:
    return "1 call" if n == 1 else f"{n} calls"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)
