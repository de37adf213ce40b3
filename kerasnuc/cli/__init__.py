"""The ``kerasnuc`` command line: a click group with one thin module per command.

Command modules import TensorFlow inside their command bodies, so ``kerasnuc --help`` and
``kerasnuc --version`` stay instant.
"""

from __future__ import annotations

import sys
import traceback

import click

from kerasnuc import __version__
from kerasnuc.cli.common import VERBOSE_KEY
from kerasnuc.cli.terminal import quiet_process, wants_verbose
from kerasnuc.fileutil import KerasnucError


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


class KerasnucGroup(click.Group):
    """The ``kerasnuc`` group: one line per problem, and the terminal kept ours.

    * :class:`KerasnucError` becomes a one-line error (exit code 1); any other exception too,
      saying that it is unexpected. ``-v`` / ``--verbose`` on a command also prints the
      traceback (and lets an unexpected exception through as Python would show it).
    * Run as a process (``kerasnuc``, ``python -m kerasnuc``), TensorFlow's C++ log lines are
      filtered from the terminal unless ``--verbose`` is given (:mod:`kerasnuc.cli.terminal`).
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = sys.argv[1:] if args is None else list(args)
        with quiet_process(wants_verbose(argv)):
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KerasnucError as exc:
            if ctx.meta.get(VERBOSE_KEY):
                traceback.print_exc(file=sys.stderr)
            raise click.ClickException(str(exc)) from exc
        except Exception as exc:
            if ctx.meta.get(VERBOSE_KEY):
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --verbose for "
                "the traceback)"
            ) from exc


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
