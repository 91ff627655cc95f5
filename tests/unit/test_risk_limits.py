"""Risk limits, halts, the day's tally and the kill switch's commands: the pure core."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.config import ConfigError, load_settings
from engine.domain.control import BadCommand, Command, apply_command, parse_command, restore_halts
from engine.domain.control import control_event as make_event
from engine.domain.risk import DayTally, Halt, HaltCause, RiskBook, RiskLimits, Scope, StrategyLimits

D = Decimal
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_scopes_cover_what_they_name() -> None:
    assert Scope().covers("a", "BTCUSDT")
    assert Scope("a").covers("a", "ETHUSDT") and not Scope("a").covers("b", "ETHUSDT")
    assert Scope(symbol="BTCUSDT").covers("b", "BTCUSDT") and not Scope(symbol="BTCUSDT").covers("b", "X")
    assert Scope("a", "BTCUSDT").within(Scope("a")) and Scope("a").within(Scope())
    assert not Scope("a").within(Scope("a", "BTCUSDT"))
    assert Scope("a").overlaps(Scope(symbol="X")) and not Scope("a").overlaps(Scope("b"))
    assert [str(s) for s in (Scope(), Scope("a"), Scope(symbol="X"), Scope("a", "X"))] == [
        "everything", "strategy a", "symbol X", "strategy a on symbol X",
    ]  # fmt: skip


def test_halts_block_openings_until_resumed_and_resume_lifts_what_lies_within() -> None:
    risk = RiskBook()
    assert risk.halt(Halt(Scope("a"), HaltCause.OPERATOR, "ops", T0))
    assert not risk.halt(Halt(Scope("a"), HaltCause.OPERATOR, "again", T0))
    risk.halt(Halt(Scope("a", "X"), HaltCause.OPERATOR, "ops", T0))
    risk.halt(Halt(Scope(symbol="Y"), HaltCause.OPERATOR, "ops", T0))
    breach = risk.refuse_opening("a", "Z", T0)
    assert breach is not None and breach.reason_code == "halted"
    assert risk.refuse_opening("b", "Y", T0) is not None and risk.refuse_opening("b", "Z", T0) is None
    assert {h.scope for h in risk.resume(Scope("a"))} == {Scope("a"), Scope("a", "X")}
    assert risk.refuse_opening("a", "Z", T0) is None and risk.refuse_opening("a", "Y", T0) is not None
    assert [h.scope for h in risk.resume(Scope())] == [Scope(symbol="Y")]


def test_a_halt_with_an_end_expires() -> None:
    risk = RiskBook()
    risk.halt(Halt(Scope("a"), HaltCause.DAILY_LOSS, "lost", T0, T0 + timedelta(hours=1)))
    breach = risk.refuse_opening("a", "X", T0)
    assert breach is not None and breach.reason_code == "daily_loss_limit"
    assert risk.refuse_opening("a", "X", T0 + timedelta(hours=1)) is None


def test_the_day_tally_starts_again_at_midnight_utc() -> None:
    tally = DayTally()
    tally.add("a", T0, D("-5"))
    tally.add("b", T0, D("2"))
    assert (tally.loss("a", T0), tally.loss("b", T0), tally.loss(None, T0)) == (D(5), D(-2), D(3))
    tomorrow = T0 + timedelta(days=1)
    assert tally.loss("a", tomorrow) == 0
    tally.add("a", tomorrow, D("-1"))
    tally.add("a", T0, D("-100"))  # yesterday's, come late: that day is over
    assert tally.loss("a", tomorrow) == D(1)


@given(st.lists(st.decimals(min_value=-1000, max_value=1000, places=2), max_size=30))
def test_the_day_tally_is_the_sum_of_the_days_amounts(amounts: list[Decimal]) -> None:
    tally = DayTally()
    for n, amount in enumerate(amounts):
        tally.add(f"s{n % 3}", T0, amount)
    assert tally.loss(None, T0) == -sum(amounts, D(0))
    assert sum((tally.loss(f"s{k}", T0) for k in range(3)), D(0)) == -sum(amounts, D(0))


def test_day_loss_limits_for_a_strategy_and_the_account() -> None:
    limits = RiskLimits(StrategyLimits(daily_loss=D(10)), {"b": StrategyLimits(daily_loss=D(50))}, D(40))
    risk = RiskBook(limits)
    risk.book("a", T0, D("-9.99"))
    assert risk.refuse_opening("a", "X", T0) is None
    risk.book("a", T0, D("-0.01"))
    breach = risk.refuse_opening("a", "X", T0)
    assert breach is not None and (breach.reason_code, breach.limit, breach.figure) == (
        "daily_loss_limit",
        D(10),
        D(10),
    )
    risk.book("b", T0, D("-29"))
    assert risk.refuse_opening("b", "X", T0) is None
    halts = risk.losses_past_limit(["a", "b"], T0)
    assert [h.scope for h in halts] == [Scope("a")] and halts[0].until == datetime(2026, 12, 2, tzinfo=UTC)
    risk.book("b", T0, D("-1"))  # the account: 40
    assert [h.scope for h in risk.losses_past_limit(["a", "b"], T0)] == [Scope(), Scope("a")]
    risk.halt(risk.losses_past_limit([], T0)[0])
    assert risk.losses_past_limit([], T0) == []  # in force already: not halted twice


def test_strategy_limits_fall_back_to_the_default_field_by_field() -> None:
    limits = RiskLimits(
        StrategyLimits(max_notional=D(100), max_positions=3), {"a": StrategyLimits(max_positions=1)}
    )
    assert limits.of("a") == StrategyLimits(max_notional=D(100), max_positions=1)
    assert limits.of("z") == StrategyLimits(max_notional=D(100), max_positions=3)


def test_size_limits_name_the_limit_and_the_figure() -> None:
    risk = RiskBook(RiskLimits(StrategyLimits(max_notional=D(100), max_positions=2)))
    over = risk.refuse_size("a", D(60), D(50), 0, T0)
    assert over is not None and (over.reason_code, over.limit, over.figure) == (
        "risk_limit_strategy",
        D(100),
        D(110),
    )
    assert risk.refuse_size("a", D(50), D(50), 1, T0) is None
    full = risk.refuse_size("a", D(1), D(0), 2, T0)
    assert full is not None and (full.reason_code, full.limit, full.figure) == (
        "risk_limit_positions",
        D(2),
        D(3),
    )


@given(st.lists(st.floats(min_value=0, max_value=30), min_size=1, max_size=60))
def test_the_order_rate_never_admits_more_than_the_bucket_allows(gaps: list[float]) -> None:
    """Over any run of openings, accepted ones never exceed the rate times the minutes elapsed,
    plus the bucket's depth."""
    per_minute = 5
    risk = RiskBook(RiskLimits(StrategyLimits(orders_per_minute=per_minute)))
    now, accepted = T0, 0
    for gap in gaps:
        now += timedelta(seconds=gap)
        if risk.refuse_size("a", D(1), D(0), 0, now) is None:
            risk.charge("a", now)
            accepted += 1
    minutes = (now - T0).total_seconds() / 60
    assert accepted <= per_minute + per_minute * minutes + 1e-9


