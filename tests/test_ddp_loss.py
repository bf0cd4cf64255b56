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

    # 3. DGA, K = 2 sub-batches per rank (float64): hard targets, mixup inside sub-batches, autograd oracle
    batch64 = _local(_global_batch(torch.float64), rank)
    model64 = _model(torch.float64)
    subs = split_batch(batch64, LOCAL // 2)
    targets = SoftTargets(DGA_PLAN.alpha, global_partner(LOCAL, 2, rank, world_size))
    for name, plan, tg, closed in (
        ("dga", None, None, True),
        ("dga_mixup", DGA_PLAN, targets, True),
        ("dga_mixup_oracle", DGA_PLAN, targets, False),
    ):
        model64.zero_grad(set_to_none=True)
        res = DecoupledStep(closed_form=closed)(
            model64,
            lambda s, plan=plan: encode_pair(model64, s["image"], s["text"], plan),
            subs,
            model64.logit_scale,
            tg,
        )
        out[name] = (res.loss, _grads(model64))
        out[name + "_reduces"] = res.num_all_reduces

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

    mixup = {"enabled": True, "seed": _lightning_mixup_seed(), "modalities": ["text"]}
    module = _zerovl_module(sub_batch_size=2, mixup=mixup)
    cap = _Capture()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=DDPStrategy(process_group_backend="gloo"),
        precision="64-true",
        max_steps=2,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cap],
    )
    batch = _local(_global_batch(torch.float32), rank)
    trainer.fit(module, DataLoader([batch, batch], batch_size=None))
    params = {k: p.detach().clone() for k, p in module.model.named_parameters()}
    return {"grads": cap.grads, "params": params, "steps": trainer.global_step}


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
        _assert_close(rank_result[case], ref, 1e-6)  # the loss returned by DGA is already the full loss
        assert rank_result[case + "_reduces"] >= 1


def test_lightning_ddp_dga_step_equals_single_process(ddp_results):
    """Lightning's DDP strategy + the module's DGA path (no_sync + one all-reduce) + mixup, float64."""
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
            assert err <= 1e-6, (name, err)
    for name, p in r0["params"].items():  # the ranks stay in sync over both steps
        assert torch.equal(p, r1["params"][name]), name
