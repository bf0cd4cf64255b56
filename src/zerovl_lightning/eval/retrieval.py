"""Zero-shot image–text retrieval (R@K, RSUM, median rank), exact and memory-bounded: a torchmetrics Metric.

Protocol (zerovl-method.md §6): every caption and every unique image is encoded once; image→text R@K counts an
image as a hit when **any** of its captions ranks in its top K; text→image R@K counts a caption as a hit when
its image ranks in its top K; RSUM is the sum of the six recalls in percent.

Peers (OpenCLIP, the official ZeroVL code) build the full N×M similarity matrix and argsort it. Here each
query's rank is *counted*: one chunk of queries is scored against the whole gallery, and for each query we
count the non-matching gallery items that score at least as high as its best match. That is exactly the
position the best match would get in a sorted list, so R@K for every K and the median rank follow, with memory
O(chunk × gallery) instead of O(N × M) (plus O(N × M) int64 for argsort). :func:`chunked_topk` keeps a running
top-k over gallery chunks for the example tables.

Ties are defined, not left to the sort: ``ties="pessimistic"`` (default) ranks a non-matching item with a
score equal to the best match *ahead* of it, so a collapsed model that scores everything equally gets R@K = 0
rather than 100; ``ties="optimistic"`` ranks matches first. Several matching captions tied with each other
never hurt: the image→text rank is that of the best-scoring match. Non-finite scores (a diverged model) rank
last.

Recalls are fractions in [0, 1]; RSUM is in percent (0–600), as in the paper. Median rank is 1-based:
``floor(median(0-based ranks)) + 1`` (the VSE / ZeroVL convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

Ties = Literal["pessimistic", "optimistic"]


@dataclass
class RetrievalRanks:
    """0-based ranks of the best match for every query, with the ids that define gallery order."""

    i2t: Tensor  # [num query images] rank of the best-ranked matching caption
    t2i: Tensor  # [num captions] rank of the caption's image
    image_ids: Tensor  # [num images] sorted unique image ids (image gallery order)
    caption_ids: Tensor  # [num captions] sorted unique caption ids (caption gallery order)
    caption_image_index: Tensor  # [num captions] index of each caption's image in image_ids
    query_image_index: Tensor  # [num query images] images with ≥ 1 caption (the image→text queries)


def first_unique(ids: Tensor) -> tuple[Tensor, Tensor | None]:
    """Sorted unique ids and the index of one occurrence of each (drops DDP padding duplicates).

    The index is None when the ids are already sorted and unique: callers then skip copying embeddings.
    """
    if ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all()):
        return ids, None
    sorted_ids, order = torch.sort(ids, stable=True)
    keep = torch.ones_like(sorted_ids, dtype=torch.bool)
    keep[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return sorted_ids[keep], order[keep]


def _count_ahead(scores: Tensor, best: Tensor, ties: Ties, block_elements: int = 1 << 22) -> Tensor:
    """Per row: how many entries (matches already set to -inf) rank ahead of ``best``; NaN best → all.

    Counted in column blocks: summing a bool matrix casts it to int64 (8 bytes per score), which would double
    the memory of the score chunk.
    """
    rows, cols = scores.shape
    step = max(1, block_elements // max(rows, 1))
    count = torch.zeros(rows, dtype=torch.long, device=scores.device)
    threshold = best[:, None]
    for start in range(0, cols, step):
        block = scores[:, start : start + step]
        count += ((block >= threshold) if ties == "pessimistic" else (block > threshold)).sum(dim=1)
    return torch.where(torch.isfinite(best), count, torch.full_like(count, cols))


def retrieval_ranks(
    image_emb: Tensor,
    text_emb: Tensor,
    caption_image_index: Tensor,
    chunk_size: int = 1024,
    ties: Ties = "pessimistic",
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ranks for both directions, scoring ``chunk_size`` queries × the whole gallery at a time.

    Args:
        image_emb: [Ni, D] one row per unique image; text_emb: [Nt, D] one row per caption.
        caption_image_index: [Nt] row of each caption's image in ``image_emb``.
    Returns:
        ``(i2t [Nq], t2i [Nt], query_image_index [Nq])``: 0-based ranks; images without captions are
        distractors for text→image, not image→text queries.
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    device = image_emb.device
    caption_image_index = caption_image_index.to(device)
    neg_inf = torch.tensor(float("-inf"), device=device, dtype=image_emb.dtype)

    # text → image: the caption's image score vs every other image.
    t2i = torch.empty(n_txt, dtype=torch.long, device=device)
    for start in range(0, n_txt, chunk_size):
        stop = min(start + chunk_size, n_txt)
        scores = text_emb[start:stop] @ image_emb.T  # [c, Ni]
        rows = torch.arange(stop - start, device=device)
        cols = caption_image_index[start:stop]
        best = scores[rows, cols].clone()
        scores[rows, cols] = neg_inf
        t2i[start:stop] = _count_ahead(scores, best, ties)
        del scores

    # image → text: the best of the image's captions vs every non-matching caption.
    order = torch.argsort(caption_image_index, stable=True)  # captions grouped by image
    sorted_img = caption_image_index[order]
    i2t = torch.empty(n_img, dtype=torch.long, device=device)
    has_caption = torch.zeros(n_img, dtype=torch.bool, device=device)
    has_caption[caption_image_index] = True
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        scores = image_emb[start:stop] @ text_emb.T  # [c, Nt]
        lo, hi = torch.searchsorted(sorted_img, torch.tensor([start, stop], device=device)).tolist()
        cols = order[lo:hi]  # captions of images in this chunk
        rows = sorted_img[lo:hi] - start
        match = scores[rows, cols]
        best = torch.full((stop - start,), float("-inf"), device=device, dtype=scores.dtype)
        best = best.scatter_reduce(0, rows, match, reduce="amax", include_self=True)
        # a NaN match must not look like a hit: scatter amax skips NaN on some backends, so mark it explicitly
        nan_rows = rows[torch.isnan(match)]
        best[nan_rows] = float("nan")
        scores[rows, cols] = neg_inf
        i2t[start:stop] = _count_ahead(scores, best, ties)
        del scores
    query_image_index = torch.nonzero(has_caption).squeeze(1)
    return i2t[query_image_index], t2i, query_image_index


def recall_at_k(ranks: Tensor, k: int) -> float:
    """Fraction of queries whose best match is among the first ``k`` (0-based rank < k)."""
    return float((ranks < k).double().mean()) if ranks.numel() else float("nan")


def median_rank(ranks: Tensor) -> float:
    """1-based median rank, ``floor(median(ranks)) + 1`` with the usual average of the two middle values."""
    if not ranks.numel():
        return float("nan")
    return float(torch.floor(torch.quantile(ranks.double(), 0.5)) + 1)


def recall_curve(ranks: Tensor, max_k: int) -> Tensor:
    """R@1 … R@max_k as a float64 tensor [max_k] (for the recall@K plots)."""
    counts = torch.bincount(ranks.clamp(max=max_k).cpu(), minlength=max_k + 1)[:max_k]
    return torch.cumsum(counts, 0).double() / max(ranks.numel(), 1)


def summarize(ranks: RetrievalRanks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``i2t_r{k}``, ``t2i_r{k}`` (fractions), ``rsum`` (percent), ``i2t_medr``, ``t2i_medr``, sizes."""
    out: dict[str, float] = {}
    for direction, r in (("i2t", ranks.i2t), ("t2i", ranks.t2i)):
        for k in ks:
            out[f"{direction}_r{k}"] = recall_at_k(r, k)
    out["rsum"] = 100.0 * sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    out["i2t_medr"] = median_rank(ranks.i2t)
    out["t2i_medr"] = median_rank(ranks.t2i)
    out["num_images"] = float(ranks.image_ids.numel())
    out["num_captions"] = float(ranks.caption_ids.numel())
    return out


