"""What every numbered script does around its ``main``: clear errors instead of tracebacks.

A missing folder, a corrupt file or a bad ``--set`` value is the user's to fix, so it is
reported in one line naming the file or key, with exit status 2. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from config import ConfigError
from worldmodels.storage import CorruptFileError, MissingDataError

USER_ERRORS = (ConfigError, CorruptFileError, MissingDataError)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` and exit with its status; user errors exit 2 with a one-line message."""
    try:
        status = main(argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: everything completed so far is saved; rerun the same command to continue",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
