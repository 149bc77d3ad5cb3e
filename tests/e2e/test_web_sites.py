"""`ops.web_sites.WebSites`: the operators' web apps served on real sockets."""

from __future__ import annotations

import asyncio
import errno
import socket
import time

import pytest
from aiohttp import web

from fleet_ingress.ops.web_sites import WebSites

WHO = web.AppKey("who", str)


async def test_a_site_that_cannot_start_is_cleaned_up_and_its_error_raised() -> None:
    """The stats port is taken (another process listens on it): `serve` must
    raise that error, not another, and not leave the runner it had set up
    (the app's cleanup never run, its resources held until exit)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cleaned: list[str] = []

    async def on_cleanup(app: web.Application) -> None:
        cleaned.append("cleanup")

    app = web.Application()
    app.on_cleanup.append(on_cleanup)
    sites = WebSites()
    try:
        with pytest.raises(OSError) as raised:
            await sites.serve(app, web.TCPSite, host="127.0.0.1", port=port)
        assert raised.value.errno == errno.EADDRINUSE
        assert cleaned == ["cleanup"]
        # The sites that did start are the ones closed, and the port is served
        # once it is free.
        taken.close()
        runner = await sites.serve(web.Application(), web.TCPSite, host="127.0.0.1", port=port)
        assert [s.name for s in runner.sites] == [f"http://127.0.0.1:{port}"]
    finally:
        taken.close()
        await sites.close()
    assert cleaned == ["cleanup"]


async def test_quiesce_answers_requests_in_flight_and_leaves_new_ones_to_the_next_owner() -> None:
    """Before an exec the supervisor quiets its kept sites: a request in flight
    is answered whole, an idle keep-alive connection is closed, and a request
    that comes meanwhile waits in the listening socket's backlog (the socket
    stays open) until whoever serves it next (here another `WebSites`, as the
    new image would) answers it."""

    import aiohttp

    started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(0.4)
        return web.Response(text="slow done")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text=request.app[WHO])

    def app(who: str) -> web.Application:
        application = web.Application()
        application[WHO] = who
        application.router.add_get("/slow", slow)
        application.router.add_get("/fast", fast)
        return application

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    old, new = WebSites(), WebSites()
    try:
        await old.serve_kept(app("old"), sock)
        async with aiohttp.ClientSession() as idle, aiohttp.ClientSession() as session:
            async with idle.get(f"{url}/fast") as r:  # leaves an idle keep-alive connection
                assert await r.text() == "old"
            in_flight = asyncio.ensure_future(session.get(f"{url}/slow"))
            await started.wait()
            quiet = asyncio.ensure_future(old.quiesce(2.0))
            await asyncio.sleep(0.2)  # the sites have stopped accepting
            assert sock.fileno() >= 0
            meanwhile = asyncio.ensure_future(session.get(f"{url}/fast"))
            closed = await quiet
            assert closed == 2  # the idle one and the one in flight
            response = await in_flight
            assert (response.status, await response.text()) == (200, "slow done")
            await asyncio.sleep(0.2)
            assert not meanwhile.done()  # nobody accepts: it waits in the backlog
            await new.serve_kept(app("new"), sock)
            response = await asyncio.wait_for(meanwhile, 5)
            assert (response.status, await response.text()) == (200, "new")
            # Not resumed, the old one stays quiet; resumed, it serves again.
            await old.resume()
            answers = set()
            for _ in range(20):
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(f"{url}/fast") as r:
                        answers.add(await r.text())
            assert answers <= {"old", "new"} and "old" in answers
    finally:
        await old.close()
        await new.close()
        sock.close()


async def test_a_close_during_quiesce_waits_for_it_and_not_for_the_runners_own_timeout() -> None:
    """A stop (close) while an upgrade's quiesce waits for a request slower
    than its timeout: close must wait for the quiesce (it cancels the request
    at its timeout), not shut the same connection down a second time, which
    waits for the runner's own shutdown timeout (60 s). Nor may a resume after
    it start accepting again."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(4)
        return web.Response(text="slow")

    application = web.Application()
    application.router.add_get("/slow", slow)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sites = WebSites()
    loop = asyncio.get_running_loop()
    try:
        runner = await sites.serve_kept(application, sock)
        # A plain client: aiohttp's would ask again on a dropped connection.
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            while runner.server is None or not runner.server.connections:
                await asyncio.sleep(0.01)
        quiet = asyncio.ensure_future(sites.quiesce(1.0))
        await asyncio.sleep(0.3)
        began = loop.time()
        async with asyncio.timeout(20):
            await sites.close()
        assert loop.time() - began < 4.0
        assert await quiet == 1
        await sites.resume()  # the upgrade's `finally`, after the stop's close
        assert not runner.sites
        # Cancelled at the quiesce's timeout: the connection drops, unanswered.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        sock.close()


