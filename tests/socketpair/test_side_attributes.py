"""A call's two sides keep their attributes in slots, whatever the process
made before them (net/proxy.py's _Side, CarrierProtocol, FleetProtocol)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a process of its own (the state at stake is a class's, for the
# process's life): CPython 3.11 keeps an instance's attributes inline only
# while its class's shared key table takes their names, and that table's room
# shrinks by one with every instance made (Objects/dictobject.c,
# init_inline_values). Carriers accepted in a burst before the first call
# linked froze it without the names a link sets (peer, peer_side, tracker,
# bytes_received): from then on every call's carrier moved its attributes to a
# dict as it linked, read on the relay's hot path. On main before the slots:
# the carrier in a dict after a burst of 40, inline after a burst of 1; the
# fleet side (one attempt) inline.
SCRIPT = textwrap.dedent(
    """
    import asyncio, ctypes, socket, ssl, sys
    sys.path.insert(0, sys.argv[1])
    from tests.socketpair.test_call_pump import echo_after_switching
    from fleet_ingress.config.fleets_file import parse_fleets_text
    from fleet_ingress.core.balancer import Balancer
    from fleet_ingress.core.fleet_set import FleetSet
    from fleet_ingress.core.retry import RetryPolicy
    from fleet_ingress.core.routing import Router
    from fleet_ingress.core.silence import SilencePolicy
    from fleet_ingress.net.calls import Registry
    from fleet_ingress.net.dispatch import Dispatcher
    from fleet_ingress.net.liveness import TcpLiveness
    from fleet_ingress.net.proxy import CarrierProtocol, ProxyContext
    from tests.support import SWITCHING, UPGRADE

    W = ctypes.sizeof(ctypes.c_void_p)

    def in_a_dict(obj):
        if not type(obj).__dictoffset__:  # slots alone: no dict to move to
            return False
        # CPython 3.11's pre-header: the inline values at -4 words (NULL once
        # they moved to a dict). Read there: obj.__dict__ would move them.
        return not ctypes.c_void_p.from_address(id(obj) - 4 * W).value

    async def main():
        server = await asyncio.start_server(echo_after_switching, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        specs = parse_fleets_text(f"http://127.0.0.1:{port} name=a", default_maxconn=64)
        balancer = Balancer(FleetSet.from_specs(specs))
        ctx = ProxyContext(
            router=Router(["/ws/"], "/haproxy-health"),
            slots=Dispatcher(balancer, queue_timeout=1.0, max_queue=8),
            registry=Registry(),
            retry=RetryPolicy(retries=0, conditions=frozenset(), statuses=frozenset()),
            fleet_ssl=ssl.create_default_context(),
            connect_timeout=2.0, response_timeout=2.0, request_timeout=2.0,
            silence=SilencePolicy(tunnel=60.0, carrier=30.0),
            liveness=TcpLiveness(),
            max_head_bytes=16384, max_header_count=100, max_connections=100,
            access_log=False,
        )
        loop = asyncio.get_running_loop()
        carriers = []
        for _ in range(40):  # a burst of carriers accepted before any call links
            ours, theirs = socket.socketpair()
            await loop.connect_accepted_socket(lambda: CarrierProtocol(ctx), theirs)
            carriers.append(await asyncio.open_connection(sock=ours))
        reader, writer = carriers[0]
        writer.write(UPGRADE.format(path="/ws/bot-1").encode())
        assert await asyncio.wait_for(reader.readexactly(len(SWITCHING)), 5) == SWITCHING
        writer.write(b"frame")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"frame"
        (call,) = ctx.registry.calls
        print(in_a_dict(call.carrier), in_a_dict(call.fleet_side))
        for _, w in carriers:
            w.close()
        server.close()

    asyncio.run(asyncio.wait_for(main(), 20))
    """
)


def test_a_calls_sides_keep_no_attribute_dict_after_a_burst_of_carriers() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"], done.stdout
