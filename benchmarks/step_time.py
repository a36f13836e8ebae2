"""Training-step time and peak memory of every objective at the same batch size, plus a baseline.

Rows (all at --batch pairs, full fine-tune unless --finetune lora):
  sft, mapo, dpo (reference colocated), [dpo with a bf16 reference copy, under --dtype bf16],
  dpo (reference on a Ray actor, when diffalign.actors.reference_actor exists), xdpo,
  and a plain PyTorch Diffusion-DPO step written the way diffusers' research example does it.
The reference rows hold their copy in --reference-dtype (`reference.dtype`; auto = bf16 under
--dtype bf16 on CUDA, else fp32); the bf16-copy row always uses bf16, so
`--dtype bf16 --reference-dtype fp32` measures what the bf16 copy saves.

Every diffalign row is one `Trainer.train_step` (the code a real run executes per optimizer step):
batch from cached latents -> PreferenceStep -> backward -> grad norm + clip -> guard -> AdamW.

Timing: median over --steps timed steps after --warmup steps. On CPU all variants are built in one
process and stepped round-robin (the order rotates every round), so machine drift hits every row
alike and the ratios come from one run. On CUDA the variants run one after the other (they do not
all fit at once) and the device is synchronised around each step.

Peak memory: CUDA: torch.cuda.max_memory_allocated over build + steps, minus what was allocated
before the variant was built (weights, gradients, optimizer state, reference and activations).
CPU: each variant is run alone in a fresh subprocess, after a throwaway copy of it has run two
steps (so libraries and lazily built state are resident) and freed heap was returned to the OS;
then the kernel's resident-set high-water mark is reset (/proc/self/clear_refs), and the figure is
the peak (VmHWM) after build + steps minus the resident set just before the model was built. The
child runs with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the resident set at once.

    python benchmarks/step_time.py --model tiny --device cpu --batch 8 --steps 60
    python benchmarks/step_time.py --model sd15 --device cuda --dtype bf16 --grad-checkpointing --batch 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import measure
import torch
import variants

ALL = ["sft", "mapo", "dpo", "dpo_bf16ref", "dpo_actor", "xdpo", "baseline", "baseline_fused"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd15", "sdxl"], default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (cpu 60, cuda 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (cpu 5, cuda 3)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", nargs="?", const="unet", default="none", choices=["none", "unet", "blocks"],
                   help="torch.compile the whole UNet (--compile) or each block (--compile blocks)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fused-adam", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="auto: diffalign as the Trainer does (fused), baseline as diffusers does "
                        "(torch default); on/off: both the same")
    p.add_argument("--finetune", choices=["full", "lora"], default="full")
    p.add_argument("--reference-dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="reference.dtype of the dpo / xdpo / Ray-actor rows (default %(default)s)")
    p.add_argument("--variants", default=None,
                   help=f"comma list from {','.join(ALL)} (default: all that apply)")
    p.add_argument("--schedule", choices=["interleave", "sequential"], default=None,
                   help="interleave (cpu default) or sequential (cuda default)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on cpu: see benchmarks/README.md)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--name", default=None, help="results file stem (default step_time-<model>)")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.steps = args.steps or (10 if cuda else 60)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 5)
    args.schedule = args.schedule or ("sequential" if cuda else "interleave")
    measure.set_threads(args.threads, args.device)
    return args


def make_spec(args) -> variants.Spec:
    return variants.Spec(model=args.model, device=args.device, dtype=args.dtype, batch=args.batch,
                         grad_checkpointing=args.grad_checkpointing, compile=args.compile,
                         channels_last=args.channels_last, fused_adam=args.fused_adam, finetune=args.finetune,
                         reference_dtype=args.reference_dtype)


def choose_variants(args) -> tuple[list[str], dict[str, str]]:
    names = args.variants.split(",") if args.variants else list(ALL)
    skipped: dict[str, str] = {}
    if "dpo_bf16ref" in names and args.dtype != "bf16" and not args.variants:
        names.remove("dpo_bf16ref")
    fused_differs = args.fused_adam == "auto"
    if "baseline_fused" in names and not fused_differs and not args.variants:
        names.remove("baseline_fused")  # only differs from the baseline row where our default is fused
    if "dpo_actor" in names and args.model != "tiny":
        names.remove("dpo_actor")
        skipped["dpo_actor"] = "runs on the tiny model only (the actor rebuilds its model from the config)"
    if "dpo_actor" in names:
        ok, why = variants.actor_reference_available()
        if not ok:
            names.remove("dpo_actor")
            skipped["dpo_actor"] = why
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {ALL}")
    return names, skipped


# ----------------------------------------------------------------------------- child: memory of one variant


def probe_memory(args) -> None:
    spec = make_spec(args)
    # A throwaway copy of the same variant first: libraries, kernels and lazily built state that every
    # variant pays once (oneDNN, autograd, Ray's driver) are then resident before the measurement.
    warm = variants.build_variant(args.probe_memory, spec)
    for _ in range(2):
        warm.step()
    warm.close()
    del warm
    measure.release_freed_memory()
    reset = measure.reset_peak_rss()
    before = measure.rss_bytes()
    v = variants.build_variant(args.probe_memory, spec)
    after_build = measure.rss_bytes()
    for _ in range(args.warmup + args.steps):
        v.step()
    peak = measure.peak_rss_bytes()
    print(json.dumps({"peak_rss_delta": peak - before, "rss_after_build_delta": after_build - before,
                      "hwm_reset": reset}))


# ----------------------------------------------------------------------------- parent


def bookkeeping(variant, device, reps: int = 20) -> dict:
    """Per-step cost of the Trainer's global grad norm + clip (its finiteness check reads that norm),
    timed on the gradients the last step left behind."""
    engine = variant.trainer.engine
    params = [p for p in engine.params if p.grad is not None]
    if not params:
        return {}
    t_clip = [measure.timed(engine.grad_norm_and_clip, device) for _ in range(reps)]
    return {"grad_norm_and_clip_ms": measure.median_ms(t_clip), "num_param_tensors": len(params)}


def run_interleaved(names, spec, args, rows, errors) -> dict:
    built = {}
    for name in names:
        try:
            built[name] = variants.build_variant(name, spec)
        except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
            errors[name] = f"build failed: {e!r}"
    for _ in range(args.warmup):
        for name, v in list(built.items()):
            try:
                v.step()
            except Exception as e:  # noqa: BLE001
                errors[name] = f"step failed: {e!r}"
                built.pop(name).close()
    order = list(built)
    times = {n: [] for n in order}
    for r in range(args.steps):
        k = r % max(1, len(order))
        for name in order[k:] + order[:k]:
            times[name].append(measure.timed(built[name].step, spec.device))
    extra = {}
    if "dpo" in built:
        extra = bookkeeping(built["dpo"], spec.device)
    for name in order:
        v = built[name]
        rows.append(_row(name, v, times[name], spec))
        v.close()
    return extra


def run_sequential(names, spec, args, rows, errors, save) -> dict:
    """One variant after the other; `save(extra)` writes the results so far after each one."""
    cuda = torch.device(spec.device).type == "cuda"
    extra = {}
    for name in names:
        measure.free_device_memory(spec.device)
        if spec.compile != "none":
            torch._dynamo.reset()
        base = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        v = None
        try:
            t0 = time.perf_counter()
            v = variants.build_variant(name, spec)
            for _ in range(args.warmup):
                v.step()
            warm_s = time.perf_counter() - t0
            times = [measure.timed(v.step, spec.device) for _ in range(args.steps)]
            row = _row(name, v, times, spec)
            row["build_and_warmup_s"] = warm_s
            if cuda:
                row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            if name == "dpo":
                extra = bookkeeping(v, spec.device)
            rows.append(row)
            print(f"{name}: {row['median_ms']:.1f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            errors[name] = ("out of memory: " if measure.is_oom(e) else "") + repr(e)[:500]
        finally:
            if v is not None:
                v.close()
            del v
        save(extra, final=False)
    measure.free_device_memory(spec.device)
    return extra


def _row(name, v, times, spec) -> dict:
    ms = measure.median_ms(times)
    q1, q3 = measure.iqr_ms(times)
    return {"variant": name, "label": v.label, "objective": v.objective, "median_ms": ms, "q1_ms": q1,
            "q3_ms": q3, "steps": len(times), "pairs_per_s": 1000.0 * spec.batch / ms,
            "optimizer": v.optimizer_desc}


def cpu_memory(names, args, rows) -> None:
    by_name = {r["variant"]: r for r in rows}
    base = [a for a in sys.argv[1:]]
    for name in names:
        if name not in by_name:
            continue
        argv = [sys.argv[0], *base, "--probe-memory", name, "--steps", "3", "--warmup", "2"]
        # A fixed mmap threshold makes glibc give every freed block over 64 KiB back to the OS at once,
        # so the resident set follows the live tensors instead of the allocator's high-water mark.
        res = measure.run_child(argv, timeout=1800, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        if "error" in res:
            by_name[name]["memory_note"] = res["error"][:300]
            continue
        by_name[name]["peak_bytes"] = res["peak_rss_delta"]
        by_name[name]["build_rss_bytes"] = res["rss_after_build_delta"]
        if not res.get("hwm_reset"):
            by_name[name]["memory_note"] = "could not reset VmHWM: peak since process start (upper bound)"


def ratios(rows) -> dict:
    r = {x["variant"]: x for x in rows}
    out = {}

    def ratio(a, b, key, name):
        if a in r and b in r and r[a].get(key) and r[b].get(key):
            out[name] = r[a][key] / r[b][key]

    ratio("dpo", "mapo", "median_ms", "dpo_over_mapo_time")
    ratio("dpo", "mapo", "peak_bytes", "dpo_over_mapo_memory")
    ratio("dpo", "baseline", "median_ms", "ours_dpo_over_baseline_time")
    ratio("dpo", "baseline", "peak_bytes", "ours_dpo_over_baseline_memory")
    ratio("dpo", "baseline_fused", "median_ms", "ours_dpo_over_baseline_fused_time")
    ratio("dpo_actor", "dpo", "median_ms", "actor_over_colocated_time")
    ratio("dpo_actor", "dpo", "peak_bytes", "actor_over_colocated_learner_memory")
    ratio("dpo_bf16ref", "dpo", "median_ms", "bf16ref_over_dpo_time")
    ratio("dpo_bf16ref", "dpo", "peak_bytes", "bf16ref_over_dpo_memory")
    ratio("sft", "mapo", "median_ms", "sft_over_mapo_time")
    ratio("xdpo", "dpo", "median_ms", "xdpo_over_dpo_time")
    return out


RATIO_TEXT = {
    "dpo_over_mapo_time": "DPO / MaPO step time (MaPO is this much faster)",
    "dpo_over_mapo_memory": "DPO / MaPO peak memory",
    "ours_dpo_over_baseline_time": "our DPO / diffusers-style baseline step time (<1: ours faster)",
    "ours_dpo_over_baseline_memory": "our DPO / diffusers-style baseline peak memory",
    "ours_dpo_over_baseline_fused_time": "our DPO / baseline with fused AdamW step time (same optimizer)",
    "actor_over_colocated_time": "DPO with Ray-actor reference / colocated reference step time",
    "actor_over_colocated_learner_memory": "Ray-actor / colocated learner-process memory",
    "bf16ref_over_dpo_time": "DPO with bf16 reference copy / the dpo row's step time",
    "bf16ref_over_dpo_memory": "DPO with bf16 reference copy / the dpo row's peak memory",
    "sft_over_mapo_time": "SFT / MaPO step time",
    "xdpo_over_dpo_time": "xDPO / DPO step time",
}


def render(rows, rat, skipped, errors, extra, spec, args) -> str:
    cuda = args.device == "cuda"
    unit, scale = ("GiB", 2**30) if cuda else ("MiB", 2**20)
    base = next((x["median_ms"] for x in rows if x["variant"] == "baseline"), None)
    for x in rows:
        x["peak_mem"] = x["peak_bytes"] / scale if x.get("peak_bytes") is not None else None
        x["vs_baseline"] = x["median_ms"] / base if base else None
    cols = [("label", "variant"), ("median_ms", "median ms"), ("q1_ms", "q1"), ("q3_ms", "q3"),
            ("pairs_per_s", "pairs/s"), ("peak_mem", f"peak {unit}"), ("vs_baseline", "time / baseline"),
            ("optimizer", "optimizer")]
    out = [f"Model **{spec.model}**, device {spec.device}, dtype {spec.dtype}, batch {spec.batch} pairs "
           f"({2 * spec.batch} images per forward), finetune {spec.finetune}, grad checkpointing "
           f"{spec.grad_checkpointing}, compile {spec.compile}, channels_last {spec.channels_last}, "
           f"fused AdamW {spec.fused_adam}, {variants.reference_dtype_note(spec)}; {args.steps} timed steps "
           f"after {args.warmup} warm-up, "
           f"schedule {args.schedule}, torch threads {torch.get_num_threads()}.", "",
           measure.markdown_table(rows, cols), ""]
    if rat:
        out += ["| ratio | value |", "|---|---|"]
        out += [f"| {RATIO_TEXT.get(k, k)} | {v:.2f} |" for k, v in rat.items()]
        out.append("")
    if extra:
        out.append(f"Trainer bookkeeping per step (dpo row, {extra['num_param_tensors']} gradient tensors): "
                   "global grad norm + clip (also the finiteness check) "
                   f"{extra['grad_norm_and_clip_ms']:.2f} ms.")
        out.append("")
    for name, why in {**skipped, **errors}.items():
        out.append(f"- `{name}` not measured: {why}")
    notes = [x for x in rows if x.get("memory_note")]
    for x in notes:
        out.append(f"- `{x['variant']}` memory: {x['memory_note']}")
    out.append("")
    if cuda:
        how = ("torch.cuda.max_memory_allocated over build + steps, minus the allocation before the "
               "variant was built.")
    else:
        how = ("peak RSS (VmHWM, reset via /proc/self/clear_refs) of a fresh subprocess running only "
               "that variant, after a throwaway copy of it ran two steps and freed heap went back to the OS, "
               "minus its RSS just before the model was built (weights, grads, AdamW state, reference copy, "
               "activations, allocator slack).")
    out.append("Memory: " + how)
    out.append("SFT runs the policy over the chosen images only (its rejected-image margin diagnostic, "
               "objective.rejected_diagnostic, is off by default), so its forward is half MaPO's.")
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.probe_memory:
        probe_memory(args)
        return
    spec = make_spec(args)
    names, skipped = choose_variants(args)
    rows: list[dict] = []
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    order = {n: i for i, n in enumerate(ALL)}

    def save(extra: dict, final: bool = True) -> None:
        rows.sort(key=lambda x: order[x["variant"]])
        rat = ratios(rows)
        md = render(rows, rat, skipped, errors, extra, spec, args)
        if not final:
            md += f"\n\n(partial: {len(rows)} of {len(names)} variants done)"
        name = args.name or f"step_time-{args.model}"
        payload = {"spec": variants.spec_dict(spec), "steps": args.steps, "warmup": args.warmup,
                   "schedule": args.schedule, "rows": rows, "ratios": rat, "skipped": skipped,
                   "errors": errors, "trainer_bookkeeping": extra, "complete": final,
                   "wall_s": time.perf_counter() - t0}
        paths = measure.write_results(name, args.device, payload, md, args.out_dir,
                                      title=f"Step time: {args.model}")
        if final:
            print(md, flush=True)
            print(f"wrote {paths[0]} and {paths[1]}", flush=True)

    if args.schedule == "interleave":
        extra = run_interleaved(names, spec, args, rows, errors)
        if args.device == "cpu" and not args.no_memory:
            cpu_memory(names, args, rows)
    else:
        extra = run_sequential(names, spec, args, rows, errors, save)
    save(extra)


if __name__ == "__main__":
    main()
