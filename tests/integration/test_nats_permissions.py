"""deploy/nats/nats.conf as shipped, on a real nats-server (pinned wheel) with TLS whose
certificates this test makes (issue #15, items 3 and 5): the worker and the ops commands run
under their own users; a strategy may publish its own signals only, neither as another
strategy, nor control commands, nor ticks, nor events; an analyst reads events and writes
nothing; a wrong password stops start-up within seconds with one line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import DeliverPolicy

from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.domain.events import ControlApplied, SignalDead, SignalDecided, decode_event
from tests.integration.processes import interrupt
from tests.integration.test_nats_auth import make_certificates

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[EmbeddedNats, Path]]:
    make_certificates(tmp_path)
    config = tmp_path / "nats.conf"
    # The shipped file, as is, but for the listen address (the test's own port).
    config.write_text(re.sub(r"^listen: .*$", "", (ROOT / "deploy/nats/nats.conf").read_text(), flags=re.M))
    server = EmbeddedNats(
        free_port(), tmp_path / "store",
        extra_args=("-c", str(config), "--tls", "--tlscert", str(tmp_path / "server.pem"),
                    "--tlskey", str(tmp_path / "server.key")),
    )  # fmt: skip
    server.start()
    try:
        yield server, tmp_path
    finally:
        server.stop()


def _env(server: EmbeddedNats, certs: Path, user: str, password: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "EXCHANGE", "MYSQL_"))}
    env.update(
        NATS_URL=f"tls://127.0.0.1:{server.port}", NATS_USER=user, NATS_PASSWORD=password,
        NATS_TLS_CA=str(certs / "ca.pem"), NATS_CONNECT_TIMEOUT="3", LOG_FORMAT="json", **extra,
    )  # fmt: skip
    return env


async def _client(server: EmbeddedNats, certs: Path, user: str, password: str) -> Any:
    import ssl

    async def on_error(exc: Exception) -> None:
        pass  # permission violations: the server's log is checked instead

    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    client = await nats.connect(
        f"tls://127.0.0.1:{server.port}", user=user, password=password, tls=context, error_cb=on_error,
        allow_reconnect=False,
    )  # fmt: skip
    return client


@pytest.fixture
async def worker(secured: tuple[EmbeddedNats, Path]) -> AsyncIterator[subprocess.Popen[bytes]]:
    server, certs = secured
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "worker"], env=_env(server, certs, "worker", "worker-pw"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(2)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def test_each_role_does_its_job_and_nothing_else(
    secured: tuple[EmbeddedNats, Path], worker: subprocess.Popen[bytes]
) -> None:
    server, certs = secured
    analyst = await _client(server, certs, "analyst", "analyst-pw")
    alpha = await _client(server, certs, "strat-alpha", "alpha-pw")
    events: list[Any] = []
    try:
        deadline = time.monotonic() + 30
        while True:  # the worker creates the streams once it is up
            try:
                await analyst.jetstream().stream_info("EVENTS")
                break
            except Exception:
                assert worker.poll() is None, (worker.stdout.read() if worker.stdout else b"").decode()[
                    -3000:
                ]
                assert time.monotonic() < deadline, "the worker never came up under its user"
                await asyncio.sleep(0.2)

        async def collect(msg: Any) -> None:
            events.append(decode_event(msg.data))

        await analyst.jetstream().subscribe(
            "", stream="EVENTS", cb=collect, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        js = alpha.jetstream()
        own = {
            "strategy_id": "strat-alpha",
            "symbol": "BTCUSDT",
            "action": "buy",
            "quantity": "0.01",
            "price": "45000",
            "signal_id": "a-1",
        }
        await js.publish(
            "signals.strat-alpha.BTCUSDT", json.dumps(own).encode(), headers={"Nats-Msg-Id": "a-1"}
        )
        # Its own subject, another strategy's name in the payload: dead-lettered.
        disguised = own | {"strategy_id": "strat-beta", "signal_id": "a-2"}
        await js.publish("signals.strat-alpha.BTCUSDT", json.dumps(disguised).encode())

        # Everything else a strategy might try is refused by the server.
        for subject, body in (
            ("signals.strat-beta.BTCUSDT", json.dumps(own | {"strategy_id": "strat-beta"}).encode()),
            ("control.halt", b"{}"),
            ("prices.BTCUSDT", b'{"symbol": "BTCUSDT", "price": "1"}'),
            ("positions.closed.BTCUSDT.LONG", b"{}"),
            ("$JS.API.STREAM.DELETE.SIGNALS", b""),
        ):
            with pytest.raises(
                (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError)
            ):
                if subject.startswith("$JS"):
                    await alpha.request(subject, body, timeout=1)
                else:
                    await js.publish(subject, body, timeout=1)
        log = server.log_file.read_text()
        for subject in (
            "signals.strat-beta.BTCUSDT",
            "control.halt",
            "prices.BTCUSDT",
            "positions.closed.BTCUSDT.LONG",
        ):
            assert f'"$G/user:strat-alpha" - Publish Violation - Subject "{subject}"' in log

        # An analyst reads and writes nothing.
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await analyst.jetstream().publish("control.halt", b"{}", timeout=1)

        async def seen(kind: type, **fields: Any) -> Any:
            deadline = time.monotonic() + 15
            while True:
                found = [
                    e
                    for e in events
                    if isinstance(e, kind) and all(getattr(e, k) == v for k, v in fields.items())
                ]
                if found:
                    return found[0]
                assert time.monotonic() < deadline, f"no {kind.__name__} {fields}; saw {events}"
                await asyncio.sleep(0.05)

        assert (await seen(SignalDecided, signal_id="a-1")).outcome.value == "accepted"
        assert (await seen(SignalDead, signal_id="a-2")).reason_code == "identity_mismatch"
        assert not [
            e
            for e in events
            if getattr(e, "strategy_id", None) == "strat-beta" and isinstance(e, SignalDecided)
        ]

        # Replies are not permission-checked: a signal published with reply "control.halt" has
        # the server store its ack in CONTROL. The worker refuses it as a command.
        steered = own | {"signal_id": "a-3"}
        await alpha.publish("signals.strat-alpha.BTCUSDT", json.dumps(steered).encode(), reply="control.halt")
        refused = await seen(ControlApplied, command="halt", outcome="rejected")
        assert "unknown field" in refused.reason and refused.halted == []

        # Ops halt through the command line, under the ops user; the worker applies it.
        halted = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "halt", "--strategy", "strat-alpha",
            env=_env(server, certs, "ops", "ops-pw"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(halted.communicate(), 60)
        assert halted.returncode == 0, (out + err).decode()
        assert (await seen(ControlApplied, command="halt", outcome="applied")).strategy_id == "strat-alpha"
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "status", env=_env(server, certs, "ops", "ops-pw"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(status.communicate(), 60)
        assert status.returncode == 0 and b"HALTED strategy strat-alpha" in out, (out + err).decode()
        # The desk view under the ops user: positions folded from the events, priced from KV.
        shown = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "positions", "--json", env=_env(server, certs, "ops", "ops-pw"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(shown.communicate(), 60)
        assert shown.returncode == 0, (out + err).decode()
        (key,) = json.loads(out)["positions"]
        assert key["key"] == "BTCUSDT_LONG" and key["slices"][0]["strategy_id"] == "strat-alpha"
        # An analyst replays what the desk kept (SIGNALS, PRICE_HISTORY, funding in EVENTS), read only.
        replayed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "replay", "--json", "--jobs", "1", "--policies", "accumulate",
            "--modes", "hedge", env=_env(server, certs, "analyst", "analyst-pw"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(replayed.communicate(), 60)
        assert replayed.returncode == 0, (out + err).decode()
        assert json.loads(out)["accumulate/hedge/conf>=0.6"]["strategies"]["strat-alpha"]["opened"] >= 1
    finally:
        await analyst.close()
        await alpha.close()


def test_a_wrong_password_stops_start_up_within_seconds(secured: tuple[EmbeddedNats, Path]) -> None:
    server, certs = secured
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "worker"], env=_env(server, certs, "worker", "not-the-password"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and time.monotonic() - started < 15
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot connect to NATS" in lines[0] and "Authorization Violation" in lines[0]
    assert "not-the-password" not in done.stderr + done.stdout


async def test_a_partitioned_worker_under_its_user_holds_its_partitions_and_snapshots(
    secured: tuple[EmbeddedNats, Path],
) -> None:
    """deploy/nats/nats.conf as shipped lets the worker lay SIGNALS out in partitions, lease
    them, count its peers, store snapshots and load them on the next start; ops sees who holds
    what."""
    server, certs = secured
    env = _env(server, certs, "worker", "worker-pw", SIGNAL_PARTITIONS="2", SNAPSHOT_EVERY_EVENTS="1",
               PARTITION_LEASE_SECONDS="2")  # fmt: skip
    alpha = await _client(server, certs, "strat-alpha", "alpha-pw")
    ops = await _client(server, certs, "ops", "ops-pw")
    ops_env = _env(server, certs, "ops", "ops-pw", SIGNAL_PARTITIONS="2")

    async def until_held_and_drained(pid: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            shown = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.cli", "status", "--json", env=ops_env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(shown.communicate(), 60)
            assert shown.returncode == 0, (out + err).decode()
            view = json.loads(out)
            held = [o["holder"]["pid"] for o in view["owners"] if o["holder"]]
            lag = [view["consumers"].get(f"worker-p{p}") for p in range(2)]
            if held == [pid] * 2 and all(c and c["pending"] == c["ack_pending"] == 0 for c in lag):
                return
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.3)

    def stopped(process: subprocess.Popen[bytes]) -> str:
        process.send_signal(2)
        try:
            return process.communicate(timeout=20)[0].decode()
        except subprocess.TimeoutExpired:
            process.kill()
            return process.communicate()[0].decode()

    def worker() -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "engine.cli", "worker"]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    process = worker()
    try:
        js = alpha.jetstream()
        deadline = time.monotonic() + 30
        while True:  # the worker lays the stream out once it is up
            try:
                if (await ops.jetstream().stream_info("SIGNALS")).config.subject_transform is not None:
                    break
            except Exception:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the worker never laid SIGNALS out"
            await asyncio.sleep(0.2)
        for n, symbol in enumerate(("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")):
            signal = {"strategy_id": "strat-alpha", "symbol": symbol, "action": "buy", "quantity": "0.01",
                      "price": "100", "confidence": "0.9", "signal_id": f"p-{n}"}  # fmt: skip
            await js.publish(f"signals.strat-alpha.{symbol}", json.dumps(signal).encode())
        await until_held_and_drained(process.pid)
        output = stopped(process)
        assert "worker.snapshot_saved" in output, output[-3000:]
        process = worker()  # the next start loads what the first saved
        await until_held_and_drained(process.pid)
    finally:
        await alpha.close()
        await ops.close()
        output = stopped(process)
    assert "worker.snapshot_loaded" in output and "snapshot_unusable" not in output, output[-3000:]
    assert "snapshots.pull_failed" not in output, output[-3000:]  # the fast read, not the fallback
    assert "snapshot_failed" not in output and "Permissions Violation" not in server.log_file.read_text()


async def test_two_attribution_consumers_run_under_the_attribution_user(
    secured: tuple[EmbeddedNats, Path], worker: subprocess.Popen[bytes], mysql_url: str, tmp_path: Path
) -> None:
    """ATTRIBUTION_PARTITIONS=2 under deploy/nats/nats.conf: the attribution user may list the
    EVENTS consumers (where a new layout starts) and run both of its durables."""
    import urllib.request

    from engine.adapters.embedded_nats import free_port
    from engine.adapters.mysql_store import MysqlStore
    from engine.config import MysqlTarget

    server, certs = secured
    analyst = await _client(server, certs, "analyst", "analyst-pw")
    try:  # the worker makes the streams; the attribution user may only read EVENTS
        deadline = time.monotonic() + 30
        while True:
            try:
                await analyst.jetstream().stream_info("EVENTS")
                break
            except Exception:
                assert worker.poll() is None and time.monotonic() < deadline, "the worker never came up"
                await asyncio.sleep(0.2)
    finally:
        await analyst.close()
    port = free_port()
    env = _env(server, certs, "attribution", "attribution-pw", MYSQL_URL=mysql_url, ATTRIBUTION_PARTITIONS="2",
               HTTP_PORT=str(port))  # fmt: skip
    log = (tmp_path / "attribution.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "attribution"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    alpha = await _client(server, certs, "strat-alpha", "alpha-pw")
    store = await MysqlStore.open(MysqlTarget.parse(mysql_url))

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                return int(resp.status) == 200
        except Exception:
            return False

    async def decided() -> bool:
        async with store.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM signal_decisions WHERE signal_id = 'attr-1'")
            (n,) = await cur.fetchone()
            await conn.commit()
            return int(n) == 1

    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(ready):
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / "attribution.log"
            ).read_text()[-3000:]
            await asyncio.sleep(0.2)
        payload = {"strategy_id": "strat-alpha", "symbol": "BTCUSDT", "action": "hold", "signal_id": "attr-1"}
        await alpha.jetstream().publish("signals.strat-alpha.BTCUSDT", json.dumps(payload).encode())
        deadline = time.monotonic() + 30
        while not await decided():
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / "attribution.log"
            ).read_text()[-3000:]
            await asyncio.sleep(0.2)
        text = (tmp_path / "attribution.log").read_text()
        violations = [line for line in server.log_file.read_text().splitlines()
                      if "user:attribution" in line and "Violation" in line]  # fmt: skip
        assert violations == []
        assert text.count('"event": "attribution.ready"') == 2, text[-3000:]
    finally:
        await asyncio.to_thread(interrupt, process, 20)
        log.close()
        await alpha.close()
        await store.close()
