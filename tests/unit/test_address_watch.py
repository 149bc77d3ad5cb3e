"""core.address_watch: when calls on an address this host lost are ended; and
net.host_addresses' reading of /proc."""

from __future__ import annotations

import ipaddress

import pytest

from fleet_ingress.core.address_watch import GRACE, AddressWatch, call_address, gone_detail
from fleet_ingress.net.host_addresses import parse_fib_trie, parse_if_inet6

VIP = ipaddress.ip_address("192.0.2.10")
OWN = ipaddress.ip_address("192.0.2.11")
VIP6 = ipaddress.ip_address("2001:db8::10")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.10", VIP),
        ("::ffff:192.0.2.10", VIP),  # a dual-stack [::] listener's IPv4 carrier
        ("2001:db8::10", VIP6),
        ("fe80::1%eth0", ipaddress.ip_address("fe80::1")),
        ("127.0.0.1", None),
        ("127.3.4.5", None),
        ("::1", None),
        ("::ffff:127.0.0.1", None),
        ("0.0.0.0", None),
        ("not an address", None),
    ],
)
def test_the_address_a_call_is_on(text: str, expected: object) -> None:
    assert call_address(text) == expected


def test_grace_lets_redials_find_their_worker_within_the_queue_wait() -> None:
    # A call ends by GRACE + one check period after its address left; the other
    # host's next probe (1 s) sees the worker free; a redial waits 3 s.
    assert GRACE + 1.0 + 1.0 <= 3.0


# Each row: (now, host addresses at that look, addresses in use, expected gone).
TRANSCRIPTS = {
    "present: nothing ends": [
        (0.0, {VIP, OWN}, {VIP}, []),
        (1.0, {VIP, OWN}, {VIP}, []),
    ],
    "missing for the grace: its calls end, the others' not": [
        (0.0, {VIP, OWN}, {VIP, OWN}, []),
        (1.0, {OWN}, {VIP, OWN}, []),
        (1.5, {OWN}, {VIP, OWN}, []),
        (2.0, {OWN}, {VIP, OWN}, [VIP]),
    ],
    "back within the grace: kept, and the clock starts afresh": [
        (0.0, {VIP, OWN}, {VIP}, []),
        (0.5, {OWN}, {VIP}, []),
        (0.9, {VIP, OWN}, {VIP}, []),
        (1.5, {OWN}, {VIP}, []),
        (2.4, {OWN}, {VIP}, []),
        (2.5, {OWN}, {VIP}, [VIP]),
    ],
    "no call on it any more: forgotten": [
        (0.0, {VIP, OWN}, {VIP}, []),
        (0.2, {OWN}, {VIP}, []),
        (0.5, {OWN}, set(), []),
        (0.8, {VIP, OWN}, {VIP}, []),  # a new call: its own grace
        (1.2, {OWN}, {VIP}, []),
        (2.2, {OWN}, {VIP}, [VIP]),
    ],
    "never seen on this host (an AnyIP route, a transparent socket): never ended": [
        (0.0, {OWN}, {VIP}, []),
        (1.0, {OWN}, {VIP}, []),
        (5.0, set(), {VIP, OWN}, []),
    ],
    "both families, each its own clock": [
        (0.0, {VIP, VIP6}, {VIP, VIP6}, []),
        (0.5, {VIP6}, {VIP, VIP6}, []),
        (1.0, set(), {VIP, VIP6}, []),
        (1.5, set(), {VIP, VIP6}, [VIP]),
        (2.0, set(), {VIP, VIP6}, [VIP, VIP6]),
    ],
    "said again at each look while its calls stay": [
        (0.0, {VIP}, {VIP}, []),
        (0.5, set(), {VIP}, []),
        (1.5, set(), {VIP}, [VIP]),
        (2.5, set(), {VIP}, [VIP]),
    ],
}


@pytest.mark.parametrize("name", TRANSCRIPTS)
def test_transcripts(name: str) -> None:
    watch = AddressWatch()
    for now, host, used, expected in TRANSCRIPTS[name]:
        assert watch.look(host, used, now) == expected, (name, now)


def test_a_change_between_two_looks_that_both_miss_it_starts_the_clock_again() -> None:
    # Removed, put back and removed again between two looks: the second look
    # sees it missing, as the first did, but the kernel said addresses changed.
    watch = AddressWatch()
    assert watch.look({VIP, OWN}, {VIP}, -1.0) == []
    assert watch.look({OWN}, {VIP}, 0.0, changed=True) == []
    assert watch.look({OWN}, {VIP}, 1.0, changed=True) == []
    assert watch.missing_for(VIP, 1.5) == pytest.approx(0.5)
    assert watch.look({OWN}, {VIP}, 2.0) == [VIP]  # no change since: gone for good


