"""The real entry points as subprocesses: `tradeengine run` with the bundled NATS, `publish`, `price`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.adapters.embedded_nats import free_port, port_is_open
from tests.integration.processes import interrupt

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "engine.cli"]


def cli_env(tmp_path: Path, mysql_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "MYSQL_URL", "HTTP_PORT")}
    env.update(
        DATA_DIR=str(tmp_path / "data"), MYSQL_URL=mysql_url, LOG_FORMAT="json", COLUMNS="250", **extra
    )
    return env


def wait_until(probe: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def running(tmp_path: Path, mysql_url: str) -> Iterator[tuple[dict[str, str], int, subprocess.Popen[bytes]]]:
    http_port, nats_port = free_port(), free_port()
    env = cli_env(
        tmp_path,
        mysql_url,
        HTTP_PORT=str(http_port),
        EMBEDDED_NATS_PORT=str(nats_port),
        PRICE_HISTORY_INTERVAL="1",
    )
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*CLI, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: readyz(http_port) == 200 or proc.poll() is not None)
        assert proc.poll() is None, (tmp_path / "run.log").read_text()
        yield env, http_port, proc
    finally:
        interrupt(proc, timeout=20)
        log.close()


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return int(resp.status)
    except Exception:
        return 0


def cli(env: dict[str, str], *args: str, code: int = 0) -> str:
    out = subprocess.run([*CLI, *args], env=env, capture_output=True, timeout=60)
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    return out.stdout.decode()


def test_run_publish_tp_hit_and_clean_shutdown(
    running: tuple[dict[str, str], int, subprocess.Popen[bytes]],
) -> None:
    env, http_port, proc = running
    nats_url = (Path(env["DATA_DIR"]) / "nats.url").read_text().strip()
    assert nats_url.endswith(env["EMBEDDED_NATS_PORT"])
    cli(env, "price", "ETHUSDT", "3000")
    out = cli(env, "publish", "momentum_v1", "ETHUSDT", "buy", "--quantity", "0.1", "--confidence", "0.8",
              "--take-profit-pct", "0.05")  # fmt: skip
    assert "accepted" in out, out
    out = cli(
        env, "publish", "mean_reversion_v1", "ETHUSDT", "sell", "--quantity", "0.1", "--confidence", "0.75"
    )
    assert "accepted" in out, out
    out = cli(
        env,
        "publish",
        "x",
        "ETHUSDT",
        "buy",
        "--raw",
        '{"strategy_id":"x","symbol":"ETHUSDT","action":"buy"}',
        code=4,  # dead-lettered
    )
    assert "DEAD" in out and "quote_quantity or position_size_pct" in out, out
    out = cli(env, "publish", "x", "ETHUSDT", "buy", "--quantity", "0.1", "--confidence", "0.1", code=3)
    assert "low_confidence" in out, out
    again = ("publish", "y", "ETHUSDT", "hold", "--signal-id", "same-id-1")
    cli(env, *again)  # ignored: exit 0
    out = cli(env, *again, code=5)
    assert "duplicate" in out and "DECIDED ignored" in out and "hold" in out, out  # the earlier decision
    cli(env, "price", "ETHUSDT", "3150")

    def tp_counted() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
        return (
            'tradeengine_strategy_positions_closed_total{close_reason="take_profit",strategy_id="momentum_v1"} 1.0'
            in text
        )

    wait_until(tp_counted)
    report = cli(env, "report")
    assert "momentum_v1" in report and "mean_reversion_v1" in report

    # What the desk did, again from what NATS kept: the signals, and the ticks as the worker's bars.
    kept = Path(env["DATA_DIR"]) / "kept.jsonl"
    replayed: list[dict[str, Any]] = []

    def replays_the_tp() -> bool:
        out = cli(env, "replay", "--json", "--jobs", "1", "--policies", "accumulate", "--modes", "hedge",
                  "--save-recording", str(kept))  # fmt: skip
        replayed[:] = [json.loads(out)["accumulate/hedge/conf>=0.6"]]
        return bool(replayed[0]["strategies"].get("momentum_v1", {}).get("tp_hits"))

    wait_until(replays_the_tp)
    assert replayed[0]["in_force"] and replayed[0]["strategies"]["x"]["rejected"]["low_confidence"] == 1
    assert (
        replayed[0]["matches_booked"]
        and replayed[0]["booked"]["momentum_v1"] == replayed[0]["strategies"]["momentum_v1"]["net_pnl"]
    )
    assert sum(1 for line in kept.read_text().splitlines() if '"tick"' in line) == 2

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    assert not port_is_open("127.0.0.1", int(env["EMBEDDED_NATS_PORT"]))  # bundled server stopped


def test_invalid_setting_stops_start_up_naming_the_variable(tmp_path: Path, mysql_url: str) -> None:
    env = cli_env(tmp_path, mysql_url, POSITION_MODE="sideways")
    result = subprocess.run([*CLI, "worker"], env=env, capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"POSITION_MODE" in result.stderr


def test_migrate_is_idempotent(tmp_path: Path, mysql_url: str) -> None:
    env = cli_env(tmp_path, mysql_url)
    assert "001_core_tables, 002_views" in cli(env, "migrate")
    assert "up to date" in cli(env, "migrate")


def test_schema_files_are_json(tmp_path: Path) -> None:
    for path in (Path(__file__).parents[2] / "schemas").glob("*.json"):
        assert json.loads(path.read_text())["$schema"].startswith("https://json-schema.org/")


@pytest.mark.parametrize(
    ("extra", "args", "says"),
    [
        ({"LOG_LEVEL": "loud"}, ["price", "BTCUSDT", "1"], "LOG_LEVEL: Value error, must be one of DEBUG"),
        ({}, ["price", "BTCUSDT", "abc"], "price 'abc' is not a decimal"),
        ({}, ["price", "BTCUSDT", "-5"], "price '-5' must be positive"),
        (
            {"EXCHANGE": "nonsense", "NATS_URL": "nats://127.0.0.1:1"},
            ["worker"],
            "ccxt has no exchange 'nonsense'",
        ),
    ],
)
def test_careless_input_gets_one_line_and_exit_code_2(
    tmp_path: Path, mysql_url: str, extra: dict[str, str], args: list[str], says: str
) -> None:
    env = cli_env(tmp_path, mysql_url, NATS_CONNECT_TIMEOUT="2", **extra)
    result = subprocess.run([*CLI, *args], env=env, capture_output=True, timeout=60)
    err = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, err)
    assert says in err and "Traceback" not in err, err


def test_publish_says_when_nobody_answers(nats_server: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")} | {"NATS_URL": nats_server.url}
    out = cli(env, "publish", "s1", "BTCUSDT", "buy", "--quantity", "0.01", "--timeout", "1", code=6)
    assert "no decision within 1s" in out
    assert "published" in cli(env, "publish", "s1", "BTCUSDT", "buy", "--quantity", "0.01", "--no-wait")
