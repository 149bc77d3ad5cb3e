"""The supervisor's slot coordinator: `HostSlots` behind Unix stream sockets.

One channel per worker: the supervisor's end of a socketpair the worker
inherited (`adopt`), or a connection to a listening Unix socket
(`serve_unix`). The channel *is* the worker's lock: when it closes (the
worker exited, crashed, was SIGKILLed; the kernel closes its end) every slot
the worker held comes back at once and its waiters leave the queue. Nothing
here decides: frames in, `HostSlots` decides, answers out, one timer for the
queue's next deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Any, cast

from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.core.host_slots import Answer, Granted, HostSlots, SlotProtocolError
from fleet_ingress.logs import fields
from fleet_ingress.net.slot_wire import LineDecoder, WireError, encode, field, spec_to_wire

log = logging.getLogger("fleet_ingress.slots")


class _Channel(asyncio.Protocol):
    def __init__(self, server: SlotServer, key: int) -> None:
        self.server = server
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.decoder = LineDecoder()
        self.joined = False
        self.sent_specs: dict[str, FleetSpec] = {}  # what this worker has been told

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server._channels[self.key] = self

    def data_received(self, data: bytes) -> None:
        try:
            for message in self.decoder.feed(data):
                self.server._handle(self, message)
        except WireError as exc:
            log.error(
                "slot channel closed: the worker broke the protocol",
                extra=fields(channel=self.key, error=str(exc)),
            )
            assert self.transport is not None
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._gone(self)

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(message))


class SlotServer:
    def __init__(self, slots: HostSlots) -> None:
        self.slots = slots
        self._channels: dict[int, _Channel] = {}
        self._keys = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._servers: list[asyncio.Server] = []

    async def adopt(self, sock: socket.socket) -> int:
        """Serve the supervisor's end of a worker's socketpair; returns its channel key."""
        loop = asyncio.get_running_loop()
        key = next(self._keys)
        await loop.connect_accepted_socket(lambda: _Channel(self, key), sock)
        return key

    async def serve_unix(self, path: str) -> asyncio.Server:
        """Accept workers on a listening Unix socket (a worker started by hand,
        or one that must find the coordinator again by name)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _Channel(self, next(self._keys)), path)
        self._servers.append(server)
        return server

    def wake(self) -> None:
        """Room may have appeared (a probe, a fleet up, an admin change)."""
        self._send(self.slots.wake())

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for channel in list(self._channels.values()):
            if channel.transport is not None:
                channel.transport.close()
        if self._timer is not None:
            self._timer.cancel()
        await asyncio.sleep(0)  # let connection_lost run

    # -- frames in -------------------------------------------------------------

    def _handle(self, channel: _Channel, message: dict[str, Any]) -> None:
        op = message["op"]
        if not channel.joined:
            if op != "hello":
                raise WireError(f"{op!r} before 'hello'")
            pid, generation = field(message, "pid", int), field(message, "generation", int)
            self.slots.join(channel.key, pid=pid, generation=generation)
            channel.joined = True
            log.info(
                "worker joined the slot coordinator",
                extra=fields(channel=channel.key, pid=pid, generation=generation),
            )
            return
        if op == "acquire":
            lease = field(message, "id", int)
            avoid = field(message, "avoid", list) if "avoid" in message else []
            now = asyncio.get_running_loop().time()
            try:
                answer = self.slots.acquire(channel.key, lease, [str(a) for a in avoid], now)
            except SlotProtocolError as exc:
                # A worker bug: refuse this one call, keep the worker's other calls.
                log.error("slot request refused", extra=fields(channel=channel.key, error=str(exc)))
                channel.send({"op": "refused", "id": lease, "reason": f"internal error: {exc}"})
                return
            if answer is None:
                self._arm()
            else:
                self._send([answer])
        elif op == "release":
            self._send(self.slots.release(channel.key, field(message, "id", int)))
        else:
            raise WireError(f"unknown op {op!r}")

    def _gone(self, channel: _Channel) -> None:
        self._channels.pop(channel.key, None)
        row, answers = self.slots.leave(channel.key)
        if row is not None:
            held: dict[str, int] = {}
            for fleet in row.held.values():
                held[fleet.name] = held.get(fleet.name, 0) + 1
            log.log(
                logging.WARNING if held else logging.INFO,
                "worker left the slot coordinator",
                extra=fields(
                    channel=channel.key,
                    pid=row.pid,
                    generation=row.generation,
                    slots_reclaimed=row.calls,
                    fleets=held,
                ),
            )
        self._send(answers)

    # -- answers out -----------------------------------------------------------

    def _send(self, answers: list[Answer]) -> None:
        for answer in answers:
            channel = self._channels.get(answer.worker)  # type: ignore[call-overload]
            if channel is None:
                continue
            if isinstance(answer, Granted):
                channel.send(self._granted(channel, answer.lease, answer.fleet))
            else:
                channel.send({"op": "refused", "id": answer.lease, "reason": answer.reason})
        self._arm()

    @staticmethod
    def _granted(channel: _Channel, lease: int, fleet: FleetState) -> dict[str, Any]:
        message: dict[str, Any] = {"op": "granted", "id": lease, "fleet": fleet.name}
        if channel.sent_specs.get(fleet.name) != fleet.spec:
            channel.sent_specs[fleet.name] = fleet.spec
            message["spec"] = spec_to_wire(fleet.spec)
        return message

    def _arm(self) -> None:
        """One timer, at the queue's next deadline."""
        deadline = self.slots.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        # The loop may run a timer a clock tick early: it is due all the same.
        now = max(asyncio.get_running_loop().time(), self._timer_at or 0.0)
        self._timer, self._timer_at = None, None
        self._send(self.slots.expire(now))
