"""Subject fidelity for personalization: DINOv2 similarity of generated images to reference images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from diffalign.eval.base import Scorer
from diffalign.eval.embedding import ImageEmbedding
from diffalign.eval.loading import load_pretrained
from diffalign.specs import resolve_path

DINO_MODEL = "facebook/dinov2-base"


class DinoSimilarity(Scorer, ImageEmbedding):
    """Subject fidelity for personalization: mean cosine similarity of DINO CLS embeddings between each
    generated image and a set of reference images (as DreamBooth's DINO metric, with DINOv2).

    References are stored by the constructor or ``set_references``, or given to one
    ``score(..., references=...)`` call. Prompts are ignored. The CLS token is
    ``last_hidden_state[:, 0]`` (post-layernorm), which also works for
    DINO v1 ``ViTModel`` checkpoints. ``embed_images`` gives the L2-normalised CLS embeddings.
    """

    name = "dino"
    uses_prompts = False

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        references: Sequence[Image.Image] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", processor)
        self._ref_emb: Tensor | None = None
        if references is not None:
            self.set_references(references)

    def set_references(self, references: Sequence[Image.Image]) -> None:
        if len(references) == 0:
            raise ValueError("dino: at least one reference image is needed")
        self._ref_emb = self.embed_images(references)

    @torch.no_grad()
    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str] | None = None,
        batch_size: int | None = None,
        references: Sequence[Image.Image] | None = None,
    ) -> Tensor:
        """Mean similarity ``(N,)`` to ``references`` (this call only) or to the stored references."""
        if references is not None:
            if len(references) == 0:
                raise ValueError("dino: at least one reference image is needed")
            ref = self.embed_images(references, batch_size)
        elif self._ref_emb is not None:
            ref = self._ref_emb
        else:
            raise ValueError("dino: no reference images; pass references= or call set_references()")
        emb = self.embed_images(images, batch_size)
        return (emb @ ref.T).mean(dim=1)

    __call__ = score

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        references: Sequence[Image.Image] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> DinoSimilarity:
        """``path``: a DINOv2 (or any AutoModel ViT) directory or hub id, default ``facebook/dinov2-base``."""
        from transformers import AutoImageProcessor, AutoModel

        p = resolve_path(path, DINO_MODEL, "dino")
        model = load_pretrained(AutoModel, p, "dino")
        processor = load_pretrained(AutoImageProcessor, p, "dino processor")
        return cls(model, processor, references=references, device=device, dtype=dtype, batch_size=batch_size)
