"""``python -m segtrain [group=option ...] [key=value ...]``: train with a Hydra config."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segtrain.train import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    # The returned score is what Hydra sweepers (Optuna, ...) optimise.
    hydra_cfg = HydraConfig.get()
    return train(cfg, hydra_cfg.runtime.output_dir, overrides=list(hydra_cfg.overrides.task))


if __name__ == "__main__":
    main()
