"""Reference-mismatch probe (MaPO, Figure 2).

Reference-based objectives such as Diffusion-DPO keep the policy close to the base model. When the
preference data's chosen images lie far from what the base model generates (a new style, a new
domain), that anchor pulls against the data, and the reference-free MaPO objective is the better fit.
This probe measures the gap: the mean cosine distance ``1 - cos`` between embeddings of base-model
samples and of the dataset's chosen images, in a CLIP or DINOv2 embedding space. This module holds the
math; `diffalign.eval.probe` samples the base model and runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# A heuristic for CLIP/DINOv2 spaces, not a calibrated constant: compare against the distance between two
# independent sets of base samples (the floor) before trusting it.
DEFAULT_MISMATCH_THRESHOLD = 0.3

# diffalign.eval.embedding.ImageEmbedder, anything else with embed_images() (the CLIP scorers,
# DinoSimilarity), or images -> (N, D).
Embedder = Any


def embed_images(embedder: Embedder, images: Sequence[Image.Image]) -> Tensor:
    """L2-normalised float32 embeddings ``(N, D)``.

    ``embedder`` is an ``ImageEmbedder``, anything with an ``embed_images`` method (the CLIP scorers and
    ``DinoSimilarity`` qualify), or a plain callable ``list[PIL.Image] -> Tensor (N, D)``.
    """
    if len(images) == 0:
        raise ValueError("no images to embed")
    fn = getattr(embedder, "embed_images", None) or embedder
    if not callable(fn):
        raise TypeError(f"embedder {type(embedder).__name__} is neither callable nor has embed_images()")
    with torch.no_grad():
        emb = torch.as_tensor(fn(list(images)))
    if emb.dim() != 2 or emb.shape[0] != len(images):
        raise ValueError(
            f"embedder returned shape {tuple(emb.shape)} for {len(images)} images; expected (N, D)"
        )
    return F.normalize(emb.detach().float().cpu(), dim=-1)


def cosine_distances(a: Tensor, b: Tensor, paired: bool = False) -> Tensor:
    """``1 - cos``: row-matched ``(N,)`` when ``paired``, else the all-pairs ``(N, M)`` matrix."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    if paired:
        if a.shape != b.shape:
            raise ValueError(f"paired distances need equal shapes, got {tuple(a.shape)} vs {tuple(b.shape)}")
        return (1.0 - (a * b).sum(-1)).clamp(min=0.0)
    return (1.0 - a @ b.T).clamp(min=0.0)


def reference_mismatch(
    base_images: Sequence[Image.Image],
    chosen_images: Sequence[Image.Image],
    embedder: Embedder,
    paired: bool = False,
) -> dict[str, Any]:
    """Mean cosine distance between base-model samples and the dataset's chosen images.

    ``paired=False`` averages over all (base, chosen) pairs: a distribution-level gap, usable when
    the two sets are not aligned. ``paired=True`` compares item ``i`` with item ``i`` (base sample
    generated from chosen image ``i``'s prompt): the per-prompt gap, needing equal lengths.
    ``centroid_distance`` is ``1 - cos`` between the two sets' mean embeddings.
    """
    if paired and len(base_images) != len(chosen_images):
        raise ValueError(
            f"paired=True matches by index: {len(base_images)} base vs {len(chosen_images)} chosen images"
        )
    eb, ec = embed_images(embedder, base_images), embed_images(embedder, chosen_images)
    if eb.shape[1] != ec.shape[1]:
        raise ValueError(f"embedding sizes differ: {eb.shape[1]} vs {ec.shape[1]}")
    d = cosine_distances(eb, ec, paired=paired).reshape(-1)
    centroid = 1.0 - F.cosine_similarity(eb.mean(0), ec.mean(0), dim=0)
    return {
        "mean_distance": float(d.mean()),
        "std_distance": float(d.std()) if d.numel() > 1 else 0.0,
        "median_distance": float(d.median()),
        "centroid_distance": float(centroid.clamp(min=0.0)),
        "n_base": len(base_images),
        "n_chosen": len(chosen_images),
        "n_pairs": int(d.numel()),
        "paired": paired,
    }


def mismatch_note(value: float | dict[str, Any], threshold: float = DEFAULT_MISMATCH_THRESHOLD) -> str:
    """A one-line recommendation from a mismatch value (or ``reference_mismatch``'s dict)."""
    v = float(value["mean_distance"]) if isinstance(value, dict) else float(value)
    if v > threshold:
        return (
            f"large mismatch ({v:.3f} > {threshold:.3f}): MaPO recommended; the chosen images are far from "
            "the base model's samples, so a reference-anchored objective (Diffusion-DPO) would pull against "
            "the data"
        )
    return (
        f"small mismatch ({v:.3f} <= {threshold:.3f}): the chosen images are close to the base model's "
        "samples; a reference-based objective (Diffusion-DPO) is reasonable"
    )
