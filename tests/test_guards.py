"""NonFiniteGuard: a NaN loss or gradient at step k is skipped (update dropped, counted, warned) or stops
the run with a message naming the step and the tensor; AMP overflow steps are counted; DDP ranks agree."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from zerovl_lightning.checkpointing import RNGStateCheckpoint
from zerovl_lightning.guards import NonFiniteError, NonFiniteGuard

NAN_STEP = 3


class Tiny(L.LightningModule):
    """A linear regression whose loss (or one gradient) turns NaN at global step ``bad_step``."""

    def __init__(
        self, bad_step: int | None = NAN_STEP, where: str = "loss", manual: bool = False, scale: float = 1.0
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 2)
        self.head = torch.nn.Linear(2, 1)
        self.bad_step, self.where, self.scale = bad_step, where, scale
        self.automatic_optimization = not manual
        if where == "grad":
            self.head.weight.register_hook(self._poison_grad)

    def _poison_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.where == "grad" and self.global_step == self.bad_step:
            return grad * math.nan
        return grad

    def training_step(self, batch, batch_idx):
        loss = self.head(self.layer(batch[0])).pow(2).mean() * self.scale
        if self.where == "loss" and self.global_step == self.bad_step:
            loss = loss * math.nan
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


class Record(L.Callback):
    """Parameters after every batch, and the logged guard counters."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.logged: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone())
        if "guard/skipped_steps" in trainer.callback_metrics:
            self.logged.append(float(trainer.callback_metrics["guard/skipped_steps"]))


def _fit(module: L.LightningModule, guard: NonFiniteGuard, steps: int = 6, **kw) -> Record:
    rec = Record()
    data = DataLoader(
        TensorDataset(torch.randn(4 * steps, 4, generator=torch.Generator().manual_seed(1))), batch_size=4
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, rec],
        **kw,
    )
    trainer.fit(module, data)
    return rec


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_nan_loss_is_skipped_counted_and_warned(manual, caplog):
    guard = NonFiniteGuard(action="skip")
    msg = rf"Non-finite loss \(value nan\) at global step {NAN_STEP}: skipped"
    with pytest.warns(UserWarning, match=msg):
        rec = _fit(Tiny(manual=manual), guard)
    assert guard.skipped_steps == 1
    assert rec.logged[-1] == 1.0 and rec.logged[NAN_STEP - 1] == 0.0 and rec.logged[NAN_STEP] == 1.0
    # Update dropped entirely (AdamW with zero grads would still move the weights through momentum/decay).
    torch.testing.assert_close(rec.params[NAN_STEP], rec.params[NAN_STEP - 1], rtol=0, atol=0)
    assert not torch.equal(rec.params[NAN_STEP + 1], rec.params[NAN_STEP])  # training continues
    assert all(torch.isfinite(p).all() for p in rec.params)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_nan_loss_stops_with_step_and_tensor(manual):
    msg = rf"Non-finite loss \(value nan\) at global step {NAN_STEP}; stopping"
    with pytest.raises(NonFiniteError, match=msg):
        _fit(Tiny(manual=manual), NonFiniteGuard(action="stop"))


def test_nan_gradient_names_the_parameter():
    msg = rf"Non-finite gradient of head.weight at global step {NAN_STEP}"
    with pytest.raises(NonFiniteError, match=msg):
        _fit(Tiny(where="grad"), NonFiniteGuard(action="stop"))


def test_too_many_skips_stop():
    module = Tiny(bad_step=None)
    module.training_step = lambda batch, batch_idx: module.head(module.layer(batch[0])).sum() * math.nan
    with pytest.raises(NonFiniteError, match="3 optimizer steps had non-finite values.*max_skips=2"):
        with pytest.warns(UserWarning):
            _fit(module, NonFiniteGuard(action="skip", max_skips=2))


def test_clean_run_is_untouched():
    guard = NonFiniteGuard(action="stop")
    rec = _fit(Tiny(bad_step=None), guard)
    assert guard.skipped_steps == 0 and rec.logged == [0.0] * 6


def test_amp_overflow_steps_are_counted_not_skipped():
    """fp16 GradScaler: inf gradients are overflow (scaler skips, halves the scale), counted; finite loss."""
    guard = NonFiniteGuard(action="stop")  # would raise if overflow were treated as a fault
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    # Loss ~1e3 scaled by 2^16 → fp16 grads overflow until the scale has come down.
    _fit(Tiny(bad_step=None, scale=1e3), guard, plugins=[plugin])
    assert guard.amp_overflow_steps >= 1
    assert scaler.get_scale() == 2.0**16 / 2**guard.amp_overflow_steps


def test_state_round_trip():
    guard = NonFiniteGuard()
    guard.skipped_steps, guard.amp_overflow_steps = 4, 7
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert (other.skipped_steps, other.amp_overflow_steps) == (4, 7)
    with pytest.raises(ValueError, match="action"):
        NonFiniteGuard(action="ignore")  # type: ignore[arg-type]


