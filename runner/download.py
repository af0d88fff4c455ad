"""`python -m runner download [overrides]`: fetch every file a run config needs (model,
tokenizer, hub LoRAs) without generating anything; the same overrides as a run."""
from __future__ import annotations

import logging

from . import build
from .config.checks import to_spec, validate
from .config.compose import compose
from .errors import ConfigError

logger = logging.getLogger("runner")


def download(overrides: list[str]) -> int:
    from pipelines import fetch

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        spec = to_spec(compose(overrides))
        validate(spec)
        build.preflight(spec)
    except ConfigError as error:
        logger.error("%s", error)
        return 2
    try:
        build.ensure_built(spec)
        configs, tokenizer, processor = build.model_configs(spec, build.resolve_runtime(spec))
        loras = [build.lora_source(item, spec) for _, _, item in spec.lora.items()]
        hub_loras = [lora for lora in loras if not isinstance(lora, str)]
        # a config with skip_download (the built demo model) is only checked on disk;
        # fetch logs its own summary
        fetch([*configs, tokenizer, processor, *hub_loras])
    except (OSError, ValueError) as error:  # DownloadError, a corrupt file, a bad variable
        logger.error("%s", error)
        return 1
    return 0
