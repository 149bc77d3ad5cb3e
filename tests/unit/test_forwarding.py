"""The head a fleet receives, rebuilt from parsed fields (no sockets)."""

from fleet_ingress.core.fleet_exchange import FleetExchange
from fleet_ingress.core.forwarding import fleet_request_headers
from fleet_ingress.core.request_head import parse_request_head


def _head(extra: bytes = b""):
    return parse_request_head(
        b"GET /exotel/bot?sid=1&x=%20y HTTP/1.1\r\n"
        b"Host: calls.example.com\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade, X-Secret\r\n"
        b"Sec-WebSocket-Key: k==\r\n"
        b"Sec-WebSocket-Protocol: audio.v1, audio.v2\r\n"
        b"X-Secret: hop\r\n"
        b"Keep-Alive: timeout=5\r\n" + extra + b"\r\n"
    )


def _as_dict(headers):
    out: dict[bytes, list[bytes]] = {}
    for k, v in headers:
        out.setdefault(k.lower(), []).append(v)
    return out


def test_host_and_forwarded_headers_are_set():
    h = _as_dict(fleet_request_headers(_head(), fleet_host="fleet1:8443", client_ip="203.0.113.9"))
    assert h[b"host"] == [b"fleet1:8443"]
    assert h[b"x-forwarded-for"] == [b"203.0.113.9"]
    assert h[b"x-forwarded-proto"] == [b"https"]
    assert h[b"x-forwarded-host"] == [b"calls.example.com"]
    assert h[b"upgrade"] == [b"websocket"]
    assert h[b"connection"] == [b"Upgrade"]
    assert h[b"sec-websocket-protocol"] == [b"audio.v1, audio.v2"]
    assert h[b"sec-websocket-key"] == [b"k=="]


def test_hop_by_hop_and_connection_named_headers_are_dropped():
    h = _as_dict(fleet_request_headers(_head(), fleet_host="f", client_ip="1.2.3.4"))
    assert b"x-secret" not in h
    assert b"keep-alive" not in h


def test_an_expectation_of_a_body_is_not_forwarded():
    """A call has no body: `Expect: 100-continue` would have a fleet answer 100
    before its 101, which strict WebSocket clients refuse."""
    for name in (b"Expect", b"expect", b"EXPECT"):
        head = _head(name + b": 100-continue\r\nX-Other: kept\r\n")
        h = _as_dict(fleet_request_headers(head, fleet_host="f", client_ip="1.2.3.4"))
        assert b"expect" not in h and h[b"x-other"] == [b"kept"]


def test_existing_forwarded_for_gets_the_carrier_appended_and_others_replaced():
    extra = (
        b"X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 198.51.100.2\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: evil\r\n"
    )
    h = _as_dict(fleet_request_headers(_head(extra), fleet_host="f", client_ip="10.0.0.7"))
    assert h[b"x-forwarded-for"] == [b"198.51.100.1, 198.51.100.2, 10.0.0.7"]
    assert h[b"x-forwarded-proto"] == [b"https"]
    assert h[b"x-forwarded-host"] == [b"calls.example.com"]


def test_a_carriers_claims_of_its_address_and_scheme_are_replaced_or_dropped():
    # A fleet behind nginx reads X-Real-IP, one that speaks RFC 7239 reads Forwarded:
    # neither may carry what a carrier says of itself.
    extra = (
        b"X-Real-IP: 6.6.6.8\r\nForwarded: for=6.6.6.8;proto=http;host=evil\r\n"
        b"forwarded: for=6.6.6.9\r\nX_Real_IP: 6.6.6.7\r\n"
    )
    headers = fleet_request_headers(_head(extra), fleet_host="f", client_ip="203.0.113.9")
    h = _as_dict(headers)
    assert h[b"x-real-ip"] == [b"203.0.113.9"]
    assert b"forwarded" not in h and b"x_real_ip" not in h
    assert b"6.6.6" not in b"".join(v for _, v in headers)


def test_a_carriers_other_x_forwarded_fields_are_dropped_and_its_chain_kept():
    # A fleet's framework reads the whole family as the ingress's word: a carrier's
    # X-Forwarded-Port beside our X-Forwarded-Proto made https://calls.test:80/ URLs.
    extra = (
        b"X-Forwarded-Port: 80\r\nX-Forwarded-Prefix: /attach\r\nX-Forwarded-Ssl: off\r\n"
        b"x-forwarded-scheme: http\r\nX-FORWARDED-SERVER: evil\r\nX_Forwarded_Port: 80\r\n"
        b"X-Forwarded-Client-Cert: Hash=1\r\nX-Forwarded-For: 198.51.100.1\r\n"
        b"X-Forwardedness: kept\r\n"
    )
    headers = fleet_request_headers(_head(extra), fleet_host="f", client_ip="10.0.0.7")
    family = [
        (k, v) for k, v in headers if k.lower().replace(b"_", b"-").startswith(b"x-forwarded-")
    ]
    assert family == [
        (b"X-Forwarded-For", b"198.51.100.1, 10.0.0.7"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"calls.example.com"),
    ]
    h = _as_dict(headers)
    assert h[b"x-forwardedness"] == [b"kept"]


