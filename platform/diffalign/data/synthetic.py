"""Synthetic preference pairs whose chosen and rejected images differ by a visible property.

Each pair shares a prompt and a random smooth texture; the chosen image is tinted towards
`chosen_color`, the rejected one towards `rejected_color`. `shift` scales how far the chosen tint
is from the neutral base images, which is how the reference-mismatch study varies the mismatch.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

PROMPTS = ("a square", "a circle", "a landscape", "a photo of a dog", "a red car", "an abstract painting",
           "a bowl of fruit", "a city at night")
COLORS = {
    "red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "green": (-1.0, 1.0, -1.0),
    "gray": (0.0, 0.0, 0.0), "yellow": (1.0, 1.0, -1.0),
}


def _texture(gen: torch.Generator, resolution: int) -> torch.Tensor:
    low = torch.rand(3, 4, 4, generator=gen) * 2 - 1
    up = torch.nn.functional.interpolate(low[None], size=(resolution, resolution), mode="bilinear",
                                         align_corners=False)[0]
    return up * 0.5


def tinted(texture: torch.Tensor, color: str, strength: float) -> torch.Tensor:
    tint = torch.tensor(COLORS[color]).view(3, 1, 1)
    return (texture * (1 - strength) + tint * strength).clamp(-1, 1)


class SyntheticPairs(Dataset):
    """Map-style dataset of {"prompt", "chosen", "rejected"} in [-1, 1]; deterministic in `seed`."""

    def __init__(
        self,
        num_pairs: int = 64,
        resolution: int = 32,
        seed: int = 0,
        chosen_color: str = "red",
        rejected_color: str = "blue",
        shift: float = 0.6,
        rejected_shift: float | None = None,
    ) -> None:
        for c in (chosen_color, rejected_color):
            if c not in COLORS:
                raise ValueError(f"unknown colour {c!r}; choose from {sorted(COLORS)}")
        self.num_pairs, self.resolution, self.seed = num_pairs, resolution, seed
        self.chosen_color, self.rejected_color = chosen_color, rejected_color
        self.shift = shift
        self.rejected_shift = shift if rejected_shift is None else rejected_shift

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.num_pairs:
            raise IndexError(idx)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        tex = _texture(gen, self.resolution)
        return {
            "prompt": PROMPTS[idx % len(PROMPTS)],
            "chosen": tinted(tex, self.chosen_color, self.shift),
            "rejected": tinted(tex, self.rejected_color, self.rejected_shift),
        }


def red_fraction(images: torch.Tensor) -> torch.Tensor:
    """Per-image colour statistic in [-1, 1]: mean(R) − mean(B) / 2 of images in [-1, 1]."""
    return (images[:, 0].flatten(1).mean(1) - images[:, 2].flatten(1).mean(1)) / 2


class RednessContrastPairs(Dataset):
    """Pairs whose chosen image is redder than its rejected one by `contrast`, at a per-pair redness
    level spread over [-spread, spread], so the chosen and rejected sets overlap: imitating the chosen
    images does not rank held-out pairs, only contrasting the two images of a pair does (the learning
    task of tests/test_learning.py and benchmarks/flow_beta_sweep.py). Deterministic per (seed, index)."""

    AXIS = (1.0, 0.0, -1.0)  # red minus blue

    def __init__(self, num_pairs: int, resolution: int = 32, seed: int = 0, spread: float = 0.75,
                 contrast: float = 0.3, texture_scale: float = 0.25) -> None:
        self.num_pairs, self.resolution, self.seed = num_pairs, resolution, seed
        self.spread, self.contrast, self.texture_scale = spread, contrast, texture_scale

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.num_pairs:
            raise IndexError(idx)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        low = torch.rand(1, 3, 4, 4, generator=gen) * 2 - 1
        texture = torch.nn.functional.interpolate(low, size=(self.resolution,) * 2, mode="bilinear",
                                                  align_corners=False)[0] * self.texture_scale
        level = (float(torch.rand((), generator=gen)) * 2 - 1) * self.spread
        axis = torch.tensor(self.AXIS).view(3, 1, 1)
        half = self.contrast / 2
        return {
            "prompt": PROMPTS[idx % len(PROMPTS)],
            "chosen": (texture + (level + half) * axis).clamp(-1, 1),
            "rejected": (texture + (level - half) * axis).clamp(-1, 1),
        }
