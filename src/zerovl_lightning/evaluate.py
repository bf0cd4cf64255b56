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
from zerovl_lightning.export import load_dual_encoder

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TASKS = ("retrieval", "zeroshot", "linear_probe")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_evaluators(cfg: DictConfig) -> list[EvalCallback]:
    """The evaluation callbacks for the chosen ``tasks`` (used here without a trainer)."""
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        from zerovl_lightning.config_checks import ConfigError

        raise ConfigError(f"tasks={list(cfg.tasks)}: unknown {sorted(unknown)}; choose from {list(TASKS)}")
    common: dict[str, Any] = dict(
        batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=cfg.progress
    )
    evaluators: list[EvalCallback] = []

    def section(name: str) -> dict[str, Any] | None:
        node = cfg.get(name)
        if name not in cfg.tasks or node is None:
            return None
        plain = OmegaConf.to_container(node, resolve=True)
        return plain if isinstance(plain, dict) and plain.get("sets") else None

    if r := section("retrieval"):
        evaluators.append(
            RetrievalCallback(
                r["sets"], r["ks"], r["chunk_size"], r["ties"], r["curve_max_k"], num_examples=0, **common
            )
        )
    if z := section("zeroshot"):
        evaluators.append(ZeroShotCallback(z["sets"], z["test_limit"], z["image_size"], **common))
    if p := section("linear_probe"):
        evaluators.append(
            LinearProbeCallback(
                p["sets"], p["train_limit"], p["test_limit"], p["image_size"], p["weight_decays"], **common
            )
        )
    return evaluators


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Load the model, run every evaluator, print the table, write the JSON (and recall@K PNG). Returns
    records."""
    device = _device(cfg.device)
    sources = [cfg.get(k) for k in ("ckpt_path", "export_dir", "model_name", "model_config")]
    if cfg.get("model") is not None and not any(sources):
        model = instantiate(cfg.model)  # a conf/model config, as built: the untrained baseline
    else:
        model = load_dual_encoder(*sources[:3], cfg.get("pretrained"), sources[3], device=device)
    model.to(device).eval()
    records: list[dict[str, Any]] = []
    output = Path(cfg.output)
    for evaluator in build_evaluators(cfg):
        records += evaluator.make_records(model, evaluator.evaluate(model))
        if isinstance(evaluator, RetrievalCallback) and evaluator.curves:
            _, curves = evaluator.curves[-1]
            report.plot_recall_curves(curves, output.with_name("recall_at_k.png"), title=model.model_name)
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
