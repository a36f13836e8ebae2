"""Image decoding and the train-time transform of diffusers' Diffusion-DPO scripts, done in PIL + numpy.

Order follows ``train_diffusion_dpo_sdxl.py``: resize the shorter side, flip, then crop, so the recorded
crop top-left is in the coordinates of the (possibly flipped) resized image, as SDXL's add_time_ids expect.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


def decode_image(value: Any) -> Image.Image:
    """Fully decode an image given as bytes, a path, an HF ``Image`` struct or a PIL image into RGB.

    Forces the full decode so truncated files fail here rather than later in a worker.
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, dict):  # HF datasets Image feature stored as {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            if len(value) == 0:
                raise ValueError("empty image bytes")
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, Path)):
            image = Image.open(value)
        elif value is None:
            raise ValueError("no image data")
        else:
            raise TypeError(f"cannot decode an image from {type(value).__name__}")
    image.load()
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1] (ToTensor then Normalize([0.5], [0.5]))."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Inverse of :func:`to_tensor` (clamped), for previews."""
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Per-item RNG that depends only on (seed, epoch, row), not on worker layout, so runs are repeatable."""
    return random.Random(f"{seed}:{epoch}:{index}")


def latent_draws(seed: int, epoch: int, index: int) -> tuple[bool, int, int]:
    """(flip, chosen noise seed, rejected noise seed) of one read of a pair's latents.

    A pure function of (seed, epoch, index), like :func:`item_rng` but its own stream (a salted key),
    so a cached pair's flip is independent of the flip its pixels were read with. The noise seeds
    seed the draw of ``latent_dist.sample()`` for the chosen and the rejected image.
    """
    rng = random.Random(f"latents:{seed}:{epoch}:{index}")
    return rng.random() < 0.5, rng.getrandbits(63), rng.getrandbits(63)


@dataclass(frozen=True)
class PairTransform:
    """Resize shorter side to ``resolution``, optional horizontal flip, center or random square crop.

    Every image passed in one call gets the same flip and the same crop, so a preference pair stays
    aligned. If images of a pair differ in size, the later ones are resized to the first one's resized
    size; the recorded ``original_size`` is the first (chosen) image's.
    """

    resolution: int = 512
    random_crop: bool = False
    random_flip: bool = False

    def __post_init__(self) -> None:
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def apply(
        self, images: Sequence[Image.Image], rng: random.Random | None = None
    ) -> tuple[list[torch.Tensor], tuple[int, int], tuple[int, int]]:
        """Returns (tensors, original_size (h, w), crop_top_left (top, left))."""
        if not images:
            raise ValueError("no images to transform")
        rng = rng or random.Random()
        first = images[0]
        original_size = (first.height, first.width)
        size = self._resized_size(first.width, first.height)
        resized = [im.resize(size, Image.Resampling.BILINEAR) for im in images]
        if self.random_flip and rng.random() < 0.5:
            resized = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in resized]
        width, height = size
        res = self.resolution
        if self.random_crop:
            top = rng.randint(0, height - res)
            left = rng.randint(0, width - res)
        else:
            top = max(0, int(round((height - res) / 2.0)))
            left = max(0, int(round((width - res) / 2.0)))
        box = (left, top, left + res, top + res)
        tensors = [to_tensor(im.crop(box)) for im in resized]
        return tensors, original_size, (top, left)

    def __call__(
        self, chosen: Image.Image, rejected: Image.Image, rng: random.Random | None = None
    ) -> dict[str, Any]:
        (w, l_), original_size, crop = self.apply([chosen, rejected], rng)
        return {"chosen": w, "rejected": l_, "original_size": original_size, "crop_top_left": crop}

    def single(self, image: Image.Image, rng: random.Random | None = None) -> dict[str, Any]:
        (x,), original_size, crop = self.apply([image], rng)
        return {"image": x, "original_size": original_size, "crop_top_left": crop}

    def mirrored_crop(
        self, original_size: tuple[int, int], crop_top_left: tuple[int, int]
    ) -> tuple[int, int]:
        """The crop top-left of the mirror image of a crop: ``crop(x, top, left).flip(-1)`` is
        ``crop(x.flip(-1), top, W - resolution - left)`` for the resized width W."""
        width, _ = self._resized_size(original_size[1], original_size[0])
        top, left = crop_top_left
        return top, width - self.resolution - left

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        # Same arithmetic as torchvision's Resize(int): the shorter side becomes `resolution`.
        short, long = (width, height) if width <= height else (height, width)
        new_long = max(self.resolution, int(self.resolution * long / short))
        return (self.resolution, new_long) if width <= height else (new_long, self.resolution)
