"""Decoupled gradient accumulation equals a full-batch autograd step (float64, tiny open_clip towers)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from zerovl_lightning.dga import DecoupledStep, split_batch
from zerovl_lightning.loss import ContrastiveLoss, SoftTargets
from zerovl_lightning.mixup import MixupPlan, encode_pair, global_partner
from zerovl_lightning.model import TINY_MODEL_CFG, build_dual_encoder, build_tiny

N = 8  # global batch (single process)
TOL = 1e-10  # float64: DGA agrees with the full batch to ~1e-15


def _model(dropout: float = 0.0, temperature: float = 0.07, learn: bool = True) -> nn.Module:
    """Tiny open_clip towers in float64; ``dropout``: attention dropout (both towers) + patch dropout."""
    if dropout == 0.0:
        model = build_tiny(temperature=temperature, learn_temperature=learn)
    else:
        cfg = copy.deepcopy(TINY_MODEL_CFG)
        cfg["vision_cfg"]["patch_dropout"] = 0.25
        model = build_dual_encoder(
            "zerovl-tiny-dropout", cfg, temperature=temperature, learn_temperature=learn
        )
        n_drop = 0
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                m.dropout = dropout
                n_drop += 1
        assert n_drop == 4  # 2 image + 2 text blocks
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial starting point: small random perturbation of every weight
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.double().train()


def _batch(n: int = N, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 49407, (n, 16), generator=g)
    tokens[:, 10:] = 0  # padding, like the tokenizer
    return {"image": images, "text": tokens, "key": [str(i) for i in range(n)]}


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {k: (None if p.grad is None else p.grad.detach().clone()) for k, p in model.named_parameters()}


def _full_step(model, batch, plan=None, block=None, targets=None) -> tuple[torch.Tensor, dict]:
    """The reference: one autograd step on the whole batch (mixup mirrors inside ``block``s)."""
    model.zero_grad(set_to_none=True)
    u, v = encode_pair(model, batch["image"], batch["text"], plan, block)
    loss = ContrastiveLoss()(u, v, model.logit_scale.exp(), targets)
    loss.backward()
    return loss.detach(), _grads(model)


def _reference_subbatched(model, subs, targets=None, plan=None) -> tuple[torch.Tensor, dict]:
    """Autograd through the K sub-batch forwards in sequence (the stochastic forward DGA must reproduce)."""
    model.zero_grad(set_to_none=True)
    embs = [encode_pair(model, s["image"], s["text"], plan) for s in subs]
    u, v = torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs])
    loss = ContrastiveLoss()(u, v, model.logit_scale.exp(), targets)
    loss.backward()
    return loss.detach(), _grads(model)


def _dga_step(model, batch, k, plan=None, targets=None, **kw) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    subs = split_batch(batch, len(batch["image"]) // k)
    res = DecoupledStep(**kw)(
        model, lambda s: encode_pair(model, s["image"], s["text"], plan), subs, model.logit_scale, targets
    )
    assert res.num_sub_batches == k
    return res.loss, _grads(model)


def _max_rel_err(got: dict, want: dict) -> float:
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        assert (g is None) == (w is None), name
        if w is not None:
            worst = max(worst, float((g - w).norm() / w.norm().clamp_min(1e-300)))
    return worst


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dga_equals_full_batch_step(k):
    model, batch = _model(), _batch()
    loss_ref, g_ref = _full_step(model, batch)
    loss, g = _dga_step(model, batch, k)
    assert g_ref["clip.logit_scale"] is not None and g_ref["clip.logit_scale"].abs() > 0
    assert _max_rel_err(g, g_ref) <= TOL
    assert abs(float(loss - loss_ref)) <= TOL * float(loss_ref)


@pytest.mark.parametrize("k", [2, 4])
def test_autograd_oracle_path_gives_the_same_step(k):
    model, batch = _model(), _batch()
    _, g_closed = _dga_step(model, batch, k)
    _, g_oracle = _dga_step(model, batch, k, closed_form=False)
    assert _max_rel_err(g_closed, g_oracle) <= 1e-10


def test_fixed_temperature_gets_no_gradient():
    model, batch = _model(learn=False), _batch()
    loss_ref, g_ref = _full_step(model, batch)
    _, g = _dga_step(model, batch, 2)
    assert g["clip.logit_scale"] is None
    assert _max_rel_err(g, g_ref) <= TOL


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("k", [2, 4])
def test_dga_with_mixup_equals_full_batch_with_block_diagonal_partner(modality, k):
    model, batch = _model(), _batch()
    b = N // k
    plan = MixupPlan(alpha=0.3, modality=modality)
    targets = SoftTargets(plan.alpha, global_partner(N, block=b))
    loss_ref, g_ref = _full_step(model, batch, plan, block=b, targets=targets)
    loss, g = _dga_step(model, batch, k, plan=plan, targets=targets)
    assert _max_rel_err(g, g_ref) <= TOL
    assert abs(float(loss - loss_ref)) <= TOL * float(loss_ref)
    # and the soft targets really matter: hard targets give a different step
    _, g_hard = _full_step(model, batch, plan, block=b)
    assert _max_rel_err(g_hard, g_ref) > 1e-3


@pytest.mark.parametrize("k", [2, 4])
def test_dropout_needs_rng_replay(k):
    model, batch = _model(dropout=0.1), _batch()
    subs = split_batch(batch, N // k)
    torch.manual_seed(123)
    loss_ref, g_ref = _reference_subbatched(model, subs)
    rng_after_ref = torch.get_rng_state()

    torch.manual_seed(123)
    loss, g = _dga_step(model, batch, k)
    assert torch.equal(torch.get_rng_state(), rng_after_ref)  # the stream moves on as after one forward pass
    assert _max_rel_err(g, g_ref) <= TOL
    assert abs(float(loss - loss_ref)) <= TOL * float(loss_ref)

    torch.manual_seed(123)
    _, g_no_replay = _dga_step(model, batch, k, replay_rng=False)
    assert _max_rel_err(g_no_replay, g_ref) > 1e-2

    torch.manual_seed(124)  # sanity: the dropout masks really depend on the RNG
    _, g_other = _reference_subbatched(model, subs)
    assert _max_rel_err(g_other, g_ref) > 1e-2


def test_kept_last_graph_saves_one_forward_and_changes_nothing():
    """2K − 1 forwards with the kept graph, 2K without; both equal the reference (dropout on, K = 4)."""
    model, batch = _model(dropout=0.1), _batch()
    subs = split_batch(batch, 2)
    torch.manual_seed(5)
    _, g_ref = _reference_subbatched(model, subs)
    for keep, expected_calls in ((True, 7), (False, 8)):
        calls = []

        def encode(s, calls=calls):
            calls.append(1)
            return encode_pair(model, s["image"], s["text"])

        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        DecoupledStep(keep_last_graph=keep)(model, encode, subs, model.logit_scale)
        assert len(calls) == expected_calls
        assert _max_rel_err(_grads(model), g_ref) <= TOL


def test_tiny_temperature_finite():
    model, batch = _model(temperature=0.005), _batch()
    targets = SoftTargets(0.1, global_partner(N, block=4))
    loss_ref, g_ref = _full_step(model, batch, MixupPlan(0.1, "text"), block=4, targets=targets)
    loss, g = _dga_step(model, batch, 2, plan=MixupPlan(0.1, "text"), targets=targets)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(t).all() for t in g.values() if t is not None)
    assert _max_rel_err(g, g_ref) <= TOL


class _BNTowers(nn.Module):
    """Minimal towers with BatchNorm, to check that buffers are updated once per sub-batch (by pass 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Flatten(), nn.Linear(12, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 4)
        )
        self.text = nn.Embedding(10, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image(self, x):
        return nn.functional.normalize(self.image(x), dim=-1)

    def encode_text(self, t, normalize=True):
        f = self.text(t).mean(1)
        return nn.functional.normalize(f, dim=-1) if normalize else f


def test_batchnorm_buffers_updated_once_per_sub_batch():
    torch.manual_seed(0)
    model = _BNTowers().double()
    batch = {"image": torch.randn(8, 3, 2, 2, dtype=torch.float64), "text": torch.randint(0, 10, (8, 3))}
    ref = copy.deepcopy(model)
    loss_ref, g_ref = _reference_subbatched(ref, split_batch(batch, 4))
    loss, g = _dga_step(model, batch, 2)
    assert _max_rel_err(g, g_ref) <= TOL
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, b_ref), name
    assert int(model.image[2].num_batches_tracked) == 2