class RankLoss(Tiny):
    """NaN loss on rank 1 only: rank 0's own loss is finite, yet it must skip the same step."""

    def training_step(self, batch, batch_idx):
        loss = self.head(self.layer(batch[0])).pow(2).mean()
        if self.global_rank == 1 and self.global_step == NAN_STEP:
            loss = loss * math.nan
        return loss


class DumpGuard(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
        params = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        out = f"{self.out}/rank{trainer.global_rank}.pt"
        torch.save({"skipped": guard.skipped_steps, "params": params}, out)
        torch.manual_seed(100 + trainer.global_rank)  # distinct RNG states per rank ...
        trainer.save_checkpoint(f"{self.out}/ddp.ckpt")  # ... gathered into one checkpoint (on every rank)


@pytest.mark.ddp
@pytest.mark.slow  # ~40 s: two spawned Lightning processes on shared CPUs
def test_ddp_ranks_skip_the_same_step(tmp_path):
    """check_grads=False isolates the all-reduced decision: only rank 1 sees a non-finite loss. Also: the
    RNG states of both ranks go into one checkpoint."""
    from lightning.pytorch.strategies import DDPStrategy

    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x), batch_size=4)
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        strategy=DDPStrategy(process_group_backend="gloo", start_method="spawn"),
        callbacks=[
            NonFiniteGuard(action="skip", check_grads=False),
            RNGStateCheckpoint(),
            DumpGuard(str(tmp_path)),
        ],
    )
    trainer.fit(RankLoss(bad_step=None), data)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["skipped"] == r1["skipped"] == 1
    assert torch.isfinite(r0["params"]).all()
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    # RNGStateCheckpoint gathered both ranks' states; a resumed rank 1 gets rank 1's
    states = torch.load(tmp_path / "ddp.ckpt", weights_only=True)["callbacks"]["RNGStateCheckpoint"][
        "per_rank"
    ]
    assert len(states) == 2
    assert torch.equal(states[0]["torch"], torch.manual_seed(100).get_state())
    assert torch.equal(states[1]["torch"], torch.manual_seed(101).get_state())
    rank1 = RNGStateCheckpoint()
    rank1._rank, rank1._world = 1, 2
    rank1.load_state_dict({"per_rank": states})
    assert rank1._pending is states[1]


# ------------------------------------------------------------------------------------------ the real module
class NaNBatches(torch.utils.data.Dataset):
    """8 image-text pairs per step; the images of step ``bad_step`` are NaN (a corrupt decode, say)."""

    def __init__(self, steps: int, tokenizer, bad_step: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(8, 3, 32, 32, generator=g)
        self.text = tokenizer([f"caption number {i}" for i in range(8)])
        self.steps, self.bad_step = steps, bad_step

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        images = self.images * math.nan if i == self.bad_step else self.images
        return {"image": images, "text": self.text, "key": [str(k) for k in range(8)], "source": ["s"] * 8}


def _configured_guard(action: str) -> NonFiniteGuard:
    """The guard exactly as conf/callbacks/fault_tolerance.yaml builds it, with ``action`` overridden."""
    import os

    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from zerovl_lightning.conf import __path__ as conf_path

    cfg = OmegaConf.load(os.path.join(conf_path[0], "callbacks", "fault_tolerance.yaml"))
    cfg.non_finite_guard.action = action
    return instantiate(cfg.non_finite_guard)


@pytest.mark.parametrize(
    ("action", "sub_batch_size"),
    [("skip", 4), ("stop", 4)],  # the plain (automatic) step is covered by the Tiny tests above
    ids=["skip-dga", "stop-dga"],
)
def test_zerovl_module_nan_step(action, sub_batch_size):
    """ZeroVLModule's plain step and its DGA step (manual optimization, opt.step inside) both go through the
    guard: the NaN step's update is dropped (weights and AdamW state untouched) or the run stops."""
    from zerovl_lightning.model import TINY_MODEL_CFG
    from zerovl_lightning.module import ZeroVLModule

    model = {
        "_target_": "zerovl_lightning.model.build_dual_encoder",
        "model_name": "zerovl-tiny",
        "model_cfg": TINY_MODEL_CFG,
        "temperature": 0.07,
        "learn_temperature": True,
    }
    torch.manual_seed(0)
    module = ZeroVLModule(model=model, sub_batch_size=sub_batch_size)
    data = DataLoader(NaNBatches(5, module.model.tokenizer, bad_step=NAN_STEP), batch_size=None)
    guard, rec = _configured_guard(action), Record()
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, rec],
    )
    if action == "stop":
        with pytest.raises(NonFiniteError, match=rf"Non-finite loss \(value nan\) at global step {NAN_STEP}"):
            trainer.fit(module, data)
        return
    with pytest.warns(
        UserWarning, match=rf"Non-finite loss \(value nan\) at global step {NAN_STEP}: skipped"
    ):
        trainer.fit(module, data)
    assert guard.skipped_steps == 1 and rec.logged[-1] == 1.0
    assert torch.equal(rec.params[NAN_STEP], rec.params[NAN_STEP - 1])
    assert all(torch.isfinite(p).all() for p in rec.params)
    assert not torch.equal(rec.params[-1], rec.params[NAN_STEP])
