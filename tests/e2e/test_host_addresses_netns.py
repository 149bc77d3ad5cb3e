"""net.host_addresses reads a host's addresses at a cost that does not grow
with its routes. A host with a full routing table (a BGP-fed edge, a large
Calico node) lists every route in /proc/net/fib_trie: a read of it took 2.4 s
with 100,000 routes, the worker's loop stopped meanwhile (every call's frames
held), after each address event and once a second while an address is missing.
Here: a namespace (NetLab's: named FI_TEST_NETNS_PREFIX, else "fi", and the pid)
with 20,000 routes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fleet_ingress.core.address_watch import CHECK_PERIOD, GRACE
from tests.support import NetLab, netns_unavailable

pytestmark = [pytest.mark.timeout(60)]

ROUTES = 20_000
PROBE = """
import json, time
from fleet_ingress.net.host_addresses import read_host_addresses
times = []
for _ in range(3):
    t = time.perf_counter()
    found = read_host_addresses()
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds": min(times), "found": sorted(map(str, found))}))
"""


def test_a_read_with_a_large_routing_table_takes_no_time() -> None:
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    lab = NetLab()
    try:
        ns = lab.namespace("routes")
        lab.ip("-n", ns, "link", "add", "r0", "type", "veth", "peer", "name", "r1")
        lab.ip("-n", ns, "link", "set", "r0", "up")
        lab.ip("-n", ns, "link", "set", "r1", "up")
        lab.ip("-n", ns, "addr", "add", "192.0.2.10/24", "dev", "r0")
        lab.ip("-n", ns, "addr", "add", "2001:db8::10/64", "dev", "r0", "nodad")
        batch = "".join(
            f"route add 10.{i >> 8 & 255}.{i & 255}.0/24 via 192.0.2.1 dev r0\n"
            for i in range(ROUTES)
        )
        subprocess.run(
            ["ip", "-n", ns, "-batch", "-"], input=batch.encode(), check=True, timeout=30
        )
        probe = subprocess.run(
            lab.exec_argv(ns, sys.executable, "-c", PROBE),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env=os.environ,
        )
        result = json.loads(probe.stdout)
        assert {"127.0.0.1", "192.0.2.10", "2001:db8::10", "::1"} <= set(result["found"])
        assert not {f for f in result["found"] if f.startswith("10.")}  # routes are no addresses
        print(f"a read with {ROUTES} routes: {result['seconds'] * 1000:.2f} ms")
        assert result["seconds"] < 0.02
    finally:
        lab.remove()


CHURN = """
import asyncio, json, subprocess, sys, time
from fleet_ingress.net import host_addresses
from fleet_ingress.net.calls import Call, Registry
from tests.unit.test_address_watch import _Carrier

async def main():
    registry = Registry()
    sweep = host_addresses.AddressSweep(registry)
    call = Call(_Carrier("192.0.2.20"), "198.51.100.1", "/ws/", "b")
    registry.add_call(call)
    sweep.call_linked(call)
    await asyncio.sleep(1.5)  # a look saw it on the host
    subprocess.run(["ip", "addr", "del", "192.0.2.20/24", "dev", "r0"], check=True)
    left = time.monotonic()
    ended = None
    for i in range(20):  # another interface's addresses, one every 0.3 s, 6 s
        subprocess.run(["ip", "addr", "add", f"198.51.100.{i + 1}/32", "dev", "r1"], check=True)
        await asyncio.sleep(0.3)
        if ended is None and call.carrier.ended:
            ended = time.monotonic() - left
    sweep.stop()
    print(json.dumps({"ended_after": ended}))

asyncio.run(main())
"""


def test_other_addresses_coming_do_not_hold_a_moved_address_calls() -> None:
    # A host where addresses come and go steadily elsewhere (containers' veths,
    # privacy addresses renewed): each such event restarted every address's
    # clock, so calls on the address that left were kept for as long as the
    # trickle lasted (here 6 s; on a busy node, until tcp_user_timeout).
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    lab = NetLab()
    try:
        ns = lab.namespace("churn")
        lab.ip("-n", ns, "link", "add", "r0", "type", "veth", "peer", "name", "r1")
        for dev in ("r0", "r1"):
            lab.ip("-n", ns, "link", "set", dev, "up")
        lab.ip("-n", ns, "addr", "add", "192.0.2.20/24", "dev", "r0")
        probe = subprocess.run(
            lab.exec_argv(ns, sys.executable, "-c", CHURN),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env=os.environ,
        )
        ended_after = json.loads(probe.stdout)["ended_after"]
        print(f"the call ended {ended_after} s after its address left")
        assert ended_after is not None and ended_after <= GRACE + 2 * CHECK_PERIOD + 0.5
    finally:
        lab.remove()
