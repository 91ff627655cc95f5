"""What each role loads: ccxt (~0.45 s, ~100 MB) only for a ccxt venue, asyncmy only for attribution,
plotly only for the HTML report (never a worker)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from engine.app.runner import build_gateway
from engine.app.worker import Worker
from engine.config import load_settings
build_gateway(load_settings(**{overrides}))
print(sorted(m for m in ("ccxt", "asyncmy", "plotly") if m in sys.modules))
"""


def loaded(overrides: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(overrides=overrides)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_the_paper_worker_loads_neither_ccxt_nor_asyncmy() -> None:
    assert loaded("{}") == "[]"


def test_a_ccxt_venue_loads_ccxt_and_still_not_asyncmy() -> None:
    venue = "{'exchange': 'binanceusdm', 'exchange_api_key': 'k', 'exchange_api_secret': 's'}"
    assert loaded(venue) == "['ccxt']"
