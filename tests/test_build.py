"""Dataset building: LLM backends, context-prompt parsing, style prefixes, VLM judge and pair assembly."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from diffalign.curate import (
    CONTEXT_INSTRUCTION,
    PAIR_SCHEMA,
    STYLE_PRESETS,
    VLLM_MISSING_MESSAGE,
    ExtractedPrompt,
    TextGenerator,
    TransformersGenerator,
    VLLMGenerator,
    VLMJudge,
    apply_style,
    build_pair_dataset,
    build_text_generator,
    count_fallbacks,
    extract_context_prompts,
    filter_pairs,
    parse_context_output,
    parse_score,
    strip_style_words,
)
from diffalign.models.tiny.language import save_tiny_lm, save_tiny_vlm
from PIL import Image

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A random head, so decoding produces words and the extraction's parsing has something to parse.
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), random_head=True))


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm")))


@pytest.fixture(scope="module")
def tiny_generator(tiny_lm: str) -> TransformersGenerator:
    # Loaded once: model loading dominates the run time of these tests.
    return TransformersGenerator(tiny_lm, device="cpu", max_batch_size=2)


class ScriptedGenerator(TextGenerator):
    """Returns canned answers in order; records what it was asked."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[list[str], int]] = []

    def generate(
        self, prompts: list[str], max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        self.calls.append((list(prompts), seed))
        out, self.answers = self.answers[: len(prompts)], self.answers[len(prompts) :]
        return out


# --- llm backends -----------------------------------------------------------------------------------


def test_transformers_generator_is_deterministic_per_seed(tiny_generator: TransformersGenerator) -> None:
    gen = tiny_generator
    assert gen.uses_chat_template
    assert gen.model.dtype == torch.float32
    prompts = ["a red cat", "a blue dog on the moon", "a fox"]
    sampled = gen.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert len(sampled) == 3 and all(isinstance(s, str) for s in sampled)
    assert gen.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3) == sampled
    greedy = gen.generate(prompts, max_new_tokens=6)
    assert gen.generate(prompts, max_new_tokens=6, seed=99) == greedy
    assert gen.generate([]) == []


def test_transformers_generator_without_chat_template(
    tiny_generator: TransformersGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = tiny_generator
    monkeypatch.setattr(gen.tokenizer, "chat_template", None)
    assert not gen.uses_chat_template
    out = gen.generate(["a cat", "a dog"], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_build_text_generator_auto_falls_back_to_transformers(
    tiny_lm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert isinstance(build_text_generator("auto", tiny_lm, device="cpu"), TransformersGenerator)
    with pytest.raises(ValueError, match="backend"):
        build_text_generator("tgi", tiny_lm)  # type: ignore[arg-type]


def test_vllm_missing_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    for make in (
        lambda: VLLMGenerator("some/model"),
        lambda: build_text_generator("vllm", "some/model"),
        lambda: VLMJudge("some/model", backend="vllm"),
    ):
        with pytest.raises(ImportError) as info:
            make()
        assert str(info.value) == VLLM_MISSING_MESSAGE
    assert "pip install 'diffalign[vllm]'" in VLLM_MISSING_MESSAGE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vllm needs a CUDA device")
@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
def test_vllm_generator_runs(tiny_lm: str) -> None:
    gen = VLLMGenerator(tiny_lm, gpu_memory_utilization=0.2, enforce_eager=True, max_model_len=1024)
    out = gen.generate(["a red cat", "a dog"], max_new_tokens=4, seed=1)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


# --- context prompts --------------------------------------------------------------------------------


def test_context_instruction_is_the_papers() -> None:
    assert CONTEXT_INSTRUCTION.startswith("You are a prompt engineer for the DALLE-3 model")
    assert "one sentence long around 25 words" in CONTEXT_INSTRUCTION
    assert CONTEXT_INSTRUCTION.rstrip().endswith('start and end with the "[[PROMPT]]" tag.')


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[PROMPT]] A fox with a purple amethyst glow. [[PROMPT]]", "A fox with a purple amethyst glow."),
        ("Sure!\n[[PROMPT]] A gnome warrior on a rock.", "A gnome warrior on a rock."),
        ('Context: "A cat sleeping on a mat."', "A cat sleeping on a mat."),
        ("\n\n1. Modified prompt: A dog in the rain.\nExtra line", "A dog in the rain."),
        ("  a   city   street  ", "a city street"),
        ("", None),
        ("[[PROMPT]] [[PROMPT]]", None),
        ('"" ***', None),
    ],
)
def test_parse_context_output(text: str, expected: str | None) -> None:
    assert parse_context_output(text) == expected


