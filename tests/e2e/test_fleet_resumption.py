"""TLS session resumption towards the fleets (net/fleet_sessions.py): real TLS
(trustme), real websockets fleets and carriers on loopback; what the fleet's
server side says of each handshake (`SSLObject.session_reused`)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import gc
import logging
import os
import socket
import ssl
import struct
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import generate_latest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import InvalidStatus

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.config.settings import config_from_dict
from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.health import Health
from fleet_ingress.net import fleet_sessions, tls_socket
from fleet_ingress.service.ingress import Ingress
from fleet_ingress.sim.fleet import SimulatedFleet
from tests.support import (
    LIBSSL,
    StartIngress,
    TLSFiles,
    WsFleet,
    access_entries,
    echo,
    eventually,
    metric_samples,
    ssl_ctx_pointer,
    tls12_server_context,
    wss_url,
)

# SSL_CTX_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, 80, keys) (openssl/ssl.h)
_SET_TICKET_KEYS = 59


class ResumptionFleet(WsFleet):
    """A websockets fleet that says, for each connection, whether its
    handshake resumed a session."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        super().__init__(ssl_context)
        self.reused: list[bool] = []

    def _record(self, connection: ServerConnection, request: Any) -> None:
        super()._record(connection, request)
        self.reused.append(connection.transport.get_extra_info("ssl_object").session_reused)


def rotate_ticket_keys(ctx: ssl.SSLContext) -> None:
    keys = ctypes.create_string_buffer(os.urandom(80), 80)
    assert LIBSSL.SSL_CTX_ctrl(ssl_ctx_pointer(ctx), _SET_TICKET_KEYS, 80, keys) == 1


async def one_call(ingress: Ingress, tls_files: TLSFiles, path: str = "/ws/bot-1") -> None:
    async with ws_connect(wss_url(ingress, path), ssl=tls_files.client_context()) as ws:
        await echo(ws)


def kept_of(ingress: Ingress, name: str = "a") -> fleet_sessions.KeptSession | None:
    (fleet,) = [f for f in ingress.balancer.fleets if f.name == name]
    kept = fleet.tls_session
    # None, a KeptSession, or a fleet_sessions.Refusing (none kept for a while).
    return kept if isinstance(kept, fleet_sessions.KeptSession) else None


async def with_a_session(
    start_ingress: StartIngress, tls_files: TLSFiles, line: str, **settings: Any
) -> Ingress:
    """An ingress in front of the fleet of `line` (`settings` its own), with
    that fleet's session kept: one call made."""
    ingress = await start_ingress([line], **settings)
    await one_call(ingress, tls_files)
    assert kept_of(ingress) is not None
    return ingress


@pytest.fixture
async def fleet(tls_files: TLSFiles):  # type: ignore[no-untyped-def]
    f = await ResumptionFleet(tls_files.fleet_server_context()).start()
    yield f
    await f.stop()


def test_the_openssl_session_calls_are_reached() -> None:
    """What fleet_sessions relies on: libssl's session calls found through
    CPython's _ssl, and the SSL under an SSLSocket (`_openssl_ssl`, pinned in
    test_tls_socket); without them nothing is kept (full handshakes)."""
    assert tls_socket.session_calls() is not None


async def test_the_second_call_to_a_fleet_resumes_its_session(
    start_ingress: StartIngress, tls_files: TLSFiles, fleet: ResumptionFleet
) -> None:
    ingress = await start_ingress([fleet.line("a")])
    for i in range(3):
        await one_call(ingress, tls_files, f"/ws/bot-{i}")
    assert fleet.reused == [False, True, True]
    assert kept_of(ingress) is not None


async def test_a_fleet_that_rotates_its_ticket_keys_gets_a_full_handshake(
    start_ingress: StartIngress, tls_files: TLSFiles, fleet: ResumptionFleet
) -> None:
    ingress = await start_ingress([fleet.line("a")])
    await one_call(ingress, tls_files)
    await one_call(ingress, tls_files)
    assert fleet.ssl_context is not None
    rotate_ticket_keys(fleet.ssl_context)  # the ticket kept can no longer be opened
    await one_call(ingress, tls_files)  # declined: a full handshake, the call served
    await one_call(ingress, tls_files)  # the new ticket, from that handshake
    assert fleet.reused == [False, True, False, True]