def test_only_the_websocket_upgrade_is_asked_of_the_fleet():
    # "h2c" beside "websocket" would let a fleet that honours it switch to HTTP/2,
    # whose requests (any path) the ingress never sees.
    raw = _head(b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n").headers
    raw = [(k, b"websocket, h2c") if k.lower() == b"upgrade" else (k, v) for k, v in raw]
    carrier = parse_request_head(
        b"GET /ws/x HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in raw) + b"\r\n"
    )
    h = _as_dict(fleet_request_headers(carrier, fleet_host="f", client_ip="10.0.0.7"))
    assert h[b"upgrade"] == [b"websocket"]
    assert h[b"connection"] == [b"Upgrade"]
    assert b"http2-settings" not in h


def test_underscore_spellings_of_headers_we_set_or_drop_do_not_reach_the_fleet():
    # WSGI/CGI fleets read X_Forwarded_For as X-Forwarded-For: it must not stand in for ours.
    extra = (
        b"X_Forwarded_For: 6.6.6.6\r\nx-forwarded_proto: http\r\nX_Forwarded_Host: evil\r\n"
        b"Transfer_Encoding: chunked\r\nKeep_Alive: 5\r\nX_Secret: hop\r\n"
        b"Content_Length: 5\r\ncontent_length: 0\r\n"
        b"X_Trace: kept\r\nSec_Custom: kept\r\n"
    )
    headers = fleet_request_headers(_head(extra), fleet_host="f", client_ip="10.0.0.7")
    names = {k.lower() for k, _ in headers}
    assert not {n for n in names if n.replace(b"_", b"-").startswith(b"x-forwarded") and b"_" in n}
    assert b"transfer_encoding" not in names and b"keep_alive" not in names
    # Content-Length decides whether a head has a body: its underscore twin could be read
    # by a CGI fleet as the length we judged to be absent.
    assert b"content_length" not in names
    # Other underscore names go through as they are, X_Secret too (Connection named X-Secret,
    # a different token): only the spellings of what the ingress sets or drops are removed.
    assert _as_dict(headers)[b"x_trace"] == [b"kept"]
    assert _as_dict(headers)[b"sec_custom"] == [b"kept"]
    assert _as_dict(headers)[b"x_secret"] == [b"hop"]
    assert _as_dict(headers)[b"x-forwarded-for"] == [b"10.0.0.7"]


def test_serialized_request_keeps_method_target_and_header_casing():
    head = _head()
    exchange = FleetExchange(
        head.method,
        head.target,
        fleet_request_headers(head, fleet_host="fleet1", client_ip="::1"),
        max_head_bytes=16384,
    )
    raw = exchange.request_bytes
    assert raw.startswith(b"GET /exotel/bot?sid=1&x=%20y HTTP/1.1\r\nHost: fleet1\r\n")
    assert b"\r\nSec-WebSocket-Key: k==\r\n" in raw
    assert b"\r\nX-Forwarded-For: ::1\r\n" in raw
    reparsed = parse_request_head(raw)
    assert reparsed.target == head.target
    assert reparsed.is_websocket_upgrade


def test_a_carriers_other_claims_of_its_address_scheme_host_or_url_are_dropped():
    """Each is read as the one proxy's word by a framework or module told to trust
    it (nginx realip's real_ip_header, Tornado's xheaders, IIS URL Rewrite, Symfony
    before 5); any spelling, the underscore one too (a WSGI fleet's HTTP_CLIENT_IP).
    What a carrier legitimately sends is kept, in its order: its hops (Via), its
    signature, cookies and credentials."""
    claims = [
        b"X-Client-IP", b"True-Client-IP", b"CF-Connecting-IP", b"X-Original-URL",
        b"X-Rewrite-URL", b"X-Original-Forwarded-For", b"X-ProxyUser-Ip", b"Client-IP",
        b"X-Cluster-Client-IP", b"Fastly-Client-IP", b"x-scheme", b"X-URL-SCHEME",
        b"Front-End-Https", b"X-Original-Host", b"X-Host", b"Client_IP", b"X_Original_URL",
    ]  # fmt: skip
    kept = [
        (b"Via", b"1.1 carrier-edge"),
        (b"X-Twilio-Signature", b"sig"),
        (b"Cookie", b"a=b"),
        (b"Authorization", b"Bearer t"),
        (b"X-Client-Id", b"bot-7"),
    ]
    extra = b"".join(name + b": 6.6.6.6\r\n" for name in claims)
    extra += b"".join(name + b": " + value + b"\r\n" for name, value in kept)
    headers = fleet_request_headers(_head(extra), fleet_host="f", client_ip="203.0.113.9")
    assert b"6.6.6.6" not in b"".join(v for _, v in headers), headers
    assert [h for h in headers if h in kept] == kept
