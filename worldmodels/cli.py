"""What every entry point does around its ``main``: one-line errors, tracebacks to a log, prompt exits.

A missing folder, a corrupt file or a bad ``--set`` value is the user's to fix: it is
reported in one line naming the file or key, with exit status 2. Any other exception (a bug,
a failed reader thread, a failed training step) is reported in one line too, with exit
status 1, and its full traceback goes to ``<data-dir>/logs/<script>.log``. Ctrl-C prints
the same short message wherever it lands, with status 130.

Failed runs that loaded TensorFlow end with ``os._exit`` right after the message: letting the
interpreter shut down normally would destroy ``tf.data`` iterators whose reader threads may be blocked, and
TensorFlow's ``CancelThreads`` then waits for them forever (a stage hung for minutes at 0%
CPU that way). Every finished file was written atomically, so skipping Python's clean-up
loses nothing. A watchdog covers the case where a reader thread failed and the main thread
never gets to report it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from config import ConfigError
from worldmodels import storage
from worldmodels.storage import CorruptFileError, MissingDataError

USER_ERRORS = (ConfigError, CorruptFileError, MissingDataError)
INTERRUPTED = "interrupted: everything completed so far is saved; rerun the same command to continue"
# Seconds a stage may live after one of its reader threads failed; it normally exits at once.
WATCHDOG_SECONDS = 20.0
# Longest one-line message; the rest is in the log.
MAX_MESSAGE = 400


def log_path(argv: Sequence[str] | None, script: str | None = None) -> Path:
    """Where the traceback of a failed run goes: ``<data-dir>/logs/<script>.log``.

    ``--data-dir`` is read from ``argv`` (default ``$WORLDMODELS_DATA`` or ``data``) without
    the script's own parser, which may be the thing that failed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    data_dir = os.environ.get("WORLDMODELS_DATA", "data")
    for i, item in enumerate(argv):
        if item == "--data-dir" and i + 1 < len(argv):
            data_dir = argv[i + 1]
        elif item.startswith("--data-dir="):
            data_dir = item.split("=", 1)[1]
    # ``python -c`` has argv[0] "-c"; a log named "-c.log" would read as an option.
    return Path(data_dir) / "logs" / f"{script or Path(sys.argv[0]).stem.lstrip('-') or 'worldmodels'}.log"


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` plus the exception's notes (say, the training step), capped in length."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if isinstance(exc, USER_ERRORS):
        text = lines[0] if lines else type(exc).__name__
    notes = []
    for error in _chain(exc):
        notes += [note for note in getattr(error, "__notes__", ()) if note and note not in notes]
    if notes:
        text = f"{'; '.join(notes)}: {text}"
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, even suppressed ones, newest first."""
    chain: list[BaseException] = []
    error: BaseException | None = exc
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def write_log(path: Path, exc: BaseException) -> Path | None:
    """Write the full traceback of ``exc`` (with suppressed contexts too) to ``path``; ``None`` if it cannot."""
    parts = ["".join(traceback.format_exception(type(e), e, e.__traceback__, chain=False)) for e in _chain(exc)]
    text = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n"
            + "\nwhile handling, or caused by:\n".join(reversed(parts)))
    try:
        return storage.atomic_write_text(path, text)
    except OSError:
        return None


def exit_now(status: int, message: str | None = None) -> None:
    """Print ``message`` to stderr and end the process: at once (``os._exit``) once TensorFlow is loaded.

    Without TensorFlow there is no iterator to hang on, and a normal exit lets
    ``multiprocessing`` remove its pools' semaphores (``os._exit`` would leave them to its
    resource tracker, which warns about them on the screen).
    """
    if message:
        print(message, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if "tensorflow" not in sys.modules and threading.current_thread() is threading.main_thread():
        sys.exit(status)
    os._exit(status)


_watchdog_started = threading.Lock()


def _arm_watchdog(message: str) -> None:
    """On the first reader failure, make sure the process ends within ``WATCHDOG_SECONDS``."""
    if not _watchdog_started.acquire(blocking=False):
        return

    def watch():
        time.sleep(WATCHDOG_SECONDS)
        exit_now(1, f"error: {message} (the stage did not stop by itself {WATCHDOG_SECONDS:.0f} s after "
                    "this reader failure; ended it)")

    threading.Thread(target=watch, name="worldmodels-watchdog", daemon=True).start()


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` and exit with its status; every failure exits promptly with a one-line message."""
    if _arm_watchdog not in storage.READER_FAILURE_HOOKS:
        storage.READER_FAILURE_HOOKS.append(_arm_watchdog)
    try:
        status = main(argv)
    except SystemExit:
        raise  # argparse's --help and usage errors have already said everything
    except KeyboardInterrupt:
        exit_now(130, "\n" + INTERRUPTED)
    except BrokenPipeError:
        exit_now(141)  # the reader of our output went away (``| head``): nothing to report
    except BaseException as exc:  # noqa: BLE001 - every failure gets the same short report
        error = _reader_error(exc) or exc
        if error is not exc:
            error.__context__ = exc  # keeps the notes (the training step) and the traceback for the log
        if isinstance(error, USER_ERRORS):
            exit_now(2, f"error: {one_line(error)}")
        log = write_log(log_path(argv), error)
        exit_now(1, f"error: {one_line(error)}" + (f" (traceback in {log})" if log else ""))
    sys.exit(status or 0)


def _reader_error(exc: BaseException) -> Exception | None:
    """The storage error naming a file that a TensorFlow error carries, if TensorFlow is loaded at all."""
    if "tensorflow" not in sys.modules:
        return None
    from worldmodels.datasets import reader_error

    return reader_error(exc)
