"""The health poller: `GET /health/fleet` on every fleet, every check_interval.

The asyncio layer around `probe.judge_health_response` (the verdict) and
`health.observe` (fall/rise). One aiohttp session per fleet holding one
kept-alive connection, with the call path's TLS settings (SNI, verification,
fleets.ca_file); a new connection for each probe while the fleet is DOWN, and
for the next one after a call could not connect (`FleetState.call_unreachable`).
A passing probe also reports the fleet's free workers; FULL follows from that
at once, without fall/rise: it is the fleet's own word.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from fleet_ingress.core.addresses import format_hostport, ip_literal_version
from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.fleet_spec import Admin, FleetSpec
from fleet_ingress.core.health import Health, observe
from fleet_ingress.core.probe import (
    MAX_HEALTH_BODY,
    ProbeResult,
    ProbeSettings,
    failed,
    judge_health_response,
    judged_against_stall,
    judged_against_starvation,
    timed_out,
)
from fleet_ingress.logs import fields
from fleet_ingress.net.cpu_wait import cpu_wait
from fleet_ingress.net.dispatch import SlotQueue
from fleet_ingress.net.tcp_connect import HOST_WIDE_FIXES, out_of_resources

log = logging.getLogger("fleet_ingress.health")


# How long, a fleet, the fleets' first probes are spread over: a probe on a new
# TLS connection costs the supervisor about 1.5 ms of CPU (the scale audit of
# session 16), so a round started within this keeps it half idle.
SPREAD_PER_FLEET = 0.003
# The longest spread (seconds), inside the wait for first verdicts before READY
# (lifecycle.FIRST_PROBE_WAIT, 5 s): past 1,300 fleets a round is denser.
MAX_SPREAD = 4.0

# Seconds between two warnings that probes were not judged (the host starved
# the prober): every fleet's probe says so at once, each interval.
STARVED_SAID_EVERY = 30.0

# Probes go at the turns of a grid of this step (seconds) on the loop's clock:
# those of fleets due within one step leave in one loop turn, one wake-up of the
# supervisor for them all, not one each (two fleets, 6 ms apart at random: 2
# wake-ups a second for 1; 16 fleets spread over 48 ms: 16 for 3; the idle
# audit of session 39). Each fleet keeps its exact schedule (every interval, at
# its own moment of the spread): a probe leaves at most this late, never early.
PROBE_TURN = 0.02

# A probe's kept-alive connection is replaced this often (seconds) even when it
# works: the certificate it noted at its handshake is then at most this old (a
# fleet's renewal clears its expiry alert within a minute), and a fleet given by
# name that moved (its DNS record changed) is probed where its calls go within a
# minute, not at the address it left. One handshake a fleet a minute.
RECONNECT_EVERY = 60.0


class _CertificateNotingConnector(aiohttp.TCPConnector):
    """Notes the expiry of the certificate each new connection's handshake got: the
    probe's response has let go of its connection by the time its body is read,
    and one connection serves many probes. If aiohttp stops calling this (a private
    method), the expiry is simply not known; the connection is made as before."""

    certificate_not_after: float | None = None

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        made = await super()._wrap_create_connection(*args, **kwargs)
        with contextlib.suppress(Exception):  # only the noting: the connection stands
            self.certificate_not_after = _not_after(made[0].get_extra_info("peercert"))
        return made


def health_session(fleet_ssl: ssl.SSLContext, settings: ProbeSettings) -> aiohttp.ClientSession:
    """A session that keeps one connection to one fleet alive between probes."""
    connector = _CertificateNotingConnector(
        limit=1,
        ssl=fleet_ssl,
        # Longer than the probe interval, or every probe pays a new handshake.
        keepalive_timeout=max(30.0, settings.interval * 3),
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False)


async def probe_fleet(
    session: aiohttp.ClientSession, spec: FleetSpec, settings: ProbeSettings
) -> ProbeResult:
    """Probe once; never raises for what a fleet or the network does."""
    # Connected to with an IPv6 zone (fe80::1%eth0), which the Host header and
    # the certificate's name leave out (RFC 6874 section 4).
    url = f"{spec.scheme}://{format_hostport(spec.host, spec.port)}{settings.health_path}"
    try:
        async with asyncio.timeout(settings.timeout):
            async with session.get(
                url,
                allow_redirects=False,
                # The body as it is: aiohttp asks for "gzip, deflate" by default, and
                # a body so compressed (a fleet's nginx with `gzip_types
                # application/json`) is not decoded here (auto_decompress=False: a
                # probe inflates no bomb), so it read as "not JSON", the fleet DOWN.
                headers={
                    "Host": spec.host_header,
                    "Accept": "application/json",
                    "Accept-Encoding": "identity",
                },
                server_hostname=spec.tls_name if spec.scheme == "https" else None,
            ) as response:
                # read(n) returns what has arrived so far: a body flushed in
                # pieces must be read whole, but never past the bound.
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > MAX_HEALTH_BODY:
                        break
                # Absent, empty or "identity": the body as it is (an empty
                # header names no coding).
                encoding = response.headers.get("Content-Encoding", "").strip()
                if response.status == 200 and encoding.lower() not in ("", "identity"):
                    said = f"Content-Encoding: {encoding[:40]}"
                    verdict = failed(f"body sent with {said}, not as JSON")
                else:
                    verdict = judge_health_response(
                        response.status, bytes(body), settings.capacity_key
                    )
                connector = session.connector
                not_after = getattr(connector, "certificate_not_after", None)
                return dataclasses.replace(verdict, certificate_not_after=not_after)
    except TimeoutError:
        return timed_out(f"timeout after {settings.timeout:g}s")
    except aiohttp.ClientConnectorCertificateError as exc:
        return failed(f"TLS error: certificate not trusted ({exc.certificate_error})")
    except aiohttp.ClientSSLError as exc:
        return failed(f"TLS error: {exc}")
    except aiohttp.ClientConnectorError as exc:
        if (want := out_of_resources(exc.os_error)) is not None:
            return not_judged_out_of(want)
        if isinstance(exc.os_error, socket.gaierror):
            return failed(
                f"name {spec.host} does not resolve: {exc.os_error.strerror or exc.os_error} "
                "(check its DNS record and this host's resolver, or give the fleet's address)"
            )
        reason = "refused" if isinstance(exc.os_error, ConnectionRefusedError) else "connect failed"
        # asyncio's loop words it "Connect call failed ('10.0.0.5', 443)" where uvloop
        # says "Connection refused": `check --probe` (asyncio) and stat (uvloop) differed.
        os_error = exc.os_error
        why = os.strerror(os_error.errno) if os_error.errno else os_error.strerror or os_error
        if ip_literal_version(spec.host) is None and ":" not in spec.host:  # a name
            # aiohttp tries each address of a name and raises the last one's error:
            # "Network is unreachable" of an AAAA read as the fleet's answer where
            # its A refused (the CLI text audit).
            why = (
                f"{why} (at the last address of {spec.host} tried; "
                f"`getent ahosts {spec.host}` lists them)"
            )
        return failed(f"{reason}: {why}")
    except aiohttp.ServerDisconnectedError:
        if spec.scheme == "https":
            # TLS 1.3: a server that requires a client certificate says so with an
            # alert after the handshake, which reads as this disconnect.
            return failed(
                "fleet closed the connection without answering (does it require a "
                "client certificate? fleet-ingress sends none)"
            )
        return failed("fleet closed the connection without answering")
    except (aiohttp.ClientError, OSError) as exc:
        if (want := out_of_resources(exc)) is not None:
            return not_judged_out_of(want)
        return failed(f"{type(exc).__name__}: {exc}")


def on_probe_turn(when: float) -> float:
    """`when` (loop time) put off to the next turn of the PROBE_TURN grid."""
    return math.ceil(round(when / PROBE_TURN, 6)) * PROBE_TURN


def not_judged_out_of(want: str) -> ProbeResult:
    """A probe this process could not make for want of descriptors or memory
    (`want`): nothing of the fleet, not counted toward fall or rise (every
    fleet's probe fails so at once, and taking them all DOWN would refuse every
    call for this host's own want)."""
    return ProbeResult(False, None, f"this process is {want}", judged=False)


def _not_after(cert: Any) -> float | None:
    """The expiry of a peer certificate as `getpeercert()` decodes it."""
    if not cert or "notAfter" not in cert:  # http://, or verify = false (an empty dict)
        return None
    try:
        return float(ssl.cert_time_to_seconds(cert["notAfter"]))
    except ValueError:
        return None


class _Batch:
    """The probe loops started together (before any of them began)."""

    __slots__ = ("begun", "size")

    def __init__(self) -> None:
        self.size = 0
        self.begun = False


class HealthPoller:
    """One probe loop per fleet; results go into the fleet's record."""

    def __init__(
        self,
        dispatcher: SlotQueue,
        fleet_ssl: ssl.SSLContext,
        settings: ProbeSettings,
        *,
        on_probe: Callable[[str, float], None] | None = None,
        on_down: Callable[[FleetState], None] | None = None,
    ) -> None:
        """`on_probe(fleet, seconds)` hears of every probe (for the duration histogram);
        `on_down(fleet)` of a fleet its probes took DOWN (its call attempts not
        answered yet are given up: `net.fleet_down`)."""
        self.dispatcher = dispatcher
        self.on_probe = on_probe
        self.on_down = on_down
        self.fleet_ssl = fleet_ssl
        self.settings = settings
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._fleets: dict[str, FleetState] = {}
        self._first_probe: dict[str, asyncio.Event] = {}
        self._starved_said_at = -STARVED_SAID_EVERY
        self._wanting_said_at = -STARVED_SAID_EVERY
        self._probed = asyncio.Condition()  # notified after every recorded probe
        self._batch = _Batch()

    def start(self, fleet: FleetState) -> None:
        if self._fleets.get(fleet.name) is fleet:
            return
        # A fleet record of the same name still probed (an old address, going away):
        # this one replaces it at once.
        if (old := self._fleets.get(fleet.name)) is not None:
            self.stop_probing(old)
        self._fleets[fleet.name] = fleet
        self._first_probe[fleet.name] = asyncio.Event()
        self._loops[fleet.name] = self._begin(fleet)

    def _begin(self, fleet: FleetState) -> asyncio.Task[None]:
        if self._batch.begun:
            self._batch = _Batch()
        self._batch.size += 1
        return asyncio.get_running_loop().create_task(
            self._run(fleet, self._batch), name=f"health:{fleet.name}"
        )

    @staticmethod
    def _spread(batch: _Batch) -> float:
        """When a fleet's probing starts: each fleet at its own moment within
        SPREAD_PER_FLEET a fleet started with it, not all at once.
        Started together, every fleet's probe left in the same instant each
        interval, with one shared deadline: past about 150 fleets a round of
        new connections (at start, after an upgrade or a reload, while fleets
        are DOWN) took the supervisor longer than the timeout, every probe
        failed at once and kept failing, every fleet DOWN (the scale audit of
        session 16; HAProxy spreads its checks too). A fleet is INIT, taking no
        call, until its first verdict, so a few fleets are not held back for
        many fleets' sake, and a long interval does not hold any back.
        Not cut to the probe's timeout or the interval (1 s): past about 330
        fleets that crowded the round again, and at 800 (1.2 s of the
        supervisor's CPU for the round's handshakes) 683 fleets went from INIT
        to DOWN at start, all UP only 8 s later (the scale audit of session 32).
        Drawn as a loop begins, once the fleets started with it are all
        counted: drawn as each was started, the first fleets of a start had a
        window of a few ms, the round crowded at its beginning. A fleet started
        alone (add-fleet) is not held back for the fleets probed already."""
        batch.begun = True
        window = min(SPREAD_PER_FLEET * batch.size, MAX_SPREAD)
        return random.uniform(0.0, window)

    def stop_probing(self, fleet: FleetState) -> asyncio.Task[None] | None:
        """Stop probing this fleet record (never another one of the same name, such as
        the fleet that replaced it); returns the cancelled loop, to be awaited."""
        if self._fleets.get(fleet.name) is not fleet:
            return None
        del self._fleets[fleet.name]
        self._first_probe.pop(fleet.name, None)
        task = self._loops.pop(fleet.name)
        task.cancel()
        return task

    async def stop(self, fleet: FleetState) -> None:
        if (task := self.stop_probing(fleet)) is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def probe_once(self, spec: FleetSpec) -> ProbeResult:
        """The probe this poller sends, once, to a fleet it does not probe (yet),
        on a connection of its own: an operator's pre-check of a new fleet."""
        async with health_session(self.fleet_ssl, self.settings) as session:
            return await probe_fleet(session, spec, self.settings)

    async def wait_first_probes(self, timeout: float) -> bool:
        """Wait (at most `timeout`) until every polled fleet has had a verdict
        (a fleet in MAINT is not probed, so it is not waited for)."""
        waits = [
            event.wait()
            for name, event in self._first_probe.items()
            if (fleet := self._fleets.get(name)) is None or fleet.admin is not Admin.MAINT
        ]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waits)
        except TimeoutError:
            return False
        return True

    async def wait_for(
        self, fleet: FleetState, predicate: Callable[[FleetState], bool], timeout: float
    ) -> bool:
        """Wait (at most `timeout`) until a probe leaves `fleet` matching `predicate`."""
        try:
            async with asyncio.timeout(timeout), self._probed:
                await self._probed.wait_for(lambda: predicate(fleet))
        except TimeoutError:
            return False
        return True

    async def reconfigure(self, fleet_ssl: ssl.SSLContext, settings: ProbeSettings) -> None:
        """New probe settings or fleet TLS: restart every loop with them. Health
        state lives in the fleet records, so nothing is forgotten."""
        if fleet_ssl is self.fleet_ssl and settings == self.settings:
            return
        self.fleet_ssl, self.settings = fleet_ssl, settings
        stopping = list(self._loops.items())
        for _, task in stopping:
            task.cancel()
        await asyncio.gather(*(task for _, task in stopping), return_exceptions=True)
        for name, task in stopping:
            if self._loops.get(name) is not task:  # stopped, or replaced, meanwhile
                continue
            fleet = self._fleets.get(name)
            if fleet is not None:
                self._loops[name] = self._begin(fleet)

    async def close(self) -> None:
        for fleet in list(self._fleets.values()):
            await self.stop(fleet)

    async def _run(self, fleet: FleetState, batch: _Batch) -> None:
        """Probe `fleet` every interval, the first within its batch's spread."""
        loop = asyncio.get_running_loop()
        spread = self._spread(batch)
        session = health_session(self.fleet_ssl, self.settings)
        session_since = loop.time()
        unexpected = False  # the last probe raised
        try:
            next_at = loop.time() + spread
            await asyncio.sleep(on_probe_turn(next_at) - loop.time())
            while True:
                if fleet.admin is not Admin.MAINT:  # MAINT: not probed at all
                    renew = loop.time() - session_since >= RECONNECT_EVERY
                    if fleet.fresh_probe or fleet.health is Health.DOWN or renew:
                        # On a new connection, as a call makes: the kept one may
                        # work where new ones fail (FleetState.call_unreachable),
                        # and serve a certificate the fleet has since renewed.
                        fleet.fresh_probe = False
                        await session.close()
                        session = health_session(self.fleet_ssl, self.settings)
                        session_since = loop.time()
                    try:
                        await self._probe(session, fleet)
                        unexpected = False
                    except Exception as exc:
                        # A fleet's answer that no check foresaw (or a bug here)
                        # fails one probe; it must not end the fleet's probing,
                        # which would leave it UP, unprobed, for good.
                        if not unexpected:  # the first of a run: not a traceback a second
                            log.exception(
                                "health probe failed unexpectedly; probing goes on",
                                extra=fields(fleet=fleet.name),
                            )
                        unexpected = True
                        self.record(
                            fleet, failed(f"probe failed: {type(exc).__name__}: {exc}"), 0, 0.0
                        )
                        fleet.fresh_probe = True  # the session may be what broke
                # Fixed rate: a probe that took its whole timeout does not
                # push every later probe back.
                next_at = max(next_at + self.settings.interval, loop.time())
                await asyncio.sleep(on_probe_turn(next_at) - loop.time())
        finally:
            await session.close()

    async def _probe(self, session: aiohttp.ClientSession, fleet: FleetState) -> None:
        started = time.monotonic()
        # Calls opened after this are not in its number, nor may those in flight now be.
        opened_before = fleet.probe_sending(started)
        waited_before = cpu_wait()
        result = await probe_fleet(session, fleet.spec, self.settings)
        took = time.monotonic() - started
        if result.timed_out and waited_before is not None and (now := cpu_wait()) is not None:
            result = judged_against_starvation(result, now - waited_before, self.settings.timeout)
        timeout = self.settings.timeout
        result = judged_against_stall(result, took - timeout, timeout)
        self.record(fleet, result, opened_before, took, sent_at=started)
        async with self._probed:
            self._probed.notify_all()

    def record(
        self,
        fleet: FleetState,
        result: ProbeResult,
        opened_before: int,
        seconds: float,
        *,
        sent_at: float | None = None,
    ) -> None:
        """Apply one probe's result to the fleet (health, capacity) and wake the
        queue. A pass sent (`sent_at`, monotonic) before refused calls took the
        fleet DOWN is counted as a probe, not as a verdict."""
        fleet.last_probe, fleet.last_probe_seconds = result, seconds
        fleet.last_probe_at, fleet.last_probe_monotonic = time.time(), time.monotonic()
        fleet.probes_total += 1
        if result.passed or result.certificate_not_after is not None:
            # A pass over a connection with no verified certificate (http://, or
            # fleets.verify turned off by a reload) says no date is known now.
            fleet.certificate_not_after = result.certificate_not_after
        if self.on_probe is not None:
            self.on_probe(fleet.name, seconds)
        if not result.judged:  # this host's stall or want, not the fleet's: no verdict
            self._say_not_judged(result)
            self._probe_recorded(fleet)
            return
        if not result.passed:
            fleet.check_failures += 1
        before = fleet.health
        # A pass over the old connection, maybe: the next probe, on a new one, tells.
        stale = result.passed and sent_at is not None and fleet.probe_predates_down(sent_at)
        if not stale:
            if result.passed:
                fleet.probe_counted(result.capacity, opened_before)
            fleet.health, fleet.health_streak = observe(
                before,
                fleet.health_streak,
                result.passed,
                fall=self.settings.fall,
                rise=self.settings.rise,
            )
        if fleet.health is Health.DOWN:
            fleet.reported_available = None  # what a dead fleet last said is no longer known
        if fleet.health is not before:
            fleet.call_failures = 0  # a streak of refused calls is of the state before
            level = logging.WARNING if fleet.health is Health.DOWN else logging.INFO
            log.log(
                level,
                f"fleet {fleet.health.value}",
                extra=fields(
                    fleet=fleet.name,
                    before=before.value,
                    after=fleet.health.value,
                    reason=result.reason,
                    capacity=result.capacity,
                ),
            )
            if fleet.health is Health.DOWN and self.on_down is not None:
                self.on_down(fleet)
        now = time.monotonic()
        if (said := fleet.full_log.probed(fleet.out_of_workers, now)) is not None:
            episode = fleet.full_log.episode(now) if said == "fleet has room" else {}
            log.info(
                said,
                extra=fields(fleet=fleet.name, estimated_available=fleet.estimated_free, **episode),
            )
        self._probe_recorded(fleet)

    def _probe_recorded(self, fleet: FleetState) -> None:
        """After any probe of `fleet` is recorded: the queue may be served, and
        its first probe is in."""
        self.dispatcher.wake()
        first = self._first_probe.get(fleet.name)
        if first is not None:
            first.set()

    def _say_not_judged(self, result: ProbeResult) -> None:
        """Once a STARVED_SAID_EVERY at most, for each cause: every fleet's probe
        says it at once."""
        now = time.monotonic()
        if not result.timed_out:  # this process out of descriptors or memory
            if now - self._wanting_said_at < STARVED_SAID_EVERY:
                return
            self._wanting_said_at = now
            log.warning(
                "health probes could not connect: this process is out of descriptors or "
                "memory; not counted against the fleets, which keep their state meanwhile "
                "(one DOWN stays DOWN, its calls refused, until a probe can be made). "
                f"EMFILE: raise LimitNOFILE (systemd) or ulimit -n; {HOST_WIDE_FIXES}",
                extra=fields(reason=result.reason),
            )
            return
        if now - self._starved_said_at < STARVED_SAID_EVERY:
            return
        self._starved_said_at = now
        log.warning(
            "health probes timed out while this host kept the prober from running: "
            "not counted against the fleets (they keep their state); find what takes "
            "the CPU (top; the unit's CPUQuota), or what stopped the supervisor "
            "(a debugger, SIGSTOP, the VM paused)",
            extra=fields(reason=result.reason),
        )
