"""The processes tests/test_two_hosts.py runs inside its network namespaces.

    python netns_roles.py fleet HOST PORT LIFETIME
        a simulated fleet (fleet_ingress.sim) on HOST:PORT; prints "ready"
    python netns_roles.py carrier URL CA_FILE LIFETIME
        a carrier calling URL again and again, one short call at a time; prints a
        JSON line per attempt: {"start": s, "end": s, "ok": bool, "error": str|null}
        (time.monotonic(), the same clock in every process of the machine)
    python netns_roles.py hold URL CA_FILE N LIFETIME
        N long calls to URL at once, each a 20 ms frame at a time until it is cut;
        prints {"up": s, "bot": id} at a call's first echo, {"cut": s, "bot": id} at its end

Each stops after LIFETIME seconds, or when its standard input closes (the test
ended, however it ended), so none can outlive its test.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time

from fleet_ingress.sim import SimulatedFleet, run_call


async def _until_stdin_closes(lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        async with asyncio.timeout(lifetime):
            await reader.read()
    except TimeoutError:
        pass


async def fleet(host: str, port: int, lifetime: float) -> None:
    async with SimulatedFleet(name="fleet", host=host, port=port, capacity=16):
        print("ready", flush=True)
        await _until_stdin_closes(lifetime)


async def carrier(url: str, ca_file: str, lifetime: float) -> None:
    context = ssl.create_default_context(cafile=ca_file)
    done = asyncio.create_task(_until_stdin_closes(lifetime))
    n = 0
    while not done.done():
        n += 1
        start = time.monotonic()
        result = await run_call(
            url,
            ssl_context=context,
            bot_id=f"bot-{n}",
            duration=0.04,  # two 20 ms frames, echoed back: the call path works end to end
            open_timeout=3.0,
            echo_wait=3.0,
        )
        line = {"start": start, "end": time.monotonic(), "ok": result.ok, "error": result.error}
        print(json.dumps(line), flush=True)
        await asyncio.sleep(max(0.0, start + 0.2 - time.monotonic()))


async def hold(url: str, ca_file: str, n: int, lifetime: float) -> None:
    from websockets.asyncio.client import connect

    context = ssl.create_default_context(cafile=ca_file)

    async def one(bot: str) -> None:
        try:
            async with connect(f"{url}/ws/{bot}", ssl=context, ping_interval=None) as ws:

                async def send() -> None:
                    while True:
                        await ws.send(bytes(320))
                        await asyncio.sleep(0.02)

                sender = asyncio.create_task(send())
                try:
                    await ws.recv()
                    print(json.dumps({"up": time.monotonic(), "bot": bot}), flush=True)
                    async for _ in ws:
                        pass
                finally:
                    sender.cancel()
        except Exception:  # cut: whatever way, it is the end of the call
            pass
        print(json.dumps({"cut": time.monotonic(), "bot": bot}), flush=True)

    calls = [asyncio.create_task(one(f"held-{i}")) for i in range(n)]
    await _until_stdin_closes(lifetime)
    for call in calls:
        call.cancel()


def main(argv: list[str]) -> None:
    role, *args = argv
    if role == "fleet":
        asyncio.run(fleet(args[0], int(args[1]), float(args[2])))
    elif role == "hold":
        asyncio.run(hold(args[0], args[1], int(args[2]), float(args[3])))
    elif role == "carrier":
        asyncio.run(carrier(args[0], args[1], float(args[2])))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
