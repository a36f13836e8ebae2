"""ImageReward (Xu et al. 2023): BLIP's image-grounded text encoder and an MLP head, standardised."""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from diffalign.eval.base import Scorer
from diffalign.eval.loading import load_pretrained, reject_raw_checkpoint
from diffalign.models.reward_heads import IMAGEREWARD_HEAD, RewardMLP, load_head_state_dict
from diffalign.specs import resolve_path

# Normalisation constants of the ImageReward release (ImageReward/ImageReward.py).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
# ImageReward tokenizes prompts to exactly this length.
IMAGEREWARD_MAX_LENGTH = 35


class ImageReward(Scorer):
    """ImageReward (Xu et al. 2023): BLIP image-grounded text encoder + MLP head.

    As the release computes it: the prompt (padded/truncated to 35 tokens) goes through BLIP's text
    encoder with cross-attention to the ViT image tokens; the ``[CLS]`` hidden state goes through the
    MLP head; the result is standardised with the release's mean/std.

    Expected format: a directory with a transformers ``BlipForImageTextRetrieval`` checkpoint
    (``config.json`` + weights, processor files) and the head as ``mlp.safetensors`` (keys
    ``layers.{0,2,4,6,7}.*``, a leading ``mlp.`` is accepted). The released ``ImageReward.pt`` uses
    the original BLIP module layout and is not loaded here; its BLIP part must be converted to the
    transformers layout first. There is therefore no default path.
    """

    name = "imagereward"
    EXPECTED = (
        f"a transformers BlipForImageTextRetrieval checkpoint (config.json + model.safetensors, processor "
        f"files) and the MLP head as {IMAGEREWARD_HEAD} (recipes/convert_scorer.py --kind imagereward)"
    )

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        head: RewardMLP,
        mean: float = IMAGEREWARD_MEAN,
        std: float = IMAGEREWARD_STD,
        max_length: int = IMAGEREWARD_MAX_LENGTH,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.head = head.to(device=self.device, dtype=torch.float32).eval()
        self.mean = float(mean)
        self.std = float(std)
        self.max_length = min(int(max_length), int(model.config.text_config.max_position_embeddings))

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        px = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds = self.model.vision_model(pixel_values=px.to(self.device, self.dtype)).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        tok = self.processor.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        text = self.model.text_encoder(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        reward = self.head(text[:, 0, :].float()).squeeze(-1)
        return (reward - self.mean) / self.std

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        head_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        mean: float = IMAGEREWARD_MEAN,
        std: float = IMAGEREWARD_STD,
    ) -> ImageReward:
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        if path is None:
            raise ValueError(f"imagereward: pass path= to a directory holding {cls.EXPECTED}")
        p = resolve_path(path, None, "imagereward")
        reject_raw_checkpoint(p, "imagereward", cls.EXPECTED)
        head_file = os.fspath(head_path) if head_path is not None else os.path.join(p, IMAGEREWARD_HEAD)
        if not os.path.isfile(head_file):
            raise FileNotFoundError(
                f"imagereward: MLP head {head_file!r} does not exist; expected {cls.EXPECTED}"
            )
        head = RewardMLP.from_state_dict(load_head_state_dict(head_file))
        model = load_pretrained(BlipForImageTextRetrieval, p, "imagereward")
        processor = load_pretrained(BlipProcessor, p, "imagereward processor")
        hidden = int(model.config.text_config.hidden_size)
        if head.input_size != hidden:
            raise ValueError(
                f"imagereward: head expects {head.input_size}-d features, BLIP text is {hidden}-d"
            )
        return cls(
            model, processor, head, mean=mean, std=std, device=device, dtype=dtype, batch_size=batch_size
        )
