"""Cached text conditioning: the same step as encoding every batch, the text encoders run once per
unique prompt, stored in their own dtype; never cached while the text encoders are trained."""

from __future__ import annotations

import pytest
import torch
from diffalign.data.synthetic import PROMPTS
from diffalign.models import PromptEncoder, build_tiny_bundle
from diffalign.train.cache import CachedPromptEncoder
from diffalign.train.driver import build_trainer


class EncoderCalls:
    """Counts the prompts the first text encoder has encoded (forward pre-hook)."""

    def __init__(self, bundle) -> None:
        self.prompts = 0
        bundle.text_encoders[0].register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.prompts += args[0].shape[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cached_conditioning_gives_the_same_losses(tiny_cfg, family):
    base = (f"model.family={family}", "data.num_pairs=8", "optim.batch_size=4")
    cached = build_trainer(tiny_cfg(*base))
    plain = build_trainer(tiny_cfg(*base, "data.cache_prompt_embeds=false"))
    assert isinstance(cached.setup.prompt_encoder, CachedPromptEncoder)
    assert not isinstance(plain.setup.prompt_encoder, CachedPromptEncoder)
    for _ in range(2):  # the second DPO step is the first whose loss is not log 2 by construction
        got, want = cached.train_step(), plain.train_step()
        for key in ("loss", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l"):
            assert got[key] == want[key], key
    assert got["loss"] != pytest.approx(0.6931, abs=1e-3)


def test_text_encoder_runs_once_per_unique_prompt(tiny_cfg):
    cfg = tiny_cfg("data.num_pairs=16", "optim.batch_size=4")
    trainer = build_trainer(cfg)
    calls = EncoderCalls(trainer.setup.bundle)
    for _ in range(4):  # one epoch: every pair, 8 distinct prompts twice each
        trainer.train_step()
    cache = trainer.setup.prompt_encoder
    assert calls.prompts == 0  # all 8 were encoded when the Trainer was built
    assert len(cache) == len(PROMPTS) == 8
    row = 16 * 32 * 4  # TEXT_LEN x hidden size, float32
    assert cache.nbytes == 8 * row

    plain = build_trainer(tiny_cfg("data.num_pairs=16", "optim.batch_size=4",
                                   "data.cache_prompt_embeds=false"))
    plain_calls = EncoderCalls(plain.setup.bundle)
    for _ in range(4):
        plain.train_step()
    assert plain_calls.prompts == 16


def test_rows_keep_the_encoder_dtype_and_give_float32_conditioning():
    bundle = build_tiny_bundle("sdxl")
    for enc in bundle.text_encoders:
        enc.to(torch.bfloat16)
    prompts = ["a dog", "a square", "a dog"]
    sizes = dict(original_sizes=[(64, 48), (32, 32), (40, 40)], crop_top_lefts=[(2, 0), (0, 0), (1, 1)])
    cache = CachedPromptEncoder(bundle)
    got = cache(prompts, **sizes)
    want = PromptEncoder(bundle)(prompts, **sizes)
    assert len(cache) == 2
    assert {t.dtype for row in cache._rows.values() for t in row} == {torch.bfloat16}
    for key, value in want.tensors().items():
        assert getattr(got, key).dtype == torch.float32
        assert torch.equal(getattr(got, key), value), key
    assert got.add_time_ids[0].tolist() == [64, 48, 2, 0, 32, 32]


def test_trained_text_encoder_is_encoded_every_step_with_gradients(tiny_cfg):
    cfg = tiny_cfg("model.finetune=lora", "model.train_text_encoder=true", "objective.name=mapo",
                   "reference.strategy=none", "data.num_pairs=4", "optim.batch_size=2")
    trainer = build_trainer(cfg)
    assert not isinstance(trainer.setup.prompt_encoder, CachedPromptEncoder)
    with pytest.raises(ValueError, match="train_text_encoder"):
        CachedPromptEncoder(trainer.setup.bundle)
    trainer.train_step()
    grads = [p.grad for p in trainer.setup.bundle.text_encoders[0].parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_heldout_eval_encodes_prompts_with_the_trained_text_encoder(tiny_cfg):
    """Held-out errors follow the text encoder's current weights, not the embeddings of step 0."""
    cfg = tiny_cfg("model.finetune=lora", "model.train_text_encoder=true", "objective.name=mapo",
                   "reference.strategy=none", "train.eval_every=1")
    trainer = build_trainer(cfg)
    before = trainer.heldout.evaluate()
    assert before["heldout/margin_mean"] == 0.0
    lora = [p for n, p in trainer.setup.bundle.text_encoders[0].named_parameters() if "lora_B" in n]
    assert lora
    with torch.no_grad():
        for p in lora:
            p.add_(0.5)  # the UNet is untouched: only the conditioning changes
    after = trainer.heldout.evaluate()
    assert abs(after["heldout/mse_w"] - before["heldout/mse_w"]) > 1e-6


def test_cached_and_uncached_reads_draw_the_same_latents(tiny_cfg):
    """data.latent_sampling=sample: a cached read holds the sample the uncached read of the same step
    draws (same seeds per (epoch, index)), so both train on the same latents; the posterior means
    (latent_sampling=mean) are other latents."""
    base = ("data.num_pairs=8", "optim.batch_size=4")
    variants = {"cached": (), "uncached": ("data.cache_latents=false",),
                "mean": ("data.latent_sampling=mean",)}
    runs = {name: build_trainer(tiny_cfg(*base, *extra)) for name, extra in variants.items()}
    steps = {name: [trainer.train_step() for _ in range(2)] for name, trainer in runs.items()}
    for got, want in zip(steps["cached"], steps["uncached"]):  # the VAE's batch size rounds the last bits
        for key in ("mse_w", "mse_l"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert steps["mean"][0]["mse_w"] != pytest.approx(steps["cached"][0]["mse_w"], rel=1e-5)
