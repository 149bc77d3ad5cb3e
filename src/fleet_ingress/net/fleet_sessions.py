"""A TLS session kept per fleet and offered to its next connections (resumption).

HAProxy resumes its servers' sessions by default; so does this, towards TLS
fleets: each fleet keeps the newest session with a ticket that a handshake to
it (full or resumed) left, taken at a call's link, and offers it to the
fleet's next connections. A fleet that declines (its ticket keys rotated, a
restart, resumption off) gets a full handshake, its certificate checked as
always; the health probes' own connections never offer one (aiohttp's, a full
handshake each time), so a fleet whose certificate goes bad is still found.

The session is OpenSSL's own SSL_SESSION, taken with SSL_get1_session and
offered with SSL_set_session on the SSL (`tls_socket.session_calls`): both
take references, nothing is copied. CPython's `SSLSocket.session` copies the
session through DER at each get and set, its certificate parsed again (1.6 M
instructions a call, bench/README, Session 38), and each connection then held
a certificate of its own (191d77b's +7 KiB per held call).

A session rests on the certificate check of the full handshake it came from,
and a resumed handshake checks nothing; yet each resumed handshake's new
ticket starts a new lifetime, so a fleet taking calls all the time never had
its certificate checked again on calls' connections (session 39 measured
fleets with a 2 s session lifetime resumed for 5.6 s on end, 14 calls; one
that put on another CA's certificate, or whose certificate expired, took
every call on resumed sessions, as long as calls came). So a session is
offered for at most CHECKED_WITHIN after that check, as long as the health
probes' connection lives (net/poller.py: RECONNECT_EVERY), and never past
the certificate's notAfter: a fleet that a new handshake would refuse gets
no new call on a kept session after at most that long (its probes take it
DOWN about as soon: RECONNECT_EVERY, then `fall` probes).

Kept on the fleet's own record (`FleetState.tls_session`, opaque to core):
gone with it when the fleet leaves the set. Dropped when the fleet's address
or SNI is no longer the session's, when the fleet context (fleets.verify,
fleets.ca_file: a new one at each reload) is not the one it was made under,
when its lifetime has ended, and when a connection it was offered to fails.
Where OpenSSL's SSL cannot be reached nothing is kept (full handshakes).

A fleet meant to decline a session fails the handshake instead, at times (an
alert: OpenSSL's "session id context uninitialized" when it asks for client
certificates with no session context; a close: a middlebox that drops a
ClientHello with a pre_shared_key): the call's connection is made again at
once without the session (`connect_again`; net/proxy.py), within the same
connect timer: no failed attempt (the call's retries are not used), and
nothing held against the fleet's health once the refusal is proven. Until
then the connection that failed is what it looks like, a failed connection
to the fleet, counted for passive health as any refused connection is
(`OfferedConnectionFailed`, since session 42: before, a connection made
again was free, and a fleet dropping a share p of its connections was seen
failing p x p of its calls' connections). A
close or a reset cannot be told from a fleet gone bad, so a refusal is proven
once a session (`KeptSession.proof`): the first call whose connection offered
it failed makes the connection again, and the calls offered it together wait
for that one: through, each is made again; failed too, each fails as any
connection that fails (one connection each, its attempt counted against
`retries` and passive health). Before (review39), each made a second
connection, not counted: 10 calls at once to a fleet closing every
connection, 15 to 20 connections. A fleet that refuses a session most
often fails every resumption (a setting of its server), so it is kept no
session for REFUSED_FOR after (`Refusing` on its record), under the fleet
context and address it refused under: a reload (a new fleet context each
time) or a new address ends it, as the operator's fix may be either. Kept
one at once, every call to it was offered the full handshake's new session,
refused, and made again (10 calls, 20 connections and 10 journal lines,
review39a). What proves a refusal (`_through`): an alert to the session
offered, a full handshake then through. A close or a reset before the
handshake finished, then a full handshake through, is also what a fleet
that closes or resets some of its connections does (a flaky fleet; before,
its first such reset of a connection offered a session made its calls full
handshakes for REFUSED_FOR): the fleet is `Suspected`, the next full
handshake's session kept `suspect`, and a close or reset of that one too,
none resumed in between, is a refusal (a middlebox that drops every
ClientHello offering a session: two calls made again, then `Refusing`). An
OpenSSL server under Python's asyncio or uvloop closes without sending its
alert ("session id context uninitialized" reaches the ingress as
SSLEOFError): a close, proven so too.

A connection that resumed the session and then fails before its 101 (closed,
reset, no head in time, garbage, a 5xx) drops it too (`failed`, from
net/proxy.py): its next call makes a full handshake (before, the session was
offered until CHECKED_WITHIN, each call failing the same way).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable

from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.logs import fields
from fleet_ingress.net.tls_socket import SessionRefused, TLSConnection, session_calls

log = logging.getLogger("fleet_ingress.proxy")

# What `resumed` tells of a handshake (the kinds Registry.fleet_tls_handshakes counts).
FLEET_HANDSHAKE_KINDS = ("full", "resumed")

# Seconds (monotonic) a session is offered after the full handshake whose
# certificate check it rests on: one full handshake a fleet a minute in each
# worker (about 3.5 M instructions, bench/README Session 38), the probes' pace.
CHECKED_WITHIN = 60.0

# Seconds (monotonic) a fleet that refused a session is kept none after: its
# calls' handshakes full, one connection each; then a session is kept again
# (a fleet whose server was set right resumes; one that refuses again is said
# again, once).
REFUSED_FOR = 600.0


class KeptSession:
    """One reference to an SSL_SESSION, freed with this object."""

    __slots__ = (
        "__weakref__",
        "address",
        "checked_at",
        "context",
        "expires",
        "not_after",
        "pointer",
        "proof",
        "suspect",
    )

    def __init__(
        self,
        pointer: int,
        address: tuple[str, int, str | None],
        context: ssl.SSLContext,
        *,
        checked_at: float,
        not_after: float | None,
        suspect: bool = False,
    ) -> None:
        calls = session_calls()
        assert calls is not None
        self.pointer = pointer
        self.address = address  # host, port, SNI
        self.context = weakref.ref(context)
        # Its lifetime: the client's own timeout (OpenSSL's 7,200 s under
        # CPython), or the ticket's lifetime hint if the fleet gave a shorter one.
        lifetime = calls.get_timeout(pointer)
        if (hint := calls.lifetime_hint(pointer)) > 0:
            lifetime = min(lifetime, hint)
        self.expires = calls.get_time(pointer) + lifetime
        # The full handshake's certificate check (monotonic), and the
        # certificate's notAfter (wall clock; None: not checked, fleets.verify off).
        self.checked_at = checked_at
        self.not_after = not_after
        # Whether a fleet that failed a connection offered this session
        # refuses it (`connect_again`): None until one failed, then what the
        # connection made again without it said (True: through).
        self.proof: asyncio.Future[bool | None] | None = None
        # Kept from a full handshake made after the fleet closed or reset a
        # connection offered its session before (`Suspected`), none resumed
        # since: a fleet that closes or resets one offered this session too
        # refuses sessions (`connect_again`).
        self.suspect = suspect

    def __copy__(self) -> KeptSession:
        return self  # one reference, freed once

    def __deepcopy__(self, memo: object) -> KeptSession:
        return self

    def __del__(self) -> None:
        calls = session_calls()
        if calls is not None and self.pointer:
            calls.free(self.pointer)
            self.pointer = 0


class Refusing:
    """On a fleet's record in place of a session: it refused one (`refused`)
    under the fleet context and at the address (host, port, SNI) of the
    connection that refused it; none is kept for it under those until `until`
    (monotonic)."""

    __slots__ = ("address", "context", "until")

    def __init__(
        self, until: float, context: ssl.SSLContext, address: tuple[str, int, str | None]
    ) -> None:
        self.until = until
        self.context = weakref.ref(context)
        self.address = address

    def holds(self, context: ssl.SSLContext, address: tuple[str, int, str | None]) -> bool:
        """Whether a session of a connection under `context` to `address` is
        kept none now."""
        return (
            time.monotonic() < self.until and self.context() is context and self.address == address
        )


class Suspected:
    """On a fleet's record in place of a session: a connection offered its
    session was closed or reset before its handshake finished, and the one
    made again without it got through (`connect_again`), under the fleet
    context and at the address of that connection. That is what a fleet (or a
    middlebox before it) that drops a ClientHello offering a session does, and
    what a fleet that closes or resets some connections, whatever they offer,
    does too: the session that the next full handshake leaves is kept
    `suspect` (`keep`), and the fleet refuses sessions only if it closes or
    resets one offered that one too, none resumed in between."""

    __slots__ = ("address", "context")

    def __init__(self, context: ssl.SSLContext, address: tuple[str, int, str | None]) -> None:
        self.context = weakref.ref(context)
        self.address = address


def _suspected(kept: object, context: ssl.SSLContext, address: tuple[str, int, str | None]) -> bool:
    """Whether the fleet's record `kept` says a full handshake's session kept
    now, under `context` to `address`, is to be `suspect`."""
    if isinstance(kept, KeptSession) and not kept.suspect:
        return False
    return (
        isinstance(kept, Suspected | KeptSession)
        and kept.context() is context
        and kept.address == address
    )


def _address(spec: FleetSpec) -> tuple[str, int, str | None]:
    return (spec.host, spec.port, spec.tls_name)


def offer(
    fleet: FleetState, context: ssl.SSLContext, spec: FleetSpec | None = None
) -> KeptSession | None:
    """The fleet's kept session, if it is still good for a connection to it
    (as `spec` says, by default the fleet's own) under `context` now (one
    that is not is dropped)."""
    kept = fleet.tls_session
    if not isinstance(kept, KeptSession):
        return None  # none, Refusing or Suspected
    now = time.time()
    if (
        kept.context() is not context
        or kept.address != _address(fleet.spec if spec is None else spec)
        or kept.expires <= now
        or time.monotonic() - kept.checked_at >= CHECKED_WITHIN
        or (kept.not_after is not None and kept.not_after <= now)
    ):
        fleet.tls_session = None
        return None
    return kept


def keep(
    fleet: FleetState, spec: FleetSpec, conn: TLSConnection, resumed: KeptSession | None
) -> None:
    """The session of `conn` (a connection to the fleet as `spec` said, under
    its own context; handshake done) kept as the fleet's, if it has a ticket
    and can be resumed. `resumed`: the session its handshake resumed (the
    caller asked `resumed`, once a call), whose certificate check the new one
    rests on; None, a full handshake: its check is now. None kept while the
    fleet is `Refusing` under that context and address. A full handshake's
    session kept while the fleet is `Suspected` (or its session `suspect`)
    there is `suspect`; a resumed one's is not (a resumption went through)."""
    calls = session_calls()
    pointer = conn.ssl_pointer
    if calls is None or pointer is None:
        return
    kept = fleet.tls_session
    context = conn.ssl_object.context
    address = _address(spec)
    if isinstance(kept, Refusing) and kept.holds(context, address):
        return
    if resumed is not None:
        resumed.suspect = False  # a resumption of it went through
    session = calls.get1_session(pointer)
    if not session:
        return
    if (
        isinstance(kept, KeptSession)
        and kept.pointer == session
        and kept.context() is context
        and kept.address == address
    ):
        calls.free(session)  # the one kept already (resumed, no new ticket)
        return
    if not (calls.has_ticket(session) and calls.is_resumable(session)):
        calls.free(session)
        return
    if resumed is None:
        checked_at, not_after = time.monotonic(), _not_after(conn)
    else:
        checked_at, not_after = resumed.checked_at, resumed.not_after
    fleet.tls_session = KeptSession(
        session,
        address,
        context,
        checked_at=checked_at,
        not_after=not_after,
        suspect=resumed is None and _suspected(kept, context, address),
    )


