"""CUDA-only checks of the mixed-precision DGA path (skipped without a GPU; run them where one is lent).

``pytest tests/test_gpu.py -q`` on one GPU takes a few minutes (tiny towers; the resume test runs three
``zerovl-train`` processes per case). On CPU every test is collected and skipped.
"""

from __future__ import annotations

import pytest
import torch
from test_crash_resume import CLAMPED, sources  # noqa: F401  (the module-scoped shards fixture of the resume test)
from test_crash_resume import test_sigkill_then_resume_matches_uninterrupted_run as _crash_then_resume
from test_dga import _batch, _fit, _max_rel_err, _model, _zerovl_module

from zerovl_lightning.dga import DecoupledStep, split_batch
from zerovl_lightning.mixup import encode_pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cosine(a: dict, b: dict) -> float:
    """The smallest per-parameter cosine similarity between two gradient dicts."""
    return min(
        float(torch.nn.functional.cosine_similarity(a[k].flatten().double(), b[k].flatten().double(), 0)) for k in b
    )


def test_cuda_rng_replay_makes_pass_two_bitwise_equal_to_pass_one():
    """Attention dropout (SDPA inside nn.MultiheadAttention) + patch dropout: the replayed forward is bitwise equal."""
    model = _model(dropout=0.1).float().cuda()
    batch = {
        k: (v.float().cuda() if torch.is_tensor(v) and v.is_floating_point() else v.cuda() if torch.is_tensor(v) else v)
        for k, v in _batch(8).items()
    }
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def encode(sub):
        u, v = encode_pair(model, sub["image"], sub["text"], None)
        calls.append((u.detach().clone(), v.detach().clone()))
        return u, v

    DecoupledStep(keep_last_graph=False)(model, encode, split_batch(batch, 2), model.logit_scale)
    first, second = calls[:4], calls[4:]
    assert len(second) == 4
    for (u1, v1), (u2, v2) in zip(first, second):
        assert torch.equal(u1, u2) and torch.equal(v1, v2)


def test_cuda_fp32_dga_equals_full_batch_with_tf32_off():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    batch = {**_batch(8), "image": _batch(8)["image"].float()}
    _, cap_plain = _fit(_zerovl_module(), batch, "32-true", accelerator="cuda")
    _, cap_dga = _fit(_zerovl_module(sub_batch_size=2), batch, "32-true", accelerator="cuda")
    err = _max_rel_err(cap_dga.grads[0], cap_plain.grads[0])
    print(f"fp32 DGA vs full batch on CUDA: max relative error {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_cuda_mixed_precision_dga_matches_fp32_full_batch(precision):
    batch = {**_batch(8), "image": _batch(8)["image"].float()}
    _, cap_ref = _fit(_zerovl_module(), batch, "32-true", accelerator="cuda")
    _, cap = _fit(_zerovl_module(sub_batch_size=2), batch, precision, accelerator="cuda")
    cos = _cosine(cap.grads[0], cap_ref.grads[0])
    print(
        f"{precision} DGA vs fp32 full batch on CUDA: min per-parameter cosine {cos:.6f}, "
        f"max relative error {_max_rel_err(cap.grads[0], cap_ref.grads[0]):.2e}"
    )
    assert cos >= 0.9999


@pytest.mark.parametrize("sub_batch_size", [None, 2], ids=["plain", "dga"])
def test_cuda_16_mixed_overflow_steps_are_skipped_and_counted(sub_batch_size):
    """fp16 AMP on CUDA: a scale far too high overflows the fp16 gradients; the GradScaler skips those updates
    (weights untouched) and halves its scale, and NonFiniteGuard counts them (it would raise on a real fault)."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.utils.data import DataLoader

    from zerovl_lightning.guards import NonFiniteGuard

    class Params(L.Callback):
        def __init__(self) -> None:
            self.after: list[torch.Tensor] = []

        def on_train_start(self, trainer, pl_module):
            self.before = torch.cat([p.detach().flatten().double() for p in pl_module.parameters()]).cpu()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after.append(torch.cat([p.detach().flatten().double() for p in pl_module.parameters()]).cpu())

    # fp16 overflows once gradient x scale > 65504 (gradients ~1e-2..1: scales above ~2^16..2^23), so 2^28 gives
    # several skipped steps, fewer than 16
    steps, init_scale = 16, 2.0**28
    batch = {**_batch(8), "image": _batch(8)["image"].float()}
    guard, params = NonFiniteGuard(action="stop"), Params()
    scaler = torch.amp.GradScaler("cuda", init_scale=init_scale)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cuda",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, params],
        plugins=[MixedPrecision("16-mixed", "cuda", scaler=scaler)],
    )
    trainer.fit(_zerovl_module(sub_batch_size=sub_batch_size), DataLoader([batch] * steps, batch_size=None))
    overflows = guard.amp_overflow_steps
    print(f"16-mixed ({'DGA' if sub_batch_size else 'plain'}): {overflows} of {steps} steps overflowed")
    assert 1 <= overflows < steps
    assert scaler.get_scale() == init_scale / 2**overflows
    weights = [params.before, *params.after]
    unchanged = sum(torch.equal(a, b) for a, b in zip(weights, weights[1:]))
    assert unchanged == overflows  # exactly the overflowed steps left the weights as they were
    assert torch.isfinite(weights[-1]).all()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="plain-step"),
        pytest.param(["++module.sub_batch_size=4", "++module.mixup.enabled=true"], id="dga-mixup"),
    ],
)
def test_cuda_checkpoint_resume_is_exact(tmp_path, sources, extra):  # noqa: F811 - the imported fixture
    """The CPU crash test on the GPU (bf16-mixed, deterministic kernels): a run SIGKILLed after a checkpoint and
    resumed with ``ckpt_path=last`` gives bitwise the losses, samples and final weights of an uninterrupted run."""
    gpu = ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "trainer.deterministic=true"]
    _crash_then_resume(tmp_path, sources, [*CLAMPED, *gpu, *extra])
