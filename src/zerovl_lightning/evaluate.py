"""``zerovl-eval``: a model (Lightning checkpoint, export folder, open_clip weights or a conf/model config)
on retrieval, zero-shot classification and linear-probe sets; prints a table, writes a results JSON.

    zerovl-eval ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    zerovl-eval export_dir=exports/demo tasks=[retrieval] retrieval.sets='{tuxpaint: /data/tux/heldout}'
    zerovl-eval model=effl0_minilm          # the untrained baseline
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import zerovl_lightning.assets  # noqa: F401  (registers ${zerovl.asset:...})
from zerovl_lightning.errors import exit_on_known_errors
from zerovl_lightning.eval import report
from zerovl_lightning.eval.callbacks import (
    EvalCallback,
    LinearProbeCallback,
    RetrievalCallback,
    ZeroShotCallback,
)
from zerovl_lightning.eval.datasets import resolve_retrieval_sets
from zerovl_lightning.eval.retrieval_data import retrieval_loaders
from zerovl_lightning.export import load_dual_encoder
from zerovl_lightning.module import ZeroVLModule

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TASKS = ("retrieval", "zeroshot", "linear_probe")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _accelerator(name: str) -> dict[str, Any]:
    """Trainer(accelerator, devices) for ``device``: auto | cpu | cuda | cuda:N."""
    if name == "auto":
        return {"accelerator": "gpu" if torch.cuda.is_available() else "cpu", "devices": 1}
    if name.startswith("cuda"):
        return {"accelerator": "gpu", "devices": [int(name.split(":")[1])] if ":" in name else 1}
    return {"accelerator": name, "devices": 1}


def _section(cfg: DictConfig, name: str) -> dict[str, Any] | None:
    node = cfg.get(name)
    if name not in cfg.tasks or node is None:
        return None
    plain = OmegaConf.to_container(node, resolve=True)
    return plain if isinstance(plain, dict) and plain.get("sets") else None


def build_evaluators(cfg: DictConfig) -> list[EvalCallback]:
    """The zero-shot classification / linear-probe callbacks for the chosen ``tasks`` (used without a trainer).

    Every key of the ``zeroshot`` / ``linear_probe`` sections is a constructor argument (``+linear_probe.max_iter=50``
    works); ``batch_size`` / ``num_workers`` / ``progress`` default to the top-level keys.
    """
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        from zerovl_lightning.config_checks import ConfigError

        raise ConfigError(f"tasks={list(cfg.tasks)}: unknown {sorted(unknown)}; choose from {list(TASKS)}")
    common: dict[str, Any] = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=cfg.progress)
    evaluators: list[EvalCallback] = []
    if z := _section(cfg, "zeroshot"):
        evaluators.append(ZeroShotCallback(**{**common, **z}))
    if p := _section(cfg, "linear_probe"):
        evaluators.append(LinearProbeCallback(**{**common, **p}))
    return evaluators


def validate_retrieval(cfg: DictConfig, model: torch.nn.Module, output: Path) -> list[dict[str, Any]]:
    """Zero-shot retrieval through ``trainer.validate``: the validation loop, module and report callback of
    ``zerovl-train``. Writes ``recall_at_k.png`` next to ``output``; returns the records."""
    r = _section(cfg, "retrieval")
    if r is None:
        return []
    module = ZeroVLModule(model, retrieval={k: r[k] for k in ("ks", "chunk_size", "ties") if k in r})
    reporter = RetrievalCallback(curve_max_k=r.get("curve_max_k", 50), num_examples=0, output_dir=output.parent)
    trainer = L.Trainer(
        **_accelerator(str(cfg.device)), logger=False, callbacks=[reporter], enable_checkpointing=False,
        enable_progress_bar=bool(cfg.progress), enable_model_summary=False, default_root_dir=output.parent,
    )  # fmt: skip
    loaders = retrieval_loaders(
        resolve_retrieval_sets(r["sets"]), model.preprocess_cfg,
        r.get("batch_size", cfg.batch_size), r.get("num_workers", cfg.num_workers),
    )  # fmt: skip
    trainer.validate(module, dataloaders=loaders, verbose=False)
    if reporter.curves:
        _, curves = reporter.curves[-1]
        report.plot_recall_curves(curves, output.with_name("recall_at_k.png"), title=model.model_name)
    return reporter.history


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Load the model, run every evaluator, print the table, write the JSON (and recall@K PNG). Returns
    records."""
    device = _device(str(cfg.device))
    evaluators = build_evaluators(cfg)  # validates `tasks` before loading anything
    sources = [cfg.get(k) for k in ("ckpt_path", "export_dir", "model_name", "model_config")]
    if cfg.get("model") is not None and not any(sources):
        model = instantiate(cfg.model)  # a conf/model config, as built: the untrained baseline
    else:
        model = load_dual_encoder(*sources[:3], cfg.get("pretrained"), sources[3], device=device)
    model.to(device).eval()
    output = Path(cfg.output)
    records = validate_retrieval(cfg, model, output)
    model.to(device)  # the Trainer's teardown may have moved it
    for evaluator in evaluators:
        records += evaluator.make_records(model, evaluator.evaluate(model))
    report.write_json(output, records)
    print(report.format_table(records, "all"))
    print(f"\nresults: {output}")
    return records


@hydra.main(version_base="1.3", config_path="pkg://zerovl_lightning.conf", config_name="eval")
@exit_on_known_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