def test_split_batch_rejects_non_divisor():
    with pytest.raises(ValueError, match="does not divide"):
        split_batch(_batch(), 3)
    subs = split_batch(_batch(), 2)
    assert len(subs) == 4 and subs[1]["key"] == ["2", "3"]


# ------------------------------------------------------------------ the LightningModule's DGA path
TINY = {
    "_target_": "zerovl_lightning.model.build_dual_encoder",
    "model_name": "zerovl-tiny",
    "model_cfg": TINY_MODEL_CFG,
    "temperature": 0.07,
    "learn_temperature": True,
}
SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5}


def _zerovl_module(**kw):
    from zerovl_lightning.module import ZeroVLModule

    torch.manual_seed(0)  # the same random init for every module built here
    return ZeroVLModule(model=TINY, optimizer=SGD, scheduler={"warmup_fraction": 0.0}, **kw)


class _Capture(L.Callback):
    """Gradients as the optimizer is about to see them (after the DGA all-reduce and AMP unscaling)."""

    def __init__(self) -> None:
        self.grads: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(
            {k: p.grad.detach().clone() for k, p in pl_module.model.named_parameters() if p.grad is not None}
        )


def _fit(module, batch, precision="64-true", steps=1, plugins=None, accelerator="cpu"):
    cap = _Capture()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=1,
        precision=None if plugins else precision,
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cap],
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))
    return trainer, cap


