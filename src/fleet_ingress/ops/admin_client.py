"""The CLI side of the admin socket: `stat`, `drain`/`ready`/`maint`,
`add-fleet`, `remove-fleet`, `calls`, `end-call`. Each prints a clear line and exits non-zero when
the ingress is not running or refuses the change."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlencode

import aiohttp

from fleet_ingress.config.unix_socket import not_a_socket
from fleet_ingress.ops.call_display import describe_ended, format_calls_table
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
    reserved_summary,
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

DEFAULT_ADMIN_SOCKET = Path("/run/fleet-ingress/admin.sock")
# add-fleet waits for the new fleet to read UP; leave it time to.
REQUEST_TIMEOUT = 60.0
# A read (stat, an upgrade's progress) is answered at once: the supervisor waits
# at most SCRAPE_WAIT (0.1 s) for its workers' counts, and not for one yet to
# answer a report asked before. Without an answer in this
# the supervisor is stopped (SIGSTOP, a debugger), hung or starved of CPU, and
# the operator running `stat` in an incident should hear so, not wait a minute.
READ_TIMEOUT = 10.0


class AdminUnreachable(Exception):
    pass


class AdminNotReached(AdminUnreachable):
    """Nothing was sent: the socket is not there, or nothing accepts on it."""


class AdminCut(AdminUnreachable):
    """A change was asked and the connection closed before its answer: the
    ingress stopped, or an upgrade re-executed it meanwhile."""


async def admin_request(
    socket_path: Path, method: str, path: str, payload: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    if (kind := not_a_socket(socket_path)) is not None:  # ('' reads as '.', a directory)
        raise AdminNotReached(
            f"{socket_path} is {kind}, not the admin socket: give the running ingress's "
            f"socket (listen.admin_socket; default {DEFAULT_ADMIN_SOCKET}) with "
            "--admin-socket PATH, or its configuration with -c CONFIG"
        )
    connector = aiohttp.UnixConnector(path=str(socket_path))
    reading = method == "GET"
    seconds = READ_TIMEOUT if reading else REQUEST_TIMEOUT
    timeout = aiohttp.ClientTimeout(total=seconds)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.request(method, f"http://ingress{path}", json=payload) as response:
                text = await response.text(errors="replace")
                try:
                    body = json.loads(text)
                except ValueError:  # aiohttp's own refusal (a request line too long): text
                    if response.status < 400:
                        raise _not_ours(socket_path, "an answer that is not JSON") from None
                    return response.status, {"error": text.strip()[:300] or "no answer body"}
                if not isinstance(body, dict):
                    raise _not_ours(socket_path, "an answer that is not a JSON object")
                if response.status == 503 and isinstance(body, dict) and body.get("at_cap"):
                    raise AdminNotReached(
                        f"the admin socket {socket_path} turned this command away unread: "
                        f"{body.get('error')}. A client keeps connections to it open: find it "
                        "with `ss -xp | grep admin.sock`; then run the command again"
                    )
                return response.status, body
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise AdminNotReached(
            f"cannot reach the admin socket {socket_path}: {_why(exc)}. {_reach_hint(exc)}"
        ) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError):
        if reading:  # a read changed nothing; and a listing not read for 10 s is cut
            raise AdminUnreachable(
                f"the ingress closed the admin connection before its answer to {method} "
                f"{path} was read whole: it stopped, or an upgrade re-executed it, or this "
                "command was itself stopped (^Z, SIGSTOP) and did not read the answer (a "
                "`calls` listing unread for 10 s is cut). Nothing was changed: run it again"
            ) from None
        # After the request was sent: what it did, if anything, is not known here.
        raise AdminCut(
            f"the ingress closed the admin connection before answering {method} {path}: "
            "it stopped, or an upgrade re-executed it while the request ran (a request "
            "still running after 10 s is cut then). Whether the change was made: "
            "`fleet-ingress stat`; then run the command again if it was not"
        ) from None
    except aiohttp.ClientResponseError:
        # What answered does not speak HTTP: HAProxy's stats socket answers
        # "Unknown command" (before, a traceback a screen long).
        raise _not_ours(socket_path, "an answer that is not HTTP") from None
    except TimeoutError:
        if reading:
            raise AdminUnreachable(
                f"no answer to {method} {path} within {seconds:g}s: the ingress accepted the "
                "connection but does not answer: its supervisor is stopped (state T in "
                "`ps -o pid,stat,cmd -p $(systemctl show -p MainPID --value fleet-ingress)`; "
                "`kill -CONT` that PID), hung, or starved of CPU. See `systemctl status "
                "fleet-ingress` and its log"
            ) from None
        raise AdminUnreachable(
            f"no answer to {method} {path} within {seconds:g}s; whether the change "
            "was made: `fleet-ingress stat`"
        ) from None


_WITHOUT_OUR_FIELDS = "an answer without the ingress's fields"


def _not_ours(socket_path: Path, answer: str) -> AdminUnreachable:
    """Another program's socket answered: nothing of the ingress was asked."""
    return AdminUnreachable(
        f"{socket_path} gave {answer}: it is another program's socket (HAProxy's stats "
        "socket?), not the ingress's admin socket: give the running ingress's socket "
        f"(listen.admin_socket; default {DEFAULT_ADMIN_SOCKET}) with --admin-socket PATH, "
        "or its configuration with -c CONFIG"
    )


