"""``python -m segtrain [group=option ...] [key=value ...]``: train with a Hydra config.

Under ``torchrun`` every rank runs this module. The ranks join their process group before
Hydra starts, and rank 0's start time (``SEGTRAIN_RUN_TIME``, read by ``hydra.run.dir`` in
configs/train.yaml) names the run directory on all of them, so they share one directory;
ranks other than 0 write nothing of Hydra's there (``hydra.output_subdir=null``) and log only
warnings to the console.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from segtrain import distributed
from segtrain.config import CONFIG_DIR
from segtrain.train import started_options, train
from segtrain.training.signals import STOPPED_EXIT_CODE, RunStopped

log = logging.getLogger("segtrain.train")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@record  # under torchrun: the failing rank's traceback goes into torchrun's error summary
def run(cfg: DictConfig) -> float:
    # The returned score is what Hydra sweepers (Optuna, ...) optimise.
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and not cfg.trainer.resume:
        # A sweep job that is run again (submitit's requeue after a preemption or at the time limit) is given
        # the same run directory: it continues from its checkpoints (a first run finds none and starts afresh).
        cfg.trainer.resume = "auto"
    try:
        return train(cfg, hydra_cfg.runtime.output_dir, overrides=list(hydra_cfg.overrides.task),
                     options=started_options())
    except RunStopped as stopped:  # a signal: last.pt is written, the stop logged; resume with trainer.resume=auto
        stopped.hand_over()  # in a submitit job, SIGUSR2: submitit requeues the job and exits
        sys.exit(STOPPED_EXIT_CODE)
    except Exception as err:  # into train.log too, not only to the console Hydra prints it on
        log.error("the run stopped on an error: %s: %s", type(err).__name__, err)
        raise


def main() -> None:
    if distributed.init_from_env():
        start = distributed.broadcast_object(datetime.now().strftime(distributed.RUN_TIME_FORMAT))
        os.environ.setdefault(distributed.RUN_TIME_ENV, start)
        if not distributed.is_main_process():
            sys.argv.append("hydra.output_subdir=null")
    run()
    distributed.shutdown()


if __name__ == "__main__":
    main()
