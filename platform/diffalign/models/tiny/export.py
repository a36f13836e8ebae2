"""Writes the tiny random models to disk: the base model the tiny configs train (a diffusers pipeline
folder) and every reward scorer / embedder (each in the layout its loader reads). For CPU demos of the
recipes that need a model path: evaluation (`eval.scorers`), the reference-mismatch probe
(`data.mismatch_probe`), periodic scores (`tracking.scorers`), and loading trained weights in diffusers.

    python -m diffalign.models.tiny.export --out runs/tiny-assets

writes runs/tiny-assets/sd15 (the base model of the tiny configs: `model.tiny_seed` 0, 32 px) and
runs/tiny-assets/{clip,pickscore,hpsv2,aesthetic,imagereward,dino}; `--family sd3,flux,qwenimage` (any of
sd15, sdxl, sd3, flux, qwenimage) writes those base models too. The weights are random: scores are
finite and input-dependent but meaningless. Rerunning it rewrites the same files (same seeds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.models.families import FAMILIES
from diffalign.models.tiny.scorers import TINY_BUILDERS, save_tiny_scorer

__all__ = ["FAMILIES", "export_all", "export_base", "main"]


def export_base(out: str | Path, family: str = "sd15", seed: int = 0, resolution: int = 32) -> Path:
    """The tiny base model as a diffusers pipeline folder `<out>/<family>` (what `model.pretrained`,
    `StableDiffusionPipeline.from_pretrained` and `model.pretrained=null` with the same seed agree on)."""
    from diffalign.models.tiny.diffusion import build_tiny_bundle

    path = Path(out) / family
    build_tiny_bundle(family, seed=seed, resolution=resolution).save_pretrained(path)
    return path


def export_all(out: str | Path, families: tuple[str, ...] = ("sd15",), scorers: tuple[str, ...] | None = None,
               seed: int = 0) -> dict[str, Path]:
    """Every requested base model and scorer under `out`; returns {name: folder}."""
    written = {family: export_base(out, family, seed=seed) for family in families}
    for i, name in enumerate(scorers if scorers is not None else tuple(TINY_BUILDERS)):
        # Each scorer its own seed, so two scorers of the same family are not one model twice.
        written[name] = save_tiny_scorer(name, Path(out) / name, seed=seed + i)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/tiny-assets", help="folder to write into (default: %(default)s)")
    p.add_argument("--family", default="sd15", help=f"comma-separated base models of {', '.join(FAMILIES)}")
    p.add_argument("--scorers", default=",".join(TINY_BUILDERS),
                   help="comma-separated scorers (default: all); empty for none")
    p.add_argument("--seed", type=int, default=0, help="model.tiny_seed of the base model (default: 0)")
    a = p.parse_args(argv)
    families = tuple(f.strip() for f in a.family.split(",") if f.strip())
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        p.error(f"--family: unknown {', '.join(bad)}; choose from {', '.join(FAMILIES)}")
    scorers = tuple(s.strip().lower() for s in a.scorers.split(",") if s.strip())
    bad = [s for s in scorers if s not in TINY_BUILDERS]
    if bad:
        p.error(f"--scorers: unknown {', '.join(bad)}; choose from {', '.join(TINY_BUILDERS)}")
    written = export_all(a.out, families, scorers, seed=a.seed)
    for name, path in written.items():
        print(f"{name:12s} {path}")
    spec = ",".join(f"{n}:{written[n]}" for n in scorers if n != "dino")
    if spec:
        print(f"evaluate with: --set eval.scorers={spec}")
    embedder = written.get("dino", written.get("clip"))
    if embedder is not None:
        print(f"reference-mismatch probe: --set data.mismatch_probe={embedder}")
    for family in families:
        print(f"train from the saved base model: --set model.family={family} "
              f"--set model.pretrained={written[family]}")


if __name__ == "__main__":
    main()
