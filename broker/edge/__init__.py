"""What clients connect to: listeners, listener TLS, WebSocket, PROXY protocol.

Every listener ends in a :class:`broker.relay.ClientConnection`; the adapters here (WebSocket
framing, the PROXY header reader) look like a socket transport to it. The pure parts (PROXY
header parser, WebSocket policy and frame splitter) are Sans-I/O and tested alone.
"""
