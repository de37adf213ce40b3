"""The ``kerasnuc`` command line: a click group with one thin module per command.

Command modules import TensorFlow inside their command bodies, so ``kerasnuc --help`` and
``kerasnuc --version`` stay instant.
"""

from __future__ import annotations

import click

from kerasnuc.fileutil import KerasnucError
from kerasnuc.version import __version__


class KerasnucGroup(click.Group):
    """A click group that turns :class:`KerasnucError` into a one-line error (exit code 1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KerasnucError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=KerasnucGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kerasnuc")
def main() -> None:
    """kerasnuc: find, outline, classify and measure cell nuclei in histopathology images."""


def _register() -> None:
    from kerasnuc.cli import data

    main.add_command(data.data)
    from kerasnuc.cli import evaluate

    main.add_command(evaluate.evaluate)
    from kerasnuc.cli import export

    main.add_command(export.export)
    from kerasnuc.cli import models

    main.add_command(models.models)
    from kerasnuc.cli import predict

    main.add_command(predict.predict)
    from kerasnuc.cli import train, tune

    main.add_command(train.train)
    main.add_command(tune.tune)


_register()
