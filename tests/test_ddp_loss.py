"""2-process DDP (gloo, CPU): plain loss, mixup targets and DGA steps equal one process on the global batch.

All distributed checks share one spawn (process start-up dominates on two cores): the worker runs every case
and returns gradients; the tests compare them with single-process references computed here.
"""

from __future__ import annotations

import pytest
import torch
from ddp_utils import run_ddp
from torch.nn.parallel import DistributedDataParallel

from zerovl_lightning.dga import DecoupledStep, split_batch
from zerovl_lightning.distributed import world_info
from zerovl_lightning.loss import ContrastiveLoss, SoftTargets
from zerovl_lightning.mixup import CoinFlipMixup, MixupPlan, encode_pair, global_partner
from zerovl_lightning.model import build_tiny

pytestmark = [pytest.mark.ddp, pytest.mark.xdist_group("ddp_loss")]  # one worker: one spawn for all

WORLD, LOCAL = 2, 4  # 2 ranks × 4 samples = global batch 8
MIXUP_SEED = 42
DGA_PLAN = MixupPlan(0.35, "image")
TOL64 = 1e-10  # float64 agreement is ~1e-15 (measured: ≤ 3.6e-15)


def _counting_hook(calls: list[int]):
    """A DDP comm hook that records each bucket it all-reduces (then does DDP's default average)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    return hook


def _bare_ddp_backward(ddp: DistributedDataParallel, calls: list[int], per_backward: list[int]):
    """What Lightning's ``manual_backward`` does for a bare DDP wrapper: prepare the reducer when synced."""

    def backward(t: torch.Tensor) -> None:
        before = len(calls)
        if ddp.require_backward_grad_sync:
            ddp.reducer._rebuild_buckets()
            ddp.reducer.prepare_for_backward([])
        t.backward()
        per_backward.append(len(calls) - before)

    return backward


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)  # identical init in every process
    model = build_tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(dtype).train()


def _global_batch(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL
    tokens = torch.randint(1, 49407, (n, 16), generator=g)
    tokens[:, 12:] = 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g).to(dtype), "text": tokens}


def _local(batch: dict, rank: int) -> dict:
    return {k: v[rank * LOCAL : (rank + 1) * LOCAL] for k, v in batch.items()}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _mixup_plan() -> MixupPlan:
    """The first step of the seeded sequence with a non-trivial α (so soft targets matter)."""
    mixup = CoinFlipMixup(seed=MIXUP_SEED)
    return next(p for p in (mixup.plan(s) for s in range(100)) if 0.2 < p.alpha < 0.8)