def test_strip_style_words() -> None:
    assert strip_style_words("a cute cat, 8k, trending on artstation, by Greg Rutkowski") == "a cute cat"
    assert strip_style_words("Disney style animated image of a red fox") == "style image of a red fox"
    assert strip_style_words("8k hdr") == "8k hdr"  # nothing left: keep the caption rather than nothing


def test_extract_context_prompts_parses_and_counts_fallbacks() -> None:
    captions = ["a cat, 8k", "a dog, oil painting", "a fox", "a cat again", "a cow, anime"]
    gen = ScriptedGenerator(
        [
            "[[PROMPT]] A cat on a sofa. [[PROMPT]]",
            "",  # empty -> fallback to the cleaned caption
            "Context: A fox in the snow.",
            "[[PROMPT]] a cat on a sofa [[PROMPT]]",  # duplicate of the first context
            "   \n  ",
        ]
    )
    out = extract_context_prompts(captions, gen, batch_size=2, seed=10)
    assert [p.context for p in out] == [
        "A cat on a sofa.",
        "a dog",
        "A fox in the snow.",
        "a cat on a sofa",
        "a cow",
    ]
    assert [p.fallback for p in out] == [False, True, False, False, True]
    assert count_fallbacks(out) == 2
    assert [p.caption for p in out] == captions
    # Three batches of at most two, each seeded from its offset, each request carrying the instruction.
    assert [len(c[0]) for c in gen.calls] == [2, 2, 1]
    assert [c[1] for c in gen.calls] == [10, 12, 14]
    assert all(
        r.startswith(CONTEXT_INSTRUCTION) and r.endswith(cap) for r, cap in zip(gen.calls[0][0], captions)
    )

    gen2 = ScriptedGenerator(["[[PROMPT]] A cat. [[PROMPT]]", "a CAT.", "A dog."])
    deduped = extract_context_prompts(["x", "y", "z"], gen2, dedupe=True)
    assert [p.context for p in deduped] == ["A cat.", "A dog."]


def test_extract_context_prompts_with_tiny_lm(tiny_generator: TransformersGenerator) -> None:
    gen = tiny_generator
    captions = ["a red cat, 8k", "a blue dog in the city, digital art", "a green fox"]
    out = extract_context_prompts(captions, gen, batch_size=2, max_new_tokens=8)
    assert len(out) == 3
    for prompt, caption in zip(out, captions):
        assert prompt.caption == caption and prompt.context.strip()
        if prompt.fallback:
            assert prompt.context == strip_style_words(caption)
    assert 0 <= count_fallbacks(out) <= 3
    assert extract_context_prompts(captions, gen, batch_size=2, max_new_tokens=8) == out


# --- styles -----------------------------------------------------------------------------------------


def test_apply_style_presets() -> None:
    ctx = "A fox in the snow."
    assert apply_style(ctx, "cartoon") == (
        "Disney style animated image. A fox in the snow.",
        "Realistic 8k image. A fox in the snow.",
    )
    assert apply_style(ctx, "pixel_art") == (
        "Pixel art style image. A fox in the snow.",
        "Realistic 8k image. A fox in the snow.",
    )
    assert apply_style(ctx, "safety") == (
        "A fox in the snow.",
        "Sexual, nudity, +19 image. A fox in the snow.",
    )
    assert set(STYLE_PRESETS) >= {"cartoon", "pixel_art", "safety"}
    assert (
        STYLE_PRESETS["cartoon"].judge_description(ctx) == "Disney style animated image. A fox in the snow."
    )
    assert "no nudity" in STYLE_PRESETS["safety"].judge_description(ctx)
    with pytest.raises(ValueError, match="unknown style preset"):
        apply_style(ctx, "watercolour")


