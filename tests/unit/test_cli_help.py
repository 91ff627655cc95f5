"""Every command's --help says what it does and which environment variables it reads."""

from __future__ import annotations

import argparse

from engine.cli import _parser


def test_every_command_explains_itself() -> None:
    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(commands.choices) >= 14
    for name, sub in commands.choices.items():
        text = sub.format_help()
        assert sub.description and "Reads " in text and "docs/configuration.md" in text, name