def _worker(rank: int, world_size: int) -> dict:
    out: dict = {}
    world = world_info()
    assert (world.rank, world.world_size) == (rank, world_size)
    # 1. the mixup plan sequence each rank draws
    mixup = CoinFlipMixup(seed=MIXUP_SEED)
    out["plans"] = [(p.alpha, p.modality) for p in (mixup.plan(s) for s in range(64))]

    # 2. plain step through a real DDP wrapper (fp32): hard targets, then mixup's soft targets
    batch = _local(_global_batch(torch.float32), rank)
    model = _model(torch.float32)
    ddp = DistributedDataParallel(model)
    for name, plan in (("plain", None), ("plain_mixup", _mixup_plan())):
        model.zero_grad(set_to_none=True)
        targets = CoinFlipMixup.targets(plan, LOCAL, None, rank, world_size) if plan else None
        if plan is None:
            u, v = ddp(batch["image"], batch["text"])
        else:  # mixup needs the pre-norm text features: encode through the module, DDP reduces on backward
            u, v = encode_pair(model, batch["image"], batch["text"], plan)
        loss = ContrastiveLoss()(u, v, model.logit_scale.exp(), targets)
        if plan is not None:  # a forward outside the wrapper: reduce by hand (what DDP's average does)
            loss.backward()
            for p in model.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= world_size
        else:
            loss.backward()
        out[name] = (loss.detach(), _grads(model))

    # 3. DGA, K = 2 sub-batches per rank (float64): hard targets, mixup inside sub-batches, autograd oracle;
    # DDP's reducer (small buckets, so there are several) reduces, once, on the last backward
    batch64 = _local(_global_batch(torch.float64), rank)
    model64 = _model(torch.float64)
    ddp64 = DistributedDataParallel(model64, bucket_cap_mb=0.05)
    calls: list[int] = []
    ddp64.register_comm_hook(None, _counting_hook(calls))
    subs = split_batch(batch64, LOCAL // 2)
    targets = SoftTargets(DGA_PLAN.alpha, global_partner(LOCAL, 2, rank, world_size))
    for name, plan, tg, closed in (
        ("dga", None, None, True),
        ("dga_mixup", DGA_PLAN, targets, True),
        ("dga_mixup_oracle", DGA_PLAN, targets, False),
    ):
        model64.zero_grad(set_to_none=True)
        calls.clear()
        per_backward: list[int] = []
        res = DecoupledStep(closed_form=closed)(
            model64,
            lambda s, plan=plan: encode_pair(model64, s["image"], s["text"], plan),
            subs,
            model64.logit_scale,
            tg,
            backward=_bare_ddp_backward(ddp64, calls, per_backward),
            no_sync=ddp64.no_sync,
        )
        out[name] = (res.loss, _grads(model64))
        out[name + "_reduces"] = (list(calls), per_backward)

    # 4. the LightningModule's DGA path under Lightning's own DDP strategy (2 steps: the reducer stays clean)
    out["lightning"] = _lightning_dga(rank)
    return out


def _lightning_mixup_seed() -> int:
    """A mixup seed whose step-0 α is far from 0 and 1, so the soft targets matter."""
    return next(s for s in range(1000) if 0.2 < CoinFlipMixup(seed=s).plan(0).alpha < 0.8)


def _lightning_dga(rank: int) -> dict:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from test_dga import _Capture, _zerovl_module
    from torch.utils.data import DataLoader

    from zerovl_lightning.train import SeedPerRank

    class Reductions(L.Callback):
        """Buckets DDP's reducer all-reduces, per step and per backward; each rank's RNG state per step."""

        def __init__(self) -> None:
            self.calls: list[int] = []
            self.per_step: list[list[int]] = []
            self.per_backward: list[int] = []
            self.rng: list[torch.Tensor] = []

        def on_train_start(self, trainer, pl_module):
            trainer.strategy.model.register_comm_hook(None, _counting_hook(self.calls))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rng.append(torch.get_rng_state())

        def on_before_backward(self, trainer, pl_module, loss):
            self._before = len(self.calls)

        def on_after_backward(self, trainer, pl_module):
            self.per_backward.append(len(self.calls) - self._before)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.per_step.append(list(self.calls))
            self.calls.clear()

    mixup = {"enabled": True, "seed": _lightning_mixup_seed(), "modalities": ["text"]}
    module = _zerovl_module(sub_batch_size=2, mixup=mixup)
    cap, red = _Capture(), Reductions()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        # small buckets (several per step) as views of the gradients: DDP's reducer reduces in place
        strategy=DDPStrategy(process_group_backend="gloo", bucket_cap_mb=0.05, gradient_as_bucket_view=True),
        precision="64-true",
        max_steps=2,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cap, red, SeedPerRank(MIXUP_SEED)],
    )
    batch = _local(_global_batch(torch.float32), rank)
    trainer.fit(module, DataLoader([batch, batch], batch_size=None))
    params = {k: p.detach().clone() for k, p in module.model.named_parameters()}
    return {
        "grads": cap.grads,
        "params": params,
        "steps": trainer.global_step,
        "reductions": red.per_step,
        "per_backward": red.per_backward,
        "rng": red.rng,
    }


@pytest.fixture(scope="module")
def ddp_results() -> list[dict]:
    return run_ddp(_worker, WORLD)


def _reference(dtype, plan=None, block=None, targets=None) -> tuple[torch.Tensor, dict]:
    model, batch = _model(dtype), _global_batch(dtype)
    u, v = encode_pair(model, batch["image"], batch["text"], plan, block)
    loss = ContrastiveLoss()(u, v, model.logit_scale.exp(), targets)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_close(result, reference, tol):
    (loss, grads), (loss_ref, grads_ref) = result, reference
    assert grads.keys() == grads_ref.keys()
    assert "clip.logit_scale" in grads_ref
    for name, g_ref in grads_ref.items():
        err = float((grads[name] - g_ref).norm() / g_ref.norm())
        assert err <= tol, (name, err)
    assert abs(float(loss) - float(loss_ref)) <= tol * float(loss_ref)


