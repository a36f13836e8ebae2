"""Largest per-GPU batch (pairs) that trains without running out of memory: MaPO vs DPO.

For each model size and objective one `Trainer` is built (full fine-tune, fp32 weights + bf16
autocast, gradient checkpointing, AdamW; DPO with its frozen reference copy colocated), then the
batch is grown by doubling until a step runs out of memory and narrowed by binary search. Each try
runs one full `Trainer.train_step` at that batch (the optimizer state already exists from the first
successful try, so one step reaches the steady-state peak); after an OOM the gradients are dropped
and `torch.cuda.empty_cache()` runs before the next try. Run with
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` to keep fragmentation after OOMs from lowering
the result (gpu_run.sh sets it).

    python benchmarks/max_batch.py --models sd15,sdxl --objectives mapo,dpo
"""

from __future__ import annotations

import argparse
import gc
import time

import fixtures
import measure
import torch
import variants


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--objectives", default="mapo,dpo")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--fused-adam", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--reference-dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="reference.dtype of DPO's reference copy (auto: bf16 under --dtype bf16 on CUDA)")
    p.add_argument("--start", default="sd15=32,sdxl=8,tiny=8", help="first batch tried after 1, per model")
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--precision", type=float, default=0.0,
                   help="stop the binary search once first-OOM - max-fitting <= precision * max-fitting "
                        "(0: exact)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop searching (keeping the bounds found so far) after this many seconds in all")
    p.add_argument("--out-dir", default=None)
    return p.parse_args(argv)


