"""The CLIP-based scorers: PickScore, CLIP score, HPSv2 (cosine of text and image embeddings, scaled)
and the LAION aesthetic predictor (an MLP on the image embedding). All load a transformers
``CLIPModel`` and its processor through one ``from_pretrained``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from diffalign.eval.base import Scorer
from diffalign.eval.embedding import ImageEmbedding, batches, pooled
from diffalign.eval.loading import has_processor, load_pretrained, reject_raw_checkpoint
from diffalign.models.reward_heads import AESTHETIC_HEAD, RewardMLP, load_head_state_dict
from diffalign.specs import resolve_path

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# PickScore ships without a processor; its README pairs it with the CLIP-H processor it was tuned from.
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"
# HPSv2 is an open_clip ViT-H-14 fine-tune, so it shares this model's preprocessing and tokenizer.
HPSV2_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"

_S = TypeVar("_S", bound="_ClipScorer")


class _ClipScorer(Scorer, ImageEmbedding):
    """Shared CLIP plumbing: normalised image and text embeddings, and loading.

    A subclass names its default release (``DEFAULT_MODEL``, ``DEFAULT_PROCESSOR``; None: a path is
    required) and, when its release is not a transformers checkpoint, what a path must hold
    (``EXPECTED``), so original-format files are refused with that message.
    """

    DEFAULT_MODEL: str | None = None
    DEFAULT_PROCESSOR: str | None = None
    EXPECTED: str | None = None

    def __init__(self, model: nn.Module, processor: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.image_processor = processor.image_processor

    @classmethod
    def from_pretrained(
        cls: type[_S],
        path: str | os.PathLike[str] | None = None,
        processor_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        **kw: Any,
    ) -> _S:
        """``path``: a CLIPModel directory or hub id (None: the class's default release). The processor
        comes from ``processor_path``, else from ``path`` if it holds one, else the class's default
        processor. Extra keywords go to the constructor (HPSv2's ``scale``)."""
        if path is None and cls.DEFAULT_MODEL is None:
            raise ValueError(f"{cls.name}: pass path= to {cls.EXPECTED}")
        if cls.EXPECTED is not None and path is not None:
            reject_raw_checkpoint(resolve_path(path, None, cls.name), cls.name, cls.EXPECTED)
        model, proc = cls._load(path, processor_path, cls.DEFAULT_MODEL, cls.DEFAULT_PROCESSOR, cls.name)
        return cls(model, proc, device=device, dtype=dtype, batch_size=batch_size, **kw)

    @classmethod
    def _load(
        cls,
        path: str | os.PathLike[str] | None,
        processor_path: str | os.PathLike[str] | None,
        default_model: str | None,
        default_processor: str | None,
        what: str,
    ) -> tuple[nn.Module, Any]:
        from transformers import CLIPModel, CLIPProcessor

        model_path = resolve_path(path, default_model, what)
        if processor_path is None:
            processor_path = model_path if (has_processor(model_path) or default_processor is None) else None
        proc_path = resolve_path(processor_path, default_processor, f"{what} processor")
        model = load_pretrained(CLIPModel, model_path, what)
        processor = load_pretrained(CLIPProcessor, proc_path, f"{what} processor")
        return model, processor

    def _max_text_len(self) -> int:
        limit = int(self.model.config.text_config.max_position_embeddings)
        tok_max = getattr(self.processor.tokenizer, "model_max_length", None) or limit
        return min(limit, int(tok_max))

    def _text_features(self, prompts: list[str]) -> Tensor:
        tok = self.processor.tokenizer(
            prompts, padding=True, truncation=True, max_length=self._max_text_len(), return_tensors="pt"
        )
        feats = pooled(
            self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            )
        )
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str], batch_size: int | None = None) -> Tensor:
        """L2-normalised projected text embeddings ``(N, D)``, float32 on the CPU."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            return torch.zeros(0, self.embedding_dim)
        bs = batch_size or self.batch_size
        return torch.cat([self._text_features(prompts[s]).cpu() for s in batches(len(prompts), bs)])

    def _cosine(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        assert prompts is not None
        return (self._image_features(images) * self._text_features(prompts)).sum(-1)


class PickScore(_ClipScorer):
    """PickScore (Kirstain et al. 2023): CLIP-H fine-tuned on Pick-a-Pic preferences.

    ``score = logit_scale.exp() * cos(text_emb, image_emb)``, exactly as the PickScore README computes
    it (logit scale ~100, so scores sit around 20). Default release PickScore_v1, with the CLIP-H
    processor unless the model directory holds its own.
    """

    name = "pickscore"
    DEFAULT_MODEL = PICKSCORE_MODEL
    DEFAULT_PROCESSOR = PICKSCORE_PROCESSOR

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        return self.model.logit_scale.exp().float() * self._cosine(images, prompts)


class ClipScore(_ClipScorer):
    """CLIP score as torchmetrics ``CLIPScore`` defines it: ``100 * max(cos(text, image), 0)``.

    Default model ``openai/clip-vit-large-patch14`` (torchmetrics' default), holding its processor too.
    Note the clamp: a negative cosine scores 0, so this is not a plain cosine.
    """

    name = "clip"
    DEFAULT_MODEL = CLIP_SCORE_MODEL

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        return 100.0 * self._cosine(images, prompts).clamp(min=0.0)


class HPSv2(_ClipScorer):
    """Human Preference Score v2 (Wu et al. 2023), ``score = 100 * cos(text, image)``.

    The HPSv2 reference code returns the raw cosine (~0.27); papers usually quote it x100, which is what
    this returns (``scale`` changes it).

    Expected format: HPSv2 is released as an open_clip ViT-H-14 checkpoint (``HPS_v2*.pt``), and
    open_clip is not a dependency. This loads the same weights converted to a transformers ``CLIPModel``
    directory: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``), optionally with the
    processor files (``preprocessor_config.json`` and ``tokenizer.json`` or ``vocab.json`` +
    ``merges.txt``); without them the CLIP-ViT-H-14 processor, whose preprocessing and tokenizer match
    open_clip's ViT-H-14, is used. There is no default path: no transformers-format HPSv2 release exists.
    """

    name = "hpsv2"
    DEFAULT_PROCESSOR = HPSV2_PROCESSOR
    EXPECTED = (
        "a transformers CLIPModel conversion of the HPSv2 weights: config.json + model.safetensors "
        "(or pytorch_model.bin), optionally preprocessor_config.json + tokenizer.json (or vocab.json + "
        "merges.txt) (recipes/convert_scorer.py --kind hpsv2)"
    )

    def __init__(self, model: nn.Module, processor: Any, scale: float = 100.0, **kw: Any) -> None:
        super().__init__(model, processor, **kw)
        self.scale = float(scale)

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        return self.scale * self._cosine(images, prompts)


class AestheticScorer(_ClipScorer):
    """LAION improved-aesthetic-predictor: MLP on the L2-normalised CLIP ViT-L/14 image embedding.

    Prompts are ignored. Loads either a directory with a CLIPModel checkpoint (+ processor) and
    ``aesthetic_mlp.safetensors`` (a directory with only the head uses the default CLIP), or a CLIP
    (``clip_path``, default ``openai/clip-vit-large-patch14``) plus ``head_path``: the head as
    ``.safetensors`` or the released ``sac+logos+ava1-l14-linearMSE.pth`` state dict (keys
    ``layers.{0,2,4,6,7}.*``).
    """

    name = "aesthetic"
    uses_prompts = False
    DEFAULT_MODEL = AESTHETIC_CLIP_MODEL

    def __init__(self, model: nn.Module, processor: Any, head: RewardMLP, **kw: Any) -> None:
        super().__init__(model, processor, **kw)
        self.head = head.to(device=self.device, dtype=torch.float32).eval()

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        return self.head(self._image_features(images)).squeeze(-1)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path: str | os.PathLike[str] | None = None,
        clip_path: str | os.PathLike[str] | None = None,
        head_path: str | os.PathLike[str] | None = None,
        processor_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> AestheticScorer:
        if path is not None:
            p = resolve_path(path, None, "aesthetic")
            if os.path.isfile(p):
                head_path = head_path or p  # a bare head file: CLIP comes from clip_path / the default
            else:
                # A directory holding only the head takes the default CLIP.
                if clip_path is None and os.path.exists(os.path.join(p, "config.json")):
                    clip_path = p
                head_path = head_path or os.path.join(p, AESTHETIC_HEAD)
        if head_path is None:
            raise ValueError(
                f"aesthetic: no MLP head; pass path=<directory with CLIP checkpoint + {AESTHETIC_HEAD}> "
                "or head_path=<sac+logos+ava1-l14-linearMSE.pth or .safetensors>"
            )
        if not os.path.isfile(head_path):
            raise FileNotFoundError(f"aesthetic: MLP head {os.fspath(head_path)!r} does not exist")
        head = RewardMLP.from_state_dict(load_head_state_dict(head_path))
        model, proc = cls._load(clip_path, processor_path, cls.DEFAULT_MODEL, None, "aesthetic")
        proj = int(model.config.projection_dim)
        if head.input_size != proj:
            raise ValueError(
                f"aesthetic: head expects {head.input_size}-d embeddings, CLIP projects to {proj}"
            )
        return cls(model, proc, head, device=device, dtype=dtype, batch_size=batch_size)
