"""Sampler actors, the replay buffer and online MaPO end to end on the shared local Ray cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffalign.actors.online import ReplayBuffer, Sample
from PIL import Image

PROMPT = "a photo of sks dog"


def _sample(version: int, seed: int = 0) -> Sample:
    return Sample(PROMPT, seed, torch.zeros(4, 8, 8), version)


def test_replay_buffer_staleness_eviction():
    buf = ReplayBuffer(capacity=5, max_staleness=1)
    buf.add([_sample(0, 0), _sample(0, 1), _sample(1, 2), _sample(2, 3)])
    assert buf.ages(2) == [2, 2, 1, 0]
    got = buf.take(3, current_version=2)
    assert [s.seed for s in got] == [2, 3]           # the two version-0 samples are too old
    assert buf.stale_dropped == 2 and len(buf) == 0
    buf.add([_sample(5, s) for s in range(7)])       # over capacity: the oldest go first
    assert len(buf) == 5 and buf.overflow_dropped == 2
    assert [s.seed for s in buf.take(2, 6)] == [2, 3]
    assert buf.take(10, 3) == [] and buf.stale_dropped == 5  # from a future a rollback discarded
    exact = ReplayBuffer(4, max_staleness=0)
    exact.add([_sample(3), _sample(4)])
    assert [s.version for s in exact.take(4, 4)] == [4]
    with pytest.raises(ValueError):
        ReplayBuffer(4, max_staleness=-1)


def _lora_cfg(tiny_cfg, *extra: str):
    return tiny_cfg("model.finetune=lora", "model.lora_rank=4", "objective.name=mapo",
                    "reference.strategy=none", "ray.sampler.num=1", "ray.sampler.inference_steps=2",
                    "ray.sampler.guidance_scale=3.0", *extra)


def test_sampler_generates_versioned_latents(ray_local, tiny_cfg):
    from diffalign.actors.sampler import SamplerPool
    from diffalign.actors.sampler_worker import StaleSamplerError
    from diffalign.train.setup import build_setup

    ray = ray_local
    cfg = _lora_cfg(tiny_cfg, "ray.sampler.probe_every=1")
    setup = build_setup(cfg)
    unet = setup.bundle.unet
    with torch.no_grad():  # a policy whose adapters matter (lora_B starts at zero)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pool = SamplerPool(cfg)
    try:
        with pytest.raises(RuntimeError, match="sync_all"):
            pool.submit([PROMPT], [0])
        metrics = pool.sync_all(setup.trainable_modules, version=0)  # first sync: probe-checked
        assert metrics["sync/probe_max_abs_err"] < 1e-4
        out = pool.request([PROMPT, PROMPT, "a cat"], [11, 12, 13])
        assert out["latents"].shape == (3, 4, 8, 8) and out["latents"].dtype == torch.float32
        assert out["versions"] == [0, 0, 0] and out["seeds"] == [11, 12, 13]
        assert out["roundtrip_s"] > 0 and out["images_per_s"] > 0

        # Seed-matched with the learner's own pipeline: same weights, same scaled latent space.
        unet.eval()
        gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
        local = setup.bundle.pipeline(unet)([PROMPT, PROMPT, "a cat"], num_inference_steps=2,
                                            guidance_scale=3.0, generator=gens, height=32, width=32,
                                            output_type="latent").images
        unet.train()
        torch.testing.assert_close(out["latents"], local, rtol=1e-4, atol=1e-4)

        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.mul_(2.0)
        pool.sync_all(setup.trainable_modules, version=1)
        again = pool.request([PROMPT], [11])
        assert again["versions"] == [1] and not torch.allclose(again["latents"][0], out["latents"][0])
        assert pool.versions() == [1]

        actor = pool.actors[0]
        with pytest.raises(StaleSamplerError, match="holds policy version 1"):
            ray.get(actor.generate.remote([PROMPT], [0], 2, 3.0, "latent", expected_version=7))
        pil = ray.get(actor.generate.remote([PROMPT], [0], 2, 3.0, "pil"))
        assert pil["images"][0].size == (32, 32) and pil["versions"] == [1]
        assert pool.pop_metrics()["sampler_images_per_s"] > 0
    finally:
        pool.shutdown()


def _target_folder(path):
    """Three 32x32 mostly-red images: the user's target."""
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = np.zeros((32, 32, 3), dtype=np.int16)
        arr[..., 0] = 200
        arr = np.clip(arr + rng.integers(-30, 30, size=arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path / f"target_{i}.png")
    return path


class KillSampler:
    """Kills the sampler actor (Ray restarts it) right after step `at`; records what happened."""

    def __init__(self, at: int) -> None:
        self.at, self.steps, self.metrics = at, [], []
        self.before = self.after = None

    def on_step(self, trainer, metrics):
        import ray

        self.steps.append(trainer.step)
        self.metrics.append(dict(metrics))
        actor = trainer.batch_source.pool.actors[0]
        if trainer.step == self.at:
            self.before = ray.get(actor.info.remote())
            ray.kill(actor, no_restart=False)
        elif trainer.step == trainer.cfg.train.max_steps:
            self.after = ray.get(actor.info.remote())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_online_mapo_survives_sampler_restart(ray_local, tiny_cfg, tmp_path, mode):
    from diffalign.actors.cluster import ensure_ray
    from diffalign.actors.online import OnlineData
    from diffalign.models.tiny.diffusion import build_tiny_bundle
    from diffalign.train.driver import run

    folder = _target_folder(tmp_path / "targets")
    cfg = _lora_cfg(
        tiny_cfg, "data.kind=folder", f"data.path={folder}", f"data.prompt={PROMPT}", "online.enabled=true",
        f"online.mode={mode}", "online.max_staleness=1", "online.samples_per_request=2", "optim.batch_size=2",
        "train.max_steps=4", "train.checkpoint_every=100", "ray.sampler.probe_every=2", "optim.lr=1e-3",
    )
    kill = KillSampler(at=2)
    ensure_ray(cfg)
    summary = run(cfg, device="cpu", data=OnlineData(), callbacks=[kill])

    assert summary["final_step"] == 4 and kill.steps == [1, 2, 3, 4], "a step was lost or repeated"
    keys = ("staleness_mean", "staleness_max", "sampler_images_per_s", "buffer_size", "sync_version",
            "stale_dropped", "sampler_roundtrip_s")
    for m in kill.metrics:
        assert all(f"online/{k}" in m for k in keys), sorted(m)
        assert m["online/staleness_max"] <= 1
        assert np.isfinite(m["loss"])
    assert [m["online/sync_version"] for m in kill.metrics] == [1, 2, 3, 4]
    if mode == "sync":
        assert all(m["online/staleness_max"] == 0 for m in kill.metrics)
    # Restarted (new process), detected, re-synced to the learner's latest version by itself: the
    # rebuilt actor pulled its packets from the weight board (nothing pushes weights to it).
    assert kill.after["pid"] != kill.before["pid"] and kill.after["reconstructed"]
    assert not kill.before["reconstructed"]
    assert summary["online/sampler_restarts"] >= 1
    assert kill.after["version"] == 4
    assert kill.after["board_pulls"] and kill.after["board_pulls"][-1] == 4
    assert kill.after["board_pulls"] == sorted(kill.after["board_pulls"])
    assert all(0 <= m["online/sync_share"] <= 1 and m["online/sync_s"] >= 0 for m in kill.metrics)
    assert summary["online/probe_max_abs_err"] < 1e-4

    pipe = build_tiny_bundle("sd15", seed=0).pipeline()
    pipe.load_lora_weights(summary["weights"])
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    img = pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="pil").images[0]
    assert img.size == (32, 32)


