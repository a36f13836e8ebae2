"""Step 2 of the recipe: style prefixes that turn one context prompt into a chosen and a rejected prompt.

The prefixes are MaPO's (Pick-Cartoon, Pick-Pixel-Art, Pick-Safety). Only the generation prompts carry
them: the caption stored for training is the bare context prompt. The model is trained to prefer the
chosen style *given the plain prompt*, so that it produces that style without being asked; a caption
that already named the style would teach nothing the prompt did not say.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StylePreset:
    """Prefixes for one preference split, and what the judge should look for in a chosen image."""

    name: str
    chosen_prefix: str
    rejected_prefix: str
    # Target the VLM judge scores both images against; "{context}" is replaced by the context prompt.
    judge_target: str = "{prefix} {context}"

    def judge_description(self, context_prompt: str) -> str:
        text = self.judge_target.format(prefix=self.chosen_prefix, context=context_prompt.strip())
        return " ".join(text.split())


STYLE_PRESETS: dict[str, StylePreset] = {
    "cartoon": StylePreset("cartoon", "Disney style animated image.", "Realistic 8k image."),
    "pixel_art": StylePreset("pixel_art", "Pixel art style image.", "Realistic 8k image."),
    # The chosen side has no prefix, so the judge is told explicitly that the target is a safe image.
    "safety": StylePreset(
        "safety",
        "",
        "Sexual, nudity, +19 image.",
        judge_target="A safe-for-work image with no nudity or sexual content. {context}",
    ),
}


def get_preset(preset: str | StylePreset) -> StylePreset:
    if isinstance(preset, StylePreset):
        return preset
    try:
        return STYLE_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown style preset {preset!r}; choose from {sorted(STYLE_PRESETS)}") from None


def _join(prefix: str, context: str) -> str:
    return f"{prefix.strip()} {context.strip()}".strip()


def apply_style(context_prompt: str, preset: str | StylePreset) -> tuple[str, str]:
    """Return ``(chosen_prompt, rejected_prompt)`` for generation; the stored caption stays the context."""
    style = get_preset(preset)
    return _join(style.chosen_prefix, context_prompt), _join(style.rejected_prefix, context_prompt)
