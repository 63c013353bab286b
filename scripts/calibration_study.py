"""Calibrate trained runs on their validation split and score them on held-out data: a markdown table.

For each run directory: ``segtrain.calibrate`` on its ``checkpoints/<checkpoint>`` twice (the temperature
alone, then temperature + bias tuned for ``--objective``), both fitted on the run's own validation split;
then ``segtrain.evaluate`` of the raw, the temperature-scaled and the biased model on a held-out split
(``--held-out`` overrides, by default the synthetic generator with another seed under another root).

    python scripts/calibration_study.py outputs/studies/calibration/0 outputs/studies/calibration/1 \\
        --objective dice/spot --rare spot
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.calibrate import calibrate
from segtrain.evaluate import evaluate_checkpoint

HELD_OUT = ["dataset.root=data/synthetic_held_out", "dataset.generate.seed=7"]


def study(run: Path, checkpoint: str, objective: str, rare: str, held_out: list[str]) -> list[str]:
    source = run / "checkpoints" / checkpoint
    stem = source.stem
    temperature_only, t_entry = calibrate(source, [], str(source.with_name(f"{stem}_temperature.pt")))
    biased, b_entry = calibrate(source, ["decision.tune=true", f"decision.objective={objective}"])
    config = OmegaConf.load(run / "config.yaml")
    setting = f"{'+'.join(config.loss.terms)}, weights={config.weights.strategy}"
    rows = []
    for name, path, extra in (("raw", source, []), (f"T = {t_entry['temperature']:.3f}", temperature_only, []),
                              (f"T + bias {[round(b, 2) for b in b_entry['bias']]}", biased, [])):
        metrics, names = evaluate_checkpoint(path, [*held_out, *extra], report=False)
        c = names.index(rare)
        rows.append(f"| {run} ({setting}) | {name} | {metrics['dice'][c].item():.4f} | "
                    f"{metrics['precision'][c].item():.4f} / {metrics['recall'][c].item():.4f} | "
                    f"{metrics['mDice']:.4f} | {metrics['ece']:.4f} | {metrics['class_ece'][c].item():.4f} |")
    fit = (f"fitted on {b_entry['fitted_on']['name']}: NLL {t_entry['nll'][0]:.4f} -> {t_entry['nll'][1]:.4f}, "
           f"ECE {t_entry['ece'][0]:.4f} -> {t_entry['ece'][1]:.4f}, {objective} {b_entry['objective_value'][0]:.4f} "
           f"-> {b_entry['objective_value'][1]:.4f}")
    return rows + [f"|  | ({fit}) | | | | | |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--checkpoint", default="last.pt")
    parser.add_argument("--objective", default="dice/spot")
    parser.add_argument("--rare", default="spot")
    parser.add_argument("--held-out", nargs="*", default=HELD_OUT, help="overrides that select the held-out split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = [row for run in args.runs for row in study(run, args.checkpoint, args.objective, args.rare, args.held_out)]
    print(f"$ python scripts/calibration_study.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"held out: {' '.join(args.held_out)}\n")
    print(f"| run | model | {args.rare} F1 (Dice) | {args.rare} precision / recall | mDice | ECE (top label) | "
          f"ECE {args.rare} |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
