"""Check a dataset before training: every bad pair of every split, at once.

Takes the training command's overrides (the config is composed from configs/train.yaml with
Hydra's compose API, so the dataset is exactly the one ``python -m segtrain`` would read) and
walks the train and val splits, or the ones named with ``--split``. Reports unpaired files,
unreadable images and masks, mask/image size mismatches, labels outside the classes and
unknown mask colours, then the pixel and image counts per class of the good pairs and their ignored pixels
(``ignore_index``: count and share of all pixels).
Exit status 1 when anything is wrong.

    python scripts/check_dataset.py dataset=voc dataset.root=/data/VOCdevkit/VOC2012
    python scripts/check_dataset.py dataset=folder dataset.root=/data/mine dataset.num_classes=4 --split test
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.build import dataset_split, resolve_num_workers
from segtrain.config import compose_config
from segtrain.config.checks import class_names_of
from segtrain.data.check import SplitReport, check_split, format_report


def check(overrides: list[str], splits: list[str] | None = None, workers: int | None = None) -> list[SplitReport]:
    cfg = compose_config(overrides)
    ds = cfg.dataset
    if ds.layout == "shards":
        raise SystemExit(f"dataset.layout=shards: the pairs of {ds.root} were checked one by one when python -m "
                         "segtrain.shard wrote them (and each read names its shard); check the source dataset instead")
    class_names = class_names_of(ds)
    if workers is None:  # trainer.num_workers, resolved as for a CPU run: no model competes here
        workers = resolve_num_workers(cfg.trainer.num_workers, torch.device("cpu"))
    reports = []
    for split in splits or [ds.train_split, ds.val_split]:
        try:
            dataset = dataset_split(ds, split, allow_unpaired=True)
        except (OSError, ValueError) as err:  # empty split, missing directory or list file, bad list line
            report = SplitReport(split, problems=[str(err)])
        else:
            report = check_split(dataset, num_workers=workers)
        print(format_report(report, class_names), flush=True)
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", action="append", help="split to check (repeatable); default: train and val")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: trainer.num_workers)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m segtrain")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    reports = check(args.overrides, args.split, args.workers)
    bad = sum(len(r.problems) for r in reports)
    if bad:
        print(f"FAILED: {bad} problem(s) in {sum(not r.ok for r in reports)} of {len(reports)} split(s)")
        return 1
    print(f"OK: {sum(r.num_pairs for r in reports)} pairs in {len(reports)} split(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
