"""Beta sweep on the tiny flow models: held-out implicit accuracy of DPO and MaPO per beta and family.

Nothing is published for DPO on FLUX.1 / Qwen-Image or for MaPO on any flow model
(docs/flow_models.md, "Units, and what they mean for beta"); this is the measurement the tiny configs
and the docs cite. Task and budget are the learning tests' (tests/test_learning.py): pairs whose chosen
image is redder than its rejected one at overlapping redness levels (`RednessContrastPairs`: imitation
ranks held-out pairs at chance), the tiny model fully fine-tuned, AdamW lr 5e-4, 8 pairs per step,
40 steps over 32 pairs, 64 held-out pairs. The measure is `heldout/implicit_acc` (the policy against
the initial model on fixed noise and timesteps; 0.5 before training), with SFT as the baseline row.

    python benchmarks/flow_beta_sweep.py                          # every family, the default grid
    python benchmarks/flow_beta_sweep.py --families flux --dpo-betas 1000,5000 --mapo-betas 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

FAMILIES = ("sd3", "flux", "qwenimage")
STEPS, LR, TRAIN_PAIRS, HELDOUT_PAIRS = 40, 5e-4, 32, 64
MAPO_OMEGA = 100.0  # margin weight = 100 / beta, as objectives/mapo.py derives it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--dpo-betas", default="500,1000,5000")
    p.add_argument("--mapo-betas", default="8,64,1024")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    return p.parse_args(argv)


def _run(family: str, overrides: list[str], steps: int, seed: int, out: Path) -> dict:
    from diffalign.config import load_config
    from diffalign.data.synthetic import RednessContrastPairs
    from diffalign.train.driver import build_trainer

    cfg = load_config(None, [
        f"model.family={family}", "model.finetune=full", f"train.max_steps={steps}", f"optim.lr={LR}",
        f"train.seed={seed}", "optim.batch_size=8", "train.eval_every=1000", "train.progress=false",
        "tracking.mlflow=false", "guard.enabled=false", "train.resume=false",
        f"train.output_dir={out}", *overrides])
    res = cfg.model.resolution
    trainer = build_trainer(cfg, train_data=RednessContrastPairs(TRAIN_PAIRS, res, seed=seed),
                            heldout_data=RednessContrastPairs(HELDOUT_PAIRS, res, seed=seed + 7919))
    t0 = time.perf_counter()
    summary = trainer.fit()
    return {"heldout_implicit_acc": summary["heldout/implicit_acc"], "final_loss": summary["loss"],
            "heldout_margin": summary["heldout/margin_mean"], "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the numbers do not depend on the machine's core count
    families = [f for f in args.families.split(",") if f]
    grid = [("sft", None, ["objective.name=sft", "reference.strategy=none"])]
    grid += [("dpo", float(b), ["objective.name=dpo", f"objective.beta={b}", "reference.strategy=frozen"])
             for b in args.dpo_betas.split(",") if b]
    grid += [("mapo", float(b), ["objective.name=mapo", f"objective.beta={b}", "reference.strategy=none",
                                 f"objective.margin_weight={MAPO_OMEGA / float(b)}"])
             for b in args.mapo_betas.split(",") if b]
    rows = []
    scratch = Path(measure.RESULTS_DIR if args.out_dir is None else args.out_dir) / ".flow_beta_sweep"
    for family in families:
        for objective, beta, overrides in grid:
            row = {"family": family, "objective": objective, "beta": beta,
                   **_run(family, overrides, args.steps, args.seed, scratch / f"{family}-{objective}-{beta}")}
            rows.append(row)
            shown = "-" if beta is None else f"{beta:g}"
            print(f"{family:10s} {objective:5s} beta {shown:>7} held-out implicit acc "
                  f"{row['heldout_implicit_acc']:.3f} ({row['seconds']:.1f} s)", flush=True)
    lines = ["| family | objective | beta | held-out implicit acc | final loss |", "|---|---|---|---|---|"]
    for r in rows:
        beta = "-" if r["beta"] is None else f"{r['beta']:g}"
        lines.append(f"| {r['family']} | {r['objective']} | {beta} | {r['heldout_implicit_acc']:.3f} | "
                     f"{r['final_loss']:.4f} |")
    md = "\n".join([f"{args.steps} steps, lr {LR}, seed {args.seed}, RednessContrastPairs "
                    f"({TRAIN_PAIRS} train / {HELDOUT_PAIRS} held out); MaPO margin weight 100 / beta.", "",
                    *lines])
    print("\n" + md)
    paths = measure.write_results("flow_beta_sweep", "cpu", {"rows": rows, "steps": args.steps, "lr": LR},
                                  md, args.out_dir, title="Beta sweep on the tiny flow models")
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
