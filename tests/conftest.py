"""Shared fixtures: a test CA (trustme), TLS files, and an in-process ingress
on loopback. Async tests run on both asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import getpass
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trustme

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.config.settings import config_from_dict
from fleet_ingress.net import event_loop
from fleet_ingress.service.ingress import Ingress
from fleet_ingress.sim import SimulatedFleet
from tests.support import NetLab, RunHomes, StartIngress, TLSFiles, netns_unavailable


# sun_path holds 107 bytes. Tests bind their sockets in tmp_path, which is
# TMPDIR/pytest-of-USER/pytest-N/popen-gwK/<30 characters of the test's name>N/:
# under /tmp the longest is ~90 bytes, but a longer TMPDIR (a CI runner's own)
# made ~20 tests fail with "AF_UNIX path too long". Then the run's base is a
# directory of its own under /tmp (a new one each run: pytest empties a
# --basetemp it is given). xdist's workers are given theirs by the controller.
def _tmp_path_too_long_for_sockets() -> bool:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    longest = os.path.join(
        tempfile.gettempdir(),
        f"pytest-of-{user}",
        "pytest-999",
        "popen-gw99",
        "x" * 30 + "99",
        "run",
        "notify.sock",
    )
    return len(os.fsencode(longest)) > 107


def _compile_the_package() -> None:
    """Write fleet_ingress's compiled files (__pycache__, ignored by git and by
    release.code_digest). An editable install has none, and where
    PYTHONDONTWRITEBYTECODE is set (these machines) no import writes them: each
    process the tests start (a supervisor, each worker, a trial run, the
    re-executed image, the CLI) compiled every module from source, 0.15 s of
    a core each. compileall writes them whatever that variable says; an import
    still checks each against its source (mtime and size), so a module edited
    since, or planted in a copy, is compiled again, as before."""
    import compileall

    import fleet_ingress

    package = os.path.dirname(fleet_ingress.__file__)
    # A read-only install (a wheel in a system or image's site-packages, a
    # store): nothing to write, and compileall said "*** Error compiling" of
    # each of its ~100 modules, as if the package were broken.
    if os.access(package, os.W_OK):
        compileall.compile_dir(package, quiet=1)


@pytest.hookimpl(tryfirst=True)  # before tmpdir's reads the option
def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # once, in xdist's controller
        _compile_the_package()
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        if _tmp_path_too_long_for_sockets():
            config.option.basetemp = tempfile.mkdtemp(prefix="fi-pytest-", dir="/tmp")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    # Behaviour can differ between the two (transports, SSL, flow control).
    # Long waits that test no loop-specific behaviour run once, on uvloop.
    # "uvloop" is the loop `run` uses: uvloop's, with its sock_connect fixed
    # (net/event_loop.py).
    if item.get_closest_marker("uvloop_only"):
        return {"uvloop": event_loop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": event_loop.new_event_loop}


@pytest.fixture(autouse=True)
def _run_homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test's `fleet-ingress run` homes (support.run_home) made under
    pytest's base temp, and removed at its teardown whatever ended it."""
    with RunHomes.of_one_test(tmp_path_factory.getbasetemp()):
        yield


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("tls")
    ca_pem = d / "ca.pem"
    ca.cert_pem.write_to_path(ca_pem)
    ingress = ca.issue_cert("127.0.0.1", "localhost", "calls.test")
    cert, key = d / "ingress.pem", d / "ingress.key"
    for blob in ingress.cert_chain_pems:
        blob.write_to_path(cert, append=True)
    ingress.private_key_pem.write_to_path(key)
    return TLSFiles(ca, ca_pem, cert, key, ca.issue_cert("127.0.0.1", "localhost"))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


@pytest.fixture
async def start_ingress(tls_files: TLSFiles) -> AsyncIterator[StartIngress]:
    """start_ingress(["https://127.0.0.1:PORT name=a", ...], timeouts={...}) -> Ingress

    Without `health_checks=True` every fleet counts as UP and none is probed:
    the call-path tests use fleet stand-ins that serve no /health/fleet."""
    started: list[Ingress] = []

    async def start(
        fleet_lines: list[str], *, health_checks: bool = False, **sections: Any
    ) -> Ingress:
        data = _merge(
            {
                "listen": {"wss": "127.0.0.1:0", "acme": "", "stats": "", "admin_socket": ""},
                "tls": {
                    "cert": str(tls_files.ingress_cert),
                    "key": str(tls_files.ingress_key),
                    "ca_file": str(tls_files.ca_pem),  # carriers are given the test CA
                },
                "fleets": {"ca_file": str(tls_files.ca_pem)},
                "log": {"access": True},
            },
            sections,
        )
        config = config_from_dict(data)
        fleets = parse_fleets_text("\n".join(fleet_lines), default_maxconn=config.fleets.maxconn)
        ingress = Ingress(config, fleets, health_checks=health_checks)
        await ingress.start()
        started.append(ingress)
        return ingress

    yield start
    for ingress in started:
        await ingress.stop(drain_timeout=0)


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    """Network namespaces for one test, all removed after it, whatever happened.
    Skipped without root or iproute2, unless CI is set: there it is a failure."""
    why = netns_unavailable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run the network-namespace tests (as root, with iproute2)")
        pytest.skip(f"{why} (CI unset)")
    lab = NetLab()
    try:
        yield lab
    finally:
        lab.remove()


@pytest.fixture
async def two_fleets(tls_files: TLSFiles) -> AsyncIterator[list[SimulatedFleet]]:
    """TLS fleets "a" and "b", each with 16 workers: past 16 concurrent calls a
    fleet answers 429, so one call too many shows. Each reports plenty of room,
    so that only maxconn (not the capacity estimate) can hold the host to 16 a
    fleet."""
    sims = []
    for name in "ab":
        sim = SimulatedFleet(name=name, capacity=16, ssl_context=tls_files.fleet_server_context())
        sim.available_override = 1000
        await sim.start()
        sims.append(sim)
    yield sims
    for sim in sims:
        await sim.stop()


@pytest.fixture
async def roomy_fleet(tls_files: TLSFiles) -> AsyncIterator[SimulatedFleet]:
    """One TLS fleet named "a" with room for 16 calls and 1000 said free in its
    health answer: past the ingress's own limits only the ingress can refuse a
    call."""
    sim = SimulatedFleet(name="a", capacity=16, ssl_context=tls_files.fleet_server_context())
    sim.available_override = 1000
    await sim.start()
    yield sim
    await sim.stop()
