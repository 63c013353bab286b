"""``python -m segtrain [group=option ...] [key=value ...]``: train with a Hydra config."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segtrain.train import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    # The returned score is what Hydra sweepers (Optuna, ...) optimise.
    return train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
