"""Preference-pair datasets, transforms, latent cache and bad-input accounting."""

from diffalign.data.collate import collate_pairs
from diffalign.data.files import ImageFolderDataset, PairFileDataset
from diffalign.data.issues import DataError, DataIssues
from diffalign.data.latent_cache import (
    LatentPairDataset,
    StaleCacheError,
    cache_fingerprint,
    encode_latents,
    precompute_latents,
)
from diffalign.data.pickapic import PickAPicPairs
from diffalign.data.stream import MaterializedPairs, PairStream, shard_bounds
from diffalign.data.transforms import PairTransform, decode_image, to_pil, to_tensor

__all__ = [
    "DataError",
    "DataIssues",
    "ImageFolderDataset",
    "LatentPairDataset",
    "MaterializedPairs",
    "PairFileDataset",
    "PairStream",
    "PairTransform",
    "PickAPicPairs",
    "StaleCacheError",
    "cache_fingerprint",
    "collate_pairs",
    "decode_image",
    "encode_latents",
    "precompute_latents",
    "shard_bounds",
    "to_pil",
    "to_tensor",
]
