"""Shared command-line handling of the recipes: --config, --set overrides, validation first."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def quiet_defaults() -> None:
    """Process defaults for a recipe run, set when `parse_args` runs (never at import): no tokenizer
    fork warnings, and DeepSpeed's CPU accelerator unless a GPU is asked for."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


# Recipes that train into train.output_dir through diffalign.train.driver (or its Ray Train learners),
# whose rerun resumes from the last checkpoint there: their --help ends with RESUME_HELP.
TRAINING_RECIPES = ("preference_offline", "mapo_personalize")
RESUME_HELP = """\
resuming:
  Rerunning the same command resumes from the last checkpoint in train.output_dir.
  To start fresh instead: --set train.resume=false (a fresh run in the same folder), or train into
  a new folder: --set train.output_dir=runs/NEW."""


def _help_text(description: str, caller: dict) -> tuple[str, str | None]:
    """(description, epilog) of a recipe's --help: its whole module docstring when `description` is
    the docstring's first line (as every recipe passes it), and the resume paragraph if it trains."""
    doc = (caller.get("__doc__") or "").strip()
    if description and doc.startswith(description.strip()):
        description = doc
    name = Path(caller.get("__file__") or sys.argv[0]).stem
    return description, RESUME_HELP if name in TRAINING_RECIPES else None


def parse_args(description: str, default_config: str, extra=None) -> tuple[argparse.Namespace, object]:
    description, epilog = _help_text(description, sys._getframe(1).f_globals)
    # Raw: the docstring's command lines and paragraphs are printed as written.
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help="YAML config (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field, e.g. --set objective.beta=2000 (repeatable)")
    if extra:
        extra(parser)
    args = parser.parse_args()  # --help exits here, before torch is imported
    from diffalign.config import ConfigError, load_config

    quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        # Invalid configs fail here, before any model is built or any Ray worker starts.
        print(f"invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    return args, cfg
