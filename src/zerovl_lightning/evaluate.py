"""``zerovl-eval``: a model (Lightning checkpoint, export folder, open_clip weights or a conf/model config)
on retrieval, zero-shot classification and linear-probe sets; prints a table, writes a results JSON.

    zerovl-eval ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    zerovl-eval export_dir=exports/demo tasks=[retrieval] data.val_sets='{tuxpaint: /data/tux/heldout}'
    zerovl-eval model=effl0_minilm          # the untrained baseline

The evaluators are configured by ``zerovl-train``'s own files (``conf/callbacks/{retrieval,zeroshot,linear_probe}
.yaml``, composed by ``conf/eval.yaml``), so every option of training's evaluation is an option here, under the
same key: retrieval runs through ``trainer.validate`` with the module, loaders and report callback of training;
zero-shot classification and the linear probe are the training callbacks, called once.
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
from zerovl_lightning.eval.classification_callbacks import EvalCallback
from zerovl_lightning.eval.retrieval_data import resolve_retrieval_sets, retrieval_loaders
from zerovl_lightning.eval.retrieval_report import RetrievalCallback
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


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _check_tasks(cfg: DictConfig) -> None:
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        from zerovl_lightning.config_checks import ConfigError

        raise ConfigError(f"tasks={list(cfg.tasks)}: unknown {sorted(unknown)}; choose from {list(TASKS)}")


def build_evaluators(cfg: DictConfig) -> list[EvalCallback]:
    """The zero-shot classification / linear-probe callbacks of the chosen ``tasks``, instantiated from
    ``callbacks.zeroshot`` / ``callbacks.linear_probe`` (``conf/callbacks/*.yaml``, as in training); their
    files go next to ``output``."""
    _check_tasks(cfg)
    evaluators: list[EvalCallback] = []
    for task in ("zeroshot", "linear_probe"):
        node = cfg.get("callbacks", {}).get(task)
        if task not in cfg.tasks or node is None or not node.get("sets"):
            continue
        if "_target_" not in node:
            from zerovl_lightning.config_checks import ConfigError

            raise ConfigError(f"tasks has {task} but callbacks.{task} has no _target_; keep callbacks/{task} in "
                              "the defaults of conf/eval.yaml or drop it from tasks")  # fmt: skip
        evaluators.append(instantiate(node, output_dir=Path(cfg.output).parent))
    return evaluators


def build_retrieval(
    cfg: DictConfig, model: torch.nn.Module, output_dir: Path
) -> tuple[ZeroVLModule, RetrievalCallback, list[Any]] | None:
    """(module, report callback, loaders) of the retrieval validation, from ``module.retrieval``,
    ``callbacks.retrieval`` and ``data.val_sets`` / ``val_batch_size`` / ``val_num_workers``; None when
    ``retrieval`` is not among the tasks or no sets are given."""
    _check_tasks(cfg)
    if "retrieval" not in cfg.tasks or not cfg.data.get("val_sets"):
        return None
    module = ZeroVLModule(model, retrieval=_plain(cfg.module.get("retrieval")))
    reporter = instantiate(cfg.callbacks.retrieval, output_dir=output_dir)
    loaders = retrieval_loaders(
        resolve_retrieval_sets(_plain(cfg.data.val_sets)), model.preprocess_cfg,
        int(cfg.data.val_batch_size), int(cfg.data.val_num_workers),
    )  # fmt: skip
    return module, reporter, loaders


def validate_retrieval(cfg: DictConfig, model: torch.nn.Module, output: Path) -> list[dict[str, Any]]:
    """Zero-shot retrieval through ``trainer.validate``: the validation loop, module and report callback of
    ``zerovl-train``. Writes ``recall_at_k.png`` next to ``output``; returns the records."""
    built = build_retrieval(cfg, model, output.parent)
    if built is None:
        return []
    module, reporter, loaders = built
    trainer = L.Trainer(
        **_accelerator(str(cfg.device)), logger=False, callbacks=[reporter], enable_checkpointing=False,
        enable_progress_bar=bool(cfg.progress), enable_model_summary=False, default_root_dir=output.parent,
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