def _not_after(conn: TLSConnection) -> float | None:
    """The notAfter of the certificate a full handshake checked (None when the
    context checks none, fleets.verify off: `getpeercert` says nothing)."""
    try:
        said = conn.ssl_object.getpeercert().get("notAfter")
    except (AttributeError, ValueError, ssl.SSLError):
        return None
    if not isinstance(said, str):
        return None
    try:
        return float(ssl.cert_time_to_seconds(said))
    except ValueError:
        return None


def failed(fleet: FleetState, offered: KeptSession | None) -> None:
    """A connection `offered` the fleet's session failed (or, resumed, its
    attempt did before its 101): not offered again."""
    if offered is not None and fleet.tls_session is offered:
        fleet.tls_session = None


async def connect_again(
    fleet: FleetState,
    spec: FleetSpec,
    offered: KeptSession,
    exc: SessionRefused,
    connect: Callable[[], Awaitable[TLSConnection]],
    failed_connection: Callable[[], None],
) -> tuple[TLSConnection, bool]:
    """After a connection offered the fleet's session `offered` failed its
    handshake on the fleet's side (`exc`): the connection made again without
    it (`connect`), if a full handshake gets through, and whether that
    proved the fleet refuses sessions (`_through`); else `exc`'s own error
    raised, the attempt failed as any connection that fails.

    The connection offered the session is a failed connection to the fleet
    unless its refusal is proven: `failed_connection` is called then (for
    passive health), once, before the connection made again is returned or
    its own error raised. Not for a call that waited for another's proof
    that failed: its own error is raised, one connection, the attempt's;
    nor for one that waited for a proof that got through and got through
    too: the calls offered `offered` together and failed count one failed
    connection, the first's (a middlebox resetting a burst of them).
    Before session 42, a connection made again was free: a fleet that
    drops a share p of its connections was seen failing p x p of them,
    and the refusals counted every connection made again that got through.

    The first such failure of `offered` finds out (its `proof`): its
    connection made again is through, the calls are made again; fails too, a
    fleet failing connections (down, closing, resetting), that one's error
    raised. Calls offered it together that fail the same way wait for that
    answer (within their own connect timers), and so make one connection more
    only if a full handshake gets through; the one finding out gone first (its
    carrier left, its timer ended), the next of them finds out.

    Once through, what each failure was tells whether the fleet refuses
    sessions (`_through`). Raises what `connect` raises.

    A close or reset leaves the fleet `Suspected` at once, not with no
    record: a full handshake's session kept while the proof is under way (a
    call linked meanwhile) is `suspect` then, not taken for a resumption
    (review41); the proof failing too (a fleet failing connections) takes
    that mark back."""
    failed(fleet, offered)
    marked = None
    if fleet.tls_session is None and not _alerted(exc):
        context = offered.context()
        if context is not None:
            marked = fleet.tls_session = Suspected(context, offered.address)
    while (proof := offered.proof) is not None:
        verdict = await asyncio.shield(proof)
        if verdict is None:
            continue  # the one finding out ended first (its call gone): find out here
        if not verdict:
            if marked is not None and fleet.tls_session is marked:
                fleet.tls_session = None
            cause = exc.__cause__
            raise cause if isinstance(cause, OSError) else exc
        try:
            conn = await connect()
        except OSError:
            failed_connection()
            raise
        # Its failure and the one finding out's share a cause, the session
        # offered together, counted once (by that one): a middlebox resetting
        # a burst of calls offered it is not a burst of failed connections
        # (fall 2 took a healthy fleet DOWN before its first 101, review42b).
        return conn, _through(fleet, spec, offered, conn, exc)
    proof = offered.proof = asyncio.get_running_loop().create_future()
    try:
        conn = await connect()
    except OSError:  # ssl.SSLError too
        proof.set_result(False)
        if marked is not None and fleet.tls_session is marked:
            fleet.tls_session = None
        failed_connection()
        raise
    except BaseException:
        offered.proof = None
        proof.set_result(None)
        raise
    proof.set_result(True)
    return conn, _made_again(fleet, spec, offered, conn, exc, failed_connection)


