"""Request-side helpers of the middleware (no services needed)."""

from metering.edge.middleware import MeteringMiddleware


def test_forwarded_for_is_read_from_the_right_behind_trusted_proxies():
    mw = MeteringMiddleware(None, guard=None, trusted_proxies=["10.0.0.0/8"])  # type: ignore[arg-type]

    def ip(peer: str, xff: str | None) -> str:
        headers = [(b"x-forwarded-for", xff.encode())] if xff else []
        return mw._client_ip({"client": (peer, 1234), "headers": headers})

    assert ip("10.0.0.5", "203.0.113.9") == "203.0.113.9"
    # a client-supplied first entry is not believed: the proxy appended the real peer
    assert ip("10.0.0.5", "1.2.3.4, 203.0.113.9") == "203.0.113.9"
    assert ip("10.0.0.5", "203.0.113.9, 10.0.0.7") == "203.0.113.9"  # two proxies
    assert ip("198.51.100.1", "203.0.113.9") == "198.51.100.1"  # untrusted peer: ignored
    assert ip("10.0.0.5", "garbage") == "10.0.0.5"
    assert ip("10.0.0.5", None) == "10.0.0.5"


def test_any_path_makes_a_valid_endpoint():
    from metering.edge.middleware import safe_endpoint
    from metering.events import MAX_ENDPOINT_LEN, UsageEvent

    assert safe_endpoint("/v1/items/{item_id}") == "/v1/items/{item_id}"
    assert safe_endpoint("/v1/\x00nul\r\n") == "/v1/%00nul%0D%0A"
    assert safe_endpoint("/bad/\ud800") == "/bad/\ufffd"
    assert safe_endpoint("") == "/"
    long = safe_endpoint("/" + "a" * 5000)
    assert len(long) == MAX_ENDPOINT_LEN
    for path in ("/v1/\x00", "/\ud800\udfff", long):
        UsageEvent.new(  # validates like the stream does
            user_id=None,
            api_key_id=None,
            endpoint=safe_endpoint(path),
            method="GET",
            status_code=404,
            response_time_ms=1.0,
            client_ip="192.0.2.1",
        ).to_json()


def test_forwarded_entries_and_path_segments():
    from metering.edge.middleware import hop_address, under

    assert hop_address("203.0.113.5") == "203.0.113.5"
    assert hop_address("203.0.113.5:8080") == "203.0.113.5"
    assert hop_address("2001:db8::1") == "2001:db8::1"
    assert hop_address("[2001:db8::1]:443") == "2001:db8::1"
    assert hop_address("[2001:db8::1]") == "2001:db8::1"
    for bad in ("unknown", "203.0.113.5:http", "[2001:db8::1]x", "[nope]:1", "_hidden"):
        assert hop_address(bad) is None, bad
    assert under("/health", ("/health",)) and under("/health/live", ("/health",))
    assert not under("/healthcare", ("/health",)) and not under("/x", ())
    assert under("/anything", ("/",))
