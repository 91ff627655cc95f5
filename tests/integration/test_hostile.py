"""Nothing a publisher sends may stop the desk (issue #13): hostile and careless messages sent
to a running `tradeengine run` / `tradeengine worker`, each followed by proof that trading goes
on; a fuzz run of 10,000+ payloads; a second worker on the same durable; a refused login."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import DeliverPolicy
from prometheus_client import REGISTRY

from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.adapters.nats_bus import NatsBus, signal_msg_id
from engine.adapters.paper import PaperExchange
from engine.app.worker import Worker
from engine.config import load_settings
from engine.domain.events import SignalDead, SignalDecided, decode_event
from tests.integration.harness import Pipeline, eventually
from tests.integration.processes import interrupt

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "engine.cli"]
VALID = {"strategy_id": "s1", "symbol": "BTCUSDT", "action": "buy", "quantity": "0.001", "confidence": "0.9"}


def signal_bytes(**fields: Any) -> bytes:
    return json.dumps(VALID | fields).encode()


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: str  # "dead:<reason_code>" or "decided:<reason_code>"
    subject: str = "signals.s1.BTCUSDT"
    headers: dict[str, str] = field(default_factory=dict)


def corpus() -> list[Case]:
    """Every hostile or careless case the issue names, and a few of their cousins."""
    deep_metadata = b'{"a":' * 40 + b"1" + b"}" * 40
    return [
        Case("nested 1,000 arrays", b"[" * 1000 + b"]" * 1000, "dead:too_deep"),
        Case("nested 1,000 objects", b'{"a":' * 1000 + b"1" + b"}" * 1000, "dead:too_deep"),
        Case("metadata nested 40 levels", signal_bytes()[:-1] + b',"metadata":' + deep_metadata + b"}", "dead:too_deep"),
        Case("lone surrogate in signal_id", signal_bytes()[:-1] + b',"signal_id":"\\ud800"}', "dead:bad_text"),
        Case("lone surrogate in strategy_id", b'{"strategy_id":"\\ud800","symbol":"BTCUSDT","action":"buy","quantity":1}', "dead:bad_text"),
        Case("lone surrogate in symbol", b'{"strategy_id":"s1","symbol":"\\udfff","action":"buy","quantity":1}', "dead:bad_text"),
        Case("lone surrogate in metadata", signal_bytes()[:-1] + b',"metadata":{"k":"\\ud800x"}}', "dead:bad_text"),
        Case("lone surrogate as a key", signal_bytes()[:-1] + b',"metadata":{"\\udc00":1}}', "dead:bad_text"),
        Case("NUL in a string", signal_bytes()[:-1] + b',"metadata":{"k":"a\\u0000b"}}', "dead:bad_text"),
        Case("invalid UTF-8", b'{"strategy_id":"s1","symbol":"BTCUSDT","action":"\xff\xfe"}', "dead:bad_json"),
        Case("not JSON", b"\x00\x01garbage", "dead:bad_json"),
        Case("JSON array", b"[1,2,3]", "dead:bad_json"),
        Case("NaN", signal_bytes()[:-1] + b',"price":NaN}', "dead:bad_json"),
        Case("huge exponent", signal_bytes(quantity=None)[:-1].replace(b'"quantity": null', b'"quantity": 1e999999') + b"}", "dead:bad_json"),
        Case("a 5,000-digit integer", signal_bytes()[:-1] + b',"quantity":' + b"9" * 5000 + b"}", "dead:bad_json"),
        Case("1e9 BTC", signal_bytes(quantity="1000000000"), "dead:invalid_field"),
        Case("a negative billion", signal_bytes(price="-1e9"), "dead:invalid_field"),
        Case("year 0001 with an offset", signal_bytes(timestamp="0001-01-01T00:00:00+01:00"), "dead:invalid_field"),
        Case("timestamp 1e999999", signal_bytes()[:-1] + b',"timestamp":1e999999}', "dead:bad_json"),
        Case("take profit 1E-999999999", signal_bytes(take_profit="1E-999999999"), "dead:invalid_field"),
        Case("metadata 1E+999999", signal_bytes()[:-1] + b',"metadata":{"x":1E+999999}}', "dead:bad_json"),
        Case("signal id with a trailing space", signal_bytes(signal_id="x "), "dead:invalid_field"),
        Case("signal id with a newline", signal_bytes(signal_id="a\nb"), "dead:invalid_field"),
        Case("200-character strategy text", signal_bytes(strategy="s" * 200), "dead:invalid_field"),
        Case("oversize", signal_bytes(metadata={"pad": "x" * 70_000}), "dead:oversize"),
        Case("another strategy's identity", signal_bytes(strategy_id="other"), "dead:identity_mismatch"),
        Case("secret headers", b"{}", "dead:invalid_field", headers={"X-Api-Key": "k-123456", "Authorization": "Bearer zzz"}),
        Case("year 9999", signal_bytes(timestamp="9999-12-31T23:59:59Z", signal_id="future-1"), "decided:future_timestamp"),
        Case("price far from the last tick", signal_bytes(current_price="1", signal_id="band-1"), "decided:price_out_of_band"),
        Case("order above MAX_ORDER_NOTIONAL", signal_bytes(quantity="50", signal_id="big-1"), "decided:order_too_large"),
    ]  # fmt: skip


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    http_port: int
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except Exception:
        return 0


def start(role: str, tmp_path: Path, nats_url: str, name: str, **extra: str) -> Running:
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MYSQL_URL", "HTTP_PORT")}
    env.update(
        NATS_URL=nats_url, HTTP_PORT=str(http_port), LOG_FORMAT="json", DATA_DIR=str(tmp_path / name), **extra
    )
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CLI, role], env=env, stdout=out, stderr=subprocess.STDOUT)
    return Running(proc, http_port, log)


async def wait_ready(running: Running, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while readyz(running.http_port) != 200:
        assert running.alive(), running.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "not ready in time: " + running.log.read_text()[-3000:]
        await asyncio.sleep(0.05)


@pytest.fixture
def processes() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for running in started:
        interrupt(running.proc, timeout=15)


class Events:
    """Everything in EVENTS, as it is stored, from a test-side ordered consumer."""

    def __init__(self) -> None:
        self.all: list[Any] = []

    async def collect(self, msg: Any) -> None:
        self.all.append(decode_event(msg.data))

    def dead(self) -> list[SignalDead]:
        return [e for e in self.all if isinstance(e, SignalDead)]

    def decided(self) -> list[SignalDecided]:
        return [e for e in self.all if isinstance(e, SignalDecided)]


@pytest.fixture
async def client(nats_server: EmbeddedNats) -> AsyncIterator[tuple[Any, Events]]:
    nc = await nats.connect(nats_server.url)
    await NatsBus(nc).ensure_streams()
    events = Events()
    await nc.jetstream().subscribe(
        ">", stream="EVENTS", cb=events.collect, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    yield nc, events
    await nc.close()


@pytest.mark.timeout(240)
async def test_no_poison_message_stops_run_and_the_next_signal_is_decided(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    mysql_url: str,
    client: tuple[Any, Events],
    processes: list[Running],
) -> None:
    nc, events = client
    js = nc.jetstream()
    run = start(
        "run", tmp_path, nats_server.url, "run", MYSQL_URL=mysql_url, MAX_ACCUMULATIONS_PER_POSITION="100"
    )
    processes.append(run)
    await wait_ready(run)
    await nc.publish("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"45000"}')
    cases = corpus()
    for n, case in enumerate(cases):
        await js.publish(case.subject, case.data, headers=case.headers or None)
        valid = VALID | {"signal_id": f"after-{n}", "strategy_id": f"ok{n}"}  # one position each
        await js.publish(f"signals.ok{n}.BTCUSDT", json.dumps(valid).encode())
        started = time.monotonic()
        await eventually(
            lambda n=n: next((d for d in events.decided() if d.signal_id == f"after-{n}"), None),
            timeout=15,
            what=f"the valid signal after case {case.name!r}",
        )
        assert run.alive(), run.log.read_text()[-3000:]
        assert time.monotonic() - started < 15

    dead = events.dead()
    decided = {d.signal_id: d for d in events.decided()}
    expected_dead = Counter(c.expect.removeprefix("dead:") for c in cases if c.expect.startswith("dead:"))
    assert Counter(d.reason_code for d in dead) == expected_dead
    for case in cases:
        if case.expect.startswith("decided:"):
            sid = json.loads(case.data)["signal_id"]
            assert decided[sid].reason_code == case.expect.removeprefix("decided:"), decided[sid]
    assert [decided[f"after-{n}"].reason_code for n in range(len(cases))] == ["accepted"] * len(cases)
    (with_headers,) = [d for d in dead if d.payload == "{}"]
    assert with_headers.headers == {}  # X-Api-Key and Authorization are not kept
    assert "k-123456" not in json.dumps([e.payload for e in dead])

    # The projection took every event, dead letters included, and is ready.
    async def projected() -> int | None:
        import asyncmy

        from engine.config import MysqlTarget

        target = MysqlTarget.parse(mysql_url)
        try:
            conn = await asyncmy.connect(
                host=target.host,
                port=target.port,
                user=target.user,
                password=target.password,
                db=target.database,
            )
        except Exception:
            return None
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT COUNT(*) FROM processed_events")
                (count,) = await cur.fetchone()
                await cur.execute("SELECT COUNT(*) FROM quarantined_events")
                (quarantined,) = await cur.fetchone()
        finally:
            conn.close()
        assert quarantined == 0
        return int(count) if count == len(events.all) else None

    from tests.integration.harness import eventually_async

    await eventually_async(projected, timeout=30, what="MySQL holding every event")
    assert readyz(run.http_port) == 200


def fuzz_payloads(rng: random.Random, count: int) -> list[bytes]:
    """Mutations of valid signals that are always invalid, plus the corpus, in random order."""
    corpus_bytes = [
        c.data for c in corpus() if c.expect.startswith("dead:") and c.subject == "signals.s1.BTCUSDT"
    ]
    corpus_bytes = [d for d in corpus_bytes if d != b"{}"]
    junk_values: list[Any] = [
        None, True, -1, 0, "", "\u202e", "🙂" * 50, [], {}, [[[]]], "1e400", -1e308, 2**70, "NaN",
        "buy\u0000", " buy", "x" * 300, {"$gt": ""}, "'; DROP TABLE signals; --",
    ]  # fmt: skip
    fields = ["strategy_id", "symbol", "action", "quantity", "confidence", "take_profit_pct", "stop_loss",
              "position_side", "timestamp", "signal_id", "quote_quantity"]  # fmt: skip
    payloads: list[bytes] = []
    while len(payloads) < count:
        roll = rng.random()
        if roll < 0.1:
            payloads.append(rng.choice(corpus_bytes))
            continue
        body: dict[str, Any] = dict(VALID)
        # At least one field gets a value no signal may carry.
        for name in rng.sample(fields, rng.randint(1, 3)):
            body[name] = rng.choice(junk_values)
        body["strategy_id"] = rng.choice([1, None, "s 1", "\u0000", "s" * 65])  # always invalid
        raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()
        if roll < 0.3 and len(raw) > 4:  # cut or flip bytes
            cut = rng.randrange(1, len(raw))
            raw = (
                raw[:cut] if rng.random() < 0.5 else raw[:cut] + bytes([rng.randrange(256)]) + raw[cut + 1 :]
            )
        payloads.append(raw)
    return payloads


@pytest.mark.timeout(600)
async def test_a_fuzz_run_of_ten_thousand_payloads(
    tmp_path: Path, nats_server: EmbeddedNats, client: tuple[Any, Events], processes: list[Running]
) -> None:
    """10,000 bad payloads interleaved with 500 valid signals into a running worker: it never
    exits, every bad payload is dead-lettered once, every valid signal decided once, RSS flat."""
    nc, events = client
    js = nc.jetstream()
    worker = start("worker", tmp_path, nats_server.url, "worker")
    processes.append(worker)
    await wait_ready(worker)
    await nc.publish("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"45000"}')
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "13")))
    bad = fuzz_payloads(rng, 10_000)
    valid_ids = [f"fuzz-valid-{n}" for n in range(500)]
    plan: list[tuple[str, bytes]] = [("signals.s1.BTCUSDT", b) for b in bad]
    for n, sid in enumerate(valid_ids):
        body = VALID | {"signal_id": sid, "action": rng.choice(["buy", "sell", "hold", "close"])}
        plan.insert(rng.randrange(len(plan)), ("signals.s1.BTCUSDT", json.dumps(body).encode()))
        if n == 0:
            continue
    rss_samples: list[int] = []
    for n, (subject, data) in enumerate(plan):
        await js.publish(subject, data)
        if n % 2000 == 1999:
            await eventually(
                lambda n=n: len(events.dead()) + len(events.decided()) > n - 200 or None, timeout=60
            )
            rss_samples.append(worker.rss_kib())
            assert worker.alive(), worker.log.read_text()[-3000:]
    await eventually(
        lambda: len(events.dead()) + len(events.decided()) >= len(plan) or None,
        timeout=120,
        what="every payload handled",
    )
    assert worker.alive(), worker.log.read_text()[-3000:]
    decided = Counter(d.signal_id for d in events.decided())
    assert set(decided) == set(valid_ids) and max(decided.values()) == 1
    assert len(events.dead()) == len(bad)
    rss_samples.append(worker.rss_kib())
    growth_mib = (rss_samples[-1] - rss_samples[0]) / 1024
    print(
        f"fuzz: {len(bad)} bad + {len(valid_ids)} valid; RSS KiB {rss_samples}; growth {growth_mib:.1f} MiB"
    )
    assert growth_mib < 40, rss_samples


@pytest.mark.timeout(180)
async def test_a_second_worker_on_the_same_durable_waits_as_a_standby(
    tmp_path: Path, nats_server: EmbeddedNats, client: tuple[Any, Events], processes: list[Running]
) -> None:
    nc, events = client
    first = start("worker", tmp_path, nats_server.url, "first", WORKER_LEASE_SECONDS="3")
    processes.append(first)
    await wait_ready(first)
    second = start("worker", tmp_path, nats_server.url, "second", WORKER_LEASE_SECONDS="3")
    processes.append(second)
    deadline = time.monotonic() + 30
    while "lease.standby" not in second.log.read_text():
        assert second.alive() and time.monotonic() < deadline, second.log.read_text()[-3000:]
        await asyncio.sleep(0.05)
    standby_line = next(line for line in second.log.read_text().splitlines() if "lease.standby" in line)
    assert f"pid {first.proc.pid}" in standby_line and "another worker runs this durable" in standby_line
    assert readyz(second.http_port) == 503

    js = nc.jetstream()
    await nc.publish("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"45000"}')
    for n in range(20):
        await js.publish("signals.s1.BTCUSDT", json.dumps(VALID | {"signal_id": f"lease-{n}"}).encode())
    await eventually(lambda: len(events.decided()) >= 20 or None, timeout=30, what="20 decisions")

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    killed_at = time.monotonic()
    await wait_ready(second, timeout=30)
    takeover = time.monotonic() - killed_at
    for n in range(20, 40):
        await js.publish("signals.s1.BTCUSDT", json.dumps(VALID | {"signal_id": f"lease-{n}"}).encode())
    await eventually(lambda: len(events.decided()) >= 40 or None, timeout=30, what="40 decisions")
    decided = Counter(d.signal_id for d in events.decided())
    assert len(decided) == 40 and max(decided.values()) == 1
    print(f"standby took over {takeover:.2f}s after the holder was killed")


@pytest.mark.timeout(60)
def test_a_refused_login_fails_start_up_within_seconds_naming_the_server(tmp_path: Path) -> None:
    server = EmbeddedNats(
        free_port(), tmp_path / "nats", extra_args=("--user", "desk", "--pass", "right-pass")
    )
    server.start()
    try:
        url = f"nats://desk:wrong-pass@127.0.0.1:{server.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("MYSQL_URL", "HTTP_PORT")}
        env.update(NATS_URL=url, NATS_CONNECT_TIMEOUT="3", LOG_FORMAT="json")
        started = time.monotonic()
        done = subprocess.run([*CLI, "worker"], env=env, capture_output=True, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        server.stop()
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert elapsed < 15
    assert f"nats://127.0.0.1:{server.port}" in err and "cannot connect to NATS" in err
    assert "authorization" in err.lower()
    assert "wrong-pass" not in err + done.stdout.decode()


class Die(BaseException):
    """What no handler contains: the process ends (a segfault, an OOM kill, a bug in C)."""


class DyingWorker(Worker):
    """A worker whose process ends whenever it handles the message that says so."""

    async def on_signal_message(self, msg: Any) -> None:
        if b"kills-the-process" in msg.data:
            raise Die()
        await super().on_signal_message(msg)


@pytest.mark.timeout(120)
async def test_a_message_that_kills_every_start_is_set_aside_after_max_deliver(
    nats_server: EmbeddedNats, client: tuple[Any, Events]
) -> None:
    nc, events = client
    js = nc.jetstream()
    settings = load_settings(nats_url=nats_server.url, max_deliver=3, worker_lease_seconds=2)
    await nc.publish("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"45000"}')
    for n in range(3):
        await js.publish("signals.s1.BTCUSDT", json.dumps(VALID | {"signal_id": f"before-{n}"}).encode())
    await js.publish(
        "signals.s1.BTCUSDT", json.dumps(VALID | {"metadata": {"x": "kills-the-process"}}).encode()
    )
    for n in range(3):
        await js.publish("signals.s1.BTCUSDT", json.dumps(VALID | {"signal_id": f"after-{n}"}).encode())

    starts = 0
    while True:
        starts += 1
        assert starts <= 10, "the breaker never set the message aside"
        bus = await NatsBus.connect(nats_server.url, f"dying-{starts}")
        worker = DyingWorker(settings, bus, PaperExchange())
        task = asyncio.create_task(worker.run())
        try:
            await eventually(
                lambda task=task: task.done() or len({d.signal_id for d in events.decided()}) == 6 or None,
                timeout=30,
                what="a death or every signal decided",
            )
        finally:
            worker.stop()
            with contextlib.suppress(Die):
                await asyncio.wait_for(task, 10)
            await bus.close()
        if not isinstance(task.exception(), Die):
            break
    (poison,) = events.dead()
    assert poison.reason_code == "poison" and "kills-the-process" in poison.payload
    decided = Counter(d.signal_id for d in events.decided())
    assert set(decided) == {f"before-{n}" for n in range(3)} | {f"after-{n}" for n in range(3)}
    assert max(decided.values()) == 1
    # Starts that found the same floor with the message in flight: 1 (normal), then careful
    # ones until the count passes MAX_DELIVER.
    assert starts == settings.max_deliver + 2, starts


async def test_ticks_for_made_up_symbols_add_no_metric_series(pipeline: Pipeline) -> None:
    before = {
        m.name for m in REGISTRY.collect() for s in m.samples if s.labels.get("symbol", "").startswith("FAKE")
    }
    assert pipeline.client is not None
    for n in range(2000):
        await pipeline.client.publish(
            f"prices.FAKE{n}USDT", json.dumps({"symbol": f"FAKE{n}USDT", "price": "1"}).encode()
        )
    await pipeline.tick("BTCUSDT", "45000")  # after the made-up ones: all of them were handled
    worker = pipeline.worker
    assert worker is not None
    labelled = {
        s.labels["symbol"]
        for m in REGISTRY.collect()
        for s in m.samples
        if s.labels.get("symbol", "").startswith("FAKE")
    }
    assert before == set() and labelled == set()
    assert not any(symbol.startswith("FAKE") for symbol in worker.last_prices)
    assert (REGISTRY.get_sample_value("tradeengine_price_ticks_unlisted_total") or 0) >= 2000


async def test_one_strategy_cannot_suppress_anothers_signal_by_reusing_its_id(pipeline: Pipeline) -> None:
    assert pipeline.client is not None
    bus = NatsBus(pipeline.client)
    await pipeline.tick("BTCUSDT", "45000")
    for strategy in ("alpha", "beta"):
        body = VALID | {"strategy_id": strategy, "signal_id": "same-id"}
        stored = await bus.publish_signal(
            f"signals.{strategy}.BTCUSDT", json.dumps(body).encode(), signal_msg_id(strategy, "same-id")
        )
        assert stored  # not dropped as a duplicate of the other strategy's message
    await pipeline.wait_events(lambda _: len(pipeline.decisions()) == 2, "both decided")
    assert {d.strategy_id for d in pipeline.decisions()} == {"alpha", "beta"}
