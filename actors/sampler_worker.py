"""The sampler worker: one copy of the policy pipeline that loads weight packets and generates
version-tagged samples. `SamplerActor` is the same class on Ray; `diffalign.actors.sampler` keeps a
restartable, versioned group of them in step with the learner.

With a `WeightBoard` (see `diffalign.actors.sampler`), the worker syncs itself: a call that names
`min_version` / `min_epoch` first pulls the board's latest packet when the worker holds an older
one (or none: -1 after a restart), so no learner has to push weights to a restarted actor.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import ray
import torch
from diffalign.actors.weight_sync import (
    ProbeBatch,
    WeightPacket,
    WeightSyncError,
    apply_packet,
    compute_dtype,
    probe_outputs,
)
from diffalign.config import RunConfig
from diffalign.models.build import build_policy
from diffalign.models.flow_denoiser import pipeline_latents
from diffalign.models.precision import autocast, mixed_precision_dtype
from diffalign.models.sampling import call_kwargs

OUTPUTS = ("latent", "pil")


class StaleSamplerError(RuntimeError):
    """A sampler was asked for samples of a policy version it does not hold."""


class SamplerWorker:
    """One copy of the policy pipeline (wrapped by `SamplerActor`; usable directly without Ray).

    Built from the run config exactly as the learner's policy is (same bundle, same LoRA/full
    preparation), so the trainable keys match and a packet loads strictly.
    """

    def __init__(self, cfg: RunConfig, index: int = 0, board: Any = None) -> None:
        self.cfg, self.index, self.board = cfg, index, board
        want_gpu = cfg.ray.sampler.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")
        # Half-precision autocast only where it pays (GPU); the probe check then uses its tolerance.
        self.autocast_dtype = mixed_precision_dtype(cfg.model.mixed_precision) if want_gpu else None
        # The learner's initial policy, bit for bit (seeded as every process builds it).
        bundle, _ = build_policy(cfg)
        self.modules: list[torch.nn.Module] = [bundle.unet]
        if cfg.model.train_text_encoder:
            self.modules += bundle.text_encoders
        for module in [bundle.unet, bundle.vae, *bundle.text_encoders]:
            module.requires_grad_(False)
            module.eval()
            module.to(self.device)
        self.bundle = bundle
        self.pipe = bundle.pipeline()
        self._version = -1
        self._epoch = -1    # the board epoch (learner attempt / rollback lineage) of the held weights
        self._seq = -1      # the board publication held (-1: none)
        self._holds_base = True  # still the weights it was built with (no packet loaded yet)
        self._probes: dict[int, ProbeBatch] = {}
        self.images_generated = 0
        self.generate_s = 0.0
        self.board_pulls: list[int] = []          # versions pulled from the board, in order
        self.requests_by_rank: Counter = Counter()  # images generated per requesting learner rank
        self.reconstructed = False
        # A Ray restart of this actor (False outside Ray). Only asked inside Ray: outside it,
        # get_runtime_context() would start a whole local cluster in the caller's process.
        if ray.is_initialized():
            try:
                self.reconstructed = bool(ray.get_runtime_context().was_current_actor_reconstructed)
            except Exception:  # noqa: BLE001 - in a driver, not an actor
                pass

    def sync(self, packet: WeightPacket, expected_version: int | None = None) -> int:
        """Strict load of the packet (see `apply_packet`); returns the version now held."""
        self._version = -1  # a failed load leaves no half-valid version behind
        self._epoch = self._seq = -1
        self._holds_base = False
        self._version = apply_packet(self.modules, packet, expected_version)
        return self._version

    def pull(self, min_version: int, min_epoch: int = 0, timeout_s: float | None = None) -> int:
        """Makes sure the held policy is the board's latest and at least (`min_version`, `min_epoch`),
        loading the board's packet when it is not; returns the version now held.

        Waits at most `timeout_s` (ray.sampler.board_timeout_s) for the board to publish such a
        version, then raises WeightSyncError naming what it waited for.
        """
        if self.board is None:
            raise RuntimeError(f"sampler {self.index} has no weight board to pull policy version "
                               f">= {min_version} from")
        timeout_s = self.cfg.ray.sampler.board_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        lost_seq = -1
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            # The board answers at once when it holds a fresh enough publication; an empty reply
            # means the bound passed.
            try:
                latest = ray.get(self.board.wait_for.remote(min_version, min_epoch, left, lost_seq),
                                 timeout=left + 30.0)
            except ray.exceptions.RayActorError:  # the board is restarting (empty): ask again
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
                continue
            if latest is None:
                raise WeightSyncError(
                    f"sampler {self.index} waited {timeout_s:.0f}s (ray.sampler.board_timeout_s) for the "
                    f"weight board to publish policy version >= {min_version} of epoch >= {min_epoch}; "
                    f"it holds version {self._version} (epoch {self._epoch}) and the learner's rank 0 "
                    "published nothing newer")
            if latest["seq"] == self._seq:
                return self._version
            try:
                self._load(latest)
            except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
                # Its owner (a learner attempt that died) is gone: wait for the next publication.
                lost_seq = latest["seq"]
                continue
            return self._version

    def _load(self, latest: dict) -> None:
        version = int(latest["version"])
        if latest["base"]:
            self.use_base_weights(version)
        else:
            packet = ray.get(latest["refs"][0], timeout=self.cfg.ray.sampler.board_timeout_s)
            self.sync(packet, expected_version=version)
        self._epoch, self._seq = int(latest["epoch"]), int(latest["seq"])
        self.board_pulls.append(version)

    def use_base_weights(self, version: int = 0) -> int:
        """Declares the weights it was built with (cfg.model as loaded) to be policy `version`, so the
        base model is sampled without a learner. Freshly added LoRA adapters are a no-op (lora_B starts
        at zero, checked here); a worker that has loaded a packet no longer holds the base model."""
        if not self._holds_base:
            raise StaleSamplerError(f"sampler {self.index} has loaded trained weights, not the base model")
        active = [n for m in self.modules for n, p in m.named_parameters()
                  if "lora_B" in n and bool(p.any())]
        if active:
            raise RuntimeError(f"sampler {self.index}: LoRA adapters are not a no-op ({active[0]} != 0)")
        self._version = int(version)
        self._epoch = self._seq = -1
        return self._version

    def version(self) -> int:
        return self._version

    def info(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "device": str(self.device), "version": self._version,
                "epoch": self._epoch, "images_generated": self.images_generated,
                "generate_s": self.generate_s,
                "board_pulls": list(self.board_pulls), "requests_by_rank": dict(self.requests_by_rank),
                "reconstructed": self.reconstructed}

    @torch.no_grad()
    def probe(self, seed: int = 0, min_version: int | None = None, min_epoch: int = 0) -> dict:
        """Denoiser outputs on the fixed probe batch of `seed`, with the version and compute dtype
        (after pulling the board's latest packet when `min_version` is given)."""
        if min_version is not None:
            self.pull(min_version, min_epoch)
        if seed not in self._probes:
            self._probes[seed] = ProbeBatch.build(self.bundle.unet, seed)
        with autocast(self.device, self.autocast_dtype):
            out = probe_outputs(self.bundle.unet, self._probes[seed])
        dtype = compute_dtype(self.bundle.unet, self.autocast_dtype)
        return {"out": out, "version": self._version, "dtype": str(dtype).replace("torch.", "")}

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int | None = None,
                 guidance: float | None = None, output: str = "latent",
                 expected_version: int | None = None, min_version: int | None = None, min_epoch: int = 0,
                 requester: int | None = None) -> dict:
        """One sample per (prompt, seed), each from its own seeded generator.

        output="latent": "latents" (N, C, h, w) float32 in the scaled latent space the training step
        uses (the VAE encoder's mean times scaling_factor); output="pil": "images" (list of PIL).
        `min_version` (with `min_epoch`): pull the board's latest first (see `pull`); every sample is
        tagged with the version really used. `expected_version`: refuse (StaleSamplerError) unless
        exactly that version is held, without pulling. `requester`: the learner rank asking (logged).
        """
        pulled_from, pulls_before = self._version, len(self.board_pulls)
        if min_version is not None:
            self.pull(min_version, min_epoch)
        if expected_version is not None and self._version != expected_version:
            raise StaleSamplerError(f"sampler {self.index} holds policy version {self._version}, "
                                    f"asked for version {expected_version}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        s = self.cfg.ray.sampler
        res = self.bundle.resolution
        t0 = time.perf_counter()
        gens = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        with autocast(self.device, self.autocast_dtype):
            out = self.pipe(list(prompts), num_inference_steps=steps or s.inference_steps, generator=gens,
                            height=res, width=res, output_type=output,
                            **call_kwargs(self.pipe, s.guidance_scale if guidance is None else guidance,
                                          len(prompts)))
        dt = time.perf_counter() - t0
        self.images_generated += len(prompts)
        self.generate_s += dt
        if requester is not None:
            self.requests_by_rank[int(requester)] += len(prompts)
        result = {"prompts": list(prompts), "seeds": [int(x) for x in seeds], "version": self._version,
                  "versions": [self._version] * len(prompts), "epoch": self._epoch, "actor": self.index,
                  "pid": os.getpid(), "requester": requester, "pulled_from": pulled_from,
                  "pulled": len(self.board_pulls) > pulls_before,
                  "generate_s": dt, "images_per_s": len(prompts) / max(dt, 1e-9)}
        if output == "latent":
            result["latents"] = pipeline_latents(self.bundle, out.images).float().cpu()
        else:
            result["images"] = list(out.images)
        return result


SamplerActor = ray.remote(SamplerWorker)
