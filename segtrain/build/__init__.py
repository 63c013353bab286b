"""Config -> objects, for every command: what runs (``model``: device, precision, model, loss, optimizer), the data
(``data``: datasets, their checked pass, loaders) and a checkpoint on a split (``on_split``).

Every entry point (training, evaluation, the statistics report, the scripts) composes its objects here, so a
run, its evaluation and its benchmarks see the same data and model. This and the entry points are the only
code that reads the config tree; what they build takes plain arguments.
"""

from segtrain.build.data import (PadCollate, TrainingData, build_data, build_loaders, dataset_split, eval_loader,
                                 eval_split, eval_transform_of, palette_for, split_counts, stats_of,
                                 train_transform_of)
from segtrain.build.model import (build_loss_fn, build_model, build_parts, class_weights_of, inference_runtime,
                                  model_from_checkpoint, place_model, resolve_num_workers, seed_everything,
                                  weights_column_options)
from segtrain.build.on_split import CheckpointOnSplit
from segtrain.config.options import build_runtime

__all__ = ["CheckpointOnSplit", "PadCollate", "TrainingData", "build_data", "build_loaders", "build_loss_fn",
           "build_model", "build_parts", "build_runtime", "class_weights_of", "dataset_split", "eval_loader",
           "eval_split", "eval_transform_of", "inference_runtime", "model_from_checkpoint", "palette_for",
           "place_model", "resolve_num_workers", "seed_everything", "split_counts", "stats_of", "train_transform_of",
           "weights_column_options"]
