"""The command line's usage errors: exit status 2, the subcommand's usage, a suggestion for a near
miss, and help text on every option."""

from __future__ import annotations

import argparse

import pytest

from helpers.processes import run_cli
from qlorakit.cli import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help(name: str) -> None:
    for action in subcommands()[name]._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            assert action.help, f"qlorakit {name} {'/'.join(action.option_strings)} has no help text"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["quantize", "src", "dst", "--blcksize", "64"], "did you mean --blocksize?"),
        (["inspect", "dir", "--jsn"], "did you mean --json?"),
        (["quantize", "src", "dst", "--max-shard-size", "5XB"], "invalid size '5XB'"),
        (["quantize", "src", "dst", "--threads", "0"], "must be at least 1"),
        (["quantize", "src", "dst", "--blocksize", "100"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_the_subcommand_usage(args: list[str], expected: str) -> None:
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"usage: qlorakit {args[0]}" in result.stderr and expected in result.stderr, result.stderr
