"""The scorer interface: ``(images, prompts)`` -> one float32 score per image, on the CPU, computed in
batches under ``torch.no_grad``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from diffalign.eval.embedding import batches, rgb_images


class Scorer:
    """One score per (image, prompt); subclasses implement ``_score_batch``."""

    name: str = "scorer"
    higher_is_better: bool = True
    uses_prompts: bool = True

    def __init__(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Scores of shape ``(N,)``, float32 on the CPU."""
        images = rgb_images(images)
        if self.uses_prompts:
            if prompts is None:
                raise ValueError(f"{self.name} scores image-prompt pairs; prompts are required")
            if len(prompts) != len(images):
                raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
            prompts = [str(p) for p in prompts]
        bs = batch_size or self.batch_size
        out = [
            self._score_batch(images[s], None if prompts is None else list(prompts[s]))
            .detach()
            .float()
            .reshape(-1)
            .cpu()
            for s in batches(len(images), bs)
        ]
        return torch.cat(out) if out else torch.zeros(0)

    __call__ = score

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"
