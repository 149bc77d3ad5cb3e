"""`fleet-ingress check`'s look-up of the fleets' addresses, to name two fleets
that are one host under two names (localhost and 127.0.0.1). Bounded in time
(LOOKUP_BUDGET): check runs before every reload (the unit's ExecReload), and a
resolver that never answers must not hold it. Neither start nor reload looks
anything up: a fleet's name is resolved when it is connected to."""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from fleet_ingress.core.addresses import format_hostport, ip_literal_version, same_host_key
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.core.same_host import Address, shared_addresses

# What check waits for all its lookups together; a lookup still under way then is
# left to its thread (a daemon: it holds no exit).
LOOKUP_BUDGET = 2.0
LOOKUP_THREADS = 16

Resolve = Callable[[str, int], Iterable[Address]]


def resolve(host: str, port: int) -> frozenset[Address]:
    """The addresses the ingress would connect to for `host`."""
    return addresses_of(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))


def addresses_of(infos: Iterable[tuple[Any, ...]]) -> frozenset[Address]:
    """getaddrinfo's answers (sync or the loop's) as fleets compare them."""
    return frozenset(address_of(info[4]) for info in infos)


def address_of(sockaddr: tuple[Any, ...]) -> Address:
    """A getaddrinfo answer's socket address as fleets compare them."""
    ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0]).compressed
    return (ip, int(sockaddr[1]), int(sockaddr[3]) if len(sockaddr) == 4 else 0)


def look_up(
    targets: list[tuple[str, int]],
    budget: float,
    lookup: Resolve | None = None,
    failures: dict[tuple[str, int], str] | None = None,
) -> dict[tuple[str, int], frozenset[Address] | None]:
    """Each target's addresses (None: its lookup failed, and why in
    `failures` when given); a target not answered within `budget` seconds
    is left out."""
    lookup = lookup or resolve
    answers: dict[tuple[str, int], frozenset[Address] | None] = {}
    if not targets:
        return answers
    lock = threading.Lock()
    done = threading.Event()
    pending: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
    for target in targets:
        pending.put(target)

    def work() -> None:
        while True:
            try:
                target = pending.get_nowait()
            except queue.Empty:
                return
            why = ""
            try:
                got: frozenset[Address] | None = frozenset(lookup(*target))
            except (OSError, UnicodeError, ValueError) as exc:
                got = None
                why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            with lock:
                answers[target] = got
                if got is None and failures is not None:
                    failures[target] = why
                if len(answers) == len(targets):
                    done.set()

    for _ in range(min(LOOKUP_THREADS, len(targets))):
        threading.Thread(target=work, name="check-lookup", daemon=True).start()
    done.wait(budget)
    with lock:
        return dict(answers)


def shared_address_warnings(
    fleets: list[FleetSpec], *, budget: float = LOOKUP_BUDGET, lookup: Resolve | None = None
) -> list[str]:
    """Fleets that reach one address though written differently, found by
    looking their names up; pairs of literals are said without a lookup
    (fleets_file.same_host_warnings), not here again."""
    names = [(spec.host, spec.port) for spec in fleets if not _literal(spec)]
    failures: dict[tuple[str, int], str] = {}
    answers = look_up(list(dict.fromkeys(names)), budget, lookup, failures)
    addresses: dict[str, frozenset[Address]] = {}
    for spec in fleets:
        if (literal := literal_addresses(spec)) is not None:
            addresses[spec.name] = literal
        elif got := answers.get((spec.host, spec.port)):
            addresses[spec.name] = got
    warnings = shared_warnings(fleets, addresses)
    # A name the resolver refuses (NXDOMAIN, a typo): check said OK, and the
    # fleet then never came UP, `check --probe` and stat alone saying why (the
    # operator-input audit of session 38). A warning: a resolver down for a
    # moment must not refuse the unit's reload.
    for spec in fleets:
        if (why := failures.get((spec.host, spec.port))) is not None:
            warnings.append(
                f"fleet {spec.name!r} ({spec.url}): its name {spec.host} does not resolve "
                f"({why}): the ingress cannot connect to it, so it stays DOWN and gets no "
                "call; check the name, its DNS record and this host's resolver, or give "
                "the fleet's address"
            )
    unanswered = sorted(
        {spec.name for spec in fleets if (spec.host, spec.port) in names}
        - {spec.name for spec in fleets if (spec.host, spec.port) in answers}
    )
    if unanswered:
        warnings.append(
            f"fleet(s) {', '.join(unanswered)}: no answer from the resolver within "
            f"{budget:g} s, so not compared with the others' addresses (is DNS slow "
            "or down? the ingress resolves a fleet's name each time it connects)"
        )
    return warnings


def literal_addresses(spec: FleetSpec) -> frozenset[Address] | None:
    """The address of a fleet given as an IP literal (in any spelling), which
    needs no lookup; None for a name (or a zoned literal: its interface's index)."""
    if not _literal(spec):
        return None
    return frozenset({(same_host_key(spec.host), spec.port, 0)})


def shared_warnings(
    fleets: list[FleetSpec], addresses: dict[str, frozenset[Address]], *, about: str | None = None
) -> list[str]:
    """A warning for each pair of `fleets` that share an address (`addresses`,
    by fleet name), `about` one of the pair when given; a pair of literals is
    the fleets file's to say (same_host_warnings)."""
    by_name = {spec.name: spec for spec in fleets}
    warnings = []
    for first, second, (ip, port, scope) in shared_addresses(addresses):
        a, b = by_name[first], by_name[second]
        if (_literal(a) and _literal(b)) or (about is not None and about not in (first, second)):
            continue
        where = format_hostport(ip + (f"%{scope}" if scope else ""), port)
        warnings.append(
            f"fleets {a.name!r} ({a.url}) and {b.name!r} ({b.url}) resolve to one "
            f"address, {where}: if they are one host, it gets two maxconn budgets "
            f"({a.maxconn} + {b.maxconn} calls where it holds {max(a.maxconn, b.maxconn)}: "
            "the rest answered 429) and two probes: list it once; if they are distinct "
            "hosts behind one address (routed by TLS SNI), nothing is wrong"
        )
    return warnings


def _literal(spec: FleetSpec) -> bool:
    """An address needing no lookup (0x7f.0.0.1 too); a zoned one needs its interface's."""
    return ip_literal_version(same_host_key(spec.host)) is not None
