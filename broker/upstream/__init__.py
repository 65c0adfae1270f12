"""The internal-broker side: one upstream connection per client, failover, TLS, the embedded default.

:mod:`~broker.upstream.connector` chooses and opens upstream connections,
:mod:`~broker.upstream.protocol` moves their bytes to the client connection,
:mod:`~broker.upstream.tls_client` runs TLS with session resumption over ``MemoryBIO``,
:mod:`~broker.upstream.tls_config` checks ``upstream.tls``, :mod:`~broker.upstream.embedded` runs
the amqtt default. It never imports the relay: the client connection is an ``UpstreamSink`` port.
"""
