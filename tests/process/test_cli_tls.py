"""TLS files as the operator meets them: `mqtt-front check` on listener and upstream certificates, and
SIGHUP reloading a listener certificate in a running `mqtt-front run`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from broker import cli
from tests.support.cli import mqtt_front
from tests.support.front import write_config
from tests.support.mosquitto import Mosquitto
from tests.support.net import tls_peer_cert
from tests.support.pki import Pki, der, write_leaf
from tests.support.ports import free_port

# ------------------------------------------------------------------ listener certificates


def test_check_loads_certificates(pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    leaf = pki.authority.issue_cert("localhost")
    write_leaf(leaf, tmp_path / "s.pem", tmp_path / "s.key")
    path = tmp_path / "front.yaml"

    def check(tls: str) -> tuple[int, str]:
        path.write_text(f"listeners: [{{name: mqtts, bind: '127.0.0.1:8883', tls: {{{tls}}}}}]\n")
        code = cli.main(["check", "-c", str(path)])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    code, out = check("cert: s.pem, key: s.key")
    assert code == 0 and "TLS (min TLSv1.2" in out, out
    code, out = check("cert: s.pem, key: missing.key")
    assert code == 1 and "listeners.0.tls.key: cannot read" in out and "missing.key" in out, out
    other = pki.authority.issue_cert("localhost")
    (tmp_path / "other.key").write_bytes(other.private_key_pem.bytes())
    code, out = check("cert: s.pem, key: other.key")
    assert code == 1 and "does not match the certificate" in out, out
    (tmp_path / "junk.pem").write_text("junk")
    code, out = check("cert: junk.pem, key: s.key")
    assert code == 1 and "listeners.0.tls.cert" in out and "no PEM certificate" in out, out
    code, out = check("cert: s.pem, key: s.key, ciphers: 'NOPE-NOTHING'")
    assert code == 1 and "listeners.0.tls.ciphers" in out, out
    os.chmod(tmp_path, 0o755)




async def test_sighup_reloads_in_a_running_process(pki: Pki, tmp_path: Path, mosquitto: Mosquitto) -> None:
    """`mqtt-front run` as an operator runs it: relative certificate paths, SIGHUP, a new certificate."""
    folder = tmp_path / "conf"
    folder.mkdir()
    leaf = pki.authority.issue_cert("localhost", "127.0.0.1")
    write_leaf(leaf, folder / "tls.pem", folder / "tls.key")
    port = free_port()
    config = folder / "front.yaml"
    config.write_text(
        f"listeners: [{{name: mqtts, bind: '127.0.0.1:{port}', tls: {{cert: tls.pem, key: tls.key}}}}]\n"
        f"upstream: {{url: '{mosquitto.url}'}}\n"
    )
    log = tmp_path / "front.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*mqtt_front(), "run", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        async with asyncio.timeout(15):
            while "ready" not in log.read_text():
                await asyncio.sleep(0.05)
        assert await tls_peer_cert(port, pki.client_context()) == der(leaf)
        new = pki.authority.issue_cert("localhost", "127.0.0.1")
        write_leaf(new, folder / "tls.pem", folder / "tls.key")
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(5):
            while "config_reloaded" not in log.read_text():
                await asyncio.sleep(0.05)
        assert await tls_peer_cert(port, pki.client_context()) == der(new)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------ upstream certificates


def test_check_loads_relative_tls_files(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    # Relative paths are relative to the configuration file's folder.
    path = write_config(
        pki.folder,
        upstream={"urls": ["mqtts://127.0.0.1:8883", "mqtts://127.0.0.2:8883"],
         "tls": {"ca": "ca.pem", "cert": "front.pem", "key": "front.key"}},
    )
    assert cli.main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mqtts://127.0.0.1:8883, mqtts://127.0.0.2:8883 (failover)" in out
    assert f"client certificate {pki.front_cert}" in out and "loads and matches" in out


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ({"ca": "missing-ca.pem"}, "upstream.tls.ca: cannot read"),
        ({"ca": "front.key"}, "upstream.tls.ca: cannot load CA certificates"),
        ({"ca": "ca.pem", "cert": "front.pem", "key": "server.key"}, "upstream.tls.key: "),
        ({"ca": "ca.pem", "cert": "front.key", "key": "front.key"}, "upstream.tls.cert: "),
        ({"ca": "ca.pem", "cert": "front.pem", "key": "ca.pem"}, "upstream.tls.key: no usable private key"),
    ],
    ids=["ca-missing", "ca-not-a-ca", "key-of-another-cert", "cert-not-a-cert", "key-not-a-key"],
)
def test_check_names_the_failing_key(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], tls: dict[str, str], expected: str
) -> None:
    tls = {k: str(pki.folder / v) for k, v in tls.items()}
    path = write_config(tmp_path, upstream={"url": "mqtts://127.0.0.1:8883", "tls": tls})
    assert cli.main(["check", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    if "server.key" in tls.get("key", ""):
        assert "is not the private key of the certificate" in err
