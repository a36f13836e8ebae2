"""Offline tokenizers for the tiny test and demo models.

Real vocabularies come from the hub; tests and the CPU demo cannot download. ``tiny_clip_vocab`` is the
one byte-level BPE vocabulary (every byte, its end-of-word form and the merges of the most common English
letter pairs) behind every tiny CLIP text tower: the diffusion text encoders and the CLIP-based scorers.
It tokenizes any text the real CLIP tokenizer would accept. The tiny LLM / VLM use a word-level
tokenizer (their chat templates and the zero-head trick need whole-word special tokens) and the tiny
BLIP a WordPiece one (``BlipProcessor`` takes a BERT tokenizer); both are built here too.
"""

from __future__ import annotations

import json
import os
import string
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import BertTokenizer, CLIPTokenizer, PreTrainedTokenizerFast

_COMMON_PAIRS = [
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed",
    "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le", "ve", "co",
    "me", "de", "hi", "ri", "ro", "ic", "ne", "ea", "ra", "ce", "li", "ch", "ll", "be", "ma", "si",
    "om", "ur", "ca", "el", "ta", "la", "ns", "di", "fo", "ho", "pe", "ec", "pr", "no", "ct", "us",
    "ot", "ge", "lo", "ow", "do", "ag", "sh", "ph", "ck", "ig", "mo", "ed", "gr", "ks", "sk",
]


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-unicode map used by GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the offline CLIP tokenizer; the two specials come last, as in CLIP's
    vocabulary (so the end-of-text token has the largest id)."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for pair in dict.fromkeys(_COMMON_PAIRS):
        a, b = pair
        merges.append((a, b + "</w>"))
        merges.append((a, b))
        tokens += [pair + "</w>", pair]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A working CLIPTokenizer with a ~700-token vocabulary, built without any download."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def write_tiny_clip_tokenizer(path: str | os.PathLike[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Write ``vocab.json`` + ``merges.txt`` of the offline tokenizer and load a ``CLIPTokenizer`` from
    those files, so a scorer directory holds the slow-tokenizer files a hub CLIP has."""
    from transformers import CLIPTokenizer

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    vocab_read = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    lines = (out / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges_read = [tuple(line.split(" ")) for line in lines if line]
    return CLIPTokenizer(vocab=vocab_read, merges=merges_read, model_max_length=model_max_length)


def write_tiny_bert_tokenizer(path: str | os.PathLike[str], model_max_length: int = 64) -> BertTokenizer:
    """Write a WordPiece ``vocab.txt`` (specials, every printable ASCII char, ``##`` continuations and a
    few words) so any ASCII prompt tokenizes, and load a ``BertTokenizer`` from it."""
    from transformers import BertTokenizer

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    words = ["a", "the", "of", "photo", "cat", "dog", "red", "blue", "painting", "portrait"]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(chars + string.punctuation) + ["##" + c for c in chars] + words
    tokens = list(dict.fromkeys(tokens))
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=str(out / "vocab.txt"), model_max_length=model_max_length)


def word_tokenizer(
    special: list[str], words: list[str], **kwargs: str
) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """A word-level fast tokenizer (no download) and its vocabulary; special tokens stay unsplit."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in special])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs), vocab
