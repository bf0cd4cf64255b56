"""Retrieval metric: hand-computed R@K (ties, several captions per image, misses), chunked == full, DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from ddp_utils import free_port

from zerovl_lightning.eval.retrieval import (
    RetrievalMetric,
    chunked_topk,
    median_rank,
    recall_curve,
    retrieval_ranks,
)

# Toy case (3-d one-hot embeddings, scores are 0/1 so ties are everywhere):
#   images 10 = e0, 11 = e1, 12 = e2, 13 = e0 + e1 (normalised; a distractor without captions)
#   captions 0 → 10 (e1), 1 → 10 (e0), 2 → 11 (e1), 3 → 12 (e1)
IMAGES = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]), dim=-1)
IMAGE_IDS = torch.tensor([10, 11, 12, 13])
TEXTS = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]])
CAPTION_IDS = torch.tensor([0, 1, 2, 3])
CAPTION_IMAGE_IDS = torch.tensor([10, 10, 11, 12])


def toy_metric(ties: str = "pessimistic", chunk_size: int = 1024) -> dict[str, float]:
    m = RetrievalMetric(ties=ties, chunk_size=chunk_size)  # type: ignore[arg-type]
    m.update(IMAGES, IMAGE_IDS, TEXTS, CAPTION_IDS, CAPTION_IMAGE_IDS)
    out = {k: float(v) for k, v in m.compute().items()}
    out["ranks"] = m.last[0]  # type: ignore[index,assignment]
    return out


def test_toy_case_by_hand_pessimistic():
    out = toy_metric("pessimistic")
    r = out["ranks"]
    # image→text (queries: images with captions, 13 is only a distractor for text→image)
    #   10: its caption 1 scores 1, no non-match scores ≥ 1 → rank 0 (a hit via its *second* caption)
    #   11: caption 2 scores 1; non-matching 0 and 3 also score 1 → pessimistic rank 2
    #   12: caption 3 scores 0; all three non-matching captions score ≥ 0 → rank 3 (no hit at K = 1)
    assert r.query_image_index.tolist() == [0, 1, 2]
    assert r.i2t.tolist() == [0, 2, 3]
    # text→image
    #   0 (e1 → 10): own score 0; 11 (1), 12 (0), 13 (0.707) are ≥ 0 → 3
    #   1 (e0 → 10): own score 1; only 13 (0.707) is lower → 0
    #   2 (e1 → 11): own score 1; 13 scores 0.707 → 0
    #   3 (e1 → 12): own score 0; 10 (0), 11 (1), 13 (0.707) → 3
    assert r.t2i.tolist() == [3, 0, 0, 3]
    assert out["i2t_r1"] == pytest.approx(1 / 3) and out["i2t_r5"] == 1.0 and out["i2t_r10"] == 1.0
    assert out["t2i_r1"] == pytest.approx(0.5) and out["t2i_r5"] == 1.0
    assert out["rsum"] == pytest.approx(100 * (1 / 3 + 1 + 1 + 0.5 + 1 + 1))
    assert out["i2t_medr"] == 3.0  # median of 0-based [0, 2, 3] = 2 → 3
    assert out["t2i_medr"] == 2.0  # median of [3, 0, 0, 3] = 1.5 → floor + 1 = 2
    assert out["num_images"] == 4 and out["num_captions"] == 4


def test_toy_case_optimistic_ties_rank_matches_first():
    r = toy_metric("optimistic")["ranks"]
    # 11 ties with two non-matches → 0; 12's caption scores 0 and no non-match scores more → 0
    assert r.i2t.tolist() == [0, 0, 0]
    # caption 0: only 11 (1) and 13 (0.707) beat 0 → 2; caption 3 likewise → 2
    assert r.t2i.tolist() == [2, 0, 0, 2]


def test_collapsed_model_gets_zero_recall_when_pessimistic():
    n = 20
    images, texts = torch.ones(n, 4) / 2, torch.ones(n, 4) / 2
    ids = torch.arange(n)
    pess = RetrievalMetric(ties="pessimistic")
    pess.update(images, ids, texts, ids)
    opt = RetrievalMetric(ties="optimistic")
    opt.update(images, ids, texts, ids)
    p, o = pess.compute(), opt.compute()
    assert float(p["rsum"]) == 0.0 and float(p["t2i_medr"]) == n
    assert float(o["rsum"]) == 600.0 and float(o["i2t_medr"]) == 1


def test_image_with_several_captions_hits_if_any_caption_is_in_top_k():
    # image 0 = e0 owns c2 and c4; image 1 = e1 owns c0, c1, c3.
    # Scores for image 0: c0 .995, c1 .981, c2 .958 (own), c4 .894 (own), c3 0 → first own caption is third.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.2], [1.0, 0.3], [0.0, 1.0], [1.0, -0.5]]), dim=-1)
    m = RetrievalMetric(ks=(1, 2, 3))
    m.update(images, torch.tensor([0, 1]), texts, torch.arange(5), torch.tensor([1, 1, 0, 1, 0]))
    out = m.compute()
    assert m.last[0].i2t.tolist() == [2, 0]  # type: ignore[index]
    assert float(out["i2t_r1"]) == 0.5 and float(out["i2t_r2"]) == 0.5 and float(out["i2t_r3"]) == 1.0


def brute_force_ranks(image_emb, text_emb, caption_image_index):
    """The peers' way: the full N×M matrix, argsort every row, position of the first match."""
    sims = image_emb @ text_emb.T
    order = torch.argsort(sims, dim=1, descending=True)
    match = caption_image_index[order] == torch.arange(len(image_emb))[:, None]
    has = match.any(1)
    i2t = match.float().argmax(1)[has]
    order_t = torch.argsort(sims.T, dim=1, descending=True)
    t2i = (order_t == caption_image_index[:, None]).float().argmax(1)
    return i2t, t2i, torch.nonzero(has).squeeze(1)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100_000])