def test_ranks_draw_identical_mixup_plans(ddp_results):
    r0, r1 = ddp_results
    assert r0["plans"] == r1["plans"]
    interior = [alpha for alpha, _ in r0["plans"] if 0.0 < alpha < 1.0]  # Beta(0.1, 0.1) may round to 0 or 1
    assert len(interior) > 50 and len(set(interior)) == len(interior)  # different steps differ
    assert {m for _, m in r0["plans"]} == {"image", "text"}


def test_plain_ddp_step_equals_single_process(ddp_results):
    ref = _reference(torch.float32)
    for rank_result in ddp_results:
        loss, grads = rank_result["plain"]
        # each rank returns its local loss; their mean is the full-batch loss
        mean_loss = sum(r["plain"][0] for r in ddp_results) / WORLD
        _assert_close((mean_loss, grads), ref, 1e-5)


def test_plain_ddp_step_with_mixup_targets_equals_single_process(ddp_results):
    plan = _mixup_plan()
    targets = CoinFlipMixup.targets(plan, LOCAL, None, 0, WORLD)  # the same global permutation on every rank
    ref = _reference(torch.float32, plan, block=LOCAL, targets=targets)
    mean_loss = sum(r["plain_mixup"][0] for r in ddp_results) / WORLD
    for rank_result in ddp_results:
        _assert_close((mean_loss, rank_result["plain_mixup"][1]), ref, 1e-5)


@pytest.mark.parametrize("case", ["dga", "dga_mixup", "dga_mixup_oracle"])
def test_dga_ddp_step_equals_single_process(ddp_results, case):
    if case == "dga":
        ref = _reference(torch.float64)
    else:
        targets = SoftTargets(DGA_PLAN.alpha, global_partner(WORLD * LOCAL, block=2))
        ref = _reference(torch.float64, DGA_PLAN, block=2, targets=targets)
    for rank_result in ddp_results:
        _assert_close(rank_result[case], ref, TOL64)  # the loss returned by DGA is already the full loss
        buckets, per_backward = rank_result[case + "_reduces"]
        # DDP's reducer, not a copy: every bucket all-reduced exactly once per step, all on the last backward
        assert sorted(buckets) == list(range(len(buckets)))
        assert per_backward == [0, len(buckets)]  # K = 2 backwards: the first in no_sync


def test_lightning_ddp_dga_step_equals_single_process(ddp_results):
    """Lightning's DDP strategy + the module's DGA path (DDP's reducer, once per step) + mixup, float64."""
    from test_dga import _zerovl_module

    plan = CoinFlipMixup(seed=_lightning_mixup_seed()).plan(0)
    assert plan.modality == "text" and 0.2 < plan.alpha < 0.8
    ref_model = _zerovl_module().model.double()
    batch = _global_batch(torch.float64)
    targets = SoftTargets(plan.alpha, global_partner(WORLD * LOCAL, block=2))
    u, v = encode_pair(ref_model, batch["image"], batch["text"], plan, block=2)
    ContrastiveLoss()(u, v, ref_model.logit_scale.exp(), targets).backward()
    ref = _grads(ref_model)
    r0, r1 = (r["lightning"] for r in ddp_results)
    assert r0["steps"] == r1["steps"] == 2
    for res in (r0, r1):
        for name, g_ref in ref.items():
            err = float((res["grads"][0][name] - g_ref).norm() / g_ref.norm())
            assert err <= TOL64, (name, err)
    for name, p in r0["params"].items():  # the ranks stay in sync over both steps
        assert torch.equal(p, r1["params"][name]), name
    for res in (r0, r1):  # DDP's reducer: each bucket once per step, all on the last of the K = 2 backwards
        (first, second) = res["reductions"]
        assert sorted(first) == list(range(len(first)))  # step 0: DDP's 1 MiB first bucket holds the model
        assert len(second) > 1 and sorted(second) == list(range(len(second)))  # rebuilt at 0.05 MB
        assert res["per_backward"] == [0, len(first), 0, len(second)]


def test_ranks_draw_different_randomness(ddp_results):
    """SeedPerRank: seed + rank after the model is built, so dropout masks differ between ranks."""
    r0, r1 = (r["lightning"] for r in ddp_results)
    assert not torch.equal(r0["rng"][0], r1["rng"][0])
    masks = []
    for res in (r0, r1):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(res["rng"][0])
            masks.append(torch.nn.functional.dropout(torch.ones(256), 0.5))
    assert not torch.equal(masks[0], masks[1])
    # yet both ranks hold identical weights (the DGA test above) and identical mixup plans
