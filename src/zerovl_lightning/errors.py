"""Known errors end a command with one clear line and a non-zero exit, not two Hydra tracebacks.

A *known* error is one whose message already says which file or key is wrong and what to do: a bad config
(:class:`~zerovl_lightning.config_checks.ConfigError`), an unusable checkpoint
(:class:`~zerovl_lightning.checkpointing.CheckpointError`), data that contradicts its ``stats.json``
(:class:`DataError`), a full or read-only disk (:class:`DiskError`, or an ``OSError`` with ``ENOSPC`` /
``EDQUOT`` / ``EROFS``), a diverged run (:class:`~zerovl_lightning.guards.NonFiniteError`). Anything else is a
bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows the full traceback for known errors too; inside a
Hydra multirun the error is re-raised so the sweep records the failed job and goes on.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class DataError(ValueError):
    """Training data that cannot be used as described (e.g. ``stats.json`` contradicts the shards)."""


class DiskError(OSError):
    """A write failed because the disk is full or read-only; the message names the file and what was kept."""


def known_error_message(exc: BaseException) -> str | None:
    """The one line to print for a known error, or None for anything else (a bug: keep the traceback)."""
    from zerovl_lightning.checkpointing import CheckpointError
    from zerovl_lightning.config_checks import ConfigError
    from zerovl_lightning.guards import NonFiniteError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:  # Lightning / Hydra may wrap ours
        seen.add(id(cur))
        if isinstance(cur, (ConfigError, CheckpointError, DataError, DiskError, NonFiniteError)):
            return f"{type(cur).__name__}: {cur}"
        if isinstance(cur, OSError) and cur.errno in _DISK_ERRNOS:
            where = f" ({cur.filename})" if cur.filename else ""
            return f"DiskError: {os.strerror(cur.errno)}{where}: free space or write elsewhere"
        cur = cur.__cause__ or cur.__context__
    return None


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - not inside a Hydra app
        return False


def exit_on_known_errors(fn: F) -> F:
    """Decorator for a command's entry function: known errors → ``error: <message>`` on stderr, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            message = known_error_message(e)
            if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_multirun():
                raise
            log.debug("known error", exc_info=True)  # the run's log file keeps the traceback
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
