"""Every `Example:` in `curate ... --help` is a command line the CLI accepts (issue 18).

Each example line is parsed by click against the real command: subcommands resolved, every
option known, required options and arguments present, choices valid, numbers numbers. Paths in
examples name the user's files, so "does not exist" is the one error allowed.
"""

from __future__ import annotations

import shlex

import click
import pytest

from curate.cli import main


def _commands(cmd, path=()):
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(None):
            yield from _commands(cmd.get_command(None, name), (*path, name))
    else:
        yield path, cmd


def _examples(cmd: click.Command) -> list[str]:
    text = cmd.help or ""
    if "Example" not in text:
        return []
    block = text.split("Example", 1)[1]
    lines, cur = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        if cur:
            cur += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                lines.append(cur)
                cur = ""
            continue
        if line.startswith("curate "):
            if line.endswith("\\"):
                cur = line.rstrip("\\").strip()
            else:
                lines.append(line)
    if cur:
        lines.append(cur)
    out = []
    for line in lines:
        line = line.split(" # ", 1)[0].split("&&", 1)[0].split(" | ", 1)[0].strip()
        out.append(line)
    return out


EXAMPLES = [(" ".join(path), ex) for path, cmd in _commands(main) for ex in _examples(cmd)]


def test_there_are_examples_for_every_command():
    paths = {" ".join(p) for p, _ in _commands(main)}
    with_examples = {p for p, _ in EXAMPLES}
    assert paths - with_examples == set()


def _parse(args: list[str]):
    ctx = main.make_context("curate", list(args))
    cmd, rest = main, list(ctx.protected_args) + list(ctx.args)
    while isinstance(cmd, click.Group):
        name, sub, rest = cmd.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd, rest = sub, list(ctx.protected_args) + list(ctx.args) if isinstance(sub, click.Group) else []


@pytest.mark.parametrize("path,example", EXAMPLES, ids=[f"{p}: {e[:60]}" for p, e in EXAMPLES])
def test_example_parses(path, example):
    args = shlex.split(example)
    assert args[0] == "curate"
    try:
        _parse(args[1:])
    except click.BadParameter as e:
        if "does not exist" not in str(e):
            raise AssertionError(f"`{example}`: {e.format_message()}") from None
    except click.ClickException as e:
        raise AssertionError(f"`{example}`: {e.format_message()}") from None
