"""The folder a training run writes: where a new run trains, what ``--resume`` continues,
and what a failed or replaced run leaves behind.

A new run trains in ``RUN_DIR`` when it is absent or empty; ``--overwrite`` trains the
replacement in the hidden sibling :func:`~kerasnuc.runs.pending_run_dir` and moves it onto
``RUN_DIR`` only when it has finished, so the old run survives an interrupted replacement.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from kerasnuc.fileutil import KerasnucError, replace_dir
from kerasnuc.runs import CHECKPOINT_DIR, RUN_CONFIG, RUN_ENTRIES, pending_run_dir
from kerasnuc.training.checkpoint import has_checkpoint

logger = logging.getLogger(__name__)


def resume_dir(run_dir: str | os.PathLike) -> Path:
    """The folder ``train --resume --out RUN_DIR`` continues: an unfinished replacement of the
    run (:func:`~kerasnuc.runs.pending_run_dir`, ``train --overwrite`` interrupted) if there
    is one, else ``RUN_DIR`` itself.

    Raises:
        KerasnucError: neither holds a training checkpoint.
    """
    run_dir = Path(run_dir)
    pending = pending_run_dir(run_dir)
    if has_checkpoint(pending / CHECKPOINT_DIR) and (pending / RUN_CONFIG).is_file():
        return pending
    if has_checkpoint(run_dir / CHECKPOINT_DIR) and (run_dir / RUN_CONFIG).is_file():
        return run_dir
    if not run_dir.exists():
        raise KerasnucError(f"{run_dir}: no run to resume (no such folder)")
    raise KerasnucError(
        f"{run_dir}: no run to resume (no training checkpoint: no epoch of it has finished)"
    )


def prepare_run_dir(run_dir: str | os.PathLike, overwrite: bool) -> tuple[Path, bool]:
    """The folder a new run trains in, created and checked writable; nothing is deleted.

    ``RUN_DIR`` itself when it is absent or empty; with ``overwrite``, a run folder's
    replacement trains in :func:`~kerasnuc.runs.pending_run_dir` (an earlier unfinished
    replacement there is started over) and :func:`finish_run_dir` moves it onto ``RUN_DIR``
    at the end.

    Returns:
        ``(folder, created)``: ``created`` tells whether this call made the folder.

    Raises:
        KerasnucError: ``RUN_DIR`` holds files without ``overwrite``, holds files that are not
            part of a run (``overwrite`` would delete them), a replacement is pending without
            ``overwrite``, or the folder cannot be written.
    """
    run_dir = Path(run_dir)
    pending = pending_run_dir(run_dir)
    if pending.exists() and not overwrite:
        raise KerasnucError(
            f"{run_dir}: an unfinished --overwrite run of it is in {pending} (use --resume to "
            "continue it or --overwrite to start again)"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise KerasnucError(f"{run_dir}: exists and is not a folder")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    folder = run_dir
    if entries:
        if not overwrite:
            raise KerasnucError(
                f"{run_dir}: already exists (use --resume to continue it or --overwrite)"
            )
        foreign = [name for name in entries if name not in RUN_ENTRIES]
        if foreign:
            raise KerasnucError(
                f"{run_dir}: holds files that are not part of a training run "
                f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); --overwrite "
                "replaces the whole folder, so move them or choose another --out"
            )
        folder = pending
        shutil.rmtree(pending, ignore_errors=True)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise KerasnucError(f"{folder}: cannot write the run folder ({exc.strerror})") from exc
    return folder, created


def finish_run_dir(folder: Path, run_dir: Path) -> None:
    """Move a finished replacement run (``folder`` = its pending folder) onto ``run_dir``."""
    if folder != run_dir:
        replace_dir(folder, run_dir)
        logger.info("%s: replaced by the new run", run_dir)


def discard_unstarted_run(folder: Path, run_dir: Path, created: bool) -> None:
    """After a failed new run: delete what it wrote unless an epoch finished (then it resumes).

    ``folder`` was empty or absent when the run started, so everything in it is the run's own.
    """
    if has_checkpoint(folder / CHECKPOINT_DIR):
        if folder != run_dir:
            logger.warning(
                "%s is unchanged; the new run so far is in %s (train --resume --out %s "
                "continues it)",
                run_dir,
                folder,
                run_dir,
            )
        return
    if created:
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
