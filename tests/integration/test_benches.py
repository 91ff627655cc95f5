"""The benchmarks still run end to end (on tiny inputs): a bench that rots is found here, not
by whoever next needs the figures. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import attribution_throughput, worker_hotpath, worker_throughput
from engine.config import MysqlTarget

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["null", "floor", "worker"])
async def test_throughput_runs_every_signal_through(kind: str, tmp_path: Path) -> None:
    rate, _, rss = await worker_throughput.throughput(kind, 300, tmp_path)  # returns once all are acked
    assert rate > 0 and rss > 0


async def test_hot_path_decides_every_signal() -> None:
    _, worker, bus, venue = await worker_hotpath.run_once(400, None)
    assert bus.events >= 400  # a decision per signal, at least
    assert len(venue.orders) > 0 and worker.book.positions


async def test_attribution_bench_writes_every_event(tmp_path: Path, mysql_server: MysqlTarget) -> None:
    if (mysql_server.host, mysql_server.port) != ("127.0.0.1", 3306):
        pytest.skip("the bench writes to the local MariaDB")
    events = await attribution_throughput.history(60)
    assert await attribution_throughput.through_consumer(events, tmp_path) > 0  # returns once all are in
    assert await attribution_throughput.raw_insert(events) > 0
