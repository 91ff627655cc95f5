"""NATS authentication and TLS from the environment (issue #15, item 3): user/password, token,
TLS and mutual TLS against real nats-servers from the pinned wheel, with certificates this test
makes with openssl. The tick command stands for every client; the roles share the same connect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.adapters.embedded_nats import EmbeddedNats, free_port

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "engine.cli"]


def tick(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env.update(NATS_CONNECT_TIMEOUT="3", **env_extra)
    return subprocess.run(
        [*CLI, "price", "BTCUSDT", "45000"], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> object:
    started: list[EmbeddedNats] = []

    def start(*args: str) -> EmbeddedNats:
        running = EmbeddedNats(free_port(), tmp_path / f"nats-{len(started)}", extra_args=args).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def test_user_and_password_from_the_environment(server: object, tmp_path: Path) -> None:
    running = server("--user", "desk", "--pass", "s3cret-pass")  # type: ignore[operator]
    ok = tick({"NATS_URL": running.url, "NATS_USER": "desk", "NATS_PASSWORD": "s3cret-pass"})
    assert ok.returncode == 0, ok.stderr
    secret_file = tmp_path / "nats-password"
    secret_file.write_text("s3cret-pass\n")  # as Kubernetes mounts it
    ok = tick({"NATS_URL": running.url, "NATS_USER": "desk", "NATS_PASSWORD_FILE": str(secret_file)})
    assert ok.returncode == 0, ok.stderr
    refused = tick({"NATS_URL": running.url, "NATS_USER": "desk", "NATS_PASSWORD": "wrong-pass"})
    assert refused.returncode == 1 and "cannot connect to NATS" in refused.stderr
    assert "wrong-pass" not in refused.stderr + refused.stdout
    half = tick({"NATS_URL": running.url, "NATS_USER": "desk"})
    assert half.returncode == 2 and "NATS_USER and NATS_PASSWORD" in half.stderr


def test_token_from_the_environment(server: object) -> None:
    running = server("--auth", "tok-123456")  # type: ignore[operator]
    assert tick({"NATS_URL": running.url, "NATS_TOKEN": "tok-123456"}).returncode == 0
    assert tick({"NATS_URL": running.url}).returncode == 1


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        extra = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.pem", *extra, cwd=directory)  # fmt: skip


def test_tls_and_mutual_tls(server: object, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    port = free_port()
    config = tmp_path / "tls.conf"
    config.write_text(
        f"""
tls {{
  cert_file: "{certs / "server.pem"}"
  key_file: "{certs / "server.key"}"
  ca_file: "{certs / "ca.pem"}"
  verify: true
}}
"""
    )
    running = EmbeddedNats(port, tmp_path / "nats-tls", extra_args=("-c", str(config)))
    running.start()
    try:
        url = f"tls://127.0.0.1:{port}"
        mutual = {
            "NATS_URL": url,
            "NATS_TLS_CA": str(certs / "ca.pem"),
            "NATS_TLS_CERT": str(certs / "client.pem"),
            "NATS_TLS_KEY": str(certs / "client.key"),
        }
        ok = tick(mutual)
        assert ok.returncode == 0, ok.stderr
        no_client_cert = tick({"NATS_URL": url, "NATS_TLS_CA": str(certs / "ca.pem")})
        assert no_client_cert.returncode == 1 and "cannot connect to NATS" in no_client_cert.stderr
        unknown_ca = tick({k: v for k, v in mutual.items() if k != "NATS_TLS_CA"})
        assert unknown_ca.returncode == 1  # the server's certificate is not trusted by default
    finally:
        running.stop()
