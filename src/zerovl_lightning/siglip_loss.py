"""The pairwise sigmoid loss (SigLIP, Zhai et al. 2023) with soft targets, exact under DDP and DGA.

Over the global batch of N pairs, with u_i / v_j unit image / text embeddings, t = exp(logit_scale) and the bias
b (SigLIP's init: t = 10, b = −10), logits l_ij = t·⟨u_i, v_j⟩ + b and targets y_ij ∈ [0, 1]:

    L = (1/N) Σ_ij [softplus(l_ij) − y_ij·l_ij]       (the binary cross-entropy of σ(l_ij) against y_ij)

Hard targets y = I give SigLIP's −(1/N) Σ_ij log σ(z_ij l_ij) (z = 2y − 1), the value of open_clip's
``SigLipLoss``. Under coin-flipping mixup the targets are ZeroVL's Y = α·I + (1−α)·F (F the partner
involution): the pair (i, j) is a positive with weight α if j = i, 1−α if j = partner(i), 0 otherwise — the
same soft targets InfoNCE uses, read as per-pair Bernoulli targets (they sum to 1 over each row and column).

Gradients, with G_ij = (σ(l_ij) − y_ij)/N:  ∂L/∂u_i = t·Σ_j G_ij v_j,  ∂L/∂v_j = t·Σ_i G_ij u_i,
∂L/∂logit_scale = Σ_ij G_ij (l_ij − b),  ∂L/∂b = Σ_ij G_ij.  Unlike the softmax, σ is element-wise, so a
rank computes its rows and columns of G from the gathered embeddings without any further collective.

Each rank scores its own images against all texts ("local rows", texts gathered with gradient): each pair
(i, j) is counted exactly once over the ranks, and DDP's averaging of the local means gives the full-batch
gradient. Everything runs in fp32 with autocast off (float64 stays float64 for the exactness tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zerovl_lightning.distributed import WorldInfo, world_info
from zerovl_lightning.loss import EmbeddingGrads, SoftTargets, _target_columns, fp32_math, gather_rows, to_fp32

SIGLIP_INIT_SCALE = 10.0  # t, i.e. logit_scale = log 10 (temperature 0.1)
SIGLIP_INIT_BIAS = -10.0


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + eˣ) without F.softplus's linear cut-off above 20 (an error of e⁻²⁰ per pair)."""
    return -F.logsigmoid(-x)


