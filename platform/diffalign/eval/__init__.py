"""Evaluation: reward scorers, seed-matched win rates and the reference-mismatch probe.

- ``scorers``: the registry (``build_scorer``, ``build_scorers``, ``score_all``) over ``clip_scorers``
  (PickScore, CLIP score, HPSv2, aesthetic), ``imagereward`` and ``dino``; ``base`` holds the
  ``Scorer`` interface, ``embedding`` the image embedding they and the probe share, ``loading``
  checkpoint loading, ``convert`` the conversion of the released HPSv2 / ImageReward checkpoints into the
  folders those scorers load (``convert_checkpoint``; ``recipes/convert_scorer.py``).
- ``winrate``: seed-matched win rates with confidence intervals.
- ``harness``: ``evaluate_policy``, policy vs base model on a prompt set (``policy_weights`` applies
  the trained weights, ``base_model`` builds the base model and the sampling defaults).
- ``probe``: ``mismatch_probe``, the reference-mismatch probe run; ``mismatch`` its math.

``harness`` and ``probe`` are not imported here: they pull in the config and diffusers.
"""

from diffalign.eval.base import Scorer
from diffalign.eval.clip_scorers import AestheticScorer, ClipScore, HPSv2, PickScore
from diffalign.eval.convert import ConversionError, convert_checkpoint
from diffalign.eval.dino import DinoSimilarity
from diffalign.eval.embedding import ImageEmbedder
from diffalign.eval.imagereward import ImageReward
from diffalign.eval.mismatch import (
    DEFAULT_MISMATCH_THRESHOLD,
    cosine_distances,
    embed_images,
    mismatch_note,
    reference_mismatch,
)
from diffalign.eval.scorers import SCORERS, build_scorer, build_scorers, score_all
from diffalign.eval.winrate import (
    bootstrap_interval,
    outcomes,
    to_markdown,
    wilson_interval,
    win_rate,
    win_rate_stats,
    win_rate_table,
)
from diffalign.models.reward_heads import RewardMLP

__all__ = [
    "DEFAULT_MISMATCH_THRESHOLD",
    "SCORERS",
    "AestheticScorer",
    "ClipScore",
    "ConversionError",
    "DinoSimilarity",
    "HPSv2",
    "ImageEmbedder",
    "ImageReward",
    "PickScore",
    "RewardMLP",
    "Scorer",
    "bootstrap_interval",
    "build_scorer",
    "build_scorers",
    "convert_checkpoint",
    "cosine_distances",
    "embed_images",
    "mismatch_note",
    "outcomes",
    "reference_mismatch",
    "score_all",
    "to_markdown",
    "wilson_interval",
    "win_rate",
    "win_rate_stats",
    "win_rate_table",
]
