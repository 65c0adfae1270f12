"""The embedded default upstream (demo only): which broker runs when no ``upstream`` is configured.

:func:`embedded_broker` picks the managed Mosquitto child process (:mod:`broker.upstream.managed`: MQTT 5
and 3.1.1) when the binary is found, else :class:`AmqttBroker`, amqtt in this process (the optional extra
``mqtt-front[embedded]``, imported only here and only then; MQTT 3.1.1 only). Either listens on loopback
only and accepts nothing but a random per-start :class:`~broker.upstream.managed.Credential` that only
the front broker knows, so that the ACLs cannot be bypassed by connecting to it directly.

:func:`embedded_problem` is the rule ``check`` and ``run`` share: without ``upstream``, every listener must
be on loopback unless ``upstream: {embedded: true}`` says the embedded broker is meant.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, Protocol

from broker.config import Config, ConfigError
from broker.logs import log_event
from broker.upstream.connector import UpstreamConnector
from broker.upstream.managed import Credential, ManagedMosquitto, find_mosquitto, free_port

log = logging.getLogger("mqtt_front.embedded")

DEMO_ONLY = "embedded broker: demo only"
AMQTT_MISSING = (
    "no upstream is configured and neither mosquitto (apt-get install mosquitto) nor amqtt "
    "(pip install 'mqtt-front[embedded]') is installed: install one, or set upstream.url to your broker"
)


class EmbeddedBroker(Protocol):
    """What the front broker needs of either embedded broker."""

    name: str
    label: str
    v5: bool  # False: MQTT 5 clients are refused (CONNACK 0x84)
    host: str
    port: int
    credential: Credential

    def connector(self, connect_timeout: float = 5.0) -> UpstreamConnector: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def wants_embedded(config: Config) -> bool:
    """No upstream section, or ``upstream: {embedded: true}``."""
    return config.upstream is None or config.upstream.embedded


def embedded_broker() -> EmbeddedBroker:
    """The managed Mosquitto when its binary is found, else amqtt; started by ``start()``."""
    binary = find_mosquitto()
    return ManagedMosquitto(binary) if binary is not None else AmqttBroker()


async def start_embedded(broker: EmbeddedBroker, connect_timeout: float = 5.0) -> UpstreamConnector:
    """Start ``broker`` (``ConfigError`` when it cannot), say it is for demos, and return the way to it."""
    await broker.start()
    log.warning(
        "%s: %s on %s:%d (MQTT %s), reachable only with a per-start password the front broker holds; "
        "set upstream.url to your broker for production",
        DEMO_ONLY, broker.label, broker.host, broker.port, "5 and 3.1.1" if broker.v5 else "3.1.1 only",
    )
    return broker.connector(connect_timeout)


def describe_embedded() -> str:
    """``check``'s line about the embedded broker that ``run`` would start; ``ConfigError`` when none can."""
    binary = find_mosquitto()
    if binary is not None:
        what = f"managed Mosquitto ({binary}), MQTT 5 and 3.1.1"
    elif _amqtt_installed():
        what = "amqtt (mosquitto not found), MQTT 3.1.1 clients only: MQTT 5 clients are refused (0x84)"
    else:
        raise ConfigError(AMQTT_MISSING)
    return f"upstream: {DEMO_ONLY}: {what}; on loopback, with a password only the front broker knows"


def _amqtt_installed() -> bool:
    try:
        return importlib.util.find_spec("amqtt") is not None
    except (ImportError, ValueError):  # ValueError: a module entry without a spec (blocked, half-imported)
        return False


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may well resolve to a public address


def embedded_problem(config: Config) -> str | None:
    """Why ``config`` must not run as is, or None: without ``upstream``, a listener that is not on loopback
    would serve the demo broker to the network by accident."""
    if config.upstream is not None:  # a real upstream, or embedded: true said on purpose
        return None
    for i, listener in enumerate(config.listeners):
        if not _is_loopback(listener.host_port[0]):
            return (
                f"listeners.{i}.bind: {listener.bind} is not a loopback address and no upstream is configured: "
                f"the {DEMO_ONLY}; set upstream.url to your broker, or upstream: {{embedded: true}} to serve "
                "the embedded broker on this address anyway"
            )
    return None


class AmqttBroker:
    """The fallback: amqtt in this process, on a free loopback port, only the credential accepted."""

    name = "amqtt"
    label = "embedded amqtt"
    v5 = False

    def __init__(self, credential: Credential | None = None, host: str = "127.0.0.1") -> None:
        self.credential = credential or Credential.generate()
        self.host = host
        self.port = 0
        self._broker: Any = None

    def connector(self, connect_timeout: float = 5.0) -> UpstreamConnector:
        return UpstreamConnector.single(self.host, self.port, connect_timeout, self.label)

    async def start(self) -> None:
        broker_class = _amqtt_broker_class()
        from broker.upstream.amqtt_auth import PLUGIN  # imports amqtt too

        # amqtt logs every packet at INFO; keep the operator's log about mqtt-front.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.port = free_port(self.host)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {PLUGIN: {"username": self.credential.username, "password": self.credential.password}},
        }
        self._broker = broker_class(config)
        await self._broker.start()
        log_event(log, logging.INFO, "embedded_started", broker=self.name, host=self.host, port=self.port)
        log.warning(
            "amqtt speaks MQTT 3.1.1 only: MQTT 5 clients (such as the FlowFuse project-link nodes) are refused "
            "with CONNACK 0x84; install mosquitto for the managed Mosquitto, or set upstream.url"
        )

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
            log_event(log, logging.INFO, "embedded_stopped", broker=self.name)


def _amqtt_broker_class() -> Callable[[dict[str, Any]], Any]:
    try:
        from amqtt.broker import Broker
    except ImportError:
        raise ConfigError(AMQTT_MISSING) from None
    broker: Callable[[dict[str, Any]], Any] = Broker
    return broker
