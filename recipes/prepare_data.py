"""Prepare a pair store once per dataset x model on Ray Data: validated pairs, VAE latents, prompt embeddings.

    python -m diffalign.data.demo_files runs/tiny-pickapic/data/train-00000-of-00001.parquet --pairs 48
    python recipes/prepare_data.py --config configs/tiny/prepare.yaml
    python recipes/prepare_data.py --config configs/sdxl/prepare.yaml --set prepare.output=s3://bucket/stores/x
    ray job submit -- python recipes/prepare_data.py --config configs/sd15/prepare.yaml

The source is the data section (data.kind / path / split / max_samples / on_error, center_crop,
random_flip), the encoders the model section; the store goes to prepare.output (a folder or a URI).
A killed or failed prepare resumes: run the same command again. Train on the store with
`--set data.kind=store --set data.path=<prepare.output>` and the same model and data sections.
"""

from __future__ import annotations

import json
import sys

from _common import parse_args


def main() -> None:
    _, cfg = parse_args(__doc__.splitlines()[0], "configs/tiny/prepare.yaml")
    if not cfg.prepare.output:
        print("invalid config: prepare.output is required (the store root: a folder or a URI, e.g. "
              "--set prepare.output=runs/store)", file=sys.stderr)
        sys.exit(2)
    from diffalign.actors.prepare import prepare_store
    from diffalign.data.issues import DataError
    from diffalign.data.store import StoreError

    try:
        manifest = prepare_store(cfg)
    except (DataError, StoreError) as e:
        print(f"prepare failed: {e}", file=sys.stderr)
        sys.exit(1)
    run, store = manifest["run"], cfg.prepare.output
    dropped = manifest["dropped"]
    print(f"pair store: {store}")
    print(f"pairs: {manifest['pairs']} of {manifest['rows']} source rows in {len(manifest['shards'])} shards "
          f"({run['shards_made']} made, {run['shards_reused']} reused), "
          f"{manifest['prompts']} prompts embedded")
    print("dropped: " + (", ".join(f"{k} {n}" for k, n in dropped.items()) if dropped else "nothing")
          + f" (report: {run['report']})")
    print(f"time: {run['wall_s']:.1f} s, {run['pairs_per_s']:.2f} pairs/s")
    print(f"train on it with: --set data.kind=store --set data.path={store}")
    print(json.dumps({"store": store, "pairs": manifest["pairs"], "rows": manifest["rows"],
                      "dropped": dropped, "spec_digest": manifest["spec_digest"], **run}, default=str))


if __name__ == "__main__":
    main()
