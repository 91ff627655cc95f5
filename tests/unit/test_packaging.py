"""`pip install .` then `tradeengine migrate` works: the wheel carries the migrations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_every_migration(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("tradeengine-*.whl")
    shipped = sorted(
        Path(name).name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("engine/migrations/")
    )
    assert shipped == sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))
