"""Online MaPO on the tiny FLUX.1 model under Ray: sampler actors sample the FluxPipeline around the
current LoRA policy (seed-matched with the learner's own pipeline, packed latents unpacked), survive a
kill mid-run (restarted, re-synced from the weight board, no step lost), and the LoRA the run saves
loads in a plain diffusers FluxPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_ray_online import KillSampler
from test_ray_online import _target_folder as _targets

PROMPT = "a photo of sks toy"


def _flux_cfg(tmp_path, *overrides: str):
    from diffalign.config import load_config

    return load_config("configs/tiny/flux_mapo_personalize.yaml", [
        f"train.output_dir={tmp_path}/run", "train.progress=false", "tracking.mlflow=false",
        "model.max_sequence_length=8", *overrides])


@pytest.mark.slow
def test_flux_sampler_matches_the_learner_pipeline(ray_local, tmp_path):
    from diffalign.actors.sampler import SamplerPool
    from diffalign.models.flow_denoiser import pipeline_latents
    from diffalign.models.sampling import call_kwargs
    from diffalign.train.setup import build_setup

    cfg = _flux_cfg(tmp_path, "ray.sampler.inference_steps=2", "ray.sampler.probe_every=1")
    setup = build_setup(cfg)
    pool = SamplerPool(cfg)
    try:
        net = setup.bundle.unet
        pool.sync_all(setup.trainable_modules, version=0)
        out = pool.request([PROMPT, "a cat"], [11, 12])
        assert out["latents"].shape == (2, 16, 4, 4) and out["versions"] == [0, 0]
        net.eval()
        gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
        pipe = setup.bundle.pipeline(net)
        local = pipe([PROMPT, "a cat"], num_inference_steps=2, generator=gens, height=32, width=32,
                     output_type="latent", **call_kwargs(pipe, cfg.ray.sampler.guidance_scale, 2)).images
        net.train()
        torch.testing.assert_close(out["latents"], pipeline_latents(setup.bundle, local),
                                   rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05)
        metrics = pool.sync_all(setup.trainable_modules, version=1)
        assert metrics["sync/probe_max_abs_err"] < 1e-4
        again = pool.request([PROMPT], [11])
        assert again["versions"] == [1] and not torch.allclose(again["latents"][0], out["latents"][0])
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_online_flux_mapo_survives_sampler_kill_and_saves_a_diffusers_lora(ray_local, tmp_path):
    from diffalign.actors.cluster import ensure_ray
    from diffalign.actors.online import OnlineData
    from diffalign.models.tiny.flow import build_tiny_flow_bundle
    from diffalign.train.driver import run

    folder = _targets(tmp_path / "targets")
    cfg = _flux_cfg(tmp_path, f"data.path={folder}", f"data.prompt={PROMPT}", "online.mode=sync",
                    "online.samples_per_request=2", "optim.batch_size=2", "train.max_steps=4",
                    "train.checkpoint_every=100", "ray.sampler.probe_every=2", "ray.sampler.sync_every=1",
                    "ray.sampler.inference_steps=2")
    kill = KillSampler(at=2)
    ensure_ray(cfg)
    summary = run(cfg, device="cpu", data=OnlineData(), callbacks=[kill])

    assert summary["final_step"] == 4 and kill.steps == [1, 2, 3, 4], "a step was lost or repeated"
    assert [m["online/sync_version"] for m in kill.metrics] == [1, 2, 3, 4]
    assert all(m["online/staleness_max"] == 0 and np.isfinite(m["loss"]) for m in kill.metrics)
    assert kill.after["pid"] != kill.before["pid"] and kill.after["reconstructed"]
    assert kill.after["version"] == 4 and kill.after["board_pulls"][-1] == 4
    assert summary["online/sampler_restarts"] >= 1
    assert summary["online/probe_max_abs_err"] < 1e-4

    # The saved LoRA loads in a plain FluxPipeline of the base model and changes its samples.
    base = build_tiny_flow_bundle("flux", seed=cfg.model.tiny_seed, resolution=32)
    pipe = base.pipeline()
    kw = dict(num_inference_steps=2, guidance_scale=3.5, height=32, width=32, max_sequence_length=8,
              output_type="np")
    before = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(summary["weights"])
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())
    after = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert after.shape == (1, 32, 32, 3) and not np.allclose(before, after)
