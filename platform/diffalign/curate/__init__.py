"""Dataset building: context-prompt extraction, style prefixes, VLM judging, preference-pair assembly.

vllm is imported only when a vllm backend is actually constructed, so this package imports without it.
"""

from diffalign.curate.judge import JUDGE_TEMPLATE, Judge, VLMJudge, filter_pairs, parse_score
from diffalign.curate.llm import (
    VLLM_MISSING_MESSAGE,
    TextGenerator,
    TransformersGenerator,
    VLLMGenerator,
    build_text_generator,
    vllm_available,
)
from diffalign.curate.pairs import PAIR_SCHEMA, BuildSummary, ImageGenerator, build_pair_dataset
from diffalign.curate.prompts import (
    CONTEXT_INSTRUCTION,
    ExtractedPrompt,
    count_fallbacks,
    dedupe_prompts,
    extract_context_prompts,
    parse_context_output,
    strip_style_words,
)
from diffalign.curate.styles import STYLE_PRESETS, StylePreset, apply_style, get_preset

__all__ = [
    "CONTEXT_INSTRUCTION",
    "JUDGE_TEMPLATE",
    "PAIR_SCHEMA",
    "STYLE_PRESETS",
    "VLLM_MISSING_MESSAGE",
    "BuildSummary",
    "ExtractedPrompt",
    "ImageGenerator",
    "Judge",
    "StylePreset",
    "TextGenerator",
    "TransformersGenerator",
    "VLLMGenerator",
    "VLMJudge",
    "apply_style",
    "build_pair_dataset",
    "build_text_generator",
    "count_fallbacks",
    "dedupe_prompts",
    "extract_context_prompts",
    "filter_pairs",
    "get_preset",
    "parse_context_output",
    "parse_score",
    "strip_style_words",
    "vllm_available",
]
