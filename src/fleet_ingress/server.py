"""The running ingress: listeners, the fleet set and the registry of calls."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from .addresses import parse_hostport
from .admin_server import admin_app, bind_admin_socket
from .balancer import Balancer, Health
from .calls import EndReason, Registry
from .config import IngressConfig
from .dispatch import Dispatcher
from .fleet_ops import FleetOps
from .fleets_file import FleetSpec
from .logs import fields
from .metrics import IngressMetrics
from .poller import HealthPoller, ProbeSettings
from .proxy import CarrierProtocol, ProxyContext
from .retry import RetryPolicy
from .routing import Router
from .snapshot import snapshot
from .stats_server import stats_app
from .tls import certificate_not_after, fleet_ssl_context, server_ssl_context

log = logging.getLogger("fleet_ingress.server")


class Ingress:
    """One ingress process's serving state, built from a config and fleets."""

    def __init__(
        self,
        config: IngressConfig,
        fleets: Sequence[FleetSpec],
        *,
        server_ssl: ssl.SSLContext | None = None,
        fleet_ssl: ssl.SSLContext | None = None,
        health_checks: bool = True,
    ) -> None:
        """`health_checks=False` counts every fleet as UP and probes none
        (tests of the call path alone; never what `run` does)."""
        self.config = config
        if server_ssl is None:
            if config.tls.cert is None or config.tls.key is None:
                raise ValueError("tls.cert and tls.key must be set to serve the carrier listener")
            server_ssl = server_ssl_context(config.tls.cert, config.tls.key, config.tls.min_version)
        if fleet_ssl is None:
            fleet_ssl = fleet_ssl_context(
                verify=config.fleets.verify, ca_file=config.fleets.ca_file
            )
        self.server_ssl = server_ssl
        self.balancer = Balancer.from_specs(
            fleets,
            capacity_aware=config.fleets.capacity_aware,
            health=Health.INIT if health_checks else Health.UP,
        )
        self.dispatcher = Dispatcher(
            self.balancer, queue_timeout=config.timeouts.queue, max_queue=config.limits.max_queue
        )
        self.registry = Registry()
        self.started_at = time.time()
        self.certificate_not_after: float | None = None
        if config.tls.cert is not None:
            try:
                self.certificate_not_after = certificate_not_after(config.tls.cert)
            except (OSError, ValueError):
                pass  # shown as unknown; `check` names the problem
        self.metrics = IngressMetrics(
            self.balancer,
            self.registry,
            self.dispatcher,
            certificate_not_after=lambda: self.certificate_not_after,
        )
        self.ops = FleetOps(self)
        self.dispatcher.on_release.append(self.ops.reap)
        self.poller: HealthPoller | None = None
        if health_checks:
            f = config.fleets
            self.poller = HealthPoller(
                self.dispatcher,
                fleet_ssl,
                ProbeSettings(
                    health_path=f.health_path,
                    capacity_key=f.capacity_key,
                    interval=f.check_interval,
                    timeout=f.check_timeout,
                    fall=f.fall,
                    rise=f.rise,
                ),
                on_probe=self.metrics.check_observed,
            )
        self.ctx = ProxyContext(
            router=Router(config.routes.proxy, config.routes.health),
            dispatcher=self.dispatcher,
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
            tunnel_timeout=config.timeouts.tunnel,
            max_head_bytes=config.limits.max_header_bytes,
            max_connections=config.limits.max_connections,
            access_log=config.log.access,
        )
        self._wss: asyncio.Server | None = None
        self._web_runners: list[web.AppRunner] = []
        self.stats_address: tuple[str, int] | None = None
        self.admin_socket: Path | None = None

    async def start(self) -> None:
        if self.poller is not None:
            for fleet in self.balancer.fleets:
                self.poller.start(fleet)
        host, port = parse_hostport(self.config.listen.wss, what="listen.wss")
        loop = asyncio.get_running_loop()
        self._wss = await loop.create_server(
            lambda: CarrierProtocol(self.ctx),
            host,
            port,
            ssl=self.server_ssl,
            # A TLS handshake that never completes is a request that never came.
            ssl_handshake_timeout=self.config.timeouts.request,
            backlog=1024,
            reuse_address=True,
        )
        log.info(
            "listening",
            extra=fields(
                listener="wss", address=self.wss_address, fleets=len(self.balancer.fleets)
            ),
        )
        listen = self.config.listen
        if listen.stats:
            host, port = parse_hostport(listen.stats, what="listen.stats")
            runner = await self._serve_web(stats_app(self), web.TCPSite, host=host, port=port)
            sock = runner.addresses[0]
            self.stats_address = (sock[0], sock[1])
            log.info("listening", extra=fields(listener="stats", address=self.stats_address))
        if listen.admin_socket:
            path = Path(listen.admin_socket)
            sock = bind_admin_socket(path)
            await self._serve_web(admin_app(self), web.SockSite, sock=sock)
            self.admin_socket = path
            log.info("listening", extra=fields(listener="admin", address=str(path)))

    async def _serve_web(
        self, app: web.Application, site_type: type[web.BaseSite], **where: Any
    ) -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await site_type(runner, **where).start()
        self._web_runners.append(runner)
        return runner

    def snapshot(self) -> dict[str, Any]:
        return snapshot(
            self.balancer,
            self.registry,
            self.dispatcher,
            started_at=self.started_at,
            certificate_not_after=self.certificate_not_after,
        )

    @property
    def wss_address(self) -> tuple[str, int]:
        assert self._wss is not None, "start() first"
        sockname = self._wss.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting; let calls end for up to `drain_timeout`; close the rest."""
        if self._wss is not None:
            self._wss.close()
        if self.poller is not None:
            await self.poller.close()
        for runner in self._web_runners:
            await runner.cleanup()
        self._web_runners.clear()
        if self.admin_socket is not None:
            self.admin_socket.unlink(missing_ok=True)
        timeout = self.config.timeouts.drain if drain_timeout is None else drain_timeout
        try:
            async with asyncio.timeout(timeout):
                await self.registry.wait_no_calls()
        except TimeoutError:
            pass
        for call in list(self.registry.calls):
            if call.end_reason is None:
                call.end_reason = EndReason.DRAIN
            call.carrier.close()
            if call.fleet_side is not None:
                call.fleet_side.close()
        for conn in list(self.registry.connections):
            conn.abort()
        await asyncio.sleep(0)

    async def serve_until_signalled(self) -> None:
        """`run`: serve until SIGTERM/SIGINT; a second signal stops at once."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second signal: stopping now", extra=fields(signal=signum))
                raise SystemExit(0)
            log.info("stopping: draining calls", extra=fields(signal=signum))
            stop.set()

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        await self.start()
        await stop.wait()
        await self.stop()
