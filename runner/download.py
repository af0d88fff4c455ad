"""`python -m runner download [overrides]`: fetch every file a run config needs (model,
tokenizer, hub LoRAs) without generating anything; the same overrides as a run."""
from __future__ import annotations

import logging

from .build import arguments
from .build import pipeline as build
from .config.checks import to_spec, validate
from .config.compose import compose
from .errors import ConfigError

logger = logging.getLogger("runner")


def download(overrides: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    build.register_resolvers()
    try:
        spec = to_spec(compose(overrides))
        validate(spec)
        arguments.preflight(spec)
    except ConfigError as error:
        logger.error("%s", error)
        return 2
    try:
        build.fetch_all(spec)
    except (OSError, ValueError) as error:  # DownloadError, a corrupt file, a bad variable
        logger.error("%s", error)
        return 1
    return 0
