"""Tiny random scorer checkpoints, built offline, for tests and CPU demos.

Each ``save_tiny_*`` writes a directory in exactly the format the matching scorer's ``from_pretrained``
reads (model config + weights, tokenizer, image processor, MLP head), so tests exercise the real
loading code. The weights are random: scores are meaningless but finite and input-dependent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffalign.models.reward_heads import AESTHETIC_HEAD, IMAGEREWARD_HEAD, RewardMLP
from diffalign.models.tiny.tokenizer import write_tiny_bert_tokenizer, write_tiny_clip_tokenizer

PathLike = str | os.PathLike[str]

TINY_IMAGE_SIZE = 32
TINY_HIDDEN = 32
TINY_PROJECTION = 16
TINY_HEAD_HIDDEN = (64, 32, 16, 8)
# OpenAI CLIP normalisation, which ImageReward and the aesthetic predictor also use.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


def _out_dir(path: PathLike) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Fork the RNG so building a tiny model never disturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def save_tiny_clip(path: PathLike, seed: int = 0, image_size: int = TINY_IMAGE_SIZE) -> Path:
    """A random 2-layer CLIPModel + CLIPProcessor; the layout of PickScore / CLIP / converted HPSv2."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = _out_dir(path)
    tok = write_tiny_clip_tokenizer(out)
    text = dict(
        vocab_size=len(tok),
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        image_size=image_size,
        patch_size=8,
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_PROJECTION)
    with _seeded(seed):
        model = CLIPModel(config).eval()
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)
    return out


def save_head(
    path: PathLike, input_size: int, seed: int = 0, hidden: tuple[int, ...] = TINY_HEAD_HIDDEN
) -> Path:
    """A random ``RewardMLP`` saved as safetensors (``layers.{0,2,4,6,7}.*``)."""
    with _seeded(seed + 1):
        head = RewardMLP(input_size, hidden)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(p))
    return p


def save_tiny_aesthetic(path: PathLike, seed: int = 0) -> Path:
    """Tiny CLIP + ``aesthetic_mlp.safetensors`` over its projection dim."""
    out = save_tiny_clip(path, seed=seed)
    save_head(out / AESTHETIC_HEAD, TINY_PROJECTION, seed=seed)
    return out


def save_tiny_imagereward(path: PathLike, seed: int = 0, image_size: int = TINY_IMAGE_SIZE) -> Path:
    """A random BlipForImageTextRetrieval + BlipProcessor (BertTokenizer) + ``mlp.safetensors``."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    out = _out_dir(path)
    tok = write_tiny_bert_tokenizer(out)
    text = dict(
        vocab_size=len(tok),
        hidden_size=TINY_HIDDEN,
        encoder_hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        projection_dim=TINY_PROJECTION,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
    )
    # BlipVisionConfig's default initializer_range is 1e-10, which would make a random model ignore its input.
    vision = dict(
        image_size=image_size,
        patch_size=8,
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        projection_dim=TINY_PROJECTION,
        num_hidden_layers=2,
        num_attention_heads=2,
        initializer_range=0.02,
    )
    config = BlipConfig(
        text_config=text, vision_config=vision, projection_dim=TINY_PROJECTION, image_text_hidden_size=16
    )
    with _seeded(seed):
        model = BlipForImageTextRetrieval(config).eval()
    model.save_pretrained(out)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=_CLIP_MEAN, image_std=_CLIP_STD
    )
    BlipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)
    save_head(out / IMAGEREWARD_HEAD, TINY_HIDDEN, seed=seed)
    return out


def save_tiny_dino(path: PathLike, seed: int = 0, image_size: int = TINY_IMAGE_SIZE) -> Path:
    """A random Dinov2Model + BitImageProcessor (DINOv2's processor class)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    out = _out_dir(path)
    config = Dinov2Config(
        image_size=image_size,
        patch_size=8,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
    )
    with _seeded(seed):
        model = Dinov2Model(config).eval()
    model.save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
    ).save_pretrained(out)
    return out


TINY_BUILDERS: dict[str, Callable[..., Path]] = {
    "pickscore": save_tiny_clip,
    "clip": save_tiny_clip,
    "hpsv2": save_tiny_clip,
    "aesthetic": save_tiny_aesthetic,
    "imagereward": save_tiny_imagereward,
    "dino": save_tiny_dino,
}


def save_tiny_scorer(name: str, path: PathLike, seed: int = 0) -> Path:
    """Write a tiny random checkpoint that ``build_scorer(name, path)`` loads."""
    key = name.strip().lower()
    if key not in TINY_BUILDERS:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(sorted(TINY_BUILDERS))}")
    return TINY_BUILDERS[key](path, seed=seed)
