"""Keep the terminal output of the ``kerasnuc`` process its own: TensorFlow's C++ lines filtered.

TensorFlow and XLA write log lines from C++ straight to file descriptor 2, some of them before
absl logging is initialised, which ``TF_CPP_MIN_LOG_LEVEL`` does not silence
(``WARNING: All log messages before absl::InitializeLog() is called are written to STDERR``,
``cudart_stub.cc ... Could not find cuda drivers``, ``failed call to cuInit``, the oneDNN and
CPU-instruction notices). Users read them as failures. Without ``--verbose`` the command line
therefore (:func:`quiet_process`):

* sets ``TF_CPP_MIN_LOG_LEVEL=2`` (unless the user set it) before TensorFlow is imported, and
  raises the Python loggers of TensorFlow and absl to ERROR and ignores Python warnings of the
  libraries (kerasnuc itself reports through ``logging`` and one-line errors);
* points file descriptor 2 at a pipe read by a small forked filter process that drops the lines
  of the C++ log format (``I0000 00:00:... file.cc:31] ...``, also ``W`` and ``E``; fatal ``F``
  lines pass) and the few known continuation lines, and forwards everything else unchanged.
  Python's own ``sys.stderr`` (our messages, progress bars, tracebacks) is re-pointed at the
  original stderr, so it never goes through the filter. The filter is a process, not a thread:
  when the command dies in C++ (``abort``) it still forwards what was written before, and stops
  at the end of the pipe.

With ``-v`` / ``--verbose`` nothing is filtered and TensorFlow logs as it likes. The filter is
installed only for a real process (``kerasnuc`` or ``python -m kerasnuc``): not under click's
``CliRunner`` or pytest (which replace ``sys.stderr``), not once TensorFlow is loaded, not where
``os.fork`` is missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence

#: Lines of TensorFlow's / absl's C++ logging that the filter drops (not ``F``: fatal).
NOISE = re.compile(
    rb"^(?:"
    rb"[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./\-]+:\d+\] "  # absl / glog format
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] [\w./\-]+:\d+\] "  # older TF format
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|To enable the following instructions: .* in other operations, rebuild TensorFlow with "
    rb"the appropriate compiler flags\."
    rb")"
)

_QUIET_LOGGERS = ("tensorflow", "absl", "h5py", "jax")


def is_noise(line: bytes) -> bool:
    """Whether one line written to file descriptor 2 is TensorFlow's C++ logging."""
    return NOISE.match(line.lstrip(b"\r")) is not None


def wants_verbose(args: Sequence[str]) -> bool:
    """Whether the command line asks for ``-v`` / ``--verbose`` (options end at ``--``)."""
    for arg in args:
        if arg == "--":
            return False
        if arg in ("-v", "--verbose"):
            return True
    return False


def _filter_loop(read_fd: int, write_fd: int) -> None:
    """Copy ``read_fd`` to ``write_fd`` line by line, without the noise, until end of file."""
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not is_noise(line))
        _write_all(write_fd, out)
    if pending and not is_noise(pending):
        _write_all(write_fd, pending)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except InterruptedError:
            continue
        except OSError:
            return


def _filter_can_run() -> bool:
    return (
        hasattr(os, "fork")
        and sys.stderr is sys.__stderr__
        and sys.stderr is not None
        and "tensorflow" not in sys.modules
        and threading.active_count() == 1
    )


@contextlib.contextmanager
def _native_stderr_filter() -> Iterator[None]:
    """File descriptor 2 through the noise filter process; ``sys.stderr`` bypasses it."""
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read_fd, write_fd = os.pipe()
    except (OSError, ValueError):  # no usable fd 2 (closed, redirected oddly)
        yield
        return
    pid = os.fork()
    if pid == 0:  # the filter: survives its parent's crash, ends at the end of the pipe
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: forward to the very end
            for fd in (write_fd, 0, 1):  # hold neither the pipe's write end nor stdin/stdout
                with contextlib.suppress(OSError):
                    os.close(fd)
            _filter_loop(read_fd, original)
        finally:
            os._exit(0)
    os.close(read_fd)
    old_stderr = sys.stderr
    own = open(  # noqa: SIM115 (left open: logging handlers made meanwhile may hold it)
        os.dup(original),
        "w",
        buffering=1,
        encoding=old_stderr.encoding,
        errors=old_stderr.errors or "backslashreplace",
    )
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = own
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            own.flush()
        os.dup2(original, 2)  # the pipe's last writer is gone: the filter reads its end
        os.close(original)
        sys.stderr = old_stderr
        deadline = time.monotonic() + 5.0  # a child process may still hold the pipe open
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.01)


@contextlib.contextmanager
def quiet_process(verbose: bool) -> Iterator[None]:
    """The terminal policy of one ``kerasnuc`` process (see the module docstring).

    Args:
        verbose: ``--verbose`` was given: leave TensorFlow's logs and Python warnings alone.
    """
    if verbose or not _filter_can_run():
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _native_stderr_filter():
            yield
