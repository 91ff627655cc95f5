"""Replicated streams on a 3-node NATS cluster (issue #16, item 5): three nats-servers from the
pinned wheel on loopback ports, the worker and the attribution consumer on all three with
STREAM_REPLICAS=3; one node is killed with SIGKILL in the middle of the run and started again.
Nothing is lost and nothing is done twice: every signal decided once, one order per opening,
MySQL equal to the events."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.domain.events import SignalDecided
from tests.integration.harness import Pipeline, eventually

pytestmark = pytest.mark.integration
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"]
PRICES = {"BTCUSDT": "45000", "ETHUSDT": "3000", "SOLUSDT": "150", "BNBUSDT": "600", "XRPUSDT": "0.6"}
QUANTITY = {"BTCUSDT": "0.002", "ETHUSDT": "0.03", "SOLUSDT": "0.5", "BNBUSDT": "0.1", "XRPUSDT": "20"}


class Cluster:
    def __init__(self, root: Path) -> None:
        self.client_ports = [free_port() for _ in range(3)]
        self.route_ports = [free_port() for _ in range(3)]
        self.root = root
        self.nodes: list[EmbeddedNats] = [self._node(i) for i in range(3)]

    def _node(self, i: int) -> EmbeddedNats:
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i)
        return EmbeddedNats(
            self.client_ports[i], self.root / f"n{i}",
            extra_args=("--server_name", f"n{i}", "--cluster_name", "te",
                        "--cluster", f"nats://127.0.0.1:{self.route_ports[i]}", "--routes", routes),
        )  # fmt: skip

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def kill(self, i: int) -> None:
        self.nodes[i].stop(kill=True)

    def restart(self, i: int) -> None:
        self.nodes[i] = self._node(i)
        self.nodes[i].start()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path)
    try:
        for node in running.nodes:
            node.start()
        yield running
    finally:
        for node in running.nodes:
            node.stop()


async def _jetstream_ready(url: str) -> None:
    """A clustered JetStream is ready once it places a stream on three nodes: a meta leader
    alone answers account info before every peer has joined ("no suitable peers for placement")."""
    nc = await nats.connect(url.split(","))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                js = nc.jetstream()
                await js.add_stream(name="READY_PROBE", subjects=["ready-probe"], num_replicas=3)
                await js.delete_stream("READY_PROBE")
                return
            except Exception:
                assert time.monotonic() < deadline, "the cluster never elected a JetStream leader"
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


@pytest.mark.timeout(300)
async def test_a_node_killed_mid_run_loses_and_doubles_nothing(cluster: Cluster, mysql_url: str) -> None:
    await _jetstream_ready(cluster.url)
    rng = random.Random(16)
    async with Pipeline(cluster.url, mysql_url, STREAM_REPLICAS=3) as pipeline:
        assert pipeline.client is not None
        info = await pipeline.client.jetstream().stream_info("EVENTS")
        assert info.config.num_replicas == 3
        for symbol, price in PRICES.items():
            await pipeline.tick(symbol, price)
        sent: list[str] = []
        for n in range(300):
            if n == 120:
                cluster.kill(1)  # a node dies with the run in full flow
            if n == 220:
                cluster.restart(1)
            symbol = rng.choice(SYMBOLS)
            action = rng.choices(["buy", "sell", "close"], weights=[45, 45, 10])[0]
            fields: dict[str, Any] = {"signal_id": f"c-{n}", "confidence": "0.9", "price": PRICES[symbol]}
            if action != "close":
                fields["quantity"] = QUANTITY[symbol]
            for attempt in range(50):  # a publish in flight when the node died is sent again
                try:
                    await pipeline.publish(f"s{n % 4}", symbol, action, **fields)
                    break
                except nats.errors.Error:  # no responders, no stream answer, a timeout: a new leader comes
                    assert attempt < 49
                    await asyncio.sleep(0.2)
            sent.append(fields["signal_id"])

        def all_decided() -> bool | None:
            decided = Counter(e.signal_id for e in pipeline.events if isinstance(e, SignalDecided))
            return all(decided[s] >= 1 for s in sent) or None

        await eventually(all_decided, timeout=120, what="every signal decided")
        decided = Counter(e.signal_id for e in pipeline.events if isinstance(e, SignalDecided))
        assert max(decided[s] for s in sent) == 1, "a signal decided twice"
        opened = [e for e in pipeline.events if e.type == "position.opened"]
        assert pipeline.venue_order_count() >= len(opened) > 0
        assert len({e.client_order_id for e in opened}) == len(opened)
        await pipeline.mysql_caught_up(timeout=60)
        rows = await pipeline.query("SELECT COUNT(*) AS n FROM signal_decisions")
        assert rows[0]["n"] == len(sent)
