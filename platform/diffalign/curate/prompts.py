"""Step 1 of the Pick-Style / Pick-Safety recipe: rewrite user captions into style-free context prompts.

The style of a pair must come only from the prefix added later (see ``styles.py``), so the core content
of each Pick-a-Pic caption is extracted with an LLM and any style words are dropped. The instruction
is the one MaPO used with GPT-3.5-Turbo; the model is asked to wrap its answer in ``[[PROMPT]]`` tags.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tqdm.auto import tqdm

from diffalign.curate.llm import TextGenerator

CONTEXT_INSTRUCTION = """\
You are a prompt engineer for the DALLE-3 model, which is a diffusion-based image generation API. \
These are some examples of prompts from the technical report.

1. In a fantastical setting, a highly detailed furry humanoid skunk with piercing eyes confidently poses \
in a medium shot, wearing an animal hide jacket. The artist has masterfully rendered the character in \
digital art, capturing the intricate details of fur and clothing texture.

2. A illustration from a graphic novel. A bustling city street under the shine of a full moon. The \
sidewalks bustling with pedestrians enjoying the nightlife. At the corner stall, a young woman with fiery \
red hair, dressed in a signature velvet cloak, is haggling with the grumpy old vendor. the grumpy vendor, \
a tall, sophisticated man is wearing a sharp suit, sports a noteworthy moustache is animatedly conversing \
on his steampunk telephone.

3. Ancient pages filled with sketches and writings of fantasy beasts, monsters, and plants sprawl across \
an old, weathered journal. The faded dark green ink tells tales of magical adventures, while the \
high-resolution drawings detail each creature's intricate characteristics. Sunlight peeks through a \
nearby window, illuminating the pages and revealing their timeworn charm.

4. A fierce garden gnome warrior, clad in armor crafted from leaves and bark, brandishes a tiny sword and \
shield. He stands valiantly on a rock amidst a blooming garden, surrounded by colorful flowers and \
towering plants. A determined expression is painted on his face, ready to defend his garden kingdom.

