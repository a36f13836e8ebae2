"""What the Ray layer costs per step on the tiny config (CPU): actor round trips vs the learner step.

Measured in one process, round-robin (each round runs every item once, the order rotating):
- learner step: one `Trainer.train_step` of DPO with the reference colocated, and with the reference
  on a `ReferenceActor` (through `RemoteReference`, the client `PreferenceStep` calls);
- reference errors for one batch ([chosen; rejected], 2B images): colocated `FrozenReference.errors`
  vs `RemoteReference.errors` (serialise, actor call, the same forward there, reply);
- the policy forward (with autograd, as in the step) followed by the Ray-actor reference errors, vs
  the two overlapped the way `PreferenceStep` issues them (`request_errors`, policy forward,
  `result()`), and the policy forward alone;
- the per-step `on_step` notification the driver sends the reference actor (frozen: no weights);
- on-policy samples for B prompts: an in-process `SamplerWorker.generate` vs `SamplerPool.request`
  (one `SamplerActor`, same config, latents out); and one `SamplerPool.sync_all` (weight packet).

Object-store bytes: the tensors each call sends and receives (their nbytes, and the pickled size as a
check), for the tiny model measured, and for SD1.5 / SDXL sizes computed from the shapes (UNet
parameter counts from a meta-device build; no weights).

    python benchmarks/ray_overhead.py --batch 8 --reps 30
"""

from __future__ import annotations

import argparse
import copy
import pickle
import shutil
import tempfile
import time

import fixtures
import measure
import torch
import variants


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="pairs per step (default %(default)s)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    measure.set_threads(args.threads, "cpu")
    return args


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def pickled_bytes(obj) -> int:
    return len(pickle.dumps(obj, protocol=5))


def reference_inputs(model: str, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (2 * batch, *fixtures.latent_shape(model))
    noisy, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).repeat(2)
    cond = fixtures.StaticPromptEncoder(model)([fixtures.PROMPTS[i] for i in range(batch)]).repeat(2)
    return noisy, timesteps, cond, target


def unet_param_bytes(model: str) -> int:
    from diffusers import UNet2DConditionModel

    if model == "tiny":
        return sum(p.numel() * 4 for p in fixtures.build_unet("tiny").parameters())
    cfg = {"sd15": fixtures.SD15_UNET, "sdxl": fixtures.SDXL_UNET}[model]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    return sum(p.numel() * 4 for p in unet.parameters())


def bytes_per_step(model: str, batch: int) -> dict:
    """Object-store traffic of one DPO step with a reference actor and of on-policy sampling (shapes only)."""
    noisy, timesteps, cond, target = reference_inputs(model, batch)
    sent = tensor_bytes([noisy, timesteps, cond.tensors(), target])
    reply = 2 * batch * 4
    latents = batch * 4 * int(torch.tensor(fixtures.latent_shape(model)).prod())
    return {"model": model, "batch": batch, "reference_request_bytes": sent, "reference_reply_bytes": reply,
            "sampler_reply_bytes": latents, "weight_packet_fp32_bytes": unet_param_bytes(model)}