def test_chunked_equals_brute_force_on_random_data(chunk_size):
    g = torch.Generator().manual_seed(0)
    n_img, d = 150, 16
    caps_per_image = torch.randint(0, 6, (n_img,), generator=g)  # 0..5 captions, some images have none
    caption_image_index = torch.repeat_interleave(torch.arange(n_img), caps_per_image)
    image_emb = F.normalize(torch.randn(n_img, d, generator=g), dim=-1)
    text_emb = F.normalize(image_emb[caption_image_index] + 0.9 * torch.randn(len(caption_image_index), d, generator=g))
    ours = retrieval_ranks(image_emb, text_emb, caption_image_index, chunk_size=chunk_size)
    ref = brute_force_ranks(image_emb, text_emb, caption_image_index)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    # partial recall, so the comparison is not trivial
    assert 0.1 < float((ours[0] < 1).float().mean()) < 0.9


def test_dedup_and_update_order_do_not_matter():
    g = torch.Generator().manual_seed(1)
    n_img, n_txt = 30, 70
    img = F.normalize(torch.randn(n_img, 8, generator=g), dim=-1)
    cap_img = torch.randint(0, n_img, (n_txt,), generator=g)
    cap_img[:n_img] = torch.arange(n_img)
    txt = F.normalize(img[cap_img] + torch.randn(n_txt, 8, generator=g), dim=-1)
    image_ids, caption_ids = torch.arange(n_img) * 3 + 100, torch.arange(n_txt) * 7
    clean = RetrievalMetric()
    clean.update(img, image_ids, txt, caption_ids, image_ids[cap_img])
    # shuffled, in pieces, each caption row carrying its image (one per caption) + padding duplicates
    perm = torch.randperm(n_txt, generator=g)
    pad = perm[:5]
    rows = torch.cat([perm, pad])
    messy = RetrievalMetric()
    for part in rows.split(13):
        messy.update(img[cap_img[part]], image_ids[cap_img[part]], txt[part], caption_ids[part])
    a, b = clean.compute(), messy.compute()
    assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}


def test_caption_of_unknown_image_is_an_error():
    m = RetrievalMetric()
    m.update(torch.eye(2), torch.tensor([0, 1]), torch.eye(2), torch.tensor([0, 1]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="without an image embedding"):
        m.compute()


def test_nan_embeddings_rank_last():
    img = torch.eye(3)
    txt = torch.eye(3)
    txt[1] = float("nan")
    i2t, t2i, _ = retrieval_ranks(img, txt, torch.arange(3), ties="optimistic")
    assert t2i.tolist()[1] == 3 and i2t.tolist()[1] == 3  # never a hit
    assert t2i.tolist()[0] == 0 and i2t.tolist()[2] == 0


def test_recall_curve_and_median_rank():
    ranks = torch.tensor([0, 0, 1, 4, 9, 30])
    curve = recall_curve(ranks, 10)
    assert curve[0] == pytest.approx(2 / 6) and curve[1] == pytest.approx(3 / 6)
    assert curve[4] == pytest.approx(4 / 6) and curve[9] == pytest.approx(5 / 6)
    assert median_rank(ranks) == 3.0  # median(1, 4) = 2.5 → floor 2 → 1-based 3
    assert median_rank(torch.tensor([5])) == 6.0


def test_chunked_topk_matches_topk_and_breaks_ties_by_index():
    g = torch.Generator().manual_seed(2)
    q, gal = torch.randn(9, 5, generator=g), torch.randn(103, 5, generator=g)
    s, i = chunked_topk(q, gal, 5, chunk_size=10)
    ref = torch.topk(q @ gal.T, 5, dim=1)
    torch.testing.assert_close(s, ref.values)
    assert torch.equal(i, ref.indices)
    tied = torch.ones(12, 3)
    _, idx = chunked_topk(torch.ones(2, 3), tied, 4, chunk_size=5)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2


# ------------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, txt, cap_img = _ddp_data()
    # DistributedSampler-style split: indices padded to a multiple of the world size, strided by rank
    n = len(txt)
    idx = list(range(n)) + list(range((world - n % world) % world))
    mine = torch.tensor(idx[rank::world])
    m = RetrievalMetric(chunk_size=16)
    m.update(img[cap_img[mine]], cap_img[mine], txt[mine], mine)
    out = {k: float(v) for k, v in m.compute().items()}
    if rank == 0:
        torch.save(out, out_path)
    dist.destroy_process_group()


def _ddp_data():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(40, 8, generator=g), dim=-1)
    cap_img = torch.randint(0, 40, (97,), generator=g)
    cap_img[:40] = torch.arange(40)
    txt = F.normalize(img[cap_img] + 0.8 * torch.randn(97, 8, generator=g), dim=-1)
    return img, txt, cap_img


@pytest.mark.ddp
def test_two_process_ddp_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    port = free_port()
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, port, out_path), nprocs=2, join=True)
    img, txt, cap_img = _ddp_data()
    single = RetrievalMetric(chunk_size=16)
    single.update(img, torch.arange(40), txt, torch.arange(97), cap_img)
    expected = {k: float(v) for k, v in single.compute().items()}
    assert torch.load(out_path) == expected
    assert expected["num_captions"] == 97 and 0 < expected["t2i_r1"] < 1