# What every answer of the ingress to a request holds (admin_server, fleet_ops): an
# HTTP server's JSON object without them (another program's socket) was a KeyError
# traceback naming neither the socket nor the fix.
_STAT_FIELDS = ("fleets", "frontend")
_CHANGE_FIELDS = ("admin", "dry_run", "health", "removed")  # one of them, with "fleet"


def _lacks_our_fields(path: str, body: dict[str, Any]) -> bool:
    if path == "/stat":
        return not all(key in body for key in _STAT_FIELDS)
    return "fleet" not in body or not any(key in body for key in _CHANGE_FIELDS)


def _reach_hint(exc: BaseException) -> str:
    if isinstance(getattr(exc, "os_error", exc), PermissionError):
        # The ingress runs; the socket (0660) or its directory (2770) is its group's.
        return (
            "Run this as root or as a member of the socket's group (sudo, or "
            "`usermod -aG fleet-ingress $USER` and log in again)."
        )
    return (
        "Is fleet-ingress running? Point at its socket with --admin-socket PATH or -c CONFIG "
        "(a changed listen.admin_socket takes effect at the next restart: until then the "
        "ingress listens at the old path)."
    )


def _why(exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", exc)
    return getattr(os_error, "strerror", None) or str(os_error)


# aiohttp's own answers where no route is: an ingress of a release before it.
_NO_SUCH_ROUTE = ("404: Not Found", "405: Method Not Allowed")


def _answer_or_exit_code(
    socket_path: Path,
    method: str,
    path: str,
    payload: dict[str, Any] | None,
    *,
    too_old: str | None = None,
) -> dict[str, Any] | int:
    """The ingress's answer, or, said on stderr, the exit code of why there is
    none to use: 2 not reached, 1 refused (an HTTP error; `too_old` said when
    the route is not there at all: a release before it)."""
    try:
        status, body = asyncio.run(admin_request(socket_path, method, path, payload))
    except AdminUnreachable as exc:
        print(f"fleet-ingress: {exc}", file=sys.stderr)
        return 2
    if too_old is not None and status in (404, 405) and body.get("error") in _NO_SUCH_ROUTE:
        print(f"fleet-ingress: {too_old}", file=sys.stderr)
        return 1
    if status >= 400:
        print(f"fleet-ingress: {body.get('error', body)}", file=sys.stderr)
        return 1
    return body


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
    body = _answer_or_exit_code(socket_path, method, path, payload)
    if isinstance(body, int):
        return body
    if _lacks_our_fields(path, body):
        print(f"fleet-ingress: {_not_ours(socket_path, _WITHOUT_OUR_FIELDS)}", file=sys.stderr)
        return 2
    if body.get("add_again") and Path(socket_path) != DEFAULT_ADMIN_SOCKET:
        # Pasted, it asks the ingress asked now: it named no socket, and went to
        # the default one (another ingress there, or none).
        where = shlex.quote(str(Path(socket_path).absolute()))
        body = {**body, "add_again": f"{body['add_again']} --admin-socket {where}"}
    if as_json:
        print(json.dumps(body, indent=2), file=out)
    elif path == "/stat":
        print(format_stat_table(body), file=out)
    else:
        print(describe_result(body), file=out)
    return 0


def _before_calls(socket_path: Path, method: str, path: str) -> dict[str, Any] | int:
    """The answer to a `calls` / `end-call` request, or its exit code (said)."""
    return _answer_or_exit_code(
        socket_path,
        method,
        path,
        None,
        too_old="the running ingress is of a release before `calls` and "
        "`end-call`: `fleet-ingress upgrade` first (its calls are kept)",
    )


def run_calls(
    socket_path: Path, query: str, *, as_json: bool = False, out: TextIO | None = None
) -> int:
    """`fleet-ingress calls`: every live call on the host, oldest first."""
    out = out or sys.stdout
    path = "/calls" + (f"?{query}" if query else "")
    body = _before_calls(socket_path, "GET", path)
    if isinstance(body, int):
        return body
    if not isinstance(body.get("calls"), list):
        print(f"fleet-ingress: {_not_ours(socket_path, _WITHOUT_OUR_FIELDS)}", file=sys.stderr)
        return 2
    print(json.dumps(body, indent=2) if as_json else format_calls_table(body), file=out)
    return 0


def run_end_call(socket_path: Path, call_id: str, reason: str, *, out: TextIO | None = None) -> int:
    """`fleet-ingress end-call ID`: exit 0 once it has ended, 1 when no live
    call has that id (the ingress's message names it), 2 not reached."""
    out = out or sys.stdout
    path = f"/calls/{quote(call_id, safe='')}" + (
        f"?{urlencode({'reason': reason})}" if reason else ""
    )
    body = _before_calls(socket_path, "DELETE", path)
    if isinstance(body, int):
        return body
    if not isinstance(body.get("ended"), dict):
        print(f"fleet-ingress: {_not_ours(socket_path, _WITHOUT_OUR_FIELDS)}", file=sys.stderr)
        return 2
    print(describe_ended(body), file=out)
    return 0


def run_add_fleet(socket_path: Path, payload: dict[str, Any], *, out: TextIO | None = None) -> int:
    """`fleet-ingress add-fleet`. With `--admin`, a dry run first: a supervisor of
    a release before it ignores the field and adds the fleet READY, calls sent to
    a fleet the operator meant to hold (found in an upgrade, the new release's
    command asking the old supervisor). Refused then, nothing changed. The
    pre-check probe is sent twice."""
    if payload.get("admin") and not payload.get("dry_run"):
        body = _answer_or_exit_code(socket_path, "POST", "/fleets", {**payload, "dry_run": True})
        if isinstance(body, int):
            return body
        if not _lacks_our_fields("/fleets", body) and "admin_state" not in body:
            print(
                f"fleet-ingress: the running ingress is of a release before `add-fleet "
                f"--admin`: it would add fleet {body['fleet']} READY, new calls sent to it at "
                "once; nothing changed. `fleet-ingress upgrade` first, or add it without "
                f"--admin, then `fleet-ingress {payload['admin']} {body['fleet']}` (calls may "
                "reach it in between)",
                file=sys.stderr,
            )
            return 1
    return run_admin(socket_path, "POST", "/fleets", payload, out=out)


def run_reload(
    socket_path: Path,
    *,
    out: TextIO | None = None,
    not_reached: Callable[[], int | None] | None = None,
) -> int:
    """`fleet-ingress reload`: as SIGHUP, but answered once done. Exit 0 when it
    applied, 1 when it was refused (the previous configuration and certificate
    serve on), 2 when the ingress could not be asked: for `systemctl reload` and
    certbot's deploy hook, which must not report a refused reload as done."""
    out = out or sys.stdout
    try:
        _status, body = asyncio.run(admin_request(socket_path, "POST", "/reload"))
    except AdminNotReached as exc:
        # Nothing was asked: `not_reached` may ask another way (the unit's SIGHUP).
        if not_reached is not None and (code := not_reached()) is not None:
            return code
        print(f"fleet-ingress: {exc}", file=sys.stderr)
        return 2
    except AdminCut:
        # An upgrade's exec cuts a reload still waiting after WEB_QUIESCE (10 s):
        # the reload goes over the exec (`reload_pending`) and the new image runs
        # it. "Run the command again if it was not" sent the operator to a `stat`
        # that, before the new image's round, shows no reload at all. Exit 2:
        # the outcome is not known here (0 would tell certbot's hook a certificate
        # the new image may refuse was applied; 1 that it was refused).
        print(
            "fleet-ingress: the ingress closed the admin connection before answering the "
            "reload: an upgrade re-executed it (a reload asked before the exec is run by the "
            "new image: `fleet-ingress stat` shows its outcome as the last reload once it "
            "ran), or it stopped (`systemctl status fleet-ingress`)",
            file=sys.stderr,
        )
        return 2
    except AdminUnreachable as exc:  # asked, the outcome not known: never asked again
        print(f"fleet-ingress: {exc}", file=sys.stderr)
        return 2
    result, failed = body.get("result"), body.get("workers_failed")
    if result not in ("applied", "failed", "refused") and "error" not in body:
        print(f"fleet-ingress: {_not_ours(socket_path, _WITHOUT_OUR_FIELDS)}", file=sys.stderr)
        return 2
    if result == "applied" and not failed:
        print(f"reloaded: {body.get('changes') or 'no changes'}", file=out)
        return 0  # a worker that did not answer in time is in `changes`, and reloads later
    if result == "applied":
        which = "; ".join(f"worker {pid}: {error}" for pid, error in failed.items())
        problem = (
            f"reloaded in the supervisor, but not in every worker ({which}); those serve "
            "their previous configuration and certificate: `fleet-ingress upgrade` "
            "replaces them with workers that read the files again"
        )
    elif result == "failed":
        problem = (
            f"{body.get('error')}; part of it may be applied: `fleet-ingress stat` and the "
            "journal say what serves"
        )
    elif result == "refused":
        problem = (
            f"reload refused: {body.get('error')}; the previous configuration and "
            "certificate are still served"
        )
    else:
        problem = str(body.get("error", body))
    print(f"fleet-ingress: {problem}", file=sys.stderr)
    return 1


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
    # A release before them: none.
    warned = "".join(f"\nwarning: {warning}" for warning in body.get("warnings") or [])
    if body.get("dry_run"):
        return (
            f"dry run: would add fleet {body['fleet']} ({body['url']}, maxconn {body['maxconn']});"
            f" pre-check {body['precheck']}; would append to {body['fleets_file']}:\n"
            f"  {body['line']}\nnothing changed{warned}"
        )
    if "health" in body:
        held = body.get("admin_state", "READY")
        kept = f"{held}: no new call goes to it until `ready`, " if held != "READY" else ""
        return (
            f"added fleet {body['fleet']} ({body['url']}): {body['health']}, {kept}"
            f"saved to {body['fleets_file']} (backup {body['backup']}){warned}"
        )
    backup = f" (backup {body['backup']})" if body.get("backup") else ""
    if body.get("fleets_file"):
        saved = f"its line removed from {body['fleets_file']}{backup}"
    elif body.get("fleets_file_gone"):
        saved = f"nothing saved: {body['fleets_file_gone']}"
    else:
        saved = "not in the fleets file any more"
    silent = _not_answered(body.get("unanswered_workers") or [])
    silent += _died(body.get("workers_died") or [])
    again = body.get("add_again")  # a release before it: not said
    if body.get("removed"):
        return (
            f"removed fleet {body['fleet']} ({_calls(body['closed_calls'])} closed{silent}); "
            f"{saved}" + (f"\nto add it again: {again}" if again else "")
        )
    where = saved
    unreachable = body.get("unreachable_calls") or 0
    cannot = (
        f"; {_calls(unreachable)} on a worker that lost its slot channel could not be "
        "told to close: they end on their own, or as that worker is killed at "
        "timeouts.drain + 5 s after its channel was lost "
        '(`fleet-ingress stat` shows that worker as "draining, channel lost")'
        if unreachable
        else ""
    )
    closed = (
        f"{_calls(body['closed_calls'])} closed{silent}; "
        if body.get("closed_calls") or silent
        else ""
    )
    undo = (
        f"\nthis cannot be taken back while it drains (`ready` refuses it); to add it again "
        f"once it is gone (`fleet-ingress stat` lists it until then): {again}"
        if again
        else ""
    )
    return (
        f"fleet {body['fleet']} is draining: {closed}removed once its "
        f"{_calls(body['draining_calls'])} {'ends' if body['draining_calls'] == 1 else 'end'}; "
        f"{where}{cannot}{undo}"
    )


def format_stat_table(snap: dict[str, Any]) -> str:
    """A table in the spirit of HAProxy's `show stat`."""
    header = (
        "fleet",
        "health",
        "admin",
        "cur/max",
        "free",
        "total",
        "ended",
        "429",
        "retries",
        "chkfail",
        "last check",
    )
    rows = [header]
    for f in snap["fleets"]:
        health = shown_health(f)
        reported, estimated = shown_free(f)
        free = f"{reported}/{estimated}"
        age = "" if f["last_check_age_s"] is None else f" {f['last_check_age_s']}s ago"
        rows.append(
            (
                f["name"],
                health,
                f["admin"] + ("*" if f["removing"] else "") + ("" if admin_saved(f) else "!"),
                f"{f['active']}/{f['maxconn']}",
                free,
                str(f["calls_total"]),
                ended_otherwise(f),
                str(f["responses_429"]),
                str(f["retries"]),
                str(f["check_failures"]),
                # MAINT: no probe; what the last one said before it is stale.
                (f["last_check"] or "-") + age if probed(f) else "-",
            )
        )
    if (gone := removed_shown(snap)) is not None:
        rows.append(
            (
                REMOVED_ROW,
                "-",
                "-",
                "-",
                "-",
                str(gone["calls_total"]),
                ended_otherwise(gone),
                str(gone["responses_429"]),
                str(gone["retries"]),
                "-",
                "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    fe = snap["frontend"]
    lines.append(fleets_summary(snap["fleets"]))
    lines.append(
        f"frontend: {_calls(fe['active_calls'])}, {_closing(fe)}{fe['connections']} connections, "
        f"queue {fe['queue_length']} ({queue_waits(fe)}; {fe['queue_timeouts']} timed out)"
        + ("   * = being removed" if any(f["removing"] for f in snap["fleets"]) else "")
    )
    lines.append(calls_ended_summary(fe))
    if not all(admin_saved(f) for f in snap["fleets"]):
        lines.append(
            "! = admin state not saved in the fleets file (a restart would not keep it): "
            "the next drain, ready, maint, add-fleet or remove-fleet that can write it saves it"
        )
    lines.append("ended = calls ended other than by a hang-up (carrier or fleet closed), by why")
    if removed_shown(snap) is not None:
        lines.append(REMOVED_NOTE)
    if (reserved := reserved_summary(snap["fleets"])) is not None:
        lines.append(reserved)
        lines.append(RESERVED_NOTE)
    lines.append(
        "free = reported by the fleet's last probe / estimated now (reported - calls since)"
        + (
            "; MAINT: not probed, health and free not known"
            if any(not probed(f) for f in snap["fleets"])
            else ""
        )
    )
    workers = snap.get("workers")
    if workers is not None:
        if snap.get("workers_from"):  # process.workers as resolved at start or upgrade
            lines.append(f"workers wanted: {snap['workers_from']}")
        lines.append(_workers_lines(workers))
        if (replaced := workers_replaced(snap)) is not None:
            lines.append(replaced)
        if (missing := workers_missing(snap)) is not None:
            lines.append(missing)
        if (upgrade := upgrade_failed(snap)) is not None:
            lines.append(upgrade)
        if (oom := supervisor_oom_killed(snap)) is not None:
            lines.append(oom)
        if (short := fd_store_short(snap)) is not None:
            lines.append(short)
        if (oom := workers_oom_killed_not_replaced(snap)) is not None:
            lines.append(oom)
        if (oom := oom_count_broad(snap)) is not None:
            lines.append(oom)
    if (waiting := certificate_not_served(snap)) is not None:
        lines.append(waiting)
    if (refused := certificate_refused(snap)) is not None:
        lines.append(refused)
    if (bad := certificate_served_refused(snap)) is not None:
        lines.append(bad)
    if (doubted := certificate_chain_doubted(snap)) is not None:
        lines.append(doubted)
    if (edited := edits_not_applied(snap)) is not None:
        lines.append(edited)
    if snap.get("state") == "draining":
        lines.append("STOPPING: new calls are refused; the calls above may finish (timeouts.drain)")
    warning = reload_warning(snap)
    if warning is not None:
        lines.append(warning)
    if (hidden := edits_hidden_warning(snap)) is not None:
        lines.append(hidden)
    if (moved := listeners_not_moved(snap)) is not None:
        lines.append(moved)
    return "\n".join(lines)


def _workers_lines(workers: list[dict[str, Any]]) -> str:
    """A row per worker process (a supervisor's snapshot)."""
    # calls: held now; closing: ended, connections still closing
    # reserved: slots held for its standing grant budget (RESERVED_NOTE)
    rows = [("worker", "gen", "calls", "conns", "closing", "reserved", "state", "report", "code")]
    for w in workers:
        state = w.get("state") or "-"  # None before its first report
        age = "-" if w["last_report_age_s"] is None else f"{w['last_report_age_s']}s ago"
        if w.get("report_overdue"):  # its counts are that report's
            age += ", overdue"
        rows.append(
            (
                str(w["pid"]),
                str(w["generation"]),
                str(w["calls"]),
                _dash(w["connections"]),
                _dash(w.get("closing_calls")),  # None: not reported, or a release before it
                str(w.get("reserved", 0)),  # a release before the key: none
                state,
                age,
                _dash(w.get("code")),  # None: not reported yet, or a release before it
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _code_change(before: str | None, after: str | None) -> str:
    """What code the new generation runs, against the old one's (release.code_digest)."""
    if after is None:  # a release before the digest
        return ""
    if before == after:
        return f", code {after} (the same code as before)"
    return f", code {after} (was {before or 'not said'})"


def _not_answered(pids: list[int]) -> str:
    """`remove-fleet --force`'s workers that did not say how many calls they
    closed: the count printed is what the others said."""
    if not pids:
        return ""
    who = ", ".join(str(pid) for pid in pids)
    if len(pids) == 1:
        return f", by the workers that answered; worker {who} did not say how many it closed"
    return f", by the workers that answered; workers {who} did not say how many they closed"


def _died(pids: list[int]) -> str:
    """`remove-fleet --force`'s workers that died before they answered: their
    calls are lost with them (stat counts them), not in the count printed."""
    if not pids:
        return ""
    who = ", ".join(str(pid) for pid in pids)
    return (
        f"; worker{'s' if len(pids) > 1 else ''} {who} died meanwhile (its calls are "
        "counted lost: `fleet-ingress stat`)"
    )


def _calls(n: int) -> str:
    return "1 call" if n == 1 else f"{n} calls"


def _closing(frontend: dict[str, Any]) -> str:
    """The calls ended whose connections are still closing, when said (none from
    a supervisor of a release before it): why connections stay with no call up."""
    closing = frontend.get("closing_calls")
    return "" if closing is None else f"{closing} closing, "


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


# -- upgrade -----------------------------------------------------------------------

# The re-execution, the table's rebuild (5 s at most) and the new workers' start
# (30 s at most), with room, after the trial run: that one is waited on for as long
# as the supervisor says it makes progress (it gives it up itself: its CPU time,
# 600 s at most; service.upgrade.TrialProgress). A release that does not say: from
# the start (its trial: 90 s at most).
UPGRADE_TIMEOUT = 180.0
# How often the trial's progress is printed while it runs (niced, on a busy host).
UPGRADE_TRIAL_SAY_EVERY = 15.0
UPGRADE_POLL = 0.2
# The supervisor's admin socket is kept over its exec, so it answers again
# within a second or so; this long without an answer means it is gone.
UPGRADE_UNREACHABLE = 30.0


async def _await_upgrade(socket_path: Path, out: TextIO) -> int:
    status, body = await admin_request(socket_path, "POST", "/upgrade")
    if status >= 400:
        print(f"fleet-ingress: upgrade refused: {body.get('error', body)}", file=sys.stderr)
        return 1
    if not all(key in body for key in ("id", "pid", "from_generation", "state")):
        raise _not_ours(socket_path, _WITHOUT_OUR_FIELDS)
    upgrade_id = body["id"]
    print(
        f"upgrade {upgrade_id}: supervisor {body['pid']}, generation {body['from_generation']}: "
        "trial run of the installed code...",
        file=out,
        flush=True,
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + UPGRADE_TIMEOUT
    last_answer = loop.time()
    said = body["state"]
    trial_told = trial_seen = 0.0
    while loop.time() < deadline:
        await asyncio.sleep(UPGRADE_POLL)
        try:
            # The connection drops when the supervisor re-executes: ask again.
            status, answer = await admin_request(socket_path, "GET", "/upgrade")
        except (TimeoutError, AdminUnreachable, aiohttp.ClientError) as exc:
            if loop.time() - last_answer > UPGRADE_UNREACHABLE:
                print(
                    f"fleet-ingress: upgrade {upgrade_id}: the supervisor has not answered for "
                    f"{UPGRADE_UNREACHABLE:g}s ({exc}); see `journalctl -u fleet-ingress` "
                    "(or the ingress's log) for what happened",
                    file=sys.stderr,
                )
                return 1
            continue
        last_answer = loop.time()
        if status >= 400:
            print(f"fleet-ingress: upgrade: {answer.get('error', answer)}", file=sys.stderr)
            return 1
        if not all(key in answer for key in ("upgrades", "pid", "generation")):
            raise _not_ours(socket_path, _WITHOUT_OUR_FIELDS)
        ours = next((u for u in answer["upgrades"] if u["id"] == upgrade_id), None)
        if ours is None:
            print(
                f"fleet-ingress: upgrade {upgrade_id}: the supervisor (pid {answer['pid']}) "
                "no longer knows this upgrade: it was restarted meanwhile; see its log",
                file=sys.stderr,
            )
            return 1
        trial = ours.get("trial") if ours["state"] == "checking" else None
        if isinstance(trial, dict) and trial.get("wall_s", 0) > trial_seen:
            trial_seen = trial["wall_s"]
            deadline = max(deadline, loop.time() + UPGRADE_TIMEOUT)
            if trial_seen >= trial_told + UPGRADE_TRIAL_SAY_EVERY:
                trial_told = trial_seen
                print(
                    f"upgrade {upgrade_id}: trial run still running, {trial_seen:.0f}s "
                    f"({trial.get('cpu_s', 0):.1f}s of CPU): niced behind the calls, the host "
                    "is busy...",
                    file=out,
                    flush=True,
                )
        if ours["state"] != said:
            said = ours["state"]
            if said not in ("done", "failed"):
                print(f"upgrade {upgrade_id}: {said}...", file=out, flush=True)
        if ours["state"] == "done":
            took = ours.get("took_s")  # a release before it: the wall clock's difference
            if took is None:
                took = ours["finished"] - ours["started"]
            same = "unchanged" if answer["pid"] == body["pid"] else f"now {answer['pid']}"
            print(
                f"upgraded: generation {ours['generation']} serves (took {took:.1f}s)"
                f"{_code_change(ours.get('from_code'), answer.get('code'))}; "
                f"generation {ours['from_generation']} drains its calls; supervisor pid "
                f"{answer['pid']} ({same})",
                file=out,
            )
            for note in ours.get("notes") or []:  # a release before them: none
                print(f"upgrade {upgrade_id}: NOTE: {note}", file=out)
            return 0
        if ours["state"] == "failed":
            print(
                f"fleet-ingress: upgrade abandoned, generation {answer['generation']} serves on: "
                f"{ours['error']}",
                file=sys.stderr,
            )
            return 1
    print(
        f"fleet-ingress: upgrade {upgrade_id}: no outcome within {loop.time() - began:.0f}s (last "
        f"state: {said}); `fleet-ingress stat` shows the generation serving",
        file=sys.stderr,
    )
    return 1


def run_upgrade(socket_path: Path, *, out: TextIO | None = None) -> int:
    """`fleet-ingress upgrade`: 0 once the new generation serves, 1 (with the
    reason) when the upgrade was refused or abandoned, 2 when there is no ingress."""
    try:
        return asyncio.run(_await_upgrade(socket_path, out or sys.stdout))
    except AdminUnreachable as exc:
        print(f"fleet-ingress: {exc}", file=sys.stderr)
        return 2