def main(argv=None) -> None:
    args = parse_args(argv)
    from diffalign.actors.reference_actor import spawn_reference_actor
    from diffalign.actors.sampler import SamplerPool
    from diffalign.actors.sampler_worker import SamplerWorker
    from diffalign.reference import build_reference

    ray = fixtures.ensure_ray()
    spec = variants.Spec(model="tiny", batch=args.batch)
    learner = variants.build_variant("dpo", spec)
    learner_actor = variants.build_variant("dpo_actor", spec)
    remote = learner_actor.ray_reference
    cfg = learner_actor.cfg
    unet = learner.unet
    colocated = build_reference("frozen", unet, learner.trainer.setup.denoiser)
    noisy, timesteps, cond, target = reference_inputs("tiny", args.batch)

    cfg.ray.sampler.num = 1
    cfg.ray.sampler.num_cpus = 1
    prompts = [fixtures.PROMPTS[i] for i in range(args.batch)]
    seeds = list(range(args.batch))
    t0 = time.perf_counter()
    local_sampler = SamplerWorker(cfg)
    pool = SamplerPool(cfg, n=1, output="latent")
    sync_metrics = pool.sync_all(unet, version=0, wait=True)
    setup_s = time.perf_counter() - t0
    # A second reference actor of its own for the notification item, so the learner's actor keeps
    # seeing only the learner's steps.
    cfg_note = copy.deepcopy(cfg)
    cfg_note.train.output_dir = tempfile.mkdtemp(prefix="diffalign-refnote-")
    note_actor = spawn_reference_actor(cfg_note, fresh=True)
    ray.get(note_actor.info.remote())
    ref_state = {"step": 0}

    def actor_on_step():
        ref_state["step"] += 1
        ray.get(note_actor.on_step.remote(ref_state["step"], None, None))

    version = {"v": 0}

    def sync():
        version["v"] += 1
        pool.sync_all(unet, version=version["v"], wait=True)

    denoiser = learner_actor.trainer.setup.denoiser
    policy = learner_actor.unet

    def policy_forward():
        return denoiser.errors(policy, noisy, timesteps, cond, target)

    def sequential():
        policy_forward()
        remote.errors(noisy, timesteps, cond, target)

    def overlapped():
        pending = remote.request_errors(noisy, timesteps, cond, target)
        policy_forward()
        pending.result()

    items = {
        "learner step, dpo, reference colocated": learner.step,
        "learner step, dpo, reference on a Ray actor": learner_actor.step,
        "reference errors, colocated": lambda: colocated.errors(noisy, timesteps, cond, target),
        "reference errors, Ray actor round trip": lambda: remote.errors(noisy, timesteps, cond, target),
        "policy forward alone": policy_forward,
        "policy forward, then Ray-actor reference errors": sequential,
        "policy forward overlapped with the Ray-actor reference": overlapped,
        "reference on_step notification (frozen)": actor_on_step,
        "samples for B prompts, in-process SamplerWorker": lambda: local_sampler.generate(prompts, seeds),
        "samples for B prompts, SamplerPool.request (1 actor)": lambda: pool.request(prompts, seeds),
        "weight sync to the sampler (sync_all, wait)": sync,
    }
    names = list(items)
    for _ in range(args.warmup):
        for n in names:
            items[n]()
    times = {n: [] for n in names}
    for r in range(args.reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(measure.timed(items[n], "cpu"))

    rows = []
    for n in names:
        q1, q3 = measure.iqr_ms(times[n])
        rows.append({"item": n, "median_ms": measure.median_ms(times[n]), "q1_ms": q1, "q3_ms": q3})
    med = {r["item"]: r["median_ms"] for r in rows}
    step_ms = med["learner step, dpo, reference colocated"]
    for r in rows:
        r["vs_learner_step"] = r["median_ms"] / step_ms
    derived = {
        "reference_actor_overhead_ms": med["reference errors, Ray actor round trip"]
        - med["reference errors, colocated"],
        "learner_step_actor_over_colocated": med["learner step, dpo, reference on a Ray actor"] / step_ms,
        "sampler_pool_overhead_ms": med["samples for B prompts, SamplerPool.request (1 actor)"]
        - med["samples for B prompts, in-process SamplerWorker"],
        "overlap_saved_ms": med["policy forward, then Ray-actor reference errors"]
        - med["policy forward overlapped with the Ray-actor reference"],
    }
    sample = pool.request(prompts, seeds)
    mb = measured_bytes = {
        "reference_request_tensor_bytes": tensor_bytes([noisy, timesteps, cond.tensors(), target]),
        "reference_request_pickled_bytes": pickled_bytes((noisy, timesteps, cond.tensors(), target)),
        "reference_reply_bytes": tensor_bytes(remote.errors(noisy, timesteps, cond, target)),
        "sampler_reply_tensor_bytes": tensor_bytes(sample["latents"]),
        "weight_packet_mb": sync_metrics["sync/packet_mb"],
    }
    shapes = [bytes_per_step(m, b) for m, b in (("tiny", args.batch), ("sd15", 8), ("sdxl", 4))]
    pool.shutdown()
    learner_actor.close()
    ray.kill(note_actor, no_restart=True)
    shutil.rmtree(cfg_note.train.output_dir, ignore_errors=True)

    mib = 2**20
    cols = [("item", "item"), ("median_ms", "median ms"), ("q1_ms", "q1"), ("q3_ms", "q3"),
            ("vs_learner_step", "x learner step")]
    s = cfg.ray.sampler
    md = [f"Tiny model, CPU, batch {args.batch} pairs (reference calls carry {2 * args.batch} images), "
          f"sampler {s.inference_steps} denoising steps with CFG {s.guidance_scale}; {args.reps} rounds "
          f"after {args.warmup} warm-up, round-robin; torch threads {torch.get_num_threads()} (actors: "
          f"OMP_NUM_THREADS=1). Ray {ray.__version__}; pool + actors started in {setup_s:.1f} s.", "",
          measure.markdown_table(rows, cols), "",
          f"- Reference actor overhead per step: {derived['reference_actor_overhead_ms']:.1f} ms "
          "(round trip minus the same forward colocated); learner step with the actor reference / "
          f"colocated: {derived['learner_step_actor_over_colocated']:.2f}x.",
          "- Policy forward + Ray-actor reference errors: "
          f"{med['policy forward, then Ray-actor reference errors']:.1f} ms one after the other, "
          f"{med['policy forward overlapped with the Ray-actor reference']:.1f} ms with the actor call "
          f"issued first, as the step does ({derived['overlap_saved_ms']:+.1f} ms saved). The actor can "
          "only compute alongside the learner on a free core; on this shared 2-core machine that is "
          "not guaranteed.",
          "- SamplerPool.request overhead over an in-process generate: "
          f"{derived['sampler_pool_overhead_ms']:.1f} ms.",
          f"- Measured (tiny): reference request {mb['reference_request_tensor_bytes'] / 1024:.1f} KiB "
          f"of tensors ({mb['reference_request_pickled_bytes'] / 1024:.1f} KiB pickled), reply "
          f"{mb['reference_reply_bytes']} B; sampler reply "
          f"{mb['sampler_reply_tensor_bytes'] / 1024:.1f} KiB; weight packet "
          f"{mb['weight_packet_mb']:.2f} MiB per sync.", "",
          "Object-store bytes per step from the shapes (fp32; the weight packet goes once per "
          "`ray.sampler.sync_every` steps, shared by all samplers):", "",
          "| model | pairs | reference request MiB | reference reply B | sampler latents MiB "
          "| weight packet MiB |",
          "|---|---|---|---|---|---|"]
    for s in shapes:
        md.append(f"| {s['model']} | {s['batch']} | {s['reference_request_bytes'] / mib:.2f} | "
                  f"{s['reference_reply_bytes']} | {s['sampler_reply_bytes'] / mib:.3f} | "
                  f"{s['weight_packet_fp32_bytes'] / mib:.0f} |")
    md = "\n".join(md)
    print(md, flush=True)
    payload = {"batch": args.batch, "reps": args.reps, "rows": rows, "derived": derived,
               "measured_bytes": measured_bytes, "bytes_per_step": shapes, "ray": ray.__version__,
               "setup_s": setup_s, "threads": torch.get_num_threads()}
    paths = measure.write_results("ray_overhead-tiny", "cpu", payload, md, args.out_dir,
                                  title="Ray overhead: actor round trips vs the learner step")
    print(f"wrote {paths[0]} and {paths[1]}", flush=True)


if __name__ == "__main__":
    main()
