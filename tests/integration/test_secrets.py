"""Secrets never leave (issue #15): the engine runs with known secrets (venue API key and secret,
NATS password, MySQL password, the event signing key) through failures: a venue that refuses the
key, a MySQL that refuses the password, a NATS that refuses the login. Every output is then
searched for them: stdout and stderr of every process, the events stored, /metrics and
/readyz, and the rows written to MySQL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import nats
import pytest

from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.config import MysqlTarget
from tests.integration.venues import Emulator

pytestmark = pytest.mark.integration

API_KEY = "AKIAknownAPIkey0001"
API_SECRET = "known-api-secret-a1b2c3d4"
NATS_PASSWORD = "known-nats-pass-5566"
MYSQL_PASSWORD = "known-mysql-pass-7788"
SIGNING_KEY = "known-signing-key-99aa88bb"
SECRETS = (API_KEY, API_SECRET, NATS_PASSWORD, MYSQL_PASSWORD, SIGNING_KEY)


@pytest.fixture
def nats_with_password(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(
        free_port(), tmp_path / "nats", extra_args=("--user", "desk", "--pass", NATS_PASSWORD)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "MYSQL_", "EXCHANGE_", "EVENTS_"))
    }
    env.update(
        LOG_FORMAT="json", LOG_LEVEL="DEBUG", NATS_CONNECT_TIMEOUT="3", MYSQL_CONNECT_TIMEOUT="3", **extra
    )
    return env


async def _run(args: list[str], env: dict[str, str], seconds: float) -> str:
    """The command's whole output; interrupted (as an operator would) if still running after `seconds`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    # One reader for the whole run: cancelling communicate() would drop what it had read.
    reader = asyncio.create_task(process.communicate())
    if not (await asyncio.wait({reader}, timeout=seconds))[0]:
        process.send_signal(2)
        if not (await asyncio.wait({reader}, timeout=20))[0]:
            process.kill()
    out, _ = await reader
    return out.decode(errors="replace")


def _http_get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(answer.read().decode())
    except urllib.error.HTTPError as refused:  # a 503 from /readyz still has a body
        return str(refused.read().decode())


def _leaks(text: str) -> list[str]:
    forms = {s for secret in SECRETS for s in (secret, quote(secret, safe=""), json.dumps(secret)[1:-1])}
    return sorted(form for form in forms if form in text)


async def test_no_secret_reaches_any_output(
    nats_with_password: EmbeddedNats, emulator: Emulator, mysql_server: MysqlTarget, tmp_path: Path
) -> None:
    nats_url = nats_with_password.url
    bad_mysql = f"mysql://root:{MYSQL_PASSWORD}@{mysql_server.host}:{mysql_server.port}/te_secret_test"
    good_nats = {"NATS_URL": nats_url, "NATS_USER": "desk", "NATS_PASSWORD": NATS_PASSWORD}
    venue = {
        "EXCHANGE": "binanceusdm", "EXCHANGE_API_URL": emulator.url, "EXCHANGE_API_KEY": API_KEY,
        "EXCHANGE_API_SECRET": API_SECRET, "EVENTS_SIGNING_KEY": SIGNING_KEY, "ORDER_TIMEOUT_SECONDS": "2",
        "SET_POSITION_MODE": "true",
    }  # fmt: skip
    outputs: list[str] = []
    http_port = free_port()

    # The worker trades with the known key, decides, stores events; MySQL is out of its way.
    emulator.exchange.api_key, emulator.exchange.secret = API_KEY, API_SECRET
    worker = asyncio.create_task(
        _run(["worker"], _env(**good_nats, **venue, HTTP_PORT=str(http_port), MYSQL_URL=bad_mysql), 12)
    )
    client = await nats.connect(nats_url, user="desk", password=NATS_PASSWORD)
    try:
        js = client.jetstream()

        async def stream_ready() -> bool:
            try:
                await js.stream_info("SIGNALS")
                return True
            except Exception:
                return False

        deadline = asyncio.get_running_loop().time() + 20
        while not await stream_ready() and not worker.done():
            assert asyncio.get_running_loop().time() < deadline, "the worker never created its streams"
            await asyncio.sleep(0.1)
        signal = {
            "strategy_id": "s1",
            "symbol": "BTCUSDT",
            "action": "buy",
            "quantity": "0.01",
            "price": "45000",
        }
        await js.publish("signals.s1.BTCUSDT", json.dumps(signal).encode())
        await js.publish("signals.s1.BTCUSDT", b'{"strategy_id": "s1", "symbol": "BTCUSDT", "action": "buy"')
        for path in ("/metrics", "/readyz"):
            outputs.append(await asyncio.to_thread(_http_get, f"http://127.0.0.1:{http_port}{path}"))
        outputs.append(await worker)
        info = await js.stream_info("EVENTS")
        stored = [await js.get_msg("EVENTS", seq) for seq in range(1, info.state.last_seq + 1)]
        outputs += [(m.data or b"").decode() + json.dumps(dict(m.headers or {})) for m in stored]
        assert stored, "the worker stored no event: nothing was exercised\n" + outputs[-1][-3000:]
    finally:
        await client.close()

    # Roles and commands that meet a refusal: the venue's, MySQL's, NATS's.
    emulator.exchange.api_key = "another-key-entirely"
    outputs.append(await _run(["worker"], _env(**good_nats, **venue), 20))
    outputs.append(await _run(["attribution"], _env(**good_nats, MYSQL_URL=bad_mysql), 8))
    outputs.append(await _run(["migrate"], _env(MYSQL_URL=bad_mysql), 20))
    outputs.append(await _run(["report"], _env(MYSQL_URL=bad_mysql), 20))
    wrong_nats = {"NATS_URL": nats_url, "NATS_USER": "desk", "NATS_PASSWORD": NATS_PASSWORD + "x"}
    outputs.append(await _run(["price", "BTCUSDT", "45000"], _env(**wrong_nats), 20))
    url_password = {"NATS_URL": f"nats://desk:{NATS_PASSWORD}x@127.0.0.1:{nats_with_password.port}"}
    outputs.append(await _run(["worker"], _env(**url_password, **venue), 20))

    everything = "\n".join(outputs)
    assert "Access denied" in everything or "1045" in everything  # MySQL did refuse
    assert "cannot connect to NATS" in everything  # NATS did refuse
    assert '"outcome":"accepted"' in everything and "bad_json" in everything  # it traded and dead-lettered
    assert "-2015" in everything  # the venue did refuse the key
    assert _leaks(everything) == []
