"""Tiny random prompt-extraction LLM and VLM judge, built offline, for CPU demos and tests.

Each ``save_tiny_*`` writes a directory that ``diffalign.curate``'s ``TransformersGenerator`` / ``VLMJudge``
load like any real
checkpoint (Llama-style causal LM with a chat template; Qwen2-VL with its image processor), so the
recipe runs its real loading and generation code. Both are deterministic stand-ins: the LLM always
answers nothing, so each context prompt is the caption without style words (the parser's fallback); the
judge's scores are arbitrary numbers that depend on the image and the description.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffalign.models.tiny.tokenizer import word_tokenizer

WORDS = (
    "a the cat dog fox red blue green image of in on with under moon city street garden warrior "
    "prompt context realistic style art painting 1 2 3 4 5 6 7 8 9 10 score"
).split()
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2, "max_position_embeddings": 2048}


def save_tiny_lm(path: str | os.PathLike[str], seed: int = 0, random_head: bool = False) -> Path:
    """A one-layer Llama with a chat template; loads with ``TransformersGenerator(path)``.

    Its output head is zero, so greedy decoding picks token 0, the end-of-text token, and stops: a random
    head would turn every caption into the same few words, and deduplication would leave one pair.
    `random_head=True` keeps the random head, for tests of decoding itself.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    special = ["</s>", "<pad>", "<unk>", "<s>", "<|user|>", "<|assistant|>"]
    tokenizer, vocab = word_tokenizer(special, WORDS, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(vocab), bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                         pad_token_id=vocab["<pad>"], **TINY_TEXT)
    with torch.random.fork_rng(devices=[]):  # never disturb the caller's random stream
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if not random_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(out)
    return out


def save_tiny_vlm(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """A one-layer Qwen2-VL, 4 merged patches per image; loads with ``VLMJudge(path)``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(path)
    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    tokenizer, vocab = word_tokenizer(special, WORDS + ["user", "assistant"], eos_token="<|im_end|>")
    tokenizer.pad_token = "<pad>"
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4).save_pretrained(out)
    text = {**TINY_TEXT, "vocab_size": len(vocab), "bos_token_id": None, "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<pad>"],
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0}}
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Qwen2VLForConditionalGeneration(config).save_pretrained(out)
    return out
