"""How `stat` and the stats page show a fleet's row of `/stats.json`, and the
workers replaced: one rule for both. No imports of the ingress: the CLI uses it too."""

from __future__ import annotations

import time
from typing import Any

NOT_PROBED = "-"
# A fleet may report any free count (SPEC 4: no upper bound); past this one
# the figure tells an operator nothing more (maxconn caps a fleet's calls) and
# would stretch `stat`'s columns and the page's cells (10**400 is 401 digits).
FREE_SHOWN_UP_TO = 99_999


def probed(row: dict[str, Any]) -> bool:
    """A fleet in MAINT is not probed: its last health and free count are stale
    (it starts over from its first probe when it leaves MAINT), so not shown."""
    return row["admin"] != "MAINT"


def admin_saved(row: dict[str, Any]) -> bool:
    """False: the fleet's admin state applies but the fleets file does not record it
    (its write failed); a running ingress older than this key saved every one it shows."""
    return bool(row.get("admin_saved", True))


def shown_health(row: dict[str, Any]) -> str:
    if not probed(row):
        return NOT_PROBED
    return "FULL" if row["health"] == "UP" and row["full"] else str(row["health"])


def shown_free(row: dict[str, Any]) -> tuple[str, str]:
    """(reported by the last probe, estimated now) as shown: "-" where not known
    or stale, "99999+" past FREE_SHOWN_UP_TO; /stats.json keeps the figures."""
    if not probed(row):
        return NOT_PROBED, NOT_PROBED
    return _free(row["reported_available"]), _free(row["estimated_available"])


def _free(count: int | None) -> str:
    if count is None:
        return NOT_PROBED
    return f"{FREE_SHOWN_UP_TO}+" if count > FREE_SHOWN_UP_TO else str(count)


# How a call ends when nothing went wrong: a side hung up. The fleet table's
# "ended" cell shows the other reasons (a removal, an operator, an error, a
# refusal...); every reason is in the calls-ended line, /stats.json and /metrics.
HUNG_UP = frozenset({"carrier closed", "fleet closed"})


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(((k, n) for k, n in counts.items() if n), key=lambda e: (-e[1], e[0]))


def ended_otherwise(row: dict[str, Any]) -> str:
    """A fleet's calls ended other than by a hang-up, by why, most first, one
    word ("removed:5,error:2"; "-" for none): `stat`'s columns split on spaces."""
    ended = row.get("calls_ended") or {}  # a release before the key: none said
    shown = _by_count({k: n for k, n in ended.items() if k not in HUNG_UP})
    return ",".join(f"{reason.replace(' ', '_')}:{n}" for reason, n in shown) or "-"


# The removed fleets' row's name in `stat` and on the page: no fleet can be
# named so (config.fleets_file's names start with a letter, a digit or "[").
REMOVED_ROW = "(removed)"
REMOVED_NOTE = (
    "(removed) = every fleet removed since the start, its lifetime totals summed (their "
    "per-fleet series have left /metrics; the frontend's totals keep them)"
)


RESERVED_NOTE = (
    "reserved = a fleet's slots held for workers' grant budgets (the only worker's: "
    "every free slot while it is the only one; or standing budgets, "
    "INGRESS_STANDING_BUDGETS): no call yet, a worker grants one from them without "
    "asking the supervisor; counted against maxconn, not in cur (cur + reserved <= "
    "max), not taken from free; given back when another worker joins or a call must queue"
)


def reserved_summary(fleets: list[dict[str, Any]]) -> str | None:
    """The fleets holding slots for standing budgets, and how many: "reserved:
    a 5, b 3" (None: none; a release before the key said none)."""
    held = [(f["name"], f.get("reserved") or 0) for f in fleets]
    shown = [f"{name} {n}" for name, n in held if n]
    if not shown:
        return None
    return "reserved: " + ", ".join(shown)


def removed_shown(snap: dict[str, Any]) -> dict[str, Any] | None:
    """The removed fleets' row of a snapshot when it has a count (None: none,
    or a release before the key)."""
    row = snap.get("removed_fleets")
    if not row or not any(
        row.get(k) for k in ("calls_total", "responses", "retries", "redispatches", "calls_ended")
    ):
        return None
    return row


