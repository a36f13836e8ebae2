"""Reward scorers for generated images.

Every scorer maps ``(images, prompts)`` to one float32 score per image, on the CPU, computed in
batches under ``torch.no_grad``. All of them load through ``transformers`` ``from_pretrained``, from a
local directory or a hub id; the default hub ids are the releases the scores are usually quoted
for.

| name        | architecture                          | score                                          |
|-------------|---------------------------------------|------------------------------------------------|
| pickscore   | CLIP ViT-H/14 (PickScore_v1)          | ``logit_scale.exp() * cos(text, image)``       |
| clip        | CLIP (default ViT-L/14)               | ``100 * max(cos(text, image), 0)``             |
| hpsv2       | CLIP ViT-H/14 fine-tune, converted    | ``100 * cos(text, image)``                     |
| imagereward | BLIP ITM encoder + MLP head           | ``(mlp(cls) - mean) / std``                    |
| aesthetic   | CLIP ViT-L/14 image embedding + MLP   | ``mlp(normalize(image_embeds))``               |
| dino        | DINOv2 CLS embedding                  | mean cosine similarity to reference images     |

``build_scorer(name, path)`` is the registry entry point; ``build_scorers`` builds a whole
``"name:path,..."`` spec (the ``eval.scorers`` / ``tracking.scorers`` syntax) and ``score_all`` scores
images with each. The scorers live in ``clip_scorers``, ``imagereward`` and ``dino``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffalign.eval.base import Scorer
from diffalign.eval.clip_scorers import AestheticScorer, ClipScore, HPSv2, PickScore
from diffalign.eval.dino import DinoSimilarity
from diffalign.eval.imagereward import ImageReward
from diffalign.specs import parse_scorers

# Built scorers or paths (None: the default release) by name, or a "name:path,..." spec.
ScorerSpec = Mapping[str, "Scorer | str | os.PathLike[str] | None"] | str

SCORERS: dict[str, Callable[..., Scorer]] = {
    "pickscore": PickScore.from_pretrained,
    "hpsv2": HPSv2.from_pretrained,
    "imagereward": ImageReward.from_pretrained,
    "aesthetic": AestheticScorer.from_pretrained,
    "clip": ClipScore.from_pretrained,
    "dino": DinoSimilarity.from_pretrained,
}


def build_scorer(
    name: str,
    path: str | os.PathLike[str] | Path | None = None,
    device: str | torch.device = "cpu",
    **kw: Any,
) -> Scorer:
    """Load scorer ``name`` from ``path`` (local directory or hub id; ``None`` = its default release).

    Extra keywords go to that scorer's ``from_pretrained`` (``dtype``, ``batch_size``, ``processor_path``,
    ``head_path``, ``references`` ...).
    """
    key = name.strip().lower()
    if key not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[key](path, device=device, **kw)


def build_scorers(
    scorers: ScorerSpec, device: str | torch.device, references: Sequence[Image.Image] | None = None
) -> dict[str, Scorer]:
    """Every scorer of ``scorers`` by name; already built ones (anything with ``score``) are kept.
    ``references`` are the ``dino`` scorer's reference images."""
    spec = parse_scorers(scorers) if isinstance(scorers, str) else dict(scorers)
    if not spec:
        raise ValueError("no scorers given")
    built: dict[str, Scorer] = {}
    for name, value in spec.items():
        if isinstance(value, Scorer) or (value is not None and hasattr(value, "score")):
            built[name] = value  # type: ignore[assignment]
            continue
        kw: dict[str, Any] = {}
        if name == "dino":
            if not references:
                raise ValueError("scorer dino needs reference images (references=..., eval.references=DIR)")
            kw["references"] = list(references)
        built[name] = build_scorer(name, None if value is None else os.fspath(value), device=device, **kw)
    return built


def score_all(
    scorers: Mapping[str, Scorer], images: list[Image.Image], prompts: list[str]
) -> dict[str, list[float]]:
    """Per-image scores of ``images`` by scorer name."""
    return {name: s.score(images, prompts).tolist() for name, s in scorers.items()}
