"""Encode pair images with the VAE once and train from cached latents.

Layout of ``out_dir``: ``latents-00000.safetensors`` ... (tensors ``chosen`` / ``rejected`` of shape
(n, C, h, w)) and ``index.json`` (written last, so a cache without it is incomplete) holding prompts,
shapes, count, optional SDXL size info and a fingerprint of the VAE config + image size. A cache whose
fingerprint differs from the VAE / resolution in use is refused with :class:`StaleCacheError`.

Per-read sampling (``data.latent_sampling=sample``, as diffusers' Diffusion-DPO and the official MaPO
draw ``latent_dist.sample()`` and a new flip on every read): ``precompute_latents(with_std=True)``
also stores the posterior std (``chosen_std`` ...) and ``mirrored=True`` the latents of the mirror
images (``chosen_mirrored``, ``chosen_mirrored_std`` ...); ``LatentPairDataset(sampling="sample")``
then draws each read from ``latent_draws(seed, epoch, index)``, the draw the in-memory cache
(``diffalign.train.cache.CachedPairs``) and an uncached run make for the same read. Size per pair in
float32: 2 latents (means), 4 with std, 8 with std and mirrors (SD1.5 at 512 px: 128 / 256 / 512
KiB; SDXL at 1024 px: 512 KiB / 1 / 2 MiB).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from diffalign.data.collate import collate_pairs
from diffalign.data.transforms import latent_draws

logger = logging.getLogger("diffalign.data")

CACHE_FORMAT = 1
INDEX_NAME = "index.json"
SHARD_PATTERN = "latents-{:05d}.safetensors"
ENCODING = "latent_dist.mean, (x - shift_factor) * scaling_factor"
# Image keys that get encoded, in the order they are looked for; each becomes f"{key}_latents".
IMAGE_KEYS = ("chosen", "rejected", "image")


class StaleCacheError(RuntimeError):
    """The cache on disk was built for a different VAE config or image size (or is incomplete)."""


def _config_dict(vae_or_config: Any) -> dict[str, Any]:
    config = getattr(vae_or_config, "config", vae_or_config)
    # Keys starting with "_" (class name, library version, source path) do not change the latents.
    return {k: v for k, v in dict(config).items() if not str(k).startswith("_")}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_fingerprint(vae_or_config: Any, image_size: tuple[int, int]) -> tuple[str, dict[str, Any]]:
    """(digest, parts) identifying how latents were made: VAE config, input (H, W), encoding rule."""
    parts = _jsonable(
        {
            "format": CACHE_FORMAT,
            "encoding": ENCODING,
            "image_size": list(image_size),
            "vae_config": _config_dict(vae_or_config),
        }
    )
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return digest, parts


def _diff(cached: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(cached) | set(current)):
        a, b = cached.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: cached {a!r}, now {b!r}")
    return out


@torch.no_grad()
def vae_moments(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) in [-1, 1] -> (mean, std) of the normalised latent posterior, float32 on the VAE's
    device, (B, C, h, w). SD / SDXL / SD3 / FLUX: z = (x - shift) * scale, so mean (mean - shift) *
    scale and std std * scale. Qwen-Image's video VAE (latents_mean / latents_std per channel, a frame
    axis): the image is one frame, z = (x - mu_c) / sigma_c, as its pipeline inverts before decoding."""
    param = next(vae.parameters())
    config = vae.config
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    video = get("latents_mean") is not None and get("scaling_factor") is None
    x = images.to(device=param.device, dtype=param.dtype)
    dist = vae.encode(x[:, :, None] if video else x).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    if video:
        mu = torch.tensor(get("latents_mean"), device=mean.device).view(1, -1, 1, 1, 1)
        sigma = torch.tensor(get("latents_std"), device=mean.device).view(1, -1, 1, 1, 1)
        return ((mean - mu) / sigma)[:, :, 0], (std / sigma)[:, :, 0]
    shift = get("shift_factor")
    if shift is not None:
        mean = mean - shift
    return mean * config.scaling_factor, std * config.scaling_factor


