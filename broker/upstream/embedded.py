"""The embedded default upstream: an amqtt broker in this process, on loopback.

It exists only so that ``mqtt-front run`` works on a bare machine. amqtt speaks
MQTT 3.1.1 only, so v5 clients need a real upstream (Mosquitto, EMQX, ...).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger("mqtt_front.embedded")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedBroker:
    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._broker: Any = None

    async def start(self) -> None:
        from amqtt.broker import Broker  # imported late: only the embedded default needs it

        # amqtt logs every packet at INFO; keep the operator's log about mqtt-front.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.port = _free_port()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        await self._broker.start()
        log.info("embedded amqtt broker (MQTT 3.1.1 only) on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
