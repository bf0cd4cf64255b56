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

from omegaconf import DictConfig, OmegaConf

from zerovl_lightning.assets import to_plain  # also registers the ${zerovl.asset:...} resolvers


class ConfigError(ValueError):
    """A config that cannot work; the message says which key to set and how."""


_SAMPLING = ("debias", "shuffle", "sequential")
_WEIGHTS = ("size", "uniform", "explicit")
_SPLITS = ("auto", "shard", "sample")
_SOURCE_KEYS = {"path", "urls", "weight", "num_samples"}
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
                "(the per-rank batch of one optimizer step), e.g. "
                + ", ".join(str(d) for d in _divisors(batch)[:6])
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


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


# ------------------------------------------------------------------------------------------- data
def _check_data(cfg: DictConfig) -> None:
    data = _node(cfg, "data")
    if data is None or "sources" not in data:
        return  # not the ZeroVL DataModule (a notebook's or a test's own data): nothing we know to check
    if isinstance(data, DictConfig) and OmegaConf.is_missing(data, "sources"):
        raise ConfigError(
            "data.sources is not set: give your shard folders, e.g. 'data.sources={cc3m: /data/cc3m/}'"
        )
    sources = to_plain(_node(cfg, "data.sources"))
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError("data.sources is empty: give at least one {name: {path: <shard dir/glob/list>}}")
    names = [str(n) for n in sources]
    for name, spec in sources.items():
        key = f"data.sources.{name}"
        spec = {"path": spec} if isinstance(spec, (str, list)) else dict(spec or {})
        unknown = set(spec) - _SOURCE_KEYS
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SOURCE_KEYS)}")
        if ("path" in spec) == ("urls" in spec):
            raise ConfigError(f"{key}: give exactly one of `path` or `urls`")
        field = "path" if "path" in spec else "urls"
        if spec[field] in (None, "", []):
            raise ConfigError(f"{key}.{field} is empty")
        _check_shards(f"{key}.{field}", name, spec[field])
        n = spec.get("num_samples")
        if n is not None and int(n) <= 0:
            raise ConfigError(f"{key}.num_samples={n} must be positive")
    sampling = _node(cfg, "data.sampling")
    if sampling is not None and sampling not in _SAMPLING:
        raise ConfigError(f"data.sampling={sampling!r} is unknown; use one of {list(_SAMPLING)}")
    split = _node(cfg, "data.split")
    if split is not None and split not in _SPLITS:
        raise ConfigError(f"data.split={split!r} is unknown; use one of {list(_SPLITS)}")
    weights = to_plain(_node(cfg, "data.weights"))
    if isinstance(weights, Mapping):
        unknown = sorted(set(map(str, weights)) - set(names))
        if unknown:
            raise ConfigError(f"data.weights names unknown source(s) {unknown}; data.sources has {names}")
        bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or v < 0}
        if bad or not any(float(v) > 0 for v in weights.values()):
            raise ConfigError(f"data.weights={weights} must be numbers >= 0, not all zero")
    elif weights is not None and weights not in _WEIGHTS:
        raise ConfigError(f"data.weights={weights!r} is unknown; use one of {list(_WEIGHTS)} or a mapping")
    elif weights == "explicit":
        missing = [n for n, s in sources.items() if not isinstance(s, Mapping) or s.get("weight") is None]
        if missing:
            raise ConfigError(f"data.weights=explicit needs data.sources.<name>.weight for {missing}")
    order = to_plain(_node(cfg, "data.order"))
    if order:
        unknown = sorted(set(map(str, order)) - set(names))
        if unknown:
            raise ConfigError(f"data.order names unknown source(s) {unknown}; data.sources has {names}")


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


def validate_config(cfg: DictConfig) -> None:
    """Run every check; raise :class:`ConfigError` on the first failure."""
    _check_batches(cfg)
    _check_output_dir(cfg)
    _check_ckpt_path(cfg)
    _check_data(cfg)
