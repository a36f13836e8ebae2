"""The tiny rectified-flow models (SD3 / SD3.5, FLUX.1, Qwen-Image): they build, the real diffusers
pipelines generate with them, and they survive save_pretrained -> from_pretrained bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffalign.models.bundle import FLOW_FAMILIES
from diffalign.models.flow_loading import load_flow_bundle
from diffalign.models.loading import detect_family, load_bundle
from diffalign.models.tiny.diffusion import build_tiny_bundle
from diffalign.models.tiny.flow import SCHEDULER_CONFIGS, build_tiny_flow_bundle
from diffalign.models.tiny.text_encoders import (
    QWEN_TEMPLATE,
    QWEN_TEMPLATE_PREFIX_TOKENS,
    build_tiny_qwen_tokenizer,
    build_tiny_t5_tokenizer,
)
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image

PIPELINE_CLASS = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "qwenimage": QwenImagePipeline}
PROMPTS = ["a photo of a red cat", "a blue dog"]


def _generate(pipe: DiffusionPipeline, family: str, output_type: str = "pt", **kw):
    kw.setdefault("max_sequence_length", 16)
    if family == "flux":
        kw.setdefault("guidance_scale", 3.5)  # the guidance embedding's input
    return pipe(PROMPTS, num_inference_steps=2, height=32, width=32, output_type=output_type,
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """Each family's tiny bundle and the folder it was saved to."""
    out = {}
    for family in FLOW_FAMILIES:
        bundle = build_tiny_flow_bundle(family, seed=0)
        path = tmp_path_factory.mktemp(family) / "model"
        bundle.save_pretrained(path)
        out[family] = (bundle, path)
    return out


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_tiny_bundle_generates_images(family: str) -> None:
    bundle = build_tiny_bundle(family, seed=0, resolution=32)  # the dispatch build_bundle goes through
    assert bundle.is_flow and bundle.latent_scale == 8 and bundle.resolution == 32
    assert type(bundle.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    for key, value in SCHEDULER_CONFIGS[family].items():
        assert bundle.noise_scheduler.config[key] == value
    assert not any(p.requires_grad for enc in bundle.text_encoders for p in enc.parameters())
    pipe = bundle.pipeline()
    assert isinstance(pipe, PIPELINE_CLASS[family])
    images = _generate(pipe, family, output_type="pil")
    assert len(images) == 2 and isinstance(images[0], Image.Image) and images[0].size == (32, 32)
    pixels = _generate(pipe, family)
    assert torch.isfinite(pixels).all() and not torch.equal(pixels[0], pixels[1])  # prompts matter


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_tiny_bundle_is_deterministic_in_seed(family: str) -> None:
    state = build_tiny_flow_bundle(family, seed=3).unet.state_dict()
    again = build_tiny_flow_bundle(family, seed=3).unet.state_dict()
    other = build_tiny_flow_bundle(family, seed=4).unet.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not all(torch.equal(state[k], other[k]) for k in state)


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_save_load_round_trip(family: str, saved: dict) -> None:
    bundle, path = saved[family]
    assert detect_family(str(path)) == family
    loaded = load_flow_bundle(str(path), family)
    assert loaded.resolution == 32 and loaded.max_sequence_length == bundle.max_sequence_length
    want, got = bundle.unet.state_dict(), loaded.unet.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert all(p.dtype == torch.float32 for p in loaded.unet.parameters())
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    expected = _generate(bundle.pipeline(), family)
    assert torch.equal(_generate(loaded.pipeline(), family), expected)
    # The folder is a plain diffusers pipeline too, and load_bundle dispatches to the flow loader.
    plain = DiffusionPipeline.from_pretrained(str(path))
    assert isinstance(plain, PIPELINE_CLASS[family])
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(_generate(plain, family), expected)
    assert torch.equal(_generate(load_bundle(str(path)).pipeline(), family), expected)


def test_frozen_dtype_casts_encoders_not_transformer(saved: dict) -> None:
    _, path = saved["flux"]
    loaded = load_flow_bundle(str(path), "flux", frozen_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}
    for module in [loaded.vae, *loaded.text_encoders]:
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


def test_missing_component_names_it(saved: dict, tmp_path) -> None:
    _, path = saved["flux"]
    broken = tmp_path / "flux"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text encoder.*text_encoder_2"):
        load_flow_bundle(str(broken), "flux")
    shutil.rmtree(broken / "transformer")
    with pytest.raises(FileNotFoundError, match="transformer"):
        load_flow_bundle(str(broken), "flux")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load_flow_bundle(str(tmp_path / "absent"), "flux")


def test_sd3_without_t5(saved: dict, tmp_path) -> None:
    bundle, path = saved["sd3"]
    # Same seed with and without T5: identical transformer and CLIP towers.
    no_t5 = build_tiny_flow_bundle("sd3", seed=0, t5=False)
    assert len(no_t5.text_encoders) == len(no_t5.tokenizers) == 2
    assert all(torch.equal(a, b) for a, b in zip(bundle.unet.state_dict().values(),
                                                 no_t5.unet.state_dict().values()))
    pipe = no_t5.pipeline()
    assert pipe.text_encoder_3 is None
    without = _generate(pipe, "sd3")
    assert torch.isfinite(without).all()
    assert not torch.equal(without, _generate(bundle.pipeline(), "sd3"))  # T5 states did matter
    # A folder with T5 loads without it on request, and gives what the T5-less tiny model gives.
    loaded = load_flow_bundle(str(path), "sd3", t5=False)
    assert len(loaded.text_encoders) == 2
    assert torch.equal(_generate(loaded.pipeline(), "sd3"), without)
    # A folder saved without T5 loads as such whatever t5 says; plain diffusers needs the components
    # named None, as for the released SD3 run without T5.
    no_t5.save_pretrained(tmp_path / "sd3")
    assert json.loads((tmp_path / "sd3" / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    assert len(load_flow_bundle(str(tmp_path / "sd3"), "sd3").text_encoders) == 2
    plain = DiffusionPipeline.from_pretrained(str(tmp_path / "sd3"), text_encoder_3=None, tokenizer_3=None)
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(_generate(plain, "sd3"), without)
    with pytest.raises(ValueError, match="T5"):
        load_flow_bundle(str(path), "flux", t5=False)


def test_t5_tokenizer_pads_and_truncates_as_the_pipelines_ask() -> None:
    tok = build_tiny_t5_tokenizer()
    out = tok(["a photo of a cat", "x" * 50], padding="max_length", max_length=8, truncation=True,
              add_special_tokens=True, return_tensors="pt")
    assert out.input_ids.shape == (2, 8)
    pieces = tok.convert_ids_to_tokens(out.input_ids[0].tolist())
    assert pieces == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>", "<pad>", "<pad>"]
    assert out.input_ids[1, -1].item() == tok.eos_token_id  # truncated, still closed by </s>
    assert tok.unk_token_id not in tok("Hello, World 42!").input_ids


def test_qwen_tokenizer_template_prefix_is_the_dropped_tokens() -> None:
    tok = build_tiny_qwen_tokenizer()
    prefix = QWEN_TEMPLATE.split("{}")[0]
    assert len(tok(prefix).input_ids) == QWEN_TEMPLATE_PREFIX_TOKENS == 34
    ids = tok(QWEN_TEMPLATE.format("a red cat")).input_ids
    kept = tok.convert_ids_to_tokens(ids[QWEN_TEMPLATE_PREFIX_TOKENS:])
    assert kept == ["a", "Ġred", "Ġcat", "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert tok.decode(ids) == QWEN_TEMPLATE.format("a red cat")  # byte-level: lossless


def test_qwen_encode_prompt_keeps_the_prompt() -> None:
    pipe = build_tiny_flow_bundle("qwenimage").pipeline()
    embeds, mask = pipe.encode_prompt(["", "a photo of a red cat"], device="cpu")
    # After the 34 dropped tokens: the prompt and the 5-token assistant suffix ("" keeps the suffix).
    assert embeds.shape[:2] == (2, 6 + 5) and mask[0].sum().item() == 5 and mask[1].all()


def test_resolution_must_be_a_multiple_of_16() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        build_tiny_flow_bundle("flux", resolution=40)