def _made_again(
    fleet: FleetState,
    spec: FleetSpec,
    offered: KeptSession,
    conn: TLSConnection,
    exc: SessionRefused,
    failed_connection: Callable[[], None],
) -> bool:
    """`conn`, made again, got through: whether that proves a refusal of
    `offered` (`_through`); the connection that failed is a failed one
    (`failed_connection`) where it does not."""
    if _through(fleet, spec, offered, conn, exc):
        return True
    failed_connection()
    return False


def _through(
    fleet: FleetState,
    spec: FleetSpec,
    offered: KeptSession,
    conn: TLSConnection,
    exc: SessionRefused,
) -> bool:
    """A connection offered `offered` failed (`exc`) and `conn`, made again
    without it, got through: True where that proves a refusal. An alert (the
    fleet's TLS said no to the session, a full handshake yes) proves a
    refusal (`refused`). A close or a
    reset before the handshake finished does not: a fleet that closes or
    resets some connections, whatever they offer, does that too, and its
    calls would make full handshakes for REFUSED_FOR for nothing (a flaky
    fleet's first reset, session 40). The fleet is `Suspected` then, and
    refuses sessions once it closes or resets a connection offered a
    `suspect` session too (the next full handshake's, none resumed since):
    a middlebox that drops every ClientHello offering a session, two calls
    made again, then full handshakes."""
    context, address = conn.ssl_object.context, _address(spec)
    kept = fleet.tls_session
    # A session kept since that is not `suspect`: a call resumed one meanwhile.
    resumed_since = isinstance(kept, KeptSession) and not kept.suspect
    if _alerted(exc) or (offered.suspect and not resumed_since):
        refused(fleet, spec, conn, exc)
        return True
    if not isinstance(kept, KeptSession) and not (
        isinstance(kept, Refusing) and kept.holds(context, address)
    ):
        fleet.tls_session = Suspected(context, address)
    return False


