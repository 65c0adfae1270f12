"""Upstream connects per second: plain TCP, TLS with full handshakes, TLS with session resumption.

Each connect goes through :class:`broker.upstream.connector.UpstreamConnector` (TCP + TLS handshake) and then
sends an MQTT CONNECT and waits for the CONNACK, so the broker has finished its side of the
handshake (client-certificate check included) before the next one starts. The Mosquitto is
started here with a TLS listener that requires a client certificate (as in
config/mosquitto-internal.conf); certificates are generated with trustme into a temporary folder.

Run: .venv/bin/python bench/upstream_tls.py [-n 400] [-c 1 16] [--key-type rsa|ecdsa]
Numbers depend heavily on the machine and on what else runs on it: compare the rows, not
absolute values.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme

from broker.config import UpstreamConfig
from broker.mqtt.packets import Connect, encode_connect
from broker.upstream.connector import UpstreamConnector
from broker.upstream.targets import UpstreamTarget
from tests.support.mosquitto import start_mosquitto, start_tls_mosquitto
from tests.support.pki import make_pki, pki_directory

_CONNECT = encode_connect(Connect(4, True, 60, "bench"))


class _MqttProbe(asyncio.Protocol):
    """Sends CONNECT as soon as the (TLS) connection is up; done at the CONNACK."""

    def __init__(self) -> None:
        self.connack: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_CONNECT)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if data[:1] == b"\x20" and not self.connack.done():
            self.connack.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(exc or ConnectionError("closed before CONNACK"))


async def _one(connector: UpstreamConnector) -> None:
    probe = _MqttProbe()

    def factory(_target: UpstreamTarget) -> asyncio.BaseProtocol:
        return probe

    transport, _ = await connector.open_connection(factory)
    await probe.connack
    transport.close()


async def _measure(connector: UpstreamConnector, n: int, concurrency: int) -> float:
    await _one(connector)  # warm up (and, with resumption, get a session to resume)
    await asyncio.sleep(0.05)
    per_worker = n // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await _one(connector)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return per_worker * concurrency / (time.perf_counter() - started)


def _connector(url: str, tls: dict[str, object] | None) -> UpstreamConnector:
    data: dict[str, object] = {"url": url, "connect_timeout": 10}
    if tls is not None:
        data["tls"] = tls
    return UpstreamConnector.from_config(UpstreamConfig.model_validate(data))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=400, help="connects per measurement")
    parser.add_argument("-c", type=int, nargs="+", default=[1, 16], help="concurrency levels")
    parser.add_argument("--key-type", choices=["ecdsa", "rsa"], default="ecdsa")
    parser.add_argument("--min-version", choices=["TLSv1.2", "TLSv1.3"], default="TLSv1.2")
    parser.add_argument("--nagle", action="store_true", help="leave Mosquitto's set_tcp_nodelay off (its default)")
    args = parser.parse_args()
    key_type = trustme.KeyType.RSA if args.key_type == "rsa" else trustme.KeyType.ECDSA
    with pki_directory() as directory:
        pki = make_pki(directory, key_type)
        # Without set_tcp_nodelay, Mosquitto's CONNACK after its TLS session tickets waits for a
        # delayed ACK (Nagle): ~40 ms per connect, whatever the TLS cost. --nagle shows it.
        nodelay = "" if args.nagle else "set_tcp_nodelay true\n"
        tls_broker = start_tls_mosquitto(directory / "tls", pki, require_cert=True, extra=nodelay)
        plain_broker = start_mosquitto(directory / "plain", nodelay)
        try:
            tls = {"ca": str(pki.ca), "cert": str(pki.front_cert), "key": str(pki.front_key),
                   "min_version": args.min_version}
            url = f"mqtts://127.0.0.1:{tls_broker.port}"
            cases = [
                ("plain TCP (reference)", plain_broker.url, None),
                ("TLS, full handshake every time", url, {**tls, "session_resumption": False}),
                ("TLS, session resumption", url, tls),
            ]
            print(f"{args.n} upstream connects (TCP + TLS + MQTT CONNECT/CONNACK), {args.key_type} keys, "
                  f"client certificate required, TLS >= {args.min_version[3:]}")
            for concurrency in args.c:
                for name, case_url, case_tls in cases:
                    connector = _connector(case_url, case_tls)
                    rate = await _measure(connector, args.n, concurrency)
                    target = connector.targets[0]
                    extra = f"  ({target.resumed}/{target.handshakes} resumed)" if target.tls else ""
                    print(f"  concurrency {concurrency:>3}  {name:<32} {rate:8.0f} connects/s{extra}")
        finally:
            tls_broker.stop()
            plain_broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
