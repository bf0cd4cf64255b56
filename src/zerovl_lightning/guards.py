"""Numerical guards: a non-finite loss or gradient never reaches the weights silently.

:class:`NonFiniteGuard` looks at every optimizer step right before it is applied (Lightning's
``on_before_optimizer_step``: after backward, after the DDP all-reduce, after AMP unscaling) and either drops
the update (``action="skip"``, counted) or stops the run with a message naming the global step and the first
non-finite tensor (``action="stop"``). The same hook fires for automatic and for manual optimization
(``opt.step()`` on Lightning's optimizer, the DGA path), so both are covered.

Under fp16 AMP a non-finite gradient is normal overflow: the GradScaler already skips that step and lowers its
scale, so the guard only counts it (``guard/amp_overflow_steps``) and acts on non-finite *losses* only.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)

Action = Literal["skip", "stop"]


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (or too many skipped steps)."""


class NonFiniteGuard(L.Callback):
    """Skip (and count) or stop on non-finite losses/gradients; count AMP overflow steps. Never silent.

    Args:
        action: ``"skip"`` drops the step's update (all gradients set to ``None``, so the optimizer leaves the
            weights and its moments untouched) and warns; ``"stop"`` raises :class:`NonFiniteError`.
        max_skips: with ``"skip"``, raise once more than this many steps were skipped in the run (a run that
            keeps producing NaNs has diverged; skipping forever would hide it). ``None``: no limit.
        check_grads: also check every gradient (one fused reduction per step); the loss is always checked.

    Logs ``guard/skipped_steps`` and ``guard/amp_overflow_steps`` every training batch. Both counters are part
    of the checkpoint (``state_dict``), so they keep counting across resumes. Under DDP the decision is
    all-reduced, so every rank skips (or stops) the same step.
    """

    def __init__(
        self, action: Action = "skip", max_skips: int | None = 100, check_grads: bool = True
    ) -> None:
        if action not in ("skip", "stop"):
            raise ValueError(f"NonFiniteGuard action must be 'skip' or 'stop', got {action!r}")
        if max_skips is not None and max_skips < 0:
            raise ValueError(f"max_skips must be >= 0 or None, got {max_skips}")
        self.action = action
        self.max_skips = max_skips
        self.check_grads = check_grads
        self.skipped_steps = 0
        self.amp_overflow_steps = 0
        self._loss_ok: list[torch.Tensor] = []  # one flag per backward since the last optimizer step
        self._losses: list[torch.Tensor] = []
        self._scale_before: torch.Tensor | None = None  # the GradScaler's scale (device tensor, no sync)
        self._overflows: torch.Tensor | None = None  # overflow steps counted on device since the last read

    # ------------------------------------------------------------------ hooks
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # Kept as device tensors: no host sync here; several backwards (accumulation, DGA) → several flags.
        self._loss_ok.append(torch.isfinite(loss.detach()).all())
        self._losses.append(loss.detach())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = _grad_scaler(trainer)
        if scaler is not None and getattr(scaler, "_scale", None) is not None:
            self._scale_before = scaler._scale.detach().clone()  # get_scale() would sync the host
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        flags = list(self._loss_ok)
        # fp16 AMP: non-finite grads are the scaler's overflow handling, not a fault.
        if self.check_grads and scaler is None and params:
            flags.append(_all_finite([p.grad for p in params]))
        # one device→host read per step (the skip decision needs it), not one per flag
        local_bad = bool(flags) and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
        bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        losses, self._loss_ok, self._losses = self._losses, [], []
        if not bad:
            return
        step = trainer.global_step  # the step being taken (global_step counts completed optimizer steps)
        culprit = self._culprit(pl_module, params, losses, scaler is None) if local_bad else "on another rank"
        if self.action == "stop":
            raise NonFiniteError(f"Non-finite {culprit} at global step {step}; stopping (guard action=stop).")
        for p in params:
            p.grad = None
        self.skipped_steps += 1
        msg = (
            f"Non-finite {culprit} at global step {step}: skipped this optimizer step "
            f"({self.skipped_steps} skipped so far)."
        )
        log.warning(msg)
        rank_zero_warn(msg)
        if self.max_skips is not None and self.skipped_steps > self.max_skips:
            raise NonFiniteError(
                f"{self.skipped_steps} optimizer steps had non-finite values (last: {culprit} at global step "
                f"{step}), more than max_skips={self.max_skips}; stopping."
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        scaler = _grad_scaler(trainer)
        if scaler is not None and self._scale_before is not None:
            # GradScaler.update() lowers the scale exactly when the step had inf/NaN gradients; counted on the
            # device (no host sync per step), read when logged or checkpointed.
            lowered = (scaler._scale < self._scale_before).to(torch.int64)
            self._overflows = lowered if self._overflows is None else self._overflows + lowered
            self._scale_before = None
        pl_module.log(
            "guard/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1
        )
        overflow = self.amp_overflow_steps if self._overflows is None else self._overflows + self.amp_overflow_steps
        pl_module.log(
            "guard/amp_overflow_steps",
            overflow.float() if torch.is_tensor(overflow) else float(overflow),
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fold_overflows()

    # ------------------------------------------------------------------ state
    def _fold_overflows(self) -> None:
        if self._overflows is not None:
            self.amp_overflow_steps += int(self._overflows)
            self._overflows = None

    def state_dict(self) -> dict[str, Any]:
        self._fold_overflows()
        return {"skipped_steps": self.skipped_steps, "amp_overflow_steps": self.amp_overflow_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.amp_overflow_steps = int(state_dict.get("amp_overflow_steps", 0))
        self._overflows = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _culprit(
        pl_module: L.LightningModule,
        params: list[torch.nn.Parameter],
        losses: list[torch.Tensor],
        grads_checked: bool,
    ) -> str:
        """Name the first non-finite tensor: ``loss (value nan)`` or ``gradient of <parameter name>``."""
        for loss in losses:
            if not bool(torch.isfinite(loss).all()):
                return f"loss (value {loss.float().flatten()[0].item()})"
        if grads_checked:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            for p in params:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    return f"gradient of {names.get(id(p), f'<unnamed {tuple(p.shape)}>')}"
        return "value"


def _grad_scaler(trainer: L.Trainer) -> torch.amp.GradScaler | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One bool tensor: are all elements of all tensors finite? (Grouped per device, no host sync.)"""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    flags = []
    for ts in by_device.values():
        # The norm of a tensor with inf/NaN is inf/NaN; for fp32/bf16 gradients a finite tensor has a finite
        # norm unless its values exceed ~1e19, which a guard should flag anyway.
        ts = [t.detach().float() if t.dtype == torch.float16 else t.detach() for t in ts]
        norms = torch._foreach_norm(ts)
        flags.append(torch.isfinite(torch.stack(norms)).all())
    return torch.stack([f.to(flags[0].device) for f in flags]).all()
