"""Property tests of the small I/O-free cores, each against a reference model
written here or against bounds it must keep.

- `health.observe`: the fall/rise machine, with fall and rise changed by a
  reload mid-sequence, against a model that counts the run of results pushing
  toward a change (INIT: the first pass, or `fall` fails); the streak is that
  run's length, 0 after a change or a result that does not push, never negative
  and never at its threshold.
- `silence.QuietWatch`: its verdict at each sweep against a model of the last
  time each side's byte count moved or the side was held (carrier silence, then
  fleet silence, then idle), up to the first verdict.
- `accept_pacing.AcceptPacer`: the pause it asks for is never negative, 0 when
  disabled or nothing is live, else its pause, which stays between
  `first_pause` and `max_pause` and at most doubles a step (a flood that
  drives it to `max_pause` is a fixed example).
- `retry.RetryPolicy`: at most 1 + retries attempts, whatever the failures and
  statuses.
- `forwarding.fleet_request_headers`: the ingress's own headers (Host,
  Connection, Upgrade, X-Forwarded-For/-Proto/-Host, X-Real-IP) once each; no
  Forwarded; no hop-by-hop header, no header the carrier's Connection names, no
  underscore spelling of either (nor of Content-Length) carried; X-Real-IP is
  the client and ends X-Forwarded-For.
- `routing.Router`: the longest matching prefix routes a call, with the rest
  of the path its bot id; a bare prefix or no prefix is not found; the health
  path is the health check (paths are random or built on a prefix; nested
  prefixes and the health path are fixed examples).
- `certificate_change._overlap`: two certificate names overlap exactly when
  some host (up to four labels of a, b, c, under x) is covered by both, a
  wildcard only leftmost.

Modelling limits: the inputs are small alphabets (header names and values from
a fixed list, paths of a few letters, names of a few labels); the pacer's clock
and spent time move in steps of at most 0.2 s; the silence model's sweep
interval is 0 to 5 s.

The normal run is derandomized (tests/property_settings.py). A longer, random
run: FLEET_INGRESS_PROPERTY_EXAMPLES=5000 .venv/bin/python -m pytest -q
-p no:cacheprovider tests/unit/test_core_properties.py (each test runs that
many; about two minutes on one core).
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from fleet_ingress.core.accept_pacing import AcceptPacer
from fleet_ingress.core.certificate_change import _overlap
from fleet_ingress.core.forwarding import fleet_request_headers
from fleet_ingress.core.health import Health, observe
from fleet_ingress.core.request_head import RequestRefused, parse_request_head
from fleet_ingress.core.retry import Failure, RetryPolicy
from fleet_ingress.core.routing import RouteKind, Router
from fleet_ingress.core.silence import QuietWatch, Silence, SilenceLimits
from tests.head_oracle import DROPPED, HOP_BY_HOP
from tests.property_settings import property_settings

EXAMPLES = 100  # each test, in CI, derandomized; FLEET_INGRESS_PROPERTY_EXAMPLES for more
SETTINGS = property_settings(EXAMPLES)


# -- health -------------------------------------------------------------------------

step = st.one_of(
    st.booleans().map(lambda b: ("probe", b)),
    st.tuples(st.integers(1, 5), st.integers(1, 5)).map(lambda fr: ("reload", fr)),
)


@SETTINGS
@given(
    start=st.sampled_from(list(Health)),
    fall=st.integers(1, 5),
    rise=st.integers(1, 5),
    steps=st.lists(step, max_size=60),
)
def test_health_fall_rise(start, fall, rise, steps):
    """Reference model: the state changes exactly when the run of consecutive
    results pushing toward a change reaches its threshold (INIT: first pass,
    or `fall` fails); the streak is that run's length, 0 after a change or a
    result that does not push; it never goes negative or reaches its threshold."""
    state, streak = start, 0
    run_pass = run_fail = 0  # consecutive results since the last change/contrary result
    for kind, value in steps:
        if kind == "reload":
            fall, rise = value
            continue
        passed = value
        new_state, new_streak = observe(state, streak, passed, fall=fall, rise=rise)
        if passed:
            run_pass, run_fail = run_pass + 1, 0
        else:
            run_fail, run_pass = run_fail + 1, 0
        if state is Health.INIT:
            want = Health.UP if passed else (Health.DOWN if run_fail >= fall else Health.INIT)
        elif state is Health.UP:
            want = Health.DOWN if (not passed and run_fail >= fall) else Health.UP
        else:
            want = Health.UP if (passed and run_pass >= rise) else Health.DOWN
        assert new_state is want, (state, streak, passed, fall, rise, run_pass, run_fail)
        assert new_streak >= 0
        if new_state is not state:
            assert new_streak == 0
            run_pass = run_fail = 0
        else:
            # the streak counts the run pushing toward a change, 0 otherwise
            pushing = run_fail if state in (Health.INIT, Health.UP) else run_pass
            if (state is Health.UP and passed) or (state is Health.DOWN and not passed):
                assert new_streak == 0
            else:
                assert new_streak == pushing
            assert new_streak < max(fall, rise)
        state, streak = new_state, new_streak


# -- silence ------------------------------------------------------------------------


@SETTINGS
@given(
    idle=st.floats(1, 100),
    carrier=st.sampled_from([0.0, 2.0, 10.0]),
    fleet=st.sampled_from([0.0, 3.0, 10.0]),
    sweeps=st.lists(
        st.tuples(st.floats(0, 5), st.booleans(), st.booleans(), st.booleans(), st.booleans()),
        max_size=60,
    ),
)
def test_quiet_watch(idle, carrier, fleet, sweeps):
    limits = SilenceLimits(idle, carrier, fleet)
    now, fc, tc = 0.0, 0, 0
    watch = QuietWatch.start(limits, fc, tc, now)
    last_c = last_f = 0.0  # last time a sweep saw the count move
    held_c = held_f = 0.0  # last time a sweep saw the side held
    for dt, c_moved, f_moved, c_held, f_held in sweeps:
        now += dt
        fc += int(c_moved)
        tc += int(f_moved)
        got = watch.check(fc, tc, now, carrier_held=c_held, fleet_held=f_held)
        if c_moved:
            last_c = now
        if f_moved:
            last_f = now
        if c_held:
            held_c = now
        if f_held:
            held_f = now
        c_quiet = now - max(last_c, held_c)
        f_quiet = now - max(last_f, held_f)
        if carrier > 0 and c_quiet >= carrier:
            want = Silence.CARRIER
        elif fleet > 0 and f_quiet >= fleet:
            want = Silence.FLEET
        elif now - max(last_c, last_f) >= idle:
            want = Silence.IDLE
        else:
            want = None
        assert got is want, (got, want, now, last_c, last_f, held_c, held_f)
        if got is not None:
            return  # the call ends at the first verdict


# -- accept pacing ------------------------------------------------------------------


@SETTINGS
@given(
    share=st.sampled_from([0.1, 0.5, 1.0, 2.0]),
    steps=st.lists(st.tuples(st.floats(0, 0.2), st.floats(0, 0.2), st.integers(0, 3)), max_size=80),
)
# Always tried: a flood, a window's worth of CPU each window, doubles the pause up
# to max_pause and holds it there (few random sequences get that far).
@example(share=0.5, steps=[(0.0, 0.0, 1)] + [(0.05, 0.2, 1)] * 12)
def test_accept_pacer_bounds(share, steps):
    pacer = AcceptPacer(share)
    now = spent = 0.0
    for dt, ds, live in steps:
        now += dt
        spent += ds
        before = pacer.pause
        wait = pacer.after_accept(now, spent, live)
        assert wait >= 0.0
        assert pacer.pause == 0.0 or pacer.first_pause <= pacer.pause <= pacer.max_pause
        if not pacer.enabled or live == 0:
            assert wait == 0.0
        else:
            assert wait == pacer.pause
        assert pacer.pause <= max(before * 2, pacer.first_pause)


# -- retry ----------------------------------------------------------------------------


@SETTINGS
@given(
    retries=st.integers(0, 4),
    conditions=st.sets(st.sampled_from([f.value for f in Failure])),
    outcomes=st.lists(
        st.one_of(st.sampled_from(list(Failure)), st.sampled_from([429, 503, 502])),
        min_size=1,
        max_size=10,
    ),
)
def test_retry_attempts_bounded(retries, conditions, outcomes):
    """At most 1 + retries attempts, whatever the failures."""
    policy = RetryPolicy(retries, frozenset(conditions), frozenset({503}))
    attempt = 0
    for outcome in outcomes:
        attempt += 1
        if isinstance(outcome, Failure):
            again = policy.retry_failure(outcome, attempt)
        else:
            again = policy.retry_status(outcome, attempt)
        if not again:
            break
    assert attempt <= 1 + retries


# -- forwarding -----------------------------------------------------------------------

HEADER_NAMES = [
    "Host",
    "host",
    "X-Forwarded-For",
    "X_Forwarded_For",
    "x-forwarded-proto",
    "X_Real_IP",
    "X-Real-IP",
    "Forwarded",
    "True-Client-IP",
    "Client_IP",
    "X-Original-URL",
    "Via",
    "Transfer-Encoding",
    "Transfer_Encoding",
    "Keep-Alive",
    "TE",
    "Proxy-Connection",
    "Proxy_Connection",
    "Content-Length",
    "Content_Length",
    "X-Foo",
    "X-Bar",
    "Trailer",
    "Http2-Settings",
    "Upgrade",
    "Connection",
    "X-Forwarded-Host",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
]
# The carrier's hop-by-hop and dropped headers (the head oracle's lists, written
# apart from the code's), and the ones the ingress writes itself.
NOT_OURS = (
    HOP_BY_HOP
    | DROPPED
    | {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
    }
)


@SETTINGS
@given(
    extra=st.lists(
        st.tuples(
            st.sampled_from(HEADER_NAMES),
            st.sampled_from(
                ["0", "1.2.3.4", "x-foo", "X-Bar, close", "Upgrade", "websocket", "h2c"]
            ),
        ),
        max_size=8,
    ),
)
def test_forwarded_headers(extra):
    lines = [b"GET /ws/bot HTTP/1.1", b"Host: carrier.example"]
    lines += [f"{n}: {v}".encode() for n, v in extra]
    raw = b"\r\n".join(lines) + b"\r\n\r\n"
    try:
        head = parse_request_head(raw)
    except RequestRefused:
        return
    out = fleet_request_headers(head, fleet_host="fleet:9000", client_ip="10.0.0.9")
    names = [n.lower() for n, _ in out]
    for ours in (
        b"host",
        b"connection",
        b"upgrade",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
    ):
        assert names.count(ours) == 1, (ours, out)
    assert b"forwarded" not in names
    connection_named = head.tokens(b"connection")
    carried = out[1:-6]  # between our Host and our six trailing headers
    for n, _ in carried:
        low = n.lower()
        assert low not in NOT_OURS, (n, out)
        assert low not in connection_named, (n, out)
        assert low.replace(b"_", b"-") not in NOT_OURS | {b"content-length"} or b"_" not in low, (
            n,
            out,
        )
    assert dict(out)[b"X-Real-IP"] == b"10.0.0.9"
    assert dict(out)[b"X-Forwarded-For"].endswith(b"10.0.0.9")


# -- routing ------------------------------------------------------------------------

PREFIXES = ["/ws/", "/ws/v2/", "/exotel/", "/w"]


@SETTINGS
@given(
    prefixes=st.lists(st.sampled_from(PREFIXES), min_size=1, unique=True),
    path=st.one_of(
        st.text(alphabet="/wsv2exotlab", max_size=12).map(lambda p: "/" + p),
        # a path on a configured prefix (or the health path), so that the
        # nested prefixes and the health check are tried often
        st.builds(
            lambda start, rest: start + rest,
            st.sampled_from([*PREFIXES, "/haproxy-health"]),
            st.one_of(st.just(""), st.text(alphabet="/wsv2exotlab", max_size=6)),
        ),
    ),
)
@example(prefixes=["/ws/", "/ws/v2/"], path="/ws/v2/bot")
@example(prefixes=["/ws/"], path="/haproxy-health")
def test_routing_longest_prefix(prefixes, path):
    router = Router(prefixes, "/haproxy-health")
    r = router.route(path)
    matching = [p for p in prefixes if path.startswith(p)]
    if path == "/haproxy-health":
        assert r.kind is RouteKind.HEALTH
    elif not matching:
        assert r.kind is RouteKind.NOT_FOUND
    else:
        longest = max(matching, key=len)
        if path == longest:
            assert r.kind is RouteKind.NOT_FOUND
        else:
            assert r.kind is RouteKind.CALL and r.prefix == longest
            assert r.prefix + r.bot_id == path and r.bot_id


# -- certificate names ----------------------------------------------------------------

LABELS = ["a", "b", "*"]


def _hosts(depth):
    if depth == 0:
        return [[]]
    return [[x, *rest] for x in ["a", "b", "c"] for rest in _hosts(depth - 1)]


ALL_HOSTS = [".".join(h) for d in range(1, 5) for h in _hosts(d)]


def _covers_ref(pattern, host):
    p, h = pattern.split("."), host.split(".")
    if len(p) != len(h):
        return False
    if p[0] == "*":
        return len(p) >= 2 and p[1:] == h[1:]
    return p == h


@SETTINGS
@given(
    a=st.lists(st.sampled_from(LABELS), min_size=1, max_size=3),
    b=st.lists(st.sampled_from(LABELS), min_size=1, max_size=3),
)
def test_certificate_name_overlap(a, b):
    # wildcards only leftmost (as issued); a bare "*" is not a name
    a = [a[0]] + [x if x != "*" else "a" for x in a[1:]] + ["x"]
    b = [b[0]] + [x if x != "*" else "b" for x in b[1:]] + ["x"]
    na, nb = ".".join(a), ".".join(b)
    hosts = [h + ".x" for h in ALL_HOSTS]
    truth = any(_covers_ref(na, h) and _covers_ref(nb, h) for h in hosts)
    assert _overlap(na, nb) == truth, (na, nb)
