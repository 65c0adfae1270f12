"""The internal-broker side: one upstream connection per client, failover, TLS, the embedded default.

:mod:`~broker.upstream.connector` chooses and opens upstream connections,
:mod:`~broker.upstream.protocol` moves their bytes to the client connection,
:mod:`~broker.upstream.tls_client` runs TLS with session resumption over ``MemoryBIO``,
:mod:`~broker.upstream.tls_config` checks ``upstream.tls``, :mod:`~broker.upstream.embedded` picks
the embedded default (demo only): :mod:`~broker.upstream.managed`'s Mosquitto child process, else amqtt
(:mod:`~broker.upstream.amqtt_auth` locks it down). It never imports the relay: the client connection
is an ``UpstreamSink`` port.
"""