def test_a_change_of_other_addresses_leaves_the_clock_running() -> None:
    # The kernel named the addresses that changed: only theirs start again.
    watch = AddressWatch()
    assert watch.look({VIP, OWN}, {VIP, OWN}, -1.0) == []
    assert watch.look(set(), {VIP, OWN}, 0.0, changed={VIP, OWN}) == []
    assert watch.look(set(), {VIP, OWN}, 1.0, changed={VIP6}) == [VIP, OWN]
    assert watch.look(set(), {VIP, OWN}, 1.5, changed={OWN}) == [VIP]
    assert watch.look(set(), {VIP, OWN}, 2.5, changed=set()) == [VIP, OWN]


def test_pending_while_an_address_is_missing() -> None:
    watch = AddressWatch()
    assert not watch.pending
    watch.look({VIP, OWN}, {VIP}, -1.0)
    watch.look({OWN}, {VIP}, 0.0)
    assert watch.pending and watch.missing_for(VIP, 0.7) == pytest.approx(0.7)
    watch.look({OWN, VIP}, {VIP}, 0.8)
    assert not watch.pending and watch.missing_for(VIP, 5.0) == 0.0


def test_the_detail_names_the_address_and_the_failover() -> None:
    text = gone_detail(VIP, 1.04)
    assert "192.0.2.10" in text and "1.0s" in text and "failover" in text


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.10
           /32 host LOCAL
        |-- 192.0.2.11
           /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 192.0.2.11
        /32 host LOCAL