async def test_quiesce_waits_its_timeout_at_most_for_a_request_that_will_not_end() -> None:
    """An admin request that outlasts the quiet period (an add-fleet waiting
    for slow probes) and does not end when cancelled: the exec must not wait
    twice the timeout and more (aiohttp waits it for the handler, then again
    after cancelling it; an audit measured 20 s for 10), and the request's
    connection is closed, not left open."""

    started = asyncio.Event()

    async def stubborn(request: web.Request) -> web.Response:
        started.set()
        await asyncio.shield(asyncio.sleep(30))
        return web.Response(text="never")

    application = web.Application()
    application.router.add_get("/stubborn", stubborn)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sites = WebSites()
    loop = asyncio.get_running_loop()
    writer = None
    try:
        await sites.serve_kept(application, sock)
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        writer.write(b"GET /stubborn HTTP/1.1\r\nHost: x\r\n\r\n")
        await started.wait()
        began = loop.time()
        await sites.quiesce(1.0)
        took = loop.time() - began
        assert took < 1.9, took  # QUIESCE_SETTLE and the loop's slack; not twice the timeout
        assert await asyncio.wait_for(reader.read(), 2) == b""  # cut: closed, no answer
    finally:
        if writer is not None:
            writer.close()
        sock.close()


async def test_a_connection_that_sends_no_request_or_no_more_is_closed_when_idle() -> None:
    """aiohttp keeps an idle connection an hour by default: idle connections to
    the stats port held the supervisor's descriptors. One that never sends a
    request, one that stops half way through its head, and one idle after a
    request are all closed at the idle timeout; a request in time is served."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    sites = WebSites(idle_timeout=0.5)
    runner = await sites.serve(app, web.TCPSite, host="127.0.0.1", port=0)
    try:
        server = runner.addresses[0]
        silent = await asyncio.open_connection(*server[:2])
        half = await asyncio.open_connection(*server[:2])
        half[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        served = await asyncio.open_connection(*server[:2])
        served[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(served[0].readuntil(b"hi"), 2)
        assert answer.startswith(b"HTTP/1.1 200 ")
        started = asyncio.get_running_loop().time()
        for reader, _ in (silent, half, served):
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
        assert asyncio.get_running_loop().time() - started < 2.0
        for _, writer in (silent, half, served):
            writer.close()
    finally:
        await sites.close()


async def test_a_request_that_never_ends_holds_a_close_for_seconds_not_a_minute() -> None:
    """A request whose body never came in full (or a handler that never returns)
    held `close`, and so the supervisor's stop, for aiohttp's 60 s (the
    control-plane audit of session 22): a restart served no call meanwhile."""
    import time

    from fleet_ingress.ops.web_sites import OPERATOR_SHUTDOWN_TIMEOUT

    started = asyncio.Event()

    async def endless(request: web.Request) -> web.Response:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never")

    app = web.Application()
    app.router.add_post("/", endless)
    sites = WebSites()
    runner = await sites.serve(app, web.TCPSite, host="127.0.0.1", port=0)
    port = runner.addresses[0][1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhalf")
    async with asyncio.timeout(5):
        await started.wait()
    began = time.monotonic()
    await sites.close()
    assert time.monotonic() - began < 2 * OPERATOR_SHUTDOWN_TIMEOUT + 2.0  # before: 60 s
    writer.close()


async def _get(port: int, path: str = "/") -> bytes:

    async with asyncio.timeout(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
    return answer


def _busy_app(*routes: str) -> tuple[web.Application, asyncio.Event]:
    """An app whose requests (GET /, or each "METHOD /path" given) are held
    until the event returned is set: connections with a request under way."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    for route in routes or ("GET /",):
        method, path = route.split()
        app.router.add_route(method, path, slow)
    return app, release


