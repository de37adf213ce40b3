"""Stage 0 of the predict job: which files are inputs, and the output folder name of each.

Folders contribute their image and slide files (:data:`INPUT_SUFFIXES`, hidden files ignored),
sorted; ``<name>`` is the file name without its extension (``.ome.tif`` counts as one) and
without leading dots (no hidden output folders). When several inputs of one run share a stem
(ignoring case, as the file systems of macOS and Windows do), each of them gets its extension
appended (``a_png``, ``a_tif``), and a name still taken (ignoring case) by an earlier input gets
a counter (``a_png_2``, ``a_png_3``) in input order; so the names depend only on the list of
inputs, and no two inputs of a run share a folder. Which input produced a folder is recorded in
its summary (``predict --resume`` checks it, see :mod:`kerasnuc.inference.job`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from kerasnuc.io.readers import IMAGE_SUFFIXES, OPENSLIDE_SUFFIXES, TIFF_SUFFIXES

INPUT_SUFFIXES = IMAGE_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES
"""File extensions collected from input folders."""


def _is_input_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(INPUT_SUFFIXES + (".ome.tif", ".ome.tiff"))


def find_inputs(
    paths: Iterable[str | os.PathLike],
    recursive: bool = False,
    exclude: str | os.PathLike | None = None,
) -> list[Path]:
    """The input files named by files and folders, in argument order, without duplicates.

    Folders contribute their image files (extensions :data:`INPUT_SUFFIXES`, hidden files
    ignored), sorted by path, from sub-folders too when ``recursive``. Files are taken as
    given whatever their extension (an unsupported one fails when read), as are paths that do
    not exist (they fail as "file not found", so that they appear in the report).

    Args:
        paths: files and folders.
        recursive: also search sub-folders.
        exclude: a folder whose contents are never collected (the output folder).
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    out: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(path)

    for value in paths:
        path = Path(value)
        if not path.is_dir():
            add(path)
            continue
        found = path.rglob("*") if recursive else path.iterdir()
        for child in sorted(found):
            if not child.is_file() or not _is_input_file(child):
                continue
            if skip is not None and skip in child.resolve().parents:
                continue
            if recursive and any(p.startswith(".") for p in child.relative_to(path).parts):
                continue
            add(child)
    return out


def input_stem(path: Path) -> str:
    """The file name without its extension (``.ome.tif`` and ``.ome.tiff`` count as one)."""
    name = path.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def output_names(paths: Sequence[Path]) -> list[str]:
    """Output folder name of each input: its stem, made unique (see the module docstring)."""
    stems = [input_stem(p).lstrip(".") or "image" for p in paths]
    folded = [s.casefold() for s in stems]
    names = [
        f"{s}_{p.suffix.lstrip('.').lower()}" if folded.count(f) > 1 and p.suffix else s
        for s, f, p in zip(stems, folded, paths, strict=True)
    ]
    out: list[str] = []
    taken: set[str] = set()
    for name in names:
        unique, k = name, 1
        while unique.casefold() in taken:
            k += 1
            unique = f"{name}_{k}"
        out.append(unique)
        taken.add(unique.casefold())
    return out
