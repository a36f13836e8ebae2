"""LoRA on the flow transformers (SD3 / SD3.5, FLUX.1, Qwen-Image): the family's target modules,
`prepare_policy`, and `save_lora` written so that plain diffusers (`DiffusionPipeline.from_pretrained`
of the base folder + `load_lora_weights`) reproduces the trained transformer exactly, alpha included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffalign.models.build import prepare_policy
from diffalign.models.bundle import FLOW_FAMILIES, PIPELINES, ModelBundle
from diffalign.models.lora import add_lora, lora_targets, save_lora
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
)
from peft.tuners.lora import LoraLayer

RANK, ALPHA = 2, 6.0  # alpha != rank: a loader that assumed alpha = rank would scale the LoRA by 1/3
LATENT_C, LATENT_HW, TEXT_LEN, BATCH = 4, 8, 6, 2  # the transformer-only tests' sizes


def tiny_transformer(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random transformer with every block kind of the real model (SD3.5's dual attention and
    rms qk-norm, FLUX's double and single blocks)."""
    torch.manual_seed(seed)
    if family == "sd3":
        return SD3Transformer2DModel(
            sample_size=LATENT_HW, patch_size=2, in_channels=LATENT_C, out_channels=LATENT_C, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            pooled_projection_dim=12, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    if family == "flux":
        return FluxTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_C, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_C, out_channels=LATENT_C, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))


def transformer_inputs(family: str, transformer: torch.nn.Module) -> dict:
    """Fixed inputs of the transformer's forward, shaped from its config as its pipeline calls it."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(1)
    text = torch.randn(BATCH, TEXT_LEN, cfg.joint_attention_dim, generator=g)
    t = torch.tensor([0.3, 0.8])
    if family == "sd3":
        return dict(hidden_states=torch.randn(BATCH, cfg.in_channels, LATENT_HW, LATENT_HW, generator=g),
                    encoder_hidden_states=text, timestep=1000 * t,
                    pooled_projections=torch.randn(BATCH, cfg.pooled_projection_dim, generator=g))
    side = LATENT_HW // 2  # 2x2 latent patches packed into channels: (B, side * side, 4 C)
    packed = torch.randn(BATCH, side * side, cfg.in_channels, generator=g)
    if family == "flux":
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        return dict(hidden_states=packed, encoder_hidden_states=text, timestep=t,
                    pooled_projections=torch.randn(BATCH, cfg.pooled_projection_dim, generator=g),
                    guidance=torch.full((BATCH,), 3.5), img_ids=img_ids.reshape(-1, 3),
                    txt_ids=torch.zeros(TEXT_LEN, 3))
    return dict(hidden_states=packed, encoder_hidden_states=text,
                encoder_hidden_states_mask=torch.ones(BATCH, TEXT_LEN), timestep=t,
                img_shapes=[[(1, side, side)]] * BATCH)


@torch.no_grad()
def forward(transformer: torch.nn.Module, family: str) -> torch.Tensor:
    return transformer(**transformer_inputs(family, transformer), return_dict=False)[0]


def perturb_lora(module: torch.nn.Module, seed: int = 3) -> None:
    """Random adapter weights: gaussian init leaves lora_B at zero, i.e. a LoRA that changes nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


# The components a transformer-only pipeline leaves out (None in the constructor and in from_pretrained).
LEFT_OUT = {"sd3": ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                    "tokenizer_3"),
            "flux": ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
            "qwenimage": ("vae", "text_encoder", "tokenizer")}


def transformer_only_pipeline(family: str, transformer: torch.nn.Module) -> DiffusionPipeline:
    """The family's pipeline holding only the transformer and scheduler: the LoRA round trip on the
    transformer alone, without building text encoders."""
    return PIPELINES[family](transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                             **dict.fromkeys(LEFT_OUT[family]))


def load_base(family: str, path) -> DiffusionPipeline:
    return DiffusionPipeline.from_pretrained(path, **dict.fromkeys(LEFT_OUT[family]))


def bundle_of(family: str, transformer: torch.nn.Module) -> ModelBundle:
    return ModelBundle(family=family, unet=transformer, vae=None, text_encoders=[], tokenizers=[],
                       noise_scheduler=None, sample_scheduler=None, resolution=32)


