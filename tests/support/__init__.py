"""What the tests share: byte builders, one raw client, Mosquitto, certificates, ports, the CLI, ops scrapes.

Plain modules, no fixtures (those live in the conftest.py files and call these). Nothing here is a test.
"""
