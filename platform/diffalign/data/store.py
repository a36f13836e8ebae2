"""The pair store: a dataset prepared once (validated, optionally VAE- and text-encoded) and read by
every run, learner and sweep trial without re-encoding, local or on object storage.

Layout of a store root (a folder or a URI, `diffalign.data.uri`):
- `pairs-NNNNN.safetensors`: one shard of consecutive valid pairs. Tensors: `latents`
  (n, views, [chosen, rejected], moments, C, h, w) in the store dtype (bf16 by default) when encoded,
  else the still-encoded images as ragged bytes (`chosen_bytes` + `chosen_offsets`, `rejected_...`);
  always `prompt_bytes` + `prompt_offsets` (UTF-8 prompts), `source_index` (the row in the source,
  which seeds each read's draws as it does for the in-memory path), `prompt_id` (row of the prompt
  embeddings) and, when sizes matter (SDXL), `sizes` (n, views, 4): original h, w, crop top, left.
  `views` is 2 when `data.random_flip` (the image as first read and its mirror), `moments` is 2 when
  the posterior std is kept (`latent_sampling: sample`).
- `pairs-NNNNN.json`: the shard's record (rows, source rows covered, bad-input counts), written
  after the shard: a shard without its record is unfinished and is made again.
- `prompts-NNNNN.safetensors`: text-encoder outputs, one row per unique prompt (`embeds`, `pooled`).
- `manifest.json`: written last; a store without it is incomplete. It lists every shard, the source
  files with their fingerprints, the VAE / text-encoder identity and dtype, resolution and crop policy
  and the drop counts by kind.

Reading never loads a shard: `PairStore.item` reads one pair's bytes at their offsets (`read_at`,
i.e. pread locally and a ranged GET on S3), so a learner's memory is bounded by its batch and
read-ahead, whatever the store holds, and each rank reads only the rows it trains on.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffalign.data import uri
from diffalign.data.latent_cache import sample_latents
from diffalign.data.transforms import latent_draws

STORE_FORMAT = 1
MANIFEST = "manifest.json"
PAIR_SHARD = "pairs-{:05d}.safetensors"
PROMPT_SHARD = "prompts-{:05d}.safetensors"
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64,
              "U8": torch.uint8, "I32": torch.int32}


class StoreError(ValueError):
    """A store that cannot serve this run: incomplete, another format, or made for other models."""


# --------------------------------------------------------------------------------------- identity

def module_digest(module: torch.nn.Module | None) -> str | None:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes): two VAEs with one
    config but other weights (sd-vae-ft-mse vs the original) differ here."""
    if module is None:
        return None
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def model_identity(bundle: Any) -> dict[str, Any]:
    """What made a store's latents and embeddings: VAE and text-encoder weights and dtypes."""
    vae = bundle.vae
    return {
        "family": bundle.family,
        "vae": module_digest(vae),
        "vae_dtype": str(next(vae.parameters()).dtype).removeprefix("torch."),
        "text_encoders": [module_digest(e) for e in bundle.text_encoders],
        "text_encoder_dtype": str(next(bundle.text_encoders[0].parameters()).dtype).removeprefix("torch."),
        "tokenizer_max_length": [getattr(t, "model_max_length", None) for t in bundle.tokenizers],
        # Flow families: the T5 / VL token budget the embeddings were made with (None for the UNets).
        "max_sequence_length": getattr(bundle, "max_sequence_length", None),
    }


# --------------------------------------------------------------------------------------- writing

