"""SigLIP loss: open_clip's value and gradients, soft targets against the formula, closed form vs autograd,
DGA equal to a full-batch step (float64), and the module's `loss=siglip` path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

from zerovl_lightning.dga import DecoupledStep, split_batch
from zerovl_lightning.loss import SoftTargets
from zerovl_lightning.mixup import MixupPlan, encode_pair, global_partner
from zerovl_lightning.siglip_loss import (
    SigLipLoss,
    SigLipObjective,
    siglip_embedding_gradients,
    siglip_embedding_gradients_autograd,
)

N, D = 8, 6
EXACT = 1e-12


def _emb(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    v = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    return u, v


def _params(scale: float = 10.0, bias: float = -10.0) -> tuple[torch.Tensor, torch.Tensor]:
    ls = torch.tensor(math.log(scale), dtype=torch.float64, requires_grad=True)
    lb = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    return ls, lb


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 0.5), (80.0, -4.0)])
def test_value_and_gradients_equal_open_clip(scale, bias):
    u0, v0 = _emb()
    results = []
    for fn in ("ours", "open_clip"):
        u, v = _leaf(u0), _leaf(v0)
        ls, lb = _params(scale, bias)
        if fn == "ours":
            loss = SigLipLoss()(u, v, ls.exp(), lb)
        else:
            loss = OpenClipSigLipLoss()(u, v, ls.exp(), lb)
        loss.backward()
        results.append((loss.detach(), u.grad, v.grad, ls.grad, lb.grad))
    (ours, theirs) = results
    assert abs(float(ours[0] - theirs[0])) <= EXACT * abs(float(theirs[0]))
    for a, b in zip(ours[1:], theirs[1:]):
        assert _rel(a, b) <= EXACT


def _soft_reference(u, v, ls, lb, alpha, partner) -> torch.Tensor:
    """The soft-target formula with an explicit N×N target matrix Y = α·I + (1−α)·F (test only)."""
    n = u.shape[0]
    y = alpha * torch.eye(n, dtype=u.dtype) + (1 - alpha) * torch.eye(n, dtype=u.dtype)[partner]
    logits = ls.exp() * u @ v.T + lb
    # binary cross-entropy of σ(l_ij) against y_ij, summed, over N
    return -(y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits)).sum() / n


@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0])
def test_soft_targets_value_and_gradient_match_the_formula(alpha):
    u0, v0 = _emb()
    partner = global_partner(N, block=4)
    targets = SoftTargets(alpha, partner)
    u, v = _leaf(u0), _leaf(v0)
    ls, lb = _params(5.0, -2.0)
    loss = SigLipLoss()(u, v, ls.exp(), lb, targets)
    loss.backward()
    ur, vr = _leaf(u0), _leaf(v0)
    lsr, lbr = _params(5.0, -2.0)
    ref = _soft_reference(ur, vr, lsr, lbr, alpha, partner)
    ref.backward()
    assert abs(float(loss.detach() - ref.detach())) <= EXACT * float(ref.detach())
    for a, b in ((u.grad, ur.grad), (v.grad, vr.grad), (ls.grad, lsr.grad), (lb.grad, lbr.grad)):
        assert _rel(a, b) <= EXACT
    # the analytic gradient G = (σ(l) − Y)/N, stated in the module docstring
    y = alpha * torch.eye(N, dtype=torch.float64) + (1 - alpha) * torch.eye(N, dtype=torch.float64)[partner]
    logits = 5.0 * u0 @ v0.T - 2.0
    g = (torch.sigmoid(logits) - y) / N
    assert _rel(u.grad, 5.0 * g @ v0) <= EXACT and _rel(v.grad, 5.0 * g.T @ u0) <= EXACT
    assert _rel(lb.grad, g.sum()) <= EXACT and _rel(ls.grad, (g * (logits + 2.0)).sum()) <= EXACT
    if alpha == 1.0:  # hard targets are open_clip's loss
        want = OpenClipSigLipLoss()(u0, v0, torch.tensor(5.0), torch.tensor(-2.0))
        assert abs(float(loss.detach() - want)) <= EXACT * float(want)


@pytest.mark.parametrize("alpha", [1.0, 0.35])
def test_closed_form_equals_autograd_for_every_rank_slice(alpha):
    """Local rows [offset, offset+n) of a global batch, as a rank sees them: the closed form gives the complete
    ∂L/∂u_loc, ∂L/∂v_loc, and shares of L, ∂L/∂logit_scale, ∂L/∂b that sum to the full-batch values."""
    u_all, v_all = _emb()
    targets = SoftTargets(alpha, global_partner(N, block=4)) if alpha < 1 else None
    u, v = _leaf(u_all), _leaf(v_all)
    ls, lb = _params(7.0, -3.0)
    loss = SigLipLoss()(u, v, ls.exp(), lb, targets)
    loss.backward()
    for parts in ([(0, 8)], [(0, 4), (4, 4)], [(0, 2), (2, 2), (4, 2), (6, 2)]):
        shares = []
        for offset, n in parts:
            args = (u_all[offset : offset + n], v_all[offset : offset + n], u_all, v_all, ls, lb, offset, targets)
            closed, oracle = siglip_embedding_gradients(*args), siglip_embedding_gradients_autograd(*args)
            assert _rel(closed.grad_image, u.grad[offset : offset + n]) <= EXACT
            assert _rel(closed.grad_text, v.grad[offset : offset + n]) <= EXACT
            # the oracle's image rows are local; its text gradient is a share until the all-reduce
            for name in ("loss_share", "grad_image", "grad_logit_scale", "grad_logit_bias"):
                assert _rel(getattr(closed, name), getattr(oracle, name)) <= EXACT, name
            shares.append(closed)
        assert abs(float(sum(c.loss_share for c in shares) - loss)) <= EXACT * float(loss)
        assert _rel(sum(c.grad_logit_scale for c in shares), ls.grad) <= EXACT
        assert _rel(sum(c.grad_logit_bias for c in shares), lb.grad) <= EXACT


def test_loss_is_fp32_under_autocast():
    u, v = (x.float().bfloat16() for x in _emb())
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SigLipLoss()(u, v, scale, bias)
        grads = siglip_embedding_gradients(u, v, u, v, scale.log(), bias, 0)
    assert loss.dtype == torch.float32 and grads.grad_image.dtype == torch.float32
    want = OpenClipSigLipLoss()(u.float(), v.float(), scale, bias)
    assert abs(float(loss - want)) <= 1e-6 * float(want)


# ------------------------------------------------------------------ DGA with SigLIP (tiny open_clip towers)
def _siglip_model(dropout: float):
    from test_dga import _model

    model = _model(dropout=dropout)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(10.0))
    model.clip.logit_bias = torch.nn.Parameter(torch.tensor(-10.0, dtype=torch.float64))
    return model


def _siglip_full(model, subs, plan=None, targets=None) -> tuple[torch.Tensor, dict]:
    """Reference: autograd through the K sub-batch forwards in sequence (the stochastic forward to match)."""
    from test_dga import _grads

    model.zero_grad(set_to_none=True)
    embs = [encode_pair(model, s["image"], s["text"], plan) for s in subs]
    u, v = torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs])
    loss = SigLipLoss()(u, v, model.logit_scale.exp(), model.logit_bias, targets)
    loss.backward()
    return loss.detach(), _grads(model)


def _siglip_dga(model, subs, plan=None, targets=None, **kw) -> tuple[torch.Tensor, dict]:
    from test_dga import _grads

    model.zero_grad(set_to_none=True)
    res = DecoupledStep(**kw)(
        model,
        lambda s: encode_pair(model, s["image"], s["text"], plan),
        subs,
        model.logit_scale,
        targets,
        objective=SigLipObjective(model.logit_scale, model.logit_bias),
    )
    return res.loss, _grads(model)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_siglip_dga_equals_full_batch_step_with_dropout(k):
    from test_dga import _batch, _max_rel_err

    model, batch = _siglip_model(dropout=0.1), _batch()
    subs = split_batch(batch, N // k)
    torch.manual_seed(7)
    loss_ref, g_ref = _siglip_full(model, subs)
    torch.manual_seed(7)
    loss, g = _siglip_dga(model, subs)
    assert g_ref["clip.logit_bias"].abs() > 0 and g_ref["clip.logit_scale"].abs() > 0
    assert _max_rel_err(g, g_ref) <= 1e-10
    assert abs(float(loss - loss_ref)) <= 1e-10 * float(loss_ref)
    torch.manual_seed(7)
    _, g_oracle = _siglip_dga(model, subs, closed_form=False)
    assert _max_rel_err(g_oracle, g_ref) <= 1e-10


@pytest.mark.parametrize("modality", ["image", "text"])
def test_siglip_dga_with_mixup_soft_targets(modality):
    from test_dga import _batch, _max_rel_err

    model, batch = _siglip_model(dropout=0.0), _batch()
    subs = split_batch(batch, 4)
    plan = MixupPlan(alpha=0.3, modality=modality)
    targets = SoftTargets(plan.alpha, global_partner(N, block=4))
    loss_ref, g_ref = _siglip_full(model, subs, plan, targets)
    loss, g = _siglip_dga(model, subs, plan, targets)
    assert _max_rel_err(g, g_ref) <= 1e-10
    assert abs(float(loss - loss_ref)) <= 1e-10 * float(loss_ref)
    _, g_hard = _siglip_full(model, subs, plan)  # the targets matter
    assert _max_rel_err(g_hard, g_ref) > 1e-3


def test_export_keeps_logit_bias_and_retrieval_runs(tmp_path):
    """A SigLIP-trained model exports with its logit_bias; open_clip rebuilds it; retrieval uses encode_* only."""
    import open_clip

    from zerovl_lightning.eval.retrieval import retrieval_ranks
    from zerovl_lightning.export import export_open_clip, load_exported
    from zerovl_lightning.model import build_tiny

    model = build_tiny(temperature=0.1, init_logit_bias=-10.0)
    with torch.no_grad():
        model.logit_bias.fill_(-7.25)
    export_open_clip(model, tmp_path / "export")
    clip = open_clip.create_model(f"local-dir:{tmp_path / 'export'}")
    assert float(clip.logit_bias) == -7.25 and float(clip.logit_scale.exp()) == pytest.approx(10.0)
    loaded = load_exported(tmp_path / "export")
    assert float(loaded.logit_bias) == -7.25
    images, tokens = torch.randn(4, 3, 32, 32), model.tokenize(["a", "b", "c", "d"])
    loaded.eval()
    with torch.no_grad():
        u, v = loaded.encode_image(images), loaded.encode_text(tokens)
    i2t, t2i, _ = retrieval_ranks(u, v, torch.arange(4))
    assert i2t.shape == t2i.shape == (4,) and int(i2t.max()) < 4