def _target_dot(logits: torch.Tensor, rows: torch.Tensor, partner: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Σ_ij y_ij·l_ij over the local rows, by index arithmetic (no N×N target matrix). logits [n, N]."""
    own = logits.gather(1, rows[:, None]).sum()
    if partner is None or alpha == 1.0:
        return own
    return alpha * own + (1.0 - alpha) * logits.gather(1, partner[:, None]).sum()


def _subtract_targets_(
    sig: torch.Tensor, rows: torch.Tensor, partner: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """σ(l) − y in place for the local rows ``rows`` of a [n, N] matrix (y symmetric, so rows or columns)."""
    local = torch.arange(sig.shape[0], device=sig.device)
    if partner is None or alpha == 1.0:
        sig[local, rows] -= 1.0
        return sig
    own = torch.full((sig.shape[0],), alpha, dtype=sig.dtype, device=sig.device)
    sig.index_put_((local, rows), -own, accumulate=True)
    sig.index_put_((local, partner), own - 1.0, accumulate=True)  # −(1−α); partner may equal rows
    return sig


def siglip_loss_local(
    image_emb: torch.Tensor,
    all_text_emb: torch.Tensor,
    logit_scale_exp: torch.Tensor,
    logit_bias: torch.Tensor,
    offset: int,
    targets: SoftTargets | None = None,
) -> torch.Tensor:
    """(1/N)·Σ over the local image rows i and all texts j of the pair losses: this rank's share of L.

    image_emb [n, D] are rows ``offset … offset+n`` of the global batch; all_text_emb [N, D].
    """
    n, num = image_emb.shape[0], all_text_emb.shape[0]
    with fp32_math(image_emb.device):
        logits = to_fp32(logit_scale_exp) * to_fp32(image_emb) @ to_fp32(all_text_emb).T  # [n, N]
        logits = logits + to_fp32(logit_bias)
        rows = torch.arange(offset, offset + n, device=image_emb.device)
        alpha, partner = _target_columns(rows, targets, num)
        return (_softplus(logits).sum() - _target_dot(logits, rows, partner, alpha)) / num


class SigLipLoss(nn.Module):
    """The SigLIP loss with soft targets; returns this rank's local mean (its shares, averaged, give L).

    Texts are gathered with gradient (the images stay local: each rank owns the rows of its images), so
    DDP's gradient averaging gives exactly the full-batch gradient. ``gather_with_grad=False`` keeps only the
    local slice differentiable (wrong gradients under DDP; kept for comparison, as in ContrastiveLoss).
    """

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale_exp: torch.Tensor,
        logit_bias: torch.Tensor,
        targets: SoftTargets | None = None,
    ) -> torch.Tensor:
        world = world_info()
        offset = world.rank * image_emb.shape[0]
        all_text = gather_rows(text_emb, world, offset, self.gather_with_grad)  # [N, D]
        share = siglip_loss_local(image_emb, all_text, logit_scale_exp, logit_bias, offset, targets)
        return share * world.world_size


@dataclass
class SigLipGrads(EmbeddingGrads):
    """:class:`EmbeddingGrads` plus this rank's additive share of ∂L/∂logit_bias."""

    grad_logit_bias: torch.Tensor | None = None


@torch.no_grad()
def siglip_embedding_gradients(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    all_image_emb: torch.Tensor,
    all_text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    offset: int,
    targets: SoftTargets | None = None,
    world: WorldInfo | None = None,
) -> SigLipGrads:
    """Closed-form ∂L/∂u_loc, ∂L/∂v_loc and this rank's shares of L, ∂L/∂logit_scale, ∂L/∂logit_bias.

    ``logit_scale`` is the parameter log t. No collective; memory: two ``n × N`` fp32 matrices.
    """
    del world  # element-wise σ: the local rows and columns of G need nothing from other ranks
    with fp32_math(image_emb.device):
        u, v = to_fp32(image_emb), to_fp32(text_emb)  # [n, D]
        u_all, v_all = to_fp32(all_image_emb), to_fp32(all_text_emb)  # [N, D]
        n, num = u.shape[0], u_all.shape[0]
        scale = to_fp32(logit_scale.detach()).exp()
        bias = to_fp32(logit_bias.detach())
        rows = torch.arange(offset, offset + n, device=u.device)
        alpha, partner = _target_columns(rows, targets, num)

        l_img = scale * u @ v_all.T + bias  # [n, N]: l_ij for the local images i
        l_txt = scale * v @ u_all.T + bias  # [n, N]: l_ij (transposed) for the local texts j
        loss_share = (_softplus(l_img).sum() - _target_dot(l_img, rows, partner, alpha)) / num
        g_img = _subtract_targets_(torch.sigmoid(l_img), rows, partner, alpha)  # N·G, local rows
        g_txt = _subtract_targets_(torch.sigmoid(l_txt), rows, partner, alpha)  # N·Gᵀ, local columns
        grad_image = (scale / num) * (g_img @ v_all)  # [n, D]
        grad_text = (scale / num) * (g_txt @ u_all)  # [n, D]
        grad_logit_scale = (g_img * (l_img - bias)).sum() / num  # the local rows' share
        grad_logit_bias = g_img.sum() / num
    return SigLipGrads(loss_share, grad_image, grad_text, grad_logit_scale, grad_logit_bias)


def siglip_embedding_gradients_autograd(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    all_image_emb: torch.Tensor,
    all_text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    offset: int,
    targets: SoftTargets | None = None,
    world: WorldInfo | None = None,
) -> SigLipGrads:
    """The oracle for :func:`siglip_embedding_gradients`: autograd on detached fp32 leaves + one all-reduce."""
    world = world if world is not None else world_info()
    n = image_emb.shape[0]
    with torch.enable_grad():
        u_all = to_fp32(all_image_emb.detach()).requires_grad_(True)  # [N, D]
        v_all = to_fp32(all_text_emb.detach()).requires_grad_(True)
        ls = to_fp32(logit_scale.detach()).requires_grad_(True)
        lb = to_fp32(logit_bias.detach()).requires_grad_(True)
        share = siglip_loss_local(u_all[offset : offset + n], v_all, ls.exp(), lb, offset, targets)
        g_u, g_v, g_ls, g_lb = torch.autograd.grad(share, (u_all, v_all, ls, lb))
    if world.distributed:
        g_uv = torch.stack([g_u, g_v])  # [2, N, D]: every rank's rows reach every rank's texts
        torch.distributed.all_reduce(g_uv, group=world.group)
        g_u, g_v = g_uv[0], g_uv[1]
    return SigLipGrads(
        share.detach(),
        g_u[offset : offset + n].clone(),
        g_v[offset : offset + n].clone(),
        g_ls.detach(),
        g_lb.detach(),
    )


@dataclass
class SigLipObjective:
    """SigLIP as a DGA objective (dga.DGAObjective): closed-form (or oracle) gradients, parameters t and b."""

    logit_scale: nn.Parameter
    logit_bias: nn.Parameter

    def embedding_gradients(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        all_image_emb: torch.Tensor,
        all_text_emb: torch.Tensor,
        offset: int,
        targets: SoftTargets | None,
        world: WorldInfo,
        closed_form: bool,
    ) -> SigLipGrads:
        fn = siglip_embedding_gradients if closed_form else siglip_embedding_gradients_autograd
        return fn(
            image_emb,
            text_emb,
            all_image_emb,
            all_text_emb,
            self.logit_scale.detach(),
            self.logit_bias.detach(),
            offset,
            targets,
            world,
        )

    def parameter_gradients(self, grads: EmbeddingGrads) -> list[tuple[nn.Parameter, torch.Tensor]]:
        assert isinstance(grads, SigLipGrads) and grads.grad_logit_bias is not None
        return [(self.logit_scale, grads.grad_logit_scale), (self.logit_bias, grads.grad_logit_bias)]
