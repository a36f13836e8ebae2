"""Conversion of the released HPSv2 (open_clip ViT-H-14) and ImageReward (BLIP + MLP) checkpoints.

The checkpoints are tiny random state dicts of the released layouts (the same key names and shape rules,
open_clip's fused ``in_proj_weight`` included), built here. The converted models are checked against
forwards written here from the original layouts: open_clip's blocks run through
``nn.MultiheadAttention`` on the fused weights (the module open_clip uses), BLIP's ViT and BERT are
written out from salesforce BLIP's ``vit.py`` / ``med.py``. The real dimensions are checked on meta
tensors (shapes only, no memory).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffalign.eval import HPSv2, ImageReward
from diffalign.eval.convert import (
    RECORD_FILE,
    ConversionError,
    convert_checkpoint,
    convert_hpsv2_state_dict,
    convert_imagereward_state_dict,
)
from diffalign.eval.embedding import pooled
from diffalign.eval.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD
from diffalign.models.reward_heads import IMAGEREWARD_HEAD
from diffalign.models.tiny.scorers import save_tiny_clip, save_tiny_imagereward
from diffalign.models.tiny.tokenizer import tiny_clip_vocab
from PIL import Image
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
Make = Callable[..., Tensor]

# Tiny dimensions; vision and text widths and the projection all differ, so a missed transpose or a
# tower mix-up is a shape error rather than a silent wrong result.
OC = dict(v_width=32, v_layers=2, v_heads=2, patch=8, image=32, t_width=24, t_layers=2, t_heads=2, ctx=77,
          embed=16)
BL = dict(v_width=24, v_layers=2, v_heads=2, patch=8, image=32, t_width=32, t_layers=2, t_heads=2,
          max_pos=64, embed=16, head=(64, 32, 16, 8))
PROMPTS = ["a red cat", "the blue painting of a dog"]


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(7)
    arrays = [(torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy() for _ in range(2)]
    return [Image.fromarray(a) for a in arrays]


def _randn(seed: int) -> tuple[Make, Make, Make]:
    """Weight, LayerNorm-scale and bias makers on one generator."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    def ln(d: int) -> Tensor:
        return 1.0 + 0.1 * torch.randn(d, generator=g)

    def b(d: int) -> Tensor:
        return 0.1 * torch.randn(d, generator=g)

    return w, ln, b


def _meta() -> tuple[Make, Make, Make]:
    def w(*shape: int) -> Tensor:
        return torch.empty(shape, device="meta")

    return w, w, w


# ---------------------------------------------------------------------------------------------------------
# open_clip layout (HPSv2)
# ---------------------------------------------------------------------------------------------------------


def open_clip_state_dict(dims: dict, vocab: int, make: tuple[Make, Make, Make]) -> dict[str, Tensor]:
    """Keys and shapes of open_clip's ``CLIP`` (ViT-H-14 in the release): ``x @ proj`` projections, fused
    ``attn.in_proj_*`` of ``nn.MultiheadAttention``, a bias-free ``conv1``."""
    w, ln, b = make
    sd: dict[str, Tensor] = {}

    def block(prefix: str, d: int) -> None:
        for name in ("ln_1", "ln_2"):
            sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"] = ln(d), b(d)
        sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"] = w(3 * d, d), b(3 * d)
        sd[prefix + "attn.out_proj.weight"], sd[prefix + "attn.out_proj.bias"] = w(d, d), b(d)
        sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"] = w(4 * d, d), b(4 * d)
        sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"] = w(d, 4 * d), b(d)

    vw, tw, grid = dims["v_width"], dims["t_width"], dims["image"] // dims["patch"]
    sd["visual.conv1.weight"] = w(vw, 3, dims["patch"], dims["patch"])
    sd["visual.class_embedding"] = w(vw)
    sd["visual.positional_embedding"] = w(grid * grid + 1, vw)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = ln(vw), b(vw)
    for i in range(dims["v_layers"]):
        block(f"visual.transformer.resblocks.{i}.", vw)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = ln(vw), b(vw)
    sd["visual.proj"] = w(vw, dims["embed"])
    sd["token_embedding.weight"] = w(vocab, tw)
    sd["positional_embedding"] = w(dims["ctx"], tw)
    for i in range(dims["t_layers"]):
        block(f"transformer.resblocks.{i}.", tw)
    sd["ln_final.weight"], sd["ln_final.bias"] = ln(tw), b(tw)
    sd["text_projection"] = w(tw, dims["embed"])
    meta = sd["visual.proj"].is_meta
    sd["logit_scale"] = w() if meta else torch.tensor(math.log(1 / 0.07))
    return sd