def ragged(values: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length byte strings -> (uint8 concatenation, int64 offsets of length n + 1)."""
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(v) for v in values])
    data = np.frombuffer(b"".join(values), dtype=np.uint8) if offsets[-1] else np.zeros(0, np.uint8)
    return torch.from_numpy(data.copy()), torch.from_numpy(offsets)


def _save(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    uri.write_bytes_atomic(path, data)
    return len(data)


def write_pair_shard(root: str, shard: int, *, prompts: Sequence[str], prompt_ids: Sequence[int],
                     source_index: Sequence[int], latents: torch.Tensor | None = None,
                     chosen: Sequence[bytes] | None = None, rejected: Sequence[bytes] | None = None,
                     sizes: torch.Tensor | None = None) -> dict[str, Any]:
    """Writes shard `shard` of `root` atomically; returns its manifest entry (without its record)."""
    n = len(prompts)
    if not (len(prompt_ids) == len(source_index) == n):
        raise ValueError("prompts, prompt_ids and source_index must have one entry per pair")
    tensors: dict[str, torch.Tensor] = {}
    tensors["prompt_bytes"], tensors["prompt_offsets"] = ragged([p.encode() for p in prompts])
    tensors["prompt_id"] = torch.as_tensor(list(prompt_ids), dtype=torch.int64)
    tensors["source_index"] = torch.as_tensor(list(source_index), dtype=torch.int64)
    if latents is not None:
        if latents.shape[0] != n or latents.dim() != 7:
            raise ValueError(f"latents must be (n={n}, views, 2, moments, C, h, w), "
                             f"got {tuple(latents.shape)}")
        tensors["latents"] = latents
    else:
        if chosen is None or rejected is None or len(chosen) != n or len(rejected) != n:
            raise ValueError("a shard without latents needs the chosen and rejected image bytes")
        tensors["chosen_bytes"], tensors["chosen_offsets"] = ragged(list(chosen))
        tensors["rejected_bytes"], tensors["rejected_offsets"] = ragged(list(rejected))
    if sizes is not None:
        tensors["sizes"] = sizes.to(torch.int64)
    name = PAIR_SHARD.format(shard)
    nbytes = _save(uri.join(root, name), tensors)
    return {"file": name, "rows": n, "bytes": nbytes}


def write_prompt_shard(root: str, shard: int, embeds: torch.Tensor, pooled: torch.Tensor | None) -> dict:
    tensors = {"embeds": embeds}
    if pooled is not None:
        tensors["pooled"] = pooled
    name = PROMPT_SHARD.format(shard)
    return {"file": name, "rows": int(embeds.shape[0]), "bytes": _save(uri.join(root, name), tensors)}


def write_json(path: str, record: Mapping[str, Any]) -> None:
    uri.write_bytes_atomic(path, json.dumps(record, indent=1, sort_keys=True, default=str).encode())


def read_json(path: str) -> dict[str, Any] | None:
    if not uri.is_file(path):
        return None
    return json.loads(uri.read_bytes(path))


def read_manifest(root: str) -> dict[str, Any]:
    manifest = read_json(uri.join(root, MANIFEST))
    if manifest is None:
        raise StoreError(f"{root} is not a complete pair store ({MANIFEST} missing): prepare it with "
                         f"`python recipes/prepare_data.py --config ...` (a killed prepare resumes)")
    if manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{uri.join(root, MANIFEST)}: store format {manifest.get('format')}, this version "
                         f"reads {STORE_FORMAT}; prepare the store again")
    return manifest


# --------------------------------------------------------------------------------------- reading

class _Shard:
    """One safetensors shard read by byte ranges: its header once, then only the rows asked for."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = uri.open_input(path)
        (n,) = struct.unpack("<Q", self.file.read_at(8, 0))
        header = json.loads(self.file.read_at(n, 8))
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.tensors = {k: (_ST_DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"][0])
                        for k, v in header.items()}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (a copy, in its stored dtype)."""
        dtype, shape, begin = self.tensors[name]
        row = int(np.prod(shape[1:], dtype=np.int64)) * torch.tensor([], dtype=dtype).element_size()
        data = self.file.read_at((stop - start) * row, self.base + begin + start * row)
        out = torch.frombuffer(bytearray(data), dtype=dtype) if len(data) else torch.empty(0, dtype=dtype)
        return out.view(stop - start, *shape[1:])

    def ragged(self, name: str, j: int) -> bytes:
        lo, hi = self.rows(f"{name}_offsets", j, j + 2).tolist()
        _, _, begin = self.tensors[f"{name}_bytes"]
        return bytes(self.file.read_at(hi - lo, self.base + begin + lo)) if hi > lo else b""

    def close(self) -> None:
        self.file.close()


class _Shards:
    """Open shards, at most `limit` at once (a store has hundreds; file handles are finite). Random
    reads over more shards than that reopen one, re-reading its header: a ranged GET more on S3."""

    def __init__(self, root: str, files: Sequence[str], limit: int = 256) -> None:
        self.root, self.files, self.limit = root, list(files), limit
        self.open: OrderedDict[int, _Shard] = OrderedDict()
        self.lock = threading.Lock()  # reader threads (data.num_workers) share the handles

    def __getitem__(self, k: int) -> _Shard:
        with self.lock:
            shard = self.open.get(k)
            if shard is None:
                shard = self.open[k] = _Shard(uri.join(self.root, self.files[k]))
                while len(self.open) > self.limit:
                    self.open.popitem(last=False)[1].close()
            self.open.move_to_end(k)
            return shard

    def close(self) -> None:
        with self.lock:
            for shard in self.open.values():
                shard.close()
            self.open.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Open handles and locks do not pickle; a copy in another process opens its own.
        return {"root": self.root, "files": self.files, "limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["files"], state["limit"])


class PairStore(torch.utils.data.Dataset):
    """Map-style reader of a pair store's rows [start, stop), read one pair at a time.

    `item(i, epoch)` returns what the step reads: with latents, `chosen_latents` / `rejected_latents`
    drawn as `diffalign.train.cache.CachedPairs` draws them (`sampling="sample"`: the latents and the
    flip of read (epoch, source row) from `latent_draws`; `"mean"`: the stored means as first read),
    plus `prompt_embeds` (and `pooled_embeds`) when the store holds text embeddings; without latents,
    the pixel pair as the file readers give it (`transform` decodes and crops). Reads are
    thread-safe. Nothing is held per row: memory does not grow with the store.
    """

    def __init__(self, root: str, manifest: dict[str, Any] | None = None, *, start: int = 0,
                 stop: int | None = None, sampling: str = "mean", seed: int = 0, transform: Any = None,
                 embeddings: bool = True) -> None:
        self.root = str(root)
        self.manifest = manifest or read_manifest(self.root)
        total = int(self.manifest["pairs"])
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"rows [{start}, {stop}) outside the store's {total} pairs")
        self.sampling, self.seed, self.transform = sampling, seed, transform
        enc = self.manifest["encoding"]
        self.has_latents = bool(enc.get("latents"))
        if self.has_latents and sampling == "sample" and enc.get("moments", 1) < 2:
            raise StoreError(f"{self.root} keeps the latent means only; data.latent_sampling=sample needs "
                             "the posterior std: prepare with prepare.latents=moments, or set "
                             "data.latent_sampling=mean")
        self.flips = sampling == "sample" and enc.get("views", 1) == 2
        self.embeddings = embeddings and bool(self.manifest.get("prompt_shards"))
        pairs = self.manifest["shards"]
        self._ends = list(np.cumsum([s["rows"] for s in pairs]))
        self._prompt_ends = list(np.cumsum([s["rows"] for s in self.manifest.get("prompt_shards", [])]))
        self._pairs = _Shards(self.root, [s["file"] for s in pairs])
        self._prompts = _Shards(self.root, [s["file"] for s in self.manifest.get("prompt_shards", [])])
        self.epoch = 0

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def holds_pixels(self) -> bool:
        """Items are pixel pairs (a store without latents), asked without reading one."""
        return not self.has_latents

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i, self.epoch)

    def _locate(self, ends: list, row: int) -> tuple[int, int]:
        k = bisect.bisect_right(ends, row)
        return k, row - (int(ends[k - 1]) if k else 0)

    def item(self, i: int, epoch: int) -> dict[str, Any]:
        """Pair i of this view as read at `epoch`: a function of (seed, epoch, source row) alone."""
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} outside this view's {len(self)} pairs")
        k, j = self._locate(self._ends, self.start + i)
        shard = self._pairs[k]
        prompt = shard.ragged("prompt", j).decode()
        index = int(shard.rows("source_index", j, j + 1)[0])
        out: dict[str, Any] = {"prompt": prompt}
        view = 0
        if self.has_latents:
            lat = shard.rows("latents", j, j + 1)[0].float()  # (views, 2, moments, C, h, w)
            if self.sampling == "mean":
                chosen, rejected = lat[0, 0, 0], lat[0, 1, 0]
            else:
                flip, seed_w, seed_l = latent_draws(self.seed, epoch, index)
                view = int(flip and self.flips)
                both = sample_latents(lat[view, :, 0], lat[view, :, 1], [seed_w, seed_l])
                chosen, rejected = both[0], both[1]
            out["chosen_latents"], out["rejected_latents"] = chosen, rejected
        else:
            from diffalign.data.transforms import decode_image, item_rng

            images = [decode_image(shard.ragged(side, j)) for side in ("chosen", "rejected")]
            pair = self.transform(*images, item_rng(self.seed, epoch, index))
            out.update(pair)
            if self.sampling == "sample":
                _, seed_w, seed_l = latent_draws(self.seed, epoch, index)
                out["latent_seeds"] = (seed_w, seed_l)
        if self.has_latents and shard.has("sizes"):
            size = shard.rows("sizes", j, j + 1)[0, view].tolist()
            out["original_size"], out["crop_top_left"] = (size[0], size[1]), (size[2], size[3])
        if self.embeddings:
            pid = int(shard.rows("prompt_id", j, j + 1)[0])
            pk, pj = self._locate(self._prompt_ends, pid)
            pshard = self._prompts[pk]
            out["prompt_embeds"] = pshard.rows("embeds", pj, pj + 1)[0].float()
            if pshard.has("pooled"):
                out["pooled_embeds"] = pshard.rows("pooled", pj, pj + 1)[0].float()
        return out

    def close(self) -> None:
        self._pairs.close()
        self._prompts.close()


def _mismatch(field: str, stored: Any, now: Any) -> str:
    return f"{field}: store {stored!r}, this run {now!r}"


def open_store(root: str, *, identity: Mapping[str, Any], resolution: int, center_crop: bool,
               random_flip: bool, sampling: str, seed: int, heldout: int, transform: Any = None,
               embeddings: bool = True) -> tuple[PairStore, PairStore | None]:
    """(train, held-out) views of the store at `root` for a run, after checking that it was prepared
    for this run's models and image policy; the last `heldout` pairs are held out (read as means)."""
    manifest = read_manifest(root)
    enc, made = manifest["encoding"], manifest.get("model", {})
    problems = []
    if enc.get("latents") or (embeddings and manifest.get("prompt_shards")):
        if made.get("family") != identity["family"]:
            problems.append(_mismatch("model.family", made.get("family"), identity["family"]))
    if enc.get("latents"):
        if made.get("vae") != identity["vae"]:
            problems.append(_mismatch("VAE weights (model.pretrained / model.vae)", made.get("vae"),
                                      identity["vae"]))
        if enc.get("resolution") != resolution:
            problems.append(_mismatch("model.resolution", enc.get("resolution"), resolution))
        if enc.get("center_crop") != center_crop:
            problems.append(_mismatch("data.center_crop", enc.get("center_crop"), center_crop))
        if random_flip and sampling == "sample" and enc.get("views", 1) != 2:
            problems.append(_mismatch("data.random_flip (mirrored latents kept)", False, True))
    texts = made.get("text_encoders")
    if embeddings and manifest.get("prompt_shards") and texts != identity["text_encoders"]:
        problems.append(_mismatch("text encoder weights", texts, identity["text_encoders"]))
    tokens = made.get("max_sequence_length")
    if embeddings and manifest.get("prompt_shards") and tokens != identity.get("max_sequence_length"):
        problems.append(_mismatch("model.max_sequence_length (text tokens of the stored embeddings)", tokens,
                                  identity.get("max_sequence_length")))
    if problems:
        raise StoreError(f"{uri.join(root, MANIFEST)} was prepared for another setup than this run's:\n  "
                         + "\n  ".join(problems)
                         + "\nprepare a store for this config (recipes/prepare_data.py) or point data.path "
                         "at one made for it")
    n = int(manifest["pairs"])
    if heldout and n <= heldout:
        raise StoreError(f"data.heldout_pairs={heldout} leaves no training pairs: {root} holds {n} pairs")
    common = dict(seed=seed, transform=transform, embeddings=embeddings)
    flip_ok = random_flip and sampling == "sample"
    train = PairStore(root, manifest, stop=n - heldout, sampling=sampling, **common)
    train.flips = train.flips and flip_ok
    held = PairStore(root, manifest, start=n - heldout, sampling="mean", **common) if heldout else None
    return train, held
