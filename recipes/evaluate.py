r"""Evaluate trained weights against the base model: seed-matched samples, reward scores, win rates.

Every option is a field of the config's eval section (see configs/tiny/evaluate.yaml), set in the YAML
or with --set:

    python recipes/evaluate.py --config configs/tiny/dpo.yaml --set eval.weights=runs/tiny-dpo/unet \
        --set eval.scorers=clip:/models/clip,pickscore:/models/pickscore --set eval.seeds=0,1 \
        --set eval.out=runs/tiny-dpo/eval
    python recipes/evaluate.py --config configs/sd15/dpo.yaml --set eval.weights=runs/sd15-dpo/lora \
        --set eval.prompts=parti-prompts.tsv \
        --set eval.scorers=pickscore,hpsv2:/models/hpsv2,aesthetic:/models/aesthetic
    python recipes/evaluate.py --config configs/tiny/mapo.yaml --set eval.probe_only=true \
        --set data.mismatch_probe=/models/dinov2-base --set data.mismatch_probe_n=16

eval.prompts: a .txt file (one per line), a Pick-a-Pic parquet (caption), PartiPrompts .tsv (Prompt) or
an HPDv2 .json list; unset, the tiny synthetic prompts are used. eval.probe_only only measures how far
the config's dataset (chosen images) is from the base model's samples, with the data.mismatch_probe
embedder on data.mismatch_probe_n pairs, before any training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import parse_args


def main() -> None:
    _, cfg = parse_args(__doc__.splitlines()[0], "configs/tiny/evaluate.yaml")
    e = cfg.eval
    out = Path(e.out or Path(cfg.train.output_dir) / "eval")
    if e.probe_only:
        from diffalign.eval.probe import mismatch_probe
        from diffalign.train.setup import build_datasets

        dataset, _ = build_datasets(cfg)
        result = mismatch_probe(cfg, dataset, cfg.data.mismatch_probe, n=cfg.data.mismatch_probe_n,
                                steps=e.steps, guidance_scale=e.guidance_scale, batch_size=e.batch_size,
                                device=e.device)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mismatch.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        print(result["note"])
        return
    missing = [name for name, value in (("eval.weights", e.weights), ("eval.scorers", e.scorers))
               if not value]
    if missing:
        print(f"{' and '.join(missing)} must be set, e.g. --set eval.weights=runs/tiny-mapo/unet "
              "--set eval.scorers=clip:/models/clip (or --set eval.probe_only=true with "
              "data.mismatch_probe to only run the reference-mismatch probe); tiny random scorers for a "
              "CPU demo: python -m diffalign.models.tiny.export --out runs/tiny-assets", file=sys.stderr)
        sys.exit(2)
    from diffalign.data.synthetic import PROMPTS
    from diffalign.eval.harness import evaluate_policy

    prompts = e.prompts or list(PROMPTS)
    result = evaluate_policy(cfg, e.weights, prompts, e.seeds, e.scorers, out, e.references,
                             steps=e.steps, guidance_scale=e.guidance_scale, batch_size=e.batch_size,
                             device=e.device, max_prompts=e.max_prompts, grid_prompts=e.grid_prompts,
                             save_images=e.save_images)
    print(Path(result["files"]["markdown"]).read_text())
    print(f"written to {out}")


if __name__ == "__main__":
    main()
