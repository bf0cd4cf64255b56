"""The contrastive loss: equal to open_clip's ClipLoss, soft targets, closed-form gradients, tiny τ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from zerovl_lightning.loss import (
    ContrastiveLoss,
    SoftTargets,
    contrastive_loss_local,
    embedding_gradients,
    embedding_gradients_autograd,
)


def _embeddings(n: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    v = F.normalize(u + 0.8 * torch.randn(n, d, generator=g, dtype=dtype), dim=-1)  # correlated pairs
    return u, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _random_involution(n: int, seed: int = 0) -> torch.Tensor:
    """A random involution: random disjoint pairs swapped, some fixed points."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    partner = torch.arange(n)
    for a, b in perm[: 2 * (n // 3)].view(-1, 2).tolist():
        partner[a], partner[b] = b, a
    return partner


def _dense_reference(u, v, logit_scale, alpha, partner):
    """L with a dense Y via torch's probability-target cross-entropy (independent oracle; N×N is ok)."""
    n = u.shape[0]
    y = alpha * torch.eye(n, dtype=u.dtype) + (1 - alpha) * torch.eye(n, dtype=u.dtype)[partner]
    logits = logit_scale.exp() * u @ v.T
    return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y.T)) / 2


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves))


def test_equals_open_clip_clip_loss_value_and_gradient():
    u, v = _embeddings(16, 8, torch.float32)
    logit_scale = torch.tensor(2.7)  # log(1/τ), τ ≈ 0.067
    ours = _grads(lambda a, b, s: ContrastiveLoss()(a, b, s.exp()), u, v, logit_scale)
    ref = _grads(lambda a, b, s: ClipLoss()(a, b, s.exp()), u, v, logit_scale)
    for a, b in zip(ours, ref):
        assert _rel(a, b) <= 1e-6


def test_soft_targets_equal_alpha_mix_of_two_cross_entropies():
    """α·CE(logits, I) + (1−α)·CE(logits, F) in both directions, value and gradient."""
    n, alpha = 12, 0.3
    u, v = _embeddings(n, 6)
    logit_scale = torch.tensor(3.0, dtype=torch.float64)
    partner = torch.arange(n).flip(0)
    labels = torch.arange(n)

    def mixed_ce(a, b, s):
        logits = s.exp() * a @ b.T
        per_dir = [
            alpha * F.cross_entropy(lg, labels) + (1 - alpha) * F.cross_entropy(lg, partner)
            for lg in (logits, logits.T)
        ]
        return sum(per_dir) / 2

    ours = _grads(
        lambda a, b, s: ContrastiveLoss()(a, b, s.exp(), SoftTargets(alpha, partner)), u, v, logit_scale
    )
    ref = _grads(mixed_ce, u, v, logit_scale)
    dense = _grads(lambda a, b, s: _dense_reference(a, b, s, alpha, partner), u, v, logit_scale)
    for a, b, c in zip(ours, ref, dense):
        assert _rel(a, b) <= 1e-12
        assert _rel(a, c) <= 1e-12


def test_alpha_one_is_the_hard_loss():
    u, v = _embeddings(8, 4)
    s = torch.tensor(2.0, dtype=torch.float64).exp()
    hard = ContrastiveLoss()(u, v, s)
    soft = ContrastiveLoss()(u, v, s, SoftTargets(1.0, torch.arange(8).flip(0)))
    assert torch.equal(hard, soft)


@pytest.mark.parametrize("alpha", [None, 0.0, 0.37, 1.0])
def test_closed_form_matches_autograd_and_dense_formula(alpha):
    """∂L/∂U = scale·G·V/2N, ∂L/∂V = scale·Gᵀ·U/2N, ∂L/∂logit_scale = Σ G_ij s_ij/2N with G = P + Qᵀ − 2Y."""
    n = 10
    u, v = _embeddings(n, 5, seed=1)
    logit_scale = torch.tensor(2.5, dtype=torch.float64)
    partner = _random_involution(n)
    targets = None if alpha is None else SoftTargets(alpha, partner)
    closed = embedding_gradients(u, v, u, v, logit_scale, 0, targets)
    oracle = embedding_gradients_autograd(u, v, u, v, logit_scale, 0, targets)
    # direct autograd of the module loss
    loss, g_u, g_v, g_ls = _grads(
        lambda a, b, s: ContrastiveLoss()(a, b, s.exp(), targets), u, v, logit_scale
    )
    # the dense formula of zerovl-method.md §3
    a = 1.0 if alpha is None else alpha
    y = a * torch.eye(n, dtype=u.dtype) + (1 - a) * torch.eye(n, dtype=u.dtype)[partner]
    s = logit_scale.exp() * u @ v.T
    g = s.softmax(1) + s.T.softmax(1).T - 2 * y
    dense = (
        g @ v * logit_scale.exp() / (2 * n),
        g.T @ u * logit_scale.exp() / (2 * n),
        (g * s).sum() / (2 * n),
    )
    for res in (closed, oracle):
        assert _rel(res.loss_share, loss) <= 1e-12
        for got, want in zip((res.grad_image, res.grad_text, res.grad_logit_scale), (g_u, g_v, g_ls)):
            assert _rel(got, want) <= 1e-12
    for got, want in zip((closed.grad_image, closed.grad_text, closed.grad_logit_scale), dense):
        assert _rel(got, want) <= 1e-12


