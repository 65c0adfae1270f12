"""mqtt-front: an MQTT front broker."""

__version__ = "0.1.0"
