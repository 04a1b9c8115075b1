"""The installed layout: every package directory is declared, docs/recipe.md matches the schema, CLI help."""

import tomllib
from pathlib import Path

from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.recipe.docs import schema_markdown

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_declared_in_pyproject():
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "sslrecipe").rglob("__init__.py")}
    found |= {"sslrecipe.tui" + "".join("." + x for x in p.parent.relative_to(REPO / "tui").parts) for p in (REPO / "tui").rglob("__init__.py")}
    assert found <= declared, f"add to [tool.setuptools] packages: {sorted(found - declared)}"


def test_recipe_reference_is_generated_from_the_schema():
    assert (REPO / "docs" / "recipe.md").read_text().strip() == schema_markdown().strip(), (
        "docs/recipe.md is stale: python -m sslrecipe.recipe.docs > docs/recipe.md"
    )


def test_help_lists_every_command_group():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for command in ("run", "validate", "advise", "data", "weights", "eval", "tui"):
        assert f"  {command} " in res.output


def test_readme_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    blocks = [b.split("```")[0].strip() for b in text.split("```bash")[1:3]]
    assert "sslrecipe run recipes/quickstart.yaml" in blocks[0] and "pip install" in blocks[0]
    assert "[test]" in blocks[1] and "pytest" in blocks[1]
