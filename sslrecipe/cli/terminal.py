"""The command line's manners towards the terminal: help that wraps to its width, and quiet pipes.

- Help text wraps to the terminal (up to `MAX_WIDTH` columns). click rewraps prose itself but prints `\\b`
  blocks (command lists, examples) verbatim; `HelpFormatter` keeps their line breaks and wraps only a line
  wider than the terminal, with a hanging indent under its description column.
- `sslrecipe ... | head -2` exits 0: a reader that closes the pipe early is not an error (click alone
  exits 1 there, and Python prints a BrokenPipeError at shutdown).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import textwrap
from typing import Any, Iterator

import click

MAX_WIDTH = 120  # wider help lines are hard to read; narrower terminals get their own width

_DESCRIPTION_COLUMN = re.compile(r"^(\s*\S+(?: \S+)*?\s{2,})\S")  # "  list     the catalogue" -> hang at "the"


def fit_verbatim(text: str, width: int) -> str:
    """Wrap the over-long lines of `\\b` paragraphs in `text` at word boundaries, hanging under the line's
    description column (or 4 columns in); other paragraphs are left for click to rewrap."""
    width = max(width, 20)
    out: list[str] = []
    verbatim = False
    for line in text.split("\n"):
        if not line.strip():
            verbatim = False
            out.append(line)
            continue
        if line.strip() == "\b":
            verbatim = True
            out.append(line)
            continue
        if not verbatim or len(line) <= width:
            out.append(line)
            continue
        m = _DESCRIPTION_COLUMN.match(line)
        indent = len(line) - len(line.lstrip())
        hang = len(m.group(1)) if m and len(m.group(1)) < width // 2 else indent + 4
        out += textwrap.wrap(line, width=width, subsequent_indent=" " * hang, break_long_words=False,
                             break_on_hyphens=False, drop_whitespace=True) or [line]
    return "\n".join(out)


class HelpFormatter(click.HelpFormatter):
    def write_text(self, text: str) -> None:
        super().write_text(fit_verbatim(text, self.width - self.current_indent))


class Context(click.Context):
    formatter_class = HelpFormatter


def _listed_commands(group: click.Group) -> dict[str, str]:
    """A group docstring's `\\b` block listing its commands ("name  what it does" per line): the descriptions,
    which then leave the docstring (click lists the commands itself, so they would show twice)."""
    if not group.help:
        return {}
    paragraphs = group.help.split("\n\n")
    for i, para in enumerate(paragraphs):
        lines = para.strip("\n").split("\n")
        if lines[0].strip() != "\b":
            continue
        rows = [re.match(r"^\s*(\S+)\s{2,}(\S.*)$", line) for line in lines[1:] if line.strip()]
        if rows and all(m and m.group(1) in group.commands for m in rows):
            group.help = "\n\n".join(paragraphs[:i] + paragraphs[i + 1:])
            return {m.group(1): m.group(2) for m in rows}
    return {}


def fit_help(group: click.Group, short_help: dict[str, str]) -> None:
    """Give every command (recursively) the wrapping help formatter, and each group's commands one line each in
    its command list: from `short_help` (for `group`), else from a list in the group's docstring, which then
    leaves the docstring (a command's own `short_help` wins)."""

    def visit(cmd: click.Command, lines: dict[str, str]) -> None:
        cmd.context_class = Context
        if isinstance(cmd, click.Group):
            listed = _listed_commands(cmd) | lines
            for name, sub in cmd.commands.items():
                if sub.short_help is None and name in listed:
                    sub.short_help = listed[name]
                visit(sub, {})

    visit(group, short_help)


def _silence_stdout() -> None:
    """The reader is gone: send what is still buffered to /dev/null, so the interpreter's last flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. under a test runner)
        pass


def _flush() -> None:
    """Flush stdout now, so a closed pipe is noticed here rather than at interpreter shutdown."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    except (OSError, ValueError):
        pass


def _stdout_is_devnull() -> bool:
    try:
        out, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISCHR(out.st_mode) and out.st_rdev == null.st_rdev


@contextlib.contextmanager
def quiet_pipe() -> Iterator[None]:
    """A reader that stops reading (`| head`) ends the command with status 0 and no error message."""
    devnull_before = _stdout_is_devnull()
    try:
        yield
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    except SystemExit as e:
        # rich answers a closed pipe by pointing stdout at /dev/null and exiting 1
        if e.code == 1 and not devnull_before and _stdout_is_devnull():
            sys.exit(0)
        _flush()
        raise
    except click.exceptions.Exit:  # --help, --version
        _flush()
        raise
    _flush()


class PipeSafeGroup(click.Group):
    """A group whose commands are listed in the order they were added, and whose output may be cut short by
    its reader without an error (click alone exits 1 on EPIPE, and Python reports a BrokenPipeError)."""

    context_class = Context

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with quiet_pipe():  # the group's own --help and --version print while parsing
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with quiet_pipe():  # the commands, and their --help (printed while their context is made)
            return super().invoke(ctx)
