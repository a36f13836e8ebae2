"""Tiny SD1.5 / SDXL bundles, from_pretrained loading, conditioning, the Denoiser, LoRA and strict
weight loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffalign.models import (
    Denoiser,
    PromptEncoder,
    WeightMismatchError,
    build_tiny_bundle,
    load_bundle,
    load_trainable_state_dict,
    per_sample_mse,
    trainable_state_dict,
)
from diffalign.models.lora import TEXT_TARGETS, add_lora, save_lora
from diffusers import DDPMScheduler

PROMPTS = ["a red car", "a photo of a dog"]


def _unet_inputs(bundle, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = len(PROMPTS)
    h = bundle.unet.config.sample_size
    x = torch.randn(b, 4, h, h, generator=g)
    t = torch.tensor([17, 803])
    return x, t


@torch.no_grad()
def _unet_out(bundle, unet=None, cond=None, seed: int = 0) -> torch.Tensor:
    unet = unet or bundle.unet
    cond = cond or PromptEncoder(bundle)(PROMPTS)
    x, t = _unet_inputs(bundle, seed)
    unet.eval()
    return unet(x, t, **cond.unet_kwargs()).sample


# ------------------------------------------------------------------ bundles and loading


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_bundle_round_trips_through_from_pretrained(family, tmp_path):
    bundle = build_tiny_bundle(family, seed=3)
    assert bundle.family == family
    assert len(bundle.text_encoders) == (2 if family == "sdxl" else 1)
    # frozen parts are frozen, the UNet is not
    assert not any(p.requires_grad for m in [bundle.vae, *bundle.text_encoders] for p in m.parameters())
    before = _unet_out(bundle)
    cond_before = PromptEncoder(bundle)(PROMPTS)

    bundle.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert ("text_encoder_2" in index) == (family == "sdxl")

    loaded = load_bundle(str(tmp_path / "pipe"))  # family auto-detected
    assert loaded.family == family
    assert loaded.resolution == bundle.resolution
    assert loaded.num_train_timesteps == bundle.num_train_timesteps
    assert torch.equal(loaded.noise_scheduler.alphas_cumprod, bundle.noise_scheduler.alphas_cumprod)
    cond_after = PromptEncoder(loaded)(PROMPTS)
    assert torch.equal(cond_after.prompt_embeds, cond_before.prompt_embeds)
    if family == "sdxl":
        assert torch.equal(cond_after.pooled_embeds, cond_before.pooled_embeds)
    assert torch.equal(_unet_out(loaded), before)
    assert not any(p.requires_grad for m in [loaded.vae, *loaded.text_encoders] for p in m.parameters())


def test_bundles_are_deterministic_in_seed():
    a, b, c = (build_tiny_bundle("sd15", seed=s) for s in (1, 1, 2))
    sa, sb, sc = (trainable_state_dict(x.unet, lora_only=False) for x in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_unknown_family_rejected(tmp_path):
    with pytest.raises(ValueError, match="model.family"):
        build_tiny_bundle("sd2")  # flow families ("sd3", ...) build: tests/test_flow_models.py
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        load_bundle(str(tmp_path / "absent"))


# ------------------------------------------------------------------ conditioning


def test_prompt_encoder_sd15_shapes():
    bundle = build_tiny_bundle("sd15")
    cond = PromptEncoder(bundle)(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 16, 32)
    assert cond.prompt_embeds.dtype == torch.float32
    assert cond.pooled_embeds is None and cond.add_time_ids is None
    assert set(cond.unet_kwargs()) == {"encoder_hidden_states"}
    # different prompts give different embeddings
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])


def test_prompt_encoder_sdxl_conditioning():
    bundle = build_tiny_bundle("sdxl", resolution=32)
    enc = PromptEncoder(bundle)
    cond = enc(PROMPTS, original_sizes=[(512, 384), (40, 48)], crop_top_lefts=[(7, 0), (3, 5)])
    assert cond.prompt_embeds.shape == (2, 16, 64)
    assert cond.pooled_embeds.shape == (2, 32)
    assert cond.add_time_ids.shape == (2, 6)
    expected = torch.tensor([[512, 384, 7, 0, 32, 32], [40, 48, 3, 5, 32, 32]], dtype=torch.float32)
    assert torch.equal(cond.add_time_ids, expected)

    # The concatenation is [penultimate states of encoder 1, of encoder 2]; pooled is encoder 2's projection.
    tok = bundle.tokenizers[0]
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = bundle.text_encoders[0](ids, output_hidden_states=True).hidden_states[-2]
        out2 = bundle.text_encoders[1](ids, output_hidden_states=True)
    assert torch.allclose(cond.prompt_embeds, torch.cat([h1, out2.hidden_states[-2]], dim=-1))
    assert torch.allclose(cond.pooled_embeds, out2.text_embeds)

    default = enc(PROMPTS)
    assert torch.equal(default.add_time_ids, torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=torch.float32))
    kw = default.unet_kwargs()
    assert set(kw["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    # the UNet accepts this conditioning
    assert _unet_out(bundle, cond=default).shape == (2, 4, 8, 8)


def test_conditioning_repeat_and_index():
    cond = PromptEncoder(build_tiny_bundle("sdxl"))(PROMPTS)
    rep = cond.repeat(2)
    assert [x.shape[0] for x in (rep.prompt_embeds, rep.pooled_embeds, rep.add_time_ids)] == [4, 4, 4]
    assert torch.equal(rep.prompt_embeds[2:], cond.prompt_embeds)
    one = rep.index(slice(1, 2))
    assert torch.equal(one.pooled_embeds, cond.pooled_embeds[1:2])


# ------------------------------------------------------------------ denoiser


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_noisy_latents_and_targets(prediction_type):
    sched = _scheduler(prediction_type)
    den = Denoiser(sched)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64).float()
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64).float()
    t = torch.tensor([0, 499, 999])
    noisy, target = den.noisy_and_target(x0, eps, t)

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    alpha_t, sigma_t = abar.sqrt(), (1 - abar).sqrt()
    assert torch.allclose(noisy.double(), alpha_t * x0.double() + sigma_t * eps.double(), atol=1e-5)
    if prediction_type == "epsilon":
        assert torch.equal(target, eps)
    else:
        v = alpha_t * eps.double() - sigma_t * x0.double()
        assert torch.allclose(target.double(), v, atol=1e-5)
        assert not torch.allclose(target, eps, atol=1e-2)


def test_denoiser_rejects_unsupported_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(_scheduler("sample"))


def test_per_sample_mse_matches_manual_and_is_float32():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(5, 4, 3, 2, generator=g)
    target = torch.randn(5, 4, 3, 2, generator=g)
    err = per_sample_mse(pred, target)
    manual = torch.stack([((pred[i] - target[i]) ** 2).sum() / pred[i].numel() for i in range(5)])
    assert err.shape == (5,)
    assert torch.allclose(err, manual, rtol=1e-6)
    low = per_sample_mse(pred.bfloat16(), target.bfloat16())
    assert low.dtype == torch.float32
    manual_low = ((pred.bfloat16().double() - target.bfloat16().double()) ** 2).flatten(1).mean(1)
    assert torch.allclose(low.double(), manual_low, rtol=1e-6)


def test_denoiser_errors_are_per_sample_mse_of_the_unet():
    bundle = build_tiny_bundle("sd15")
    den = Denoiser(bundle.noise_scheduler)
    cond = PromptEncoder(bundle)(PROMPTS)
    x, t = _unet_inputs(bundle)
    target = torch.randn_like(x)
    with torch.no_grad():
        err = den.errors(bundle.unet, x, t, cond, target)
        pred = bundle.unet(x, t, **cond.unet_kwargs()).sample
    assert err.dtype == torch.float32 and err.shape == (2,)
    assert torch.allclose(err, ((pred - target) ** 2).mean(dim=(1, 2, 3)))


# ------------------------------------------------------------------ LoRA


def test_add_lora_leaves_only_adapters_trainable():
    bundle = build_tiny_bundle("sd15")
    n_before = sum(1 for _ in bundle.unet.parameters())
    add_lora(bundle.unet, rank=2)
    named = dict(bundle.unet.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all("lora_" in n for n in trainable_state_dict(bundle.unet))
    assert len(named) > n_before
    # LoRA B starts at zero: the adapted UNet computes the same function as before
    base = build_tiny_bundle("sd15")
    assert torch.allclose(_unet_out(bundle), _unet_out(base), atol=1e-6)
    with pytest.raises(ValueError, match="lora_rank"):
        add_lora(build_tiny_bundle("sd15").unet, rank=0)


def _train_lora_a_little(bundle, steps: int = 3) -> None:
    params = [p for p in bundle.unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-2)
    cond = PromptEncoder(bundle)(PROMPTS)
    x, t = _unet_inputs(bundle, seed=1)
    bundle.unet.train()
    for _ in range(steps):
        opt.zero_grad()
        out = bundle.unet(x, t, **cond.unet_kwargs()).sample
        (out - 1.0).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_lora_reproduces_trained_unet_in_a_fresh_pipeline(family, tmp_path):
    bundle = build_tiny_bundle(family)
    add_lora(bundle.unet, rank=2, alpha=4.0)  # alpha != rank: the scale must survive the round trip
    untrained = _unet_out(bundle)
    _train_lora_a_little(bundle)
    trained = _unet_out(bundle)
    assert not torch.allclose(trained, untrained, atol=1e-4)

    save_lora(bundle, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    fresh = build_tiny_bundle(family)
    pipe = fresh.pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert torch.allclose(_unet_out(fresh, unet=pipe.unet), trained, atol=1e-5)


def test_saved_text_encoder_lora_reproduces_prompt_embeddings(tmp_path):
    bundle = build_tiny_bundle("sdxl")
    add_lora(bundle.unet, rank=2)
    for enc in bundle.text_encoders:
        add_lora(enc, rank=2, alpha=3.0, targets=TEXT_TARGETS)
        with torch.no_grad():
            for name, p in enc.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5)
    cond = PromptEncoder(bundle)(PROMPTS)
    save_lora(bundle, tmp_path / "lora", train_text_encoder=True)
    fresh = build_tiny_bundle("sdxl")
    assert not torch.allclose(PromptEncoder(fresh)(PROMPTS).prompt_embeds, cond.prompt_embeds, atol=1e-4)
    fresh.pipeline().load_lora_weights(str(tmp_path / "lora"))
    reloaded = PromptEncoder(fresh)(PROMPTS)
    assert torch.allclose(reloaded.prompt_embeds, cond.prompt_embeds, atol=1e-5)
    assert torch.allclose(reloaded.pooled_embeds, cond.pooled_embeds, atol=1e-5)


# ------------------------------------------------------------------ strict weight loading


def test_load_trainable_state_dict_round_trip_and_mismatches():
    bundle = build_tiny_bundle("sd15")
    add_lora(bundle.unet, rank=2)
    state = trainable_state_dict(bundle.unet)
    assert state and all("lora_" in k for k in state)
    changed = {k: v + 1.0 for k, v in state.items()}
    load_trainable_state_dict(bundle.unet, changed)
    after = trainable_state_dict(bundle.unet)
    assert all(torch.equal(after[k], changed[k]) for k in state)

    key = sorted(state)[0]
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(WeightMismatchError, match="missing") as info:
        load_trainable_state_dict(bundle.unet, missing)
    assert key in str(info.value)

    with pytest.raises(WeightMismatchError, match="unexpected") as info:
        load_trainable_state_dict(bundle.unet, {**state, "extra.lora_A.weight": torch.zeros(1)})
    assert "extra.lora_A.weight" in str(info.value)

    shaped = dict(state)
    shaped[key] = torch.zeros(*state[key].shape, 2)
    with pytest.raises(WeightMismatchError, match="mis-shaped") as info:
        load_trainable_state_dict(bundle.unet, shaped)
    assert key in str(info.value)
    # a failed load changes nothing
    now = trainable_state_dict(bundle.unet)
    assert all(torch.equal(now[k], changed[k]) for k in state)


def test_full_state_dict_excludes_nothing_and_rejects_lora_keys():
    bundle = build_tiny_bundle("sd15")
    full = trainable_state_dict(bundle.unet)
    assert set(full) == {n for n, _ in bundle.unet.named_parameters()}
    with pytest.raises(WeightMismatchError, match="unexpected"):
        load_trainable_state_dict(bundle.unet, {**full, "down.lora_B.weight": torch.zeros(2)})