def adapted_modules(module: torch.nn.Module) -> set[str]:
    return {name for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def test_targets_follow_diffusers_training_scripts():
    sd3 = tiny_transformer("sd3")
    add_lora(sd3, RANK, targets=lora_targets("sd3"))
    got = adapted_modules(sd3)
    # Joint attention of both blocks (image and context streams); SD3.5's image-only attn2 stays frozen,
    # as in train_dreambooth_lora_sd3.py. The last block is context_pre_only: no to_add_out there.
    assert "transformer_blocks.0.attn.add_q_proj" in got and "transformer_blocks.0.attn.to_add_out" in got
    assert "transformer_blocks.1.attn.to_add_out" not in got and not any("attn2" in n for n in got)
    assert len(got) == 8 + 7

    flux = tiny_transformer("flux")
    add_lora(flux, RANK, targets=lora_targets("flux"))
    got = adapted_modules(flux)
    assert {"transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.0.proj",
            "single_transformer_blocks.0.attn.to_q"} <= got
    assert "single_transformer_blocks.0.proj_mlp" not in got and len(got) == 12 + 3

    qwen = tiny_transformer("qwenimage")
    add_lora(qwen, RANK, targets=lora_targets("qwenimage"))
    got = adapted_modules(qwen)
    attn = ("to_q", "to_k", "to_v", "to_out.0")
    assert got == {f"transformer_blocks.{i}.attn.{m}" for i in range(2) for m in attn}

    with pytest.raises(ValueError, match="model.family"):
        lora_targets("sd2")


def _cfg(finetune: str = "lora", train_text_encoder: bool = False, checkpointing: bool = True):
    model = SimpleNamespace(finetune=finetune, lora_rank=RANK, lora_alpha=ALPHA,
                            train_text_encoder=train_text_encoder, gradient_checkpointing=checkpointing)
    return SimpleNamespace(model=model, optim=SimpleNamespace(lr=1e-4, text_encoder_lr=1e-5))


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_prepare_policy_adapts_the_transformer_and_checkpoints_it(family):
    plain = tiny_transformer(family)
    add_lora(plain, RANK, ALPHA, targets=lora_targets(family))
    perturb_lora(plain)
    bundle = bundle_of(family, tiny_transformer(family))
    groups = prepare_policy(bundle, _cfg())
    perturb_lora(bundle.unet)
    assert adapted_modules(bundle.unet) == adapted_modules(plain)
    lora_params = {id(p) for n, p in bundle.unet.named_parameters() if "lora_" in n}
    assert {id(p) for p in groups[0]["params"]} == lora_params
    assert bundle.unet.gradient_checkpointing and bundle.unet.training

    # Checkpointing is really taken (the transformer calls its checkpoint function per block) and
    # gives the gradients of the plain forward.
    calls = []
    ckpt = bundle.unet._gradient_checkpointing_func
    bundle.unet._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or ckpt(*a, **k)
    grads = []
    for model in (bundle.unet, plain):
        model.zero_grad()
        model(**transformer_inputs(family, model), return_dict=False)[0].square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert calls and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_prepare_policy_refuses_text_encoder_training(family):
    with pytest.raises(ValueError, match="model.train_text_encoder"):
        prepare_policy(bundle_of(family, tiny_transformer(family)), _cfg(train_text_encoder=True))
    with pytest.raises(ValueError, match="model.train_text_encoder"):
        save_lora(bundle_of(family, tiny_transformer(family)), "unused", train_text_encoder=True)


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_saved_lora_loads_into_a_fresh_base_pipeline(family, tmp_path):
    base = tiny_transformer(family)
    transformer_only_pipeline(family, base).save_pretrained(tmp_path / "base")
    base_out = forward(base, family)

    add_lora(base, RANK, ALPHA, targets=lora_targets(family))
    perturb_lora(base)
    trained_out = forward(base, family)
    assert not torch.allclose(trained_out, base_out, atol=1e-3)  # the LoRA changes the output
    save_lora(bundle_of(family, base), tmp_path / "lora")

    pipe = load_base(family, tmp_path / "base")
    assert type(pipe) is PIPELINES[family]
    torch.testing.assert_close(forward(pipe.transformer, family), base_out, rtol=0, atol=0)
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(forward(pipe.transformer, family), trained_out, rtol=1e-5, atol=1e-5)


def test_lora_without_alpha_metadata_would_load_with_the_wrong_scale(tmp_path):
    """Negative control: the same adapter tensors saved without the adapter metadata load with
    alpha = rank, so the round trip above only holds because `save_lora` writes lora_alpha."""
    from peft.utils import get_peft_model_state_dict

    family = "flux"
    base = tiny_transformer(family)
    transformer_only_pipeline(family, base).save_pretrained(tmp_path / "base")
    add_lora(base, RANK, ALPHA, targets=lora_targets(family))
    perturb_lora(base)
    trained_out = forward(base, family)
    PIPELINES[family].save_lora_weights(tmp_path / "bare",
                                        transformer_lora_layers=get_peft_model_state_dict(base))

    pipe = load_base(family, tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "bare")
    assert not torch.allclose(forward(pipe.transformer, family), trained_out, atol=1e-3)


@torch.no_grad()
def generate(pipe: DiffusionPipeline) -> torch.Tensor:
    image = pipe(prompt="a photo of a red cat", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    return image


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_trained_pipeline_is_reproduced_by_plain_diffusers(family, tmp_path):
    """The whole tiny pipeline (text encoders, VAE, scheduler): `ModelBundle.save_pretrained` of the
    base, `save_lora` of the trained adapters; plain diffusers then gives the trained transformer's
    output and the trained pipeline's image for a fixed seed."""
    from diffalign.models.tiny.flow import build_tiny_flow_bundle

    bundle = build_tiny_flow_bundle(family, seed=0, resolution=32)
    bundle.save_pretrained(tmp_path / "base")
    base_image = generate(bundle.pipeline())
    add_lora(bundle.unet, RANK, ALPHA, targets=lora_targets(family))
    perturb_lora(bundle.unet)
    bundle.unet.eval()
    trained_out, trained_image = forward(bundle.unet, family), generate(bundle.pipeline())
    assert not torch.allclose(trained_image, base_image, atol=1e-3)  # the LoRA changes the image
    save_lora(bundle, tmp_path / "lora")

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is PIPELINES[family]
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(forward(pipe.transformer, family), trained_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(generate(pipe), trained_image, rtol=1e-5, atol=1e-5)