def _batch32(n: int = N) -> dict:
    b = _batch(n)
    return {**b, "image": b["image"].float()}


def test_module_dga_step_equals_plain_step():
    batch = _batch32()
    plain, dga = _zerovl_module(), _zerovl_module(sub_batch_size=2)
    assert plain.automatic_optimization and not dga.automatic_optimization
    t_plain, cap_plain = _fit(plain, batch)
    t_dga, cap_dga = _fit(dga, batch)
    assert _max_rel_err(cap_dga.grads[0], cap_plain.grads[0]) <= TOL
    loss_plain, loss_dga = (float(t.callback_metrics["train/loss"]) for t in (t_plain, t_dga))
    assert abs(loss_dga - loss_plain) <= TOL * loss_plain
    assert float(t_dga.callback_metrics["train/sub_batches"]) == 4
    # one optimizer step and one LR-schedule step per global batch, as in the plain path
    assert t_dga.global_step == t_plain.global_step == 1
    assert (
        t_dga.lr_scheduler_configs[0].scheduler.last_epoch
        == t_plain.lr_scheduler_configs[0].scheduler.last_epoch
    )
    for (name, p), p_ref in zip(dga.model.named_parameters(), plain.model.parameters()):
        assert float((p - p_ref).detach().norm()) <= 1e-9 * max(float(p_ref.detach().norm()), 1.0), name


def test_module_dga_with_mixup_equals_full_batch_reference_and_logs_plan():
    batch = _batch32()
    mixup = {"enabled": True, "beta": 0.1, "seed": 0, "modalities": ["text"]}
    module = _zerovl_module(sub_batch_size=4, mixup=mixup)
    plan = module.mixup.plan(0)
    assert plan.modality == "text"
    ref_model = _zerovl_module().model.double()
    targets = SoftTargets(plan.alpha, global_partner(N, block=4))
    _full_step(ref_model, {**batch, "image": batch["image"].double()}, plan, block=4, targets=targets)
    trainer, cap = _fit(module, batch)
    assert _max_rel_err(cap.grads[0], _grads(ref_model)) <= TOL
    assert float(trainer.callback_metrics["mixup/alpha"]) == pytest.approx(plan.alpha)
    assert float(trainer.callback_metrics["mixup/modality"]) == 2.0