async def test_past_its_most_connections_the_idle_one_open_longest_is_closed_to_make_room() -> None:
    """Connections kept open without a request (a scraper that reconnects and
    never closes) took a descriptor each until the supervisor had none for its
    probes and workers (the operator-listener audit). At the cap a new
    connection is taken and the idle one open longest closed, counted and warned of."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    sites = WebSites(max_connections=3)
    runner = await sites.serve(app, web.TCPSite, listener="stats", host="127.0.0.1", port=0)
    port = runner.addresses[0][1]
    held = []
    try:
        for _ in range(3):
            held.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.05)  # accepted in this order
        assert (await _get(port)).startswith(b"HTTP/1.1 200 ")  # a fourth: served
        assert await asyncio.wait_for(held[0][0].read(), 2) == b""  # the oldest: closed
        for reader, _ in held[1:]:  # the others still open
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(), 0.1)
        ((_, cap),) = sites.caps()
        assert (cap.listener, cap.limit, cap.idle_closed, cap.refused) == ("stats", 3, 1, 0)
    finally:
        for _, writer in held:
            writer.close()
        await sites.close()


async def test_past_its_most_connections_all_busy_a_new_one_gets_503_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every connection at the cap has a request under way: a new one is
    answered 503 and closed at once (no descriptor kept), counted, and warned
    of once a minute with what to do; once one ends, new ones are served."""

    from fleet_ingress.ops.web_sites import OPERATOR_WARN_EVERY

    app, release = _busy_app()
    sites = WebSites(max_connections=2)
    runner = await sites.serve(app, web.TCPSite, listener="stats", host="127.0.0.1", port=0)
    port = runner.addresses[0][1]
    busy = []
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            busy.append((reader, writer))
        await asyncio.sleep(0.2)  # both requests under way
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answer = await asyncio.wait_for(reader.read(), 2)  # closed at once, not held
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"Connection: close" in answer and b"2 connections open" in answer
        ((_, cap),) = sites.caps()
        assert (cap.refused, cap.idle_closed) == (3, 0)
        warned = [r for r in caplog.records if "at its most connections" in r.getMessage()]
        assert len(warned) == 1 and OPERATOR_WARN_EVERY == 60.0  # once, not per refusal
        assert warned[0].levelname == "WARNING" and "ss -tnp" in warned[0].getMessage()
        release.set()
        for reader, _ in busy:
            assert b"done" in await asyncio.wait_for(reader.readuntil(b"done"), 2)
        assert (await _get(port)).startswith(b"HTTP/1.1 200 ")
    finally:
        release.set()
        for _, writer in busy:
            writer.close()
        await sites.close()


