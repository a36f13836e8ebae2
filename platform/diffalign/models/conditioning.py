"""Text conditioning for SD1.5-style and SDXL-style UNets, behind one interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the bundle module imports diffusers; conditioning itself needs only torch
    from diffalign.models.bundle import ModelBundle


@dataclass
class Conditioning:
    """What the UNet needs besides latents and timesteps.

    SD1.5: `prompt_embeds` only. SDXL: also the pooled embedding of the second encoder and
    `add_time_ids` = (original h, original w, crop top, crop left, target h, target w).
    """

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None

    def unet_kwargs(self) -> dict:
        kw: dict = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_embeds is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled_embeds, "time_ids": self.add_time_ids}
        return kw

    def repeat(self, times: int) -> Conditioning:
        """The same conditioning for [chosen; rejected] stacked along the batch."""
        rep = lambda x: None if x is None else x.repeat(times, *([1] * (x.dim() - 1)))
        return Conditioning(rep(self.prompt_embeds), rep(self.pooled_embeds), rep(self.add_time_ids))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        mv = lambda x: None if x is None else x.to(device=device, dtype=dtype or x.dtype)
        return Conditioning(mv(self.prompt_embeds), mv(self.pooled_embeds), mv(self.add_time_ids))

    def index(self, idx: torch.Tensor | slice) -> Conditioning:
        sel = lambda x: None if x is None else x[idx]
        return Conditioning(sel(self.prompt_embeds), sel(self.pooled_embeds), sel(self.add_time_ids))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


class PromptEncoder:
    """Encodes prompts with the bundle's text encoders (the way the diffusers pipelines do).

    The encoders run without autograd unless some of their parameters are trained
    (`model.train_text_encoder`: LoRA adapters on them), so those adapters get gradients.
    """

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for enc in self.bundle.text_encoders for p in enc.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.bundle.text_encoders[0].parameters()).device

    def _tokens(self, tokenizer, prompts: list[str], device) -> torch.Tensor:
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(device)

    def text_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, pooled embeddings or None), one row per prompt, in the encoders' dtype."""
        b = self.bundle
        device = self.device
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            if b.family == "sd15":
                return b.text_encoders[0](self._tokens(b.tokenizers[0], prompts, device))[0], None
            states, pooled = [], None
            for tok, enc in zip(b.tokenizers, b.text_encoders):
                out = enc(self._tokens(tok, prompts, device), output_hidden_states=True)
                states.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
                pooled = out[0]  # text_embeds of the projection model (second encoder)
            return torch.cat(states, dim=-1), pooled

    def time_ids(self, n: int, original_sizes: list[tuple[int, int]] | None = None,
                 crop_top_lefts: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """SDXL micro-conditioning (original h, w, crop top, left, target h, w), (n, 6) float32."""
        res = self.bundle.resolution
        original_sizes = original_sizes or [(res, res)] * n
        crop_top_lefts = crop_top_lefts or [(0, 0)] * n
        return torch.tensor(
            [list(o) + list(c) + [res, res] for o, c in zip(original_sizes, crop_top_lefts)],
            dtype=torch.float32, device=self.device,
        )

    def __call__(
        self,
        prompts: list[str],
        original_sizes: list[tuple[int, int]] | None = None,
        crop_top_lefts: list[tuple[int, int]] | None = None,
    ) -> Conditioning:
        embeds, pooled = self.text_embeddings(list(prompts))
        return self.conditioning(embeds, pooled, original_sizes, crop_top_lefts)

    def conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor | None,
                     original_sizes: list[tuple[int, int]] | None = None,
                     crop_top_lefts: list[tuple[int, int]] | None = None) -> Conditioning:
        """The conditioning of text-encoder outputs computed elsewhere (a pair store's embeddings)."""
        if pooled is None:
            return Conditioning(embeds.float())
        time_ids = self.time_ids(embeds.shape[0], original_sizes, crop_top_lefts)
        return Conditioning(embeds.float(), pooled.float().to(embeds.device), time_ids)
