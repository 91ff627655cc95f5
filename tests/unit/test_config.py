from __future__ import annotations

import pytest

from engine.config import ConfigError, MysqlTarget, load_settings
from engine.domain.model import PositionMode, SameDirectionPolicy


def test_defaults_follow_the_design(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("POSITION_MODE", "SAME_DIRECTION_CONFLICT_RESOLUTION", "MIN_CONFIDENCE", "EXCHANGE"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert s.position_mode is PositionMode.HEDGE and s.position_mode_aware_conflicts
    assert s.same_direction_conflict_resolution is SameDirectionPolicy.ACCUMULATE
    assert str(s.min_confidence) == "0.6" and s.max_accumulations_per_position == 10
    assert s.exchange == "paper"


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSITION_MODE", "one-way")
    monkeypatch.setenv("POSITION_MODE_AWARE_CONFLICTS", "false")
    monkeypatch.setenv("SAME_DIRECTION_CONFLICT_RESOLUTION", "strongest_wins")
    monkeypatch.setenv("ALLOWED_SYMBOLS", "BTCUSDT, ETHUSDT")
    s = load_settings()
    assert s.position_mode is PositionMode.ONE_WAY and not s.position_mode_aware_conflicts
    assert s.allowed_symbols == frozenset({"BTCUSDT", "ETHUSDT"})
    assert s.rules().conflicts.opposite_sides_conflict


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POSITION_MODE", "sideways"),
        ("SAME_DIRECTION_CONFLICT_RESOLUTION", "yolo"),
        ("MIN_CONFIDENCE", "2"),
        ("MYSQL_URL", "postgres://x@y/z"),
        ("HTTP_PORT", "not-a-port"),
    ],
)
def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_mysql_target_hides_the_password() -> None:
    target = MysqlTarget.parse("mysql://trader:s3cret@db.local:3307/pnl")
    assert (target.host, target.port, target.user, target.password, target.database) == (
        "db.local", 3307, "trader", "s3cret", "pnl",
    )  # fmt: skip
    assert "s3cret" not in repr(target)


def test_every_setting_is_documented() -> None:
    """docs/configuration.md names every variable the engine reads."""
    from pathlib import Path

    from engine.config import Settings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert [name.upper() for name in Settings.model_fields if f"`{name.upper()}" not in doc] == []
