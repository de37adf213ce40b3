"""Per-nucleus measurement tables as CSV, written atomically, tile by tile for slides.

One header line, then one row per nucleus with the columns of a
:class:`~kerasnuc.postprocess.measure.NucleusTable` in order (``id``, ``class``, ``class_name``,
``centroid_x_px``, ..., see :mod:`kerasnuc.postprocess.measure` for the definitions), followed by
one ``prob_<class name>`` column per probability column (``prob_background`` first) when the
table has probabilities. Written with the standard :mod:`csv` module (comma separated, quoted
when needed, ``\\n`` line ends, UTF-8). Integers are written as integers, floats rounded to
``decimals`` places (shortest representation, e.g. ``12.5``), missing or non-finite values as
empty cells. The module is named ``table`` so that it does not shadow the standard ``csv``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from kerasnuc.fileutil import atomic_path
from kerasnuc.postprocess.measure import NucleusTable

logger = logging.getLogger(__name__)


def _column_values(values: np.ndarray, decimals: int) -> list[Any]:
    values = np.asarray(values)
    if values.dtype.kind in "iub":
        return values.astype(np.int64).tolist()
    if values.dtype.kind == "f":
        out = np.round(values.astype(np.float64), decimals).astype(object)
        out[~np.isfinite(values)] = ""
        return out.tolist()
    return ["" if v is None else str(v) for v in values.tolist()]


class CSVWriter:
    """Streaming CSV writer: rows go to a temporary file, renamed onto ``path`` at the end.

    The header is the column list of the first table added (or ``columns``); every later table
    must have the same columns. Leaving the ``with`` block normally renames the file into place
    (a run without any table and without ``columns`` leaves an empty file); an exception deletes
    it. Usage::

        with CSVWriter("slide.csv") as writer:
            for tile in tiles:
                writer.add(measure_instances(tile.instances, ..., offset=tile.offset))

    Args:
        path: output ``.csv`` file.
        columns: header to write up front (e.g. when the first tile may be empty and its table
            unknown); None: the first table's columns.
        decimals: decimal places of float values.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        columns: Sequence[str] | None = None,
        decimals: int = 6,
    ) -> None:
        if int(decimals) != decimals or decimals < 0:
            raise ValueError(f"`decimals` must be an int >= 0. Received: decimals={decimals}")
        self.path = Path(path)
        self.columns = None if columns is None else [str(c) for c in columns]
        self.decimals = int(decimals)
        self.count = 0
        self._stack: contextlib.ExitStack | None = None
        self._file: IO[str] | None = None
        self._writer: Any = None

    def __enter__(self) -> CSVWriter:
        if self._stack is not None:
            raise RuntimeError("CSVWriter is already open")
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path))
            self._file = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._writer = csv.writer(self._file, lineterminator="\n")
        if self.columns is not None:
            self._writer.writerow(self.columns)
        return self

    def add(self, table: NucleusTable) -> int:
        """Append the rows of one table. Returns the number of rows written.

        Raises:
            ValueError: the table's columns differ from the header.
        """
        if self._writer is None:
            raise RuntimeError("Use CSVWriter inside a `with` block")
        flat = table.flat_columns()
        names = list(flat)
        if self.columns is None:
            self.columns = names
            self._writer.writerow(names)
        elif names != self.columns:
            raise ValueError(
                f"All tables written to {self.path} must have the columns {self.columns}. "
                f"Received: {names}"
            )
        lists = [_column_values(flat[name], self.decimals) for name in names]
        self._writer.writerows(zip(*lists, strict=True))
        self.count += len(table)
        return len(table)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._file = self._writer = None
        if stack is None:
            return
        if exc_type is None:
            logger.info("wrote %d nuclei to %s", self.count, self.path)
        stack.__exit__(exc_type, exc, tb)


def write_csv(path: str | os.PathLike, table: NucleusTable, decimals: int = 6) -> int:
    """Write one measurement table as CSV, atomically. Returns the number of rows."""
    with CSVWriter(path, decimals=decimals) as writer:
        writer.add(table)
    return writer.count
