"""Config validation before any work: one clear error per mistake, naming the key to fix.

Runs in ``train.run`` before the model is built or a process group exists, so a typo costs seconds, not a
queue slot and a model load. Every check raises :class:`ConfigError` whose message starts with the config key
(``data.sources.laion.path=...``) and says what would work. Checks mirror what the code downstream needs
(``ZeroVLDataModule``, ``ZeroVLModule``'s DGA path, Lightning's manual optimization, the checkpoint folder);
they do not re-implement it: shard paths are expanded with the data package's own ``expand_shards``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

import zerovl_lightning.assets  # noqa: F401  (registers the ${zerovl.asset:...} resolvers)


class ConfigError(ValueError):
    """A config that cannot work; the message says which key to set and how."""


_CKPT_KEYWORDS = {"last", "best", "hpc", "registry"}


def _node(cfg: Any, key: str) -> Any:
    """``cfg.a.b`` or None (missing keys, or a ``${hydra:...}`` that does not resolve outside a Hydra app)."""
    cur = cfg
    for part in key.split("."):
        if not isinstance(cur, (DictConfig, Mapping)):
            return None
        try:
            cur = cur.get(part)
        except Exception:  # noqa: BLE001 - unresolvable interpolation: nothing to check here
            return None
        if cur is None:
            return None
    return cur


def _int(cfg: Any, key: str) -> int | None:
    value = _node(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}={value!r} must be an integer")
    try:
        as_int = int(value)
    except ValueError as e:
        raise ConfigError(f"{key}={value!r} must be an integer") from e
    if float(value) != as_int:
        raise ConfigError(f"{key}={value!r} must be an integer")
    return as_int


# ------------------------------------------------------------------------------------------- batches
def _check_batches(cfg: DictConfig) -> None:
    batch = _int(cfg, "data.batch_size")
    sub = _int(cfg, "module.sub_batch_size")
    if batch is not None and batch <= 0:
        raise ConfigError(f"data.batch_size={batch} must be positive (per-rank batch of one optimizer step)")
    if sub is not None:
        if sub <= 0:
            raise ConfigError(f"module.sub_batch_size={sub} must be positive (or null for the plain step)")
        # with data.global_batch_size the per-rank batch needs the world size: train.check_batches checks it
        if batch is not None and _node(cfg, "data.global_batch_size") is None and (sub > batch or batch % sub):
            raise ConfigError(
                f"module.sub_batch_size={sub} must be a positive divisor of data.batch_size={batch} "
                "(the per-rank batch of one optimizer step), e.g. " + ", ".join(str(d) for d in _divisors(batch)[:6])
            )
        accumulate = _int(cfg, "trainer.accumulate_grad_batches")
        if accumulate is not None and accumulate != 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches={accumulate} cannot be combined with module.sub_batch_size "
                "(DGA already accumulates inside one step); raise data.batch_size instead"
            )
        clip = _node(cfg, "trainer.gradient_clip_val")
        if clip:
            raise ConfigError(
                f"trainer.gradient_clip_val={clip} does not apply under DGA (manual optimization): "
                "set module.dga.gradient_clip_val instead"
            )
    workers = _int(cfg, "data.num_workers")
    if workers is not None and workers < 0:
        raise ConfigError(f"data.num_workers={workers} must be >= 0")
    steps = _int(cfg, "data.steps_per_epoch")
    if steps is not None and steps <= 0:
        raise ConfigError(f"data.steps_per_epoch={steps} must be positive (or null for one pass)")


def _number(cfg: Any, key: str) -> float | None:
    """``cfg.<key>`` as a float, or None when unset; a ConfigError naming the key for anything else."""
    value = _node(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}={value!r} must be a number")
    try:
        return float(value)
    except ValueError as e:
        raise ConfigError(f"{key}={value!r} must be a number (e.g. {key}=1e-4)") from e


def _check_training_length(cfg: DictConfig) -> None:
    """Lightning's -1 / null mean "no limit"; 0 or another negative number would train nothing."""
    for key in ("trainer.max_steps", "trainer.max_epochs"):
        n = _int(cfg, key)
        if n is not None and n != -1 and n <= 0:
            raise ConfigError(f"{key}={n} must be positive (or -1 for no limit): the run would train nothing")


def _check_optimizer(cfg: DictConfig) -> None:
    lr = _number(cfg, "module.optimizer.lr")
    if lr is not None and not (lr > 0 and lr < float("inf")):
        raise ConfigError(f"module.optimizer.lr={lr} must be a positive finite number")
    wd = _number(cfg, "module.optimizer.weight_decay")
    if wd is not None and not wd >= 0:
        raise ConfigError(f"module.optimizer.weight_decay={wd} must be >= 0")
    for key in ("module.scheduler.warmup_fraction", "module.scheduler.min_lr_ratio"):
        v = _number(cfg, key)
        if v is not None and not 0 <= v <= 1:
            raise ConfigError(f"{key}={v} must be between 0 and 1")