async def test_a_fleet_that_gives_no_tickets_gets_full_handshakes(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    ctx = tls_files.fleet_server_context()
    ctx.num_tickets = 0
    fleet = await ResumptionFleet(ctx).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        for _ in range(3):
            await one_call(ingress, tls_files)
        assert fleet.reused == [False, False, False]
        assert kept_of(ingress) is None
    finally:
        await fleet.stop()


async def test_no_session_is_offered_where_the_ssl_cannot_be_reached(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tls_socket, "_openssl_ssl", lambda sock: None)
    ingress = await start_ingress([fleet.line("a")])
    for _ in range(2):
        await one_call(ingress, tls_files)
    assert fleet.reused == [False, False]
    assert kept_of(ingress) is None


async def test_a_reload_that_changes_the_fleet_ca_drops_the_session(
    start_ingress: StartIngress, tls_files: TLSFiles, fleet: ResumptionFleet, tmp_path: Path
) -> None:
    ingress = await start_ingress([fleet.line("a")])
    await one_call(ingress, tls_files)
    await one_call(ingress, tls_files)
    assert fleet.reused == [False, True]
    # The same CA and one more: the fleet is still trusted, under a new context.
    ca_file = tmp_path / "cas.pem"
    ca_file.write_bytes(tls_files.ca_pem.read_bytes() + _another_ca_pem())
    await _reload(ingress, tls_files, tmp_path, fleet.line("a"), ca_file)
    await one_call(ingress, tls_files)
    await one_call(ingress, tls_files)
    assert fleet.reused == [False, True, False, True]


async def _reload(
    ingress: Ingress, tls_files: TLSFiles, tmp_path: Path, line: str, ca_file: Path | None = None
) -> None:
    """The ingress reloaded with `line` its fleets and `ca_file` its fleets'
    CA file (by default the test CA)."""
    data = ingress.config
    fleets_file = tmp_path / "fleets.txt"
    fleets_file.write_text(line + "\n")
    config = config_from_dict(
        {
            "listen": {"wss": "127.0.0.1:0", "acme": "", "stats": "", "admin_socket": ""},
            "tls": {
                "cert": str(data.tls.cert),
                "key": str(data.tls.key),
                "ca_file": str(tls_files.ca_pem),
            },
            "fleets": {"ca_file": str(ca_file or tls_files.ca_pem), "file": str(fleets_file)},
            "log": {"access": True},
        }
    )
    config_path = tmp_path / "ingress.toml"
    config_path.write_text("")  # not read: the configuration is given
    await ingress.reload(config_path, config=config)


def _another_ca_pem() -> bytes:
    import trustme

    return trustme.CA().cert_pem.bytes()


async def test_a_removed_fleet_holds_no_session(
    start_ingress: StartIngress, tls_files: TLSFiles, fleet: ResumptionFleet
) -> None:
    other = await ResumptionFleet(tls_files.fleet_server_context()).start()
    try:
        ingress = await start_ingress([fleet.line("a"), other.line("b")])
        for i in range(6):  # round robin: both fleets, each resumed
            await one_call(ingress, tls_files, f"/ws/bot-{i}")
        assert True in fleet.reused and True in other.reused
        kept = kept_of(ingress, "b")
        assert kept is not None
        gone = weakref.ref(kept)
        del kept
        ingress.apply_fleets(
            [s for s in (f.spec for f in ingress.balancer.fleets) if s.name == "a"], ingress.config
        )
        for _ in range(50):
            gc.collect()
            if gone() is None:
                break
            await asyncio.sleep(0.05)
        assert gone() is None
    finally:
        await other.stop()


class ProbedFleet(SimulatedFleet):
    """A simulated fleet that says, for each health probe and each call,
    whether its connection's handshake resumed a session; it closes each
    probe's connection, so that every probe makes a new one."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.probe_reused: list[bool] = []
        self.call_reused: list[bool] = []

    async def _health(self, request: web.Request) -> web.Response:
        self.probe_reused.append(request.transport.get_extra_info("ssl_object").session_reused)
        response = await super()._health(request)
        response.force_close()
        return response

    async def _call(self, request: web.Request) -> web.StreamResponse:
        self.call_reused.append(request.transport.get_extra_info("ssl_object").session_reused)
        return await super()._call(request)


async def test_health_probes_make_full_handshakes_while_calls_resume(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """A fleet whose certificate goes bad is found by the probes: their
    connections never offer the calls' session (the certificate checked each
    time), whatever the calls do."""
    fleet = ProbedFleet(name="a", capacity=16, ssl_context=tls_files.fleet_server_context())
    async with fleet:
        ingress = await start_ingress(
            [f"{fleet.url} name=a"],
            health_checks=True,
            fleets={"check_interval": 0.1, "check_timeout": 1.0, "fall": 3, "rise": 1},
        )
        assert ingress.poller is not None
        assert await ingress.poller.wait_first_probes(timeout=5)
        for i in range(3):
            await one_call(ingress, tls_files, f"/ws/bot-{i}")
        probes = len(fleet.probe_reused)
        await eventually(lambda: len(fleet.probe_reused) >= probes + 3)
    assert fleet.call_reused == [False, True, True]
    assert len(fleet.probe_reused) >= 4 and not any(fleet.probe_reused)


# On uvloop alone (the loop `run` uses): the sessions' references are the
# ssl module's, whatever loop drives the sockets; on asyncio's loop it took
# 11.8 s of the main phase (uvloop's: 5.5 s) on a loaded host.
@pytest.mark.uvloop_only
async def test_resumed_connections_keep_no_memory_per_connection(tls_files: TLSFiles) -> None:
    """The session kept and offered (SSL_get1_session, SSL_set_session,
    SSL_SESSION_free) is balanced: 2,000 resumed connections, each keeping
    its newest session as a call's link does, grow the process by far less
    than one session (~1 KiB and up) a connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x")  # after the tickets
        await writer.drain()
        with contextlib.suppress(OSError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls_files.fleet_server_context())
    port = server.sockets[0].getsockname()[1]
    spec = parse_fleets_text(f"https://127.0.0.1:{port} name=a", default_maxconn=10)[0]
    fleet = FleetState(spec)
    ctx = tls_files.client_context()
    reused = 0

    async def one() -> None:
        nonlocal reused
        offered = fleet_sessions.offer(fleet, ctx)
        conn = await tls_socket.connect(
            "127.0.0.1",
            port,
            ctx,
            server_hostname="127.0.0.1",
            timeout=10,
            kept_session=offered,
        )
        got = asyncio.get_running_loop().create_future()

        class Handler:
            def data_received(self, data: memoryview) -> None:
                if not got.done():
                    got.set_result(bytes(data))

            def eof_received(self) -> bool:
                return False

            def connection_lost(self, exc: BaseException | None) -> None:
                if not got.done():
                    got.set_exception(exc or ConnectionError())

            def pause_writing(self) -> None: ...
            def resume_writing(self) -> None: ...

        conn.start(Handler())  # type: ignore[arg-type]
        assert await got == b"x"
        resumed = fleet_sessions.resumed(conn)
        reused += resumed
        fleet_sessions.keep(fleet, spec, conn, offered if resumed else None)
        conn.close()

    try:
        async with asyncio.timeout(120):
            for _ in range(300):
                await one()
            gc.collect()
            before = _rss_kib()
            for _ in range(2000):
                await one()
            gc.collect()
            grown = _rss_kib() - before
    finally:
        server.close()
    print(f"RSS grown {grown} KiB over 2,000 resumed connections; {reused} resumed")
    assert reused >= 2250, reused
    assert grown < 600, f"{grown} KiB over 2,000 connections"


class _FirstByte:
    """A TLSHandler that takes the peer's first bytes (`got`)."""

    def __init__(self) -> None:
        self.got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: memoryview) -> None:
        if not self.got.done():
            self.got.set_result(bytes(data))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.got.done():
            self.got.set_exception(exc or ConnectionError())

    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


async def test_a_session_offered_is_held_by_the_connect_until_set_on_its_ssl(
    tls_files: TLSFiles,
) -> None:
    """HeldSession: `tls_socket.connect` holds the owner of the session it
    offers (a KeptSession) until the session is set on the connection's SSL
    (SSL_set_session takes a reference of its own). The fleet's record
    letting go of it during the TCP connect (a failed call's `failed`, a
    reload) frees nothing under the connection: the owner lives, and the
    handshake resumes the session. Once connected, the connection holds no
    owner: it is freed with the record's last reference. A bare pointer was
    a use after free (review38c). The TCP connect is held here by a listener
    whose accept queue is full: its SYN dropped, sent again after TCP's
    first 1 s timeout, taken then."""
    server_ctx = tls_files.fleet_server_context()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x")  # after the tickets
        with contextlib.suppress(OSError):
            await writer.drain()
            await reader.read()
        writer.close()

    ctx = tls_files.client_context()
    first = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = first.sockets[0].getsockname()[1]
    spec = parse_fleets_text(f"https://127.0.0.1:{port} name=a", default_maxconn=10)[0]
    fleet = FleetState(spec)
    conn = await tls_socket.connect("127.0.0.1", port, ctx, server_hostname="127.0.0.1", timeout=10)
    handler = _FirstByte()
    conn.start(handler)  # type: ignore[arg-type]
    assert await handler.got == b"x"
    fleet_sessions.keep(fleet, spec, conn, None)
    conn.close()
    first.close()
    assert isinstance(fleet.tls_session, fleet_sessions.KeptSession)
    owner = weakref.ref(fleet.tls_session)

    # The same server context (its ticket keys) behind a listener whose one
    # place in its accept queue is taken.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    connecting = asyncio.create_task(
        tls_socket.connect(
            "127.0.0.1",
            listener.getsockname()[1],
            ctx,
            server_hostname="127.0.0.1",
            timeout=10,
            kept_session=fleet_sessions.offer(fleet, ctx),
        )
    )
    second = None
    try:
        await asyncio.sleep(0.3)
        assert not connecting.done()  # its SYN dropped
        fleet.tls_session = None  # the record lets go
        gc.collect()
        assert owner() is not None  # held by the connect
        # Its accept queue made longer (asyncio listens again): the SYN sent again is taken.
        second = await asyncio.start_server(serve, sock=listener, ssl=server_ctx)
        async with asyncio.timeout(10):
            conn = await connecting
        handler = _FirstByte()
        conn.start(handler)  # type: ignore[arg-type]
        assert await handler.got == b"x"
        assert fleet_sessions.resumed(conn)
        gc.collect()
        assert owner() is None  # not held by the connection
        conn.close()
    finally:
        connecting.cancel()
        filler.close()
        if second is not None:
            second.close()
        else:
            listener.close()


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_session_past_its_lifetime_is_not_offered(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    ctx = tls_files.fleet_server_context()
    LIBSSL.SSL_CTX_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_long]
    LIBSSL.SSL_CTX_set_timeout(ssl_ctx_pointer(ctx), 1)  # the tickets' lifetime: 1 s
    fleet = await ResumptionFleet(ctx).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        await one_call(ingress, tls_files)
        (state,) = ingress.balancer.fleets
        assert fleet_sessions.offer(state, ingress.ctx.fleet_ssl) is not None
        await asyncio.sleep(2.1)  # the session's time is counted in whole seconds
        assert fleet_sessions.offer(state, ingress.ctx.fleet_ssl) is None
        assert state.tls_session is None  # dropped, not only passed over
        await one_call(ingress, tls_files)
        assert fleet.reused == [False, False]
    finally:
        await fleet.stop()


