"""Shared command-line handling of the recipes: --config, --set overrides, validation first."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def quiet_defaults() -> None:
    """Process defaults for a recipe run, set when `parse_args` runs (never at import): no tokenizer
    fork warnings, and DeepSpeed's CPU accelerator unless a GPU is asked for."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def parse_args(description: str, default_config: str, extra=None) -> tuple[argparse.Namespace, object]:
    from diffalign.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML config (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field, e.g. --set objective.beta=2000 (repeatable)")
    if extra:
        extra(parser)
    args = parser.parse_args()
    quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        # Invalid configs fail here, before any model is built or any Ray worker starts.
        print(f"invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    return args, cfg
