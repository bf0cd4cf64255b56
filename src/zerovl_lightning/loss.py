"""Symmetric InfoNCE with soft targets (ZeroVL §3), local loss + gather-with-gradient under DDP (§5).

Notation (zerovl-method.md): over the global batch of N pairs, u_i / v_j unit image / text embeddings,
s_ij = u_i·v_j·scale with scale = exp(logit_scale) = 1/τ, P = row-softmax(S) (image→text),
Q = row-softmax(Sᵀ) (text→image), targets Y = α·I + (1−α)·F with F the partner permutation (an involution,
so Y is symmetric with unit rows), and

    L = −(1/2N) Σ_ij Y_ij log P_ij − (1/2N) Σ_ij Y_ij log Q_ji.

With G = P + Qᵀ − 2Y:  ∂L/∂s_ij = G_ij/2N,  ∂L/∂U = scale·G·V/2N,  ∂L/∂V = scale·Gᵀ·U/2N,
∂L/∂logit_scale = Σ_ij (G_ij/2N)·s_ij.

Everything is fp32 — also inside an autocast region (Lightning's ``16-mixed`` / ``bf16-mixed`` run the step under
``torch.autocast``, which would recast every ``@`` to half precision even for fp32 inputs; see
:func:`fp32_math`) — and log-softmax / logsumexp based (τ = 0.005 gives logits of 200; the official ZeroVL code
exponentiates without max subtraction and overflows there). No N×N identity or permutation matrix is built:
targets are two column indices per row (``rows`` and ``partner[rows]``) gathered from the log-softmax.

Each rank only computes its own rows (``n × N`` logits in each direction):

- :class:`ContrastiveLoss` — the training loss: this rank's local loss; with gather-with-gradient, DDP's
  gradient averaging gives exactly the full-batch gradient, and the mean over ranks is the full-batch loss.
- :func:`embedding_gradients` — closed-form ∂L/∂(local embeddings) and this rank's share of ∂L/∂logit_scale
  from gathered, detached embeddings (the DGA fast path); :func:`embedding_gradients_autograd` — the same by
  autograd on detached leaf copies (the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zerovl_lightning.distributed import WorldInfo, all_gather_no_grad, all_gather_with_grad, world_info


@dataclass(frozen=True)
class SoftTargets:
    """Y = α·I + (1−α)·F over the global batch; ``partner`` [N] (long) is an involution of global indices.

    ``alpha = 1`` (or ``partner[i] = i``) is the hard InfoNCE target.
    """

    alpha: float
    partner: torch.Tensor

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.partner.dim() != 1 or self.partner.dtype != torch.long:
            raise ValueError("partner must be a 1-D LongTensor of global indices")

    def check_involution(self) -> None:
        """Y is symmetric iff F is an involution; the closed form G = P + Qᵀ − 2Y relies on it."""
        idx = torch.arange(len(self.partner), device=self.partner.device)
        if not torch.equal(self.partner[self.partner], idx):
            raise ValueError("partner must be an involution (partner[partner[i]] == i)")


def to_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half / bf16 to fp32 (float64 stays float64, for exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def fp32_math(device: torch.device) -> torch.autocast:
    """A region where autocast is off: the loss math runs in the inputs' (upcast) dtype, not bf16/fp16.

    Upcasting the inputs is not enough: autocast recasts ``@`` back to half precision (measured under
    bf16 autocast: 6e-3 relative error in the loss, 4e-2 in the gradients).
    """
    return torch.autocast(device.type, enabled=False)


def _target_columns(
    rows: torch.Tensor, targets: SoftTargets | None, num_global: int
) -> tuple[float, torch.Tensor | None]:
    """(α, partner columns [n] or None) for the local ``rows`` [n] of the global batch."""
    if targets is None:
        return 1.0, None
    if targets.partner.numel() != num_global:
        raise ValueError(f"targets.partner has {targets.partner.numel()} entries, the global batch has {num_global}")
    return float(targets.alpha), targets.partner.to(rows.device)[rows]


def _soft_nll(logits: torch.Tensor, rows: torch.Tensor, partner: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Σ over the local rows of −Σ_j Y_ij log softmax(logits_i)_j  (a sum, not a mean). logits [n, N]."""
    logp = logits.log_softmax(dim=-1)  # [n, N]
    nll = -logp.gather(1, rows[:, None]).sum()
    if partner is None or alpha == 1.0:
        return nll
    return alpha * nll - (1.0 - alpha) * logp.gather(1, partner[:, None]).sum()


