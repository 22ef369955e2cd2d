"""Errors a user can fix. `train.py`/`eval.py` print their message and exit with status 2
instead of a traceback: the message itself names the problem and the fix."""

from __future__ import annotations

import contextlib
import logging
import sys

log = logging.getLogger(__name__)


class UserError(Exception):
    """Bad input (config, data, checkpoint): reported as a one-paragraph message, no traceback."""


class ConfigError(UserError):
    """An unknown model/data name or an option the model builder rejects."""


class DataError(UserError):
    """The data root is missing, empty, or not in a layout we read."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable (corrupt/truncated) or of another architecture."""


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss; the last good checkpoint is left untouched."""


EXIT_USER_ERROR = 2


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a `UserError` into `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        print(f"\nerror: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
