"""Convert a released HPSv2 or ImageReward checkpoint into the folder its scorer loads.

    python recipes/convert_scorer.py --kind hpsv2 --checkpoint HPS_v2.1_compressed.pt --out /models/hpsv2 \
        --processor /models/CLIP-ViT-H-14-laion2B-s32B-b79K
    python recipes/convert_scorer.py --kind imagereward --checkpoint ImageReward.pt \
        --out /models/imagereward --processor /models/blip-itm-large-coco

then `--set eval.scorers=hpsv2:/models/hpsv2,imagereward:/models/imagereward`. HPSv2 (an open_clip
ViT-H-14 state dict) becomes a transformers CLIPModel folder; without --processor the scorer uses the
CLIP-ViT-H-14-laion2B processor (its tokenizer and preprocessing are HPSv2's). ImageReward (BLIP in the
salesforce layout + MLP head) becomes a BlipForImageTextRetrieval folder + mlp.safetensors, and needs
--processor: a local BlipProcessor folder (a bert-base-uncased tokenizer; its image size is set to the
model's 224 px). Every checkpoint key is mapped or the conversion fails naming the keys. --verify loads
the written folder with the scorer and scores one image. Exit status 2: the checkpoint is not the
released layout (the message names the keys).
"""

from __future__ import annotations

import argparse
import json
import sys

_DTYPES = ("float32", "float16", "bfloat16")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=("hpsv2", "imagereward"))
    parser.add_argument("--checkpoint", required=True, help="the released .pt file")
    parser.add_argument("--out", required=True, help="folder to write (created)")
    parser.add_argument("--processor", default=None,
                        help="processor folder copied into --out: a CLIPProcessor for hpsv2 (optional), a "
                             "BlipProcessor for imagereward (required)")
    parser.add_argument("--vision-heads", type=int, default=None,
                        help="attention heads of the vision tower (default: the release's, 16)")
    parser.add_argument("--text-heads", type=int, default=None,
                        help="attention heads of the text tower (default: the release's: HPSv2 16, "
                             "ImageReward 12)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="cast the weights (default: as released)")
    parser.add_argument("--verify", action="store_true",
                        help="load the written folder with the scorer and score one blank image")
    args = parser.parse_args(argv)
    if args.kind == "imagereward" and args.processor is None:
        parser.error("--kind imagereward needs --processor: the ImageReward scorer loads its BlipProcessor "
                     "from the converted folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    from diffalign.eval.convert import (
        HPSV2_HEADS,
        IMAGEREWARD_HEADS,
        RECORD_FILE,
        ConversionError,
        convert_checkpoint,
    )

    default = HPSV2_HEADS if args.kind == "hpsv2" else IMAGEREWARD_HEADS
    heads = (args.vision_heads or default[0], args.text_heads or default[1])
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        out = convert_checkpoint(args.kind, args.checkpoint, args.out, processor=args.processor, heads=heads,
                                 dtype=dtype)
    except (ConversionError, FileNotFoundError) as e:
        print(f"convert_scorer: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    print((out / RECORD_FILE).read_text(), end="")
    if args.verify:
        from diffalign.eval import build_scorer
        from PIL import Image

        scorer = build_scorer(args.kind, out)
        score = scorer.score([Image.new("RGB", (256, 256), (128, 128, 128))], ["a photo"])
        print(json.dumps({"verify": {"scorer": args.kind, "score": float(score[0])}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
