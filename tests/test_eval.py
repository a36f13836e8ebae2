"""Reward scorers, seed-matched win rates and the reference-mismatch probe, on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.eval import (
    SCORERS,
    DinoSimilarity,
    ImageEmbedder,
    RewardMLP,
    build_scorer,
    cosine_distances,
    embed_images,
    mismatch_note,
    reference_mismatch,
    to_markdown,
    wilson_interval,
    win_rate,
    win_rate_stats,
    win_rate_table,
)
from diffalign.models.reward_heads import AESTHETIC_HEAD, IMAGEREWARD_HEAD, load_head_state_dict
from diffalign.models.tiny.scorers import TINY_PROJECTION, save_head, save_tiny_scorer
from diffalign.specs import SCORER_NAMES as SPEC_SCORER_NAMES
from PIL import Image

SCORER_NAMES = ["pickscore", "clip", "hpsv2", "aesthetic", "imagereward", "dino"]
PROMPTS = ["a photo of a cat", "the red dog", "an oil painting, 1890!", "x", "a very long prompt " * 30]


def _images(seed: int, n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Non-square sizes exercise resize + crop; one greyscale image exercises the RGB conversion.
    out = [Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]
    out[-1] = out[-1].convert("L")
    return out


def _solid(rgb: tuple[int, int, int], size: int = 24) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_scorers")
    return {name: save_tiny_scorer(name, root / name) for name in SCORER_NAMES}


def _load(name: str, tiny_dirs: dict[str, Path], **kw) -> object:
    if name == "dino":
        kw.setdefault("references", _images(99, 2))
    return build_scorer(name, str(tiny_dirs[name]), batch_size=2, **kw)


# --------------------------------------------------------------------------- scorers


@pytest.mark.parametrize("name", SCORER_NAMES)
def test_scorer_loads_by_path_and_scores(name: str, tiny_dirs: dict[str, Path]) -> None:
    scorer = _load(name, tiny_dirs)
    assert scorer.name == name and scorer.higher_is_better
    a, b = _images(0), _images(1)
    s1 = scorer.score(a, PROMPTS)
    s2 = scorer.score(a, PROMPTS)
    assert s1.shape == (len(a),) and s1.dtype == torch.float32
    assert torch.isfinite(s1).all()
    assert torch.equal(s1, s2), "scores must be deterministic"
    # Batching must not change the result.
    torch.testing.assert_close(scorer.score(a, PROMPTS, batch_size=5), s1, rtol=1e-5, atol=1e-5)
    sb = scorer.score(b, PROMPTS)
    assert (sb - s1).abs().max() > 1e-6, "different images must give different scores"


@pytest.mark.parametrize("name", ["pickscore", "clip", "hpsv2", "imagereward"])
def test_prompt_scorers_depend_on_prompt(name: str, tiny_dirs: dict[str, Path]) -> None:
    scorer = _load(name, tiny_dirs)
    imgs = _images(0)
    other = ["a blue portrait", "dog", "1 2 3", "zzz", "the photo"]
    assert (scorer.score(imgs, PROMPTS) - scorer.score(imgs, other)).abs().max() > 1e-6
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(imgs, PROMPTS[:2])
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(imgs)


def test_pickscore_matches_independent_formula(tiny_dirs: dict[str, Path]) -> None:
    from transformers import CLIPModel, CLIPProcessor

    path = tiny_dirs["pickscore"]
    scorer = build_scorer("pickscore", str(path))
    model = CLIPModel.from_pretrained(path).eval()
    proc = CLIPProcessor.from_pretrained(path)
    imgs = [im.convert("RGB") for im in _images(3)]
    with torch.no_grad():
        img = model.get_image_features(**proc(images=imgs, return_tensors="pt"))
        txt = model.get_text_features(
            **proc(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        )
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (img @ txt.T).diag()
    torch.testing.assert_close(scorer.score(imgs, PROMPTS), expected.float(), rtol=1e-5, atol=1e-5)


def test_clip_family_scales(tiny_dirs: dict[str, Path]) -> None:
    # The three CLIP scorers on the same weights differ only in how the cosine is scaled.
    path = str(tiny_dirs["pickscore"])
    imgs = _images(4)
    pick = build_scorer("pickscore", path).score(imgs, PROMPTS)
    clip_scorer = build_scorer("clip", path)
    clip = clip_scorer.score(imgs, PROMPTS)
    hps = build_scorer("hpsv2", path).score(imgs, PROMPTS)
    cos = hps / 100.0
    assert cos.abs().max() <= 1.0 + 1e-5
    torch.testing.assert_close(clip, (100.0 * cos).clamp(min=0.0), rtol=1e-5, atol=1e-4)
    scale = float(clip_scorer.model.logit_scale.detach().exp())
    torch.testing.assert_close(pick, scale * cos, rtol=1e-5, atol=1e-4)


def test_reduced_precision_close_to_float32(tiny_dirs: dict[str, Path]) -> None:
    imgs = _images(8)
    full = build_scorer("pickscore", str(tiny_dirs["pickscore"])).score(imgs, PROMPTS)
    half = build_scorer("pickscore", str(tiny_dirs["pickscore"]), dtype=torch.bfloat16).score(imgs, PROMPTS)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.3)


def test_clip_score_clamps_negative_cosine(tiny_dirs: dict[str, Path]) -> None:
    scorer = build_scorer("clip", str(tiny_dirs["clip"]))
    scorer._cosine = lambda images, prompts: torch.tensor([-0.3, 0.25])  # type: ignore[method-assign]
    torch.testing.assert_close(scorer.score(_images(0, 2), PROMPTS[:2]), torch.tensor([0.0, 25.0]))


def test_dino_self_similarity(tiny_dirs: dict[str, Path]) -> None:
    a, b = _images(5, 2)
    scorer = build_scorer("dino", str(tiny_dirs["dino"]))
    with pytest.raises(ValueError, match="reference"):
        scorer.score([a])
    self_sim = scorer.score([a, b], references=[a])
    torch.testing.assert_close(self_sim[0], torch.tensor(1.0), atol=1e-5, rtol=0)
    assert self_sim[0] > self_sim[1]
    # Mean over references: scoring against [a, b] averages the two single-reference scores.
    both = scorer.score([a], references=[a, b])
    with pytest.raises(ValueError, match="reference"):  # per-call references are not stored
        scorer.score([a])
    scorer.set_references([b])
    torch.testing.assert_close(both, (self_sim[:1] + scorer.score([a])) / 2, atol=1e-5, rtol=0)
    # References given at construction behave the same; prompts are ignored.
    built = DinoSimilarity.from_pretrained(tiny_dirs["dino"], references=[a])
    torch.testing.assert_close(built.score([a, b], ["p", "q"]), self_sim)


def test_heads_in_original_formats(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    imgs = _images(6)
    # improved-aesthetic-predictor ships a torch .pth state dict; CLIP can come from a separate path.
    sd = load_head_state_dict(tiny_dirs["aesthetic"] / AESTHETIC_HEAD)
    torch.save(sd, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    split = build_scorer(
        "aesthetic",
        None,
        clip_path=str(tiny_dirs["aesthetic"]),
        head_path=tmp_path / "sac+logos+ava1-l14-linearMSE.pth",
    )
    joined = build_scorer("aesthetic", str(tiny_dirs["aesthetic"]))
    torch.testing.assert_close(split.score(imgs), joined.score(imgs))
    # ImageReward.pt prefixes its head with "mlp."; that prefix is accepted.
    ir_sd = load_head_state_dict(tiny_dirs["imagereward"] / IMAGEREWARD_HEAD)
    torch.save({"mlp." + k: v for k, v in ir_sd.items()}, tmp_path / "head.pt")
    ir_a = build_scorer("imagereward", str(tiny_dirs["imagereward"]), head_path=tmp_path / "head.pt")
    ir_b = build_scorer("imagereward", str(tiny_dirs["imagereward"]))
    torch.testing.assert_close(ir_a.score(imgs, PROMPTS), ir_b.score(imgs, PROMPTS))


def test_imagereward_normalisation(tiny_dirs: dict[str, Path]) -> None:
    imgs = _images(7)
    plain = build_scorer("imagereward", str(tiny_dirs["imagereward"]), mean=0.0, std=1.0).score(imgs, PROMPTS)
    released = build_scorer("imagereward", str(tiny_dirs["imagereward"])).score(imgs, PROMPTS)
    torch.testing.assert_close(released, (plain - 0.16717362830052426) / 1.0333394966054072)


def test_tiny_builders_are_seeded(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_scorer("aesthetic", str(save_tiny_scorer("aesthetic", tmp_path / "a", seed=3)))
    assert torch.equal(torch.rand(1), expected_next), "building must not consume the caller's RNG"
    b = build_scorer("aesthetic", str(save_tiny_scorer("aesthetic", tmp_path / "b", seed=3)))
    c = build_scorer("aesthetic", str(save_tiny_scorer("aesthetic", tmp_path / "c", seed=4)))
    imgs = _images(9)
    assert torch.equal(a.score(imgs), b.score(imgs))
    assert not torch.equal(a.score(imgs), c.score(imgs))
    with pytest.raises(ValueError, match="known"):
        save_tiny_scorer("fid", tmp_path / "d")


def test_reward_mlp_layout() -> None:
    mlp = RewardMLP(768)
    assert [k for k in mlp.state_dict() if k.endswith("weight")] == [
        f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)
    ]
    assert [m.out_features for m in mlp.layers if isinstance(m, torch.nn.Linear)] == [1024, 128, 64, 16, 1]
    with pytest.raises(ValueError, match="layers.7.weight"):
        RewardMLP.from_state_dict({k: v for k, v in mlp.state_dict().items() if not k.startswith("layers.7")})


def test_registry_names_are_the_spec_names() -> None:
    # The config validates scorer names against diffalign.specs without importing the scorers.
    assert tuple(sorted(SCORERS)) == SPEC_SCORER_NAMES
    assert set(SCORER_NAMES) == set(SCORERS)


def test_registry_errors(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aesthetic, clip, dino, hpsv2, imagereward, pickscore"):
        build_scorer("fid")
    missing = tmp_path / "nowhere"
    for name in SCORER_NAMES:
        with pytest.raises(FileNotFoundError, match="nowhere"):
            build_scorer(name, str(missing))
    with pytest.raises(ValueError, match="config.json"):
        build_scorer("hpsv2", None)
    # An open_clip checkpoint (file, or directory holding only it) is refused, naming the expected files.
    ckpt = tmp_path / "openclip" / "HPS_v2_compressed.pt"
    ckpt.parent.mkdir()
    torch.save({"visual.proj": torch.zeros(2, 2)}, ckpt)
    for p in (ckpt, ckpt.parent):
        with pytest.raises(ValueError, match="config.json.*model.safetensors"):
            build_scorer("hpsv2", str(p))
    with pytest.raises(ValueError, match=IMAGEREWARD_HEAD):
        build_scorer("imagereward", str(ckpt.parent))
    with pytest.raises(ValueError, match="aesthetic_mlp.safetensors"):
        build_scorer("aesthetic", None)
    # A CLIP directory without its head names the missing head file.
    with pytest.raises(FileNotFoundError, match=AESTHETIC_HEAD):
        build_scorer("aesthetic", str(tiny_dirs["clip"]))
    with pytest.raises(FileNotFoundError, match=IMAGEREWARD_HEAD):
        build_scorer("imagereward", str(tiny_dirs["clip"]))
    wrong = save_head(tmp_path / "wrong.safetensors", TINY_PROJECTION + 1)
    with pytest.raises(ValueError, match="head expects"):
        build_scorer("aesthetic", None, clip_path=str(tiny_dirs["clip"]), head_path=wrong)


# --------------------------------------------------------------------------- win rates


def test_win_rate_hand_cases() -> None:
    policy = torch.tensor([3.0, 2.0, 1.0, 5.0])
    baseline = torch.tensor([1.0, 2.0, 3.0, 4.0])  # win, tie, loss, win
    assert win_rate(policy, baseline) == pytest.approx(2.5 / 4)
    assert win_rate(policy, baseline, tie=0.0) == pytest.approx(2 / 4)
    assert win_rate(policy, baseline, tie=1.0) == pytest.approx(3 / 4)
    assert win_rate(policy, baseline, higher_is_better=False) == pytest.approx(1.5 / 4)
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert win_rate([2.0], [1.0]) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        win_rate(policy, baseline[:3])
    with pytest.raises(ValueError, match="non-finite"):
        win_rate([float("nan")], [1.0])
    with pytest.raises(ValueError, match="tie"):
        win_rate(policy, baseline, tie=2.0)


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)


@pytest.mark.parametrize("ci", ["wilson", "bootstrap"])
def test_win_rate_table(ci: str) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, generator=g)
    policy = {"pickscore": base + 0.5 + 0.3 * torch.randn(200, generator=g), "aesthetic": base.clone()}
    baseline = {"pickscore": base, "aesthetic": base}
    table = win_rate_table(policy, baseline, ci=ci)
    pick, aes = table["pickscore"], table["aesthetic"]
    assert pick["n"] == 200 and pick["wins"] + pick["ties"] + pick["losses"] == 200
    assert pick["win_rate"] == pytest.approx(pick["wins"] / 200)
    assert pick["ci_low"] <= pick["win_rate"] <= pick["ci_high"] and pick["ci_high"] - pick["ci_low"] < 0.2
    assert pick["mean_diff"] == pytest.approx(pick["policy_mean"] - pick["baseline_mean"])
    assert pick["win_rate"] > 0.8
    assert aes["win_rate"] == 0.5 and aes["ties"] == 200 and aes["mean_diff"] == 0.0
    assert aes["ci_low"] <= 0.5 <= aes["ci_high"]
    assert win_rate_table(policy, baseline, ci=ci) == table  # deterministic, bootstrap included
    md = to_markdown(table)
    assert md.splitlines()[0].startswith("| scorer | win rate | 95% CI")
    assert "| pickscore | " in md and "200/0/0" not in md and "0/200/0" in md


def test_win_rate_table_errors() -> None:
    with pytest.raises(ValueError, match="only in policy"):
        win_rate_table({"a": [1.0], "b": [1.0]}, {"a": [0.0]})
    with pytest.raises(ValueError, match="scorer 'a'.*shapes"):
        win_rate_table({"a": [1.0, 2.0]}, {"a": [0.0]})
    with pytest.raises(ValueError, match="ci"):
        win_rate_stats([1.0], [0.0], ci="normal")
    lower = win_rate_table({"fid": [1.0, 5.0]}, {"fid": [2.0, 2.0]}, higher_is_better={"fid": False})
    assert lower["fid"]["win_rate"] == 0.5 and lower["fid"]["wins"] == 1


# --------------------------------------------------------------------------- mismatch probe


def _mean_rgb(images: list[Image.Image]) -> torch.Tensor:
    # A deterministic embedder: [1, mean R, mean G, mean B]; the constant keeps embeddings off the origin.
    arr = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images])
    means = arr.mean(dim=(1, 2)) / 255.0
    return torch.cat([torch.ones(len(images), 1), means], dim=1)


def _shift_red(im: Image.Image, shift: int) -> Image.Image:
    a = np.asarray(im.convert("RGB"), dtype=np.int32).copy()
    a[..., 0] = np.clip(a[..., 0] + shift, 0, 255)
    return Image.fromarray(a.astype(np.uint8))


def test_cosine_distances_math() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(cosine_distances(a, b, paired=True), torch.tensor([0.0, 0.0, 2.0]))
    full = cosine_distances(a, b)
    assert full.shape == (3, 3)
    torch.testing.assert_close(full[0], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="equal shapes"):
        cosine_distances(a, b[:2], paired=True)


def test_mismatch_identical_sets_is_zero() -> None:
    rng = np.random.default_rng(0)
    base = [_solid(tuple(int(x) for x in rng.integers(0, 120, 3))) for _ in range(6)]
    paired = reference_mismatch(base, list(base), _mean_rgb, paired=True)
    assert paired["mean_distance"] == pytest.approx(0.0, abs=1e-6) and paired["n_pairs"] == 6
    same = [_solid((40, 50, 60))] * 4
    allpairs = reference_mismatch(same, same, _mean_rgb)
    assert allpairs["mean_distance"] == pytest.approx(0.0, abs=1e-6) and allpairs["n_pairs"] == 16
    assert allpairs["centroid_distance"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("paired", [True, False])
def test_mismatch_grows_with_colour_shift(paired: bool) -> None:
    rng = np.random.default_rng(1)
    base = [_solid(tuple(int(x) for x in rng.integers(20, 80, 3))) for _ in range(8)]
    shifts = [0, 20, 60, 120, 170]
    dists = [
        reference_mismatch(base, [_shift_red(im, s) for im in base], _mean_rgb, paired=paired)[
            "mean_distance"
        ]
        for s in shifts
    ]
    assert all(d1 < d2 for d1, d2 in zip(dists, dists[1:])), dists


def test_mismatch_with_real_embedders(tiny_dirs: dict[str, Path]) -> None:
    base, other = _images(10, 4), _images(11, 4)
    for path in (tiny_dirs["dino"], tiny_dirs["clip"]):
        emb = ImageEmbedder.from_pretrained(path, batch_size=3)
        e = embed_images(emb, base)
        assert e.shape[0] == 4 and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
        same = reference_mismatch(base, base, emb, paired=True)
        assert same["mean_distance"] == pytest.approx(0.0, abs=1e-5)
        diff = reference_mismatch(base, other, emb, paired=True)
        assert diff["mean_distance"] > 1e-4
    # Scorers with embed_images() are embedders too, and agree with ImageEmbedder on the same weights.
    dino = build_scorer("dino", str(tiny_dirs["dino"]))
    torch.testing.assert_close(
        embed_images(dino, base), embed_images(ImageEmbedder.from_pretrained(tiny_dirs["dino"]), base)
    )
    clip = build_scorer("clip", str(tiny_dirs["clip"]))
    torch.testing.assert_close(
        embed_images(clip, base), embed_images(ImageEmbedder.from_pretrained(tiny_dirs["clip"]), base)
    )
    with pytest.raises(ValueError, match="paired"):
        reference_mismatch(base, other[:2], emb, paired=True)
    with pytest.raises(ValueError, match="expected"):
        embed_images(lambda ims: torch.zeros(len(ims) + 1, 3), base)


def test_mismatch_note() -> None:
    assert "MaPO recommended" in mismatch_note(0.5, threshold=0.3)
    assert mismatch_note(0.5, threshold=0.3).startswith("large mismatch")
    low = mismatch_note({"mean_distance": 0.1}, threshold=0.3)
    assert low.startswith("small mismatch") and "MaPO recommended" not in low