@pytest.mark.slow
def test_two_learners_sampler_and_reference_actor_online(ray_local, tiny_cfg, tmp_path):
    """The whole runtime at once: 2 Ray Train learners (DDP), 1 sampler actor owned by the driver and
    a reference actor, training online DPO (targets chosen, on-policy samples rejected)."""
    import math

    from diffalign.actors.learner import read_step_log, train_with_ray
    from diffalign.models.weights import state_fingerprint
    from diffalign.train.driver import build_trainer

    folder = _target_folder(tmp_path / "targets")
    common = ("data.kind=folder", f"data.path={folder}", f"data.prompt={PROMPT}", "online.enabled=true",
              "online.mode=async", "online.max_staleness=1", "online.samples_per_request=2",
              "optim.batch_size=2", "objective.name=dpo", "reference.strategy=frozen", "optim.lr=5e-3")
    cfg = _lora_cfg(tiny_cfg, *common, "ray.num_learners=2", "reference.placement=actor", "train.max_steps=6",
                    "train.checkpoint_every=3", "ray.sampler.probe_every=2")
    out = train_with_ray(cfg)

    assert out["step"] == 6 and out["ranks_in_sync"] and len(out["rank_fingerprints"]) == 2
    m = out["metrics"]
    assert m["online/sync_version"] == 6 and m["online/staleness_max"] <= 1
    assert m["online/probe_max_abs_err"] < 1e-4
    losses = [r["loss"] for r in read_step_log(out["step_log"]) if r["event"] == "step"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # Policy == reference at the first step, so its loss is log 2; preference learning pushes it down.
    # The median of the last steps: at lr 5e-3 one fresh on-policy rejected sample can spike a step.
    assert abs(losses[0] - math.log(2)) < 1e-3
    assert sorted(losses[-3:])[1] < math.log(2) - 0.01, losses

    fresh = build_trainer(_lora_cfg(tiny_cfg, *common), train_data=[{}], heldout_data=None)
    fresh.restore(out["checkpoint"])
    assert fresh.step == 6
    assert state_fingerprint(fresh.trainable_weights()) == out["rank_fingerprints"][0]
