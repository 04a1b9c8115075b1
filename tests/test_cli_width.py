"""The command line in an 80-column terminal: help, the advisor and the catalogue fit; `--help` lists each command
once; a reader that closes the pipe early (`| head -2`) is not an error."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from sslrecipe.cli import main


def _commands(cmd: click.Command, path: list[str]):
    yield path
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, path + [name])


ALL = list(_commands(main, []))


def run_at(width: int, *args: str) -> str:
    res = CliRunner().invoke(main, list(args), env={"COLUMNS": str(width)}, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def too_wide(text: str, width: int) -> list[str]:
    return [line for line in text.splitlines() if len(line) > width]


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "sslrecipe")
def test_every_help_fits_80_columns(path):
    assert too_wide(run_at(80, *path, "--help"), 80) == []


def _cli(width: int, *args: str) -> str:
    """The real command in a terminal this wide (click's test runner forces help to 80 columns)."""
    proc = subprocess.run([sys.executable, "-m", "sslrecipe", *args], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": str(width)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_wraps_to_the_terminal():
    narrow, wide = _cli(80, "weights", "--help"), _cli(120, "weights", "--help")
    assert too_wide(narrow, 80) == [] and too_wide(wide, 120) == []
    assert too_wide(wide, 80) != []  # a wider terminal is used
    assert len(wide.splitlines()) < len(narrow.splitlines())


def test_top_level_help_lists_each_command_once():
    out = run_at(80, "--help")
    for name in main.commands:
        listed = [line for line in out.splitlines() if line.split()[:1] == [name]]
        assert len(listed) == 1, (name, out)
    weights = run_at(80, "weights", "--help")
    assert sum(1 for line in weights.splitlines() if line.split()[:1] == ["fetch"]) == 1


@pytest.mark.parametrize("args", [
    ("advise",),
    ("advise", "--domain", "ir", "--object-size", "small"),
    ("advise", "--shots", "25", "--custom-pretrain", "required", "--verbose"),
    ("advise", "--backbone", "vit", "--shots", "25", "--domain", "thermal", "--top", "5", "--verbose"),
    ("weights", "list"),
])
def test_output_fits_80_columns(args):
    out = run_at(80, *args)
    assert out.strip() and too_wide(out, 80) == []


def test_weights_list_shows_the_source_only_where_it_fits():
    narrow, wide = run_at(80, "weights", "list"), run_at(170, "weights", "list")
    assert "dl.fbaipublicfiles.com" not in narrow and "dl.fbaipublicfiles.com" in wide
    assert "resim-fpn-resnet50-400ep" in narrow and "CC-BY-NC-4.0*" in narrow


@pytest.mark.parametrize("args", [["advise", "--verbose"], ["--help"], ["advise", "--help"], ["weights", "list"]])
def test_a_closed_pipe_ends_the_command_quietly_with_status_0(args):
    """`sslrecipe advise | head -2`: the reader has gone before (or while) the command writes."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE, as after `head` has read its lines
    try:
        proc = subprocess.run([sys.executable, "-m", "sslrecipe", *args], stdout=write, stderr=subprocess.PIPE,
                              check=False, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "80"}, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr.decode() == ""


def test_head_2_of_the_advisor_exits_0():
    shell = f"{sys.executable} -m sslrecipe advise --verbose | head -2; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "80"})
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 2