def test_the_order_rate_refills() -> None:
    risk = RiskBook(RiskLimits(StrategyLimits(orders_per_minute=2)))
    for _ in range(2):
        assert risk.refuse_size("a", D(1), D(0), 0, T0) is None
        risk.charge("a", T0)
    refused = risk.refuse_size("a", D(1), D(0), 0, T0)
    assert refused is not None and refused.reason_code == "rate_limited"
    assert risk.refuse_size("b", D(1), D(0), 0, T0) is None  # per strategy
    assert risk.refuse_size("a", D(1), D(0), 0, T0 + timedelta(seconds=30)) is None


def test_a_strategy_limited_to_symbols() -> None:
    risk = RiskBook(RiskLimits(strategies={"a": StrategyLimits(symbols=frozenset({"X"}))}))
    assert risk.refuse_opening("a", "X", T0) is None
    refused = risk.refuse_opening("a", "Y", T0)
    assert refused is not None and refused.reason_code == "symbol_not_allowed"
    assert risk.refuse_opening("b", "Y", T0) is None


# --- commands ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("subject", "data", "error"),
    [
        ("control.explode", b"{}", "unknown command"),
        ("control.halt", b"[1]", "JSON object"),
        ("control.halt", b"{not json", "not JSON"),
        ("control.halt", b'{"strategy_id": "a.b"}', "strategy_id must match"),
        ("control.halt", b'{"symbol": 5}', "symbol must match"),
        ("control.halt", b'{"command_id": "has space"}', "command_id"),
        ("control.halt", b'{"reason": "' + b"x" * 201 + b'"}', "reason"),
        ("control.halt", b'{"strategy": "a"}', "unknown field"),
        ("control.halt", b"x" * 5000, "larger than"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(subject: str, data: bytes, error: str) -> None:
    parsed = parse_command(subject, data, 7)
    assert isinstance(parsed, BadCommand) and error in parsed.error


def test_commands_parse_and_apply() -> None:
    risk = RiskBook()
    halt = parse_command("control.halt", b'{"command_id": "c1", "strategy_id": "a", "reason": "review"}', 1)
    assert halt == Command("c1", "halt", Scope("a"), "review")
    assert apply_command(risk, halt, T0) == (True, "strategy a halted")
    assert apply_command(risk, halt, T0) == (False, "strategy a was already halted")
    everything = parse_command("control.halt", b"", 2)
    assert (
        isinstance(everything, Command)
        and everything.scope == Scope()
        and everything.command_id == "control-2"
    )
    apply_command(risk, everything, T0)
    resume = parse_command("control.resume", b'{"strategy_id": "a"}', 3)
    assert isinstance(resume, Command)
    assert apply_command(risk, resume, T0) == (True, "resumed strategy a; still halted by everything")


def test_halts_come_back_from_the_last_event() -> None:
    risk = RiskBook()
    risk.halt(Halt(Scope("a"), HaltCause.OPERATOR, "ops", T0))
    risk.halt(Halt(Scope(), HaltCause.DAILY_LOSS, "lost", T0, T0 + timedelta(hours=12)))
    event = make_event(risk, "c", "halt", Scope("a"), "applied", "x", T0)
    restored = RiskBook()
    restore_halts(restored, event)
    assert restored.halts == risk.halts


# --- the risk file -------------------------------------------------------------------------
def test_the_risk_file_over_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "risk.toml"
    path.write_text(
        "[account]\nmax_total_notional = 5000\ndaily_loss = 100\n\n[default]\nmax_positions = 3\n\n"
        '[strategies.alpha]\nmax_notional = 0.1\nsymbols = ["BTCUSDT"]\n'
    )
    risk = load_settings(risk_file=str(path), max_orders_per_minute=10, max_total_notional="9").risk()
    assert risk.rules.max_total_notional == D(5000) and risk.limits.account_daily_loss == D(100)
    assert risk.limits.of("alpha") == StrategyLimits(D("0.1"), 3, 10, frozenset({"BTCUSDT"}), None)
    assert risk.limits.of("beta") == StrategyLimits(None, 3, 10, None, None)


def test_the_risk_file_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "risk.yaml"
    path.write_text("default:\n  daily_loss: 250.5\nstrategies:\n  alpha:\n    orders_per_minute: 6\n")
    risk = load_settings(risk_file=str(path)).risk()
    assert risk.limits.of("alpha") == StrategyLimits(orders_per_minute=6, daily_loss=D("250.5"))


def test_every_bad_line_of_the_risk_file_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "risk.toml"
    path.write_text(
        '[default]\nmax_positions = 0\n\n[strategies.alpha]\nmax_notional = -5\nsymbols = ["BTC.USDT"]\n'
        "max_notionl = 3\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(risk_file=str(path)).risk()
    lines = str(raised.value).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"RISK_FILE {path}:2: default.max_positions:")
    assert lines[1].startswith(f"RISK_FILE {path}:5: strategies.alpha.max_notional:")
    assert lines[2].startswith(f"RISK_FILE {path}:6: strategies.alpha.symbols.0:")
    assert lines[3].startswith(f"RISK_FILE {path}:7: strategies.alpha.max_notionl: Extra inputs")


def test_a_risk_file_that_is_not_toml_or_not_there(tmp_path: Path) -> None:
    path = tmp_path / "risk.toml"
    path.write_text("[default\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(risk_file=str(path)).risk()
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(risk_file=str(tmp_path / "missing.toml")).risk()


def test_leverage_above_the_maximum_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="LEVERAGE: 20 is above the maximum leverage 10"):
        load_settings(leverage=20, max_leverage=10).risk()
    with pytest.raises(ConfigError, match="for ETHUSDT"):
        load_settings(leverage_by_symbol="ETHUSDT=15", max_leverage=10).risk()
    assert load_settings(leverage=5, max_leverage=10).risk().max_leverage == 10
