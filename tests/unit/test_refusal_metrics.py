"""The pure parts of the refusal and merge metrics: which ``reason`` label a refused WebSocket upgrade or
TLS handshake gets, and how the parent of ``--workers N`` combines the workers' samples of the new families
(on the wire: tests/e2e/test_metrics_edge.py, tests/process/test_metrics_workers.py)."""

from __future__ import annotations

import ssl

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import InvalidUpgrade, NegotiationError
from websockets.http11 import Request

from broker.edge.tls import TLS_FAILURES, tls_failure_reason
from broker.edge.websocket import WS_REFUSALS, refusal_reason
from broker.edge.ws_policy import WsPolicy, screen_request, select_subprotocol
from broker.ops.worker_metrics import merge

POLICY = WsPolicy(path="/mqtt", allowed_origins=frozenset({"https://app.example"}), allowed_hosts=frozenset({"h"}))


def request(path: str = "/mqtt", *headers: tuple[str, str]) -> Request:
    return Request(path, Headers(list(headers)))


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (request("/other", ("Host", "h")), "ws_path"),
        (request("/mqtt"), "ws_host"),  # no Host where allowed_hosts is set
        (request("/mqtt", ("Host", "elsewhere")), "ws_host"),
        (request("/mqtt", ("Host", "h"), ("Origin", "https://evil.example")), "ws_origin"),
        (request("/mqtt", ("Host", "h"), ("Host", "h")), "ws_bad_request"),
    ],
)
def test_screened_requests_get_their_reason(req: Request, reason: str) -> None:
    refusal = screen_request(req, POLICY)
    assert refusal is not None
    assert refusal_reason(refusal, None) == reason
    assert reason in WS_REFUSALS


def test_library_refusals_get_their_reason() -> None:
    with pytest.raises(NegotiationError) as missing:
        select_subprotocol([], True)
    with pytest.raises(NegotiationError) as other:
        select_subprotocol(["wamp"], True)
    assert refusal_reason(None, missing.value) == "ws_subprotocol"
    assert refusal_reason(None, other.value) == "ws_subprotocol"
    assert refusal_reason(None, InvalidUpgrade("Upgrade", "h2c")) == "ws_bad_request"
    assert refusal_reason(None, NegotiationError("unsupported extension")) == "ws_bad_request"


def ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] ...")
    exc.reason = reason
    return exc


@pytest.mark.parametrize(
    ("openssl_reason", "label"),
    [
        ("CALLBACK_FAILED", "tls_server_name"),
        ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "tls_client_certificate"),
        ("CERTIFICATE_VERIFY_FAILED", "tls_client_certificate"),
        ("TLSV1_ALERT_UNKNOWN_CA", "tls_certificate_rejected"),
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "tls_certificate_rejected"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "tls_certificate_rejected"),
        ("UNSUPPORTED_PROTOCOL", "tls_version"),
        ("NO_SHARED_CIPHER", "tls_version"),
        ("WRONG_VERSION_NUMBER", "tls_not_tls"),
        ("HTTP_REQUEST", "tls_not_tls"),
        ("DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "tls_handshake"),
    ],
)
def test_tls_failures_get_their_reason(openssl_reason: str, label: str) -> None:
    assert tls_failure_reason(ssl_error(openssl_reason)) == label
    assert label in TLS_FAILURES


WORKER = """# HELP mqtt_front_config_reload_success x
# TYPE mqtt_front_config_reload_success gauge
mqtt_front_config_reload_success {success}
# HELP mqtt_front_config_last_reload_timestamp_seconds x
# TYPE mqtt_front_config_last_reload_timestamp_seconds gauge
mqtt_front_config_last_reload_timestamp_seconds {loaded}
# HELP mqtt_front_certificate_expiry_seconds x
# TYPE mqtt_front_certificate_expiry_seconds gauge
mqtt_front_certificate_expiry_seconds{{listener="mqtts"}} {left}
mqtt_front_certificate_expiry_seconds{{upstream="a:8883"}} {left}
# HELP mqtt_front_handshake_failures_total x
# TYPE mqtt_front_handshake_failures_total counter
mqtt_front_handshake_failures_total{{listener="mqtts",reason="tls_not_tls"}} {refused}
"""


def test_workers_merge_sums_counters_and_takes_the_worst_gauge() -> None:
    texts = [
        WORKER.format(success=1, loaded=1000.0, left=500.0, refused=2),
        WORKER.format(success=0, loaded=900.0, left=400.0, refused=3),
        WORKER.format(success=1, loaded=1100.0, left=450.0, refused=0),
    ]
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in merge(texts)
        for sample in family.samples
    }
    assert samples[("mqtt_front_config_reload_success", ())] == 0  # one worker failed its reload
    assert samples[("mqtt_front_config_last_reload_timestamp_seconds", ())] == 900.0  # the oldest worker's
    assert samples[("mqtt_front_certificate_expiry_seconds", (("listener", "mqtts"),))] == 400.0
    assert samples[("mqtt_front_certificate_expiry_seconds", (("upstream", "a:8883"),))] == 400.0
    assert samples[("mqtt_front_handshake_failures_total", (("listener", "mqtts"), ("reason", "tls_not_tls")))] == 5