async def test_a_refused_client_streaming_into_its_connection_is_cut_after_64_kib() -> None:
    """A refused connection reads what the client sends, so that the client
    reads the 503 before the close; at most REFUSED_READ of it. A client that
    streams into it is cut there, not after the 0.5 s it may linger (before:
    0.5-1.5 GB read through the loop in that time)."""

    from fleet_ingress.ops.web_sites import REFUSED_READ

    app, release = _busy_app()
    sites = WebSites(max_connections=1)
    runner = await sites.serve(app, web.TCPSite, listener="stats", host="127.0.0.1", port=0)
    port = runner.addresses[0][1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # the one allowed, busy

    def stream() -> int:
        """Send until the ingress cuts the connection (5 s, 4 GiB at most)."""
        chunk = bytes(REFUSED_READ)
        sent = 0
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(0.2)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and sent < 4 << 30:
                try:
                    sent += sock.send(chunk)
                except TimeoutError:  # nothing read meanwhile: the buffers are full
                    continue
                except OSError:  # reset: cut
                    return sent
        raise AssertionError(f"not cut: {sent} bytes sent in 5 s")

    try:
        await asyncio.sleep(0.2)  # its request under way
        sent = await asyncio.to_thread(stream)
        # What the kernel's buffers took on both sides, and 64 KiB read.
        assert sent < 32 << 20, sent
        ((_, cap),) = sites.caps()
        assert cap.refused == 1
    finally:
        release.set()
        writer.close()
        await sites.close()


async def test_the_admin_socket_refuses_past_its_most_with_a_json_error(tmp_path, capsys) -> None:
    """The admin socket's 503 is JSON with an `error`, as its other answers
    (the `fleet-ingress` commands print it); the cap and its counts are in
    the `fleet_ingress_operator_*` metrics, by listener."""
    import json

    from prometheus_client import CollectorRegistry, generate_latest

    from fleet_ingress.ops.admin_client import run_admin, run_reload
    from fleet_ingress.ops.admin_server import bind_admin_socket
    from fleet_ingress.ops.web_sites import OperatorConnectionsCollector

    app, release = _busy_app("GET /stat")
    sites = WebSites(max_connections=1)
    registry = CollectorRegistry()
    registry.register(OperatorConnectionsCollector(sites))
    path = tmp_path / "admin.sock"
    await sites.serve(app, web.SockSite, listener="admin", sock=bind_admin_socket(path))
    try:
        _, busy = await asyncio.open_unix_connection(str(path))
        busy.write(b"GET /stat HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_unix_connection(str(path))
        answer = await asyncio.wait_for(reader.read(), 2)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"application/json" in head
        assert "admin listener" in json.loads(body)["error"]
        metrics = generate_latest(registry).decode()
        assert 'fleet_ingress_operator_connections{listener="admin"} 1.0' in metrics
        assert 'fleet_ingress_operator_max_connections{listener="admin"} 1.0' in metrics
        assert 'fleet_ingress_operator_refused_connections_total{listener="admin"} 1.0' in metrics
        assert 'fleet_ingress_operator_idle_closed_connections_total{listener="admin"} 0.0' in (
            metrics
        )
        # The commands: nothing was asked, not refused. A reload asks the other
        # way (the unit's SIGHUP); before, it said "refused" and exited 1, and
        # certbot's deploy hook failed with the new certificate not loaded.
        asked: list[str] = []
        code = await asyncio.to_thread(
            run_reload, path, not_reached=lambda: asked.append("SIGHUP") or 0
        )
        assert (code, asked) == (0, ["SIGHUP"]), capsys.readouterr().err
        code = await asyncio.to_thread(
            run_admin, path, "POST", "/fleets/a/state", {"admin": "drain"}
        )
        assert code == 2
        assert "turned this command away unread" in capsys.readouterr().err
        busy.close()
    finally:
        release.set()
        await sites.close()


async def test_refusals_flooding_one_listener_leave_the_other_its_readable_refusals(
    tmp_path,
) -> None:
    """Each listener keeps its own refused connections open until their
    client has read the 503 (REFUSED_LINGERING each): a flood turned away at
    the stats port does not make the admin socket close its refusals at once,
    which a command still sending its request meets before the 503 (and a
    reload then does not know to ask by SIGHUP: the second review of session 23)."""

    from fleet_ingress.ops.admin_client import run_reload
    from fleet_ingress.ops.admin_server import bind_admin_socket
    from fleet_ingress.ops.web_sites import REFUSED_LINGERING

    app, release = _busy_app("GET /", "POST /reload")
    sites = WebSites(max_connections=1)
    runner = await sites.serve(app, web.TCPSite, listener="stats", host="127.0.0.1", port=0)
    port = runner.addresses[0][1]
    path = tmp_path / "admin.sock"
    await sites.serve(app, web.SockSite, listener="admin", sock=bind_admin_socket(path))
    held = []
    try:
        _, stats_busy = await asyncio.open_connection("127.0.0.1", port)
        stats_busy.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _, admin_busy = await asyncio.open_unix_connection(str(path))
        admin_busy.write(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        held += [stats_busy, admin_busy]
        await asyncio.sleep(0.2)  # both requests under way: every new one is refused
        for _ in range(REFUSED_LINGERING + 8):  # refused, never read nor closed here
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            held.append(writer)
        await asyncio.sleep(0.05)  # each accepted and answered
        asked: list[str] = []
        code = await asyncio.to_thread(
            run_reload, path, not_reached=lambda: asked.append("SIGHUP") or 0
        )
        assert (code, asked) == (0, ["SIGHUP"])
        stats_cap, _ = (cap for _, cap in sites.caps())
        assert stats_cap.lingering <= REFUSED_LINGERING  # never past it
    finally:
        release.set()
        for writer in held:
            writer.close()
        await sites.close()