def calls_ended_summary(frontend: dict[str, Any]) -> str:
    """Every call ended since the start, by why (every fleet's and those no
    fleet answered), most first; "refused" says whose answer the carrier got."""
    shown = _by_count(frontend.get("calls_ended") or {})
    if not shown:
        return "calls ended: none yet"
    return "calls ended: " + ", ".join(
        f"{reason} {n}" + (refused_by(frontend, n) if reason == "refused" else "")
        for reason, n in shown
    )


def refused_by(frontend: dict[str, Any], refused: int) -> str:
    """Whose answer the `refused` calls got, by status: " (fleets' own answers
    passed through 3: 429 3; the ingress's own 2: 503 2)". The fleet label of
    a refused call does not tell it: a 503 once every attempt on a fleet failed
    is the ingress's answer, counted on that fleet. "" from a release before
    the split (`calls_refused`)."""
    split = frontend.get("calls_refused")
    if not split:
        return ""
    parts = []
    for who, label in (
        ("fleet", "fleets' own answers passed through"),
        ("ingress", "the ingress's own"),
    ):
        by_status = split.get(who) or {}
        total = sum(by_status.values())
        if total:
            codes = " ".join(f"{code} {n}" for code, n in _by_count(by_status))
            parts.append(f"{label} {total}: {codes}")
    told = sum(sum((split.get(who) or {}).values()) for who in ("fleet", "ingress"))
    if refused > told and parts:  # workers of an earlier release count no split
        parts.append(f"{refused - told} not told apart")
    return f" ({'; '.join(parts)})" if parts else ""


def queue_waits(frontend: dict[str, Any]) -> str:
    """The calls handed a slot after a wait in the queue, and how long they
    waited on average: "calls wait for a slot" told from "fleets are slow to
    answer" (the access line's handshake_ms has both; its queued_ms the wait)."""
    waits = frontend.get("queue_waits")
    if waits is None:  # a running ingress older than the key
        return "waits not counted"
    if not waits:
        return "none waited"
    return f"{waits} waited for a slot, {frontend['queue_wait_s'] / waits:.2f}s on average"


def fleets_summary(fleets: list[dict[str, Any]]) -> str:
    """One line counting the fleets by what `stat` shows for each: at a few
    hundred fleets the table alone does not say how many are DOWN."""
    if not fleets:  # a start with a fleets file listing none (a reload refuses one)
        return "fleets: 0: every call gets 503 until `fleet-ingress add-fleet URL` adds one"
    shown: dict[str, int] = {}
    for row in fleets:
        health = shown_health(row)
        key = "not probed (MAINT)" if health == NOT_PROBED else health
        shown[key] = shown.get(key, 0) + 1
    drained = sum(1 for row in fleets if row["admin"] == "DRAIN")
    order = ["UP", "FULL", "DOWN", "INIT", "not probed (MAINT)"]
    parts = [f"{shown[k]} {k}" for k in order if shown.get(k)]
    parts += [f"{n} {k}" for k, n in sorted(shown.items()) if k not in order]
    return (
        f"fleets: {len(fleets)}"
        + (f" ({', '.join(parts)})" if parts else "")
        + (f"; {drained} drained" if drained else "")
    )


def certificate_not_served(snap: dict[str, Any]) -> str | None:
    """One line while tls.cert on disk holds a renewal no reload has loaded (a
    supervisor's snapshot); None otherwise."""
    on_disk = snap.get("certificate_file")
    if not on_disk or not on_disk.get("not_served"):
        return None
    served = snap.get("certificate_not_after")
    return (
        f"CERTIFICATE NOT LOADED: tls.cert on disk is valid until {_day(on_disk['not_after'])}"
        + (f", the one served until {_day(served)}" if served is not None else "")
        + ": `systemctl reload fleet-ingress` loads it (and says why, if it cannot); "
        "certbot does not run its deploy hook again for it"
    )


def certificate_refused(snap: dict[str, Any]) -> str | None:
    """One line while tls.cert and tls.key on disk hold what a reload refuses in
    place of the certificate served (a supervisor's snapshot); None otherwise."""
    on_disk = snap.get("certificate_file")
    if not on_disk or not on_disk.get("refused"):
        return None
    fix = "put a good certificate in place, then `systemctl reload fleet-ingress`"
    if snap.get("certificate_served_refused"):  # no better: said by its own line
        return f"CERTIFICATE ON DISK REFUSED: {on_disk['refused']}: {fix}"
    served = snap.get("certificate_not_after")
    return (
        f"CERTIFICATE ON DISK REFUSED: {on_disk['refused']}; the one served"
        + (f" until {_day(served)}" if served is not None else "")
        + f" serves on, but a reboot or a stop then a start takes the files as they are: {fix}"
    )


