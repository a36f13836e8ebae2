"""Model FLOP utilisation of the training step on one GPU, for several execution variants.

1. Peak: median time of a large bf16 `torch.matmul` (--matmul-size, 8192^3 by default) -> FLOP/s.
2. FLOPs of one step: `torch.utils.flop_counter.FlopCounterMode` around one eager
   `Trainer.train_step` (policy forward + backward over [chosen; rejected], and the reference
   forward for DPO). Convolutions, matmuls and attention are counted; norms, element-wise ops and
   the optimizer are not (they are memory-bound and add no model FLOPs). With gradient
   checkpointing (off by default here) the recomputed forward is counted too, i.e. it becomes a
   hardware-FLOPs figure.
3. For each variant: median step time; achieved FLOP/s = step FLOPs / step time; MFU = achieved / peak.
   Variants: eager (plain AdamW), fused AdamW, channels_last, torch.compile of the whole UNet or of
   each block, SDPA backends forced with torch.nn.attention.sdpa_kernel (flash, efficient, math), and
   compile + channels_last + fused together.
4. Where the time goes: a torch.profiler trace of two eager steps, GPU kernel time grouped into
   matmul / convolution, attention, normalisation, optimizer and other element-wise kernels, and
   the GPU idle share of the wall time.

    python benchmarks/mfu.py --model sd15 --batch 8 --objective dpo
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import time

import measure
import torch
import variants

VARIANTS = {
    # name: (Spec overrides, sdpa backend or None)
    "eager": ({"fused_adam": "off"}, None),
    "fused_adam": ({"fused_adam": "on"}, None),
    "channels_last": ({"fused_adam": "on", "channels_last": True}, None),
    "sdpa_flash": ({"fused_adam": "on"}, "FLASH_ATTENTION"),
    "sdpa_efficient": ({"fused_adam": "on"}, "EFFICIENT_ATTENTION"),
    "sdpa_math": ({"fused_adam": "on"}, "MATH"),
    "compile_unet": ({"fused_adam": "on", "compile": "unet"}, None),
    "compile_blocks": ({"fused_adam": "on", "compile": "blocks"}, None),
    "tuned": ({"fused_adam": "on", "compile": "unet", "channels_last": True}, None),
}
COMPILED = {"compile_unet", "compile_blocks", "tuned"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd15", "sdxl"], default="sd15")
    p.add_argument("--objective", choices=["sft", "mapo", "dpo", "xdpo"], default="dpo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the peak matmul (cuda 8192, cpu 1024)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke test of the code")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the remaining variants once this many seconds have passed (compiled ones "
                        "need about --compile-reserve-s more)")
    p.add_argument("--compile-reserve-s", type=float, default=150.0)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    # 8192^3 in bf16 takes minutes on a CPU.
    args.matmul_size = args.matmul_size or (8192 if args.device == "cuda" else 1024)
    return args


def matmul_peak(n: int, device: str = "cuda", reps: int = 20) -> dict:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(reps):
        if device != "cuda":
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    t = statistics.median(times)
    del a, b
    return {"n": n, "median_s": t, "flops_per_s": 2 * n**3 / t}


def count_flops(v) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        v.step()
    total = fc.get_total_flops()
    by_op = {}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        by_op[str(op)] = int(n)
    return {"total": int(total), "by_op": by_op}


def sdpa_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend))


KERNEL_CLASSES = [
    ("attention", re.compile(r"flash|fmha|attention|attn|softmax", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("normalisation", re.compile(r"norm", re.I)),
    ("matmul/conv", re.compile(r"gemm|cutlass|xmma|conv|implicit|cudnn|sm90|sm80|cublas|wgmma|nvjet|"
                               r"dgrad|wgrad", re.I)),
]


def profile_step(v, steps: int = 2) -> dict:
    from torch.profiler import ProfilerActivity, profile

    measure.sync("cuda")
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            v.step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    classes: dict[str, float] = {}
    top: list[tuple[str, float]] = []
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None)
        if dev is None:
            dev = getattr(evt, "self_cuda_time_total", 0.0)
        if not dev or getattr(evt, "device_type", None) is not None and "CUDA" not in str(evt.device_type):
            continue
        name = evt.key
        cls = next((c for c, rx in KERNEL_CLASSES if rx.search(name)), "other element-wise")
        classes[cls] = classes.get(cls, 0.0) + dev / 1e6
        top.append((name, dev / 1e6))
    busy = sum(classes.values())
    top.sort(key=lambda x: -x[1])
    return {"wall_s": wall, "gpu_busy_s": busy, "gpu_idle_share": max(0.0, 1 - busy / wall),
            "by_class_s": classes, "top_kernels": [{"name": n[:120], "s": s} for n, s in top[:12]]}


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    dev = args.device
    cuda = dev == "cuda"
    peak = matmul_peak(args.matmul_size, dev)
    print(f"bf16 matmul {args.matmul_size}^3: {peak['flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    base = dict(model=args.model, device=dev, dtype=args.dtype, batch=args.batch,
                grad_checkpointing=args.grad_checkpointing)
    rows, errors, state = [], {}, {"flops": None, "prof": None}

    def save(final: bool) -> None:
        flops = state["flops"]
        for r in rows:
            if flops:
                r["tflops_per_s"] = flops["total"] / (r["median_ms"] / 1000) / 1e12
                r["mfu_pct"] = 100 * flops["total"] / (r["median_ms"] / 1000) / peak["flops_per_s"]
        md = render(args, peak, flops, rows, errors, state["prof"])
        if not final:
            md += f"\n\n(partial: {len(rows) + len(errors)} variants done)"
        payload = {"peak": peak, "flops": flops, "rows": rows, "errors": errors, "profile": state["prof"],
                   "objective": args.objective, "batch": args.batch, "model": args.model, "dtype": args.dtype,
                   "grad_checkpointing": args.grad_checkpointing, "complete": final,
                   "wall_s": time.perf_counter() - t_start}
        paths = measure.write_results(f"mfu-{args.model}", dev, payload, md, args.out_dir,
                                      title=f"MFU: {args.model} {args.objective}")
        if final:
            print(md, flush=True)
            print(f"wrote {paths[0]} and {paths[1]}", flush=True)

    for name in args.variants.split(","):
        overrides, backend = VARIANTS[name]
        elapsed = time.perf_counter() - t_start
        if args.budget_s is not None:
            need = args.compile_reserve_s if name in COMPILED else 20.0
            if elapsed + need > args.budget_s:
                errors[name] = f"skipped: time budget ({elapsed:.0f} s used of {args.budget_s:.0f})"
                continue
        spec = variants.Spec(**base, **overrides)
        measure.free_device_memory(dev)
        torch._dynamo.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        v = None
        try:
            t0 = time.perf_counter()
            v = variants.TrainerVariant(spec, args.objective)
            with sdpa_context(backend):
                for _ in range(args.warmup):
                    v.step()
                warm = time.perf_counter() - t0
                if state["flops"] is None and name not in COMPILED:
                    state["flops"] = count_flops(v)
                    print(f"step FLOPs: {state['flops']['total'] / 1e9:.1f} GFLOP", flush=True)
                times = [measure.timed(v.step, dev) for _ in range(args.steps)]
                if name == "fused_adam" and cuda and not args.no_profile:
                    state["prof"] = profile_step(v)
            ms = measure.median_ms(times)
            rows.append({"variant": name, "median_ms": ms, "build_and_warmup_s": warm,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                         "optimizer": v.optimizer_desc})
            print(f"{name}: {ms:.1f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            errors[name] = ("out of memory: " if measure.is_oom(e) else "") + repr(e)[:400]
            print(f"{name}: failed {errors[name]}", flush=True)
        finally:
            if v is not None:
                v.close()
            del v
        save(final=False)
    save(final=True)


def render(args, peak, flops, rows, errors, prof) -> str:
    cols = [("variant", "variant"), ("median_ms", "step ms"), ("tflops_per_s", "achieved TFLOP/s"),
            ("mfu_pct", "MFU %"), ("peak_gib", "peak GiB"), ("build_and_warmup_s", "build+warm-up s"),
            ("optimizer", "optimizer")]
    out = [f"{args.model} UNet (random init), {args.objective}, {args.batch} pairs ({2 * args.batch} images "
           f"per forward), {args.dtype}, gradient checkpointing {args.grad_checkpointing}; "
           f"{args.steps} timed steps after {args.warmup} warm-up.", "",
           f"Peak: bf16 matmul {peak['n']}^3 median {peak['median_s'] * 1000:.2f} ms = "
           f"{peak['flops_per_s'] / 1e12:.1f} TFLOP/s."]
    if flops:
        total = flops["total"]
        out.append(f"Counted FLOPs per step: {total / 1e9:.1f} GFLOP "
                   f"({total / 1e9 / (2 * args.batch):.1f} GFLOP per image, reference forward included "
                   "if any).")
        top = sorted(flops["by_op"].items(), key=lambda kv: -kv[1])[:6]
        shares = [f"{k.replace('aten.', '')} {100 * n / total:.0f}%" for k, n in top]
        out.append("By op: " + ", ".join(shares) + ".")
    out += ["", measure.markdown_table(rows, cols), ""]
    for name, why in errors.items():
        out.append(f"- `{name}`: {why}")
    if prof:
        busy = prof["gpu_busy_s"]
        parts = ", ".join(f"{k} {100 * s / busy:.0f}%" for k, s in sorted(prof["by_class_s"].items(),
                                                                         key=lambda kv: -kv[1]))
        out += ["", f"Profile of 2 steps (fused_adam variant): GPU kernels busy {busy * 1000:.0f} ms of "
                    f"{prof['wall_s'] * 1000:.0f} ms wall (idle {100 * prof['gpu_idle_share']:.0f}%); "
                    f"kernel time: {parts}."]
    out += ["", "What limits MFU: only matmul/conv/attention FLOPs are counted, so time in GroupNorm, SiLU, "
                "residual adds, casts under autocast and the AdamW update (memory-bound kernels) and GPU "
                "idle time between kernel launches all lower it; the profile shares above say how much of "
                "each."]
    return "\n".join(out)


if __name__ == "__main__":
    main()