async def test_a_failed_connection_drops_the_session_it_was_offered(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    fleet = await ResumptionFleet(tls_files.fleet_server_context()).start()
    port = fleet.port
    try:
        ingress = await with_a_session(
            start_ingress, tls_files, fleet.line("a"), retry={"retries": 0}
        )
    finally:
        await fleet.stop()
    with pytest.raises(InvalidStatus):  # 503: the fleet refused the connection
        await one_call(ingress, tls_files)
    assert kept_of(ingress) is None
    assert port  # the fleet is not started again: nothing would tell it from a new one


async def _calls_through_run(tls_files: TLSFiles, *, workers: int, calls: int) -> ProbedFleet:
    """`calls` echoed calls one after another through `run` with `workers`
    workers in front of one TLS fleet; the fleet, for what it saw."""
    from tests.support import RunningIngress

    fleet = ProbedFleet(name="a", capacity=16, ssl_context=tls_files.fleet_server_context())
    async with fleet:
        service = await RunningIngress.start(tls_files, [f"{fleet.url} name=a"], workers=workers)
        try:
            await service.fleets_up()
            for i in range(calls):
                async with ws_connect(
                    service.url(f"/ws/bot-{i}"), ssl=tls_files.client_context()
                ) as ws:
                    await echo(ws)
        finally:
            await service.finish()
    return fleet


async def test_a_worker_resumes_its_fleet_sessions(tls_files: TLSFiles) -> None:
    """`run` with a worker: the worker's record of the fleet (the slot
    client's) keeps the session, and the supervisor's probes stay full
    handshakes."""
    fleet = await _calls_through_run(tls_files, workers=1, calls=3)
    assert fleet.call_reused == [False, True, True]
    assert fleet.probe_reused and not any(fleet.probe_reused)


async def test_a_tls12_fleet_resumes_from_its_ticket(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    fleet = await ResumptionFleet(tls12_server_context(tls_files)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        for i in range(3):
            await one_call(ingress, tls_files, f"/ws/bot-{i}")
        assert fleet.reused == [False, True, True]
    finally:
        await fleet.stop()


def _offers_a_ticket(hello: bytes) -> bool:
    """Whether a ClientHello record offers a session: a pre_shared_key (41,
    TLS 1.3) or a session_ticket (35, TLS 1.2) extension that is not empty."""
    body = hello[5 + 4 :]  # the record's header, the handshake's type and length
    at = 2 + 32  # client_version, random
    at += 1 + body[at]  # session_id
    at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher_suites
    at += 1 + body[at]  # compression_methods
    end = at + 2 + int.from_bytes(body[at : at + 2], "big")
    at += 2
    while at + 4 <= end:
        kind = int.from_bytes(body[at : at + 2], "big")
        size = int.from_bytes(body[at + 2 : at + 4], "big")
        if kind == 41 or (kind == 35 and size > 0):
            return True
        at += 4 + size
    return False


# A fatal handshake_failure alert in a TLS record (RFC 8446 6; B.2).
_HANDSHAKE_FAILURE_ALERT = bytes([21, 3, 3, 0, 2, 2, 40])


class GuardsResumption:
    """A TCP relay in front of a fleet that, once told (`answer`), answers a
    ClientHello offering a session its own way, as a fleet (or a middlebox
    before it) that will not resume may: "stall" never answers (the
    connection held, nothing sent), "alert" sends a fatal handshake_failure
    alert and closes, "close" closes at once, "reset" resets, "http" answers
    as a plain-HTTP server would. Any other ClientHello is relayed; with
    `every`, every ClientHello is answered that way (a fleet gone bad: not
    the session's doing); with `only`, only the ClientHellos offering a
    session whose numbers (`offered` once each is counted) it holds (a fleet
    that resets some connections: not the session's doing either)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answer: str | None = None
        self.every = False
        self.only: set[int] | None = None
        self.answered = 0  # ClientHellos offering a session answered `answer`'s way
        self.offered = 0  # ClientHellos offering a session
        self.connections = 0  # taken
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def line(self, name: str, extra: str = "") -> str:
        """A fleets-file line for the fleet behind this relay, through it."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"https://127.0.0.1:{port} name={name} {extra}".strip()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            hello = await _read_hello(reader)
            offers = _offers_a_ticket(hello)
            self.offered += offers
            chosen = self.only is None or (offers and self.offered in self.only)
            if self.answer is not None and (self.every or offers) and chosen:
                self.answered += 1
                if self.answer == "stall":
                    await reader.read()  # until the ingress gives up
                elif self.answer == "alert":
                    writer.write(_HANDSHAKE_FAILURE_ALERT)
                    await writer.drain()
                elif self.answer == "http":
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                elif self.answer == "reset":
                    linger = struct.pack("ii", 1, 0)
                    writer.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, linger
                    )
                    writer.transport.abort()
                return
            await self._pass_on(hello, reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _pass_on(
        self, hello: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The connection relayed to the fleet, from its ClientHello (`hello`) on."""
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        up_writer.write(hello)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def _read_hello(reader: asyncio.StreamReader) -> bytes:
    """The first TLS record a client sends (its ClientHello), whole."""
    head = await reader.readexactly(5)
    return head + await reader.readexactly(int.from_bytes(head[3:5], "big"))


@pytest.fixture
async def relay(fleet: ResumptionFleet):  # type: ignore[no-untyped-def]
    """A GuardsResumption relay in front of `fleet`, started."""
    r = GuardsResumption(fleet.port)
    await r.start()
    yield r
    await r.stop()


async def test_a_connection_that_times_out_offered_the_session_drops_it(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
) -> None:
    """A fleet that hangs on a resumed handshake (the connect timer ends it)
    gets full handshakes after: the session is not offered again (before, it
    was kept, and every call to the fleet timed out until its lifetime ended)."""
    ingress = await with_a_session(
        start_ingress,
        tls_files,
        relay.line("a"),
        retry={"retries": 0},
        timeouts={"connect": 0.5},
    )
    relay.answer = "stall"
    with pytest.raises(InvalidStatus):  # the connect timer's answer
        await one_call(ingress, tls_files)
    assert relay.answered == 1
    assert kept_of(ingress) is None
    await one_call(ingress, tls_files)  # a full handshake, served
    assert relay.answered == 1
    assert fleet.reused == [False, False]


async def test_two_workers_each_resume_their_own_session(tls_files: TLSFiles) -> None:
    """`run` with 2 workers: each keeps a session of its own (at most one
    full handshake each), the calls served, the probes full handshakes."""
    fleet = await _calls_through_run(tls_files, workers=2, calls=8)
    assert len(fleet.call_reused) == 8
    assert fleet.call_reused.count(False) <= 2, fleet.call_reused
    assert fleet.probe_reused and not any(fleet.probe_reused)


async def test_a_call_connects_to_the_fleet_spec_it_was_sent_to(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fleet's spec changed in place (a worker's grant of the fleet moved,
    read in the same loop turn) after a call's ConnectFleet and before its
    connection starts: the call goes where its request's head (Host) and its
    slot were made for, as before resumption (it read the spec again)."""
    from fleet_ingress.core.call_machine import ConnectFleet
    from fleet_ingress.net import proxy

    other = await ResumptionFleet(tls_files.fleet_server_context()).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        moved = parse_fleets_text(other.line("a"), default_maxconn=10)[0]
        connect_fleet = proxy.CarrierProtocol._connect_fleet

        def then_moved(self: proxy.CarrierProtocol, command: Any) -> None:
            connect_fleet(self, command)
            command.fleet.spec = moved  # the connection's task not started yet

        monkeypatch.setitem(proxy._COMMANDS, ConnectFleet, then_moved)
        await one_call(ingress, tls_files)
        assert len(fleet.requests) == 1 and not other.requests
    finally:
        await other.stop()


async def test_a_fleet_that_refuses_the_session_offered_gets_the_call_at_once(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fleet that answers the session offered with an alert gets the call
    on a connection made again at once without it: with retries 0 the
    carrier is not answered 503 for our optimisation, the refusal is no
    failed attempt and tells nothing of the fleet's health (before, the call
    failed: one 503 a worker a fleet, and a passive health failure). No
    session is kept for it for REFUSED_FOR after, then one is. (A close:
    test_a_fleet_that_closes_every_connection_offered_a_session_refuses_at_the_second.)"""
    monkeypatch.setattr(fleet_sessions, "REFUSED_FOR", 1.0, raising=False)
    ingress = await with_a_session(start_ingress, tls_files, relay.line("a"), retry={"retries": 0})
    relay.answer = "alert"
    await one_call(ingress, tls_files)  # refused, then a full handshake: served
    assert relay.answered == 1
    assert fleet.reused == [False, False]
    (state,) = ingress.balancer.fleets
    assert (state.call_failures, state.fresh_probe, state.retries) == (0, False, 0)
    assert state.responses[101] == 2
    assert kept_of(ingress) is None  # refusing: none kept
    relay.answer = None
    await one_call(ingress, tls_files)  # none offered: a full handshake
    assert fleet.reused == [False, False, False]
    assert relay.answered == 1
    samples = metric_samples(generate_latest(ingress.metrics.prometheus).decode())
    assert samples["fleet_ingress_fleet_tls_handshakes_total"] == {
        (("kind", "full"),): 3.0,
        (("kind", "resumed"),): 0.0,
    }
    assert samples["fleet_ingress_fleet_tls_sessions_refused_total"] == {(): 1.0}
    await asyncio.sleep(1.1)  # REFUSED_FOR over
    await one_call(ingress, tls_files)  # kept again
    await one_call(ingress, tls_files)
    assert fleet.reused == [False, False, False, False, True]


@pytest.mark.parametrize("answer", ["reset", "close"])
async def test_a_fleet_that_resets_some_connections_is_not_said_to_refuse_the_session(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    """A fleet that resets (or closes) some connections as they open,
    whatever they offer (flaky), here the 1st and 3rd offered a session of
    4 calls: each of those calls is made again at once without the session
    (served, retries 0), and the fleet's sessions go on being resumed
    (reused: the first call's, a call made again, resumed, made again,
    resumed). A close or reset is no proof of a refusal (an alert is): the
    session after it resumed, nothing said. Before (session 40), the first
    reset made the fleet `Refusing`: every later call a full handshake for
    REFUSED_FOR (reused all False), and the journal said it refused."""
    ingress = await with_a_session(start_ingress, tls_files, relay.line("a"), retry={"retries": 0})
    ingress.dispatcher.fall = 10  # passive health observed (as with probes), not reached
    relay.answer, relay.only = answer, {relay.offered + 1, relay.offered + 3}
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    for i in range(4):
        await one_call(ingress, tls_files, f"/ws/bot-{i}")
    assert relay.answered == 2
    assert fleet.reused == [False, False, True, False, True]
    (state,) = ingress.balancer.fleets
    # Each reset a failed connection (since session 42; the streak ended by
    # each call's 101): the next probe opens a new connection.
    assert (state.call_failures, state.retries, state.fresh_probe) == (0, 0, True)
    assert kept_of(ingress) is not None
    said = [r for r in caplog.records if "refused the TLS session" in r.getMessage()]
    assert not said, said
    # No refusal proven, none counted (before session 42: 2, one a connection made again).
    samples = metric_samples(generate_latest(ingress.metrics.prometheus).decode())
    assert samples["fleet_ingress_fleet_tls_sessions_refused_total"] == {(): 0.0}


@pytest.mark.parametrize("answer", ["close", "reset"])
async def test_a_fleet_that_closes_every_connection_offered_a_session_refuses_at_the_second(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    """A fleet (a middlebox before it) that closes or resets every connection
    offered a session, and takes every other: the first call offered one is
    made again at once, the session of that full handshake kept `suspect`;
    the next call offered that one, closed too with none resumed between, is
    made again and proves the refusal (said once); the third is offered
    none. Each served (retries 0), no failed attempt. Before, the first close
    was taken for a refusal (relay.answered 1), as a flaky fleet's is."""
    ingress = await with_a_session(start_ingress, tls_files, relay.line("a"), retry={"retries": 0})
    relay.answer = answer
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    for i in range(3):
        await one_call(ingress, tls_files, f"/ws/bot-{i}")
    assert relay.answered == 2
    assert fleet.reused == [False] * 4
    (state,) = ingress.balancer.fleets
    assert (state.call_failures, state.retries) == (0, 0)
    assert isinstance(state.tls_session, fleet_sessions.Refusing)
    said = [r for r in caplog.records if "refused the TLS session" in r.getMessage()]
    assert len(said) == 1, said
    # The refusal proven, by the second close: the first was no proof (since
    # session 42 only what is proven is counted; before, 2).
    samples = metric_samples(generate_latest(ingress.metrics.prometheus).decode())
    assert samples["fleet_ingress_fleet_tls_sessions_refused_total"] == {(): 1.0}


@pytest.mark.parametrize(("answer", "connections"), [("close", 3), ("reset", 3), ("http", 2)])
async def test_a_fleet_that_fails_every_connection_is_not_said_to_refuse_the_session(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
    caplog: pytest.LogCaptureFixture,
    answer: str,
    connections: int,
) -> None:
    """A fleet with a session kept that then fails every connection (down
    behind a proxy that closes, resetting, plain HTTP on its TLS port) fails
    the calls' attempts as it did before resumption (503, retries 0), and is
    not said to refuse a session: no journal line, no count. A close or a
    reset cannot be told from a refusal at once: the first call made again
    without the session (3 connections for 2 calls); a plain-HTTP answer is
    not a refusal (2). Before, both said and counted a refusal, and the
    plain-HTTP fleet took the connection made again too."""
    ingress = await with_a_session(start_ingress, tls_files, relay.line("a"), retry={"retries": 0})
    ingress.dispatcher.fall = 10  # passive health observed (as with probes), not reached
    relay.answer, relay.every = answer, True
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    for _ in range(2):
        with pytest.raises(InvalidStatus) as failed:
            await one_call(ingress, tls_files)
        assert failed.value.response.status_code == 503
    assert relay.answered == connections
    # Every connection the fleet failed is a failed connection, the first
    # call's two included (before session 42, the one offered the session
    # was free: 2 of 3).
    (state,) = ingress.balancer.fleets
    assert state.call_failures == connections
    assert kept_of(ingress) is None
    said = [r for r in caplog.records if "refused the TLS session" in r.getMessage()]
    assert not said, said
    samples = metric_samples(generate_latest(ingress.metrics.prometheus).decode())
    assert samples["fleet_ingress_fleet_tls_sessions_refused_total"] == {(): 0.0}


async def test_an_openssl_fleet_that_fails_on_resumption_gets_the_call_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """A real OpenSSL fleet that fails a resumption: a TLS 1.2 server with no
    session id context that starts asking for client certificates
    (optional) fails a ticket with a fatal internal_error
    (ssl_get_prev_session: "session id context uninitialized"), as an nginx
    with ssl_verify_client optional and no session context does (nginx
    sends that alert; asyncio's server here closes without it). With
    retries 0 the call is served on a full handshake made again at once."""
    ctx = tls12_server_context(tls_files)
    LIBSSL.SSL_CTX_set_session_id_context.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    assert LIBSSL.SSL_CTX_set_session_id_context(ssl_ctx_pointer(ctx), b"", 0) == 1
    fleet = await ResumptionFleet(ctx).start()
    try:
        ingress = await start_ingress([fleet.line("a")], retry={"retries": 0})
        await one_call(ingress, tls_files)
        await one_call(ingress, tls_files)
        assert fleet.reused == [False, True]
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=_another_ca_pem().decode())
        await one_call(ingress, tls_files)  # the ticket refused, a full handshake: served
        (state,) = ingress.balancer.fleets
        assert (state.call_failures, state.retries) == (0, 0)
        assert fleet.reused == [False, True, False]
    finally:
        await fleet.stop()


async def test_an_openssl_fleet_that_fails_every_resumption_is_kept_no_session(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """The OpenSSL fleet above fails every resumption: once its refusal is
    proven no session is kept for it (REFUSED_FOR), so each call is one full
    handshake, and it is said once. Before session 39, each call's full
    handshake kept a new session, the next call was offered it, refused, and
    made again: 6 calls, 6 refusals (12 connections) and 6 journal lines.
    Its alert never reaches the ingress (asyncio's server closes the
    connection without sending what OpenSSL wrote: the ingress reads
    SSLEOFError, "UNEXPECTED_EOF_WHILE_READING"), as with any fleet on
    Python's asyncio or uvloop: a close, which proves the refusal at the
    second call made again (`fleet_sessions._through`): 1 counted, the
    refusal proven (the first close, no proof, was a failed connection;
    before session 42, 2 counted)."""
    ctx = tls12_server_context(tls_files)
    LIBSSL.SSL_CTX_set_session_id_context.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    assert LIBSSL.SSL_CTX_set_session_id_context(ssl_ctx_pointer(ctx), b"", 0) == 1
    ctx.verify_mode = ssl.CERT_OPTIONAL  # from the start: every ticket refused
    ctx.load_verify_locations(cadata=_another_ca_pem().decode())
    fleet = await ResumptionFleet(ctx).start()
    try:
        ingress = await start_ingress([fleet.line("a")], retry={"retries": 0})
        caplog.set_level(logging.INFO, logger="fleet_ingress")
        for i in range(7):
            await one_call(ingress, tls_files, f"/ws/bot-{i}")
        assert fleet.reused == [False] * 7
        samples = metric_samples(generate_latest(ingress.metrics.prometheus).decode())
        assert samples["fleet_ingress_fleet_tls_sessions_refused_total"] == {(): 1.0}
        said = [r for r in caplog.records if "refused the TLS session" in r.getMessage()]
        assert len(said) == 1, said
        assert said[0].__dict__["fields"]["fleet"] == "a"
    finally:
        await fleet.stop()


async def test_a_refusal_of_calls_offered_the_session_together_is_said_once(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Calls offered the fleet's session together, each refused (an alert):
    each served on a connection made again, each refusal counted, one journal
    line (before, one a session, and each refused call's full handshake kept
    a new one that the next calls were offered: 4 lines for 20 calls)."""
    ingress = await with_a_session(start_ingress, tls_files, relay.line("a", "maxconn=40"))
    relay.answer = "alert"
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    await asyncio.gather(*(one_call(ingress, tls_files, f"/ws/bot-{i}") for i in range(20)))
    assert relay.answered >= 2  # offered together (the loop's turns: 3 to 5 of 20)
    said = [r for r in caplog.records if "refused the TLS session" in r.getMessage()]
    assert len(said) == 1, said
    samples = metric_samples(generate_latest(ingress.metrics.prometheus).decode())
    refused = samples["fleet_ingress_fleet_tls_sessions_refused_total"]
    assert refused == {(): float(relay.answered)}


async def _calls_every(
    ingress: Ingress, tls_files: TLSFiles, seconds: float, every: float = 0.2
) -> list[tuple[float, bool]]:
    """Calls one after another, `every` apart, for `seconds`: when each was
    made (seconds from the first) and whether it was served."""
    made: list[tuple[float, bool]] = []
    start = time.monotonic()
    i = 0
    while (at := time.monotonic() - start) < seconds:
        try:
            await one_call(ingress, tls_files, f"/ws/bot-{i}")
            made.append((at, True))
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            made.append((at, False))
        i += 1
        await asyncio.sleep(every)
    return made


async def test_a_fleet_that_puts_on_another_cas_certificate_gets_no_call_after_the_check_age(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fleet that puts on a certificate of a CA the ingress does not trust,
    its ticket keys kept (a certificate loaded again in place), resumes every
    call on the session kept, each resumed handshake's new ticket a new
    lifetime: its certificate is checked again on a full handshake once the
    check the session rests on is CHECKED_WITHIN old (1 s here), and the
    calls are refused from then on (before, every call resumed, as long as
    calls came: 21 of 21 over 4.8 s; session 38 said at most the session's
    lifetime)."""
    monkeypatch.setattr(fleet_sessions, "CHECKED_WITHIN", 1.0, raising=False)
    ingress = await start_ingress([fleet.line("a")], retry={"retries": 0})
    checked = time.monotonic()
    await one_call(ingress, tls_files)
    assert fleet.ssl_context is not None
    import trustme

    trustme.CA().issue_cert("127.0.0.1", "localhost").configure_cert(fleet.ssl_context)
    made = await _calls_every(ingress, tls_files, 2.5 - (time.monotonic() - checked))
    served = [at for at, ok in made if ok]
    assert served and all(ok for _, ok in made[: len(served)]), made  # then refused
    assert len(served) < len(made), made
    assert kept_of(ingress) is None
    assert all(fleet.reused[1:]), fleet.reused  # every call served resumed


async def test_a_session_is_not_offered_past_its_certificates_expiry(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """A fleet whose certificate expires while calls resume its session: the
    calls made after its notAfter are refused, as a new handshake is
    (before, they resumed: 28 of 28 over 10 s, the certificate expired at
    4 s)."""
    ctx = tls_files.fleet_server_context()
    expires = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    expires += datetime.timedelta(seconds=3)
    tls_files.ca.issue_cert("127.0.0.1", "localhost", not_after=expires).configure_cert(ctx)
    fleet = await ResumptionFleet(ctx).start()
    try:
        ingress = await start_ingress([fleet.line("a")], retry={"retries": 0})
        start = time.time()
        made = await _calls_every(ingress, tls_files, expires.timestamp() - start + 1.5)
        before = [ok for at, ok in made if start + at < expires.timestamp() - 0.5]
        after = [ok for at, ok in made if start + at > expires.timestamp() + 0.5]
        assert before and all(before), made
        assert after and not any(after), made
        assert kept_of(ingress) is None
    finally:
        await fleet.stop()


async def test_a_resumed_session_keeps_the_check_it_rests_on(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls that resume the fleet's session all the while get a full
    handshake once the certificate check is CHECKED_WITHIN old (1 s here),
    then resume its session again: each resumed handshake's new ticket
    does not make the check new."""
    monkeypatch.setattr(fleet_sessions, "CHECKED_WITHIN", 1.0, raising=False)
    ingress = await start_ingress([fleet.line("a")])
    made = await _calls_every(ingress, tls_files, 2.3, every=0.25)
    assert all(ok for _, ok in made), made
    full = [i for i, reused in enumerate(fleet.reused) if not reused]
    assert len(full) in (2, 3), fleet.reused  # at 0 s, then about each second
    assert fleet.reused[full[1] + 1]  # the new session resumed


async def test_a_reload_drops_the_session_in_each_worker(tls_files: TLSFiles) -> None:
    """`run` with 2 workers: each worker keeps a session of its own (its first
    call a full handshake, its others resumed), and a reload (SIGHUP) drops
    both: each worker's first call after it is a full handshake again (a
    reload makes each worker a new fleet context). Which worker took a call:
    its access line's process."""
    import signal

    from tests.support import RunningIngress

    fleet = ProbedFleet(name="a", capacity=64, ssl_context=tls_files.fleet_server_context())
    async with fleet:
        service = await RunningIngress.start(tls_files, [f"{fleet.url} name=a"], workers=2)
        try:
            await service.fleets_up()

            async def calls(first: int, count: int) -> None:
                for i in range(first, first + count):
                    async with ws_connect(
                        service.url(f"/ws/bot-{i}"), ssl=tls_files.client_context()
                    ) as ws:
                        await echo(ws)

            await calls(0, 12)
            service.proc.send_signal(signal.SIGHUP)
            await service.wait_for("READY=1", count=2)
            await calls(12, 12)
            await eventually(lambda: len(_ended_by(service)) == 24)
            by_bot = _ended_by(service)
            # The host's count, the workers' summed: each worker's first call
            # before and after the reload a full handshake.
            samples = metric_samples(await service.metrics())
            handshakes = samples["fleet_ingress_fleet_tls_handshakes_total"]
        finally:
            await service.finish()
    # The fleet saw the calls in their order (each answered before the next).
    assert len(fleet.call_reused) == 24
    workers = [by_bot[f"bot-{i}"] for i in range(24)]
    assert handshakes == {(("kind", "full"),): 4.0, (("kind", "resumed"),): 20.0}
    for phase in (range(12), range(12, 24)):
        seen = {workers[i] for i in phase}
        assert len(seen) == 2, workers  # both workers took calls
        for worker in seen:
            reused = [fleet.call_reused[i] for i in phase if workers[i] == worker]
            assert reused[0] is False and all(reused[1:]), (workers, fleet.call_reused)


def _ended_by(service: Any) -> dict[str, int]:
    """The process (worker) of each call's access line, by the call's bot."""
    return {e["bot_id"]: e["process"] for e in service.log() if e.get("event") == "call ended"}


async def test_a_certificate_refused_with_a_session_offered_is_one_attempt(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """A fleet restarted with another CA's certificate (new ticket keys):
    the session offered is declined and the full handshake's certificate
    check fails. That is this side's refusal, not the fleet's refusal of the
    session: one connection, the call answered 503 (retries 0) and the session
    dropped, not a second connection made at once without it."""
    first = await ResumptionFleet(tls_files.fleet_server_context()).start()
    relay = GuardsResumption(first.port)
    await relay.start()
    try:
        ingress = await with_a_session(
            start_ingress, tls_files, relay.line("a"), retry={"retries": 0}
        )
    finally:
        await first.stop()
    import trustme

    ctx = tls_files.fleet_server_context()
    trustme.CA().issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    restarted = await ResumptionFleet(ctx).start()
    relay.port = restarted.port
    try:
        taken = relay.connections
        with pytest.raises(InvalidStatus):
            await one_call(ingress, tls_files)
        assert relay.connections == taken + 1
        assert kept_of(ingress) is None
        assert not restarted.reused  # no call got through
    finally:
        await relay.stop()
        await restarted.stop()


@pytest.mark.parametrize("answer", ["close", "reset"])
async def test_calls_offered_the_session_together_to_a_fleet_failing_every_connection(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
    answer: str,
) -> None:
    """10 calls at once to a fleet with a session kept that then closes (or
    resets) every connection: the calls whose connections were offered the
    session fail as they would have without it, one connection each and one
    more (the first made again without the session, to tell a refusal from a
    fleet gone bad; the others wait for its answer), each a failed attempt
    (503, retries 0). Before, each call offered the session made a second
    connection, none of them counted against retries or health (15 to 20
    connections)."""
    ingress = await with_a_session(
        start_ingress, tls_files, relay.line("a", "maxconn=40"), retry={"retries": 0}
    )
    taken, offered = relay.connections, relay.offered
    relay.answer, relay.every = answer, True
    got = await asyncio.gather(
        *(one_call(ingress, tls_files, f"/ws/bot-{i}") for i in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(g, InvalidStatus) for g in got), got
    assert {g.response.status_code for g in got if isinstance(g, InvalidStatus)} == {503}
    assert relay.offered - offered >= 2  # offered together
    assert relay.connections - taken == 11


class Hello:
    """A ClientHello that an AsksTheTest relay holds until told (`tell`) what
    to do with it: "relay" it to the fleet, answer it with an "alert",
    "reset" the connection, or "stall" (nothing sent). Answered with an
    alert or stalled, `closed` is set once the ingress has closed the
    connection."""

    def __init__(self, offers: bool) -> None:
        self.offers = offers  # offering a session
        self.told: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()

    def tell(self, answer: str) -> None:
        self.told.set_result(answer)


class AsksTheTest(GuardsResumption):
    """A GuardsResumption relay that, once `asking`, hands each connection's
    ClientHello to the test (`hellos`, in the order they came) and answers it
    as the test says (`Hello`)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.asking = False
        self.hellos: asyncio.Queue[Hello] = asyncio.Queue()

    async def next_hello(self) -> Hello:
        async with asyncio.timeout(10):
            return await self.hellos.get()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.asking:
            await super()._relay(reader, writer)
            return
        try:
            hello = await _read_hello(reader)
            asked = Hello(_offers_a_ticket(hello))
            self.hellos.put_nowait(asked)
            if await asked.told == "relay":
                await self._pass_on(hello, reader, writer)
                return
            if asked.told.result() == "reset":
                linger = struct.pack("ii", 1, 0)
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, linger
                )
                writer.transport.abort()
                return
            if asked.told.result() == "alert":
                writer.write(_HANDSHAKE_FAILURE_ALERT)
                await writer.drain()
            with contextlib.suppress(OSError):
                await reader.read()  # until the ingress closes it
            asked.closed.set()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def test_calls_waiting_on_a_refusals_proof_get_an_answer_when_its_carrier_leaves(
    start_ingress: StartIngress, tls_files: TLSFiles, fleet: ResumptionFleet
) -> None:
    """Three calls offered the fleet's session together, each answered with
    an alert: the first's connection made again without it (the proof) is
    held by the fleet, the other two wait for it; the first's carrier
    leaves then (its connection made again is given up). The next of the
    two finds out in its place: both are served, within their connect
    timer (8 s), on full handshakes (one connection each made again), and
    the fleet refuses sessions. Were the proof never answered, they would
    wait until their timers ended (503)."""
    relay = AsksTheTest(fleet.port)
    await relay.start()
    try:
        ingress = await with_a_session(
            start_ingress,
            tls_files,
            relay.line("a", "maxconn=10"),
            retry={"retries": 0},
            timeouts={"connect": 8.0},
        )
        relay.asking = True
        first = asyncio.create_task(one_call(ingress, tls_files, "/ws/bot-first"))
        offered = [await relay.next_hello()]  # held: the others are offered the session too
        others = [
            asyncio.create_task(one_call(ingress, tls_files, f"/ws/bot-{i}")) for i in range(2)
        ]
        offered += [await relay.next_hello(), await relay.next_hello()]
        assert all(h.offers for h in offered)
        offered[0].tell("alert")
        proof = await relay.next_hello()  # the first's connection made again
        assert not proof.offers
        proof.tell("stall")
        for waiting in offered[1:]:
            waiting.tell("alert")
            async with asyncio.timeout(10):
                await waiting.closed.wait()  # its call has the alert: waiting on the proof
        first.cancel()  # its carrier leaves
        with contextlib.suppress(asyncio.CancelledError):
            await first
        async with asyncio.timeout(10):
            await proof.closed.wait()  # the proof's connection given up
        for _ in range(2):  # the next finds out, then the other connects again
            again = await relay.next_hello()
            assert not again.offers
            again.tell("relay")
        async with asyncio.timeout(15):
            await asyncio.gather(*others)  # both served: not their timers' 503
        assert relay.hellos.empty()
        assert fleet.reused[1:] == [False, False]
        (state,) = ingress.balancer.fleets
        assert isinstance(state.tls_session, fleet_sessions.Refusing)
    finally:
        await relay.stop()


async def _with_a_suspect_session(
    start_ingress: StartIngress, tls_files: TLSFiles, relay: AsksTheTest
) -> Ingress:
    """An ingress in front of `relay` (asking the test from now on) whose fleet
    reset a connection offered its session, made again without it: the session
    that full handshake left is kept `suspect`."""
    ingress = await with_a_session(
        start_ingress, tls_files, relay.line("a", "maxconn=10"), retry={"retries": 0}
    )
    relay.asking = True
    call = asyncio.create_task(one_call(ingress, tls_files, "/ws/bot-reset"))
    offered = await relay.next_hello()
    assert offered.offers
    offered.tell("reset")
    again = await relay.next_hello()
    assert not again.offers
    again.tell("relay")
    async with asyncio.timeout(10):
        await call
    kept = kept_of(ingress)
    assert kept is not None and kept.suspect
    return ingress


async def _two_offered_it(
    ingress: Ingress, tls_files: TLSFiles, relay: AsksTheTest
) -> tuple[asyncio.Task[Any], Hello, asyncio.Task[Any], Hello]:
    """Two calls offered the suspect session together: the one to resume it
    (/ws/bot-resumes) and the one to be reset (/ws/bot-reset-too), each with
    its ClientHello held at the relay, in that order."""
    resumes = asyncio.create_task(one_call(ingress, tls_files, "/ws/bot-resumes"))
    first = await relay.next_hello()
    reset = asyncio.create_task(one_call(ingress, tls_files, "/ws/bot-reset-too"))
    second = await relay.next_hello()
    assert first.offers and second.offers  # the suspect session, together
    return resumes, first, reset, second


async def test_a_suspect_session_resumed_by_one_call_is_no_refusal_when_another_is_reset(
    start_ingress: StartIngress, tls_files: TLSFiles, fleet: ResumptionFleet
) -> None:
    """A flaky fleet resets a connection offered its session (made again
    without it: the session that full handshake leaves is kept `suspect`);
    two calls are then offered that session together: one resumes it (its
    call served), the other is reset too. A resumption went through: the
    fleet does not refuse sessions, and the next call resumes. Were the
    resumed session's suspicion kept, the second reset would be taken for a
    refusal (the next call a full handshake, for REFUSED_FOR)."""
    relay = AsksTheTest(fleet.port)
    await relay.start()
    try:
        ingress = await _with_a_suspect_session(start_ingress, tls_files, relay)
        resumes, first, reset, second = await _two_offered_it(ingress, tls_files, relay)
        first.tell("relay")
        async with asyncio.timeout(10):
            await resumes
        second.tell("reset")
        again = await relay.next_hello()
        assert not again.offers
        again.tell("relay")
        async with asyncio.timeout(10):
            await reset
        relay.asking = False
        await one_call(ingress, tls_files, "/ws/bot-after")
        assert fleet.reused == [False, False, True, False, True]
        (state,) = ingress.balancer.fleets
        assert not isinstance(state.tls_session, fleet_sessions.Refusing)
    finally:
        await relay.stop()


class AnswersResumedBadly(ResumptionFleet):
    """A fleet that, once told (`answer`), answers each call whose handshake
    resumed its way: "close" closes before any answer, "503" answers 503."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        super().__init__(ssl_context)
        self.answer: str | None = None

    def _record(self, connection: ServerConnection, request: Any) -> Any:
        super()._record(connection, request)
        if self.answer is None or not self.reused[-1]:
            return None
        if self.answer == "close":
            connection.transport.abort()
        return connection.respond(503, "down\n")


@pytest.mark.parametrize("answer", ["close", "503"])
async def test_a_resumed_connection_failing_before_its_101_drops_the_session(
    start_ingress: StartIngress, tls_files: TLSFiles, answer: str
) -> None:
    """A fleet that completes the resumed handshake, then closes before its
    answer (or answers 503): the call fails (retries 0), and the session is
    not offered again, so the next call makes a full handshake (served here).
    Before, the session was kept: every call resumed and failed the same way
    until CHECKED_WITHIN."""
    fleet = await AnswersResumedBadly(tls_files.fleet_server_context()).start()
    try:
        ingress = await with_a_session(
            start_ingress, tls_files, fleet.line("a"), retry={"retries": 0}
        )
        fleet.answer = answer
        with pytest.raises(InvalidStatus) as failed:
            await one_call(ingress, tls_files)
        assert failed.value.response.status_code in (502, 503)
        assert kept_of(ingress) is None
        await one_call(ingress, tls_files)  # a full handshake: served
        assert fleet.reused == [False, True, False]
    finally:
        await fleet.stop()


async def test_a_reload_ends_a_fleets_refusal(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
    tmp_path: Path,
) -> None:
    """A fleet that refused the session is kept none (REFUSED_FOR, 600 s)
    under the fleet context it refused under: a reload (its fix may be the
    fleet's settings or the CA file; each reload a new fleet context) ends
    that, and the fleet's next full handshake is kept and offered. Before,
    the mark outlasted the reload for its 10 minutes."""
    line = relay.line("a")
    ingress = await start_ingress([line], retry={"retries": 0})
    await one_call(ingress, tls_files)
    relay.answer = "alert"
    await one_call(ingress, tls_files)  # refused, made again: served
    assert relay.answered == 1
    await one_call(ingress, tls_files)  # refusing: none offered, none kept
    assert kept_of(ingress) is None and relay.answered == 1
    await _reload(ingress, tls_files, tmp_path, line)
    relay.answer = None
    await one_call(ingress, tls_files)  # a full handshake, kept
    assert kept_of(ingress) is not None
    await one_call(ingress, tls_files)  # offered: resumed
    assert relay.answered == 1
    assert fleet.reused == [False, False, False, False, True]


class HoldsItsAnswer(ResumptionFleet):
    """A ResumptionFleet that holds its answer (the 101) to a request for
    `held_path` until `release` is set; `asked` is set once that request came
    (its handshake done: `reused` says how)."""

    def __init__(self, ssl_context: ssl.SSLContext, held_path: str) -> None:
        super().__init__(ssl_context)
        self.held_path = held_path
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def _record(self, connection: ServerConnection, request: Any) -> None:  # type: ignore[override]
        super()._record(connection, request)
        if request.path == self.held_path:
            self.asked.set()
            await self.release.wait()


async def test_a_suspect_session_resumed_before_another_calls_reset_is_no_refusal(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """As above, in the order a real fleet gives: the call that resumes the
    suspect session waits for its fleet's 101 (a bot's answer takes a while)
    while the other call, reset, is made again and gets through first. The
    resumption happened at its handshake: the reset is no refusal, and the
    next call resumes. Cleared only at the resumed call's link, the
    suspicion made the reset a refusal (Refusing, full handshakes for
    REFUSED_FOR: reused ending F, F)."""
    fleet = HoldsItsAnswer(tls_files.fleet_server_context(), "/ws/bot-resumes")
    await fleet.start()
    relay = AsksTheTest(fleet.port)
    await relay.start()
    try:
        ingress = await _with_a_suspect_session(start_ingress, tls_files, relay)
        resumes, first, reset, second = await _two_offered_it(ingress, tls_files, relay)
        first.tell("relay")
        async with asyncio.timeout(10):
            await fleet.asked.wait()  # resumed; its 101 held
        assert fleet.reused[-1] is True
        second.tell("reset")
        again = await relay.next_hello()
        assert not again.offers
        again.tell("relay")
        async with asyncio.timeout(10):
            await reset  # served before the resumed call is linked
        fleet.release.set()
        async with asyncio.timeout(10):
            await resumes
        relay.asking = False
        await one_call(ingress, tls_files, "/ws/bot-after")
        (state,) = ingress.balancer.fleets
        assert not isinstance(state.tls_session, fleet_sessions.Refusing)
        assert fleet.reused == [False, False, True, False, True]
    finally:
        await relay.stop()
        await fleet.stop()


@pytest.mark.parametrize("answer", ["reset", "close"])
async def test_a_flaky_fleets_reset_of_a_connection_offered_its_session_is_a_failed_connection(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    relay_answer_held: tuple[HoldsItsAnswer, GuardsResumption],
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    """A fleet resets (or closes) the next connection offered its session
    and takes the one made again without it: that reset is no proven
    refusal, so it is what it looks like, a connection the fleet refused,
    counted for passive health (`call_failures` 1 while the call waits for
    its 101, `fresh_probe`) as a refused connection with no session
    offered is; the call is served (retries 0: not a failed attempt, its
    line has no `tried`) and its 101 ends the streak. Before (session 42)
    nothing was counted: a fleet dropping a share p of its connections
    was seen failing p x p of them, and the refusal counter took it for a
    refusal (1)."""
    fleet, relay = relay_answer_held
    ingress = await with_a_session(start_ingress, tls_files, relay.line("a"), retry={"retries": 0})
    ingress.dispatcher.fall = 10  # passive health observed (as with probes), not reached
    relay.answer, relay.only = answer, {relay.offered + 1}
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    call = asyncio.create_task(one_call(ingress, tls_files, "/ws/bot-held"))
    try:
        async with asyncio.timeout(10):
            await fleet.asked.wait()  # made again, through; its 101 held
        (state,) = ingress.balancer.fleets
        assert relay.answered == 1 and fleet.reused[-1] is False
        assert (state.call_failures, state.fresh_probe, state.retries) == (1, True, 0)
        fleet.release.set()
        async with asyncio.timeout(10):
            await call
    finally:
        call.cancel()
    assert state.call_failures == 0  # its 101: the fleet took a connection
    await eventually(lambda: len(access_entries(caplog)) == 1)
    (line,) = access_entries(caplog)
    assert (line["status"], line["attempts"]) == (101, 1) and "tried" not in line, line
    samples = metric_samples(generate_latest(ingress.metrics.prometheus).decode())
    assert samples["fleet_ingress_fleet_tls_sessions_refused_total"] == {(): 0.0}


async def test_a_reset_that_takes_the_fleet_down_gives_the_attempt_up_and_the_line_says_so(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`fleets.fall` 1: the reset of a's connection offered its session, no
    refusal proven, is the refused connection that takes a DOWN, as the
    connection made again without it gets through. The attempt is given up
    as any attempt on a fleet gone DOWN (`FleetWentDown`), that connection
    closed unused, and the call is served by b; its access line says it
    tried a first. Before (session 42) the reset was not counted: a stayed
    UP and the call was a's."""
    other = await ResumptionFleet(tls_files.fleet_server_context()).start()
    try:
        ingress = await start_ingress([relay.line("a"), other.line("b")], retry={"retries": 1})
        for i in range(2):  # round robin: a (its session kept), then b
            await one_call(ingress, tls_files, f"/ws/bot-{i}")
        assert kept_of(ingress, "a") is not None and len(other.reused) == 1
        ingress.dispatcher.fall = 1  # passive health observed (as with probes)
        relay.answer, relay.only = "reset", {relay.offered + 1}
        caplog.set_level(logging.INFO, logger="fleet_ingress")
        await one_call(ingress, tls_files, "/ws/bot-reset")
        assert relay.answered == 1
        a = ingress.balancer.get("a")
        assert a is not None and a.health is Health.DOWN
        await eventually(lambda: len(access_entries(caplog)) == 1)
        (line,) = access_entries(caplog)
        assert (line["fleet"], line["status"], line["attempts"]) == ("b", 101, 2), line
        assert line["tried"] == ["a fleet-down", "b 101"], line
        assert len(fleet.reused) == 1  # a's connection made again: closed, no request
        assert len(other.reused) == 2
    finally:
        await other.stop()


@pytest.fixture
async def relay_answer_held(tls_files: TLSFiles):  # type: ignore[no-untyped-def]
    """A HoldsItsAnswer fleet (its answer to /ws/bot-held held) behind a
    GuardsResumption relay, both started."""
    fleet = HoldsItsAnswer(tls_files.fleet_server_context(), "/ws/bot-held")
    await fleet.start()
    relay = GuardsResumption(fleet.port)
    await relay.start()
    yield fleet, relay
    fleet.release.set()  # a test that failed before its release
    await relay.stop()
    await fleet.stop()


async def test_a_full_handshake_kept_while_a_suspect_sessions_close_is_proven_stays_suspect(
    start_ingress: StartIngress, tls_files: TLSFiles, fleet: ResumptionFleet
) -> None:
    """A middlebox that resets every connection offered a session, calls
    coming all the time: the suspect session's connection is reset and,
    while it is made again, another call (offered nothing: the session was
    dropped at the reset) makes a full handshake and is linked. Its session
    is no resumption: kept clean, it was taken for one (`resumed_since`),
    the second reset was no refusal, and every later call was offered a
    session to be reset again. Two resets, none resumed between: Refusing."""
    relay = AsksTheTest(fleet.port)
    await relay.start()
    try:
        ingress = await _with_a_suspect_session(start_ingress, tls_files, relay)
        reset = asyncio.create_task(one_call(ingress, tls_files, "/ws/bot-reset-too"))
        second = await relay.next_hello()
        assert second.offers
        second.tell("reset")
        again = await relay.next_hello()  # made again: held while another call links
        assert not again.offers
        meanwhile = asyncio.create_task(one_call(ingress, tls_files, "/ws/bot-meanwhile"))
        full = await relay.next_hello()
        assert not full.offers
        full.tell("relay")
        async with asyncio.timeout(10):
            await meanwhile
        again.tell("relay")
        async with asyncio.timeout(10):
            await reset
        (state,) = ingress.balancer.fleets
        assert isinstance(state.tls_session, fleet_sessions.Refusing)
        assert not any(fleet.reused)
    finally:
        await relay.stop()


async def test_a_middlebox_resetting_calls_offered_the_session_together_keeps_the_fleet_up(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet: ResumptionFleet,
    relay: GuardsResumption,
) -> None:
    """A middlebox that resets every ClientHello offering a session, and
    calls offered the fleet's session together (a carriers' reconnect
    burst): each connection made again without it gets through, so the
    fleet took every connection it was sent. Their resets share one cause,
    the session offered, found out once (its `proof`): one failed
    connection for passive health, not one a call, and the fleet stays UP
    (`fleets.fall` 2) with every call served. Before, each call waiting on
    the proof counted its reset too, before any 101 ended the streak: the
    burst took the healthy fleet DOWN (`call_failures` reached `fall`)."""
    ingress = await with_a_session(start_ingress, tls_files, relay.line("a", "maxconn=40"))
    ingress.dispatcher.fall = 2  # passive health observed (as with probes): the default
    relay.answer = "reset"
    results = await asyncio.gather(
        *(one_call(ingress, tls_files, f"/ws/bot-{i}") for i in range(12)),
        return_exceptions=True,
    )
    assert relay.answered >= 3, relay.answered  # offered together: several proofs waited on
    (state,) = ingress.balancer.fleets
    assert state.health is Health.UP
    assert [r for r in results if r is not None] == []
