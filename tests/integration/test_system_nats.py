"""The machine's own NATS (2.9.x at 127.0.0.1:4222, as ops run it): streams, consumers and the
pipeline work on it, not only on the newer server from the wheel."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js.errors import NotFoundError

from engine.adapters.embedded_nats import port_is_open
from engine.adapters.nats_bus import EVENTS_STREAM, SIGNALS_STREAM
from engine.domain.model import CloseReason, Outcome
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration
SYSTEM_NATS = os.environ.get("TEST_SYSTEM_NATS_URL", "nats://127.0.0.1:4222")


async def _drop_streams() -> None:
    nc = await nats.connect(SYSTEM_NATS)
    try:
        for name in (SIGNALS_STREAM, EVENTS_STREAM):
            with contextlib.suppress(NotFoundError):
                await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture
async def system_pipeline(mysql_url: str) -> AsyncIterator[Pipeline]:
    host_port = SYSTEM_NATS.rsplit("/", 1)[-1]
    host, port = host_port.split(":")
    if not port_is_open(host, int(port)):
        pytest.fail(f"no NATS at {SYSTEM_NATS}: .ci/run starts it; or set TEST_SYSTEM_NATS_URL")
    await _drop_streams()
    try:
        async with Pipeline(SYSTEM_NATS, mysql_url) as pipeline:
            yield pipeline
    finally:
        await _drop_streams()


async def test_pipeline_on_the_system_nats_server(system_pipeline: Pipeline) -> None:
    assert system_pipeline.client is not None
    version = system_pipeline.client.connected_server_version
    await system_pipeline.tick("ETHUSDT", "3000")
    sid = await system_pipeline.publish(
        "s1", "ETHUSDT", "buy", quantity="0.1", confidence=0.9, take_profit=3100
    )
    assert (await system_pipeline.decision(sid)).outcome is Outcome.ACCEPTED, f"server {version}"
    await system_pipeline.tick("ETHUSDT", "3100")
    await system_pipeline.wait_events(lambda _: len(system_pipeline.closed()) == 1, "TP close")
    assert system_pipeline.closed()[0].close_reason is CloseReason.TAKE_PROFIT
    await system_pipeline.stop_worker()
    worker = await system_pipeline.start_worker()  # replay works on this server too
    assert len(worker.ledger) == 1 and not worker.book.positions
    await system_pipeline.mysql_caught_up()


async def test_partitions_on_a_server_without_stream_transforms_stop_the_worker_with_the_reason() -> None:
    """nats-server 2.9 ignores a stream's subject transform: SIGNAL_PARTITIONS > 1 there would
    leave every signal on a subject no partition reads, so the worker refuses (exit 2)."""
    host, port = SYSTEM_NATS.rsplit("/", 1)[-1].split(":")
    if not port_is_open(host, int(port)):
        pytest.fail(f"no NATS at {SYSTEM_NATS}: .ci/run starts it; or set TEST_SYSTEM_NATS_URL")
    await _drop_streams()
    env = {k: v for k, v in os.environ.items() if k not in ("MYSQL_URL",)}
    env |= {"NATS_URL": SYSTEM_NATS, "SIGNAL_PARTITIONS": "3", "HTTP_PORT": "0", "LOG_FORMAT": "json"}
    try:
        nc = await nats.connect(SYSTEM_NATS)
        version = nc.connected_server_version
        await nc.close()
        if (version.major, version.minor) >= (2, 10):
            pytest.skip(f"the system NATS is {version}: it keeps stream transforms")
        done = subprocess.run([sys.executable, "-m", "engine.cli", "worker"], env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "SIGNAL_PARTITIONS=3" in done.stderr and "2.10 or newer" in done.stderr
        (said,) = [line for line in done.stderr.splitlines() if line.startswith("tradeengine:")]
        assert f"nats-server {version.major}.{version.minor}" in said
    finally:
        await _drop_streams()
