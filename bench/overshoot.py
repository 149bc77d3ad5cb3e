"""Two ingresses active at once in front of one fleet: how far past its capacity
can they send it calls between two health probes? (SPEC section 14.)

Each ingress judges the fleet by its own view: `fleet_available` from its last
probe, less the calls *it* opened since. Neither sees the other's calls, so until
their next probes both may hand the fleet what is in fact the same free worker.
The fleet's own `429` (nginx, once full) turns the excess away; the ingress passes
it to the carrier untouched, and the carrier redials.

    python -m bench.overshoot                       # 2 ingresses, capacity 16, 5 arrival rates
    python -m bench.overshoot --ingresses 1         # the control: one ingress never overshoots
    python -m bench.overshoot --rates burst,20 --repeat 5 --out /tmp/overshoot.json

Everything on loopback: one simulated fleet (fleet_ingress.sim, capacity 16,
answers 429 when full), N `fleet-ingress run` processes (TLS, default fleet
settings: maxconn 16, check_interval 1 s, capacity-aware, queue 3 s), and
carriers in this process opening `--calls` calls spread over the ingresses in
turn at each arrival rate, every call held until the round ends (a call lasts
minutes; none ends within a round). Per round it counts what the fleet received:
call requests, calls accepted (101), 429s; and what carriers got: 101, 429, 503.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import ssl
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fleet_ingress.sim import SimulatedFleet

CAPACITY = 16
QUEUE = 3.0  # timeouts.queue, the default: a call waiting for room gets 503 after it


@dataclass
class Round:
    rate: str  # "burst" or calls per second
    calls: int
    ingresses: int
    fleet_requests: int  # call requests that reached the fleet
    fleet_accepted: int  # 101s: never above CAPACITY (the fleet's own limit)
    fleet_429: int  # the overshoot: requests the fleet had no room for
    carrier_101: int
    carrier_429: int
    carrier_503: int  # the ingresses' own answer when no fleet had room (queue expired)
    carrier_other: int
    seconds: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(home: Path, name: str, port: int, fleet_url: str) -> Path:
    (home / f"{name}.fleets.txt").write_text(f"{fleet_url} name=fleet\n")
    path = home / f"{name}.toml"
    path.write_text(
        f"""