def encode_moments(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`vae_moments` on the CPU."""
    mean, std = vae_moments(vae, images)
    return mean.cpu(), std.cpu()


def encode_latents(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (float32, on CPU), as the denoiser consumes them."""
    return encode_moments(vae, images)[0]


def latent_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of one image's latent from its own generator (float32, CPU), so a draw
    depends on its seed alone, not on the batch it is read in."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def sample_latents(mean: torch.Tensor, std: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """``latent_dist.sample()`` in scaled units, one seed per image: mean + std * N(0, 1)."""
    noise = torch.stack([latent_noise(s, mean.shape[1:]) for s in seeds]).to(mean.device)
    return mean + std * noise


def _iterate(dataset: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    if (
        not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__len__")
        and hasattr(dataset, "__getitem__")
    ):
        for i in range(len(dataset)):  # type: ignore[arg-type]
            yield dataset[i]  # type: ignore[index]
    else:
        yield from dataset


def _read_index(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / INDEX_NAME
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_fingerprint(
    index: Mapping[str, Any], digest: str, parts: Mapping[str, Any], out_dir: Path
) -> None:
    if index.get("fingerprint") == digest:
        return
    changes = _diff(index.get("fingerprint_parts", {}), parts) or ["fingerprint differs"]
    raise StaleCacheError(
        f"latent cache {out_dir} is stale (built for a different VAE or resolution): "
        + "; ".join(changes[:10])
        + ". Delete it or rebuild with precompute_latents(..., overwrite=True)."
    )


def _remove_cache(out_dir: Path) -> None:
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    for f in out_dir.glob("latents-*.safetensors"):
        f.unlink()


def precompute_latents(
    dataset: Iterable[dict[str, Any]],
    vae: Any,
    out_dir: str | Path,
    batch_size: int = 8,
    shard_size: int = 1024,
    *,
    store_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
    with_std: bool = False,
    mirrored: bool = False,
) -> dict[str, Any]:
    """Encode every item's images once into ``out_dir``; returns the written (or reused) index.

    If ``out_dir`` already holds a complete cache with the same fingerprint it is reused as is; a
    different fingerprint raises :class:`StaleCacheError` unless ``overwrite=True``. Runs in one
    process; the dataset's own issue accounting still applies while it is read.

    ``with_std`` also stores the posterior std of every latent, ``mirrored`` the latents of every
    image's mirror image (with its crop top-left, from the dataset's ``PairTransform``): what
    ``LatentPairDataset(sampling="sample")`` needs to draw a sample and a flip per read. A cache
    lacking one that is asked for is stale.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = _read_index(out)
    items = _iterate(dataset)
    first = next(items, None)
    if first is None:
        raise ValueError("dataset is empty: nothing to cache")
    keys = [k for k in IMAGE_KEYS if k in first]
    if not keys:
        raise ValueError(f"items have none of the image keys {IMAGE_KEYS}: {sorted(first)}")
    image_size = tuple(int(s) for s in first[keys[0]].shape[-2:])
    digest, parts = cache_fingerprint(vae, image_size)  # type: ignore[arg-type]
    if existing is not None and not overwrite:
        _check_fingerprint(existing, digest, parts, out)
        missing = [name for name, asked in (("with_std", with_std), ("mirrored", mirrored))
                   if asked and not existing.get(name, False)]
        if missing:
            raise StaleCacheError(f"latent cache {out} was built without {', '.join(missing)}; rebuild with "
                                  "precompute_latents(..., overwrite=True)")
        logger.info("reusing latent cache %s (%d items)", out, existing["count"])
        return existing
    transform = getattr(dataset, "transform", None)
    if mirrored and "crop_top_left" in first and not hasattr(transform, "mirrored_crop"):
        raise ValueError("mirrored=True: the dataset has no PairTransform to mirror its crop coordinates")
    _remove_cache(out)
    # Stored tensors per image key: the means, then optionally their stds and the mirror images'.
    views = ["", "_mirrored"] if mirrored else [""]
    stored = {k: [k + v + m for v in views for m in (["", "_std"] if with_std else [""])] for k in keys}
    names = [n for k in keys for n in stored[k]]

    total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, desc="encoding latents", unit="item", disable=not progress)
    shards: list[dict[str, Any]] = []
    prompts: list[str] = []
    original_sizes: list[Any] = []
    crop_top_lefts: list[Any] = []
    mirrored_crops: list[Any] = []
    pending: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    latent_shape: list[int] | None = None

    def pending_count() -> int:
        return sum(t.shape[0] for t in pending[names[0]])

    def write_shard(limit: int) -> None:
        # Cut exactly `limit` rows so shard boundaries do not depend on batch_size.
        joined = {k: torch.cat(pending[k]) for k in names}
        n = min(limit, joined[names[0]].shape[0])
        name = SHARD_PATTERN.format(len(shards))
        tensors = {k: joined[k][:n].to(store_dtype).contiguous() for k in names}
        save_file(tensors, str(out / name), metadata={"fingerprint": digest})
        shards.append({"file": name, "count": n})
        for k in names:
            rest = joined[k][n:]
            pending[k][:] = [rest] if rest.shape[0] else []

    def encode_batch(batch_items: list[dict[str, Any]]) -> None:
        nonlocal latent_shape
        batch = collate_pairs(batch_items)
        prompts.extend(batch["prompts"])
        sizes = batch.get("original_sizes") or [None] * len(batch_items)
        crops = batch.get("crop_top_lefts") or [None] * len(batch_items)
        original_sizes.extend(sizes)
        crop_top_lefts.extend(crops)
        mirrored_crops.extend(transform.mirrored_crop(o, c) if mirrored and o is not None and c is not None
                              else None for o, c in zip(sizes, crops))
        b = len(batch_items)
        for k in keys:
            images = batch["images" if k == "image" else k]
            if mirrored:
                images = torch.cat([images, images.flip(-1)])
            mean, std = encode_moments(vae, images) if with_std else (encode_latents(vae, images), None)
            latent_shape = list(mean.shape[1:])
            for j, view in enumerate(views):
                pending[k + view].append(mean[j * b:(j + 1) * b])
                if with_std:
                    pending[k + view + "_std"].append(std[j * b:(j + 1) * b])
        bar.update(len(batch_items))
        while pending_count() >= shard_size:
            write_shard(shard_size)

    batch_items = [first]
    try:
        for item in items:
            if len(batch_items) == batch_size:
                encode_batch(batch_items)
                batch_items = []
            batch_items.append(item)
        encode_batch(batch_items)
        if pending_count():
            write_shard(shard_size)
    finally:
        bar.close()

    index = {
        "format": CACHE_FORMAT,
        "fingerprint": digest,
        "fingerprint_parts": parts,
        "count": len(prompts),
        "keys": [f"{k}_latents" for k in keys],
        "image_size": list(image_size),
        "latent_shape": latent_shape,
        "store_dtype": str(store_dtype).removeprefix("torch."),
        "shards": shards,
        "prompts": prompts,
        "original_sizes": None
        if all(s is None for s in original_sizes)
        else [list(s) for s in original_sizes],
        "crop_top_lefts": None
        if all(c is None for c in crop_top_lefts)
        else [list(c) for c in crop_top_lefts],
        "with_std": with_std,
        "mirrored": mirrored,
        "crop_top_lefts_mirrored": None
        if all(c is None for c in mirrored_crops)
        else [list(c) for c in mirrored_crops],
    }
    tmp = out / (INDEX_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f)
    os.replace(tmp, out / INDEX_NAME)  # atomic: the index appears only once every shard is written
    logger.info("cached %d items' latents in %s (%d shards)", index["count"], out, len(shards))
    return index


