"""2-process DDP (gloo, CPU, float64): the SigLIP loss and its DGA step equal one process on the global batch,
and DGA with dropout equals the DDP full-batch autograd step for K = 1, 2, 4, 8 (locked image tower too).

One spawn for every case (process start-up dominates on two cores)."""

from __future__ import annotations

import math

import pytest
import torch
from ddp_utils import run_ddp
from torch.nn.parallel import DistributedDataParallel

from zerovl_lightning.dga import DecoupledStep, split_batch
from zerovl_lightning.loss import SoftTargets
from zerovl_lightning.mixup import MixupPlan, encode_pair, global_partner
from zerovl_lightning.siglip_loss import SigLipLoss, SigLipObjective

pytestmark = [pytest.mark.slow, pytest.mark.ddp, pytest.mark.xdist_group("siglip_ddp")]  # one spawn, ~1-6 min

WORLD, LOCAL = 2, 8  # global batch 16
PLAN = MixupPlan(0.35, "image")
EXACT = 1e-10


def _model(dropout: float = 0.0, **lock) -> torch.nn.Module:
    from test_locked_towers import _locked_model

    model = _locked_model(dropout=dropout, **lock)
    if dropout == 0.0:  # deterministic: comparable with one process (patch dropout draws per-rank RNG)
        model.clip.visual.patch_dropout = torch.nn.Identity()
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(10.0))
    model.clip.logit_bias = torch.nn.Parameter(torch.tensor(-10.0, dtype=torch.float64))
    return model


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL
    tokens = torch.randint(1, 49407, (n, 16), generator=g)
    tokens[:, 12:] = 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), "text": tokens}


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _autograd_step(model, subs, plan=None, targets=None, world_size=1) -> tuple[torch.Tensor, dict]:
    """Autograd through the sub-batch forwards + SigLipLoss (texts gathered with grad), DDP's average by hand."""
    model.zero_grad(set_to_none=True)
    embs = [encode_pair(model, s["image"], s["text"], plan) for s in subs]
    u, v = torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs])
    loss = SigLipLoss()(u, v, model.logit_scale.exp(), model.logit_bias, targets)
    loss.backward()
    if world_size > 1:
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world_size
        loss = loss.detach().clone()
        torch.distributed.all_reduce(loss)
        loss /= world_size
    return loss.detach(), _grads(model)


def _ddp_backward(ddp):
    """What Lightning's ``manual_backward`` does for a bare DDP wrapper: prepare the reducer when synced."""
    if ddp is None:
        return lambda t: t.backward()

    def backward(t: torch.Tensor) -> None:
        if ddp.require_backward_grad_sync:
            ddp.reducer._rebuild_buckets()
            ddp.reducer.prepare_for_backward([])
        t.backward()

    return backward


def _dga_step(model, subs, plan=None, targets=None, cache=None, ddp=None) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    res = DecoupledStep()(
        model,
        lambda s: encode_pair(model, s["image"], s["text"], plan),
        subs,
        model.logit_scale,
        targets,
        backward=_ddp_backward(ddp),
        no_sync=None if ddp is None else ddp.no_sync,
        objective=SigLipObjective(model.logit_scale, model.logit_bias),
        tower_cache=cache,
    )
    return res.loss, _grads(model)


def _worker(rank: int, world_size: int) -> dict:
    from zerovl_lightning.locked_cache import LockedTowerCache

    out: dict = {}
    full = _global_batch()
    local = {k: v[rank * LOCAL : (rank + 1) * LOCAL] for k, v in full.items()}
    # 1. no dropout: the loss, DGA (K = 2) and DGA with mixup, to compare with one process
    model = _model()
    out["plain"] = _autograd_step(model, [local], world_size=world_size)
    ddp = DistributedDataParallel(model)  # DGA: DDP's reducer does the one reduction, on the last backward
    out["dga"] = _dga_step(model, split_batch(local, LOCAL // 2), ddp=ddp)
    targets = SoftTargets(PLAN.alpha, global_partner(LOCAL, LOCAL // 2, rank, world_size))
    out["dga_mixup"] = _dga_step(model, split_batch(local, LOCAL // 2), PLAN, targets, ddp=ddp)
    # 2. dropout (per-rank RNG streams): DGA replays them, for every K; a locked image tower cached
    for name, lock in (("dropout", {}), ("locked_image", {"lock_image": True})):
        model = _model(dropout=0.1, **lock)
        ddp = DistributedDataParallel(model)
        cache = LockedTowerCache.for_model(model)
        for k in (1, 2, 4, 8):
            subs = split_batch(local, LOCAL // k)
            torch.manual_seed(100 + rank)
            ref = _autograd_step(model, subs, world_size=world_size)
            torch.manual_seed(100 + rank)
            out[f"{name}_k{k}"] = (ref, _dga_step(model, subs, cache=cache, ddp=ddp))
    return out


@pytest.fixture(scope="module")
def ddp_results() -> list[dict]:
    return run_ddp(_worker, WORLD)


def _assert_close(got, want, tol=EXACT):
    (loss, grads), (loss_ref, grads_ref) = got, want
    assert grads.keys() == grads_ref.keys()
    assert {"clip.logit_scale", "clip.logit_bias"} <= set(grads_ref)
    for name, g_ref in grads_ref.items():
        err = float((grads[name] - g_ref).norm() / g_ref.norm().clamp_min(1e-300))
        assert err <= tol, (name, err)
    assert abs(float(loss) - float(loss_ref)) <= tol * abs(float(loss_ref))


@pytest.mark.parametrize("case", ["plain", "dga", "dga_mixup"])
def test_siglip_ddp_equals_one_process_on_the_global_batch(ddp_results, case):
    model, batch = _model(), _global_batch()
    if case == "dga_mixup":
        targets = SoftTargets(PLAN.alpha, global_partner(WORLD * LOCAL, block=LOCAL // 2))
        ref = _autograd_step(model, split_batch(batch, LOCAL // 2), PLAN, targets)
    else:
        ref = _autograd_step(model, [batch])
    for rank_result in ddp_results:
        _assert_close(rank_result[case], ref)


@pytest.mark.parametrize("name", ["dropout", "locked_image"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_siglip_ddp_dga_with_dropout_equals_ddp_full_batch_step(ddp_results, name, k):
    for rank_result in ddp_results:
        ref, got = rank_result[f"{name}_k{k}"]
        _assert_close(got, ref)
    # both ranks hold the same (full) gradient
    (_, g0), (_, g1) = (r[f"{name}_k{k}"][1] for r in ddp_results)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
