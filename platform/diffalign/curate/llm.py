"""Text-generation backends used to rewrite captions into context prompts.

Two interchangeable implementations sit behind :class:`TextGenerator`: vLLM for throughput on GPUs and
plain transformers for CPU, tests and machines without vLLM. Each takes user messages, applies the
model's chat template itself and returns only the newly generated text.
"""

from __future__ import annotations

import importlib.util
import sys
from abc import ABC, abstractmethod
from typing import Any, Literal

import torch

VLLM_MISSING_MESSAGE = (
    "vllm is not installed: pip install 'diffalign[vllm]' (GPU only) or use backend='transformers'"
)

Backend = Literal["vllm", "transformers", "auto"]


def import_vllm() -> Any:
    """Import vllm on first use so that the package stays importable (and testable) without it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(VLLM_MISSING_MESSAGE) from exc
    return vllm


def vllm_available() -> bool:
    """True when vllm can be imported; a ``None`` entry in ``sys.modules`` counts as missing."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(backend: Backend) -> Literal["vllm", "transformers"]:
    """Map ``auto`` to vllm only where it can actually run (importable and a CUDA device present)."""
    if backend == "auto":
        return "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"
    if backend not in ("vllm", "transformers"):
        raise ValueError(f"backend must be 'vllm', 'transformers' or 'auto', got {backend!r}")
    return backend


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Default to bf16 on CUDA and fp32 elsewhere (CPU half-precision kernels are slow or missing)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TextGenerator(ABC):
    """Turns user messages into completions; the chat template is the implementation's business."""

    @abstractmethod
    def generate(
        self, prompts: list[str], max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        """Return one completion per prompt, in order. ``temperature == 0`` means greedy decoding."""


class VLLMGenerator(TextGenerator):
    """Offline vLLM engine (``vllm.LLM``); ``engine_kwargs`` go straight to its constructor."""

    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        vllm = import_vllm()
        self._vllm = vllm
        self.model = model
        self.llm = vllm.LLM(model=model, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def _format(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def generate(
        self, prompts: list[str], max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        if not prompts:
            return []
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        outputs = self.llm.generate([self._format(p) for p in prompts], params, use_tqdm=False)
        return [out.outputs[0].text.strip() if out.outputs else "" for out in outputs]


class TransformersGenerator(TextGenerator):
    """``AutoModelForCausalLM`` with batched, left-padded generation."""

    def __init__(
        self,
        model_path: str,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int = 16,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # Decoder-only models continue from the last position, so padding must go on the left.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device).eval()

    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _format(self, prompt: str) -> str:
        if self.uses_chat_template:
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str], max_new_tokens: int, temperature: float) -> list[str]:
        # A chat template already carries its own BOS/role tokens; adding them again would double them.
        enc = self.tokenizer(
            [self._format(p) for p in prompts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not self.uses_chat_template,
        ).to(self.device)
        sampling = temperature > 0
        gen_kwargs: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": max_new_tokens}
        if sampling:
            gen_kwargs["temperature"] = temperature
        else:
            # Neutralise sampling knobs a checkpoint's generation_config may carry, to avoid warnings.
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(**enc, **gen_kwargs, pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def generate(
        self, prompts: list[str], max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        if not prompts:
            return []
        devices = [torch.device(self.device)] if torch.device(self.device).type == "cuda" else []
        results: list[str] = []
        # Seed a forked RNG so sampling is reproducible without disturbing the caller's global RNG state.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.max_batch_size):
                chunk = prompts[start : start + self.max_batch_size]
                results.extend(self._generate_batch(chunk, max_new_tokens, temperature))
        return results


def build_text_generator(
    backend: Backend,
    model: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    **engine_kwargs: Any,
) -> TextGenerator:
    """Build a generator; ``auto`` picks vllm when it is importable and CUDA is available."""
    chosen = resolve_backend(backend)
    if chosen == "vllm":
        if dtype is not None and "dtype" not in engine_kwargs:
            engine_kwargs["dtype"] = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        return VLLMGenerator(model, **engine_kwargs)
    return TransformersGenerator(model, device=device, dtype=dtype, **engine_kwargs)