Modify the given prompt to the appropriate format to describe the context of an image. Do not use the \
words that can specify the style (e.g., animation, 8K, oil painting), and exclude them if it is in the \
given prompt. Make sure that the prompt is one sentence long around 25 words. The modified prompt should \
start and end with the "[[PROMPT]]" tag."""

PROMPT_TAG = "[[PROMPT]]"

# Phrases that pin down a rendering style; used only for the fallback when the LLM returns nothing usable.
STYLE_WORDS: tuple[str, ...] = (
    r"trending on artstation",
    r"artstation",
    r"unreal engine \d*",
    r"octane render",
    r"highly detailed",
    r"ultra detailed",
    r"hyper[- ]?realistic",
    r"photo[- ]?realistic",
    r"realistic",
    r"\d+k",
    r"u?hd",
    r"hdr",
    r"oil painting",
    r"watercolou?r",
    r"digital (?:art|painting)",
    r"concept art",
    r"pixel art",
    r"anime",
    r"animation",
    r"animated",
    r"cartoon",
    r"disney",
    r"pixar",
    r"illustration",
    r"cinematic(?: lighting)?",
    r"studio lighting",
    r"sharp focus",
    r"masterpiece",
    r"best quality",
    r"high quality",
    r"award[- ]winning",
    r"4k wallpaper",
)
_STYLE_RE = re.compile(r"\b(?:" + "|".join(STYLE_WORDS) + r")\b", re.IGNORECASE)
# "by Greg Rutkowski", "by Artgerm and Alphonse Mucha": artist names pin down a style as well.
_ARTIST_RE = re.compile(r"\bby (?:[A-Z][\w.'-]*)(?:\s+(?:and\s+)?[A-Z][\w.'-]*)*")
_LABEL_RE = re.compile(
    r"^(?:modified prompt|context prompt|new prompt|context|prompt|output|answer|result)\s*[:\-]\s*",
    re.IGNORECASE,
)
_LIST_MARKER_RE = re.compile(r"^(?:\d+[.)]|[-*\u2022])\s+")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019*_ "


@dataclass(frozen=True)
class ExtractedPrompt:
    """One caption and the context prompt derived from it."""

    caption: str
    context: str
    fallback: bool  # True when the LLM output was unusable and the caption was cleaned instead
    raw: str = ""  # the generator's raw output, kept for auditing


def build_extraction_request(caption: str) -> str:
    """The user message sent to the generator for one caption."""
    return f"{CONTEXT_INSTRUCTION}\n\nGiven prompt: {caption.strip()}"


def strip_style_words(caption: str) -> str:
    """Remove style words and artist credits; if nothing would be left, return the caption unchanged."""
    text = _ARTIST_RE.sub(" ", caption)
    text = _STYLE_RE.sub(" ", text)
    # Tidy the separators left behind ("a cat, , 8k," -> "a cat").
    text = re.sub(r"\s*([,;|])(?:\s*[,;|])+", r"\1", text)
    text = re.sub(r"\s+([,;.|])", r"\1", text)
    text = re.sub(r"\s{2,}", " ", text).strip(" ,;|-")
    return text if re.search(r"[A-Za-z0-9]", text) else caption.strip()


def _clean_line(line: str) -> str:
    line = line.strip()
    for _ in range(3):  # labels, list markers and quotes can nest ("1. Context: \"...\"")
        previous = line
        line = _LIST_MARKER_RE.sub("", line)
        line = _LABEL_RE.sub("", line)
        line = line.strip(_QUOTES)
        if line == previous:
            break
    return line


def parse_context_output(text: str) -> str | None:
    """Pull the context prompt out of an LLM answer; ``None`` when nothing usable is there.

    Prefers the span between ``[[PROMPT]]`` tags (the format the instruction asks for), then falls back
    to the first non-empty line once labels such as ``Context:``, list markers and quotes are removed.
    """
    text = text.strip()
    if PROMPT_TAG in text:
        parts = [p.strip() for p in text.split(PROMPT_TAG)]
        tagged = [p for p in parts[1:] if p]
        text = tagged[0] if tagged else ""
    for line in text.splitlines():
        cleaned = _clean_line(line)
        if PROMPT_TAG in cleaned:
            cleaned = cleaned.replace(PROMPT_TAG, "").strip()
        if re.search(r"[A-Za-z0-9]", cleaned):
            return re.sub(r"\s+", " ", cleaned)
    return None


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip(" .")


def dedupe_prompts(prompts: Iterable[ExtractedPrompt]) -> list[ExtractedPrompt]:
    """Keep the first occurrence of each context prompt (case- and whitespace-insensitive)."""
    seen: set[str] = set()
    kept: list[ExtractedPrompt] = []
    for prompt in prompts:
        key = _normalise(prompt.context)
        if key not in seen:
            seen.add(key)
            kept.append(prompt)
    return kept


def count_fallbacks(prompts: Iterable[ExtractedPrompt]) -> int:
    return sum(p.fallback for p in prompts)


def extract_context_prompts(
    captions: list[str],
    generator: TextGenerator,
    batch_size: int = 32,
    max_new_tokens: int = 96,
    temperature: float = 0.0,
    seed: int = 0,
    dedupe: bool = False,
    progress: bool = False,
) -> list[ExtractedPrompt]:
    """Rewrite every caption into a context prompt with ``generator``.

    When the output cannot be parsed the caption itself, stripped of style words, is used instead and the
    result is flagged ``fallback=True`` (see :func:`count_fallbacks`). ``dedupe`` drops repeated contexts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[ExtractedPrompt] = []
    bar = tqdm(total=len(captions), desc="context prompts", disable=not progress)
    for start in range(0, len(captions), batch_size):
        batch = captions[start : start + batch_size]
        # Each batch gets its own seed so that results do not depend on how many batches came before.
        outputs = generator.generate(
            [build_extraction_request(c) for c in batch],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + start,
        )
        if len(outputs) != len(batch):
            raise RuntimeError(f"generator returned {len(outputs)} outputs for {len(batch)} prompts")
        for caption, raw in zip(batch, outputs):
            context = parse_context_output(raw or "")
            if context is None:
                results.append(ExtractedPrompt(caption, strip_style_words(caption), True, raw or ""))
            else:
                results.append(ExtractedPrompt(caption, context, False, raw))
        bar.update(len(batch))
    bar.close()
    return dedupe_prompts(results) if dedupe else results
