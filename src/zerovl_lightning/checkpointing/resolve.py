"""Which checkpoint to resume: integrity checks (zip CRCs, ``weights_only`` unpickling) and ``ckpt_path`` resolution
by the training step stored in each file, chosen once on global rank 0."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities import rank_zero_warn

from ..world import external_launch_id, is_global_zero, launcher_rank
from .atomic_io import CKPT_SUFFIX, TMP_SUFFIX

log = logging.getLogger(__name__)

_PASS_THROUGH = {"best", "hpc", "registry"}  # ckpt_path values Lightning resolves itself
# Rank 0's choice, for the ranks Lightning's launcher starts from it (they inherit the environment).
RESOLVED_ENV = "ZEROVL_RESOLVED_CKPT_PATH"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message lists what was tried and why it failed."""


def check_archive(path: _PATH) -> Path:
    """Raise :class:`CheckpointError` unless ``path`` is a complete ``torch.save`` zip with intact CRCs."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file; give the path of a .ckpt file (or `last` to resume)")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a checkpoint file")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{p}: cannot stat ({e})") from e
    if size == 0:
        raise CheckpointError(f"{p}: empty file (0 bytes)")
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{p}: not a complete torch zip archive ({size} bytes; truncated, or not a checkpoint?): {e}"
        ) from e
    if bad is not None:
        raise CheckpointError(f"{p}: CRC mismatch in member {bad!r} (corrupt data)")
    return p


def check_checkpoint(path: _PATH) -> dict[str, Any]:
    """Load ``path`` the way a resume will, cheaply; raise :class:`CheckpointError` saying why it is unusable.

    Checks: non-empty; a complete zip (a truncated ``torch.save`` file loses its central directory); every
    member's CRC-32 (bit rot, torn writes; one sequential read of the file); unpickles with
    ``weights_only=True`` (what ``Trainer.fit`` does by default), memory-mapped so tensors are not copied;
    has the keys a resume needs. Returns the loaded dict
    (tensors memory-mapped; drop it when done).
    """
    p = check_archive(path)
    try:
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle makes the file unusable for resume
        raise CheckpointError(f"{p}: torch.load failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    missing = [k for k in ("state_dict", "global_step", "loops") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{p}: not a Lightning training checkpoint (missing {missing})")
    return ckpt


def _step_of(path: Path) -> int:
    m = re.search(r"step[_=-]?(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def stored_step(path: _PATH) -> int:
    """The ``global_step`` recorded inside a checkpoint (cheap: tensors memory-mapped), -1 when unreadable."""
    try:
        ckpt = torch.load(Path(path), map_location="cpu", mmap=True, weights_only=True)
        return int(ckpt["global_step"])
    except Exception:  # noqa: BLE001 - unreadable files sort last; check_checkpoint says why later
        return -1


def list_checkpoints(directory: _PATH) -> list[Path]:
    """``*.ckpt`` files of a folder, most trained first: by the training step stored in each file (never by
    modification time, which ``cp -r`` or ``touch`` changes); at equal steps ``last*`` first, then by name."""
    d = Path(directory)
    if not d.is_dir():
        return []
    files = [p for p in d.iterdir() if p.suffix == CKPT_SUFFIX and p.is_file() and not p.name.startswith(".")]
    steps = {p: stored_step(p) for p in files}
    return sorted(files, key=lambda p: (-steps[p], not p.stem.startswith("last"), p.name))


def _global_rank() -> int:
    """This process's global rank as Lightning detects it (RANK, SLURM_PROCID, LOCAL_RANK, ...)."""
    return launcher_rank()


def _is_rank_zero() -> bool:
    return is_global_zero()  # Lightning's rank lookup: torchrun, SLURM (srun sets no RANK), LSF