def certificate_served_refused(snap: dict[str, Any]) -> str | None:
    """One line while the certificate served is one carriers refuse (expired
    while served), or one this host's clock reads before the notBefore of (a
    start took it from the files): what is known, not that carriers refuse it."""
    if not (problem := snap.get("certificate_served_refused")):
        return None
    if snap.get("certificate_served_early"):  # the clock here, or the certificate
        return (
            f"THIS HOST'S CLOCK READS BEFORE THE CERTIFICATE SERVED IS VALID: it {problem}: "
            "then put a good certificate in place, and `systemctl reload fleet-ingress`"
        )
    return (
        f"CERTIFICATE SERVED IS REFUSED BY CARRIERS: it {problem}; every new call's "
        "handshake fails: put a good certificate in place, then `systemctl reload "
        "fleet-ingress`"
    )


def upgrade_failed(snap: dict[str, Any]) -> str | None:
    """One line while the last upgrade failed (a supervisor's snapshot: its
    `upgrade`), until one succeeds; None otherwise. What failed it is on disk
    still, as a rule: a worker replaced meanwhile runs the code installed now.
    Before, only /stats.json and the journal said so: an upgrade begun with
    SIGUSR2 (no command to tell its outcome) left stat and the page silent
    (the accounting audit of session 31). It reads the last upgrade that
    finished (`upgrade_last_finished`), as fleet_ingress_upgrade_failed does:
    read as the latest (`upgrade`), the line went while the next upgrade was
    checked, though the gauge and its alert stayed (the review of session 31).
    A snapshot from a supervisor before that key: the latest."""
    last = snap.get("upgrade_last_finished", snap.get("upgrade"))
    if not last or last.get("state") != "failed":
        return None
    latest = snap.get("upgrade") or last
    under_way = latest.get("state") not in ("done", "failed")
    when = "" if last.get("finished") is None else f" at {_day(last['finished'])}"
    source = last.get("source")
    begun = "`fleet-ingress upgrade`" if source == "command" else source or "unknown"
    cause = last.get("cause")
    of_files = cause == "files"
    again = ", then `fleet-ingress upgrade` (this line stays until an upgrade succeeds)"
    if of_files:
        # The files on disk failed it, not the code: "fix the install or put back the
        # release running" sent an operator to roll back a sound release (the CLI audit
        # of session 32).
        fix = "the installed code is not at fault: fix what it names" + again
    elif cause == "service":
        # The workers' state at that moment (a start not settled, a channel not read,
        # descriptors short): the error says what to do (the review of session 32).
        fix = "the installed code is not at fault: do what it says" + again
    elif cause == "release":
        # A release that cannot take over by `upgrade` (its state format, its channel):
        # "then `fleet-ingress upgrade`" was refused again the same way, where the
        # error said to restart (the review of session 32).
        fix = (
            "but a worker replaced meanwhile runs the code installed now: put back the "
            "release running (then `fleet-ingress upgrade`), or restart the service in a "
            "quiet hour to run the one installed (`systemctl restart fleet-ingress`): an "
            "upgrade to it is refused the same way"
        )
    else:
        fix = (
            "but a worker replaced meanwhile runs the code installed now: fix the install "
            "or put back the release running" + again
        )
    return (
        f"LAST UPGRADE FAILED{when} (begun by {begun}): "
        f"{_upgrade_error(last.get('error'), of_files=of_files)}; generation "
        f"{snap.get('generation')} serves on, {fix}"
        + (
            f"; an upgrade begun since is under way ({latest.get('state')}): "
            "`fleet-ingress stat` again once it ends"
            if under_way
            else ""
        )
    )


