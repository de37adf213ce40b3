"""Shared click option factories and helpers for the command modules."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from kerasnuc.checks import MPP_RANGE, is_plausible_mpp
from kerasnuc.fileutil import KerasnucError


class PixelSize(click.ParamType):
    """A pixel size in um/px within :data:`kerasnuc.checks.MPP_RANGE` (a typo such as 1000 or
    1e-9 is a usage error, not minutes of work or an out-of-memory error)."""

    name = "um/px"

    def convert(self, value, param, ctx):
        try:
            mpp = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number (um/px)", param, ctx)
        if not is_plausible_mpp(mpp):
            low, high = MPP_RANGE
            self.fail(
                f"{value} um/px is not a plausible pixel size (expected {low:g}..{high:g}; "
                "0.25 at 40x, 0.5 at 20x)",
                param,
                ctx,
            )
        return mpp


MPP = PixelSize()


def dataset_path(value: str) -> Path:
    """Resolve a dataset argument: a folder, or the name of a bundled example dataset."""
    path = Path(value)
    if path.exists():
        return path
    from kerasnuc.examples import example_dataset

    try:
        return example_dataset(value)
    except KeyError:
        raise KerasnucError(f"{value}: no such folder (nor a bundled example dataset)") from None


def check_writable_dir(path: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Fail at once, in one line, when the folder ``path`` cannot be written or created.

    Before minutes of work, and instead of one ``OSError`` per input later. Nothing is left
    behind: a file is created and removed in ``path``, or in its nearest existing parent folder
    when ``path`` does not exist yet (that is what ``mkdir -p`` would need to write).

    Args:
        path: the folder to write in.
        target: what the message names (default ``path``), e.g. the file to be written there.

    Raises:
        KerasnucError: ``path`` is a file, or the folder is read-only / not ours.
    """
    path = Path(path)
    name = path if target is None else Path(target)
    if path.exists() and not path.is_dir():
        raise KerasnucError(f"{name}: {path} exists and is not a folder")
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise KerasnucError(f"{name}: cannot create {path} ({probe} is not a folder)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kerasnuc-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        where = "" if probe == name else f" ({probe} is not writable)"
        raise KerasnucError(f"{name}: cannot write there{where}: {exc.strerror or exc}") from exc


VERBOSE_KEY = "kerasnuc.verbose"
"""``click.Context.meta`` key set by ``--verbose`` (read by the group's error handling)."""


def verbose_option(f=None, *, expose: bool = False, help: str | None = None):
    """``-v`` / ``--verbose``: tracebacks and TensorFlow's own log lines (every command has it).

    Args:
        expose: pass the flag to the command as ``verbose`` too.
        help: the option's help text.
    """

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.meta[VERBOSE_KEY] = True
        return value

    def decorate(func):
        return click.option(
            "-v",
            "--verbose",
            is_flag=True,
            expose_value=expose,
            callback=remember,
            help=help or "Show tracebacks and TensorFlow's own log lines.",
        )(func)

    return decorate(f) if f is not None else decorate


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def format_table(rows: list[dict], columns: list[str], floatfmt: str = "{:.4f}") -> str:
    """Format dict rows as an aligned plain-text table."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    return "\n".join(lines)