def _alerted(exc: SessionRefused) -> bool:
    """Whether the fleet failed the handshake with a TLS alert, not by
    closing (SSLEOFError; a close_notify, SSLZeroReturnError) or resetting
    (ConnectionResetError) the connection: `tls_socket.connect` raises
    SessionRefused for the peer's alerts, closes and resets alone."""
    cause = exc.__cause__
    return isinstance(cause, ssl.SSLError) and not isinstance(
        cause, ssl.SSLEOFError | ssl.SSLZeroReturnError
    )


def refused(fleet: FleetState, spec: FleetSpec, conn: TLSConnection, exc: SessionRefused) -> None:
    """The fleet refused a session (`connect_again`; `conn`: the connection
    made again without it, through): none kept for REFUSED_FOR under that
    connection's context and address; said once then (the calls offered it
    together were each refused), the fleet's name and its answer (each
    worker's own)."""
    context, address = conn.ssl_object.context, _address(spec)
    if isinstance(kept := fleet.tls_session, Refusing) and kept.holds(context, address):
        return
    fleet.tls_session = Refusing(time.monotonic() + REFUSED_FOR, context, address)
    log.info(
        "fleet refused the TLS session offered: connected again without it;"
        " its calls make full handshakes for a while",
        extra=fields(
            fleet=fleet.name, error=str(exc.__cause__ or exc), full_handshakes_for_s=REFUSED_FOR
        ),
    )


def resumed(conn: TLSConnection, offered: KeptSession | None = None) -> bool:
    """Whether the connection's handshake resumed a session. `offered`, the
    session it was offered: resumed, it is `suspect` no more, from now (its
    handshake, not its call's link: a call offered it together and reset,
    made again and through while this one waits for its fleet's 101, is then
    no refusal; cleared at the link only, it was, review41)."""
    calls = session_calls()
    pointer = conn.ssl_pointer
    through = calls is not None and pointer is not None and bool(calls.session_reused(pointer))
    if through and offered is not None:
        offered.suspect = False
    return through
