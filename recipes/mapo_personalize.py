r"""Online MaPO personalization: your subject images are the chosen set, on-policy samples from Ray
sampler actors (weights synced from the learner every k steps) are the rejected set. Writes LoRA
weights that plain diffusers loads with `pipe.load_lora_weights(...)` and a grid over held-out prompts.

    python recipes/mapo_personalize.py --config configs/tiny/mapo_personalize.yaml
    ray job submit --address http://127.0.0.1:8265 -- \
        python recipes/mapo_personalize.py --config configs/tiny/mapo_personalize.yaml
    # learners as Ray Train workers (the driver owns the sampler actors; each learner asks for its own
    # rejected samples):
    python recipes/mapo_personalize.py --config configs/tiny/mapo_personalize.yaml \
        --set ray.enabled=true --set ray.num_learners=2
"""

from __future__ import annotations

import io
import json

from _closing import print_closing_block
from _common import parse_args
from diffalign.data import uri

HELDOUT = ["{} on a sandy beach", "{} in a field of wildflowers", "{} in the snow",
           "{} next to a lantern at dusk"]


class HeldoutGrid:
    """Trainer callback: the final policy on held-out prompts, rendered before the samplers shut down;
    saved next to the weights (a local folder or a storage URI) and logged to the run's MLflow record."""

    def __init__(self, subject_prompt: str, out_dir: str) -> None:
        self.subject_prompt, self.out_dir = subject_prompt, out_dir

    @property
    def path(self) -> str:
        return uri.join(self.out_dir, "heldout_grid.png")

    def on_end(self, trainer, summary: dict) -> None:
        from diffalign.tracking import attached_tracker

        grid = trainer.sample_images([p.format(self.subject_prompt) for p in HELDOUT])
        png = io.BytesIO()
        grid.save(png, format="PNG")
        uri.write_bytes_atomic(self.path, png.getvalue())
        if (tracker := attached_tracker(trainer)) is not None:
            tracker.mlflow.log_image(grid, "samples/heldout_prompts.png")


class GridOnRankZero:
    """`callbacks_factory` for the Ray Train learners (pickled to every worker)."""

    def __init__(self, grid: HeldoutGrid) -> None:
        self.grid = grid

    def __call__(self, cfg, rank: int) -> list:
        return [self.grid] if rank == 0 else []


def main() -> None:
    args, cfg = parse_args(__doc__.splitlines()[0], "configs/tiny/mapo_personalize.yaml")
    grid = HeldoutGrid(cfg.data.prompt, cfg.train.output_dir)
    from diffalign.actors.cluster import ensure_ray
    from diffalign.actors.online import OnlineData

    if cfg.ray.enabled:  # N Ray Train learners, each running the same driver with OnlineData
        from diffalign.actors.learner import train_with_ray

        out = train_with_ray(cfg, callbacks_factory=GridOnRankZero(grid))
        summary = {**out["metrics"], "final_step": out["step"], "weights": out["weights"],
                   "mlflow_run_id": out["mlflow_run_id"], "checkpoint": out["checkpoint"]}
        uri.write_bytes_atomic(uri.join(cfg.train.output_dir, "summary.json"),
                               json.dumps(summary, indent=2, default=str).encode())
    else:  # the learner in this process, the samplers on Ray
        import torch
        from diffalign.train.driver import run

        ensure_ray(cfg)
        device = "cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu"
        summary = run(cfg, device=device, data=OnlineData(), callbacks=[grid])
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("bins/")}, indent=2, default=str))
    # Weights, how to load them, the held-out grid, how to look at the run.
    print_closing_block(cfg, summary, extra=(f"held-out grid: {grid.path}",))


if __name__ == "__main__":
    main()
