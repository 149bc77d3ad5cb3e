"""`fleet-ingress calls` and `end-call` as an operator reads them: pure text
from the admin API's answers (GET /calls, DELETE /calls/{id}), no I/O."""

from __future__ import annotations

from typing import Any

__all__ = ["describe_ended", "format_calls_table", "shown_age", "shown_bytes"]

# The columns both tables show after their own (`_who`).
_WHO_HEADER = ("fleet", "bot", "carrier", "route", "from carrier", "to carrier")
_HEADER = ("id", "gen", "age", "state", *_WHO_HEADER, "quiet c/f")

# The calls ended whose connections are still closing (`closing`), below the
# live ones: what `stat`'s `closing` counts, with their ids for `end-call`.
_CLOSING_HEADER = ("id", "gen", "age", "closing", "end_reason", *_WHO_HEADER)


def shown_age(seconds: float | None) -> str:
    """`45s`, `12m03s`, `3h07m`, `2d04h`: at a glance, to the unit that matters."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def shown_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError  # the loop returns


def _quiet(row: dict[str, Any]) -> str:
    carrier, fleet = row.get("carrier_quiet_s"), row.get("fleet_quiet_s")
    if carrier is None and fleet is None:
        return "-"
    return f"{shown_age(carrier)}/{shown_age(fleet)}"


# A bot id (256 characters at most) is cut to this in the table, ending "~", so
# that one long id does not push every column off the screen (--json has it whole).
SHOWN_BOT = 32


def _bot(bot_id: str) -> str:
    return bot_id if len(bot_id) <= SHOWN_BOT else bot_id[: SHOWN_BOT - 1] + "~"


def _who(row: dict[str, Any]) -> tuple[str, ...]:
    """The columns both tables show after their own: fleet to bytes."""
    return (
        str(row.get("fleet") or "-"),
        _bot(str(row.get("bot_id") or "-")),
        str(row.get("client_ip") or "-"),
        str(row.get("route") or "-"),
        shown_bytes(row.get("bytes_from_carrier")),
        shown_bytes(row.get("bytes_to_carrier")),
    )


def _row(row: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(row["id"]),
        str(row.get("generation") or "-"),
        shown_age(row.get("age_s")),
        str(row.get("state") or "-"),
        *_who(row),
        _quiet(row),
    )


def _closing_row(row: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(row["id"]),
        str(row.get("generation") or "-"),
        shown_age(row.get("age_s")),
        shown_age(row.get("closing_s")),
        str(row.get("end_reason") or "-"),
        *_who(row),
    )


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns aligned, the last one not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]


def _closing_lines(answer: dict[str, Any]) -> list[str]:
    """The calls ended whose connections are still closing, after a blank
    line; nothing when there is none (the listing as it was before them)."""
    closing = answer.get("closing") or []  # absent: an ingress of a release before it
    # Workers that answered without them: an upgrade's old generation (an
    # ingress of a release before them says nothing of them, as before).
    unsaid = [
        w["pid"]
        for w in answer.get("workers") or []
        if "closing" in answer and w.get("answered") and w.get("closing") is None
    ]
    lines: list[str] = []
    if closing:
        lines += ["", *_aligned([_CLOSING_HEADER, *(_closing_row(row) for row in closing)])]
        lines.append(
            f"{len(closing)} call{'' if len(closing) == 1 else 's'} closing: ended, "
            "access line written, connections still closing (a close frame or the TLS "
            "close flushed to a peer slow to read or gone, 10 s at most each; `stat`'s "
            "closing); oldest first; cut one now with `fleet-ingress end-call ID`"
        )
    if unsaid:
        lines.append(
            f"NOT LISTED: the closing calls of worker{'' if len(unsaid) == 1 else 's'} "
            f"{', '.join(str(p) for p in unsaid)}, of a release before they were listed "
            "(an upgrade's old generation: `stat` counts them)"
        )
    return lines


def _count_line(answer: dict[str, Any]) -> str:
    calls, workers = answer["calls"], answer.get("workers") or []
    filt = answer.get("filter") or {}
    said = " ".join(
        words
        for words in (
            f"on fleet {filt['fleet']}" if filt.get("fleet") is not None else "",
            f"of bot {filt['bot']}" if filt.get("bot") is not None else "",
            f"older than {filt['longer_than']:g}s" if filt.get("longer_than") is not None else "",
        )
        if words
    )
    answered = [w for w in workers if w.get("answered")]
    gens = sorted({w.get("generation") for w in answered if w.get("generation") is not None})
    line = f"{len(calls)} call{'' if len(calls) == 1 else 's'}" + (f" {said}" if said else "")
    line += f" ({len(answered)} worker{'' if len(answered) == 1 else 's'}"
    if len(gens) > 1:
        line += ", generations " + ", ".join(str(g) for g in gens)
    line += "); oldest first"
    return line


def format_calls_table(answer: dict[str, Any]) -> str:
    """A row per live call, oldest first, columns aligned; a count line, then
    what the listing could not see (a worker that did not answer); then the
    calls ended whose connections are still closing (`_closing_lines`)."""
    lines = _aligned([_HEADER, *(_row(row) for row in answer["calls"])])
    if not answer["calls"]:
        lines = []
    lines.append(_count_line(answer))
    workers = answer.get("workers") or []
    before = [w["pid"] for w in workers if w.get("release_before_calls")]
    silent = [
        w["pid"] for w in workers if not w.get("answered") and not w.get("release_before_calls")
    ]
    if before:
        lines.append(
            f"NOT LISTED: the calls of worker{'' if len(before) == 1 else 's'} "
            f"{', '.join(str(p) for p in before)}, of a release before `calls` (an "
            "upgrade's old generation: it drains on)"
        )
    if silent:
        lines.append(
            f"NOT LISTED: the calls of worker{'' if len(silent) == 1 else 's'} "
            f"{', '.join(str(p) for p in silent)}, which did not answer (stopped, hung, or of "
            "a release before `calls`: an upgrade's old generation drains on)"
        )
    lost = answer.get("channel_lost") or []
    if lost:
        lines.append(
            f"NOT LISTED: the calls of worker{'' if len(lost) == 1 else 's'} "
            f"{', '.join(str(p) for p in lost)}, whose channel to the supervisor was lost "
            "(they drain on their own)"
        )
    if answer["calls"]:
        lines.append(
            "quiet c/f = how long the carrier / the fleet has sent nothing, at least "
            "(as the silence sweep last saw it; - before the tunnel); end one with "
            "`fleet-ingress end-call ID`"
        )
    lines += _closing_lines(answer)
    return "\n".join(lines)


def describe_ended(answer: dict[str, Any]) -> str:
    row = answer["ended"]
    what = f"bot {row.get('bot_id') or '-'}" + (
        f" on fleet {row['fleet']}" if row.get("fleet") else ""
    )
    how = (
        "aborted (a side did not take the close in time)"
        if row.get("aborted")
        else "both sides closed"
    )
    reason = f", reason: {answer['reason']}" if answer.get("reason") else ""
    ended_as = row.get("end_reason")  # None: a worker of a release before it says
    if row.get("closing"):
        # Ended before the ask, its line written: what was left, its sides'
        # close (a peer slow to read or gone), is cut.
        return (
            f"call {row['id']} ({what}, from {row.get('client_ip')}, up "
            f"{shown_age(row.get('age_s'))}) had ended already, its access line written "
            f"(end_reason {ended_as or '-'}; the reason given is not logged), its "
            "connections still closing: aborted them now"
        )
    if ended_as not in (None, "admin"):
        # It was ending already (a side hung up, a drain): its own reason stands.
        said = (
            f"it was ending already: its access line says end_reason {ended_as}, "
            "not admin (the reason given is not logged)"
        )
    else:
        said = "its access line says end_reason admin" + reason
    return (
        f"ended call {row['id']} ({what}, from {row.get('client_ip')}, {row.get('state')}, "
        f"up {shown_age(row.get('age_s'))}): {how}; {said}"
    )