"""


def test_fib_trie_local_entries() -> None:
    assert parse_fib_trie(FIB_TRIE) == {
        ipaddress.IPv4Address("127.0.0.1"),
        VIP,
        OWN,
    }


def test_if_inet6_lines() -> None:
    text = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "20010db8000000000000000000000010 02 40 00 80     eth0\n"
        "\n"
    )
    assert parse_if_inet6(text) == {ipaddress.IPv6Address("::1"), VIP6}


class _Transport:
    def __init__(self, host: str) -> None:
        self.host = host

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.host, 443) if name == "sockname" else default


class _Carrier:
    def __init__(self, host: str) -> None:
        self.transport = _Transport(host)
        self.ended: list[tuple[object, str]] = []

    def request_end(self, reason: object, why: str = "") -> None:
        self.ended.append((reason, why))


async def test_the_sweep_reads_only_after_an_address_event_and_ends_only_the_moved_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fleet_ingress.core.call_machine import EndReason
    from fleet_ingress.net import host_addresses
    from fleet_ingress.net.calls import Call, Registry

    host = {VIP, OWN}
    reads: list[int] = []
    events = [True]  # the kernel's word at each look, popped; then silence

    def read() -> set[object]:
        reads.append(1)
        return set(host)

    monkeypatch.setattr(host_addresses, "read_host_addresses", read)
    monkeypatch.setattr(
        host_addresses.AddressEvents,
        "changes",
        lambda self: None if (events.pop(0) if events else False) else set(),
    )
    registry = Registry()
    sweep = host_addresses.AddressSweep(registry, period=3600)
    try:
        calls = [Call(_Carrier(a), "192.0.2.1", "/ws/", "b") for a in (str(VIP), str(OWN))]  # type: ignore[arg-type]
        loopback = Call(_Carrier("127.0.0.1"), "127.0.0.1", "/ws/", "b")  # type: ignore[arg-type]
        sweep.call_linked(loopback)
        assert sweep._timer is None  # a loopback call cannot move: no timer
        for call in calls:
            registry.add_call(call)
            sweep.call_linked(call)
        for _ in range(3):
            sweep.look()
        assert len(reads) == 1  # the first look only: nothing changed since
        host.discard(VIP)
        events.append(True)
        sweep.look()  # seen missing
        assert len(reads) == 2 and not calls[0].carrier.ended  # type: ignore[attr-defined]
        sweep.watch._missing_since[VIP] -= GRACE  # as if a look a grace later
        sweep.look()  # missing again, no event between: ended
        [(reason, why)] = calls[0].carrier.ended  # type: ignore[attr-defined]
        assert reason is EndReason.CARRIER_LOST and str(VIP) in why
        assert calls[1].carrier.ended == []  # type: ignore[attr-defined]
    finally:
        sweep.stop()


async def test_a_look_that_cannot_read_the_tables_ends_no_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    # Out of file descriptors (a flood, a leak elsewhere), open() fails with
    # EMFILE: that is no word on the host's addresses, not "it has none". Two
    # such looks after an address event must not end every call on the host.
    import functools
    import os
    import pathlib
    import resource

    from fleet_ingress.net import host_addresses
    from fleet_ingress.net.calls import Call, Registry

    assert isinstance(tmp_path, pathlib.Path)
    fib, inet6 = tmp_path / "fib_trie", tmp_path / "if_inet6"
    real_read = host_addresses.read_host_addresses  # netlink first, then /proc
    fib.write_text(FIB_TRIE)
    inet6.write_text("20010db8000000000000000000000010 02 40 00 80     eth0\n")
    monkeypatch.setattr(
        host_addresses,
        "read_host_addresses",
        functools.partial(host_addresses.read_proc_addresses, str(fib), str(inet6)),
    )
    events = [True, True]  # the first look; an address event during the exhaustion; then silence
    monkeypatch.setattr(
        host_addresses.AddressEvents,
        "changes",
        lambda self: None if (events.pop(0) if events else False) else set(),
    )
    registry = Registry()
    sweep = host_addresses.AddressSweep(registry, period=3600)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds: list[int] = []
    try:
        calls = [Call(_Carrier(a), "192.0.2.1", "/ws/", "b") for a in (str(VIP), str(VIP6))]  # type: ignore[arg-type]
        for call in calls:
            registry.add_call(call)
            sweep.call_linked(call)
        sweep.look()  # both seen on the host
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
        try:
            while True:
                fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        for _ in range(3):
            sweep.watch._missing_since = {
                a: t - GRACE for a, t in sweep.watch._missing_since.items()
            }
            sweep.look()
        assert real_read() is None
        for fd in fds:
            os.close(fd)
        fds.clear()
        assert real_read() is not None
        assert [c.carrier.ended for c in calls] == [[], []]  # type: ignore[attr-defined]
        sweep.look()  # tables readable again, both there
        assert not sweep.watch.pending
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        sweep.stop()


async def test_a_bug_in_the_watch_as_a_call_links_does_not_reach_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Registry.call_linked runs as net.proxy links the call: what a hook raises
    # there ends the call ("call command failed"). The watch's must not.
    from fleet_ingress.net import host_addresses
    from fleet_ingress.net.calls import Call, Registry

    def broken(call: object) -> object:
        raise TypeError("a sockname of a shape not foreseen")

    monkeypatch.setattr(host_addresses, "_local_address", broken)
    registry = Registry()
    sweep = host_addresses.AddressSweep(registry, period=3600)
    try:
        call = Call(_Carrier(str(VIP)), "192.0.2.1", "/ws/", "b")  # type: ignore[arg-type]
        registry.add_call(call)
        registry.call_linked(call)  # raised TypeError on main
        assert sweep._on == {} and sweep._timer is None
        assert call in registry.calls and call.carrier.ended == []  # type: ignore[attr-defined]
    finally:
        sweep.stop()


async def test_a_sweep_with_nothing_missing_waits_for_the_kernels_word(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While no address is missing, the sweep sets no timer (a look a second woke
    every worker holding calls, to read nothing): the events socket's readability
    brings the next look, a period after the last at the soonest however many
    events come; an address gone still ends its calls a grace later."""
    import asyncio
    import socket
    import time

    from fleet_ingress.core.call_machine import EndReason
    from fleet_ingress.net import host_addresses
    from fleet_ingress.net.calls import Call, Registry

    host = {VIP, OWN}
    monkeypatch.setattr(host_addresses, "read_host_addresses", lambda: set(host))
    kernel, ours = socket.socketpair()  # the kernel's side writes "events" to ours
    ours.setblocking(False)

    def listen(self: host_addresses.AddressEvents) -> None:
        self._sock = ours

    def changes(self: host_addresses.AddressEvents) -> set[object] | None:
        came = False
        while True:
            try:
                came = bool(ours.recv(4096)) or came
            except BlockingIOError:
                return {VIP} if came else set()

    monkeypatch.setattr(host_addresses.AddressEvents, "__init__", listen)
    monkeypatch.setattr(host_addresses.AddressEvents, "changes", changes)
    period = 0.05
    registry = Registry()
    sweep = host_addresses.AddressSweep(registry, period=period)
    try:
        call = Call(_Carrier(str(VIP)), "192.0.2.1", "/ws/", "b")  # type: ignore[arg-type]
        registry.add_call(call)
        sweep.call_linked(call)
        async with asyncio.timeout(5):
            while sweep.looks < 1:  # the first look reads the addresses
                await asyncio.sleep(0.01)
        looks = sweep.looks
        await asyncio.sleep(6 * period)
        assert sweep.looks == looks and sweep._timer is None  # nothing to do: no look
        # A storm of events other addresses' (VIP on the host still): a look a period.
        started = time.monotonic()
        for _ in range(30):
            kernel.send(b"x")
            await asyncio.sleep(period / 5)
        storm = time.monotonic() - started
        assert 1 <= sweep.looks - looks <= storm / period + 2
        await asyncio.sleep(2 * period)
        assert call.carrier.ended == []  # type: ignore[attr-defined]
        looks = sweep.looks
        await asyncio.sleep(4 * period)
        assert sweep.looks == looks  # quiet again
        host.discard(VIP)  # the address leaves, the kernel says so
        left = time.monotonic()
        kernel.send(b"x")
        async with asyncio.timeout(5):
            while not call.carrier.ended:  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)
        took = time.monotonic() - left
        [(reason, _)] = call.carrier.ended  # type: ignore[attr-defined]
        assert reason is EndReason.CARRIER_LOST
        assert GRACE <= took <= GRACE + 3 * period + 0.5, took
    finally:
        sweep.stop()
        kernel.close()
        ours.close()