[listen]
wss = "127.0.0.1:{port}"
acme = ""
stats = ""
admin_socket = ""
[tls]
cert = "cert.pem"
key = "key.pem"
[fleets]
file = "{name}.fleets.txt"
[timeouts]
queue = {QUEUE}
drain = 1.0
[log]
level = "warning"
access = false
"""
    )
    return path


async def call(
    url: str, context: ssl.SSLContext, held: list[ClientConnection], results: list[int]
) -> None:
    try:
        ws = await connect(url, ssl=context, open_timeout=QUEUE + 5, proxy=None)
    except InvalidStatus as exc:
        results.append(exc.response.status_code)
    except (OSError, TimeoutError) as exc:
        print(f"call failed: {exc!r}", file=sys.stderr)
        results.append(0)
    else:
        held.append(ws)
        results.append(101)


async def one_round(
    fleet: SimulatedFleet, urls: list[str], context: ssl.SSLContext, rate: str, calls: int
) -> Round:
    before = (len(fleet.requests), fleet.calls_total, fleet.rejected_429)
    held: list[ClientConnection] = []
    results: list[int] = []
    interval = 0.0 if rate == "burst" else 1.0 / float(rate)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def later(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
        await call(f"{urls[i % len(urls)]}/ws/bot-{i}", context, held, results)

    async with asyncio.timeout(calls * interval + QUEUE + 30):
        await asyncio.gather(*(later(i) for i in range(calls)))
    seconds = loop.time() - start
    await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
    requests, accepted, rejected = (
        len(fleet.requests) - before[0],
        fleet.calls_total - before[1],
        fleet.rejected_429 - before[2],
    )
    return Round(
        rate=rate,
        calls=calls,
        ingresses=len(urls),
        fleet_requests=requests,
        fleet_accepted=accepted,
        fleet_429=rejected,
        carrier_101=results.count(101),
        carrier_429=results.count(429),
        carrier_503=results.count(503),
        carrier_other=sum(1 for r in results if r not in (101, 429, 503)),
        seconds=round(seconds, 2),
    )


async def settle(fleet: SimulatedFleet) -> None:
    """Every call of the last round gone and each ingress probed since: fresh estimates."""
    async with asyncio.timeout(20):
        while fleet.active_calls:  # noqa: ASYNC110 (the simulated fleet offers no event)
            await asyncio.sleep(0.05)
    await asyncio.sleep(2.5)  # > check_interval + check_timeout


async def main_async(args: argparse.Namespace) -> list[Round]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    procs: list[asyncio.subprocess.Process] = []
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="overshoot-") as tmp:
        home = Path(tmp)
        leaf.cert_chain_pems[0].write_to_path(home / "cert.pem")
        leaf.private_key_pem.write_to_path(home / "key.pem")
        async with SimulatedFleet(name="fleet", capacity=CAPACITY) as fleet:
            urls = []
            try:
                for n in range(args.ingresses):
                    port = free_port()
                    config = write_config(home, f"ingress{n}", port, fleet.url)
                    procs.append(
                        await asyncio.create_subprocess_exec(
                            sys.executable, "-m", "fleet_ingress", "run", "-c", str(config),
                            stderr=(home / f"ingress{n}.log").open("wb"),
                        )
                    )  # fmt: skip
                    urls.append(f"wss://127.0.0.1:{port}")
                await warm_up(urls, context)
                for _ in range(args.repeat):
                    for rate in args.rates.split(","):
                        await settle(fleet)
                        result = await one_round(fleet, urls, context, rate, args.calls)
                        print(json.dumps(asdict(result)), file=sys.stderr, flush=True)
                        rounds.append(result)
            finally:
                for proc in procs:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
    return rounds


async def warm_up(urls: list[str], context: ssl.SSLContext) -> None:
    """Until one call goes through each ingress (listening, fleet UP)."""
    async with asyncio.timeout(30):
        for url in urls:
            while True:
                held: list[ClientConnection] = []
                results: list[int] = []
                await call(f"{url}/ws/warm-up", context, held, results)
                for ws in held:
                    await ws.close()
                if results == [101]:
                    break
                await asyncio.sleep(0.2)


def table(rounds: list[Round]) -> str:
    lines = [
        "| arrival rate | rounds | fleet got (max) | accepted | 429 by the fleet: max (mean) | "
        "carriers 503 (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for rate in dict.fromkeys(r.rate for r in rounds):
        rs = [r for r in rounds if r.rate == rate]
        shown = "burst (all at once)" if rate == "burst" else f"{rate} calls/s"
        mean_429 = sum(r.fleet_429 for r in rs) / len(rs)
        mean_503 = sum(r.carrier_503 for r in rs) / len(rs)
        lines.append(
            f"| {shown} | {len(rs)} | {max(r.fleet_requests for r in rs)} | "
            f"{max(r.fleet_accepted for r in rs)} | {max(r.fleet_429 for r in rs)} "
            f"({mean_429:.1f}) | {mean_503:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overshoot", description=__doc__)
    parser.add_argument("--ingresses", type=int, default=2)
    parser.add_argument("--calls", type=int, default=40, help="calls offered per round")
    parser.add_argument("--rates", default="burst,40,20,10,5", help="calls/s per round, or 'burst'")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write every round as JSON here")
    args = parser.parse_args(argv)
    rounds = asyncio.run(main_async(args))
    print(
        f"{args.ingresses} ingress(es), one fleet of capacity {CAPACITY}, {args.calls} calls "
        f"a round, held to the round's end; python -m bench.overshoot "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    print(table(rounds))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in rounds], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