def remove_stale_temp_files(directory: _PATH) -> list[Path]:
    """Delete temp files of writes killed mid-way (rank 0, before training); returns what it removed."""
    d = Path(directory)
    if not d.is_dir() or not _is_rank_zero():
        return []
    removed = []
    for p in d.glob(f".*{CKPT_SUFFIX}.*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    if removed:
        log.warning(
            "Removed %d partial checkpoint write(s) left by a killed run: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def newest_loadable(candidates: list[Path]) -> Path:
    """The first candidate that passes :func:`check_checkpoint`; warns naming the unusable and chosen files.

    Candidates whose stored step cannot be read (truncated, garbage) sort last in :func:`list_checkpoints`;
    they are checked too, so the warning names every unusable file, wherever it sorted.
    """
    failures: list[str] = []
    chosen: Path | None = None
    for path in candidates:
        if chosen is not None and stored_step(path) >= 0:
            continue
        try:
            check_checkpoint(path)
        except CheckpointError as e:
            failures.append(str(e))
            log.warning("Checkpoint unusable: %s", e)
            continue
        if chosen is None:
            chosen = path
    if chosen is None:
        raise CheckpointError(
            "No loadable checkpoint among "
            + ", ".join(str(p) for p in candidates)
            + (": " + " | ".join(failures) if failures else "")
        )
    if failures:
        rank_zero_warn(f"Resuming from {chosen} instead of the unusable " + " | ".join(failures))
    return chosen


def resolve_ckpt_path(cfg_value: str | os.PathLike | None, checkpoint_dir: _PATH | None) -> str | None:
    """Turn the ``ckpt_path`` setting into a checkpoint that loads, or ``None`` to start fresh.

    - ``None`` / ``""`` / ``"null"`` → ``None``.
    - ``"last"`` → the loadable ``*.ckpt`` of ``checkpoint_dir`` with the highest stored step (``None`` with
      a warning when there is none, so a job script can always pass ``ckpt_path=last``: a first launch starts
      fresh, requeues resume).
    - a folder (a run's output folder with ``checkpoints/`` inside, or the checkpoints folder) → its loadable
      checkpoint with the highest stored step; an error if it has none.
    - a file → that file if it loads, else the most trained loadable checkpoint next to it whose stored step
      is not above the file's (any, when the file's step is unknown), with a warning.

    Steps come from inside the files, never from modification times (``cp -r`` and ``touch`` change those).
    Global rank 0 (Lightning's rank detection: ``RANK``, ``SLURM_PROCID``, ``LOCAL_RANK``) resolves and logs
    "Resuming from <file> (global step N)"; only it reads and checks the files. The ranks Lightning's DDP
    launcher starts from rank 0 inherit its choice in ``$ZEROVL_RESOLVED_CKPT_PATH``; the ranks an external
    launcher (srun, torchrun) started read it from ``<checkpoint_dir>/.resume-choice-<launch id>.json``,
    which rank 0 writes atomically (they wait up to ``$ZEROVL_RESUME_WAIT_S`` seconds).
    - ``"best"``, ``"hpc"``, ``"registry"`` → passed through to Lightning unchanged.

    Newer-but-corrupt files (a node crash during a write on a filesystem that ignores fsync, a copy cut short)
    are skipped with a warning naming the skipped and the chosen file.
    """
    if cfg_value is None:
        return None
    value = str(cfg_value).strip()
    if value in {"", "null", "None"}:
        return None
    if value in _PASS_THROUGH or value.startswith("registry:"):
        return value
    shared = os.environ.get(RESOLVED_ENV)
    if shared and _global_rank() != 0 and Path(shared).is_file():
        return shared  # rank 0 chose before launching this process (Lightning's DDP launcher)
    handoff = _choice_file(checkpoint_dir)
    if handoff is not None and _global_rank() != 0:
        return _wait_for_choice(handoff)  # srun / torchrun: rank 0 chooses, the others read its choice
    chosen = _resolve(value, checkpoint_dir)
    if _global_rank() == 0:
        if chosen is not None:
            os.environ[RESOLVED_ENV] = chosen  # inherited by the ranks Lightning launches from this process
            log.info("Resuming from %s (global step %d)", chosen, stored_step(chosen))
        if handoff is not None:
            _write_choice(handoff, chosen)
    return chosen


# ------------------------------------------------------------------------ the choice, shared across tasks
CHOICE_WAIT_ENV = "ZEROVL_RESUME_WAIT_S"  # how long ranks > 0 wait for rank 0's choice (default 1800 s)


def _choice_file(checkpoint_dir: _PATH | None) -> Path | None:
    """Where rank 0 leaves its choice for the tasks an external launcher started next to it (None: no such
    tasks, or no run folder to share)."""
    launch = external_launch_id()
    if launch is None or checkpoint_dir is None:
        return None
    return Path(checkpoint_dir) / f".resume-choice-{launch}.json"


def _write_choice(path: Path, chosen: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    tmp.write_text(json.dumps({"ckpt_path": chosen}))
    os.replace(tmp, path)  # the others see the whole choice or none


def _wait_for_choice(path: Path) -> str | None:
    timeout = float(os.environ.get(CHOICE_WAIT_ENV, "1800"))
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"rank {_global_rank()}: no checkpoint choice from rank 0 in {path} after {timeout:.0f} s "
                f"(is rank 0 running and does it see this folder? {CHOICE_WAIT_ENV} sets the wait)"
            )
        time.sleep(0.2)
    chosen = json.loads(path.read_text())["ckpt_path"]
    log.info("rank %d resumes from rank 0's choice: %s", _global_rank(), chosen)
    return chosen


def _resolve(value: str, checkpoint_dir: _PATH | None) -> str | None:
    if value == "last":
        if checkpoint_dir is None:
            raise CheckpointError("ckpt_path=last needs the run's checkpoint folder (callbacks.*.dirpath)")
        remove_stale_temp_files(checkpoint_dir)
        candidates = list_checkpoints(checkpoint_dir)
        if not candidates:
            rank_zero_warn(f"ckpt_path=last: no checkpoint in {checkpoint_dir}; starting from scratch")
            return None
        return str(newest_loadable(candidates))
    path = Path(value).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        remove_stale_temp_files(folder)
        candidates = list_checkpoints(folder)
        if not candidates:
            raise CheckpointError(f"ckpt_path={value}: no *{CKPT_SUFFIX} file in {folder}")
        return str(newest_loadable(candidates))
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={value}: no such file or folder")
    # Fall back only to checkpoints not past the requested one (by the step in their names); a corrupted file
    # has a fresh mtime, so times cannot tell "older" here.
    step = stored_step(path)
    step = step if step >= 0 else _step_of(path)  # an unreadable file: the step in its name, if any
    older = [p for p in list_checkpoints(path.parent) if p.resolve() != path.resolve()]
    if step >= 0:
        older = [p for p in older if 0 <= stored_step(p) <= step]
    return str(newest_loadable([path, *older]))
