"""Build a style / safety preference-pair dataset end to end (MaPO's Pick-Style and Pick-Safety recipe).

1. captions -> context prompts (LLM, ``prompts.py``)
2. context prompt -> chosen / rejected prompts (style prefixes, ``styles.py``)
3. both images generated from the same seed (any callable: a local diffusers pipeline or the Ray
   sampler-actor pool)
4. optional VLM judge; pairs whose chosen image misses the target are dropped (``judge.py``)

The output is a Pick-a-Pic v2-style parquet (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``, ...) that the
Pick-a-Pic loaders read as is, plus a JSON summary of what was kept and why the rest was dropped.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from diffalign.curate.judge import Judge, filter_pairs
from diffalign.curate.llm import TextGenerator
from diffalign.curate.prompts import (
    ExtractedPrompt,
    count_fallbacks,
    dedupe_prompts,
    extract_context_prompts,
)
from diffalign.curate.styles import StylePreset, apply_style, get_preset

ImageGenerator = Callable[[list[str], list[int]], list[Image.Image]]
Extractor = TextGenerator | Callable[[list[str]], list[ExtractedPrompt]] | None

PAIR_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("chosen_prompt", pa.string()),
        ("rejected_prompt", pa.string()),
        ("seed", pa.int64()),
        ("judge_chosen", pa.float64()),
        ("judge_rejected", pa.float64()),
    ]
)


@dataclass
class BuildSummary:
    """Counts for one build; ``dropped`` maps a reason to how many prompts or pairs it removed."""

    preset: str
    out_path: str
    num_captions: int
    num_contexts: int
    extraction_fallbacks: int
    generated_pairs: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    judged: bool = False
    threshold: float | None = None
    min_gap: float | None = None
    seed: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)  # provenance from the caller (models, sampler)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pair_seeds(seed: int, n: int) -> list[int]:
    """One generation seed per pair, reproducible from ``seed`` and spread over the int31 range."""
    return np.random.default_rng(seed).integers(0, 2**31 - 1, size=n).tolist()


def _extract(
    prompts: list[str], extractor: Extractor, seed: int, batch_size: int, max_new_tokens: int
) -> list[ExtractedPrompt]:
    if extractor is None:  # the prompts already are context prompts
        return [ExtractedPrompt(p, p.strip(), False) for p in prompts]
    if isinstance(extractor, TextGenerator):
        return extract_context_prompts(
            prompts, extractor, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed, progress=True
        )
    extracted = list(extractor(prompts))
    if len(extracted) != len(prompts):
        raise RuntimeError(f"extractor returned {len(extracted)} prompts for {len(prompts)} captions")
    return extracted


def build_pair_dataset(
    prompts: Sequence[str],
    preset: str | StylePreset,
    extractor: Extractor,
    image_generator: ImageGenerator,
    judge: Judge | None,
    out_path: str | os.PathLike[str],
    seed: int = 0,
    threshold: float = 6.0,
    *,
    min_gap: float | None = None,
    batch_size: int = 8,
    extract_batch_size: int = 32,
    max_context_tokens: int = 96,
    dedupe: bool = True,
    jpeg_quality: int = 95,
    summary_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> BuildSummary:
    """Run steps 1-4 and write the parquet to ``out_path`` and a summary JSON next to it.

    ``extractor`` is a :class:`TextGenerator` (its output is parsed by ``extract_context_prompts``), any
    callable mapping captions to :class:`ExtractedPrompt`, or ``None`` when ``prompts`` are already context
    prompts. ``image_generator(prompts, seeds)`` gets the chosen prompts followed by the rejected ones
    with the same seeds, so each pair differs only in its style prefix. Rows are written batch by batch,
    so memory stays flat however many pairs are built. ``metadata`` is stored as is in the summary.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    style = get_preset(preset)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    summary_file = Path(summary_path) if summary_path else out_path.with_suffix(".summary.json")
    dropped: Counter[str] = Counter()

    captions = [p for p in prompts if re.search(r"[A-Za-z0-9]", p or "")]
    dropped["empty_caption"] += len(prompts) - len(captions)
    extracted = _extract(captions, extractor, seed, extract_batch_size, max_context_tokens)
    fallbacks = count_fallbacks(extracted)
    if dedupe:
        unique = dedupe_prompts(extracted)
        dropped["duplicate_context"] += len(extracted) - len(unique)
        extracted = unique

    seeds = pair_seeds(seed, len(extracted))
    kept_total = 0
    # Write to a temporary name first so an interrupted run never leaves a truncated file behind.
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    bar = tqdm(total=len(extracted), desc=f"pairs [{style.name}]", disable=not progress)
    with pq.ParquetWriter(tmp_path, PAIR_SCHEMA) as writer:
        for start in range(0, len(extracted), batch_size):
            batch = extracted[start : start + batch_size]
            batch_seeds = seeds[start : start + batch_size]
            styled = [apply_style(p.context, style) for p in batch]
            chosen_prompts = [c for c, _ in styled]
            rejected_prompts = [r for _, r in styled]
            images = image_generator(chosen_prompts + rejected_prompts, batch_seeds + batch_seeds)
            if len(images) != 2 * len(batch):
                raise RuntimeError(
                    f"image_generator returned {len(images)} images for {2 * len(batch)} prompts"
                )
            chosen_images, rejected_images = images[: len(batch)], images[len(batch) :]

            if judge is not None:
                targets = [style.judge_description(p.context) for p in batch]
                scores = judge.score(chosen_images + rejected_images, targets + targets)
                chosen_scores, rejected_scores = scores[: len(batch)], scores[len(batch) :]
                kept_idx, counts = filter_pairs(
                    list(range(len(batch))), chosen_scores, rejected_scores, threshold, min_gap
                )
                for reason, n in counts.items():
                    if reason != "kept":
                        dropped[reason] += n
            else:
                chosen_scores = rejected_scores = [None] * len(batch)
                kept_idx = list(range(len(batch)))

            rows = {name: [] for name in PAIR_SCHEMA.names}
            for i in kept_idx:
                rows["caption"].append(batch[i].context)  # no style prefix: see styles.py
                rows["jpg_0"].append(encode_jpeg(chosen_images[i], jpeg_quality))
                rows["jpg_1"].append(encode_jpeg(rejected_images[i], jpeg_quality))
                rows["label_0"].append(1.0)  # image 0 (the chosen style) is preferred
                rows["label_1"].append(0.0)
                rows["chosen_prompt"].append(chosen_prompts[i])
                rows["rejected_prompt"].append(rejected_prompts[i])
                rows["seed"].append(int(batch_seeds[i]))
                rows["judge_chosen"].append(chosen_scores[i])
                rows["judge_rejected"].append(rejected_scores[i])
            if kept_idx:
                writer.write_table(pa.Table.from_pydict(rows, schema=PAIR_SCHEMA))
            kept_total += len(kept_idx)
            bar.update(len(batch))
            bar.set_postfix(kept=kept_total)
    bar.close()
    os.replace(tmp_path, out_path)

    summary = BuildSummary(
        preset=style.name,
        out_path=str(out_path),
        num_captions=len(prompts),
        num_contexts=len(extracted),
        extraction_fallbacks=fallbacks,
        generated_pairs=len(extracted),
        kept=kept_total,
        dropped={k: v for k, v in sorted(dropped.items()) if v},
        judged=judge is not None,
        threshold=threshold if judge is not None else None,
        min_gap=min_gap if judge is not None else None,
        seed=seed,
        metadata=dict(metadata or {}),
    )
    summary_file.parent.mkdir(parents=True, exist_ok=True)
    summary_file.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary
