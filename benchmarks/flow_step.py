"""Training step time and peak memory of MaPO vs Diffusion-DPO on the rectified-flow transformers.

One row per (model, fine-tuning, objective), all at the same batch (`--pairs` preference pairs, i.e.
2 x pairs images): a random-init transformer built from the released model's config (no weights are
downloaded), bf16 autocast, gradient checkpointing (`--no-checkpointing` to leave it off), AdamW
(`diffalign.train.engine.build_optimizer`: fused where torch has it), gradient clipping at 1.0.

Models (`--size full`, 1024 px by default; `--size tiny`: toy configs of the same classes, 32 px, on CPU):
- `sd3`: SD3Transformer2DModel with the config of stabilityai/stable-diffusion-3.5-medium (24 MMDiT
  blocks of width 1536, dual attention in blocks 0-12, RMS qk-norm; 2.24B parameters plus a 0.23B
  positional-embedding buffer: the release's 2.5B). Text: the joint CLIP-L/G + T5 sequence,
  77 + 256 = 333 tokens x 4096, pooled 2048.
- `flux`: FluxTransformer2DModel with the config of black-forest-labs/FLUX.1-dev (19 double + 38 single
  blocks, width 3072, guidance embedding; ~12B parameters). Text: T5 512 x 4096, pooled CLIP 768;
  latents packed 2x2 into 64 channels with their image / text position ids; guidance 3.5.

Fine-tuning: `lora` (rank `--rank`, alpha = rank, on `diffalign.models.lora.lora_targets(model)`; the
frozen base stays fp32 as the platform keeps it), `full` (fp32 master weights, fp32 AdamW state: what
`model.finetune: full` trains), `full_bf16` (weights, gradients and AdamW state all bf16: no master copy,
half the memory of `full`; shown for what fits, not what the platform trains).

Step: per pair one noise and one noise level s (uniform timestep, SD3's static shift 3.0 via
`diffalign.timesteps.flow_sigmas`), x_s = (1 - s) x0 + s eps for [chosen; rejected], target
eps - x0, one policy forward over the 2 x pairs images, per-sample MSE in float32, the objective
(`diffalign.objectives.build_objective`) -> backward -> clip -> AdamW step. DPO adds a reference
forward under `no_grad`: the policy with its adapters disabled (LoRA) or a frozen bf16 copy of the
transformer (full fine-tuning; `reference.dtype: auto` on a GPU), as `diffalign.reference` runs it.

Timing: median (and quartiles) over `--steps` after `--warmup` untimed steps; each step ends with the
loss read back (what per-step logging does). Memory: on CUDA the peak allocated device memory of the row
(each row in a fresh process: `--isolate`, default on CUDA), on CPU the growth of the resident set
(approximate). A row that runs out of memory is written with status `oom` and the phase it failed in
(build, reference, step); one over `--row-timeout-s` with status `timeout`; rows that would start past
`--budget-s` with status `skipped`. Results are rewritten after every row, so a time-boxed run keeps
what it finished.

    python benchmarks/flow_step.py --size tiny                                # CPU, seconds
    python benchmarks/flow_step.py --size full --device cuda --pairs 1        # GPU (see gpu_flow_step.sh)
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import measure
import torch

BENCH = Path(__file__).resolve().parent
MODELS = ("sd3", "flux")
FINETUNES = ("lora", "full", "full_bf16")
OBJECTIVES = ("mapo", "dpo")
MIB = 2**20

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (random init here).
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev transformer/config.json (random init here).
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
CONFIGS: dict[tuple[str, str], dict] = {
    ("sd3", "full"): SD35_MEDIUM,
    ("flux", "full"): FLUX_DEV,
    ("sd3", "tiny"): dict(sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                          attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                          caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=16,
                          dual_attention_layers=(0,), qk_norm="rms_norm"),
    ("flux", "tiny"): dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                           pooled_projection_dim=16,
                           guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}
# (text tokens, text width, pooled width) of the conditioning each transformer is trained on.
TEXT: dict[tuple[str, str], tuple[int, int, int]] = {
    ("sd3", "full"): (77 + 256, 4096, 2048), ("flux", "full"): (512, 4096, 768),
    ("sd3", "tiny"): (12, 32, 16), ("flux", "tiny"): (8, 32, 16),
}
RESOLUTION = {"full": 1024, "tiny": 32}
FLUX_GUIDANCE = 3.5
SD3_SHIFT = 3.0


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", default="sd3,flux", help="comma list of sd3, flux (default %(default)s)")
    p.add_argument("--finetunes", default="lora,full,full_bf16", help="comma list of lora, full, full_bf16")
    p.add_argument("--objectives", default="mapo,dpo", help="comma list of mapo, dpo")
    p.add_argument("--pairs", type=int, default=1, help="preference pairs per step (default %(default)s)")
    p.add_argument("--resolution", type=int, default=None, help="image px (full 1024, tiny 32)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank; default %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default %(default)s)")
    p.add_argument("--no-checkpointing", action="store_true", help="leave gradient checkpointing off")
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="each row in a fresh process (auto: yes on CUDA, no on CPU)")
    p.add_argument("--row-timeout-s", type=float, default=120.0,
                   help="isolated rows: the longest one may run (default %(default)s)")
    p.add_argument("--budget-s", type=float, default=None, help="no row starts that could end past this")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU default 1)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one row, JSON spec; prints its row
    args = p.parse_args(argv)
    args.model_list = _choices(args.models, MODELS, "--models")
    args.finetune_list = _choices(args.finetunes, FINETUNES, "--finetunes")
    args.objective_list = _choices(args.objectives, OBJECTIVES, "--objectives")
    args.resolution = args.resolution or RESOLUTION[args.size]
    for name, value, low in (("--pairs", args.pairs, 1), ("--rank", args.rank, 1), ("--steps", args.steps, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if args.resolution % 16:
        p.error(f"--resolution must be a multiple of 16 (8x VAE, 2x2 patches), got {args.resolution}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.isolated = args.isolate == "yes" or (args.isolate == "auto" and args.device == "cuda")
    return args


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    got = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in got if x not in allowed]
    if bad or not got:
        raise SystemExit(f"{flag}: {bad or text!r} not among {', '.join(allowed)}")
    return list(dict.fromkeys(got))


# ----------------------------------------------------------------------------- models and batch


def build_transformer(model: str, size: str, resolution: int, device: torch.device,
                      dtype: torch.dtype) -> torch.nn.Module:
    """A random-init transformer built straight on `device` in `dtype` (no fp32 copy of a bf16 model)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cfg = dict(CONFIGS[(model, size)])
    if model == "sd3":
        cfg["sample_size"] = resolution // 8
    cls = SD3Transformer2DModel if model == "sd3" else FluxTransformer2DModel
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(**cfg)
    finally:
        torch.set_default_dtype(old)