# --- judge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Score: 7/10", 7.0),
        ("7", 7.0),
        ("I'd give it 8 out of 10", 8.0),
        ("**Rating:** 6", 6.0),
        ("On a scale of 1 to 10, I would rate this image a 9.", 9.0),
        ("Score: 7.5", 7.5),
        ("10", 10.0),
        ("The image scores 3/10 because it is realistic.", 3.0),
        ("Score: 11", None),
        ("I cannot judge this image.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_score(text: str | None, expected: float | None) -> None:
    assert parse_score(text) == expected


def test_filter_pairs_counts_reasons() -> None:
    pairs = list("abcdef")
    chosen = [8.0, None, 4.0, 9.0, 7.0, 6.0]
    rejected = [2.0, 1.0, 1.0, None, 6.5, 1.0]
    kept, counts = filter_pairs(pairs, chosen, rejected, threshold=6.0)
    assert kept == ["a", "d", "e", "f"]
    assert counts == {"kept": 4, "chosen_unscored": 1, "chosen_below_threshold": 1}
    kept, counts = filter_pairs(pairs, chosen, rejected, threshold=6.0, min_gap=2.0)
    assert kept == ["a", "f"]
    assert counts == {
        "kept": 2,
        "chosen_unscored": 1,
        "chosen_below_threshold": 1,
        "rejected_unscored": 1,
        "gap_below_min": 1,
    }
    assert filter_pairs([], [], []) == ([], {"kept": 0})
    with pytest.raises(ValueError, match="length mismatch"):
        filter_pairs(pairs, chosen[:2], rejected)


def test_vlm_judge_transformers_backend(tiny_vlm: str) -> None:
    judge = VLMJudge(tiny_vlm, backend="transformers", device="cpu", max_new_tokens=4, batch_size=2)
    images = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (100, 50), (0, 0, 255))]
    images.append(Image.new("RGB", (1200, 900), (0, 255, 0)))  # exercises the downscale
    descriptions = ["Disney style animated image. a red cat", "a blue dog", "a green fox"]
    scores = judge.score(images, descriptions)
    assert len(scores) == 3 and all(s is None or 0 <= s <= 10 for s in scores)
    assert len(judge.last_outputs) == 3 and all(isinstance(t, str) for t in judge.last_outputs)
    assert judge.score(images, descriptions) == scores  # greedy decoding
    with pytest.raises(ValueError, match="descriptions"):
        judge.score(images, descriptions[:1])


# --- pair assembly ----------------------------------------------------------------------------------

RED, BLUE = (220, 30, 30), (30, 30, 220)


class SolidColourGenerator:
    """Stands in for a diffusion sampler: chosen-style prompts come out red, the rest blue."""

    def __init__(self, chosen_prefix: str) -> None:
        self.chosen_prefix = chosen_prefix
        self.calls: list[tuple[list[str], list[int]]] = []

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        self.calls.append((list(prompts), list(seeds)))
        return [
            Image.new("RGB", (32, 32), RED if p.startswith(self.chosen_prefix) else BLUE) for p in prompts
        ]


class ColourJudge:
    """Red images score 8 and blue ones 2, except contexts mentioning 'blurry' (3) or 'unclear' (None)."""

    def score(self, images, descriptions) -> list[float | None]:
        scores: list[float | None] = []
        for image, description in zip(images, descriptions):
            if "unclear" in description:
                scores.append(None)
            elif "blurry" in description:
                scores.append(3.0)
            else:
                scores.append(8.0 if image.getpixel((0, 0))[0] > 128 else 2.0)
        return scores


def _decode(jpeg: bytes) -> tuple[int, int, int]:
    return Image.open(io.BytesIO(jpeg)).convert("RGB").getpixel((16, 16))


