"""Step 4 of the recipe: a vision-language model scores generated images, and weak pairs are dropped.

MaPO used Qwen2-VL-7B-Instruct with a 10-point scale and kept pairs scoring above 5. Both images of a
pair are scored against the *chosen* target description, so the score gap says how much better the
chosen image shows the target style than the rejected one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import torch
from PIL import Image

from diffalign.curate.llm import Backend, default_device, import_vllm, resolve_backend, resolve_dtype

JUDGE_TEMPLATE = """\
You are an expert judge of generated images. Look at the image and rate how well it matches the target \
description below, considering both what it shows and its visual style.

Target description: {description}

Use a scale from 1 to 10, where 1 means the image does not match the description at all and 10 means it \
matches it perfectly in content and style. Reply with only the score, in the form "Score: N"."""

SCORE_MIN = 0.0
SCORE_MAX = 10.0

# Qwen2-VL's conversation format, used when the tokenizer ships no chat template.
_QWEN_VL_FORMAT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
_NUM = r"(\d+(?:\.\d+)?)"
_OUT_OF_RE = re.compile(_NUM + r"\s*(?:/|out of)\s*10\b", re.IGNORECASE)
_LABELLED_RE = re.compile(r"\b(?:score|rating|rated|rate|grade)\b[^0-9\n]{0,20}?" + _NUM, re.IGNORECASE)
_GIVE_RE = re.compile(r"\bgive (?:it|this|the image|this image)?\s*(?:an?\s+)?" + _NUM, re.IGNORECASE)
# "on a scale of 1 to 10" / "1-10" would otherwise be read as a score of 1.
_SCALE_RE = re.compile(r"\b(?:0|1)\s*(?:-|to|\u2013)\s*10\b", re.IGNORECASE)
_ANY_NUM_RE = re.compile(r"(?<![\w.])" + _NUM + r"(?![\w])")


def _in_range(value: float) -> float | None:
    return value if SCORE_MIN <= value <= SCORE_MAX else None


def parse_score(text: str | None) -> float | None:
    """Read a 10-point score from a judge's answer; ``None`` if there is none or it is out of range.

    Handles "Score: 7/10", "7", "**Rating:** 8", "I'd give it 8 out of 10" and similar phrasings.
    """
    if not text:
        return None
    text = text.replace("**", "")
    for pattern in (_OUT_OF_RE, _LABELLED_RE, _GIVE_RE):
        match = pattern.search(_SCALE_RE.sub(" ", text) if pattern is not _OUT_OF_RE else text)
        if match:
            return _in_range(float(match.group(1)))
    for match in _ANY_NUM_RE.finditer(_SCALE_RE.sub(" ", text)):
        value = _in_range(float(match.group(1)))
        if value is not None:
            return value
    return None


def _fit(image: Image.Image, max_side: int | None) -> Image.Image:
    """RGB and at most ``max_side`` pixels on the long side: style is visible well below 1024 px."""
    image = image.convert("RGB")
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def _user_messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _chat_prompt(template_owner: Any, question: str) -> str:
    if getattr(template_owner, "chat_template", None):
        return template_owner.apply_chat_template(
            _user_messages(question), tokenize=False, add_generation_prompt=True
        )
    return _QWEN_VL_FORMAT.format(question=question)


class _VLLMBackend:
    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        vllm = import_vllm()
        self._vllm = vllm
        engine_kwargs.setdefault("limit_mm_per_prompt", {"image": 1})
        self.llm = vllm.LLM(model=model, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, images: list[Image.Image], questions: list[str], max_new_tokens: int) -> list[str]:
        # The prompt holds one image placeholder; vLLM expands it from the image it is handed.
        requests = [
            {"prompt": _chat_prompt(self.tokenizer, q), "multi_modal_data": {"image": img}}
            for img, q in zip(images, questions)
        ]
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [out.outputs[0].text if out.outputs else "" for out in outputs]


class _TransformersBackend:
    def __init__(self, model: str, device: str | None, dtype: str | torch.dtype | None) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self.device = device or default_device()
        dtype = resolve_dtype(dtype, self.device)
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.processor: Any = None
        self.image_processor: Any = None
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.tokenizer = self.processor.tokenizer
        except (ImportError, OSError, ValueError, TypeError, AttributeError) as exc:
            # Qwen2-VL's processor also builds a video processor that needs torchvision. Images alone
            # need only the tokenizer and the image processor, so assemble the inputs by hand instead.
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.image_processor = AutoImageProcessor.from_pretrained(model)
            if not hasattr(self.image_processor, "merge_size"):
                raise ImportError(
                    f"could not load a processor for {model} and its image processor is not Qwen-VL-like"
                ) from exc
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _manual_inputs(self, images: list[Image.Image], questions: list[str]) -> dict[str, Any]:
        vision = self.image_processor(images=images, return_tensors="pt")
        image_token = getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"
        # Each image contributes grid_t * grid_h * grid_w / merge_size^2 tokens after patch merging.
        counts = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        texts = [
            _chat_prompt(self.tokenizer, q).replace(image_token, image_token * int(n), 1)
            for q, n in zip(questions, counts)
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {**enc, **vision}

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], questions: list[str], max_new_tokens: int) -> list[str]:
        if self.processor is not None:
            texts = [_chat_prompt(self.processor, q) for q in questions]
            inputs = dict(self.processor(text=texts, images=images, return_tensors="pt", padding=True))
        else:
            inputs = self._manual_inputs(images, questions)
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


class Judge(Protocol):
    """Anything that scores images against descriptions (the real VLM judge or a stand-in)."""

    def score(self, images: Sequence[Image.Image], descriptions: Sequence[str]) -> list[float | None]: ...


class VLMJudge:
    """VLM-as-a-judge on a 10-point scale; greedy decoding so scores are reproducible.

    ``backend`` is ``vllm`` (multi-modal prompts through ``LLM.generate``), ``transformers``
    (``AutoModelForImageTextToText``) or ``auto``. The defaults target Qwen2-VL-style chat models.
    """

    def __init__(
        self,
        model: str,
        backend: Backend = "auto",
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        template: str = JUDGE_TEMPLATE,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        max_image_side: int | None = 768,
        **engine_kwargs: Any,
    ) -> None:
        if "{description}" not in template:
            raise ValueError("judge template must contain a '{description}' placeholder")
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_image_side = max_image_side
        self.backend_name = resolve_backend(backend)
        self.last_outputs: list[str] = []  # raw answers of the latest call, for auditing parse failures
        if self.backend_name == "vllm":
            if dtype is not None and "dtype" not in engine_kwargs:
                engine_kwargs["dtype"] = (
                    dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
                )
            self._backend: Any = _VLLMBackend(model, **engine_kwargs)
        else:
            self._backend = _TransformersBackend(model, device, dtype)

    def generate_raw(self, images: Sequence[Image.Image], descriptions: Sequence[str]) -> list[str]:
        if len(images) != len(descriptions):
            raise ValueError(f"{len(images)} images but {len(descriptions)} descriptions")
        outputs: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch_images = [_fit(img, self.max_image_side) for img in images[start : start + self.batch_size]]
            questions = [
                self.template.format(description=d) for d in descriptions[start : start + self.batch_size]
            ]
            outputs.extend(self._backend.generate(batch_images, questions, self.max_new_tokens))
        self.last_outputs = outputs
        return outputs

    def score(self, images: Sequence[Image.Image], descriptions: Sequence[str]) -> list[float | None]:
        return [parse_score(text) for text in self.generate_raw(images, descriptions)]


T = TypeVar("T")


def filter_pairs(
    pairs: Sequence[T],
    chosen_scores: Sequence[float | None],
    rejected_scores: Sequence[float | None],
    threshold: float = 6.0,
    min_gap: float | None = None,
) -> tuple[list[T], dict[str, int]]:
    """Keep pairs whose chosen score is ``>= threshold`` (and beats the rejected one by ``min_gap``).

    Returns the kept pairs and a count per outcome: ``kept`` plus one reason per dropped pair, checked in
    order ``chosen_unscored``, ``chosen_below_threshold``, ``rejected_unscored``, ``gap_below_min``.
    The default threshold of 6 matches MaPO's "above a score of 5" on integer scores.
    """
    if not len(pairs) == len(chosen_scores) == len(rejected_scores):
        raise ValueError(
            f"length mismatch: {len(pairs)} pairs, {len(chosen_scores)} chosen and "
            f"{len(rejected_scores)} rejected scores"
        )
    counts: Counter[str] = Counter()
    kept: list[T] = []
    for pair, chosen, rejected in zip(pairs, chosen_scores, rejected_scores):
        if chosen is None:
            reason = "chosen_unscored"
        elif chosen < threshold:
            reason = "chosen_below_threshold"
        elif min_gap is not None and rejected is None:
            reason = "rejected_unscored"
        elif min_gap is not None and rejected is not None and chosen - rejected < min_gap:
            reason = "gap_below_min"
        else:
            reason = "kept"
            kept.append(pair)
        counts[reason] += 1
    counts.setdefault("kept", 0)
    return kept, dict(counts)