def test_local_rows_shares_add_up_to_the_full_loss():
    """Each row block's share (as one rank would compute it) sums to the full-batch loss."""
    n = 12
    u, v = _embeddings(n, 5)
    scale = torch.tensor(20.0, dtype=torch.float64)
    targets = SoftTargets(0.6, _random_involution(n, seed=3))
    full = ContrastiveLoss()(u, v, scale, targets)
    shares = [contrastive_loss_local(u[o : o + 4], v[o : o + 4], u, v, scale, o, targets) for o in (0, 4, 8)]
    assert _rel(sum(shares), full) <= 1e-12


def test_tiny_temperature_is_finite_and_accurate():
    """τ = 0.005: logits up to 200; fp32 loss and gradients finite and close to a float64 evaluation."""
    u, v = _embeddings(64, 16, torch.float32, seed=2)
    logit_scale = torch.tensor(1 / 0.005).log()
    targets = SoftTargets(0.2, torch.arange(64).flip(0))
    res32 = _grads(lambda a, b, s: ContrastiveLoss()(a, b, s.exp(), targets), u, v, logit_scale)
    res64 = _grads(
        lambda a, b, s: ContrastiveLoss()(a, b, s.exp(), targets),
        u.double(),
        v.double(),
        logit_scale.double(),
    )
    closed = embedding_gradients(u, v, u, v, logit_scale, 0, targets)
    for t in (*res32, closed.loss_share, closed.grad_image, closed.grad_text, closed.grad_logit_scale):
        assert torch.isfinite(t).all()
    assert float(res32[0]) > 1.0  # the loss really sits in the large-logit regime
    for a, b in zip(res32, res64):
        assert _rel(a.double(), b) <= 1e-4
    assert _rel(closed.grad_image.double(), res64[1]) <= 1e-4
    assert _rel(closed.grad_logit_scale.double(), res64[3]) <= 1e-4


def test_half_precision_inputs_are_computed_in_fp32():
    u, v = _embeddings(8, 4, torch.float32)
    s = torch.tensor(50.0)
    loss_bf16 = ContrastiveLoss()(u.bfloat16(), v.bfloat16(), s)
    assert loss_bf16.dtype == torch.float32
    ref = ContrastiveLoss()(u.bfloat16().float(), v.bfloat16().float(), s)
    assert torch.equal(loss_bf16, ref)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_loss_and_gradients_are_fp32_inside_autocast(amp_dtype):
    """Training runs the loss inside ``torch.autocast`` (Lightning's ``*-mixed``), with fp32 embeddings.

    Autocast would recast the ``@`` of the loss, the closed form and the oracle to half precision (before the
    fix, bf16: loss 6.0e-3, image gradient 4.3e-2, logit-scale gradient 4.2e-2 relative error); the math must
    match the same calls without autocast to fp32 rounding (≤ 1e-6; measured: bitwise equal).
    """
    n, d = 256, 64
    u, v = _embeddings(n, d, torch.float32, seed=3)
    logit_scale = torch.tensor(1 / 0.05).log()
    targets = SoftTargets(0.3, _random_involution(n, seed=1))

    def run():
        # the training loss: forward inside autocast, backward outside (where Lightning's automatic step runs it)
        leaves = [t.detach().clone().requires_grad_(True) for t in (u, v, logit_scale)]
        with torch.autocast("cpu", dtype=amp_dtype, enabled=torch.is_autocast_enabled("cpu")):
            value = ContrastiveLoss()(leaves[0], leaves[1], leaves[2].exp(), targets)
        with torch.autocast("cpu", enabled=False):
            loss = [value.detach(), *torch.autograd.grad(value, leaves)]
        closed = embedding_gradients(u, v, u, v, logit_scale, 0, targets)
        oracle = embedding_gradients_autograd(u, v, u, v, logit_scale, 0, targets)
        return [
            *loss,
            *(getattr(r, f) for r in (closed, oracle) for f in ("loss_share", "grad_image", "grad_text",
                                                                 "grad_logit_scale")),
        ]

    want = run()
    with torch.autocast("cpu", dtype=amp_dtype):
        assert torch.is_autocast_enabled("cpu")
        got = run()
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert _rel(g, w) <= 1e-6


def test_soft_targets_validation():
    with pytest.raises(ValueError):
        SoftTargets(1.5, torch.arange(4))
    with pytest.raises(ValueError):
        SoftTargets(0.5, torch.arange(4).float())
    with pytest.raises(ValueError):
        SoftTargets(0.5, torch.tensor([1, 2, 0])).check_involution()
    SoftTargets(0.5, torch.tensor([2, 1, 0])).check_involution()
    u, v = _embeddings(4, 3)
    with pytest.raises(ValueError, match="global batch"):
        ContrastiveLoss()(u, v, torch.tensor(1.0), SoftTargets(0.5, torch.arange(6)))