def clip_benchmark_keys(metrics: dict[str, float], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark names: ``image_retrieval_recall@K`` is text→image, ``text_retrieval_recall@K``
    image→text."""
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = metrics[f"t2i_r{k}"]
        out[f"text_retrieval_recall@{k}"] = metrics[f"i2t_r{k}"]
    return out


@torch.no_grad()
def chunked_topk(queries: Tensor, gallery: Tensor, k: int, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Top-k gallery items per query with a running top-k over gallery chunks: O(Nq × (k + chunk)) memory.

    Ties between equal scores go to the lower gallery index (stable merge), so the result is deterministic.
    """
    k = min(k, gallery.shape[0])
    best_scores = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device, dtype=queries.dtype)
    best_index = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, gallery.shape[0], chunk_size):
        scores = queries @ gallery[start : start + chunk_size].T
        index = torch.arange(start, start + scores.shape[1], device=queries.device).expand_as(scores)
        cand_scores = torch.cat([best_scores, scores], dim=1)
        cand_index = torch.cat([best_index, index], dim=1)
        # sort by score descending, index ascending: stable sort of the (already index-ordered) candidates
        order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores = torch.gather(cand_scores, 1, order)
        best_index = torch.gather(cand_index, 1, order)
    return best_scores, best_index


def _cat(states: list[Tensor] | Tensor) -> Tensor:
    """Concatenate list states, without a copy when there is one tensor (after a DDP sync there always is)."""
    if isinstance(states, Tensor):
        return states
    return states[0] if len(states) == 1 else dim_zero_cat(states)


