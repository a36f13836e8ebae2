"""Caches of what the frozen encoders compute: VAE latents per pair, text embeddings per unique prompt.

The VAE and (unless `model.train_text_encoder`) the text encoders are frozen, so encoding each image
and each prompt once instead of every step gives the same tensors, and is most of a CPU step's time
on small models.

Latents and `data.latent_sampling` (see `pair_latents`):
- `sample` (default): every read draws `latent_dist.sample()` and, when the reader flips images
  (`data.random_flip` on a file dataset), a new horizontal flip, as diffusers' Diffusion-DPO and the
  official MaPO scripts do on every read. The cache keeps what that needs: the posterior mean and
  std of both images, for the image as first read and for its mirror image. Each read's flip and
  noise come from `latent_draws(seed, epoch, index)`, so cached and uncached runs (`SampledPixels`)
  draw the same noise for the same read, and what a step reads is a function of the step alone
  (exact resume). Random crops (`data.center_crop=false`) stay those of the first read.
- `mean`: the posterior mean of each pair's first read, its flip and crop fixed for the run (no
  per-read randomness; uncached runs encode the mean of every read, flipped by the reader).

Memory per pair, float32 (latents 4 x h/8 x w/8: SD1.5 at 512 px 64 KiB, SDXL at 1024 px 256 KiB per
image): `mean` 2 latents (SD1.5 128 KiB, SDXL 512 KiB); `sample` 4 without flips (256 KiB / 1 MiB)
and 8 with flips (512 KiB / 2 MiB), i.e. 4x `mean` with flips: +384 KiB (SD1.5) or +1.5 MiB (SDXL)
per pair. The cache is held in CPU memory; the SD1.5 / SDXL presets do not cache.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffalign.config.schema import LATENT_SAMPLING
from diffalign.data.collate import collate_pairs
from diffalign.data.latent_cache import sample_latents
from diffalign.data.transforms import latent_draws
from diffalign.models.conditioning import PromptEncoder
from diffalign.train.step import LatentEncoder

log = logging.getLogger(__name__)

_SIZE_KEYS = ("original_size", "crop_top_left")
# Pairs above which the in-memory latent cache is worth a warning: a pair store scales, this does not.
LARGE_IN_MEMORY_CACHE = 50_000


def _read(dataset: Dataset, i: int, epoch: int) -> dict:
    item = getattr(dataset, "item", None)
    return item(i, epoch) if item is not None else dataset[i]


class CachedPairs(Dataset):
    """A map-style pair dataset with its images VAE-encoded once (latents held on the CPU).

    `item(i, epoch)` is what the trainer reads (`read_items`); with `sampling="sample"` it draws the
    latents (and the flip) of read (epoch, i), with `"mean"` it returns the cached means.
    """

    def __init__(self, dataset: Dataset, latent_encoder: LatentEncoder, batch_size: int = 16,
                 progress: bool = True, *, sampling: str = "mean", seed: int = 0) -> None:
        if sampling not in LATENT_SAMPLING:
            raise ValueError(f"data.latent_sampling={sampling!r}; choose one of {', '.join(LATENT_SAMPLING)}")
        self.sampling, self.seed = sampling, seed
        transform = getattr(dataset, "transform", None)
        # Flip per read only where the uncached reader would flip, so both see the same images.
        self.flips = sampling == "sample" and bool(getattr(transform, "random_flip", False))
        if sampling == "sample" and getattr(transform, "random_crop", False):
            log.warning("data.cache_latents keeps each pair's random crop of its first read; "
                        "an uncached run draws a new crop every read")
        self.transform = transform
        views, moments = (2 if self.flips else 1), (2 if sampling == "sample" else 1)
        n = len(dataset)
        self._prompts: list[str] = []
        self._sizes: list[list[dict]] = []  # per item, per view: original_size / crop_top_left
        self.latents: torch.Tensor | None = None  # (n, views, [chosen, rejected], [mean, std], C, h, w)
        for start in tqdm(range(0, n, batch_size), desc="caching latents", disable=not progress, leave=False):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            batch = collate_pairs(items)
            pixels = torch.cat([batch["chosen"], batch["rejected"]])
            if self.flips:
                pixels = torch.cat([pixels, pixels.flip(-1)])
            if moments == 2:
                lat = torch.stack(latent_encoder.moments(pixels), dim=1).cpu()  # (views*2*b, 2, C, h, w)
            else:
                lat = latent_encoder(pixels).cpu()[:, None]
            b = len(items)
            lat = lat.view(views, 2, b, moments, *lat.shape[2:]).permute(2, 0, 1, 3, 4, 5, 6)
            if self.latents is None:
                self.latents = torch.empty((n, *lat.shape[1:]), dtype=lat.dtype)
            self.latents[start:start + b] = lat
            for item in items:
                self._prompts.append(item["prompt"])
                self._sizes.append(self._views(item))
        log.info("cached the latents of %d pairs (%s, %s): %.1f MiB", n, sampling,
                 "both flips" if self.flips else "as read", self.nbytes / 2**20)

    def _views(self, item: dict) -> list[dict]:
        sizes = {k: tuple(item[k]) for k in _SIZE_KEYS if k in item}
        views = [sizes]
        if self.flips:
            mirrored = dict(sizes)
            if "crop_top_left" in sizes and "original_size" in sizes:
                # The mirror of a crop is a crop of the mirrored image (what SDXL's time ids describe).
                mirrored["crop_top_left"] = self.transform.mirrored_crop(sizes["original_size"],
                                                                         sizes["crop_top_left"])
            views.append(mirrored)
        return views

    @property
    def nbytes(self) -> int:
        return 0 if self.latents is None else self.latents.nbytes

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, idx: int) -> dict:
        return self.item(idx, 0)

    def item(self, idx: int, epoch: int) -> dict:
        """Pair `idx` as read at `epoch`: a function of (seed, epoch, idx) alone."""
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        lat = self.latents[idx]
        if self.sampling == "mean":
            view, chosen, rejected = 0, lat[0, 0, 0], lat[0, 1, 0]
        else:
            flip, seed_w, seed_l = latent_draws(self.seed, epoch, idx)
            view = int(flip and self.flips)
            both = sample_latents(lat[view, :, 0], lat[view, :, 1], [seed_w, seed_l])
            chosen, rejected = both[0], both[1]
        return {"prompt": self._prompts[idx], "chosen_latents": chosen, "rejected_latents": rejected,
                **self._sizes[idx][view]}

    @property
    def prompts(self) -> list[str]:
        """The prompt of every item, in order (read without touching latents)."""
        return list(self._prompts)


class SampledPixels(Dataset):
    """Pixel pairs whose latents the step samples (`data.latent_sampling=sample`, uncached): each read
    carries `latent_seeds`, the same `latent_draws(seed, epoch, index)` seeds a cached read uses; the
    flip is the reader's own. Other attributes are the wrapped dataset's."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        return self.item(idx, getattr(self.dataset, "epoch", 0))

    def item(self, idx: int, epoch: int) -> dict:
        _, seed_w, seed_l = latent_draws(self.seed, epoch, idx)
        return {**_read(self.dataset, idx, epoch), "latent_seeds": (seed_w, seed_l)}

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def pair_latents(dataset: Dataset, latent_encoder: LatentEncoder, *, cache: bool, sampling: str, seed: int,
                 progress: bool = True) -> Dataset:
    """The training pairs as the step reads them (`data.cache_latents`, `data.latent_sampling`):
    cached latents, pixels with per-read noise seeds, or the pixels as they are (`mean`, uncached)."""
    if cache:
        if len(dataset) > LARGE_IN_MEMORY_CACHE:
            log.warning("data.cache_latents=true reads, decodes and VAE-encodes all %d pairs into this "
                        "process's memory before step 1 (SD1.5: up to 512 KiB, SDXL 2 MiB per pair). At "
                        "this size prepare a pair store once (recipes/prepare_data.py) and train with "
                        "data.kind=store, or set data.cache_latents=false", len(dataset))
        return CachedPairs(dataset, latent_encoder, progress=progress, sampling=sampling, seed=seed)
    if sampling == "sample":
        return SampledPixels(dataset, seed)
    return dataset


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
                row = embeds[i]
                if self.bundle.family == "qwenimage":
                    # Kept without its zero padding (most of a 512-token budget for short prompts).
                    row = row[: max(int((row != 0).any(dim=-1).sum()), 1)].clone()
                self._rows[prompt] = (row, None if pooled is None else pooled[i])

    def prefill(self, prompts: list[str], batch_size: int = 64) -> None:
        unique = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        for start in range(0, len(unique), batch_size):
            self._add(unique[start:start + batch_size])
        log.info("cached the text embeddings of %d prompts (%.1f MiB on %s)", len(self), self.nbytes / 2**20,
                 self.device)

    def text_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._add(prompts)
        rows = [self._rows[p] for p in prompts]
        if self.bundle.family == "qwenimage":  # padded back to the fixed budget PromptEncoder returns
            n = self.max_sequence_length
            embeds = torch.stack([torch.cat([r[0], r[0].new_zeros(n - r[0].shape[0], r[0].shape[1])])
                                  for r in rows])
        else:
            embeds = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        return embeds, pooled


def prefill_prompt_cache(encoder: PromptEncoder, dataset) -> None:
    """Encodes the prompts of `dataset` now when `encoder` caches and the dataset lists its prompts
    (`CachedPairs`, the on-disk latent cache) without reading images."""
    prompts = getattr(dataset, "prompts", None)
    if isinstance(encoder, CachedPromptEncoder) and isinstance(prompts, list):
        encoder.prefill(prompts)
