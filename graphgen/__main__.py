"""CLI: python -m graphgen model=opt-30b schedule=zigzag policy=host-offload ..."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from .config import register_configs, to_config
from .run import run

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    run(to_config(cfg))


if __name__ == "__main__":
    main()
