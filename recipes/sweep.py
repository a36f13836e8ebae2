"""Ray Tune sweep (ASHA) over beta / eta / gamma / tau / delta; each trial a Ray Train run; best config saved.

Each trial fits `ray.num_learners` Ray Train learners; the Tuner logs one MLflow run per trial.

    python recipes/sweep.py --config configs/tiny/sweep.yaml
"""

from __future__ import annotations

import json

from _common import parse_args


def main() -> None:
    args, cfg = parse_args(__doc__.splitlines()[0], "configs/tiny/sweep.yaml")
    from diffalign.actors.sweep import run_sweep

    summary = run_sweep(cfg)
    print("best:", json.dumps(summary["best_params"]), f"{summary['metric']}={summary['best_metric']}")
    print(f"all trials: {summary['num_trials']}; saved to {cfg.train.output_dir}/best.json")


if __name__ == "__main__":
    main()
