"""The tiny flow configs on Ray Train learners: two DDP learners with a reference actor (FLUX LoRA, DPO
with reference updates) and two DeepSpeed ZeRO-2 learners (SD3 full fine-tuning) train in step, and the
weights they save load into plain diffusers pipelines of the base model."""

from __future__ import annotations

import math

import pytest
import torch
from diffalign.config import load_config


def _cfg(name: str, tmp_path, *overrides: str):
    return load_config(f"configs/tiny/{name}.yaml", [
        f"train.output_dir={tmp_path}/run", "train.progress=false", "tracking.mlflow=false",
        "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0", "train.sample_every=0",
        "optim.batch_size=2", "data.num_pairs=16", "data.heldout_pairs=4", "ray.enabled=true",
        "ray.num_learners=2", "model.max_sequence_length=8", *overrides])


@pytest.mark.slow
def test_flux_lora_dpo_refupdate_on_two_ddp_learners_with_reference_actor(ray_local, tmp_path):
    from diffalign.actors.learner import train_with_ray
    from diffalign.models.tiny.flow import build_tiny_flow_bundle

    cfg = _cfg("flux_dpo_refupdate", tmp_path, "model.finetune=lora", "reference.placement=actor",
               "reference.tau=2", "reference.divergence_samples=4")
    out = train_with_ray(cfg)
    assert out["step"] == 4 and math.isfinite(out["metrics"]["loss"])
    assert out["ranks_in_sync"] and len(out["rank_fingerprints"]) == 2
    assert "ref/divergence" in out["metrics"]
    assert out["weights"].endswith("lora")

    pipe = build_tiny_flow_bundle("flux", seed=0).pipeline()
    kw = dict(num_inference_steps=2, guidance_scale=3.5, height=32, width=32, max_sequence_length=8,
              output_type="np")
    before = pipe("a red cube", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out["weights"])
    after = pipe("a red cube", generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(after))


@pytest.mark.slow
def test_sd3_full_dpo_on_two_zero2_learners(ray_local, tmp_path):
    pytest.importorskip("deepspeed")
    from diffalign.actors.learner import train_with_ray
    from diffusers import SD3Transformer2DModel

    cfg = _cfg("sd3_dpo", tmp_path, "ray.backend=deepspeed", "ray.zero_stage=2")
    out = train_with_ray(cfg)
    assert out["step"] == 4 and out["ranks_in_sync"] and math.isfinite(out["metrics"]["loss"])
    assert out["weights"].endswith("transformer")
    trained = SD3Transformer2DModel.from_pretrained(out["weights"])
    from diffalign.models.tiny.flow import build_tiny_flow_bundle

    base = build_tiny_flow_bundle("sd3", seed=0).unet
    moved = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values())]
    assert any(moved)
