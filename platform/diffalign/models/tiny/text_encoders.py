"""Offline tokenizers and tiny encoder configs for the flow-matching text towers: CLIP (as in the tiny
SD models), T5 (SD3 / FLUX.1) and the Qwen2.5-VL encoder of Qwen-Image.

The T5 tokenizer is a Unigram model over single characters plus a few whole words; the Qwen2 tokenizer
is a byte-level BPE whose merges spell out, as whole tokens, exactly the words of Qwen-Image's prompt
template. That matters: `QwenImagePipeline` drops the first `prompt_template_encode_start_idx` (34)
tokens of every encoded prompt, the template's system prefix as the real tokenizer splits it. With a
tokenizer that split the prefix into more or fewer tokens the tiny pipeline would keep part of the
template or throw away the user's prompt.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from diffalign.models.tiny.tokenizer import _bytes_to_unicode

if TYPE_CHECKING:
    from transformers import CLIPTextConfig, Qwen2_5_VLConfig, Qwen2Tokenizer, T5Config, T5Tokenizer

CLIP_LEN = 16  # the tiny CLIP towers' context (as the tiny SD models)
T5_LEN = 32  # tokenizer_3 / tokenizer_2 model_max_length; the pipelines pass their own max_sequence_length
CLIP_HIDDEN = 32
T5_DIM = 64  # >= CLIP-L + CLIP-G hidden: SD3 zero-pads the concatenated CLIP states to T5's width
QWEN_HIDDEN = 32

_WORDS = ["a", "an", "the", "of", "and", "photo", "painting", "cat", "dog", "red", "blue", "green", "on",
          "in", "with", "portrait", "image"]

# Qwen-Image's template (pipeline_qwenimage.py); its system prefix must be 34 tokens, as with Qwen2.5's own.
QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_TEMPLATE_PREFIX_TOKENS = 34
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def clip_config(vocab_size: int, **kw) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text tower (pass projection_dim for CLIPTextModelWithProjection)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_LEN, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **kw,
    )


def build_tiny_t5_tokenizer(model_max_length: int = T5_LEN) -> T5Tokenizer:
    """A T5 tokenizer (T5TokenizerFast) over a 208-piece Unigram vocabulary, built without a download.

    T5's layout: <pad>=0, </s>=1, <unk>=2; every printable ASCII character, alone and word-initial
    ("▁x"), so any ASCII prompt tokenizes; a few whole words scored above their spelling."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -5.5) for c in chars]
    pieces += [("▁" + w, -4.0) for w in _WORDS if len(w) > 1]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def t5_config(vocab_size: int) -> T5Config:
    """A 1-layer T5 encoder, 64 wide (the joint_attention_dim of the tiny SD3 / FLUX transformers)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_model=T5_DIM, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def _qwen_words() -> list[str]:
    """The pre-tokenizer chunks (byte-level spelling) that become whole tokens, highest merge priority
    first: every word after a space ("Ġthe"), then the template's line-initial words, then the tiny
    prompt words. With the space-led chains ranked first, a "Ġ..." chunk always completes its own
    chain; the line-initial ones rank before the prompt words, so those cannot split them either."""
    space = _bytes_to_unicode()[ord(" ")]
    description = QWEN_TEMPLATE.split("\n")[1].split(":")[0].replace(",", "").split(" ")
    spaced = [space + w for w in description[1:] + _WORDS]
    return list(dict.fromkeys(spaced + ["system", description[0], "user", "assistant"] + _WORDS))


def qwen_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges of the tiny Qwen2 tokenizer: the 256 byte symbols, then
    each whole word built left to right ("Ġ"+"t" -> "Ġt", "Ġt"+"h" -> "Ġth", ...). The specials are
    added by the tokenizer (after the vocabulary, as in Qwen2's)."""
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    for word in _qwen_words():
        cur = word[0]
        for ch in word[1:]:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    return vocab, merges


def build_tiny_qwen_tokenizer(model_max_length: int = 2048) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer (Qwen2TokenizerFast) over ~450 byte-level BPE tokens, Qwen's chat
    specials, built without a download; Qwen-Image's template prefix is exactly 34 tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab()
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                         unk_token=None)
    specials = [AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIALS]
    tok.add_tokens(specials, special_tokens=True)
    tok.pad_token = "<|endoftext|>"
    tok.eos_token = "<|im_end|>"
    return tok


def qwen_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL with a 2-layer, 32-wide language model (what Qwen-Image reads the prompt with) and a
    1-block vision tower (the class needs one; Qwen-Image's text-to-image path never calls it)."""
    from transformers import Qwen2_5_VLConfig

    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        # head_dim 16: rotary halves of 8 = temporal 2 + height 3 + width 3 (real: 16 + 24 + 24 of 64).
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=QWEN_HIDDEN,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
