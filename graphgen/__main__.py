"""CLI: python -m graphgen model=opt-30b schedule=zigzag policy=host-offload ..."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import CONF_DIR, register_configs, to_config
from .run import run
from .verify import PassError

register_configs()

# errors whose message says what to change: printed as one line, not a traceback
USER_ERRORS = (ValueError, FileNotFoundError, OSError, MemoryError, KeyError)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(to_config(cfg))
    except (PassError,) + USER_ERRORS as e:
        print(f"graphgen: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
