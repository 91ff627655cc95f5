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
