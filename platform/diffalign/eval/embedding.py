"""Image embeddings, one implementation for the CLIP scorers, the DINO scorer and the mismatch probe:
a model's pooled image features (CLIP's projected image features, a CLIP vision tower's
``image_embeds``, else a ViT's / DINOv2's CLS token), L2-normalised, computed in batches."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from diffalign.eval.loading import load_pretrained
from diffalign.specs import resolve_path


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def pooled(out: Any) -> Tensor:
    # transformers 5 returns a ModelOutput from get_*_features (projection in pooler_output); 4.x a tensor.
    if isinstance(out, Tensor):
        return out
    return out.pooler_output


def rgb_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """``images`` as RGB PIL images; anything else fails naming its index."""
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"images[{i}] is {type(im).__name__}, expected a PIL.Image.Image")
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def image_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Pooled, not yet normalised image features of one batch."""
    if hasattr(model, "get_image_features"):  # CLIPModel: the projected image embedding
        return pooled(model.get_image_features(pixel_values=pixel_values))
    out = model(pixel_values=pixel_values)
    embeds = getattr(out, "image_embeds", None)  # CLIPVisionModelWithProjection
    # ViT / DINOv2: the CLS token of the (post-layernorm) last hidden state.
    return embeds if embeds is not None else out.last_hidden_state[:, 0]


class ImageEmbedding:
    """Adds ``embed_images`` to a class holding ``model``, ``image_processor``, ``device``, ``dtype``
    and ``batch_size``."""

    model: nn.Module
    image_processor: Any
    device: torch.device
    dtype: torch.dtype
    batch_size: int

    @property
    def embedding_dim(self) -> int:
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or config.hidden_size)

    def _pixels(self, images: list[Image.Image]) -> Tensor:
        px = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return px.to(device=self.device, dtype=self.dtype)

    def _image_features(self, images: list[Image.Image]) -> Tensor:
        # One batch, normalised, left on the model's device (the scorers go on computing there).
        return F.normalize(image_features(self.model, self._pixels(images)).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int | None = None) -> Tensor:
        """L2-normalised embeddings ``(N, D)``, float32 on the CPU."""
        images = rgb_images(images)
        if not images:
            return torch.zeros(0, self.embedding_dim)
        bs = batch_size or self.batch_size
        return torch.cat([self._image_features(images[s]).cpu() for s in batches(len(images), bs)])


class ImageEmbedder(ImageEmbedding):
    """A standalone image embedder: a CLIP model (projected image features) or a DINOv2-style ViT (CLS
    token), for the reference-mismatch probe."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.model = model.to(device=self.device, dtype=dtype).eval()
        # CLIP's image_processor lives inside its CLIPProcessor; DINOv2's processor is the image processor.
        self.image_processor = getattr(processor, "image_processor", processor)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> ImageEmbedder:
        """Load a CLIPModel, CLIPVisionModelWithProjection or any AutoModel ViT (DINOv2) by path or hub id."""
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModel,
            CLIPModel,
            CLIPVisionModelWithProjection,
        )

        p = resolve_path(path, None, "embedder")
        model_type = AutoConfig.from_pretrained(p).model_type
        cls_map = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}
        model = load_pretrained(cls_map.get(model_type, AutoModel), p, "embedder")
        processor = load_pretrained(AutoImageProcessor, p, "embedder processor")
        return cls(model, processor, device=device, dtype=dtype, batch_size=batch_size)

    def embed_images(self, images: Sequence[Image.Image], batch_size: int | None = None) -> Tensor:
        if len(images) == 0:
            raise ValueError("no images to embed")
        return super().embed_images(images, batch_size)

    __call__ = embed_images
