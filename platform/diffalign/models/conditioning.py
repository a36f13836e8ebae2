"""Text conditioning for SD1.5 / SDXL UNets and the flow transformers (SD3, FLUX.1, Qwen-Image),
behind one interface.

Flow families encode through their diffusers pipeline's own `encode_prompt`, so the embeddings are
the ones the pipeline samples with: SD3 / SD3.5 CLIP-L + CLIP-G (penultimate states, pooled
projections concatenated) + T5 (zeros when the pipeline has no T5); FLUX.1 T5 states + CLIP-L pooled;
Qwen-Image the last hidden states of its VL encoder after the chat-template prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the bundle module imports diffusers; conditioning itself needs only torch
    from diffalign.models.bundle import ModelBundle


@dataclass
class Conditioning:
    """What the UNet needs besides latents and timesteps.

    SD1.5: `prompt_embeds` only. SDXL: also the pooled embedding of the second encoder and
    `add_time_ids` = (original h, original w, crop top, crop left, target h, target w).
    SD3 / FLUX.1: `prompt_embeds` (joint text states) and `pooled_embeds`. Qwen-Image:
    `prompt_embeds` and `mask` (1 for text tokens, 0 for padding; None when every token is text).
    Every field is batch-first, so stacking, indexing and moving treat them alike.
    """

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def unet_kwargs(self) -> dict:
        kw: dict = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_embeds is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled_embeds, "time_ids": self.add_time_ids}
        return kw

    def _map(self, fn) -> Conditioning:
        return Conditioning(**{f.name: None if (x := getattr(self, f.name)) is None else fn(x)
                               for f in fields(self)})

    def repeat(self, times: int) -> Conditioning:
        """The same conditioning for [chosen; rejected] stacked along the batch."""
        return self._map(lambda x: x.repeat(times, *([1] * (x.dim() - 1))))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        """Moved to `device`; floating tensors cast to `dtype` (the mask keeps its integer dtype)."""
        return self._map(lambda x: x.to(device=device,
                                        dtype=dtype if dtype and x.is_floating_point() else x.dtype))

    def index(self, idx: torch.Tensor | slice) -> Conditioning:
        return self._map(lambda x: x[idx])

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Conditionings of several batches stacked along the batch (text lengths padded to the
        longest, for Qwen-Image's masked text)."""
        if any(p.mask is not None for p in parts) or len({p.prompt_embeds.shape[1] for p in parts}) > 1:
            parts = [p.padded(max(q.prompt_embeds.shape[1] for q in parts)) for p in parts]
        out = {}
        for f in fields(Conditioning):
            xs = [getattr(p, f.name) for p in parts]
            out[f.name] = None if xs[0] is None else torch.cat(xs)
        return Conditioning(**out)

    def padded(self, length: int) -> Conditioning:
        """Text padded with zero states to `length` tokens, with a mask saying which are text."""
        b, n = self.prompt_embeds.shape[:2]
        mask = self.mask if self.mask is not None else torch.ones(b, n, dtype=torch.long,
                                                                   device=self.prompt_embeds.device)
        if length == n:
            return Conditioning(self.prompt_embeds, self.pooled_embeds, self.add_time_ids, mask)
        pad = length - n
        x = self.prompt_embeds
        embeds = torch.cat([x, x.new_zeros(b, pad, x.shape[2])], 1)
        return Conditioning(embeds, self.pooled_embeds, self.add_time_ids,
                            torch.cat([mask, mask.new_zeros(b, pad)], 1))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


class PromptEncoder:
    """Encodes prompts with the bundle's text encoders (the way the diffusers pipelines do).

    The encoders run without autograd unless some of their parameters are trained
    (`model.train_text_encoder`: LoRA adapters on them), so those adapters get gradients.
    """

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self._pipe = None  # flow families: the pipeline whose encode_prompt is used

    @property
    def max_sequence_length(self) -> int:
        return self.bundle.max_sequence_length

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
        if b.is_flow:
            return self._flow_embeddings(prompts, device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            if b.family == "sd15":
                return b.text_encoders[0](self._tokens(b.tokenizers[0], prompts, device))[0], None
            states, pooled = [], None
            for tok, enc in zip(b.tokenizers, b.text_encoders):
                out = enc(self._tokens(tok, prompts, device), output_hidden_states=True)
                states.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
                pooled = out[0]  # text_embeds of the projection model (second encoder)
            return torch.cat(states, dim=-1), pooled

    @torch.no_grad()
    def _flow_embeddings(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._pipe is None:
            self._pipe = self.bundle.pipeline()
        pipe, n, family = self._pipe, self.max_sequence_length, self.bundle.family
        if family == "sd3":
            out = pipe.encode_prompt(prompts, None, None, device=device, max_sequence_length=n,
                                     do_classifier_free_guidance=False)
            embeds, pooled = out[0], out[2]
            return embeds, pooled
        if family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=n)
            return embeds, pooled
        # Qwen-Image pads each batch to its longest prompt; a fixed length (zero states past each
        # prompt's text, exactly as the pipeline pads) lets rows from different batches stack.
        embeds, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=n)
        pad = embeds.new_zeros(embeds.shape[0], n - embeds.shape[1], embeds.shape[2])
        return torch.cat([embeds, pad], dim=1), None

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
        if self.bundle.family == "qwenimage":
            return qwen_conditioning(embeds)
        if self.bundle.is_flow:
            return Conditioning(embeds.float(), pooled.float().to(embeds.device))
        if pooled is None:
            return Conditioning(embeds.float())
        time_ids = self.time_ids(embeds.shape[0], original_sizes, crop_top_lefts)
        return Conditioning(embeds.float(), pooled.float().to(embeds.device), time_ids)


def qwen_conditioning(embeds: torch.Tensor) -> Conditioning:
    """Qwen-Image text states padded with zero states -> states cut to the batch's longest prompt and
    the mask of text tokens. The pipeline pads with exact zeros, and a hidden state of a real token is
    never all zero, so the mask is recovered exactly."""
    mask = (embeds != 0).any(dim=-1)
    longest = max(int(mask.sum(dim=1).max()), 1)
    return Conditioning(embeds[:, :longest].float(), mask=mask[:, :longest].long())
