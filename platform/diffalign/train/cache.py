"""Caches of what the frozen encoders compute: VAE latents per pair, text embeddings per unique prompt.

The VAE and (unless `model.train_text_encoder`) the text encoders are frozen, so encoding each image
and each prompt once instead of every step gives the same tensors, and is most of a CPU step's time
on small models.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from diffalign.data.collate import collate_pairs
from diffalign.models.conditioning import PromptEncoder

log = logging.getLogger(__name__)


class CachedPairs(torch.utils.data.Dataset):
    """A map-style pair dataset with its images VAE-encoded once (latents held on the CPU)."""

    def __init__(self, dataset, latent_encoder, batch_size: int = 16, progress: bool = True) -> None:
        self.items: list[dict] = []
        n = len(dataset)
        for start in tqdm(range(0, n, batch_size), desc="caching latents", disable=not progress, leave=False):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            batch = collate_pairs(items)
            lat = latent_encoder(torch.cat([batch["chosen"], batch["rejected"]])).cpu()
            cw, cl = lat.chunk(2)
            for j, item in enumerate(items):
                entry = {"prompt": item["prompt"], "chosen_latents": cw[j], "rejected_latents": cl[j]}
                for key in ("original_size", "crop_top_left"):
                    if key in item:
                        entry[key] = item[key]
                self.items.append(entry)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        return self.items[idx]

    @property
    def prompts(self) -> list[str]:
        """The prompt of every item, in order (read without touching latents)."""
        return [item["prompt"] for item in self.items]


class CachedPromptEncoder(PromptEncoder):
    """A `PromptEncoder` that runs the text encoders once per unique prompt.

    One row per prompt, whatever the number of pairs sharing it, kept on the text encoders' device
    (the training device) in their output dtype, so the float32 conditioning built from it is the
    one `PromptEncoder` returns (SD1.5 at 77x768: 116 KiB per prompt in bf16). SDXL time ids
    depend on each item's size and crop, not on the prompt, and are still built per batch.

    `prefill` encodes a dataset's prompts up front in dataset order; a prompt not seen before is
    encoded with the other new prompts of its batch. The rows equal an uncached encode up to the
    text encoders' batch-size-dependent rounding (a matmul over 3 rows may round its last bit
    unlike one over 4); prefilled rows do not depend on the step history, so a resumed run reads
    the same ones.
    """

    def __init__(self, bundle) -> None:
        super().__init__(bundle)
        if self.trainable:
            raise ValueError("the text encoders have trainable parameters (model.train_text_encoder): "
                             "their outputs change every step and must not be cached")
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for row in self._rows.values() for t in row if t is not None)

    @torch.no_grad()
    def _add(self, prompts: list[str]) -> None:
        new = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        if new:
            embeds, pooled = super().text_embeddings(new)
            for i, prompt in enumerate(new):
                self._rows[prompt] = (embeds[i], None if pooled is None else pooled[i])

    def prefill(self, prompts: list[str], batch_size: int = 64) -> None:
        unique = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        for start in range(0, len(unique), batch_size):
            self._add(unique[start:start + batch_size])
        log.info("cached the text embeddings of %d prompts (%.1f MiB on %s)", len(self), self.nbytes / 2**20,
                 self.device)

    def text_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._add(prompts)
        rows = [self._rows[p] for p in prompts]
        embeds = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        return embeds, pooled


def prefill_prompt_cache(encoder: PromptEncoder, dataset) -> None:
    """Encodes the prompts of `dataset` now when `encoder` caches and the dataset lists its prompts
    (`CachedPairs`, the on-disk latent cache) without reading images."""
    prompts = getattr(dataset, "prompts", None)
    if isinstance(encoder, CachedPromptEncoder) and isinstance(prompts, list):
        encoder.prefill(prompts)
