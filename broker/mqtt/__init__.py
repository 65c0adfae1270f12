"""The MQTT 3.1.1 / 5.0 wire format, Sans-I/O: bytes in, packets or protocol errors out.

:mod:`~broker.mqtt.framer` cuts a stream into packets without copying them,
:mod:`~broker.mqtt.packets` decodes and encodes each packet type, :mod:`~broker.mqtt.properties`
and :mod:`~broker.mqtt.primitives` the fields they are made of, :mod:`~broker.mqtt.topics` checks
topic syntax, :mod:`~broker.mqtt.reasons` names every reason code and :mod:`~broker.mqtt.errors`
the protocol errors with the code each is answered with. Imports nothing of the project but
``acl.topics`` (the shared topic grammar); no I/O.
"""
