"""Operability on real parts: /healthz /readyz /metrics, every dashboard query against a real
Prometheus scraping a running worker and against the real schema, secrets kept out of logs, tail."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.adapters.embedded_nats import free_port
from engine.adapters.http import start_http
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration
DASHBOARDS = Path(__file__).parents[2] / "deploy" / "grafana" / "dashboards"


def panel_targets(kind: str) -> list[tuple[str, str]]:
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                if kind in target:
                    found.append((f"{path.stem}: {panel['title']}", target[kind]))
    return found


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


async def scenario(p: Pipeline) -> None:
    """Something for every panel: accumulation by two strategies, TP and SL, a hedge left open,
    a rejection and a dead letter."""
    await p.tick("ETHUSDT", "3000")
    await p.decision(
        await p.publish("alpha", "ETHUSDT", "buy", quantity="0.1", confidence=0.8, take_profit=3100)
    )
    await p.decision(
        await p.publish("beta", "ETHUSDT", "buy", quantity="0.1", confidence=0.7, stop_loss=2950)
    )
    await p.decision(await p.publish("gamma", "ETHUSDT", "sell", quantity="0.1", confidence=0.9))
    await p.decision(
        await p.publish("alpha", "ETHUSDT", "buy", quantity="0.1", confidence=0.3)
    )  # low_confidence
    await p.tick("ETHUSDT", "3100")  # alpha TP
    await p.tick("ETHUSDT", "2950")  # beta SL
    await p.decision(
        await p.publish("alpha", "ETHUSDT", "buy", quantity="0.1", confidence=0.8)
    )  # hedge: LONG + SHORT open
    await p.decision(await p.publish("beta", "ETHUSDT", "buy", quantity="0.1", confidence=0.8))
    await p.publish_raw("signals.alpha.ETHUSDT", b"{oops")
    await p.wait_events(lambda _: len(p.dead()) == 1, "dead letter")
    await p.mysql_caught_up()


@pytest.fixture
async def scraped(pipeline: Pipeline, tmp_path: Path) -> AsyncIterator[tuple[Pipeline, str, int]]:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: `make test` installs it (scripts/ensure-system-deps)"
    assert pipeline.worker and pipeline.attribution
    roles = [pipeline.worker, pipeline.attribution]

    async def readiness() -> dict[str, bool]:
        checks: dict[str, bool] = {}
        for role in roles:
            checks |= await role.checks()
        return checks

    http_port, prom_port = free_port(), free_port()
    runner = await start_http("127.0.0.1", http_port, readiness)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: tradeengine, static_configs: [{{targets: ['127.0.0.1:{http_port}']}}]}}]\n"
    )
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield pipeline, f"http://127.0.0.1:{prom_port}", http_port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        await runner.cleanup()


async def promql(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = await asyncio.to_thread(get, url)
    assert status == 200, body[:300]
    return list(json.loads(body)["data"]["result"])


async def test_health_readiness_and_metrics(scraped: tuple[Pipeline, str, int]) -> None:
    pipeline, _, port = scraped
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/readyz")
    assert status == 200, body
    assert json.loads(body)["checks"] == {
        "worker_consumer": True,
        "worker_lease": True,
        "attribution_consumer": True,
        "attribution_progress": True,
        "mysql": True,
    }
    await pipeline.stop_worker()  # a stopped role makes the process unready
    pipeline.worker = None
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/readyz")
    assert status == 503 and json.loads(body)["checks"]["worker_consumer"] is False
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and b"tradeengine_signals_total" in body


async def test_every_dashboard_query_returns_data(scraped: tuple[Pipeline, str, int]) -> None:
    pipeline, prometheus, _ = scraped
    await scenario(pipeline)
    prom_targets = panel_targets("expr")
    sql_targets = panel_targets("rawSql")
    assert len(prom_targets) >= 10 and len(sql_targets) >= 10
    for title, sql in sql_targets:
        assert await pipeline.query(sql), f"SQL panel '{title}' returned no rows"
    deadline = time.monotonic() + 40
    empty = prom_targets
    while empty and time.monotonic() < deadline:  # rate() needs two scrapes after the activity
        empty = [(title, expr) for title, expr in empty if not await promql(prometheus, expr)]
        if empty:
            await asyncio.sleep(0.5)
    assert not empty, f"PromQL panels with no data: {empty}"


def test_secrets_never_reach_the_logs(tmp_path: Path, mysql_url: str, nats_server: Any) -> None:
    secrets = {"mysql": "Sup3rSecretPw", "key": "APIKEY-abcdef123456", "secret": "APISECRET-zyx987654321"}
    secret_file = tmp_path / "secret"
    secret_file.write_text(secrets["secret"])
    bad_url = mysql_url.replace("mysql://root@", f"mysql://root:{secrets['mysql']}@")
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "HTTP_PORT")}
    env.update(MYSQL_URL=bad_url, EXCHANGE_API_KEY=secrets["key"], EXCHANGE_API_SECRET_FILE=str(secret_file),
               LOG_LEVEL="DEBUG", LOG_FORMAT="json", NATS_URL=nats_server.url.replace("nats://", f"nats://u:{secrets['mysql']}@"))  # fmt: skip
    for command in (["migrate"], ["attribution"]):
        result = subprocess.run(
            [sys.executable, "-m", "engine.cli", *command], env=env, capture_output=True, timeout=60
        )
        output = (result.stdout + result.stderr).decode()
        assert result.returncode != 0 and output, "the bad password must fail loudly"
        for value in secrets.values():
            assert value not in output, f"{command}: a secret leaked into the output"


@pytest.fixture
def tail_process(pipeline: Pipeline) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "NATS_URL": pipeline.settings.nats_url or "", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "tail", "--all", "--strategy", "alpha"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    yield proc
    proc.kill()
    proc.wait()


async def test_tail_follows_and_filters(pipeline: Pipeline, tail_process: subprocess.Popen[bytes]) -> None:
    await pipeline.tick("ETHUSDT", "3000")
    await pipeline.decision(await pipeline.publish("alpha", "ETHUSDT", "buy", quantity="0.1", confidence=0.8))
    await pipeline.decision(await pipeline.publish("beta", "ETHUSDT", "buy", quantity="0.1", confidence=0.8))
    assert tail_process.stdout is not None
    lines: list[str] = []
    while len(lines) < 2:
        line = await asyncio.wait_for(asyncio.to_thread(tail_process.stdout.readline), 20)
        lines.append(line.decode())
    text = "".join(lines)
    assert "OPENED alpha ETHUSDT LONG 0.1" in text and "DECIDED accepted" in text
    assert "beta" not in text