def _upgrade_error(error: object, *, of_files: bool = False) -> str:
    """An upgrade's error on one line. A trial run's is several: what failed, the
    run's last lines (a traceback) and the fix: its first line and the last of
    the run's output (e.g. the SyntaxError), the whole in the journal's
    `upgrade abandoned` line and /stats.json (`upgrade.error`). Quoted whole, a
    traceback spread over the table, and the fix's words ("stat: WORKERS
    MISSING") read as that line to whatever looks for it in stat."""
    if not isinstance(error, str) or not error.strip():
        return "no reason recorded"
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if len(lines) < 3:
        return " ".join(lines)
    said = lines[-2]
    if of_files:
        # `check`'s output: its first problem, not its "check failed: N problem(s)".
        problems = [
            line for line in lines[1:-1] if not line.startswith(("warning: ", "check failed: "))
        ]
        said = problems[0] if problems else said
    return (
        f"{lines[0].rstrip(':')}: {said} (the whole error: the journal's `upgrade "
        "abandoned` line, /stats.json's upgrade.error)"
    )


def certificate_chain_doubted(snap: dict[str, Any]) -> str | None:
    """One line while the certificate served, as tls.cert holds it, has a chain
    carriers may fail to verify (a start with none to keep serves it, warning)."""
    if not (problem := snap.get("certificate_served_chain")):
        return None
    return (
        f"CARRIERS MAY FAIL TO VERIFY THE CERTIFICATE SERVED: {problem}: fix the file "
        "(`fleet-ingress check` says how), then `systemctl reload fleet-ingress`"
    )


# How an edit a reload would refuse is said (service.files_on_disk), and told apart.
WOULD_BE_REFUSED = "would be refused"


def edits_not_applied(snap: dict[str, Any]) -> str | None:
    """One line while ingress.toml or the fleets file on disk differs from
    what runs (a supervisor's snapshot); None otherwise."""
    edits = snap.get("edits_not_applied")
    if not edits:
        return None
    refused = any(WOULD_BE_REFUSED in edit for edit in edits)
    return f"EDITED, NOT RELOADED: {'; '.join(edits)}: " + (
        "fix it, then `systemctl reload fleet-ingress`"
        if refused
        else "`systemctl reload fleet-ingress` applies it"
    )


