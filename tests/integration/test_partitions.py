"""Partitions and failover (issue #16, items 2, 3 and 6): three worker processes share six
signal partitions of one Binance USD-M account (the emulator, its own process) over 25 symbols
with prices moving. The worker holding the most partitions is killed with SIGKILL mid-run; the
others take its partitions over; a fourth joins later and gets its share given back to it.
Afterwards: every signal decided exactly once, each symbol's signals decided in the order they
were published, no client order id sent twice, no partition booking another's position as a
manual one, the book folded from EVENTS equal to the venue, and MySQL equal to the events.
PARTITION_SIGNALS makes the run longer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.js.errors
import pytest
from nats.js.api import DeliverPolicy
from nats.js.errors import NoKeysError

from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.adapters.leases import NO_ENTRY, PARTITIONS_BUCKET, Holder
from engine.adapters.nats_bus import NatsBus
from engine.app.layout import _relay, claim_layout
from engine.app.partitioned import PartitionedWorker
from engine.app.runner import build_gateway, partitioned_worker
from engine.config import load_settings
from engine.domain.events import (
    PositionReconciled,
    SignalDecided,
    decode_event,
)
from engine.domain.partitions import partition_of
from tests.integration.harness import Pipeline, eventually, eventually_async
from tests.integration.processes import CLI, Spawned, emulator_worker_env, kill
from tests.integration.processes import move_prices as step_prices
from tests.integration.proxy import TcpProxy
from tests.integration.test_cluster import Cluster, _jetstream_ready
from tests.integration.test_crash import (
    _all_events,
    _port_open,
    _project_and_compare,
    book_and_venue_agree,
    ready,
)

pytestmark = pytest.mark.integration
PARTITIONS = 6
SIGNALS = int(os.environ.get("PARTITION_SIGNALS", "240"))
LISTED = {"BTCUSDT": ("45000", "0.002"), "ETHUSDT": ("3000", "0.03"), "SOLUSDT": ("150", "0.5"),
          "BNBUSDT": ("600", "0.1"), "XRPUSDT": ("0.6", "20")}  # fmt: skip
MARKETS = LISTED | {f"T{i:03d}USDT": ("10", "1") for i in range(20)}
STRATEGIES = ["momentum", "breakout", "meanrev", "scalper"]


@dataclass
class Desk(Spawned):
    env: dict[str, str] = field(default_factory=dict)
    emulator_url: str = ""
    workers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)

    def start_worker(self, n: int) -> None:
        self.ports[n] = free_port()
        self.workers[n] = self.start(
            f"worker-{n}", "worker", env=self.env | {"HTTP_PORT": str(self.ports[n])}
        )

    def kill(self, n: int) -> None:
        kill(self.workers[n])


@dataclass
class Nats:
    url: str  # what the processes are given (every node of a cluster)
    one: str  # one node, for a tool that takes one address
    cluster: Cluster | None


@pytest.fixture(params=["one server", "3-node cluster"])
def nats_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Nats]:
    if request.param == "one server":
        server = EmbeddedNats(free_port(), tmp_path / "nats").start()
        try:
            yield Nats(server.url, server.url, None)
        finally:
            server.stop()
        return
    cluster = Cluster(tmp_path)
    try:
        for node in cluster.nodes:
            node.start()
        yield Nats(cluster.url, cluster.nodes[0].url, cluster)
    finally:
        for node in cluster.nodes:
            node.stop()


@pytest.fixture
def desk(tmp_path: Path, nats_urls: Nats) -> Iterator[Desk]:
    emulator_port = free_port()
    env = emulator_worker_env(
        nats_urls.url,
        emulator_port,
        STREAM_REPLICAS="3" if nats_urls.cluster else "1",
        SNAPSHOT_EVERY_EVENTS="60",  # takeovers load snapshots, not only the stream
        SIGNAL_PARTITIONS=str(PARTITIONS),
        PARTITION_LEASE_SECONDS="3",
    )
    running = Desk(tmp_path, env=env, emulator_url=f"http://127.0.0.1:{emulator_port}")
    running.start("emulator", "emulator", "--port", str(emulator_port), "--extra-markets", "20", env=env)
    try:
        yield running
    finally:
        running.stop_all()


async def owners(js: Any) -> dict[int, int]:
    """partition -> pid of the process holding its lease."""
    try:
        kv = await js.key_value(PARTITIONS_BUCKET)
        keys = await kv.keys()
    except (NoKeysError, Exception):
        return {}
    held = {}
    for key in keys:
        try:
            holder = Holder.decode((await kv.get(key)).value)
        except NO_ENTRY:  # released (deleted) since it was listed
            continue
        if holder is not None:
            held[int(key.rsplit("-p", 1)[1])] = holder.pid
    return held


@pytest.mark.timeout(420)
async def test_a_killed_worker_s_partitions_are_taken_over_and_nothing_is_lost_or_doubled(
    desk: Desk, nats_urls: Nats, mysql_url: str
) -> None:
    """On a 3-node cluster, a NATS node is killed with SIGKILL too, after the worker, and started
    again after the newcomer has its share."""
    rng = random.Random(1606)
    prices = {s: Decimal(p) for s, (p, _) in MARKETS.items()}
    cluster = nats_urls.cluster
    if cluster is not None:
        await _jetstream_ready(cluster.url)
    nc = await nats.connect(nats_urls.url.split(","))
    js = nc.jetstream()
    bus = NatsBus(nc)
    bus.partitions = PARTITIONS
    bus.replicas = 3 if cluster else 1
    await bus.ensure_streams()
    decided: Counter[str] = Counter()

    async def collect(msg: Any) -> None:
        event = decode_event(msg.data)
        if isinstance(event, SignalDecided):
            decided[event.signal_id] += 1

    await js.subscribe("decisions.>", cb=collect, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    sent: list[str] = []
    async with aiohttp.ClientSession() as http:
        await eventually_async(lambda: _port_open(desk.emulator_url), what="emulator up")

        async def move_prices() -> None:
            symbols = rng.sample(list(MARKETS), 5)
            await step_prices(http, desk.emulator_url, nc, prices, symbols, rng, Decimal("0.0001"))

        async def publish(count: int) -> None:
            for _ in range(count):
                n = len(sent)
                symbol = rng.choice(list(MARKETS))
                action = rng.choices(["buy", "sell", "close"], weights=[45, 45, 10])[0]
                payload: dict[str, Any] = {
                    "strategy_id": rng.choice(STRATEGIES),
                    "symbol": symbol,
                    "action": action,
                    "signal_id": f"part-{n}",
                    "confidence": "0.8",
                    "price": str(prices[symbol].quantize(Decimal("0.0001"))),
                }
                if action != "close":
                    payload |= {
                        "quantity": MARKETS[symbol][1],
                        "take_profit_pct": "0.003",
                        "stop_loss_pct": "0.003",
                    }
                for attempt in range(100):  # a publish in flight when a node died is sent again
                    try:
                        await js.publish(  # as a strategy does: the stream maps it to the partition
                            f"signals.{payload['strategy_id']}.{symbol}",
                            json.dumps(payload).encode(),
                            headers={"Nats-Msg-Id": payload["signal_id"]},
                        )
                        break
                    except nats.errors.Error:  # no stream answer, no responders, a timeout
                        assert attempt < 99
                        await asyncio.sleep(0.2)
                sent.append(payload["signal_id"])
                if rng.random() < 0.2:
                    await move_prices()

        async def all_ready(ns: list[int]) -> bool:
            return all([await ready(http, desk.ports[n]) for n in ns])

        async def spread_over(pids: set[int]) -> bool:
            held = await owners(js)
            return len(held) == PARTITIONS and set(held.values()) <= pids

        for n in range(3):
            desk.start_worker(n)
        pids = {desk.workers[n].pid for n in range(3)}

        first: dict[int, int] = {}

        async def fair_share() -> bool:  # every partition held, two by each worker
            first.clear()
            first.update(await owners(js))
            return len(first) == PARTITIONS and Counter(first.values()) == Counter({pid: 2 for pid in pids})

        # A worker that joins after the others were up is given its share: until then the
        # partitions it is given are briefly held by nobody.
        await eventually_async(fair_share, timeout=60, what="every partition held, two by each worker")
        await eventually_async(lambda: all_ready([0, 1, 2]), timeout=60, what="workers ready")

        await publish(SIGNALS // 3)
        await eventually_async(lambda: _count(decided, SIGNALS // 6), timeout=60, what="a sixth decided")
        victim = next(
            n for n in range(3) if desk.workers[n].pid == Counter(first.values()).most_common(1)[0][0]
        )
        orphans = {p for p, pid in first.items() if pid == desk.workers[victim].pid}
        desk.kill(victim)
        killed_at = time.monotonic()
        survivors = {desk.workers[n].pid for n in range(3) if n != victim}
        await eventually_async(lambda: spread_over(survivors), timeout=30, what="the orphans taken over")
        takeover = time.monotonic() - killed_at
        after_kill = await owners(js)
        assert all(after_kill[p] == pid for p, pid in first.items() if p not in orphans), "a survivor moved"

        if cluster is not None:
            cluster.kill(1)  # a NATS node dies with the run in full flow
        await publish(SIGNALS // 3)
        desk.start_worker(3)  # joins: the survivors give back one partition each
        survivors.add(desk.workers[3].pid)
        await eventually_async(
            lambda: _holds(js, desk.workers[3].pid, 2), timeout=60, what="the newcomer's share given back"
        )
        if cluster is not None:
            cluster.restart(1)
        await publish(SIGNALS - len(sent))
        await eventually_async(lambda: _count(decided, SIGNALS), timeout=180, what="every signal decided")
        for _ in range(10):
            await move_prices()
        state = await _quiet_state(http, desk, js)
        # With 3 s leases a node's restart may still move a partition: status once all are held.
        status = subprocess.CompletedProcess[str]([], 0)

        async def status_all_held() -> bool:
            nonlocal status
            status = await asyncio.to_thread(
                subprocess.run, [*CLI, "status", "--json"], env=desk.env, capture_output=True, text=True,
                timeout=60, check=True,
            )  # fmt: skip
            return all(o["holder"] for o in json.loads(status.stdout)["owners"])

        await eventually_async(status_all_held, timeout=60, what="status with every partition held")
    await nc.close()

    assert set(decided) == set(sent)
    assert max(decided.values()) == 1, {k: v for k, v in decided.items() if v > 1}
    assert state["duplicate_client_ids"] == {}

    stored = await _all_events(nats_urls.one)
    last_seen: dict[str, int] = {}
    for event in stored:  # each symbol's signals decided in the order they were published
        # (but one whose order's outcome was unknown: decided when the lookup finds it never
        # placed, after later signals of its symbol; nothing of it executed out of order)
        if (
            isinstance(event, SignalDecided)
            and event.signal_sequence is not None
            and event.reason_code != "not_placed"
        ):
            assert event.signal_sequence > last_seen.get(event.symbol, 0), event
            last_seen[event.symbol] = event.signal_sequence
    # A takeover loads the snapshots the holders before it saved (3 replicas on the cluster);
    # only a NATS request timing out while a node dies may send it to the whole stream.
    unusable = [
        line
        for n in desk.workers
        for line in (desk.tmp / f"worker-{n}.log").read_text(errors="replace").splitlines()
        if ("snapshot_unusable" in line or "snapshots.pull_failed" in line) and "TimeoutError" not in line
    ]
    assert not unusable, unusable[:3]
    foreign = [e for e in stored if isinstance(e, PositionReconciled) and e.kind != "protective_stop"]
    assert not foreign, f"a partition booked a foreign position: {foreign}"
    book_and_venue_agree(stored, state)
    by_partition: dict[int, set[str]] = defaultdict(set)
    for event in stored:
        if isinstance(event, SignalDecided):
            by_partition[partition_of(event.symbol, PARTITIONS)].add(event.symbol)
    assert len(by_partition) == PARTITIONS

    shown = json.loads(status.stdout)
    assert [o["partition"] for o in shown["owners"]] == list(range(PARTITIONS))
    assert {o["holder"]["pid"] for o in shown["owners"]} <= survivors
    await _project_and_compare(nats_urls.url, mysql_url, stored, SIGNALS, consumers=2)
    print(
        f"partitions run on {'a 3-node cluster, a node killed' if cluster else 'one server'}: {SIGNALS} signals over {len(MARKETS)} symbols and {PARTITIONS} partitions, "
        f"3 workers, 1 killed holding {sorted(orphans)}: taken over in {takeover:.2f}s; "
        f"{len(stored)} events, {state['orders']} orders, client ids sent twice "
        f"{len(state['duplicate_client_ids'])}"
    )


async def _count(counter: Counter[str], n: int) -> bool:
    return len(counter) >= n


async def _holds(js: Any, pid: int, n: int) -> bool:
    return list((await owners(js)).values()).count(pid) >= n


async def _quiet_state(http: aiohttp.ClientSession, desk: Desk, js: Any) -> dict[str, Any]:
    """The venue's state once no partition has anything left to do."""
    last: tuple[int, str] | None = None
    for _ in range(200):
        busy = 0
        for p in range(PARTITIONS):
            info = await js.consumer_info("SIGNALS", f"tradeengine-worker-p{p}")
            busy += info.num_pending + info.num_ack_pending
        stream = await js.stream_info("EVENTS")
        async with http.get(f"{desk.emulator_url}/emulator/state") as response:
            state: dict[str, Any] = await response.json()
        now = (stream.state.messages, json.dumps(state["positions"], sort_keys=True))
        if busy == 0 and now == last:
            return state
        last = now
        await asyncio.sleep(1.5)  # longer than a reconciliation round: a fixed point, not a race
    raise AssertionError("the workers never went quiet")