def test_module_mixup_state_is_checkpointed():
    module = _zerovl_module(mixup={"enabled": True, "seed": 11})
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    resumed = _zerovl_module(mixup={"enabled": True, "seed": 0})
    resumed.on_load_checkpoint(ckpt)
    assert [resumed.mixup.plan(s) for s in range(30, 40)] == [module.mixup.plan(s) for s in range(30, 40)]


def test_module_rejects_sub_batch_not_dividing_batch():
    batch = _batch32()
    with pytest.raises(ValueError, match=r"module\.sub_batch_size=3 must divide data\.batch_size=8"):
        _zerovl_module(sub_batch_size=3, batch_size=8)  # the per-rank batch comes from the config (train.build)
    with pytest.raises(ValueError, match=r"module\.sub_batch_size=3 must divide data\.batch_size"):
        _fit(_zerovl_module(sub_batch_size=3), batch, precision="32-true")
    with pytest.raises(ValueError, match="sub_batch_size"):
        _zerovl_module(sub_batch_size=0)


def _param_delta_norm(before: dict, module) -> float:
    """‖Δθ‖ / lr: the norm of the gradient SGD applied."""
    deltas = [p.detach() - before[k] for k, p in module.model.named_parameters() if p.requires_grad]
    return float(torch.linalg.vector_norm(torch.stack([d.norm() for d in deltas]))) / SGD["lr"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_module_dga_amp_unscales_clips_and_matches_fp32(precision):
    from lightning.pytorch.plugins import MixedPrecision

    batch = _batch32()
    _, cap_ref = _fit(_zerovl_module(), batch, precision="32-true")
    # fp16: a GradScaler whose first step does not overflow (the default 2**16 overflows on this model in both
    # paths; the skip is tested below)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if precision == "16-mixed" else None
    plugins = [MixedPrecision(precision, "cpu", scaler=scaler)]
    module = _zerovl_module(sub_batch_size=2, dga={"gradient_clip_val": 0.05})
    before = {k: p.detach().clone() for k, p in module.model.named_parameters()}
    trainer, cap = _fit(module, batch, plugins=plugins)
    # gradients seen before the step are unscaled and close to the fp32 full-batch ones (low-precision noise)
    assert _max_rel_err({k: cap.grads[0][k] for k in cap_ref.grads[0]}, cap_ref.grads[0]) <= 5e-2
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in cap.grads[0].values()])))
    assert grad_norm > 0.5  # so the clip below is active
    assert _param_delta_norm(before, module) == pytest.approx(0.05, rel=1e-3)  # clipped after unscaling
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
    if scaler is not None:
        assert scaler.get_scale() == 256.0  # no overflow, the step was applied


def test_module_dga_fp16_overflow_skips_the_step():
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # guaranteed fp16 overflow on the first step
    module = _zerovl_module(sub_batch_size=4)
    before = {k: p.detach().clone() for k, p in module.model.named_parameters()}
    trainer, _ = _fit(module, _batch32(), plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert all(torch.equal(p, before[k]) for k, p in module.model.named_parameters())  # step skipped
    assert scaler.get_scale() < 2.0**100  # and the scale backed off, as in the plain path
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 1


@pytest.mark.parametrize("sub_batch_size", [None, 2])
def test_logged_lr_is_the_rate_the_step_used(sub_batch_size):
    """``train/lr`` is the rate of this step's update, on the plain and the DGA path (warm-up: it changes)."""
    from zerovl_lightning.module import ZeroVLModule

    class Rates(L.Callback):
        def __init__(self) -> None:
            self.used: list[float] = []
            self.logged: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.used.append(optimizer.param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.logged.append(float(trainer.callback_metrics["train/lr"]))

    torch.manual_seed(0)
    module = ZeroVLModule(model=TINY, optimizer=SGD, scheduler={"warmup_fraction": 0.5}, sub_batch_size=sub_batch_size)
    rates = Rates()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rates])
    trainer.fit(module, DataLoader([_batch32()] * 4, batch_size=None))
    assert len(rates.used) == 4 and len(set(rates.used)) > 1  # warm-up: the rate moves every step
    assert rates.logged == pytest.approx(rates.used, rel=1e-7)  # Lightning logs a float32 tensor
