"""Subprocesses the tests start, stopped by PID."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

CLI = [sys.executable, "-m", "engine.cli"]


def interrupt(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Ctrl-C as an operator would; SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as a crash would, and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Spawned:
    """`tradeengine` processes a test starts, each logging to `<name>.log` in its tmp folder,
    all stopped by PID at the end."""

    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self.logs.append(log)
        proc = subprocess.Popen([*CLI, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Ctrl-C to all at once, then wait for each (SIGKILL past 15 s): they stop side by side."""
        running = [proc for proc in self.procs if proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGINT)
        for proc in running:
            interrupt(proc, timeout=15)  # waits; kills what is still running by then
        for log in self.logs:
            log.close()


def emulator_worker_env(nats_url: str, emulator_port: int, **settings: str) -> dict[str, str]:
    """A worker's environment for trading through ccxt on the emulator at `emulator_port`, with
    the short timeouts and windows the crash tests need, and `settings` on top."""
    env = {k: v for k, v in os.environ.items() if k != "MYSQL_URL"}
    env.update(
        NATS_URL=nats_url,
        EXCHANGE="binanceusdm",
        EXCHANGE_API_URL=f"http://127.0.0.1:{emulator_port}",
        EXCHANGE_API_KEY="emulator-key",
        EXCHANGE_API_SECRET="emulator-secret",
        SET_POSITION_MODE="true",
        LOG_FORMAT="json",
        ORDER_TIMEOUT_SECONDS="2",
        RECONCILE_INTERVAL_SECONDS="1",
        MAX_SIGNAL_AGE_SECONDS="3600",
        MIN_CONFIDENCE="0.5",
        FETCH_BATCH="16",
        EXCHANGE_RECV_WINDOW_MS="1000",
        ORDER_SEND_SPAN_SECONDS="3",  # an order lost in a kill is known unplaced 6 s after it
        EXCHANGE_RATE_LIMIT_MS="1",  # the emulator has no limit; Binance's weights would pace us at ~0.4 s/order
    )
    env.update(settings)
    return env


async def move_prices(
    http: Any, emulator_url: str, nc: Any, prices: dict[str, Decimal], symbols: Iterable[str],
    rng: random.Random, step: Decimal,
) -> None:  # fmt: skip
    """One step of a random walk: each of `symbols` moved by 0.1 or 0.2 % either way (rounded
    to `step`), at the emulator and as a tick on `prices.<symbol>`."""
    for symbol in symbols:
        prices[symbol] *= Decimal(1) + Decimal(rng.choice([-2, -1, 1, 2])) / Decimal(1000)
        price = str(prices[symbol].quantize(step))
        async with http.post(f"{emulator_url}/emulator/price", json={"symbol": symbol, "price": price}):
            pass
        await nc.publish(f"prices.{symbol}", json.dumps({"symbol": symbol, "price": price}).encode())
