"""`sslrecipe run` and `sslrecipe validate`."""

from __future__ import annotations

import click

from sslrecipe.recipe import load_recipe, recipe_to_yaml

_SET_HELP = "Override a recipe key, value parsed as YAML (repeatable): --set finetune.epochs=2"


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--print", "print_", is_flag=True, help="Print the fully resolved recipe as YAML.")
def validate(recipe: str, overrides: tuple[str, ...], print_: bool) -> None:
    """Check a recipe (types, unknown keys, extends, overrides) without running it."""
    resolved = load_recipe(recipe, overrides)
    if print_:
        click.echo(recipe_to_yaml(resolved), nl=False)
    else:
        click.echo(f"{recipe}: valid")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
def run(recipe: str) -> None:
    """Run a recipe (being built)."""
    load_recipe(recipe)
