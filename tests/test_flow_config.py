"""Flow-family configs: an option of one family set on another, a resolution the packing cannot take, and
a pipeline folder lacking a text encoder are rejected at load naming the field, before any model is
built or worker started (the recipe exits 2 without starting Ray); prompt embeddings are cached per
unique prompt with the same conditioning as an uncached encode."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffalign.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, field", [
    (["model.family=sd3", "model.flux_guidance=3.5"], "model.flux_guidance"),
    (["model.family=qwenimage", "model.flux_guidance=1.0"], "model.flux_guidance"),
    (["model.family=flux", "model.t5=false"], "model.t5"),
    (["model.family=sd15", "model.max_sequence_length=77"], "model.max_sequence_length"),
    (["model.family=sdxl", "model.flow_shift=3.0"], "model.flow_shift"),
    (["model.family=sd15", "timesteps.reward_scale=sigma_sqrt"], "timesteps.reward_scale"),
    (["model.family=flux", "model.resolution=40"], "model.resolution"),
    (["model.family=flux", "model.train_text_encoder=true"], "model.train_text_encoder"),
    (["model.family=sd3", "model.vae=some/vae"], "model.vae"),
    (["model.family=sd3", "model.flow_shift=0"], "model.flow_shift"),
    (["model.family=sd3", "timesteps.sampler=logit_normal", "timesteps.logit_std=0"], "timesteps.logit_std"),
    (["model.family=flux", "timesteps.sampler=mode", "timesteps.mode_scale=3"], "timesteps.mode_scale"),
    (["model.family=sd4"], "model.family"),
])
def test_options_of_another_family_are_rejected_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_flow_options_load_on_their_family():
    cfg = load_config(None, ["model.family=flux", "model.flux_guidance=1.0", "model.max_sequence_length=64",
                             "timesteps.sampler=logit_normal", "timesteps.reward_scale=cosmap"])
    assert cfg.model.flux_guidance == 1.0 and cfg.timesteps.reward_scale == "cosmap"
    assert load_config(None, ["model.family=sd3", "model.t5=false", "model.flow_shift=1.0"]).model.t5 is False


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from diffalign.models.tiny.export import export_base

    out = tmp_path_factory.mktemp("tiny")
    return {fam: export_base(out, fam) for fam in ("sd3", "flux")}


def test_pipeline_folder_lacking_a_text_encoder_is_rejected(exported, tmp_path):
    flux = tmp_path / "flux"
    shutil.copytree(exported["flux"], flux)
    assert load_config(None, ["model.family=flux", f"model.pretrained={flux}"]).model.pretrained
    shutil.rmtree(flux / "text_encoder_2")
    with pytest.raises(ConfigError, match=r"model\.pretrained.*text_encoder_2/ \(T5 text encoder\)"):
        load_config(None, ["model.family=flux", f"model.pretrained={flux}"])
    with pytest.raises(ConfigError, match=r"model\.family=sd3 expects a StableDiffusion3Pipeline.*FluxPipeline"):
        load_config(None, ["model.family=sd3", f"model.pretrained={exported['flux']}"])
    with pytest.raises(ConfigError, match=r"model\.pretrained.*neither a folder nor a hub id"):
        load_config(None, ["model.family=sd3", f"model.pretrained={tmp_path / 'nowhere'}"])


def test_sd3_without_t5_needs_model_t5_false(exported, tmp_path):
    sd3 = tmp_path / "sd3"
    shutil.copytree(exported["sd3"], sd3)
    shutil.rmtree(sd3 / "text_encoder_3")
    with pytest.raises(ConfigError, match=r"text_encoder_3/.*model\.t5=false"):
        load_config(None, ["model.family=sd3", f"model.pretrained={sd3}"])
    cfg = load_config(None, ["model.family=sd3", f"model.pretrained={sd3}", "model.t5=false"])
    from diffalign.models.build import build_bundle

    bundle = build_bundle(cfg)
    assert len(bundle.text_encoders) == 2
    from diffalign.models.conditioning import PromptEncoder

    cond = PromptEncoder(bundle)(["a red cube"])
    assert cond.prompt_embeds.shape[0] == 1 and torch.isfinite(cond.prompt_embeds).all()


def test_recipe_exits_before_starting_ray_on_a_bad_flow_config(exported, tmp_path):
    flux = tmp_path / "flux"
    shutil.copytree(exported["flux"], flux)
    shutil.rmtree(flux / "text_encoder")
    proc = subprocess.run(
        [sys.executable, "recipes/preference_offline.py", "--config", "configs/tiny/flux_mapo.yaml",
         "--set", f"model.pretrained={flux}", "--set", "ray.enabled=true", "--set", "ray.num_learners=2",
         "--set", f"train.output_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.pretrained" in proc.stderr and "text_encoder/" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr.replace("ray.enabled", "")
    assert not (tmp_path / "run").exists()


def test_cached_prompt_embeddings_equal_an_uncached_encode():
    from diffalign.models.conditioning import PromptEncoder
    from diffalign.models.tiny.flow import build_tiny_flow_bundle
    from diffalign.train.cache import CachedPromptEncoder

    prompts = ["cube", "a much longer prompt about a ball", "cube", "a tree"]
    for fam in ("sd3", "flux", "qwenimage"):
        b = build_tiny_flow_bundle(fam, seed=0)
        cached = CachedPromptEncoder(b)
        cached.prefill(prompts[:2])
        got = cached(prompts)
        want = PromptEncoder(b)(prompts)
        assert len(cached) == 3  # one row per unique prompt
        for name, t in want.tensors().items():
            torch.testing.assert_close(got.tensors()[name], t, rtol=1e-5, atol=1e-6, msg=f"{fam} {name}")