class LatentPairDataset(Dataset):
    """Map-style reader of a :func:`precompute_latents` cache.

    Yields ``{"prompt", "chosen_latents", "rejected_latents"}`` (float32), plus ``original_size`` /
    ``crop_top_left`` when the cache has them. Pass ``vae`` (or its config) and/or ``resolution`` to have
    the cache checked against what training uses; a mismatch raises :class:`StaleCacheError`.
    Shards are memory-mapped and read one item at a time.

    ``sampling="mean"`` reads the stored means (``item(i, epoch)`` ignores the epoch);
    ``sampling="sample"`` (a cache built ``with_std``) draws read (epoch, i) from
    ``latent_draws(seed, epoch, i)``: a sample of each image, and the mirror image half the time when
    the cache is ``mirrored``. ``dataset[i]`` is ``item(i, 0)``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        vae: Any = None,
        resolution: int | tuple[int, int] | None = None,
        sampling: str = "mean",
        seed: int = 0,
    ) -> None:
        if sampling not in ("sample", "mean"):
            raise ValueError(f"sampling={sampling!r}; choose sample or mean")
        self.out_dir = Path(out_dir)
        self.sampling, self.seed = sampling, seed
        index = _read_index(self.out_dir)
        if index is None:
            raise StaleCacheError(
                f"no complete latent cache in {self.out_dir} ({INDEX_NAME} missing); run precompute_latents"
            )
        if index.get("format") != CACHE_FORMAT:
            raise StaleCacheError(
                f"latent cache {self.out_dir} has format {index.get('format')}, "
                f"expected {CACHE_FORMAT}; rebuild it"
            )
        if resolution is not None:
            size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        else:
            size = tuple(index["image_size"])
        if vae is not None:
            digest, parts = cache_fingerprint(vae, size)  # type: ignore[arg-type]
            _check_fingerprint(index, digest, parts, self.out_dir)
        elif list(size) != list(index["image_size"]):
            raise StaleCacheError(
                f"latent cache {self.out_dir} is stale: image_size cached {index['image_size']}, "
                f"now {list(size)}. Rebuild with precompute_latents(..., overwrite=True)."
            )
        for shard in index["shards"]:
            if not (self.out_dir / shard["file"]).is_file():
                raise StaleCacheError(f"latent cache {self.out_dir} is incomplete: {shard['file']} missing")
        if sampling == "sample" and not index.get("with_std", False):
            raise StaleCacheError(f"latent cache {self.out_dir} holds no std to sample from; rebuild with "
                                  "precompute_latents(..., with_std=True, overwrite=True)")
        self.flips = sampling == "sample" and bool(index.get("mirrored", False))
        self.index = index
        self.fingerprint: str = index["fingerprint"]
        self.keys: list[str] = index["keys"]
        self.prompts: list[str] = index["prompts"]
        self._ends = []
        total = 0
        for shard in index["shards"]:
            total += shard["count"]
            self._ends.append(total)
        if total != index["count"]:
            raise StaleCacheError(
                f"latent cache {self.out_dir}: shards hold {total} items, index says {index['count']}"
            )
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.index["count"]

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            path = self.out_dir / self.index["shards"][shard]["file"]
            self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[shard]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i, 0)

    def item(self, i: int, epoch: int) -> dict[str, Any]:
        """Item i as read at `epoch` (a function of (seed, epoch, i) alone)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} cached items")
        shard = bisect.bisect_right(self._ends, i)
        j = i - (self._ends[shard - 1] if shard else 0)
        handle = self._handle(shard)
        read = lambda name: handle.get_slice(name)[j : j + 1][0].float()  # noqa: E731
        view, seeds = "", None
        if self.sampling == "sample":
            flip, seed_w, seed_l = latent_draws(self.seed, epoch, i)
            view = "_mirrored" if flip and self.flips else ""
            seeds = {"chosen": seed_w, "rejected": seed_l, "image": seed_w}
        item: dict[str, Any] = {"prompt": self.prompts[i]}
        for key in self.keys:
            name = key.removesuffix("_latents") + view
            if seeds is None:
                item[key] = read(name)
            else:
                mean, std = read(name)[None], read(name + "_std")[None]
                item[key] = sample_latents(mean, std, [seeds[key.removesuffix("_latents")]])[0]
        if self.index.get("original_sizes") is not None:
            item["original_size"] = tuple(self.index["original_sizes"][i])
        crops = self.index.get("crop_top_lefts_mirrored" if view else "crop_top_lefts")
        if crops is not None:
            item["crop_top_left"] = tuple(crops[i])
        return item

    def __getstate__(self) -> dict[str, Any]:
        # Open mmap handles do not pickle; each DataLoader worker reopens its own.
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