def try_batch(v, batch: int, device: str) -> tuple[bool, float | None, int | None]:
    """(fits, step seconds, peak bytes) of one train_step at `batch` pairs."""
    from diffalign.train.data_order import BatchOrder

    t = v.trainer
    t.order = BatchOrder(len(t.train_data), batch, t.cfg.train.seed)
    t.cfg.optim.batch_size = batch
    measure.free_device_memory(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ok = True
    try:
        dt = measure.timed(v.step, device)
    except Exception as e:  # noqa: BLE001
        if not measure.is_oom(e):
            raise
        ok, dt = False, None
    if not ok:
        t.engine.zero_grad()
        gc.collect()
        measure.free_device_memory(device)
        return False, None, None
    return True, dt, torch.cuda.max_memory_allocated() if cuda else None


def search(v, start: int, cap: int, device: str, deadline: float | None, log: list,
           precision: float = 0.0) -> dict:
    def attempt(b):
        ok, dt, peak = try_batch(v, b, device)
        log.append({"batch": b, "fits": ok, "step_s": dt, "peak_bytes": peak})
        print(f"  batch {b}: {'fits' if ok else 'OOM'}" + (f" ({dt:.2f} s)" if ok else ""), flush=True)
        return ok, dt, peak

    def out_of_time():
        return deadline is not None and time.perf_counter() > deadline

    best = None
    ok, dt, peak = attempt(1)  # also creates the optimizer state
    if not ok:
        return {"max_batch": 0, "first_oom": 1, "complete": True}
    best = (1, dt, peak)
    lo, hi = 1, None
    b = min(max(2, start), cap)  # doubling stops at the cap, which is tried itself
    while hi is None and b > lo:
        if out_of_time():
            break
        ok, dt, peak = attempt(b)
        if ok:
            lo, best = b, (b, dt, peak)
            b = min(2 * b, cap)
        else:
            hi = b

    def narrow_enough():
        return hi - lo <= max(1, int(precision * lo))

    while hi is not None and not narrow_enough() and not out_of_time():
        mid = (lo + hi) // 2
        ok, dt, peak = attempt(mid)
        if ok:
            lo, best = mid, (mid, dt, peak)
        else:
            hi = mid
    complete = hi is not None and narrow_enough()
    return {"max_batch": best[0], "step_s_at_max": best[1], "peak_bytes_at_max": best[2], "first_oom": hi,
            "complete": complete or (hi is None and lo == cap)}


def main(argv=None) -> None:
    args = parse_args(argv)
    starts = dict(kv.split("=") for kv in args.start.split(","))
    end = time.perf_counter() + args.budget_s if args.budget_s else None
    rows, logs, errors = [], {}, {}
    keys = [(m, o) for m in args.models.split(",") for o in args.objectives.split(",")]
    for n, (model, objective) in enumerate(keys):
        key = f"{model}/{objective}"
        print(f"{key}:", flush=True)
        deadline = None
        if end is not None:
            # each remaining search gets an equal share of what is left
            deadline = time.perf_counter() + (end - time.perf_counter()) / (len(keys) - n)
            if time.perf_counter() > end:
                errors[key] = "not run: time budget spent"
                continue
        spec = variants.Spec(model=model, device=args.device, dtype=args.dtype, batch=1,
                             grad_checkpointing=not args.no_grad_checkpointing, fused_adam=args.fused_adam,
                             reference_dtype=args.reference_dtype)
        v = None
        log: list = []
        try:
            measure.free_device_memory(args.device)
            v = variants.TrainerVariant(spec, objective)
            # enough cached-latent items for the largest batch tried
            v.trainer.train_data = fixtures.pair_items(model, args.max_batch)
            res = search(v, int(starts.get(model, 8)), args.max_batch, args.device, deadline, log,
                         args.precision)
            rows.append({"model": model, "objective": objective, **res})
        except Exception as e:  # noqa: BLE001
            errors[key] = repr(e)[:500]
        finally:
            logs[key] = log
            if v is not None:
                v.close()
            del v
            measure.free_device_memory(args.device)
        save(args, rows, logs, errors, final=False)
    save(args, rows, logs, errors, final=True)


def save(args, rows, logs, errors, final: bool) -> None:
    by = {(r["model"], r["objective"]): r for r in rows}
    ratios = {}
    for model in args.models.split(","):
        m, d = by.get((model, "mapo")), by.get((model, "dpo"))
        if m and d and d["max_batch"]:
            ratios[model] = m["max_batch"] / d["max_batch"]
    for r in rows:
        r["peak_gib"] = r["peak_bytes_at_max"] / 2**30 if r.get("peak_bytes_at_max") else None
        r["ms_at_max"] = 1000 * r["step_s_at_max"] if r.get("step_s_at_max") else None
        r["pairs_per_s_at_max"] = r["max_batch"] / r["step_s_at_max"] if r.get("step_s_at_max") else None
    cols = [("model", "model"), ("objective", "objective"), ("max_batch", "max pairs"),
            ("first_oom", "first OOM"), ("ms_at_max", "step ms at max"),
            ("pairs_per_s_at_max", "pairs/s at max"), ("peak_gib", "peak GiB"),
            ("complete", "search complete")]
    precision = "bf16 (fp32 weights + bf16 autocast)" if args.dtype == "bf16" else "fp32"
    ref_note = variants.reference_dtype_note(variants.Spec(device=args.device, dtype=args.dtype,
                                                           reference_dtype=args.reference_dtype))
    md = [f"Full fine-tune, {precision}, gradient checkpointing "
          f"{not args.no_grad_checkpointing}, AdamW ({args.fused_adam}); DPO keeps a frozen reference copy "
          f"on the same GPU ({ref_note}); one Trainer.train_step per try.", "",
          measure.markdown_table(rows, cols), ""]
    for model, r in ratios.items():
        md.append(f"- {model}: MaPO fits {r:.2f}x the pairs of DPO per GPU.")
    for key, why in errors.items():
        md.append(f"- `{key}` failed: {why}")
    if args.precision:
        md.append(f"- Search stops once first OOM - max pairs <= {args.precision:g} x max pairs: the true "
                  "limit lies between the two columns.")
    if not final:
        md.append(f"\n(partial: {len(rows)} searches done)")
    md = "\n".join(md)
    payload = {"rows": rows, "ratios": ratios, "errors": errors, "tries": logs, "dtype": args.dtype,
               "grad_checkpointing": not args.no_grad_checkpointing, "complete": final}
    paths = measure.write_results("max_batch", args.device, payload, md, args.out_dir,
                                  title="Largest batch per GPU")
    if final:
        print(md, flush=True)
        print(f"wrote {paths[0]} and {paths[1]}", flush=True)


if __name__ == "__main__":
    main()
