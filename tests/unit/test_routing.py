import pytest

from fleet_ingress.core.routing import RouteKind, Router

ROUTER = Router(["/ws/", "/exotel/"], "/haproxy-health")


@pytest.mark.parametrize(
    ("path", "kind", "prefix", "bot"),
    [
        ("/ws/bot-1", RouteKind.CALL, "/ws/", "bot-1"),
        ("/exotel/abc", RouteKind.CALL, "/exotel/", "abc"),
        ("/ws/a/b", RouteKind.CALL, "/ws/", "a/b"),
        ("/haproxy-health", RouteKind.HEALTH, "", ""),
        ("/ws/", RouteKind.NOT_FOUND, "", ""),
        ("/exotel/", RouteKind.NOT_FOUND, "", ""),
        ("/ws", RouteKind.NOT_FOUND, "", ""),
        ("/", RouteKind.NOT_FOUND, "", ""),
        ("/attach", RouteKind.NOT_FOUND, "", ""),
        ("/livekit/dialout", RouteKind.NOT_FOUND, "", ""),
        ("/livekit/widget", RouteKind.NOT_FOUND, "", ""),
        ("/livekit/dispatch", RouteKind.NOT_FOUND, "", ""),
        ("/haproxy-health/x", RouteKind.NOT_FOUND, "", ""),
        ("/WS/bot", RouteKind.NOT_FOUND, "", ""),
        ("/wsx/bot", RouteKind.NOT_FOUND, "", ""),
    ],
)
def test_routes(path, kind, prefix, bot):
    route = ROUTER.route(path)
    assert (route.kind, route.prefix, route.bot_id) == (kind, prefix, bot)


def test_longest_prefix_wins():
    router = Router(["/ws/", "/ws/v2/"], "/health")
    assert router.route("/ws/v2/bot").prefix == "/ws/v2/"
    assert router.route("/ws/v3/bot").prefix == "/ws/"


def test_configured_health_path():
    router = Router(["/ws/"], "/healthz")
    assert router.route("/healthz").kind is RouteKind.HEALTH
    assert router.route("/haproxy-health").kind is RouteKind.NOT_FOUND