def make_batch(model: str, size: str, pairs: int, resolution: int, device: torch.device,
               seed: int = 0) -> dict:
    """Random latents [chosen; rejected], one noise and noise level per pair, the pair's prompt embedding
    for both of its images, and FLUX's position ids."""
    from diffalign.timesteps import flow_sigmas

    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    tokens, width, pooled = TEXT[(model, size)]
    if model == "sd3":
        latent = (16, side, side)
    else:  # 16 latent channels packed 2x2 -> (tokens, 64)
        latent = ((side // 2) ** 2, 64)
    x0 = torch.randn(2 * pairs, *latent, generator=g)
    eps = torch.randn(pairs, *latent, generator=g).repeat(2, *[1] * len(latent))
    t = torch.randint(0, 1000, (pairs,), generator=g)
    sigma = flow_sigmas(1000, shift=SD3_SHIFT)[t].float().repeat(2)
    text = torch.randn(pairs, tokens, width, generator=g).repeat(2, 1, 1)
    pooled_emb = torch.randn(pairs, pooled, generator=g).repeat(2, 1)
    batch = dict(x0=x0, eps=eps, sigma=sigma, text=text, pooled=pooled_emb)
    if model == "flux":
        ids = torch.zeros(side // 2, side // 2, 3)
        ids[..., 1] = torch.arange(side // 2)[:, None]
        ids[..., 2] = torch.arange(side // 2)[None, :]
        batch.update(img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(tokens, 3),
                     guidance=torch.full((2 * pairs,), FLUX_GUIDANCE))
    return {k: v.to(device) for k, v in batch.items()}


def image_tokens(model: str, resolution: int) -> int:
    return (resolution // 16) ** 2  # 8x VAE, then 2x2 patches (SD3) or 2x2 packing (FLUX)


def predict(transformer: torch.nn.Module, model: str, noisy: torch.Tensor, batch: dict) -> torch.Tensor:
    """The velocity prediction, called as the family's pipeline calls its transformer."""
    if model == "sd3":
        return transformer(hidden_states=noisy, encoder_hidden_states=batch["text"],
                           pooled_projections=batch["pooled"], timestep=1000 * batch["sigma"],
                           return_dict=False)[0]
    return transformer(hidden_states=noisy, encoder_hidden_states=batch["text"],
                       pooled_projections=batch["pooled"],
                       timestep=batch["sigma"], guidance=batch["guidance"], img_ids=batch["img_ids"],
                       txt_ids=batch["txt_ids"], return_dict=False)[0]


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().flatten(1).mean(1)


# ----------------------------------------------------------------------------- one row


class Row:
    """One (model, fine-tuning, objective) variant: policy, optional reference, optimizer, batch."""

    def __init__(self, args: argparse.Namespace, model: str, finetune: str, objective: str) -> None:
        from diffalign.models.lora import add_lora, lora_targets
        from diffalign.objectives import build_objective, objective_needs_reference
        from diffalign.train.engine import build_optimizer

        self.model, self.finetune, self.device = model, finetune, torch.device(args.device)
        self.phase = "build"
        torch.manual_seed(0)
        dtype = torch.bfloat16 if finetune == "full_bf16" else torch.float32
        self.policy = build_transformer(model, args.size, args.resolution, self.device, dtype)
        self.params = sum(p.numel() for p in self.policy.parameters())
        if finetune == "lora":
            add_lora(self.policy, args.rank, args.rank, targets=lora_targets(model))
        else:
            self.policy.requires_grad_(True)
        if not args.no_checkpointing:
            self.policy.enable_gradient_checkpointing()
        self.policy.train()
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.objective = build_objective(objective)
        self.needs_ref = objective_needs_reference(objective)
        self.ref = None
        if self.needs_ref and finetune != "lora":
            self.phase = "reference"
            # reference.dtype auto: bf16 on a GPU, fp32 on CPU; built in that dtype, then loaded (cast).
            ref_dtype = torch.bfloat16 if self.device.type == "cuda" else dtype
            self.ref = build_transformer(model, args.size, args.resolution, self.device, ref_dtype)
            self.ref.load_state_dict(self.policy.state_dict())
            self.ref.requires_grad_(False)
            self.ref.eval()
        self.phase = "optimizer"
        opt_cfg = SimpleNamespace(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        self.optimizer = build_optimizer([{"params": self.trainable, "lr": 1e-6}], opt_cfg)
        self.batch = make_batch(model, args.size, args.pairs, args.resolution, self.device)
        self.phase = "step"
        self.last: dict[str, float] = {}

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def step(self) -> None:
        b = self.batch
        s = b["sigma"].view(-1, *[1] * (b["x0"].dim() - 1))
        noisy = (1 - s) * b["x0"] + s * b["eps"]
        target = b["eps"] - b["x0"]
        ref_w = ref_l = None
        if self.needs_ref:
            with torch.no_grad(), self._autocast():
                if self.ref is None:  # LoRA: the reference is the policy with its adapters off
                    self.policy.eval()
                    self.policy.disable_adapters()
                    try:
                        ref_pred = predict(self.policy, self.model, noisy, b)
                    finally:
                        self.policy.enable_adapters()
                        self.policy.train()
                else:
                    ref_pred = predict(self.ref, self.model, noisy, b)
            ref_w, ref_l = per_sample_mse(ref_pred, target).chunk(2)
        with self._autocast():
            pred = predict(self.policy, self.model, noisy, b)
        err_w, err_l = per_sample_mse(pred, target).chunk(2)
        out = self.objective(err_w, err_l, ref_w, ref_l)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last = {"loss": float(out.loss), "grad_norm": float(grad_norm)}  # the per-step log read-back


def run_row(args: argparse.Namespace, model: str, finetune: str, objective: str) -> dict:
    """Builds and steps one variant; an out-of-memory error becomes the row's status."""
    row: dict[str, Any] = {"model": model, "finetune": finetune, "objective": objective,
                           "pairs": args.pairs, "resolution": args.resolution,
                           "image_tokens": image_tokens(model, args.resolution),
                           "text_tokens": TEXT[(model, args.size)][0]}
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # noqa: F401 - imported before timing

    device = torch.device(args.device)
    measure.free_device_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        measure.release_freed_memory()
        base = measure.rss_bytes()
        measure.reset_peak_rss()
    t0 = time.perf_counter()
    holder: dict[str, Row] = {}
    phase = "build"
    try:
        holder["row"] = r = Row(args, model, finetune, objective)
        row.update(params=r.params, trainable_params=sum(p.numel() for p in r.trainable),
                   build_s=time.perf_counter() - t0)
        phase = "step"
        for _ in range(args.warmup):
            r.step()
        times = [measure.timed(r.step, device) for _ in range(args.steps)]
        q1, q3 = measure.iqr_ms(times)
        row.update(status="ok", median_ms=measure.median_ms(times), min_ms=1000 * min(times),
                   q1_ms=q1, q3_ms=q3,
                   steps=len(times), **r.last)
    except Exception as exc:  # noqa: BLE001 - every failure is a row status, the run goes on
        r = holder.get("row")
        where = r.phase if r is not None and phase == "build" else phase
        row.update(status="oom" if measure.is_oom(exc) else "error", phase=where,
                   error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    if device.type == "cuda":
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / MIB
    else:
        row["peak_mib"] = max(0, measure.peak_rss_bytes() - base) / MIB
    row["wall_s"] = time.perf_counter() - t0
    holder.clear()
    measure.free_device_memory(device)
    return row


# ----------------------------------------------------------------------------- driver


def run_isolated(args: argparse.Namespace, argv: list[str], spec: dict) -> dict:
    child = [str(BENCH / "flow_step.py"), *argv, "--child", json.dumps(spec)]
    try:
        got = measure.run_child(child, timeout=args.row_timeout_s)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "error": f"over --row-timeout-s {args.row_timeout_s:g}"}
    if "error" in got and "status" not in got:  # the child died (killed for memory, crashed)
        return {**spec, "status": "error", **got}
    return got


def ratios(rows: list[dict]) -> list[dict]:
    """DPO over MaPO, time and peak memory, per model and fine-tuning (both rows ok)."""
    ok = {(r["model"], r["finetune"], r["objective"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for (model, finetune, objective), dpo in ok.items():
        mapo = ok.get((model, finetune, "mapo"))
        if objective == "dpo" and mapo:
            memory = dpo["peak_mib"] / mapo["peak_mib"] if mapo["peak_mib"] > 0 else None
            out.append({"model": model, "finetune": finetune, "memory_dpo_over_mapo": memory,
                        "time_dpo_over_mapo": dpo["median_ms"] / mapo["median_ms"]})
    return out


def write(args: argparse.Namespace, rows: list[dict], t_start: float, partial: bool) -> None:
    cols = [("model", "model"), ("finetune", "fine-tune"), ("objective", "objective"), ("status", "status"),
            ("params_m", "params M", 1), ("trainable_m", "trainable M", 2), ("median_ms", "median ms", 1),
            ("q1_ms", "q1 ms", 1), ("q3_ms", "q3 ms", 1), ("peak_gib", "peak GiB", 2),
            ("build_s", "build s", 1)]
    table = []
    for r in rows:
        t = dict(r)
        if "params" in r:
            t.update(params_m=r["params"] / 1e6, trainable_m=r["trainable_params"] / 1e6)
        if "peak_mib" in r:
            t["peak_gib"] = r["peak_mib"] / 1024
        if r.get("status") not in (None, "ok"):
            t["status"] = f"{r['status']}" + (f" ({r['phase']})" if r.get("phase") else "")
        table.append(t)
    rat = ratios(rows)
    ckpt = "off" if args.no_checkpointing else "on"
    mem = ("peak allocated CUDA memory of the row (fresh process)" if args.device == "cuda"
           else "resident-set growth of the row (approximate)")
    md = [f"`--size {args.size}` on {args.device.upper()}: {args.pairs} pair(s) per step "
          f"({2 * args.pairs} images), {args.resolution} px, bf16 autocast, gradient checkpointing {ckpt}, "
          f"LoRA rank {args.rank}; median of "
          f"{args.steps} steps after {args.warmup} warm-up; memory: {mem}.", "",
          measure.markdown_table(table, cols), "",
          "- full: fp32 master weights and AdamW state; full_bf16: bf16 weights, gradients and AdamW state; "
          "lora: frozen fp32 base. DPO's reference: the policy with adapters off (LoRA) or a frozen bf16 "
          "copy (full, on a GPU; fp32 on CPU)."]
    if rat:
        md += ["", "| model | fine-tune | DPO / MaPO time | DPO / MaPO peak memory |", "|---|---|---|---|"]
        md += [f"| {x['model']} | {x['finetune']} | {x['time_dpo_over_mapo']:.2f} | "
               f"{measure.fmt(x['memory_dpo_over_mapo'], 2)} |" for x in rat]
    failed = [r for r in rows if r.get("status") not in ("ok", None) and r.get("error")]
    if failed:
        md += ["", "Rows that did not run: " + "; ".join(
            f"{r['model']} {r['finetune']} {r['objective']}: {r['error']}" for r in failed) + "."]
    md = "\n".join(md)
    if not partial:
        print(md, flush=True)
    payload = {"size": args.size, "pairs": args.pairs, "resolution": args.resolution, "rank": args.rank,
               "steps": args.steps, "warmup": args.warmup,
               "gradient_checkpointing": not args.no_checkpointing, "isolated": args.isolated, "rows": rows,
               "ratios": rat, "wall_s": time.perf_counter() - t_start,
               "partial": partial}
    paths = measure.write_results("flow_step", args.device, payload, md, args.out_dir,
                                  title="Flow transformer training step: MaPO vs Diffusion-DPO")
    if not partial:
        print(f"wrote {paths[0]} and {paths[1]}", flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    measure.set_threads(args.threads, args.device)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_row(args, spec["model"], spec["finetune"], spec["objective"]), default=float),
              flush=True)
        return
    signal.signal(signal.SIGTERM, _terminate)
    child_argv = [a for a in argv if a != "--child"]
    t_start = time.perf_counter()
    rows: list[dict] = []
    # Fine-tuning kind first: in a time-boxed run the LoRA rows of every model come before full fine-tuning.
    specs = [{"model": m, "finetune": f, "objective": o}
             for f in args.finetune_list for m in args.model_list for o in args.objective_list]
    # Each row's own cost is unknown up front: a row starts only if the longest it may take still fits.
    row_cost = args.row_timeout_s if args.isolated else 0.0
    if not args.isolated:
        # One throwaway step first, so that lazily loaded libraries and kernels are resident before the
        # first measured row (in-process rows share one resident set).
        run_row(argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0}), **specs[0])
    try:
        for spec in specs:
            left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t_start)
            if left is not None and left < max(row_cost, 1.0):
                rows.append({**spec, "status": "skipped", "error": f"{left:.0f} s of --budget-s left"})
                continue
            row = (run_isolated(args, child_argv, spec) if args.isolated
                   else run_row(args, spec["model"], spec["finetune"], spec["objective"]))
            rows.append(row)
            ok = row.get("status") == "ok"
            shown = (f"{row['median_ms']:.1f} ms, peak {row['peak_mib'] / 1024:.2f} GiB" if ok
                     else f"{row.get('status')}: {row.get('error', '')}")
            print(f"[flow_step] {spec['model']} {spec['finetune']} {spec['objective']}: {shown} "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
            write(args, rows, t_start, partial=True)
    finally:
        gc.collect()
    write(args, rows, t_start, partial=False)


if __name__ == "__main__":
    sys.exit(main())