@pytest.mark.timeout(180)
async def test_a_worker_cut_off_from_nats_stops_acting_and_its_partitions_move_when_its_leases_expire(
    nats_server: EmbeddedNats, mysql_url: str
) -> None:
    """Two partitioned workers in this process (so no pid can be seen dead: only the leases'
    expiry tells); one loses its link to NATS. Its partitions go to the other within
    PARTITION_LEASE_SECONDS and a few rounds, each of its partitions fenced (placing and storing
    nothing) before the other takes it, and the signals published meanwhile are decided once."""
    partitions, lease = 4, 2.0
    settings = load_settings(
        nats_url=nats_server.url,
        mysql_url=mysql_url,
        http_port=None,
        signal_partitions=partitions,
        partition_lease_seconds=lease,
        max_signal_age_seconds=3600,
    )
    symbols = [s for s in MARKETS if s in LISTED]
    async with (
        TcpProxy("127.0.0.1", nats_server.port) as proxy,
        Pipeline(nats_server.url, mysql_url, start_worker=False, signal_partitions=partitions) as pipeline,
    ):
        first, first_bus = await _partitioned(settings, f"nats://127.0.0.1:{proxy.port}")
        task = asyncio.create_task(first.run())
        await eventually(lambda: first.ready.is_set() and len(first.lanes) == partitions, 30, "all four held")
        second, second_bus = await _partitioned(settings, nats_server.url)
        task2 = asyncio.create_task(second.run())
        try:
            # The newcomer gets half, given back by the first; nothing else moves.
            await eventually(lambda: len(second.lanes) == 2 and len(first.lanes) == 2, 30, "two each")
            await eventually(lambda: second.ready.is_set(), 30, "the second ready")
            for n, symbol in enumerate(symbols * 4):
                await pipeline.publish("s1", symbol, "buy", signal_id=f"before-{n}", quantity="0.1", price="100",
                                       confidence="0.9")  # fmt: skip
            await eventually(lambda: len({d.signal_id for d in pipeline.decisions()}) == 20, 30, "decided")

            orphans = set(first.lanes)
            lanes = {p: first.lanes[p].worker for p in orphans}
            fenced_when_taken: dict[int, bool] = {}
            proxy.cut()
            cut_at = time.monotonic()

            def taken() -> bool:
                for p in orphans - set(fenced_when_taken):
                    if p in second.lanes:
                        worker = lanes[p]
                        fenced_when_taken[p] = worker._fenced or (
                            worker.lease is not None and not worker.lease.confirmed()
                        )
                return set(fenced_when_taken) == orphans

            await eventually(taken, 30, "the cut-off worker's partitions taken over")
            moved_in = time.monotonic() - cut_at
            assert all(fenced_when_taken.values()), fenced_when_taken
            for n, symbol in enumerate(symbols * 4):
                await pipeline.publish("s2", symbol, "buy", signal_id=f"after-{n}", quantity="0.1", price="100",
                                       confidence="0.9")  # fmt: skip
            await eventually(
                lambda: len({d.signal_id for d in pipeline.decisions()}) == 40, 60, "decided after"
            )
            counts = Counter(d.signal_id for d in pipeline.decisions())
            assert max(counts.values()) == 1, counts
            print(f"cut-off worker: partitions {sorted(orphans)} moved in {moved_in:.2f}s (lease {lease:g}s)")
        finally:
            first.stop()
            second.stop()
            await asyncio.gather(task, task2, return_exceptions=True)
            await first_bus.close()
            await second_bus.close()


