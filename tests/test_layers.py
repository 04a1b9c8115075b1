"""The layers (issue 18, item 7): import-linter's contracts in pyproject.toml hold, a planted violation breaks them,
and the commands that must start fast (`sslrecipe advise`, the TUI) import no torch.

The linter walks a package's folder, and tui/ is installed as `sslrecipe.tui` (pyproject's package-dir), outside
sslrecipe/: so the contracts run on a copy laid out as installed, or the TUI would be silently left out."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def _installed_layout(dest: Path) -> Path:
    """`dest/sslrecipe/...` with every package where pyproject's package-dir installs it, plus pyproject.toml."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items(), key=lambda kv: kv[0].count(".")):  # parents first
        shutil.copytree(REPO / folder, dest.joinpath(*package.split(".")), ignore=_IGNORE, dirs_exist_ok=True)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # ahead of the editable install's mapping
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_import_contracts_hold(tmp_path):
    res = _lint(_installed_layout(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("sslrecipe/tui/runs.py", "import torch", "stay free of torch"),
    ("sslrecipe/guide/advisor.py", "from sslrecipe.engine import loop", "stay free of torch"),
    ("sslrecipe/data/images.py", "from sslrecipe.cli import main", "never imports the CLI or the TUI"),
    ("sslrecipe/report/compare.py", "import sslrecipe.tui.app", "never imports the CLI or the TUI"),
    ("sslrecipe/ssl/views.py", "from sslrecipe.engine import pipeline", "engine sits above"),
])
def test_a_planted_violation_breaks_the_contracts(tmp_path, module, line, contract):
    root = _installed_layout(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # planted\n")
    res = _lint(root)
    assert res.returncode == 1, res.stdout + res.stderr
    broken = res.stdout.split("Broken contracts", 1)[1]
    assert contract in " ".join(broken.split()), res.stdout  # the report wraps long names


def test_advise_and_the_tui_start_without_torch():
    """What the linter cannot see: a package's __init__ runs when any of its modules is imported."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from sslrecipe.cli import main\n"
        "res = CliRunner().invoke(main, ['advise', '--backbone', 'resnet', '--shots', '25'])\n"
        "assert res.exit_code == 0, res.output\n"
        "import sslrecipe.tui.app, sslrecipe.tui.runs, sslrecipe.engine.rundir, sslrecipe.engine.events\n"
        "from sslrecipe.recipe import load_recipe\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
