"""Build a Pick-Style / Pick-Safety preference dataset (MaPO) with the base model on Ray sampler actors.

captions -> context prompts (LLM: vLLM or transformers) -> chosen / rejected style prompts -> both images
from the same seed on `SamplerPool` actors (the model section, base weights) -> VLM judge -> a Pick-a-Pic
v2 style parquet (caption, jpg_0, jpg_1, label_0, seed, ...) and `<out>.summary.json` (kept / dropped).

    python recipes/build_pairs.py --config configs/tiny/build_pairs.yaml
    python recipes/build_pairs.py --config configs/sd15/build_pairs.yaml --set build.prompts=captions.txt
    ray job submit -- python recipes/build_pairs.py --config configs/tiny/build_pairs.yaml

The LLM and the judge run in this driver process (on a GPU cluster give the job one:
`ray job submit --entrypoint-num-gpus 1 -- ...`); the images come from `ray.sampler.num` actors. Train on
the result with `--set data.kind=pickapic --set data.path=OUT`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import parse_args


def model_path(name: str, kind: str, out_dir: Path) -> str:
    """`name` as given, or for "tiny" a random model built offline under out_dir (CPU demos, tests)."""
    if name != "tiny":
        return name
    from diffalign.models.tiny.language import save_tiny_lm, save_tiny_vlm

    return str((save_tiny_lm if kind == "llm" else save_tiny_vlm)(out_dir / f"tiny_{kind}"))


class PoolImages:
    """`build_pair_dataset`'s image generator: the sampler pool, `per_request` prompts per actor call."""

    def __init__(self, pool, per_request: int) -> None:
        self.pool, self.per_request = pool, per_request

    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        out = self.pool.request(prompts, seeds, max_per_request=self.per_request)
        if out["seeds"] != [int(s) for s in seeds]:  # the parquet records these seeds as the ones used
            raise RuntimeError(f"sampler returned seeds {out['seeds']} for {list(seeds)}")
        return out["images"]


def main() -> None:
    _, cfg = parse_args(__doc__.splitlines()[0], "configs/tiny/build_pairs.yaml")
    b, s = cfg.build, cfg.ray.sampler
    if s.num < 1:
        print(f"invalid config: ray.sampler.num must be >= 1 to generate images, got {s.num}",
              file=sys.stderr)
        sys.exit(2)
    from diffalign.actors.cluster import ensure_ray
    from diffalign.actors.sampler import SamplerPool
    from diffalign.curate import VLMJudge, build_pair_dataset, build_text_generator
    from diffalign.curate.llm import resolve_backend
    from diffalign.data.synthetic import PROMPTS
    from diffalign.specs import load_prompts

    out_dir = Path(cfg.train.output_dir)
    out = Path(b.out or out_dir / "pairs.parquet")
    captions = (load_prompts(b.prompts) if b.prompts else list(PROMPTS))[: b.max_prompts]
    backend = resolve_backend(b.backend)
    engine_kw = dict(b.vllm_kwargs) if backend == "vllm" else {}

    ensure_ray(cfg)
    pool = SamplerPool(cfg, output="pil")  # actors load the model while the LLM and the judge load here
    try:
        extractor = judge = None
        if b.llm:
            extractor = build_text_generator(backend, model_path(b.llm, "llm", out_dir), device=b.device,
                                             **engine_kw)
        if b.judge:
            judge = VLMJudge(model_path(b.judge, "judge", out_dir), backend=backend, device=b.device,
                             **engine_kw)
        # Dataset images come from the base model as loaded: no learner, no weight packet to sync.
        pool.use_base_weights(version=0)
        provenance = {
            "model": cfg.model.pretrained or f"tiny random {cfg.model.family} (seed {cfg.model.tiny_seed})",
            "resolution": cfg.model.resolution, "inference_steps": s.inference_steps,
            "guidance_scale": s.guidance_scale, "sampler_actors": s.num, "llm": b.llm, "judge": b.judge,
            "backend": backend, "prompts": b.prompts or "diffalign.data.synthetic.PROMPTS",
        }
        summary = build_pair_dataset(
            captions, b.preset, extractor, PoolImages(pool, b.images_per_request), judge, out, seed=b.seed,
            threshold=b.threshold, min_gap=b.min_gap, batch_size=b.batch_size,
            max_context_tokens=b.max_context_tokens, progress=cfg.train.progress, metadata=provenance,
        )
        speed = pool.pop_metrics().get("sampler_images_per_s", 0.0)
    finally:
        pool.shutdown()
    print(json.dumps(summary.to_dict(), indent=2))
    print(f"kept {summary.kept} of {summary.generated_pairs} pairs ({speed:.2f} images/s per actor) -> {out}")


if __name__ == "__main__":
    main()