async def _partitioned(settings: Any, url: str) -> tuple[PartitionedWorker, NatsBus]:
    bus = await NatsBus.connect(url, "test-partitioned")
    bus.partitions = settings.signal_partitions
    worker = partitioned_worker(settings, bus, build_gateway(settings))
    assert isinstance(worker, PartitionedWorker)
    return worker, bus


async def test_the_layout_changes_only_when_no_worker_of_the_old_one_runs(
    nats_server: EmbeddedNats, mysql_url: str
) -> None:
    """A running worker of one layout keeps workers of another from starting (exit 2 with the
    reason). Once it is stopped the layout changes: the signals that waited for it are relayed
    onto the partitions, and the partitions start after every command it handled, so a flatten
    applied before the change is not applied again to positions opened after it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MYSQL_URL",)}
    env |= {"NATS_URL": nats_server.url, "SIGNAL_PARTITIONS": "3", "HTTP_PORT": "0", "LOG_FORMAT": "json"}
    async with Pipeline(nats_server.url, mysql_url, max_signal_age_seconds=3600) as pipeline:
        assert pipeline.client is not None
        await pipeline.tick("BTCUSDT", "45000")
        await pipeline.publish("s1", "BTCUSDT", "buy", signal_id="first", quantity="0.01", confidence="0.9")
        await pipeline.decision("first")
        await pipeline.client.jetstream().publish("control.flatten", b'{"strategy_id": "s1"}')
        await pipeline.wait_events(lambda _: len(pipeline.closed()) == 1, "the flatten")
        await pipeline.client.jetstream().publish("control.resume", b'{"strategy_id": "s1"}')
        js = pipeline.client.jetstream()

        async def resumed() -> bool:  # read from the stream: the test's push consumer may lag under load
            with contextlib.suppress(nats.js.errors.NotFoundError):
                return b'"outcome":"applied"' in (await js.get_last_msg("EVENTS", "risk.resume")).data
            return False

        await eventually_async(resumed, 30.0, what="resume")
        refused = subprocess.run([*CLI, "worker"], env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert "SIGNAL_PARTITIONS=3" in refused.stderr and "tradeengine-worker is run by" in refused.stderr

        client = pipeline.client

        async def commands_acked() -> bool:  # the worker acks a command after storing its event
            info = await client.jetstream().consumer_info("CONTROL", "tradeengine-worker-control")
            return bool(info.num_pending + info.num_ack_pending == 0)

        await eventually_async(commands_acked, timeout=30, what="the commands acked")
        await pipeline.stop_worker()
        await pipeline.publish("s1", "BTCUSDT", "buy", signal_id="waiting", quantity="0.01", price="45000",
                               confidence="0.9")  # fmt: skip

        nc = await nats.connect(nats_server.url)
        try:
            bus = NatsBus(nc)
            await claim_layout(bus, load_settings(nats_url=nats_server.url, signal_partitions=3))
            assert await bus.signal_partitions() == 3
            js = nc.jetstream()
            control_end = (await js.stream_info("CONTROL")).state.last_seq
            for p in range(3):
                info = await js.consumer_info("CONTROL", f"tradeengine-worker-p{p}-control")
                assert info.num_pending == 0 and info.ack_floor.stream_seq == control_end
            with pytest.raises(nats.js.errors.NotFoundError):  # the old layout's consumers are gone
                await js.consumer_info("SIGNALS", "tradeengine-worker")
            with pytest.raises(nats.js.errors.NoStreamResponseError):  # refused, not left unread
                await js.publish("signals.s1", b"{}", timeout=2)

            partitioned, _ = await _partitioned(
                load_settings(nats_url=nats_server.url, mysql_url=mysql_url, http_port=None,
                              signal_partitions=3, max_signal_age_seconds=3600),
                nats_server.url,
            )  # fmt: skip
            task = asyncio.create_task(partitioned.run())
            try:
                await eventually(
                    lambda: partitioned.ready.is_set() and len(partitioned.lanes) == 3, 30, "ready"
                )
                assert (await pipeline.decision("waiting")).outcome.value == "accepted"  # relayed
                await pipeline.publish("s1", "BTCUSDT", "buy", signal_id="after", quantity="0.01",
                                       price="45000", confidence="0.9")  # fmt: skip
                assert (await pipeline.decision("after")).outcome.value == "accepted"
                await pipeline.wait_events(
                    lambda _: len(pipeline.opened()) == 3, "the opens after the change"
                )
                assert len(pipeline.closed()) == 1, "the flatten of before the change was applied again"
                decided = Counter(d.signal_id for d in pipeline.decisions())
                assert decided == Counter({"first": 1, "waiting": 1, "after": 1})
            finally:
                partitioned.stop()
                await task
                await partitioned.bus.close()

            back = load_settings(nats_url=nats_server.url, signal_partitions=1)
            await claim_layout(NatsBus(nc), back)  # nothing runs or waits on the three: back to one
            assert await bus.signal_partitions() == 1
        finally:
            await nc.close()


async def test_signals_published_while_the_layout_flips_are_relayed(nats_server: EmbeddedNats) -> None:
    """A signal stored on the one-worker subject after the check and before the flip is
    published again onto its partition."""
    nc = await nats.connect(nats_server.url)
    try:
        bus = NatsBus(nc)
        bus.partitions = 1
        await bus.ensure_streams()
        js = nc.jetstream()
        for n, symbol in enumerate(("BTCUSDT", "ETHUSDT")):
            await js.publish(f"signals.s1.{symbol}", b'{"n": %d}' % n, headers={"Nats-Msg-Id": f"late-{n}"})
        bus.partitions = 4
        await bus.ensure_streams()
        assert await _relay(bus, "tradeengine-worker", 1, after=0) == 2
        stored = (await js.stream_info("SIGNALS", subjects_filter=">")).state.subjects or {}
        for symbol in ("BTCUSDT", "ETHUSDT"):
            assert stored[f"signals.s1.{symbol}.{partition_of(symbol, 4)}"] == 1
    finally:
        await nc.close()


async def test_our_partition_of_a_symbol_is_the_servers(nats_server: EmbeddedNats) -> None:
    """The stream's mapping (nats-server's `partition()`) and `partition_of` agree, symbol by
    symbol: a partition's worker owns exactly the symbols the server sends it."""
    nc = await nats.connect(nats_server.url)
    try:
        bus = NatsBus(nc)
        bus.partitions = 7
        await bus.ensure_streams()
        symbols = [f"S{i}USDT" for i in range(200)] + ["BTCUSDT", "ETHUSDT"]
        for symbol in symbols:
            await nc.jetstream().publish(f"signals.s1.{symbol}", b"{}")
        stored = (await nc.jetstream().stream_info("SIGNALS", subjects_filter=">")).state.subjects or {}
        assert set(stored) == {f"signals.s1.{s}.{partition_of(s, 7)}" for s in symbols}
    finally:
        await nc.close()