def _day(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def workers_missing(snap: dict[str, Any]) -> str | None:
    """One line while the generation serving has fewer workers than it should
    (a supervisor's snapshot, not stopping); None otherwise."""
    serving, wanted = snap.get("workers_serving"), snap.get("workers_wanted")
    if serving is None or wanted is None or serving >= wanted or snap.get("state") == "draining":
        return None
    line = f"WORKERS MISSING: {serving} of {wanted} serving"
    if stuck := snap.get("workers_unresponsive"):
        # Running, but not serving: it answers no report request.
        hang = snap.get("worker_hang_timeout")
        pids = ", ".join(str(pid) for pid in stuck)
        line += (
            f"; {len(stuck)} running but unresponsive (pid {pids}): answering no report "
            "request, its calls likely frozen; "
            + (
                f"killed and replaced once silent {hang:g}s (process.worker_hang_timeout)"
                if hang
                else "never killed (process.worker_hang_timeout = 0): `kill -9` it to have "
                "it replaced"
            )
        )
        if serving + len(stuck) >= wanted:
            return line
    if error := snap.get("worker_start_error"):
        line += (
            f"; a worker cannot be started: {error} (the service's LimitNOFILE, memory, "
            "tasks); tried again"
        )
    elif snap.get("workers_dying_at_start", 0) >= 2:
        running = f" (code {snap['code']})" if snap.get("code") else ""
        line += (
            "; replacements die soon after they start: a worker runs the code installed "
            "now (the worker's error is in the journal); if that install is broken (one an "
            f"upgrade refused?), reinstall the release the supervisor runs{running} or fix it"
        )
    else:
        line += "; a replacement is being started"
    return line


def workers_replaced(snap: dict[str, Any]) -> str | None:
    """One line while any worker was replaced since the start (killed, crashed,
    hung), or calls were lost with a worker that died, with those calls; None
    when neither. A worker of an upgrade's old generation that dies while it
    drains is not replaced (its generation is leaving) but its calls are lost
    all the same: before, with no other worker replaced, stat and the page said
    nothing of them while FleetIngressWorkerDied fired on the same count."""
    restarts = snap.get("worker_restarts") or {}
    lost = snap.get("worker_calls_lost", 0)
    if not any(restarts.values()) and not lost:
        return None
    calls = "1 call" if lost == 1 else f"{lost} calls"
    if not any(restarts.values()):
        return (
            f"{calls} lost with workers that died since start (none replaced: of a "
            "generation not serving, e.g. an upgrade's old one as it drained)"
        )
    why = ", ".join(f"{reason} {n}" for reason, n in sorted(restarts.items()) if n)
    line = f"workers replaced since start: {why}; {calls} lost with workers that died"
    if restarts.get("oom"):
        line += (
            "; oom: killed by the kernel's OOM killer, the service's memory limit "
            "(MemoryMax=) or the host's ran out: raise it, or carry fewer calls here "
            "(limits.max_connections, maxconn); `journalctl -k | grep -i oom`"
        )
    return line


def oom_count_broad(snap: dict[str, Any]) -> str | None:
    """One line where the supervisor reads the OOM kills from a count that
    takes in other processes' (the whole host's, a group above the service's):
    a SIGKILL death then is only *possibly* the OOM killer's; None where the
    count is the service's own."""
    covers = snap.get("oom_kills_broad")
    if not covers:
        return None
    return (
        f"OOM kills read from {covers}: a worker's SIGKILL death within 30 s of any OOM "
        "kill there reads 'possibly the OOM killer' (restarts oom), an operator's kill -9 "
        "too; run the service in a memory cgroup of its own (the shipped unit) to tell them apart"
    )


def fd_store_short(snap: dict[str, Any]) -> str | None:
    """One line once systemd's fd store is full (FileDescriptorStoreMax=), or
    would not keep a descriptor of this supervisor's; None before, or without
    systemd."""
    store = snap.get("fd_store") or {}
    kept, limit = store.get("kept"), store.get("max")
    # Not kept and still wanted there (an image before "unkept": all it refused).
    unkept = store.get("unkept", store.get("not_kept")) or 0
    if limit == 0 or (not unkept and (limit is None or kept is None or kept < limit)):
        return None  # (FileDescriptorStoreMax=0: the operator's choice to keep nothing)
    lost = f", {unkept} not kept" if unkept else ""
    return (
        f"systemd's fd store is full ({kept} of FileDescriptorStoreMax={limit} kept{lost}): "
        "should the supervisor die, the calls of a worker whose channel is not kept end with "
        "it; raise FileDescriptorStoreMax= (systemctl edit), then systemctl reload: what "
        "was not kept is stored again"
    )


def supervisor_oom_killed(snap: dict[str, Any]) -> str | None:
    """One line once the OOM killer took a supervisor of this host (carried
    from each supervisor to the next); None before. "possibly", as the
    journal said it, for the deaths told by a count that takes in other
    processes' kills (`supervisor_oom_kills_possibly`)."""
    killed = snap.get("supervisor_oom_kills") or 0
    if not killed:
        return None
    possibly = min(snap.get("supervisor_oom_kills_possibly") or 0, killed)
    times = "once" if killed == 1 else f"{killed} times"
    took_up = "(started again by systemd, it took up the workers and their calls)"
    fix = (
        "the service's memory limit (MemoryMax=) or the host's ran out; raise it, or carry "
        "fewer calls here"
    )
    broad = (
        "an OOM kill was counted, a second before it died, where other processes' are "
        "counted too; `journalctl -k | grep -i 'killed process'` names the pid killed"
    )
    if possibly == killed:
        return (
            f"the supervisor died, possibly by the kernel's OOM killer, {times} {took_up}: "
            f"{broad}; if so, {fix}"
        )
    line = f"the supervisor was killed by the kernel's OOM killer {times} {took_up}"
    if possibly:
        line += f" ({possibly} of them possibly: {broad})"
    return f"{line}: {fix}"


def workers_oom_killed_not_replaced(snap: dict[str, Any]) -> str | None:
    """One line once the OOM killer took a worker that was not replaced (an
    upgrade's old generation draining, its new one starting, or one of a
    supervisor stopping: not in `worker_restarts`); None before. An upgrade
    runs two generations side by side: the likeliest moment for a limit."""
    restarts = snap.get("worker_restarts") or {}
    killed = (snap.get("worker_oom_kills") or 0) - (restarts.get("oom") or 0)
    if killed <= 0:
        return None
    workers = "1 worker" if killed == 1 else f"{killed} workers"
    return (
        f"{workers} killed by the kernel's OOM killer and not replaced (of an upgrade's "
        "old generation draining or new one starting, or while stopping: two generations "
        "side by side take about twice the memory): the service's memory limit "
        "(MemoryMax=) or the host's ran out; raise it, or carry fewer calls here; "
        "`journalctl -k | grep -i oom`"
    )