def contrastive_loss_local(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    all_image_emb: torch.Tensor,
    all_text_emb: torch.Tensor,
    logit_scale_exp: torch.Tensor,
    offset: int,
    targets: SoftTargets | None = None,
) -> torch.Tensor:
    """Sum of the loss terms of the local rows, divided by 2N: this rank's additive share of the full loss L.

    image_emb / text_emb [n, D] are rows ``offset … offset+n`` of all_image_emb / all_text_emb [N, D].
    """
    n, num = image_emb.shape[0], all_image_emb.shape[0]
    with fp32_math(image_emb.device):
        scale = to_fp32(logit_scale_exp)
        logits_per_image = scale * to_fp32(image_emb) @ to_fp32(all_text_emb).T  # [n, N]
        logits_per_text = scale * to_fp32(text_emb) @ to_fp32(all_image_emb).T  # [n, N]
        rows = torch.arange(offset, offset + n, device=image_emb.device)
        alpha, partner = _target_columns(rows, targets, num)
        total = _soft_nll(logits_per_image, rows, partner, alpha) + _soft_nll(logits_per_text, rows, partner, alpha)
        return total / (2 * num)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE with soft targets; returns this rank's local loss (mean over its rows).

    Under DDP the embeddings of all ranks are gathered (with gradient by default) and each rank scores its own
    rows against the whole world batch, like OpenCLIP's ``--local-loss --gather-with-grad``: DDP's averaging
    of the local gradients is then exactly the full-batch gradient, and the mean of the local losses over
    ranks is the full-batch loss. ``gather_with_grad=False`` keeps only the local slice differentiable
    (OpenCLIP's default, not the full-batch gradient; kept for comparison).
    """

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale_exp: torch.Tensor,
        targets: SoftTargets | None = None,
    ) -> torch.Tensor:
        world = world_info()
        offset = world.rank * image_emb.shape[0]
        all_image = gather_rows(image_emb, world, offset, self.gather_with_grad)  # [N, D]
        all_text = gather_rows(text_emb, world, offset, self.gather_with_grad)
        share = contrastive_loss_local(image_emb, text_emb, all_image, all_text, logit_scale_exp, offset, targets)
        return share * world.world_size  # local mean: the shares of the W ranks sum to L, so this averages to L


def gather_rows(x: torch.Tensor, world: WorldInfo, offset: int, with_grad: bool) -> torch.Tensor:
    """All ranks' rows of ``x`` [n, D] → [N, D] in rank order. ``with_grad``: differentiable for every row
    (the full-batch gradient under DDP); else only this rank's rows (at ``offset``) keep their gradient."""
    if not world.distributed:
        return x
    if with_grad:
        return all_gather_with_grad(x, world)
    full = all_gather_no_grad(x.detach(), world)
    return torch.cat([full[:offset], x, full[offset + x.shape[0] :]], dim=0)


@dataclass
class EmbeddingGrads:
    """Gradients of the full-batch loss L w.r.t. this rank's inputs, from gathered detached embeddings.

    ``loss_share`` and ``grad_logit_scale`` are this rank's additive shares: summing them over ranks gives
    the full loss and ∂L/∂logit_scale. ``grad_image`` / ``grad_text`` [n, D] are complete ∂L/∂u_loc,
    ∂L/∂v_loc.
    """

    loss_share: torch.Tensor
    grad_image: torch.Tensor
    grad_text: torch.Tensor
    grad_logit_scale: torch.Tensor


@torch.no_grad()
def embedding_gradients(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    all_image_emb: torch.Tensor,
    all_text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int,
    targets: SoftTargets | None = None,
    world: WorldInfo | None = None,
) -> EmbeddingGrads:
    """Closed-form ∂L/∂u_loc, ∂L/∂v_loc and this rank's share of ∂L/∂logit_scale (fp32, logsumexp).

    ``logit_scale`` is the parameter log(1/τ). One collective: the per-row log-sum-exps (2n floats) of all
    ranks, needed for the P / Qᵀ entries of the columns this rank owns. Memory: a few ``n × N`` fp32
    matrices.
    """
    world = world if world is not None else world_info()
    with fp32_math(image_emb.device):
        u, v = to_fp32(image_emb), to_fp32(text_emb)  # [n, D]
        u_all, v_all = to_fp32(all_image_emb), to_fp32(all_text_emb)  # [N, D]
        n, num = u.shape[0], u_all.shape[0]
        scale = to_fp32(logit_scale.detach()).exp()
        rows = torch.arange(offset, offset + n, device=u.device)
        alpha, partner = _target_columns(rows, targets, num)

        s_img = scale * u @ v_all.T  # [n, N]: s_ij for local images i
        s_txt = scale * v @ u_all.T  # [n, N]: s_ij (transposed) for local texts j
        lse_img = s_img.logsumexp(dim=1)  # [n]: log Σ_j exp s_ij
        lse_txt = s_txt.logsumexp(dim=1)  # [n]: log Σ_i exp s_ij
        lse_all = all_gather_no_grad(torch.stack([lse_img, lse_txt], dim=1), world)  # [N, 2]
        lse_img_all, lse_txt_all = lse_all[:, 0], lse_all[:, 1]

        # Rows of G for local images i: P_ij + Q_ji − 2Y_ij; columns of G for local texts j: P_ij + Q_ji − 2Y_ij.
        g_img = (s_img - lse_img[:, None]).exp_() + (s_img - lse_txt_all[None, :]).exp_()  # [n, N], Y part below
        g_txt = (s_txt - lse_txt[:, None]).exp_() + (s_txt - lse_img_all[None, :]).exp_()  # [n, N]

        # Y·(·) without Y: α at the own column, 1−α at the partner column.
        def y_rows(x_all: torch.Tensor) -> torch.Tensor:  # Σ_j Y_ij x_j for the local rows i → [n, ...]
            out = x_all[rows] if partner is None else alpha * x_all[rows] + (1.0 - alpha) * x_all[partner]
            return out

        def y_dot(s: torch.Tensor) -> torch.Tensor:  # Σ_j Y_ij s_ij for the local rows → [n]
            own = s.gather(1, rows[:, None]).squeeze(1)
            if partner is None:
                return own
            return alpha * own + (1.0 - alpha) * s.gather(1, partner[:, None]).squeeze(1)

        coef = scale / (2 * num)
        grad_image = coef * (g_img @ v_all - 2.0 * y_rows(v_all))  # [n, D]
        grad_text = coef * (g_txt @ u_all - 2.0 * y_rows(u_all))  # [n, D]

        y_s_img, y_s_txt = y_dot(s_img), y_dot(s_txt)  # [n]
        # Σ_ij G_ij s_ij split by ownership: the P (and Y) terms of local image rows, the Q (and Y) terms of
        # local texts.
        p_s = ((s_img - lse_img[:, None]).exp() * s_img).sum()
        q_s = ((s_txt - lse_txt[:, None]).exp() * s_txt).sum()
        grad_logit_scale = (p_s + q_s - y_s_img.sum() - y_s_txt.sum()) / (2 * num)
        loss_share = ((lse_img - y_s_img).sum() + (lse_txt - y_s_txt).sum()) / (2 * num)
        return EmbeddingGrads(loss_share, grad_image, grad_text, grad_logit_scale)


def embedding_gradients_autograd(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    all_image_emb: torch.Tensor,
    all_text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int,
    targets: SoftTargets | None = None,
    world: WorldInfo | None = None,
) -> EmbeddingGrads:
    """The oracle for :func:`embedding_gradients`: autograd of this rank's loss share on detached fp32 leaves.

    Leaves are the gathered [N, D] embeddings (the local rows are a view of them), so the loss rows of other
    ranks reach this rank's embeddings through one sum all-reduce of the [N, D] leaf gradients — the same
    algebra as gather-with-gradient.
    """
    world = world if world is not None else world_info()
    n = image_emb.shape[0]
    with torch.enable_grad(), fp32_math(image_emb.device):  # the backward too: autocast would recast its `@`
        u_all = to_fp32(all_image_emb.detach()).requires_grad_(True)  # [N, D]
        v_all = to_fp32(all_text_emb.detach()).requires_grad_(True)
        ls = to_fp32(logit_scale.detach()).requires_grad_(True)
        share = contrastive_loss_local(
            u_all[offset : offset + n], v_all[offset : offset + n], u_all, v_all, ls.exp(), offset, targets
        )
        g_u, g_v, g_ls = torch.autograd.grad(share, (u_all, v_all, ls))
    if world.distributed:
        g_uv = torch.stack([g_u, g_v])  # [2, N, D]
        torch.distributed.all_reduce(g_uv, group=world.group)
        g_u, g_v = g_uv[0], g_uv[1]
    return EmbeddingGrads(
        share.detach(), g_u[offset : offset + n].clone(), g_v[offset : offset + n].clone(), g_ls.detach()
    )
