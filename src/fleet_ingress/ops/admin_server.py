"""The admin API, served on a Unix socket only (mode 0660): every write.

    GET    /stat                      the same snapshot as /stats.json
    POST   /fleets/{name}/state       {"state": "ready" | "drain" | "maint"}
    POST   /fleets                    {"url", "name"?, "maxconn"?, "dry_run"?}
    DELETE /fleets/{name}?force=1
    POST   /reload                    reload as SIGHUP does (a supervisor only), answered
                                      when done: last_reload's {"result", "error", ...}
    POST   /upgrade                   start an upgrade (a supervisor only): 202 {"id", ...}
    GET    /upgrade                   {"pid", "generation", "upgrades": [...]}: the outcome
    GET    /calls?fleet=&bot=&longer_than=   every live call on the host, oldest first:
                                      {"calls": [row, ...], "filter", "workers", ...};
                                      503 while LISTINGS_AT_ONCE are under way
    DELETE /calls/{id}?reason=TEXT    end that call (PID-N-TAG), end_reason admin: {"ended": row}
    GET    /environment               {"pid", "environment": {NAME: value}}: the
                                      FLEET_INGRESS_ settings of its environment

Errors answer a JSON `{"error": "..."}` that names the thing and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from fleet_ingress.config.settings import environment_settings
from fleet_ingress.config.unix_socket import not_a_socket
from fleet_ingress.core.call_list import MAX_END_REASON, CallFilter, FilterError
from fleet_ingress.logs import fields
from fleet_ingress.net.listener import ListenError
from fleet_ingress.ops.fleet_ops import FleetChangeError, FleetOps
from fleet_ingress.ops.json_in_turns import dumps_in_turns

SOCKET_MODE = 0o660

log = logging.getLogger("fleet_ingress.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Calls(Protocol):
    """The live calls, narrowly: list them, end one (a supervisor asks its
    workers; one process reads its own registry)."""

    async def list_calls(self, wanted: CallFilter) -> dict[str, Any]: ...

    async def end_call(self, text: str, why: str) -> dict[str, Any]: ...  # FleetChangeError


# `GET /calls`: 10,000 calls are 3 MB of JSON, and the listing held 4-11 MB of
# the process (rows, text, the socket's buffer) until its client read it: one
# that never did (a stuck script, a CLI stopped with ^Z) held it for good, and
# five such held 57 MB of the supervisor (the review of session 36). At most
# LISTINGS_AT_ONCE are gathered or written at once (the next one is answered
# 503, saying so), and an answer whose client reads none of it for
# LISTING_WRITE_TIMEOUT is cut (the connection closed), its memory given back.
# Of no progress, as nginx's send_timeout, not of the whole answer: one read
# all along, slower than 3 MB in 10 s (curl into an ssh pipe of 2 Mbit/s),
# was cut (review36g). It is written LISTING_PIECE at a time, each two awaiting
# the client (and the kernel's Unix socket wakes the writer once 3/4 of its
# 208 KiB are read): measured, with a deadline of 1 s a client reading 160 KB/s
# is cut, 250 KB/s not; at 10 s, some 20 KB/s, 3 MB in under 3 minutes.
LISTINGS_AT_ONCE = 2
LISTING_WRITE_TIMEOUT = 10.0  # the CLI's whole request waits as long (READ_TIMEOUT)
LISTING_PIECE = 64 * 1024


class Upgrades(Protocol):
    """The supervisor's upgrade, narrowly: start one, read how they went."""

    def begin_upgrade(self, source: str) -> dict[str, Any]: ...  # FleetChangeError if refused

    def upgrade_status(self) -> dict[str, Any]: ...


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except FleetChangeError as exc:
        return web.json_response({"error": exc.message}, status=exc.status)


# A request body still not in full after this is refused (408): one that never came
# held its connection for good, past the idle close (the control-plane audit).
BODY_TIMEOUT = 10.0


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await request.json()
    except TimeoutError:
        raise FleetChangeError(
            408, f"the request body did not arrive in full within {BODY_TIMEOUT:g} s"
        ) from None
    except ConnectionResetError:  # the client went away mid-body: no traceback, no answer read
        raise FleetChangeError(400, "the request body was cut short") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FleetChangeError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise FleetChangeError(400, "the request body must be a JSON object")
    return body


async def _send_within(
    request: web.Request, body: bytes, timeout: float, what: str
) -> web.StreamResponse:
    """Answer the JSON `body`, LISTING_PIECE at a time, or close the connection
    once its client has read none of it for `timeout` (no piece taken): the
    socket's buffer and the body go with it. Returned to aiohttp then, the
    response is not written again (its write of the closed connection ends
    the request, unlogged). A piece at a time, the transport holds some
    128 KiB of it, not a copy of the whole."""
    response = web.StreamResponse()
    response.content_type = "application/json"
    response.charset = "utf-8"
    response.content_length = len(body)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout) as deadline:
            await response.prepare(request)
            if request.method != "HEAD":
                view = memoryview(body)
                for start in range(0, len(body), LISTING_PIECE):
                    # Awaits the client once the transport holds more than 64 KiB.
                    await response.write(view[start : start + LISTING_PIECE])
                    deadline.reschedule(loop.time() + timeout)
            await response.write_eof()
    except ConnectionError:  # the client went away: nobody to answer
        pass
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        log.warning(
            "admin: a client did not read its answer in time: its connection was closed",
            extra=fields(answer=what, waited_s=timeout, bytes=len(body)),
        )
    return response