class RetrievalMetric(Metric):
    """Image–text retrieval over everything passed to :meth:`update`, synced across DDP ranks.

    ``update`` takes image embeddings with their image ids and caption embeddings with their caption ids (and
    the image id of each caption when images are not given one per caption). Images are deduplicated by image
    id, captions by caption id — a DistributedSampler's padding duplicates and the repeated image of a
    multi-caption sample both disappear — and both galleries are put in id order, so results do not depend on
    the rank split.

    ``compute()`` returns a dict of scalars (see :func:`summarize`); :attr:`last` keeps the ranks and the
    synced embeddings of the last compute for plots and example tables (cleared by ``reset``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024, ties: Ties = "pessimistic", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if ties not in ("pessimistic", "optimistic"):
            raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
        self.ks = tuple(int(k) for k in ks)
        self.chunk_size = int(chunk_size)
        self.ties: Ties = ties
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("image_emb", default=[], dist_reduce_fx="cat")
        self.add_state("caption_ids", default=[], dist_reduce_fx="cat")
        self.add_state("caption_image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("text_emb", default=[], dist_reduce_fx="cat")
        self.last: tuple[RetrievalRanks, Tensor, Tensor] | None = None

    def update(  # type: ignore[override]
        self,
        image_emb: Tensor,
        image_ids: Tensor,
        text_emb: Tensor,
        caption_ids: Tensor,
        caption_image_ids: Tensor | None = None,
    ) -> None:
        """Add [Bi, D] image embeddings (ids [Bi]) and [Bt, D] caption embeddings (ids [Bt]).

        Without ``caption_image_ids`` rows are pairs: caption ``j`` belongs to ``image_ids[j]`` (Bi == Bt).
        """
        if caption_image_ids is None:
            if image_ids.shape[0] != caption_ids.shape[0]:
                raise ValueError("give caption_image_ids when images are not one per caption")
            caption_image_ids = image_ids
        if image_emb.shape[0] != image_ids.shape[0] or text_emb.shape[0] != caption_ids.shape[0]:
            raise ValueError("embeddings and ids must have the same number of rows")
        self.image_ids.append(image_ids.detach().long().to(self.device))
        self.image_emb.append(image_emb.detach().float().to(self.device))
        self.caption_ids.append(caption_ids.detach().long().to(self.device))
        self.caption_image_ids.append(caption_image_ids.detach().long().to(self.device))
        self.text_emb.append(text_emb.detach().float().to(self.device))

    def compute_ranks(self) -> tuple[RetrievalRanks, Tensor, Tensor]:
        """Deduplicate, order by id, and rank both directions. Returns (ranks, image_emb, text_emb) in gallery
        order."""
        image_ids, image_emb = _cat(self.image_ids), _cat(self.image_emb)
        caption_ids, text_emb = _cat(self.caption_ids), _cat(self.text_emb)
        caption_image_ids = _cat(self.caption_image_ids)
        if caption_ids.numel() == 0:
            raise ValueError("RetrievalMetric has no captions: call update() before compute()")
        image_ids, keep = first_unique(image_ids)
        if keep is not None:
            image_emb = image_emb[keep]
        caption_ids, keep = first_unique(caption_ids)
        if keep is not None:
            text_emb, caption_image_ids = text_emb[keep], caption_image_ids[keep]
        caption_image_index = torch.searchsorted(image_ids, caption_image_ids).clamp(max=image_ids.numel() - 1)
        unknown = image_ids[caption_image_index] != caption_image_ids
        if bool(unknown.any()):
            raise ValueError(f"{int(unknown.sum())} captions refer to image ids without an image embedding")
        i2t, t2i, query_image_index = retrieval_ranks(
            image_emb, text_emb, caption_image_index, chunk_size=self.chunk_size, ties=self.ties
        )
        ranks = RetrievalRanks(i2t, t2i, image_ids, caption_ids, caption_image_index, query_image_index)
        return ranks, image_emb, text_emb

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        ranks, image_emb, text_emb = self.compute_ranks()
        self.last = (ranks, image_emb, text_emb)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in summarize(ranks, self.ks).items()}

    def reset(self) -> None:
        super().reset()
        self.last = None


def evaluate_retrieval(
    model: torch.nn.Module,
    shards: str | Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    ties: Ties = "pessimistic",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "retrieval",
) -> tuple[dict[str, float], RetrievalMetric]:
    """Score one shard set outside a Trainer, through the validation loop's own pieces (this rank's unique
    images, each decoded once, with their captions; states synced under torch.distributed).

    Returns (metrics as floats, the metric with :attr:`RetrievalMetric.last`).
    """
    from tqdm.auto import tqdm

    from zerovl_lightning.distributed import world_info
    from zerovl_lightning.eval.retrieval_data import retrieval_loaders
    from zerovl_lightning.eval.validation import RetrievalValidation

    world = world_info()
    (loader,) = retrieval_loaders(
        {desc: shards}, model.preprocess_cfg, batch_size, num_workers, world.rank, world.world_size
    )
    validation = RetrievalValidation(ks, chunk_size, ties)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        validation.update(model, batch)
    return validation.compute()[desc], validation.metrics[desc]
