"""Long commands tell how far they have got, on stderr (stdout stays their answer)."""

from __future__ import annotations

import pytest

from engine.app.commands import Steps


def test_off_a_terminal_each_step_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with Steps("migrations") as steps:
        for n, name in enumerate(("001_core_tables", "002_views")):
            steps.step(name, n, 2)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["migrations: 001_core_tables", "migrations: 002_views"]
    assert "(1 of 2," in lines[0] and "(2 of 2," in lines[1]


def test_off_a_terminal_counted_work_is_a_line_now_and_then(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.app import commands

    monkeypatch.setattr(commands, "LINE_EVERY", 0.0)
    with Steps("replay") as steps:
        steps.advance(10_000, 40_000, "0 of 4 configurations done")
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("replay: 10,000 of 40,000 (0 of 4 configurations done, ")
    monkeypatch.setattr(commands, "LINE_EVERY", 3600.0)
    with Steps("replay") as steps:
        steps.advance(20_000, 40_000, "1 of 4 configurations done")
    assert capsys.readouterr().err == ""  # not yet: a log gets a line now and then, not a flood
