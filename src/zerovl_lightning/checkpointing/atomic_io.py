"""Atomic checkpoint writes: temp file in the same folder, fsync, rename, fsync the folder; disk-space checks."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from zerovl_lightning.errors import DiskError

CKPT_SUFFIX = ".ckpt"
TMP_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: without this a power loss can forget the new directory entry."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows, some network filesystems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_local(path: _PATH) -> bool:
    s = str(path)
    return "://" not in s or s.startswith("file://")


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` that never leaves a partial file at ``path`` (temp file, fsync, rename, dir fsync)."""
    target = Path(str(path).removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and not ending in .ckpt: neither Lightning's "last" lookup nor ours takes it for a checkpoint.
    tmp = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except (OSError, RuntimeError) as e:
        disk = _disk_problem(e, target.parent)
        if disk is None:
            raise
        kept = " the previous checkpoint is kept;" if target.exists() else ""
        raise DiskError(
            f"{target}: checkpoint not written, {disk};{kept} free space or point callbacks.*.dirpath "
            "(paths.output_dir) at another disk"
        ) from e
    _fsync_dir(target.parent)


def _disk_problem(exc: BaseException, folder: Path) -> str | None:
    """Say plainly when a failed write was the disk's fault (torch reports ENOSPC as "file write failed")."""
    import errno
    import shutil

    errnos, cur, torch_writer = set(), exc, False
    for _ in range(8):  # torch's writer raises RuntimeError("[enforce fail at inline_container.cc…") from ENOSPC
        if cur is None:
            break
        errnos.add(getattr(cur, "errno", None))
        torch_writer |= isinstance(cur, RuntimeError) and any(
            w in str(cur) for w in ("inline_container", "PytorchStreamWriter", "write failed")
        )
        cur = cur.__cause__ or cur.__context__
    if errno.EROFS in errnos:
        return f"{folder} is on a read-only file system"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if errnos & {errno.ENOSPC, errno.EDQUOT} or (torch_writer and free is not None and free < 64 * 2**20):
        return "the disk is full" + (f" ({free / 2**20:.1f} MiB free on {folder})" if free is not None else "")
    return None


def checkpoint_size_estimate(module: torch.nn.Module) -> int:
    """Bytes of a training checkpoint of ``module``: weights plus two optimizer moments (AdamW)."""
    return 3 * sum(p.numel() * p.element_size() for p in module.parameters())


def warn_if_low_disk_space(folder: _PATH, needed: int) -> bool:
    """Warn (once, before the first save) when ``folder`` has less than ``needed`` bytes free."""
    import shutil

    d = Path(folder)
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return False
    if free >= needed:
        return False
    rank_zero_warn(
        f"Only {free / 2**20:.1f} MiB free for checkpoints in {folder}; a checkpoint needs about "
        f"{needed / 2**20:.1f} MiB (written next to the previous one): free space or set callbacks.*.dirpath"
    )
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe local writes (remote URLs keep Lightning's way).

    Lightning's own save goes through an fsspec transaction (write + move) but never fsyncs, so after a node
    crash the renamed file can be empty or short. Pass it as ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            atomic_torch_save(checkpoint, path)