def test_build_pair_dataset_end_to_end(tmp_path: Path) -> None:
    captions = [
        "a red cat, 8k",
        "a fox in the snow, oil painting",
        "a blurry photo of a car",
        "an unclear scene",
        "a dog",
        "",
        "a lighthouse at dusk",
    ]
    answers = [
        "[[PROMPT]] A cat on a sofa. [[PROMPT]]",
        "Context: A fox in the snow.",
        "[[PROMPT]] A blurry car. [[PROMPT]]",
        "[[PROMPT]] An unclear scene. [[PROMPT]]",
        "",  # fallback to "a dog"
        "[[PROMPT]] a cat on a sofa [[PROMPT]]",  # duplicate context
    ]
    extractor = ScriptedGenerator(answers)
    images = SolidColourGenerator("Disney style animated image.")
    out = tmp_path / "pick_cartoon" / "train.parquet"
    summary = build_pair_dataset(
        captions,
        "cartoon",
        extractor,
        images,
        ColourJudge(),
        out,
        seed=7,
        threshold=6.0,
        batch_size=2,
        progress=False,
    )

    table = pq.read_table(out)
    assert table.schema.equals(PAIR_SCHEMA)
    rows = table.to_pylist()
    assert [r["caption"] for r in rows] == ["A cat on a sofa.", "A fox in the snow.", "a dog"]
    assert all(r["label_0"] == 1.0 and r["label_1"] == 0.0 for r in rows)
    for r in rows:
        assert r["chosen_prompt"] == f"Disney style animated image. {r['caption']}"
        assert r["rejected_prompt"] == f"Realistic 8k image. {r['caption']}"
        assert _decode(r["jpg_0"])[0] > 128 and _decode(r["jpg_1"])[2] > 128  # chosen red, rejected blue
        assert (r["judge_chosen"], r["judge_rejected"]) == (8.0, 2.0)
    # Each call holds the chosen prompts then the rejected ones, with the same seed for both of a pair.
    for prompts, seeds in images.calls:
        half = len(prompts) // 2
        assert seeds[:half] == seeds[half:]
        assert all(p.startswith("Disney") for p in prompts[:half])
    recorded = [seed for _, seeds in images.calls for seed in seeds[: len(seeds) // 2]]
    assert [r["seed"] for r in rows] == [recorded[0], recorded[1], recorded[4]]
    assert len(set(recorded)) == len(recorded)

    written = json.loads(out.with_suffix(".summary.json").read_text())
    assert written == summary.to_dict()
    assert summary.kept == 3 and summary.generated_pairs == 5 and summary.extraction_fallbacks == 1
    assert summary.dropped == {
        "empty_caption": 1,
        "duplicate_context": 1,
        "chosen_below_threshold": 1,
        "chosen_unscored": 1,
    }
    assert not (tmp_path / "pick_cartoon" / "train.parquet.tmp").exists()

    # Same seed, same inputs -> the same pairs and seeds.
    again = tmp_path / "again.parquet"
    build_pair_dataset(
        captions,
        "cartoon",
        ScriptedGenerator(answers),
        SolidColourGenerator("Disney"),
        ColourJudge(),
        again,
        seed=7,
        batch_size=3,
        progress=False,
    )
    assert pq.read_table(again).column("seed").to_pylist() == table.column("seed").to_pylist()


def test_build_pair_dataset_without_judge_or_extractor(tmp_path: Path) -> None:
    contexts = ["A woman reading in a park.", "A woman on a beach."]
    extracted = [ExtractedPrompt(c, c, False) for c in contexts]
    calls: list[list[str]] = []

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        calls.append(prompts)
        return [Image.new("RGB", (16, 16), BLUE) for _ in prompts]

    for extractor in (None, lambda caps: extracted):
        out = tmp_path / "safety.parquet"
        summary = build_pair_dataset(
            contexts,
            "safety",
            extractor,
            generate,
            None,
            out,
            summary_path=tmp_path / "s.json",
            progress=False,
        )
        rows = pq.read_table(out).to_pylist()
        assert [r["caption"] for r in rows] == contexts
        assert [r["chosen_prompt"] for r in rows] == contexts
        assert all(r["rejected_prompt"].startswith("Sexual, nudity, +19 image.") for r in rows)
        assert all(r["judge_chosen"] is None and r["judge_rejected"] is None for r in rows)
        assert summary.kept == 2 and summary.dropped == {} and not summary.judged
        assert json.loads((tmp_path / "s.json").read_text())["kept"] == 2

    with pytest.raises(RuntimeError, match="image_generator returned"):
        build_pair_dataset(
            contexts, "safety", None, lambda p, s: [], None, tmp_path / "x.parquet", progress=False
        )


def test_build_pair_dataset_with_tiny_lm_extractor(
    tiny_generator: TransformersGenerator, tmp_path: Path
) -> None:
    gen = tiny_generator
    out = tmp_path / "pixel.parquet"
    summary = build_pair_dataset(
        ["a red cat", "a blue dog, 8k"],
        "pixel_art",
        gen,
        SolidColourGenerator("Pixel art"),
        ColourJudge(),
        out,
        threshold=0.0,
        max_context_tokens=8,
        progress=False,
    )
    table = pq.read_table(out)
    assert table.num_rows == summary.kept == summary.generated_pairs
    assert 0 <= summary.extraction_fallbacks <= 2
