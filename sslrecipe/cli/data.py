"""`sslrecipe data`: the group; its commands live in data_synth.py (generator) and data_tools.py (convert/check/stats)."""

import click


@click.group()
def data() -> None:
    """Synthetic IR data, dataset conversion, checks and statistics."""


def _register() -> None:
    from sslrecipe.cli import data_synth, data_tools

    data.add_command(data_synth.synth)
    for command in data_tools.COMMANDS:
        data.add_command(command)


_register()