def _no_such_fleet(ops: FleetOps, wanted: CallFilter, listing: dict[str, Any]) -> None:
    """`calls --fleet NAME` of a fleet the host does not have: refused as
    drain, maint and remove-fleet refuse that name (404, the fleets named).
    It answered "0 calls on fleet f1x", exit 0, to an operator asking whether
    a fleet still carries calls (the operator-input audit of session 38).
    Not while a call lists it (a fleet removed, its calls going on, or
    closing), nor while a worker did not answer (its calls are not in the
    listing)."""
    if (
        wanted.fleet is None
        or listing.get("calls")
        or listing.get("closing")
        or ops.fleets.get(wanted.fleet) is not None
    ):
        return
    if not all(worker.get("answered") for worker in listing.get("workers") or []):
        return
    known = ", ".join(fleet.name for fleet in ops.fleets.fleets) or "none"
    raise FleetChangeError(
        404,
        f"no fleet named {wanted.fleet!r} (fleets: {known}); `fleet-ingress stat` lists them",
    )


def admin_app(
    ops: FleetOps,
    snapshot: Callable[[], dict[str, Any]],
    *,
    refresh: Callable[[], Awaitable[object]] | None = None,
    upgrade: Upgrades | None = None,
    changes_wait: Callable[[], Awaitable[object]] | None = None,
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    changed: Callable[[], None] | None = None,
    calls: Calls | None = None,
) -> web.Application:
    """`snapshot` is what `stat` answers (the same as /stats.json); `ops` makes the
    changes. `refresh` is awaited before a `stat` (a supervisor's workers' counts).
    `upgrade`: the supervisor's (`fleet-ingress upgrade`); None in one process.
    `changes_wait`: awaited before a fleet change (the slot table rebuilt after
    an upgrade's re-execution). `reload`: the supervisor's, answering with the
    outcome; None in one process. `changed`: called once a fleet change is
    over, made or refused, before it is answered (a supervisor's snapshot for
    its successor). `calls`: the live calls (`fleet-ingress calls`, `end-call`)."""

    async def ready_for_changes() -> None:
        if changes_wait is not None:
            await changes_wait()

    def change_over() -> None:
        if changed is not None:
            changed()

    def upgrades() -> Upgrades:
        if upgrade is None:
            raise FleetChangeError(
                409,
                "this ingress runs as one process and cannot upgrade in place; "
                "run it with `fleet-ingress run` (a supervisor with workers)",
            )
        return upgrade

    async def begin_upgrade(request: web.Request) -> web.Response:
        return web.json_response(upgrades().begin_upgrade("command"), status=202)

    async def upgrade_status(request: web.Request) -> web.Response:
        return web.json_response(upgrades().upgrade_status())

    async def do_reload(request: web.Request) -> web.Response:
        if reload is None:
            raise FleetChangeError(
                409, "this ingress runs as one process; reload it with SIGHUP (kill -HUP PID)"
            )
        outcome = await reload()
        return web.json_response(outcome, status=200 if outcome["result"] == "applied" else 422)

    async def stat(request: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        # Encoded in turns (json.dumps's text): 300 KB at 500 fleets, 3-5 ms in one piece.
        return web.json_response(text=await dumps_in_turns(snapshot()))

    async def set_state(request: web.Request) -> web.Response:
        body = await _json_body(request)
        await ready_for_changes()
        try:
            result = ops.set_admin_state(request.match_info["name"], str(body.get("state", "")))
        finally:
            change_over()
        return web.json_response(result)

    async def add(request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body.get("url"), str):
            raise FleetChangeError(400, "add-fleet needs a URL, e.g. https://fleet3.example.com")
        if not isinstance(body.get("name"), str | None):
            raise FleetChangeError(400, "a fleet's name is a string, e.g. fleet3")
        if body.get("name") == "":  # read as no name: the URL's host[:port], unsaid
            raise FleetChangeError(
                400, "a fleet's name cannot be empty; leave it out for the URL's host[:port]"
            )
        maxconn = body.get("maxconn")
        if maxconn is not None and (not isinstance(maxconn, int) or maxconn < 1):
            raise FleetChangeError(400, "maxconn must be a whole number of at least 1")
        admin = body.get("admin")
        if admin not in (None, "drain", "maint"):
            raise FleetChangeError(400, "a fleet is added with admin drain or maint, or without")
        await ready_for_changes()
        try:
            result = await ops.add_fleet(
                body["url"],
                name=body.get("name"),
                maxconn=maxconn,
                dry_run=bool(body.get("dry_run")),
                admin=admin,
            )
        finally:
            change_over()
        return web.json_response(result)

    async def remove(request: web.Request) -> web.Response:
        force = request.query.get("force", "") in ("1", "true", "yes")
        await ready_for_changes()
        try:
            result = await ops.remove_fleet(request.match_info["name"], force=force)
        finally:
            change_over()
        return web.json_response(result)

    def live_calls() -> Calls:
        if calls is None:
            raise FleetChangeError(409, "this ingress does not list its calls")
        return calls

    listings = 0  # under way: gathered or being written (LISTINGS_AT_ONCE)

    async def list_calls(request: web.Request) -> web.StreamResponse:
        nonlocal listings
        try:
            wanted = CallFilter.from_query(request.query)
        except FilterError as exc:
            raise FleetChangeError(400, str(exc)) from None
        source = live_calls()
        if listings >= LISTINGS_AT_ONCE:
            raise FleetChangeError(
                503,
                f"{listings} listings of the calls are under way already (other `fleet-ingress "
                "calls`, or clients not reading their answers, cut once they have read none "
                f"for {LISTING_WRITE_TIMEOUT:g} s); try again in a few seconds",
            )
        listings += 1
        try:
            listing = await source.list_calls(wanted)
            _no_such_fleet(ops, wanted, listing)
            # 10,000 calls are some 3 MB of JSON: encoded in turns.
            body = (await dumps_in_turns(listing)).encode()
            return await _send_within(request, body, LISTING_WRITE_TIMEOUT, "its calls listing")
        finally:
            listings -= 1

    async def end_one(request: web.Request) -> web.Response:
        why = request.query.get("reason", "").strip()
        if len(why) > MAX_END_REASON:
            raise FleetChangeError(
                400, f"the reason is {len(why)} characters long; {MAX_END_REASON} at most"
            )
        return web.json_response(await live_calls().end_call(request.match_info["id"], why))

    async def environment(request: web.Request) -> web.Response:
        # The one it started with: a reload or an upgrade's exec keeps it, and
        # `check` run from a shell (or as the unit's ExecReload after a
        # daemon-reload) has another.
        return web.json_response({"pid": os.getpid(), "environment": environment_settings()})

    app = web.Application(middlewares=[_errors])
    app.router.add_get("/calls", list_calls)
    app.router.add_delete("/calls/{id}", end_one)
    app.router.add_get("/stat", stat)
    app.router.add_post("/fleets/{name}/state", set_state)
    app.router.add_post("/fleets", add)
    app.router.add_delete("/fleets/{name}", remove)
    app.router.add_post("/reload", do_reload)
    app.router.add_post("/upgrade", begin_upgrade)
    app.router.add_get("/upgrade", upgrade_status)
    app.router.add_get("/environment", environment)
    return app


def socket_file_id(path: Path) -> tuple[int, int] | None:
    """The file at `path` as (device, inode), None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def remove_own_socket(path: Path, own: tuple[int, int] | None) -> None:
    """Remove the socket file at `path` only if it is still the one this process
    bound (`own`, `socket_file_id` then): once this one's was removed by hand,
    another ingress given the same path binds its own there, which a stop of this
    one removed, leaving that ingress without a way to be reached (the
    control-plane audit of session 22)."""
    if own is not None and socket_file_id(path) == own:
        path.unlink(missing_ok=True)


def bind_admin_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0660; a stale one is replaced,
    a live one (another ingress) is an error naming it, and anything else
    there (a file, a directory, or a link to one) is never touched: an error
    naming it. (A stale link to a socket is replaced, the link alone.)"""
    if (kind := not_a_socket(path)) is not None:
        raise OSError(
            f"listen.admin_socket {path} is {kind}, not a socket, and fleet-ingress "
            "replaces only a socket left there; choose a path of its own for "
            "listen.admin_socket (the default is /run/fleet-ingress/admin.sock)"
        )
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            with _bind_errors_named(path):
                path.unlink()  # left behind by a process that died
        else:
            raise OSError(f"admin socket {path} is in use: is another fleet-ingress running?")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _bind_errors_named(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            old_umask = os.umask(0o117)  # never world-accessible, not even for an instant
            try:
                sock.bind(str(path))
            finally:
                os.umask(old_umask)
            os.chmod(path, SOCKET_MODE)
    except BaseException:
        sock.close()
        raise
    sock.listen(64)
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _bind_errors_named(path: Path) -> Iterator[None]:
    """An OSError making the admin socket becomes a ListenError naming the key,
    the path and the fix: `run` said "cannot start: [Errno 13] Permission
    denied", naming neither (the CLI audit of session 32)."""
    try:
        yield
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.filename is not None and str(exc.filename) != str(path):
            reason += f" ({exc.filename})"
        if exc.errno in (errno.EACCES, errno.EPERM):
            hint = (
                "this user cannot create it in that directory: give it a directory of "
                "its own (the shipped unit makes /run/fleet-ingress, the default's, with "
                "RuntimeDirectory=)"
            )
        elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
            hint = "a file stands where its directory goes: choose a path under a directory"
        else:
            hint = "choose a path of its own (the default is /run/fleet-ingress/admin.sock)"
        raise ListenError(
            exc.errno, f"listen.admin_socket = {str(path)!r}: cannot listen: {reason}; {hint}"
        ) from None
