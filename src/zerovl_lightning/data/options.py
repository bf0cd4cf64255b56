"""The one check of the data options (``data.sources``, ``sampling``, ``weights``, ``split``, ``order``).

``config_checks`` runs it on the composed config before any work; ``ZeroVLDataModule`` runs it on its arguments
(notebooks, tests); ``sampling.py`` uses :func:`check_choice` for its own arguments. Every error is a
:class:`~zerovl_lightning.config_checks.ConfigError` (a ``ValueError``) whose message starts with the config key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from zerovl_lightning.config_checks import ConfigError

SAMPLING = ("debias", "shuffle", "sequential")
WEIGHTS = ("size", "uniform", "explicit")
SPLITS = ("auto", "shard", "sample")
SOURCE_KEYS = frozenset({"path", "urls", "weight", "num_samples"})


def check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    """``value`` is one of ``allowed``, else a ConfigError naming ``key``."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is unknown: {key.rsplit('.', 1)[-1]} must be one of {list(allowed)}")


def check_data_options(
    sources: Any,
    *,
    sampling: str = "debias",
    weights: str | Mapping[str, float] = "size",
    split: str = "auto",
    order: Sequence[str] | None = None,
) -> tuple[dict[str, dict[str, Any]], str]:
    """Check the data options; return ``({name: {path|urls, weight?, num_samples?}}, weighting)``.

    A ``{name: weight}`` mapping of ``weights`` is folded into the sources (``weighting="explicit"``); a
    source given as a bare path or list becomes ``{path: ...}``. Shard paths are not touched here (their
    expansion, ``shard_list.expand_shards``, is the check that they exist).
    """
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError("data.sources is empty: give at least one {name: {path: <shard dir/glob/list>}}")
    cfgs: dict[str, dict[str, Any]] = {}
    for name, spec in sources.items():
        key = f"data.sources.{name}"
        spec = {"path": spec} if isinstance(spec, (str, list, tuple, os.PathLike)) else dict(spec or {})
        unknown = set(spec) - SOURCE_KEYS
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SOURCE_KEYS)}")
        if ("path" in spec) == ("urls" in spec):
            raise ConfigError(f"{key}: give exactly one of `path` or `urls`")
        field = "path" if "path" in spec else "urls"
        if spec[field] in (None, "", []):
            raise ConfigError(f"{key}.{field} is empty")
        n = spec.get("num_samples")
        if n is not None and int(n) <= 0:
            raise ConfigError(f"{key}.num_samples={n} must be positive")
        cfgs[str(name)] = spec
    names = list(cfgs)
    check_choice("data.sampling", sampling, SAMPLING)
    check_choice("data.split", split, SPLITS)
    if isinstance(weights, Mapping):
        unknown_names = sorted(set(map(str, weights)) - set(names))
        if unknown_names:
            raise ConfigError(f"data.weights names unknown source(s) {unknown_names}; data.sources has {names}")
        bad = {k: v for k, v in weights.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0}
        if bad or not any(float(v) > 0 for v in weights.values()):
            raise ConfigError(f"data.weights={dict(weights)} must be numbers >= 0, not all zero")
        for name, spec in cfgs.items():
            spec["weight"] = float(weights.get(name, 0.0))
        weights = "explicit"
    check_choice("data.weights", weights, WEIGHTS)
    if weights == "explicit":
        missing = [n for n, s in cfgs.items() if s.get("weight") is None]
        if missing:
            raise ConfigError(f"data.weights=explicit needs data.sources.<name>.weight for {missing}")
    if order:
        unknown_names = sorted(set(map(str, order)) - set(names))
        if unknown_names:
            raise ConfigError(f"data.order names unknown source(s) {unknown_names}; data.sources has {names}")
    return cfgs, str(weights)