def _oc_block(x: Tensor, sd: dict[str, Tensor], p: str, heads: int, mask: Tensor | None = None) -> Tensor:
    # open_clip's ResidualAttentionBlock: pre-LN, nn.MultiheadAttention on the fused weights, GELU MLP.
    d = x.shape[-1]
    mha = nn.MultiheadAttention(d, heads, batch_first=True)
    names = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    mha.load_state_dict({n: sd[f"{p}attn.{n}"] for n in names})
    h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5)
    x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                 sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x + h


@torch.no_grad()
def oc_encode_image(sd: dict[str, Tensor], px: Tensor) -> Tensor:
    """open_clip ``VisionTransformer``: patches + class token + positions, ln_pre, blocks, ln_post on the
    class token, ``@ proj``."""
    vw = sd["visual.conv1.weight"].shape[0]
    x = F.conv2d(px, sd["visual.conv1.weight"], stride=OC["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, vw), x], dim=1)
    x = F.layer_norm(x + sd["visual.positional_embedding"], (vw,), sd["visual.ln_pre.weight"],
                     sd["visual.ln_pre.bias"], eps=1e-5)
    for i in range(OC["v_layers"]):
        x = _oc_block(x, sd, f"visual.transformer.resblocks.{i}.", OC["v_heads"])
    cls = F.layer_norm(x[:, 0], (vw,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return cls @ sd["visual.proj"]


@torch.no_grad()
def oc_encode_text(sd: dict[str, Tensor], ids: Tensor) -> Tensor:
    """open_clip ``encode_text``: the fixed 77-token context, a causal mask, ln_final, the feature at the
    largest token id (end of text), ``@ text_projection``."""
    tw, n = sd["token_embedding.weight"].shape[1], ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(OC["t_layers"]):
        x = _oc_block(x, sd, f"transformer.resblocks.{i}.", OC["t_heads"], mask)
    x = F.layer_norm(x, (tw,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def _open_clip_ids(tokenizer, prompts: list[str]) -> Tensor:
    # open_clip's tokenizer: start, tokens, end, zeros up to the 77-token context.
    rows = tokenizer(prompts)["input_ids"]
    return torch.tensor([r + [0] * (OC["ctx"] - len(r)) for r in rows])


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    processor = save_tiny_clip(root / "processor")  # the tiny CLIP's tokenizer + image processor
    sd = open_clip_state_dict(OC, len(tiny_clip_vocab()[0]), _randn(0))
    ckpt = root / "HPS_v2_compressed.pt"
    torch.save({"state_dict": sd}, ckpt)  # the release wraps its weights like this
    out = convert_checkpoint("hpsv2", ckpt, root / "converted", processor=processor,
                             heads=(OC["v_heads"], OC["t_heads"]))
    return sd, out


def test_hpsv2_converted_clip_matches_the_open_clip_forward(hps):
    from transformers import CLIPModel

    sd, out = hps
    model = CLIPModel.from_pretrained(out).eval()
    scorer = HPSv2.from_pretrained(out)
    px = scorer.image_processor(images=_images(), return_tensors="pt")["pixel_values"]
    tok = scorer.processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = pooled(model.get_image_features(pixel_values=px))
        txt = pooled(model.get_text_features(**tok))
    ref_img = oc_encode_image(sd, px)
    ref_txt = oc_encode_text(sd, _open_clip_ids(scorer.processor.tokenizer, PROMPTS))
    torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(txt, ref_txt, rtol=1e-4, atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    # The scorer on the folder: HPSv2's cosine of the open_clip features, x100.
    scores = scorer.score(_images(), PROMPTS)
    ref = 100 * F.cosine_similarity(ref_img, ref_txt, dim=-1)
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)
    assert scores[0] != scores[1]

    # Negative control: q and k swapped in one layer (the split taken in the wrong order) changes both towers.
    for tower, inputs in (("vision_model", dict(pixel_values=px)), ("text_model", dict(tok))):
        attn = getattr(model, tower).encoder.layers[0].self_attn
        with torch.no_grad():
            q, k = attn.q_proj.weight.clone(), attn.k_proj.weight.clone()
            attn.q_proj.weight.copy_(k)
            attn.k_proj.weight.copy_(q)
            get = model.get_image_features if tower == "vision_model" else model.get_text_features
            swapped = pooled(get(**inputs))
            attn.q_proj.weight.copy_(q)
            attn.k_proj.weight.copy_(k)
        ref_t = ref_img if tower == "vision_model" else ref_txt
        assert (swapped - ref_t).abs().max() > 1e-3


def test_hpsv2_record_and_folder(hps):
    _, out = hps
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["architecture"] == "CLIPModel" and record["heads"] == [OC["v_heads"], OC["t_heads"]]
    assert record["dropped"] == [] and record["filled"] == []
    assert record["processor"]["image_size"] == OC["image"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["hidden_act"] == "gelu" and cfg["text_config"]["hidden_act"] == "gelu"


def test_hpsv2_unknown_missing_and_misshapen_keys_fail_naming_them():
    base = open_clip_state_dict(OC, 50, _randn(1))
    heads = (OC["v_heads"], OC["t_heads"])
    convert_hpsv2_state_dict(base, heads)  # control: the intact layout converts
    extra = dict(base, **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(OC["v_width"])})
    with pytest.raises(ConversionError, match=r"visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        convert_hpsv2_state_dict(extra, heads)
    gone = {k: v for k, v in base.items() if k != "transformer.resblocks.1.attn.in_proj_bias"}
    with pytest.raises(ConversionError, match=r"text_model\.encoder\.layers\.1\.self_attn\.k_proj\.bias"):
        convert_hpsv2_state_dict(gone, heads)
    bad = dict(base, **{"ln_final.weight": torch.ones(OC["t_width"] + 1)})
    with pytest.raises(ConversionError, match=r"ln_final\.weight"):
        convert_hpsv2_state_dict(bad, heads)
    with pytest.raises(ConversionError, match="not divisible by 5"):
        convert_hpsv2_state_dict(base, (5, 2))
    # open_clip's (non-persistent, in older releases saved) causal mask is a derived buffer: dropped.
    conv = convert_hpsv2_state_dict(dict(base, attn_mask=torch.zeros(77, 77)), heads)
    assert conv.dropped == ["attn_mask"]


def test_hpsv2_vit_h14_shapes_map_onto_the_vit_h14_clip_config():
    # The released dimensions, on meta tensors: the full key and shape check against CLIPModel runs.
    vit_h = dict(v_width=1280, v_layers=32, v_heads=16, patch=14, image=224, t_width=1024, t_layers=24,
                 t_heads=16, ctx=77, embed=1024)
    conv = convert_hpsv2_state_dict(open_clip_state_dict(vit_h, 49408, _meta()))
    v, t = conv.config.vision_config, conv.config.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (
        1280, 5120, 32, 16)
    assert (v.patch_size, v.image_size, v.hidden_act) == (14, 224, "gelu")
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (
        1024, 4096, 24, 16)
    assert (t.vocab_size, t.max_position_embeddings, t.eos_token_id, t.hidden_act) == (
        49408, 77, 49407, "gelu")
    assert conv.config.projection_dim == 1024
    assert conv.state_dict["vision_model.encoder.layers.31.self_attn.v_proj.weight"].shape == (1280, 1280)
    assert conv.state_dict["text_projection.weight"].shape == (1024, 1024)


# ---------------------------------------------------------------------------------------------------------
# ImageReward layout (BLIP, salesforce; ImageReward's MLP head)
# ---------------------------------------------------------------------------------------------------------


def imagereward_state_dict(dims: dict, vocab: int, make: tuple[Make, Make, Make]) -> dict[str, Tensor]:
    """Keys and shapes of ImageReward's model: ``blip.`` = BLIP_Pretrain (timm-style ViT with fused qkv,
    med.py BERT with cross-attention, vision/text projections), ``mlp.`` = the reward head."""
    w, ln, b = make
    sd: dict[str, Tensor] = {}
    vw, tw, grid = dims["v_width"], dims["t_width"], dims["image"] // dims["patch"]
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = w(1, 1, vw)
    sd[v + "pos_embed"] = w(1, grid * grid + 1, vw)
    sd[v + "patch_embed.proj.weight"] = w(vw, 3, dims["patch"], dims["patch"])
    sd[v + "patch_embed.proj.bias"] = b(vw)
    for i in range(dims["v_layers"]):
        p = f"{v}blocks.{i}."
        for name in ("norm1", "norm2"):
            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = ln(vw), b(vw)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = w(3 * vw, vw), b(3 * vw)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = w(vw, vw), b(vw)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = w(4 * vw, vw), b(4 * vw)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = w(vw, 4 * vw), b(vw)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = ln(vw), b(vw)
    e = "blip.text_encoder.embeddings."
    sd[e + "word_embeddings.weight"] = w(vocab, tw)
    sd[e + "position_embeddings.weight"] = w(dims["max_pos"], tw)
    sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"] = ln(tw), b(tw)
    sd[e + "position_ids"] = torch.arange(dims["max_pos"]).expand(1, -1).to(sd[e + "LayerNorm.bias"].device)
    for i in range(dims["t_layers"]):
        p = f"blip.text_encoder.encoder.layer.{i}."
        for att, kv_in in (("attention.", tw), ("crossattention.", vw)):
            sd[p + att + "self.query.weight"], sd[p + att + "self.query.bias"] = w(tw, tw), b(tw)
            sd[p + att + "self.key.weight"], sd[p + att + "self.key.bias"] = w(tw, kv_in), b(tw)
            sd[p + att + "self.value.weight"], sd[p + att + "self.value.bias"] = w(tw, kv_in), b(tw)
            sd[p + att + "output.dense.weight"], sd[p + att + "output.dense.bias"] = w(tw, tw), b(tw)
            sd[p + att + "output.LayerNorm.weight"], sd[p + att + "output.LayerNorm.bias"] = ln(tw), b(tw)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = w(4 * tw, tw), b(4 * tw)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = w(tw, 4 * tw), b(tw)
        sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"] = ln(tw), b(tw)
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = w(dims["embed"], vw), b(dims["embed"])
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = w(dims["embed"], tw), b(dims["embed"])
    sizes = [tw, *dims["head"], 1]
    for idx, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:])):
        sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"] = w(n_out, n_in), b(n_out)
    return sd


def _lin(x: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


@torch.no_grad()
def blip_encode_image(sd: dict[str, Tensor], px: Tensor) -> Tensor:
    """BLIP's ``VisionTransformer.forward`` (eps 1e-6), attention as ``vit.py`` splits its fused qkv."""
    v, heads = "blip.visual_encoder.", BL["v_heads"]
    x = F.conv2d(px, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=BL["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[v + "pos_embed"][:, : x.shape[1]]
    B, N, C = x.shape
    for i in range(BL["v_layers"]):
        p = f"{v}blocks.{i}."
        h = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = _lin(h, sd, p + "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, val = qkv[0], qkv[1], qkv[2]
        att = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        x = x + _lin((att @ val).transpose(1, 2).reshape(B, N, C), sd, p + "attn.proj")
        h = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        x = x + _lin(F.gelu(_lin(h, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
    return F.layer_norm(x, (C,), sd[v + "norm.weight"], sd[v + "norm.bias"], eps=1e-6)


def _bert_attention(x: Tensor, ctx: Tensor, add_mask: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    # med.py BertSelfAttention + BertSelfOutput: scores / sqrt(d) + additive mask, post-LN residual.
    heads, (B, L, D) = BL["t_heads"], x.shape
    hd = D // heads

    def split(t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], heads, hd).permute(0, 2, 1, 3)

    q, k, val = split(_lin(x, sd, p + "self.query")), split(_lin(ctx, sd, p + "self.key")), split(
        _lin(ctx, sd, p + "self.value"))
    probs = (q @ k.transpose(-1, -2) / math.sqrt(hd) + add_mask).softmax(dim=-1)
    out = (probs @ val).permute(0, 2, 1, 3).reshape(B, L, D)
    return F.layer_norm(_lin(out, sd, p + "output.dense") + x, (D,), sd[p + "output.LayerNorm.weight"],
                        sd[p + "output.LayerNorm.bias"], eps=1e-12)


@torch.no_grad()
def imagereward_reference(sd: dict[str, Tensor], px: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """``ImageReward.score``: BLIP text encoder (mode multimodal) over the image tokens, ``[CLS]`` through
    the MLP (no activations), standardised."""
    img = blip_encode_image(sd, px)
    e, D = "blip.text_encoder.embeddings.", BL["t_width"]
    x = sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][: ids.shape[1]]
    x = F.layer_norm(x, (D,), sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"], eps=1e-12)
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(BL["t_layers"]):
        p = f"blip.text_encoder.encoder.layer.{i}."
        x = _bert_attention(x, x, self_mask, sd, p + "attention.")
        x = _bert_attention(x, img, torch.zeros(()), sd, p + "crossattention.")  # all image tokens attended
        h = _lin(F.gelu(_lin(x, sd, p + "intermediate.dense")), sd, p + "output.dense")
        x = F.layer_norm(h + x, (D,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"],
                         eps=1e-12)
    r = x[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = _lin(r, sd, f"mlp.layers.{idx}")
    return ((r.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).float()


@pytest.fixture(scope="module")
def imr(tmp_path_factory):
    root = tmp_path_factory.mktemp("imr")
    processor = save_tiny_imagereward(root / "processor")  # the tiny BlipProcessor (WordPiece tokenizer)
    from transformers import BlipProcessor

    vocab = len(BlipProcessor.from_pretrained(processor).tokenizer)
    sd = imagereward_state_dict(BL, vocab, _randn(2))
    ckpt = root / "ImageReward.pt"
    torch.save(sd, ckpt)  # the release is the bare state dict
    out = convert_checkpoint("imagereward", ckpt, root / "converted", processor=processor,
                             heads=(BL["v_heads"], BL["t_heads"]))
    return sd, out


def test_imagereward_converted_scorer_matches_the_blip_forward(imr):
    sd, out = imr
    scorer = ImageReward.from_pretrained(out)
    images = _images()
    px = scorer.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tok = scorer.processor.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35,
                                     return_tensors="pt")
    ref = imagereward_reference(sd, px, tok["input_ids"], tok["attention_mask"])
    scores = scorer.score(images, PROMPTS)
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-5)
    # Each stage on its own, too: the ViT's image tokens.
    with torch.no_grad():
        tokens = scorer.model.vision_model(pixel_values=px).last_hidden_state
    torch.testing.assert_close(tokens, blip_encode_image(sd, px), rtol=1e-4, atol=1e-5)
    assert scores[0] != scores[1]

    # Negative control: cross-attention key and value swapped in one layer moves the scores off the reference.
    xattn = scorer.model.text_encoder.encoder.layer[0].crossattention.self
    with torch.no_grad():
        k, v = xattn.key.weight.clone(), xattn.value.weight.clone()
        xattn.key.weight.copy_(v)
        xattn.value.weight.copy_(k)
    assert (scorer.score(images, PROMPTS) - ref).abs().max() > 1e-3


def test_imagereward_record_head_and_filled_itm(imr):
    sd, out = imr
    from safetensors.torch import load_file

    head = load_file(str(out / IMAGEREWARD_HEAD))
    assert sorted(head) == sorted(k.removeprefix("mlp.") for k in sd if k.startswith("mlp."))
    assert all(torch.equal(head[k], sd["mlp." + k]) for k in head)
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["dropped"] == ["blip.text_encoder.embeddings.position_ids"]
    assert record["filled"] == ["itm_head.bias", "itm_head.weight"]
    weights = load_file(str(out / "model.safetensors"))
    assert not weights["itm_head.weight"].any()
    torch.testing.assert_close(weights["vision_model.encoder.layers.1.self_attn.qkv.weight"],
                               sd["blip.visual_encoder.blocks.1.attn.qkv.weight"], rtol=0, atol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["layer_norm_eps"] == 1e-6 and cfg["text_config"]["layer_norm_eps"] == 1e-12


def test_imagereward_unknown_and_missing_keys_fail_naming_them():
    base = imagereward_state_dict(BL, 60, _randn(3))
    heads = (BL["v_heads"], BL["t_heads"])
    convert_imagereward_state_dict(base, heads)  # control: the intact layout converts
    decoder = dict(base, **{"blip.text_decoder.cls.predictions.bias": torch.zeros(60)})
    with pytest.raises(ConversionError, match=r"blip\.text_decoder\.cls\.predictions\.bias"):
        convert_imagereward_state_dict(decoder, heads)
    odd = dict(base, **{"blip.text_encoder.encoder.layer.0.attention.self.distance_embedding.weight":
                        torch.zeros(3, 16)})
    with pytest.raises(ConversionError, match=r"attention\.self\.distance_embedding"):
        convert_imagereward_state_dict(odd, heads)
    no_head = {k: v for k, v in base.items() if k != "mlp.layers.7.bias"}
    with pytest.raises(ConversionError, match=r"mlp\.layers\.7\.bias"):
        convert_imagereward_state_dict(no_head, heads)
    no_proj = {k: v for k, v in base.items() if not k.startswith("blip.text_proj.")}
    with pytest.raises(ConversionError, match=r"text_proj\.weight"):
        convert_imagereward_state_dict(no_proj, heads)
    cross = dict(base, **{"blip.text_encoder.encoder.layer.1.crossattention.self.key.weight":
                          torch.zeros(BL["t_width"], BL["v_width"] + 2)})
    with pytest.raises(ConversionError, match=r"layer\.1\.crossattention\.self\.key\.weight"):
        convert_imagereward_state_dict(cross, heads)


def test_imagereward_release_shapes_map_onto_vit_l_and_bert_base():
    real = dict(v_width=1024, v_layers=24, v_heads=16, patch=16, image=224, t_width=768, t_layers=12,
                t_heads=12, max_pos=512, embed=256, head=(1024, 128, 64, 16))
    conv = convert_imagereward_state_dict(imagereward_state_dict(real, 30524, _meta()))
    v, t = conv.config.vision_config, conv.config.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (
        1024, 4096, 24, 16)
    assert (v.patch_size, v.image_size, v.layer_norm_eps) == (16, 224, 1e-6)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.encoder_hidden_size) == (
        768, 12, 12, 1024)
    assert (t.vocab_size, t.max_position_embeddings, conv.config.image_text_hidden_size) == (30524, 512, 256)
    assert conv.head is not None and conv.head["layers.0.weight"].shape == (1024, 768)


# ---------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------


def _recipe():
    spec = importlib.util.spec_from_file_location("convert_scorer", ROOT / "recipes" / "convert_scorer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_converts_a_wrapped_ddp_checkpoint_and_refuses_other_layouts(tmp_path, capsys):
    recipe = _recipe()
    sd = open_clip_state_dict(OC, len(tiny_clip_vocab()[0]), _randn(4))
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, ckpt)
    processor = save_tiny_clip(tmp_path / "processor")
    out = tmp_path / "hps"
    args = ["--kind", "hpsv2", "--checkpoint", str(ckpt), "--out", str(out), "--processor", str(processor),
            "--vision-heads", "2", "--text-heads", "2", "--verify"]
    assert recipe.main(args) == 0
    assert '"verify"' in capsys.readouterr().out
    weights = HPSv2.from_pretrained(out).model.state_dict()
    q = weights["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    fused = sd["transformer.resblocks.0.attn.in_proj_weight"]
    torch.testing.assert_close(q, fused[: OC["t_width"]], rtol=0, atol=0)
    # An ImageReward checkpoint given as HPSv2 fails (status 2) naming keys it does not know.
    other = tmp_path / "ImageReward.pt"
    torch.save(imagereward_state_dict(BL, 60, _randn(5)), other)
    assert recipe.main(["--kind", "hpsv2", "--checkpoint", str(other), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not part of the open_clip ViT-H-14 layout" in err and "'blip.text_encoder." in err
    with pytest.raises(SystemExit):  # ImageReward's scorer reads its processor from the folder
        recipe.main(["--kind", "imagereward", "--checkpoint", str(other), "--out", str(tmp_path / "y")])


def test_recipe_runs_as_a_script_for_imagereward(imr, tmp_path):
    sd, converted = imr
    ckpt = tmp_path / "ImageReward.pt"
    torch.save(sd, ckpt)
    cmd = [sys.executable, "recipes/convert_scorer.py", "--kind", "imagereward", "--checkpoint", str(ckpt),
           "--out", str(tmp_path / "out"), "--processor", str(converted), "--vision-heads", "2",
           "--text-heads", "2", "--verify"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verify = json.loads(proc.stdout.strip().splitlines()[-1])["verify"]
    direct = ImageReward.from_pretrained(converted).score([Image.new("RGB", (256, 256), (128, 128, 128))],
                                                          ["a photo"])
    assert verify["score"] == pytest.approx(float(direct[0]), abs=1e-5)
