"""bench/call_profile.py's pure parts: the difference of two profiles over the calls
between them, and its grouping by module."""

from __future__ import annotations

import cProfile
import pstats

from bench import call_profile
from bench.call_profile import Cost

RECV = ("~", 0, "<method 'recv' of '_socket.socket' objects>")
LEN = ("~", 0, "<built-in method builtins.len>")
READ = ("/work/wt/x/src/fleet_ingress/net/tls_socket.py", 794, "_read")
HEAD = ("/tmp/base/src/fleet_ingress/core/request_head.py", 120, "parse")
RUN = ("/usr/lib/python3.11/asyncio/runners.py", 86, "run")


def test_per_call_is_the_difference_over_the_calls_between_the_runs() -> None:
    before = {READ: Cost(130, 0.5), RUN: Cost(1, 10.0), LEN: Cost(40, 0.01)}
    after = {READ: Cost(530, 1.7), RUN: Cost(1, 30.0), RECV: Cost(200, 0.4)}
    per = call_profile.per_call(before, after, 200)
    assert per[READ] == Cost(2.0, 1.2 / 200)
    assert per[RECV] == Cost(1.0, 0.002)  # only the longer run ran it: from zero
    assert per[LEN] == Cost(-0.2, -0.01 / 200)  # only the shorter one: a negative count shows it
    assert per[RUN].calls == 0


def test_the_runner_s_idle_wait_is_no_call_s_time() -> None:
    per = {READ: Cost(2.0, 0.25), RECV: Cost(1.0, 0.75), RUN: Cost(0.0, 40.0)}
    assert call_profile.per_call_time(per) == 1.0
    rows = call_profile.format_rows([("read", per[READ])], call_profile.per_call_time(per))
    assert rows == ["       2.0   25.0 %  read"]


def test_modules_are_named_from_the_package_root_and_c_functions_by_their_module() -> None:
    assert call_profile.module_of(READ) == "fleet_ingress.net.tls_socket"
    assert call_profile.module_of(HEAD) == "fleet_ingress.core.request_head"  # a variant's src
    assert call_profile.module_of(RUN) == "asyncio.runners"
    assert call_profile.module_of(RECV) == "[C] _socket"
    assert call_profile.module_of(LEN) == "[C] builtins"
    assert call_profile.module_of(("~", 0, "<method 'get' of 'dict' objects>")) == "[C] dict"
    assert call_profile.module_of(("~", 0, "<built-in method time.thread_time>")) == "[C] time"
    site = "/w/.venv/lib/python3.11/site-packages/prometheus_client/metrics.py"
    assert call_profile.module_of((site, 1, "inc")) == "prometheus_client.metrics"
    package = "/w/.venv/lib/python3.11/site-packages/uvloop/__init__.py"
    assert call_profile.module_of((package, 1, "run")) == "uvloop"
    frozen = ("<frozen importlib._bootstrap>", 1, "_find")
    assert call_profile.module_of(frozen) == "importlib._bootstrap"
    assert call_profile.module_of(("~", 0, "<lambda>")) == "[C] ?"
    assert call_profile.label(READ) == "fleet_ingress.net.tls_socket:794(_read)"
    assert call_profile.label(LEN) == "<built-in method builtins.len>"


def test_modules_sum_their_functions_and_the_top_is_by_calls_then_time() -> None:
    write = ("/x/src/fleet_ingress/net/tls_socket.py", 676, "write")
    per = {READ: Cost(13.0, 0.2), write: Cost(12.0, 0.1), RECV: Cost(13.0, 0.3), LEN: Cost(76, 0)}
    modules = call_profile.by_module(per)
    assert modules["fleet_ingress.net.tls_socket"] == Cost(25.0, 0.30000000000000004)
    assert call_profile.top({"a": Cost(13, 0.2), "b": Cost(13, 0.3), "c": Cost(76, 0)}, 2) == [
        ("c", Cost(76, 0)),
        ("b", Cost(13, 0.3)),
    ]


def _twice(n: int) -> int:
    return len(str(n)) + len(str(n))


def test_a_real_profile_is_read_with_its_callers() -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for n in range(7):
        _twice(n)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    costs = call_profile.costs_of(stats)
    twice = next(k for k in costs if k[2] == "_twice")
    assert costs[twice].calls == 7
    assert call_profile.module_of(twice) == "test_call_profile"  # outside a package root
    callers = call_profile.callers_of(stats, r"builtins\.len")
    assert list(callers.values()) == [{twice: 14}]