def _check_feature_cache(cfg: DictConfig) -> None:
    """``module.feature_cache`` keeps one output per sample: the train input must be the same every epoch."""
    if not _node(cfg, "module.feature_cache.enabled"):
        return
    random = [
        f"{key}={_plain(_node(cfg, key))}"
        for key, deterministic in (
            ("data.crop_scale", lambda v: v is None),
            ("data.auto_augment", lambda v: not v),
            ("data.text_augment", lambda v: not v),
        )
        if not deterministic(_node(cfg, key))
    ]
    if random:
        raise ConfigError(
            f"module.feature_cache.enabled=true needs the same train input every epoch, but {', '.join(random)} "
            "draws a new one: set data.crop_scale=null data.auto_augment=false data.text_augment=false, or "
            "module.feature_cache.enabled=false"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


# ------------------------------------------------------------------------------------------- data
def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _check_data(cfg: DictConfig) -> None:
    """The data package's own option check (``data/options.py``), then every source's shards exist."""
    from zerovl_lightning.data.options import check_data_options

    data = _node(cfg, "data")
    if data is None or "sources" not in data:
        return  # not the ZeroVL DataModule (a notebook's or a test's own data): nothing we know to check
    if isinstance(data, DictConfig) and OmegaConf.is_missing(data, "sources"):
        raise ConfigError("data.sources is not set: give your shard folders, e.g. 'data.sources={cc3m: /data/cc3m/}'")
    options = {k: _plain(_node(cfg, f"data.{k}")) for k in ("sampling", "weights", "split", "order")}
    sources, _ = check_data_options(
        _plain(_node(cfg, "data.sources")), **{k: v for k, v in options.items() if v is not None}
    )
    for name, spec in sources.items():
        field = "path" if "path" in spec else "urls"
        _check_shards(f"data.sources.{name}.{field}", name, spec[field])


def _check_shards(key: str, name: str, spec: Any) -> None:
    """Every local shard path exists (the data package's own expansion: dirs, globs, brace patterns)."""
    from zerovl_lightning.data.shards import expand_shards

    try:
        expand_shards(spec, source=name)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}={spec!r}: {e}") from e


# ------------------------------------------------------------------------------------------- folders
def _check_writable(key: str, value: Any) -> None:
    """Create the folder and a probe file in it: permission bits alone miss read-only mounts and root."""
    path = Path(str(value)).expanduser()
    probe = path / f".zerovl-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        why = f"{type(e).__name__}: {e.strerror or e}"
        raise ConfigError(f"{key}={path} is not a writable folder ({why})") from e


def _check_output_dir(cfg: DictConfig) -> None:
    out = _node(cfg, "paths.output_dir")
    if out:
        _check_writable("paths.output_dir", out)
    callbacks = _node(cfg, "callbacks")
    if isinstance(callbacks, DictConfig):
        for name in callbacks:
            dirpath = _node(cfg, f"callbacks.{name}.dirpath")
            if dirpath:
                _check_writable(f"callbacks.{name}.dirpath", dirpath)


# ------------------------------------------------------------------------------------------- resume
def _check_ckpt_path(cfg: DictConfig) -> None:
    value = _node(cfg, "ckpt_path")
    if value is None:
        return
    s = str(value).strip()
    if s in {"", "null", "None"} or s in _CKPT_KEYWORDS or s.startswith("registry:") or "://" in s:
        return
    if not Path(s).expanduser().exists():
        raise ConfigError(
            f"ckpt_path={s} does not exist; give a checkpoint file, a run folder, or `last` "
            "(the newest loadable checkpoint of this run's folder)"
        )


# Data-plan fingerprint fields (ZeroVLDataModule._fingerprint) whose change makes a resume train on other data
# or another schedule, and the config key a user changed for each.
_RESUME_KEYS = {"batch_size": "data.batch_size", "lanes": "data.num_workers"}


def check_data_resume(saved: Mapping[str, Any], current: Mapping[str, Any], allow_inexact: bool) -> list[str]:
    """Refuse to resume when ``data.batch_size`` / ``data.num_workers`` differ from the checkpoint's.

    Returns the changed fingerprint fields (all of them, for the caller's log line). Raises
    :class:`ConfigError` naming the changed keys unless ``allow_inexact`` (``data.allow_inexact_resume``).
    """
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    refused = [k for k in changed if k in _RESUME_KEYS]
    if refused and not allow_inexact:
        what = ", ".join(f"{_RESUME_KEYS[k]}: {saved.get(k)} in the checkpoint, {current.get(k)} now" for k in refused)
        raise ConfigError(
            f"cannot resume exactly ({what}): the data stream and LR schedule would change. Resume with the "
            "checkpoint's values, or set data.allow_inexact_resume=true to continue anyway"
        )
    return changed


def validate_config(cfg: DictConfig) -> None:
    """Run every check; raise :class:`ConfigError` on the first failure."""
    _check_batches(cfg)
    _check_training_length(cfg)
    _check_optimizer(cfg)
    _check_feature_cache(cfg)
    _check_output_dir(cfg)
    _check_ckpt_path(cfg)
    _check_data(cfg)
