"""The running ingress: listeners, the fleet set and the registry of calls."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import resource
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fleet_ingress.config.config_diff import NOTHING_CHANGED, settings_changed
from fleet_ingress.config.fleets_file import (
    FleetsFileError,
    load_fleets_file,
    same_host_warnings,
)
from fleet_ingress.config.settings import ConfigError, IngressConfig, ListenSection, load_config
from fleet_ingress.core.accept_order import AcceptOrder
from fleet_ingress.core.addresses import parse_hostport
from fleet_ingress.core.balancer import Balancer, FleetState
from fleet_ingress.core.call_list import (
    CallFilter,
    CallIdError,
    no_such_call,
    oldest_first,
    parse_call_id,
    process_gone,
    whole_id_wanted,
)
from fleet_ingress.core.call_machine import EndReason
from fleet_ingress.core.certificate_change import LeafFacts, reload_note, renewal_problem
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.core.health import Health
from fleet_ingress.core.probe import ProbeSettings
from fleet_ingress.core.retry import RetryPolicy
from fleet_ingress.core.routing import Router
from fleet_ingress.core.silence import SilencePolicy
from fleet_ingress.logs import RateLimitedLog, fields
from fleet_ingress.net.acme import (
    ACME_DESCRIPTORS,
    ACME_LINGER_SECONDS,
    AcmeProtocol,
    AcmeSettings,
)
from fleet_ingress.net.calls import Registry, end_call, list_live_then_closing, process_tag
from fleet_ingress.net.dispatch import Dispatcher, SlotSource
from fleet_ingress.net.fleet_down import give_up_attempts
from fleet_ingress.net.head_queue import HeadQueue
from fleet_ingress.net.host_addresses import AddressSweep
from fleet_ingress.net.late_timers import patient_timeout, wait_patiently
from fleet_ingress.net.listener import (
    CarrierListener,
    bind_errors_named,
    bind_tcp,
    connections_within,
)
from fleet_ingress.net.liveness import TcpLiveness
from fleet_ingress.net.loop_lag import LoopLagProbe
from fleet_ingress.net.proxy import (
    GOODBYE_BOUNDARY_WAIT,
    GOODBYE_REPLY_WAIT,
    OUT_OF_RESOURCES_EVERY,
    REFUSED_LINES_PER_SECOND,
    WARNING_LINES_PER_SECOND,
    ProxyContext,
    refused_log,
)
from fleet_ingress.net.tls import (
    CarrierPem,
    TLSSetupError,
    fleet_ssl_context,
    leaf_facts_of,
    read_pem,
)
from fleet_ingress.ops.fleet_ops import FleetChangeError, FleetOps
from fleet_ingress.ops.metrics import IngressMetrics
from fleet_ingress.ops.reload_outcome import (
    LISTENER_NOT_MOVED,
    REFUSED_RELOAD_STATUS,
    WSS_NOT_MOVED,
    reload_outcome,
    was_refused,
)
from fleet_ingress.ops.snapshot import snapshot
from fleet_ingress.service.carrier_certificate import (
    carrier_ssl_context,
    read_carrier_pem,
    serves_alike,
    serving_leaf,
    warn_about_chain,
)

if TYPE_CHECKING:
    from fleet_ingress.net.poller import HealthPoller
    from fleet_ingress.ops.web_sites import WebSites

log = logging.getLogger("fleet_ingress.server")

# After the drain, how long closed calls may take to finish their TLS close:
# 1 s, after the close frame each side is told why (its frame boundary and its
# reply waited for, at most GOODBYE_BOUNDARY_WAIT + GOODBYE_REPLY_WAIT).
CLOSE_AT_STOP_TIMEOUT = 1.0 + GOODBYE_BOUNDARY_WAIT + GOODBYE_REPLY_WAIT
# What a worker's supervisor allows it past its drain's end (its calls' close,
# a :80 challenge's answer, its exit) before it kills it: the worker's own
# waits after the drain end within it (the supervisor's clock starts later).
STOP_GRACE = 5.0
# Of STOP_GRACE, what a worker keeps for its exit after its last wait: its
# listeners and connections closed, its last lines written, the process gone.
EXIT_ROOM = 1.0


class Ingress:
    """One ingress process's serving state, built from a config and fleets.

    In-process (tests, and the call path's own benchmarks) it is the whole
    ingress: listeners, its own `Dispatcher`, the poller, stats and admin.
    In a worker of `fleet-ingress run` (`leases` given) it serves carriers
    only: its calls take slots from the supervisor's coordinator, on the
    listeners the supervisor bound (`sockets`); the supervisor owns the
    fleets, their health, stats and admin."""

    def __init__(
        self,
        config: IngressConfig,
        fleets: Sequence[FleetSpec],
        *,
        server_ssl: ssl.SSLContext | None = None,
        fleet_ssl: ssl.SSLContext | None = None,
        health_checks: bool = True,
        leases: SlotSource | None = None,
        sockets: Mapping[str, socket.socket] | None = None,
        pem: CarrierPem | None = None,
        ticket_keys: bytes | None = None,
        accept_rank: int = 0,
    ) -> None:
        """`health_checks=False` counts every fleet as UP and probes none
        (tests of the call path alone; never what `run` does). `sockets`:
        listening sockets already bound, by config key (`listen.wss`,
        `listen.acme`), used instead of binding. `pem`: the certificate and
        key to serve, read from tls.cert and tls.key already (a worker's: the
        ones the supervisor serves), not the files. `ticket_keys`: the keys
        its session tickets are sealed with (a worker's: the supervisor's, the
        same in every worker); None: OpenSSL's own. `accept_rank`: a worker's
        rank in its generation, for process.accept (`core.accept_order`)."""
        self.worker = leases is not None
        self.accept_rank = accept_rank
        if self.worker:
            health_checks = False  # the supervisor probes, once for the host
        self.leases: SlotSource | None = leases
        self.sockets = dict(sockets or {})
        self.config = config
        # What the carrier context was built from (None: a context given, not
        # known): a reload that changes none of it keeps the context.
        self.serving_pem: CarrierPem | None = None
        self.ticket_keys = ticket_keys
        if server_ssl is None:
            if config.tls.cert is None or config.tls.key is None:
                raise ValueError("tls.cert and tls.key must be set to serve the carrier listener")
            if pem is None:
                pem = read_carrier_pem(config)
            server_ssl = carrier_ssl_context(config, pem, ticket_keys)
            self.serving_pem = pem
        if fleet_ssl is None:
            fleet_ssl = fleet_ssl_context(
                verify=config.fleets.verify, ca_file=config.fleets.ca_file
            )
        self.server_ssl = server_ssl
        # The one owner of fleet membership; the balancer, reloads and fleet changes
        # all go through it.
        self.fleet_set = FleetSet.from_specs(
            fleets,
            capacity_aware=config.fleets.capacity_aware,
            health=Health.INIT if health_checks else Health.UP,
        )
        self.balancer = Balancer(self.fleet_set)
        self.dispatcher = Dispatcher(
            self.balancer,
            queue_timeout=config.timeouts.queue,
            max_queue=config.limits.max_queue,
            fall=_passive_fall(config, probed=health_checks),
        )
        self.registry = Registry()
        # Calls on an address that moved to another host (a failover) end soon after.
        self.address_sweep = AddressSweep(self.registry)
        self.refusals = RateLimitedLog(
            refused_log,
            REFUSED_LINES_PER_SECOND,
            call_later=lambda delay, then: asyncio.get_running_loop().call_later(delay, then),
        )
        self.attempt_failures = RateLimitedLog(
            logging.getLogger("fleet_ingress.proxy"),
            WARNING_LINES_PER_SECOND,
            call_later=lambda delay, then: asyncio.get_running_loop().call_later(delay, then),
            level=logging.WARNING,
        )
        self.out_of_resources = RateLimitedLog(
            logging.getLogger("fleet_ingress.proxy"),
            1,
            call_later=lambda delay, then: asyncio.get_running_loop().call_later(delay, then),
            level=logging.WARNING,
            every=OUT_OF_RESOURCES_EVERY,
        )
        self.acme_failures = RateLimitedLog(
            logging.getLogger("fleet_ingress.acme"),
            WARNING_LINES_PER_SECOND,
            call_later=lambda delay, then: asyncio.get_running_loop().call_later(delay, then),
            level=logging.WARNING,
        )
        self.acme_relayed = RateLimitedLog(
            logging.getLogger("fleet_ingress.acme"),
            REFUSED_LINES_PER_SECOND,
            call_later=lambda delay, then: asyncio.get_running_loop().call_later(delay, then),
        )
        # Both listeners' heads, parsed a bounded amount per turn; their CPU counted
        # as new connections' (accept pacing).
        self.heads = HeadQueue(meter=self.registry.new_connection_cpu)
        self.started_at = time.monotonic()  # for uptime: a wall-clock step moves no age
        # The certificate served now (None: unreadable, shown as unknown; `check`
        # names why): what a reload's certificate is judged against.
        self.serving_leaf = serving_leaf(config, pem)
        self.reloads: Counter[str] = Counter()  # "applied" / "refused"
        self.last_reload: dict[str, Any] | None = None  # shown by stat while it was refused
        # One reload at a time, read and apply together: two asked close together
        # (the supervisor's after a late answer, a SIGHUP sent to every process
        # of the unit) would otherwise race their reads off the loop, and the
        # older files could be applied last.
        self._reload_lock = asyncio.Lock()
        # The call counters of the fleet records dropped as their fleets left
        # the set, summed: the "(removed)" row's (`FleetOps.forgotten_counts`).
        self.fleets_forgotten: Counter[tuple[str, ...]] = Counter()
        self.metrics = IngressMetrics(
            self.balancer,
            self.registry,
            self.dispatcher,
            certificate_not_after=lambda: self.certificate_not_after,
            reloads=lambda: self.reloads,
            forgotten=lambda: self.fleets_forgotten,
        )
        # Sampled while a carrier is connected (or its handshake under way):
        # an idle worker's loop lag is felt by no call, and its timer would be
        # the worker's only wake-up but the report's. A connection counted wakes it.
        registry = self.registry
        self.loop_lag = LoopLagProbe(
            self.metrics.loop_lag_observed,
            busy=lambda: bool(
                registry.connections
                or registry.calls
                or registry.closing
                or registry.handshaking > 0
            ),
        )
        registry.on_counted.append(self.loop_lag.wake)
        self.stopping = False  # a stop has begun: listeners closed, calls draining
        self.bound_listen = config.listen  # a reload cannot move listeners
        self._drain_cut = asyncio.Event()
        # A stop's drain ends no later than this (time.monotonic()): an upgrade's
        # long drain shortened by a plain stop (`shorten_drain`).
        self._drain_cap: float | None = None
        self._drain_moved = asyncio.Event()
        self.poller: HealthPoller | None = None
        if health_checks:
            # Imported here: a worker probes nothing and serves no web app, and
            # starts without aiohttp (a quarter of its imports' time).
            from fleet_ingress.net.poller import HealthPoller

            self.poller = HealthPoller(
                self.dispatcher,
                fleet_ssl,
                probe_settings(config),
                on_probe=self.metrics.checks.check_observed,
                on_down=self._fleet_went_down,
            )
        self.ops = FleetOps(
            self.fleet_set,
            self.dispatcher,
            self.registry,
            self.poller,
            settings=lambda: self.config.fleets,
            checks=self.metrics.checks,
            forgotten_counts=self.fleets_forgotten,
        )
        self.dispatcher.on_release.append(self.ops.reap)
        self.dispatcher.on_down.append(self._fleet_went_down)
        self.ctx = self._proxy_context(config, fleet_ssl)
        self._wss: CarrierListener | None = None
        self._acme: asyncio.Server | None = None
        self._acme_heads_kept = False  # an upgrade's stop keeps :80 connections with no head
        self._web: WebSites | None = None  # the stats and admin apps, not in a worker
        self.stats_address: tuple[str, int] | None = None
        self.admin_socket: Path | None = None
        self._admin_socket_id: tuple[int, int] | None = None

    def _fleet_went_down(self, fleet: FleetState) -> None:
        """A fleet this process probes went DOWN: its call attempts not answered
        yet are given up and tried again (`net.fleet_down`)."""
        give_up_attempts(self.registry, fleet)

    def _proxy_context(self, config: IngressConfig, fleet_ssl: ssl.SSLContext) -> ProxyContext:
        configured = config.limits.max_connections
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        max_connections = configured
        if descriptors != resource.RLIM_INFINITY:
            acme = ACME_DESCRIPTORS if self._serves_acme else 0
            max_connections = connections_within(descriptors, configured, acme_connections=acme)
        return ProxyContext(
            router=Router(config.routes.proxy, config.routes.health),
            slots=self.dispatcher if self.leases is None else self.leases,
            registry=self.registry,
            retry=RetryPolicy(
                retries=config.retry.retries,
                conditions=config.retry.retry_conditions,
                statuses=config.retry.retry_statuses,
            ),
            fleet_ssl=fleet_ssl,
            connect_timeout=config.timeouts.connect,
            response_timeout=config.timeouts.response,
            request_timeout=config.timeouts.request,
            silence=SilencePolicy(
                tunnel=config.timeouts.tunnel,
                carrier=config.timeouts.carrier_silence,
                fleet=config.timeouts.fleet_silence,
                stalled=config.timeouts.tcp_user_timeout,
                route_carrier=dict(config.routes.carrier_silence),
                route_fleet=dict(config.routes.fleet_silence),
            ),
            max_head_bytes=config.limits.max_header_bytes,
            max_header_count=config.limits.max_header_count,
            max_connections=max_connections,
            descriptor_limit=None if max_connections == configured else descriptors,
            new_connection_share=config.limits.new_connection_share,
            access_log=config.log.access,
            close_flush_timeout=config.timeouts.close_flush,
            liveness=TcpLiveness(
                user_timeout=config.timeouts.tcp_user_timeout,
                keepalive_idle=config.timeouts.keepalive_idle,
                keepalive_interval=config.timeouts.keepalive_interval,
                keepalive_probes=config.limits.keepalive_probes,
            ),
            refusals=self.refusals,
            attempt_failures=self.attempt_failures,
            out_of_resources=self.out_of_resources,
            heads=self.heads,
        )

    async def start(self) -> None:
        if self.poller is not None:
            for fleet in self.balancer.fleets:
                self.poller.start(fleet)
        if not self.config.fleets.verify and not self.worker:  # said once, by the supervisor
            log.warning(
                "fleets.verify = false: fleet certificates are not checked, so anyone on the "
                "path to a fleet can read and alter calls; prefer fleets.ca_file for a private CA"
            )
        if not self.worker:
            warn_same_host(fleet.spec for fleet in self.balancer.fleets)
            warn_about_chain(self.config)
        listen = self.config.listen
        loop = asyncio.get_running_loop()
        self._wss = CarrierListener(
            self._listener("wss", listen.wss),
            lambda: self.ctx,
            lambda: self.server_ssl,
            order=AcceptOrder(self.accept_rank, self.config.process.accept),
        )
        self._wss.start()
        if not self.worker:  # the supervisor says where it listens, once
            log.info(
                "listening",
                extra=fields(
                    listener="wss", address=self.wss_address, fleets=len(self.balancer.fleets)
                ),
            )
        if self._serves_acme:
            self._acme = await loop.create_server(
                lambda: AcmeProtocol(self._acme_settings), sock=self._listener("acme", listen.acme)
            )
            if not self.worker:
                log.info("listening", extra=fields(listener="acme", address=self.acme_address))
        if not self.worker:
            await self._serve_operator_sites(listen)
        self.loop_lag.start()

    async def _serve_operator_sites(self, listen: ListenSection) -> None:
        """The stats and admin apps (a worker's are the supervisor's)."""
        from aiohttp import web

        from fleet_ingress.ops.admin_server import admin_app, bind_admin_socket, socket_file_id
        from fleet_ingress.ops.stats_server import stats_app
        from fleet_ingress.ops.web_sites import OperatorConnectionsCollector, WebSites

        self._web = WebSites()
        self.metrics.prometheus.register(OperatorConnectionsCollector(self._web))
        if listen.stats:
            host, port = parse_hostport(listen.stats, what="listen.stats")
            with bind_errors_named("stats", listen.stats):
                listening = bind_tcp(host, port, backlog=128)  # as the supervisor binds it
            app = stats_app(self.snapshot, self.metrics.prometheus)
            runner = await self._web.serve(app, web.SockSite, listener="stats", sock=listening)
            sock = runner.addresses[0]
            self.stats_address = (sock[0], sock[1])
            log.info("listening", extra=fields(listener="stats", address=self.stats_address))
        if listen.admin_socket:
            path = Path(listen.admin_socket)
            sock = bind_admin_socket(path)
            await self._web.serve(
                admin_app(self.ops, self.snapshot, calls=self),
                web.SockSite,
                listener="admin",
                sock=sock,
            )
            self.admin_socket = path
            self._admin_socket_id = socket_file_id(path)
            log.info("listening", extra=fields(listener="admin", address=str(path)))

    @property
    def _serves_acme(self) -> bool:
        """Whether this process serves `:80`. A worker serves what the supervisor
        bound at its start and hands it, whatever a reload made of listen.acme
        since ("takes effect at the next restart"): a replacement or an upgrade's
        worker started after a reload that set it bound :80 itself, and the next
        one failed "Address already in use" (a worker short, an upgrade refused);
        after one that emptied it, nothing accepted on the socket still bound,
        and every :80 connection hung (the :80 audit of session 32)."""
        if self.worker:
            return "listen.acme" in self.sockets
        return bool(self.bound_listen.acme)

    def _listener(self, key: str, address: str) -> socket.socket:
        """The socket for `listen.<key>`: handed over by the supervisor, or bound here."""
        given = self.sockets.get(f"listen.{key}")
        if given is not None:
            given.setblocking(False)
            return given
        host, port = parse_hostport(address, what=f"listen.{key}")
        with bind_errors_named(key, address):
            return bind_tcp(host, port)

    async def list_calls(self, wanted: CallFilter) -> dict[str, Any]:
        """`fleet-ingress calls` of an ingress run as one process (generation 1)."""
        pid = os.getpid()
        rows: list[dict[str, Any]] = []
        closing: list[dict[str, Any]] = []
        async for is_closing, part in list_live_then_closing(self.registry, wanted, pid, 1):
            (closing if is_closing else rows).extend(part)
        return {
            "calls": oldest_first(rows),
            "closing": oldest_first(closing),
            "filter": wanted.to_wire(),
            "workers": [
                {
                    "pid": pid,
                    "generation": 1,
                    "answered": True,
                    "calls": len(rows),
                    "closing": len(closing),
                }
            ],
            "channel_lost": [],
        }

    async def end_call(self, text: str, why: str) -> dict[str, Any]:
        try:
            pid, number, tag = parse_call_id(text)
        except CallIdError as exc:
            raise FleetChangeError(400, str(exc)) from None
        if pid != os.getpid():
            said = f"this ingress is pid {os.getpid()}"
            raise FleetChangeError(
                404, no_such_call(text, said) if tag is None else process_gone(text, said)
            )
        if tag is None:
            raise FleetChangeError(400, whole_id_wanted(text))
        if tag != process_tag():
            raise FleetChangeError(
                404,
                process_gone(
                    text, f"pid {pid} here is an ingress whose calls are {pid}-N-{process_tag()}"
                ),
            )
        row = await end_call(self.registry, number, why, pid, 1)
        if row is None:
            raise FleetChangeError(404, no_such_call(text, "it has ended, or never was"))
        return {"ended": row, "reason": why}

    def snapshot(self) -> dict[str, Any]:
        snap = snapshot(
            self.balancer,
            self.registry,
            self.dispatcher,
            started_at=self.started_at,
            certificate_not_after=self.certificate_not_after,
            capacity_key=self.config.fleets.capacity_key,
            stopping=self.stopping,
            last_reload=self.last_reload,
            acme_listening=self._acme is not None,
            histograms=self.metrics.histograms,
            forgotten=self.fleets_forgotten,
        )
        if not self.worker:  # a worker's listeners are its supervisor's
            snap["listeners_not_moved"] = listeners_not_moved_notes(self.bound_listen, self.config)
        return snap

    @property
    def wss_address(self) -> tuple[str, int]:
        assert self._wss is not None, "start() first"
        return self._wss.address

    @property
    def acme_address(self) -> tuple[str, int]:
        assert self._acme is not None, "listen.acme is off, or start() first"
        sockname = self._acme.sockets[0].getsockname()
        return sockname[0], sockname[1]

    @property
    def _acme_settings(self) -> AcmeSettings:
        config = self.config
        host, port = parse_hostport(config.acme.upstream, what="acme.upstream")
        return AcmeSettings(
            upstream_host=host,
            upstream_port=port,
            redirect_https=config.acme.redirect_https,
            request_timeout=config.timeouts.request,
            connect_timeout=config.timeouts.connect,
            response_timeout=config.timeouts.response,
            max_head_bytes=config.limits.max_header_bytes,
            max_header_count=config.limits.max_header_count,
            refusals=self.refusals if config.log.access else None,
            heads=self.heads,
            connections=self.registry.acme,
            upstream_failures=self.acme_failures,
            relayed=self.acme_relayed if config.log.access else None,
        )

    @property
    def certificate_not_after(self) -> float | None:
        """When the certificate served now expires (None: not known)."""
        return None if self.serving_leaf is None else self.serving_leaf.not_after

    def status_line(self) -> str:
        """One line for systemd's STATUS= and logs: calls and fleets at a glance."""
        fleets = self.balancer.fleets
        up = sum(1 for f in fleets if f.health is Health.UP)
        eligible = sum(1 for f in fleets if f.takes_calls)
        return (
            f"{len(self.registry.tunnels())} calls, {up}/{len(fleets)} fleets up, "
            f"{eligible} taking calls, queue {self.dispatcher.queue_length}"
            + (REFUSED_RELOAD_STATUS if was_refused(self.last_reload) else "")
        )

    async def reload(
        self,
        config_path: Path,
        config: IngressConfig | None = None,
        pem: CarrierPem | None = None,
        ticket_keys: bytes | None = None,
    ) -> str:
        """Reload configuration, fleets file and certificate in place.

        Everything is read and validated first; any error refuses the whole
        reload (raises ReloadRefused) and the running configuration stays.
        Established calls keep the TLS sessions and fleets they started with;
        the silence limits (timeouts.tunnel, carrier_silence, fleet_silence and
        their route overrides) apply to them where longer (a reload never ends a
        call). Reloads apply in the order asked. `config`: the configuration to
        apply, read and checked already (a worker's, sent by the supervisor with
        its `reload`); `config_path` is then not read.
        `pem`: the certificate and key to serve, likewise (its tls.cert and
        tls.key are then not read), and `ticket_keys` the keys to seal session
        tickets with (the supervisor's; None: OpenSSL's own)."""
        async with self._reload_lock:
            try:
                changes = await self._reload(config_path, config, pem, ticket_keys)
            except ReloadRefused as exc:
                self.last_reload = reload_outcome(str(exc))
                raise
            self.last_reload = reload_outcome(None, changes)
            return changes

    async def _reload(
        self,
        config_path: Path,
        given: IngressConfig | None,
        pem: CarrierPem | None,
        ticket_keys: bytes | None,
    ) -> str:
        try:
            # Off the loop, which carries every call's frames meanwhile: the
            # fleets' TLS context reads the system's trust store (20 ms measured).
            new = await read_reload_settled(
                self.ops,
                config_path,
                fleets=not self.worker,
                serving=self.serving_leaf,
                config=given,
                pem=pem,
                ticket_keys=ticket_keys,
            )
        except ReloadRefused:
            self.reloads["refused"] += 1
            raise
        config, specs, server_ssl, fleet_ssl, leaf, pem = new
        # A worker's listeners and fleets are the supervisor's, which says what changed.
        notes = [] if self.worker else listener_notes(self.bound_listen, config)
        if not self.worker and (settings := settings_changed(self.config, config)):
            notes.append(f"applied: {settings}")
        if not self.worker and (
            certificate := reload_note(leaf, self.serving_leaf, pem, self.serving_pem)
        ):
            notes.append(certificate)
        # New handshakes get a new context, live TLS sessions keep theirs. A new one,
        # not load_cert_chain into the old: OpenSSL keeps one certificate per key type,
        # so a renewal from ECDSA to RSA would leave the old ECDSA one served; and no
        # session from before resumes into it (its cache and ticket keys are its own).
        # But only when what goes into it changed: a new one for a reload of fleets
        # or timeouts made every carrier's next connection a full handshake (about
        # twice a resumption's time; the renewal audit of session 33).
        if self.serving_pem is None or not (
            serves_alike(self.config, self.serving_pem, config, pem)
            and ticket_keys == self.ticket_keys
        ):
            self.server_ssl = server_ssl
            self.serving_pem, self.ticket_keys = pem, ticket_keys
        self.serving_leaf = leaf
        self.config = config
        self.ctx = self._proxy_context(config, fleet_ssl)
        self.registry.sweep.relimit(self.ctx.silence)
        self.dispatcher.queue_timeout = config.timeouts.queue
        self.dispatcher.max_queue = config.limits.max_queue
        self.dispatcher.fall = _passive_fall(config, probed=self.poller is not None)
        if not self.worker:
            notes += self.apply_fleets(specs, config)
            notes += warn_same_host(specs)  # said at each reload, as check says it
        if self.poller is not None:
            await self.poller.reconfigure(fleet_ssl, probe_settings(config))
        if self._wss is not None:
            self._wss.set_accept(config.process.accept)  # at once, as its note says
        self.dispatcher.wake()
        self.reloads["applied"] += 1
        # A renewal is what usually brings a new chain; judged off the loop (reading the
        # system trust store takes tens of milliseconds) and never a reason to refuse.
        if not self.worker:
            await asyncio.to_thread(warn_about_chain, config)
        return "; ".join(notes) or NOTHING_CHANGED

    def apply_fleets(self, specs: Sequence[FleetSpec], config: IngressConfig) -> list[str]:
        """Fleets diff: new ones start probing, removed ones drain, maxconn applies at once."""
        plan = self.fleet_set.apply(
            specs,
            capacity_aware=config.fleets.capacity_aware,
            health=Health.INIT if self.poller else Health.UP,
        )
        # Gone first: their probes stop before a fleet of the same name (moved) starts.
        for fleet in plan.gone:
            self.ops.gone(fleet)
        if self.poller is not None:
            for fleet in plan.added:
                self.poller.start(fleet)
        return plan.notes

    async def _quiet(self) -> None:
        """No call, no connection and no handshake left."""
        registry = self.registry
        while True:
            await registry.wait_no_calls()
            if not registry.connections and registry.handshaking <= 0:
                return
            await asyncio.sleep(0.05)  # a head or handshake under way: bounded by its timeout

    def cut_drain(self) -> None:
        """Stop waiting for calls to end: `stop` closes them now (each still logged)."""
        self._drain_cut.set()

    def shorten_drain(self, seconds: float) -> None:
        """The drain (under way or to come) ends `seconds` from now at the
        latest: a plain stop (SIGTERM) during an upgrade's longer drain."""
        by = time.monotonic() + seconds
        if self._drain_cap is None or by < self._drain_cap:
            self._drain_cap = by
            self._drain_moved.set()

    def stop_accepting(self, *, keep_pending: bool = False) -> None:
        """Close this process's listeners (idempotent). In a worker the
        listening sockets stay open in the supervisor and the other workers.
        `keep_pending` (an old generation after an upgrade, whose carriers the
        new one serves): TLS handshakes under way go on and become calls, and :80
        connections with no head yet wait for it. Not `keep_pending` (a plain stop,
        or a SIGTERM during an upgrade's stop): those are closed, but not one whose
        head is in its socket, unread (a validation as SIGTERM came). Kept over a
        SIGTERM, they held the stop up to timeouts.request, and a systemctl restart
        with it: new calls are refused until the new start listens (the :80 audit
        of session 34)."""
        if self._wss is not None:
            self._wss.close(keep_handshakes=keep_pending)
        if self._acme is not None:
            self._acme.close()
        self._acme_heads_kept = keep_pending
        if not keep_pending:
            for waiting in [p for p in self.registry.acme.members if p.waiting_for_head]:
                if not waiting.has_unread_bytes():
                    waiting.evict()

    async def _acme_settled(self, *, drain_end: float) -> None:
        """A challenge being relayed (or answered) when the worker exits was cut,
        and the renewal failed (the :80 audit of session 32): it finishes, as calls
        do, within its own timeouts; a second signal (`cut_drain`) ends the wait.
        It kept calls open past the drain's end, and a second signal waited for it
        (the review of session 33). Never past STOP_GRACE after `drain_end`
        (less EXIT_ROOM): bounded by timeouts.connect + response + 2 s alone
        (10 s), a slow responder's challenge held the worker until the
        supervisor killed it, mid-answer, and its last lines with it."""
        acme = self.registry.acme
        if not acme.members or self._drain_cut.is_set():
            return
        t = self.config.timeouts
        bound = t.connect + t.response + ACME_LINGER_SECONDS
        if self._acme_heads_kept:
            bound += t.request
        bound = min(bound, max(0.0, drain_end + STOP_GRACE - EXIT_ROOM - time.monotonic()))
        settled = asyncio.ensure_future(acme.settled())
        cut = asyncio.ensure_future(self._drain_cut.wait())
        try:
            # Patient: an answer relayed while the worker was stopped is out first.
            await wait_patiently({settled, cut}, bound, return_when=asyncio.FIRST_COMPLETED)
        finally:
            settled.cancel()
            cut.cancel()
        if left := [p for p in acme.members if not p.answered]:
            # Told apart: an upgrade's stop keeps connections with no request
            # yet (a browser's preconnect), and those were said to be challenges.
            answering = [p for p in left if not p.waiting_for_head]
            log.warning(
                ":80 connections unanswered at the stop's end (a request being answered, "
                "a challenge most often, or none come yet): cut",
                extra=fields(
                    connections=len(left),
                    being_answered=len(answering),
                    no_request_yet=len(left) - len(answering),
                    targets=sorted({p.target for p in answering if p.target})[:5],
                    waited_s=round(bound, 1),
                ),
            )

    async def stop(self, drain_timeout: float | None = None, *, keep_pending: bool = False) -> None:
        """Stop accepting at once; let calls end for up to `drain_timeout`
        (default timeouts.drain; math.inf: until they end), or sooner if
        `shorten_drain` says so; close what remains. Stats and admin stay up
        while calls drain. `keep_pending`: connections not yet a call
        (handshake, head, queued) are kept and waited for as calls are (an old
        generation's stop)."""
        self.stop_accepting(keep_pending=keep_pending)
        acme = self.registry.acme
        if not keep_pending:
            for conn in list(self.registry.connections):
                if conn.call is None:  # no call yet: nothing to keep
                    conn.abort()
        timeout = self.config.timeouts.drain if drain_timeout is None else drain_timeout
        self.stopping = True
        drained = asyncio.ensure_future(
            self._quiet() if keep_pending else self.registry.wait_no_calls()
        )
        cut = asyncio.ensure_future(self._drain_cut.wait())
        began = time.monotonic()
        by = began + timeout
        moved: asyncio.Future[Any] | None = None
        try:
            while True:
                if self._drain_cap is not None:
                    by = min(by, self._drain_cap)
                self._drain_moved.clear()
                moved = asyncio.ensure_future(self._drain_moved.wait())
                left = by - time.monotonic()
                # Patient: a worker stopped through the drain's end reads the
                # calls that ended meanwhile first (they were logged `drain`).
                done, _ = await wait_patiently(
                    {drained, cut, moved},
                    None if left == math.inf else max(0.0, left),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if done != {moved}:
                    break
        finally:
            drained.cancel()
            cut.cancel()
            if moved is not None:
                moved.cancel()
        if drained not in done:
            log.warning(
                "drain cut short: closing calls"
                if cut in done
                else "drain time is up: closing calls",
                extra=fields(
                    calls=len(self.registry.calls),
                    # Ended, logged, a side still closing: what the drain
                    # waited for when `calls` is 0 (stat's `closing`).
                    closing_calls=len(self.registry.closing),
                    drain_s=round(by - began, 1) if by < math.inf else None,
                ),
            )
        # Those closing too: a half-closed one's grace is cut to the reply's wait.
        for call in self.registry.every_call():
            call.end(EndReason.DRAIN)
        # Each call is logged as its end is settled, and closes after: give the
        # TLS close a moment, then cut what is left, so that no call goes
        # unrecorded and no socket is left to the exit.
        with contextlib.suppress(TimeoutError):
            async with patient_timeout(CLOSE_AT_STOP_TIMEOUT):
                await self.registry.wait_no_calls()
        for call in self.registry.every_call():
            call.abort()
        # After the calls: a challenge in flight does not hold them past the drain.
        await self._acme_settled(drain_end=by)
        for left in list(acme.members):
            left.evict()
        # Handshakes kept by an upgrade's stop that are still under way: one
        # finishing later would be served by an ingress that has stopped.
        self.stop_accepting()
        for conn in list(self.registry.connections):  # carriers with no call yet
            conn.abort()
        for _ in range(3):  # abort's connection_lost callbacks run on the next turns
            await asyncio.sleep(0)
        self.registry.sweep.stop()
        self.registry.dead_peers.stop()
        self.address_sweep.stop()
        if self.poller is not None:
            await self.poller.close()
        if self._web is not None:
            await self._web.close()
        if self.admin_socket is not None:
            from fleet_ingress.ops.admin_server import remove_own_socket

            remove_own_socket(self.admin_socket, self._admin_socket_id)
        self.loop_lag.stop()
        await asyncio.sleep(0)


class ReloadRefused(Exception):
    """The new configuration is invalid; the running one stays in force."""


class ReadReload(NamedTuple):
    """Everything a reload applies, read and checked."""

    config: IngressConfig
    specs: list[FleetSpec]
    server_ssl: ssl.SSLContext
    fleet_ssl: ssl.SSLContext
    leaf: LeafFacts  # the carrier listener's certificate
    pem: CarrierPem  # its chain and key, as read and checked (what workers get)


# How many times a reload reads its files while operators' fleet changes keep
# writing the fleets file meanwhile (`read_reload_settled`).
RELOAD_READS = 3


async def read_reload_settled(
    ops: FleetOps,
    config_path: Path,
    *,
    fleets: bool = True,
    serving: LeafFacts | None = None,
    config: IngressConfig | None = None,
    pem: CarrierPem | None = None,
    ticket_keys: bytes | None = None,
) -> ReadReload:
    """`read_reload` off the loop, read again when an operator's fleet change
    wrote the fleets file meanwhile: applying what was read before it undid
    it (the overlapping-actions audit of session 15: a drain, add-fleet or
    remove-fleet landing during a reload's read was reverted, saved in the
    file but not running). A few times at most; what is applied is read after
    the last change seen."""
    read = functools.partial(
        read_reload,
        config_path,
        fleets=fleets,
        serving=serving,
        config=config,
        pem=pem,
        ticket_keys=ticket_keys,
    )
    for _ in range(RELOAD_READS - 1):
        writes = ops.file_writes
        settled = await asyncio.to_thread(read)
        if ops.file_writes == writes:
            return settled
    return await asyncio.to_thread(read)


def read_reload(
    config_path: Path,
    *,
    fleets: bool = True,
    serving: LeafFacts | None = None,
    config: IngressConfig | None = None,
    pem: CarrierPem | None = None,
    ticket_keys: bytes | None = None,
) -> ReadReload:
    """Read and check everything a reload applies, before applying any of it:
    config (from `config_path`, unless `config` is given: a worker applies the
    one the supervisor read and checked, not the file, which may have changed
    since), fleets file (unless `fleets` is false: a worker's are the
    supervisor's), certificate (against `serving`, the one carriers get now:
    core/certificate_change.py), read once: what is checked is what is loaded
    (`pem`, when given: the certificate and key the supervisor read and checked,
    handed to a worker with `config`; the files are then not read). Any problem
    raises ReloadRefused, naming it."""
    try:
        if config is None:
            config = load_config(config_path)
        specs: list[FleetSpec] = []
        if fleets:
            specs = list(
                load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
            )
            if not specs:  # as `check` says: every call would get 503
                raise ReloadRefused(f"{config.fleets.file}: no fleets listed")
        if config.tls.cert is None or config.tls.key is None:
            raise ReloadRefused("tls.cert and tls.key must be set")
        if pem is None:
            pem = read_pem(config.tls.cert, config.tls.key)
        server_ssl = carrier_ssl_context(config, pem, ticket_keys)
        leaf = leaf_facts_of(pem.cert, config.tls.cert)
        if problem := renewal_problem(leaf, serving, time.time()):
            raise ReloadRefused(
                f"tls.cert: {config.tls.cert} {problem}; the certificate in use stays"
            )
        fleet_ssl = fleet_ssl_context(verify=config.fleets.verify, ca_file=config.fleets.ca_file)
    except (ConfigError, FleetsFileError, TLSSetupError, ReloadRefused) as exc:
        raise ReloadRefused(str(exc)) from None
    return ReadReload(config, specs, server_ssl, fleet_ssl, leaf, pem)


# And the configuration it runs (`config_to_json`): the file may hold an edit not
# reloaded yet, or one a reload refused, which a worker started now must not run.
RUNNING_CONFIG_ENV = "INGRESS_RUNNING_CONFIG"


_LISTEN_KEYS = ("wss", "acme", "stats", "admin_socket")


def listener_notes(bound: ListenSection, config: IngressConfig) -> list[str]:
    """Listeners stay bound where they were bound at start: compared with that,
    not with the last reload, so that putting an address back says nothing."""
    for key in _LISTEN_KEYS:
        listening, wanted = getattr(bound, key), getattr(config.listen, key)
        if listening != wanted:
            log.warning(
                "listener not moved by a reload: restart to apply",
                extra=fields(key=f"listen.{key}", listening=listening, configured=wanted),
            )
    return listeners_not_moved_notes(bound, config)


def listeners_not_moved_notes(bound: ListenSection, config: IngressConfig) -> list[str]:
    """listener_notes without its log lines, for every snapshot (`stat`'s RESTART
    NEEDED): from the state, not from the last reload's answer, which a reload
    refused after (a botched edit) replaced, and an upgrade does not carry, while
    the listener stayed where it was bound (the review of session 38)."""
    return [
        f"listen.{key} {LISTENER_NOT_MOVED}" + (WSS_NOT_MOVED if key == "wss" else "")
        for key in _LISTEN_KEYS
        if getattr(bound, key) != getattr(config.listen, key)
    ]


def probe_settings(config: IngressConfig) -> ProbeSettings:
    """How fleets are probed, from `[fleets]` (the ingress's poller, or the supervisor's)."""
    f = config.fleets
    return ProbeSettings(
        health_path=f.health_path,
        capacity_key=f.capacity_key,
        interval=f.check_interval,
        timeout=f.check_timeout,
        fall=f.fall,
        rise=f.rise,
    )


def _passive_fall(config: IngressConfig, *, probed: bool) -> int:
    """Refused calls in a row that take a fleet DOWN (`FleetState.call_unreachable`):
    `fleets.fall` where probes run to bring it back, else 0 (not observed)."""
    return config.fleets.fall if probed else 0


def warn_same_host(specs: Iterable[FleetSpec], logger: logging.Logger = log) -> list[str]:
    """Log each fleet at an IPv4 address in another spelling (0x7f.0.0.1), or
    beside the same address, at start and reload, as `check` says it
    (fleets_file.same_host_warnings); returns the reload's notes of them. The
    supervisor's and the one-process mode's words (the latter said nothing)."""
    notes = []
    for same in same_host_warnings(specs):
        logger.warning("fleets file: an address in another spelling", extra=fields(detail=same))
        notes.append(f"warning: {same}")
    return notes
