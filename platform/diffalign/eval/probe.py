"""The reference-mismatch probe run (MaPO, Figure 2), before any training: how far a preference
dataset's chosen images are from what the base model generates, so the objective can be picked first.
The distances themselves are `diffalign.eval.mismatch`'s."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from diffalign.config import RunConfig
from diffalign.eval.base_model import default_guidance, default_steps, load_base_model, resolve_device
from diffalign.eval.embedding import ImageEmbedder
from diffalign.eval.mismatch import Embedder, mismatch_note, reference_mismatch
from diffalign.models.sampling import generate_images


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """A ``(3, H, W)`` image in ``[-1, 1]`` -> RGB PIL image."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(arr.cpu().numpy(), "RGB")


def mismatch_probe(
    cfg: RunConfig,
    dataset: Sequence[dict[str, Any]],
    embedder: Embedder | str | os.PathLike[str],
    n: int = 16,
    *,
    floor: bool = True,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean cosine distance between base-model samples and the dataset's chosen images.

    The first ``n`` pairs of ``dataset`` give the chosen images and the prompts; the base model
    (``cfg.model``) samples one image per prompt with seeds ``0..n-1``. ``embedder`` is an
    ``ImageEmbedder``, a CLIP/DINO scorer, a callable, or a model path (CLIP or DINOv2). With
    ``floor``, a second set of base samples (seeds ``n..2n-1``) gives the base-vs-base distance, the
    value a dataset drawn from the base model itself would get. Returns ``reference_mismatch``'s dict
    plus ``floor_distance``, ``excess_over_floor`` and ``note`` (``mismatch_note``).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n = min(n, len(dataset))
    items = [dataset[i] for i in range(n)]
    if "chosen" not in items[0]:
        raise ValueError("mismatch_probe needs a dataset yielding chosen images (not cached latents)")
    prompts = [str(it["prompt"]) for it in items]
    chosen = [tensor_to_pil(it["chosen"]) for it in items]
    dev = resolve_device(device)
    if isinstance(embedder, (str, os.PathLike)):
        embedder = ImageEmbedder.from_pretrained(embedder, device=dev)
    bundle = load_base_model(cfg, dev)
    pipe = bundle.pipeline()
    gen_kw = dict(steps=default_steps(cfg, steps), guidance_scale=default_guidance(cfg, guidance_scale),
                  resolution=bundle.resolution, batch_size=batch_size, progress=progress)
    base = generate_images(pipe, prompts, list(range(n)), desc="base samples", **gen_kw)
    result = reference_mismatch(base, chosen, embedder)
    if floor:
        base2 = generate_images(pipe, prompts, list(range(n, 2 * n)), desc="floor samples", **gen_kw)
        result["floor_distance"] = reference_mismatch(base, base2, embedder)["mean_distance"]
        result["excess_over_floor"] = result["mean_distance"] - result["floor_distance"]
    result["note"] = mismatch_note(result)
    return result
