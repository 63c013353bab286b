"""Summarise a Hydra multirun of segtrain: one table row per run, per-class Dice bars.

    python scripts/sweep_report.py outputs/multirun/<date>/<time> [--which best] [--extra val/iou/spot] [--over seed]

Reads every numbered run directory of the sweep (its ``metrics.json`` and
``.hydra/overrides.yaml``) and the sweep's ``multirun.yaml``, then writes ``report.md``
(also printed) and ``report.png`` into the sweep directory. A run without ``metrics.json``
failed or is still running; it stays in the table as a failed row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PREFIX = "val"


@dataclass
class Run:
    num: int
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float] | None  # the chosen section of metrics.json; None: no metrics.json
    summary: dict = field(default_factory=dict)  # the whole metrics.json

    @property
    def ok(self) -> bool:
        return self.metrics is not None


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """``["loss=ce", "+x.y=1"]`` -> ``{"loss": "ce", "+x.y": "1"}``; order kept."""
    pairs = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        pairs[key] = value
    return pairs


def load_runs(sweep_dir: Path, which: str) -> list[Run]:
    dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not dirs:
        raise SystemExit(f"{sweep_dir}: no numbered run directories; expected a Hydra multirun directory "
                         "such as outputs/multirun/<date>/<time>")
    runs = []
    for path in dirs:
        overrides_file = path / ".hydra" / "overrides.yaml"
        overrides = parse_overrides(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() \
            else {}
        metrics_file = path / "metrics.json"
        if not metrics_file.is_file():
            runs.append(Run(int(path.name), path, overrides, None))
            continue
        summary = json.loads(metrics_file.read_text())
        if which not in summary:
            raise SystemExit(f"{metrics_file}: no {which!r} section; valid: final, best")
        runs.append(Run(int(path.name), path, overrides, summary[which], summary))
    return runs


def read_multirun(sweep_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The sweep command's overrides and the sweeper params declared in config (empty if absent:
    the Optuna sweeper writes no multirun.yaml)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return [], {}
    hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
    task = list((hydra.get("overrides") or {}).get("task") or [])
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return task, {str(k): str(v) for k, v in params.items()}


def split_overrides(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(overrides shared by every run as ``key=value``, keys whose value differs between runs)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    common, varying = [], []
    for key in keys:
        values = {run.overrides.get(key) for run in runs}
        if len(values) == 1:
            common.append(f"{key}={values.pop()}")
        else:
            varying.append(key)
    return common, varying


def class_names_of(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [n for n in run.summary.get("class_names", []) if n not in names]
    return names


def columns_of(class_names: list[str], extra: list[str]) -> list[tuple[str, str]]:
    """(header, metrics.json key) of every metric column."""
    cols = [("mDice", f"{PREFIX}/mDice"), ("mIoU", f"{PREFIX}/mIoU")]
    cols += [(f"Dice {name}", f"{PREFIX}/dice/{name}") for name in class_names]
    return cols + [(key, key) for key in extra]


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def best_cells(runs: list[Run], key: str, precision: int) -> set[int]:
    """Run numbers holding the best printed value of ``key`` (ties all marked); losses: lowest."""
    values = {run.num: round(_number(run.metrics.get(key)), precision) for run in runs if run.ok}
    values = {num: v for num, v in values.items() if not math.isnan(v)}
    if len(set(values.values())) < 2:  # one run, or all equal: nothing stands out
        return set()
    target = (min if key.endswith("loss") else max)(values.values())
    return {num for num, v in values.items() if v == target}


def markdown_table(runs: list[Run], varying: list[str], columns: list[tuple[str, str]], which: str,
                   precision: int) -> list[str]:
    show_status = not all(run.ok for run in runs)
    show_step = which == "best"
    header = ["run", *varying] + (["status"] if show_status else []) + (["step"] if show_step else [])
    header += [name for name, _ in columns]
    text_cols = 1 + len(varying) + show_status  # left-aligned; numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * text_cols + ["---:"] * (
        len(header) - text_cols)) + "|"]
    best = {key: best_cells(runs, key, precision) for _, key in columns}
    for run in runs:
        cells = [str(run.num), *(run.overrides.get(k, "–") for k in varying)]
        if show_status:
            cells.append("ok" if run.ok else "failed")
        if show_step:
            cells.append(str(run.metrics.get("step", "–")) if run.ok else "–")
        for _, key in columns:
            value = _number(run.metrics.get(key)) if run.ok else None
            text = "–" if value is None else ("nan" if math.isnan(value) else f"{value:.{precision}f}")
            cells.append(f"**{text}**" if run.num in best[key] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def averaged_table(runs: list[Run], varying: list[str], over: str, columns: list[tuple[str, str]],
                   precision: int) -> list[str]:
    """One row per setting: the runs that differ only in ``over`` (e.g. seed) grouped, each column their mean ± the
    sample standard deviation, and how many runs went in."""
    rest = [k for k in varying if k != over]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.ok:
            groups.setdefault(tuple(run.overrides.get(k, "–") for k in rest), []).append(run)
    header = [*rest, f"runs ({over})", *(name for name, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * (len(rest) + 1) + ["---:"] * len(columns))
             + "|"]
    for setting, members in groups.items():
        cells = [*setting, f"{len(members)} ({', '.join(m.overrides.get(over, '–') for m in members)})"]
        for _, key in columns:
            values = [v for m in members if not math.isnan(v := _number(m.metrics.get(key)))]
            if not values:
                cells.append("nan")
                continue
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
            cells.append(f"{mean:.{precision}f} ± {sd:.{precision}f}" if len(values) > 1 else f"{mean:.{precision}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def class_order(runs: list[Run], class_names: list[str]) -> tuple[list[str], str]:
    """Class names rarest first, and a sentence saying how that order was found."""
    shares = [run.summary["class_pixel_share"] for run in runs
              if run.ok and len(run.summary.get("class_pixel_share") or []) == len(class_names)]
    if shares:
        mean = [sum(s[c] for s in shares) / len(shares) for c in range(len(class_names))]
        order = sorted(range(len(class_names)), key=lambda c: mean[c])
        described = ", ".join(f"{class_names[c]} {100 * mean[c]:.1f}%" for c in order)
        return [class_names[c] for c in order], f"classes by training pixel share, rarest first: {described}"
    # Without pixel shares, a run with non-uniform class weights still ranks the classes.
    for run in runs:
        weights = run.summary.get("class_weights") if run.ok else None
        if weights and len(weights) == len(class_names) and len(set(weights)) > 1:
            order = sorted(range(len(class_names)), key=lambda c: -weights[c])
            return ([class_names[c] for c in order],
                    f"classes by descending {run.summary.get('weights_strategy', '')} class weight of run "
                    f"{run.num} (no class_pixel_share in metrics.json)")
    return list(class_names), "classes in dataset order (no pixel share or class weights to rank them)"


def run_label(run: Run, varying: list[str]) -> str:
    parts = [f"{k}={run.overrides[k]}" for k in varying if k in run.overrides]
    return f"{run.num}: " + " ".join(parts) if parts else f"run {run.num}"


def plot(path: Path, runs: list[Run], varying: list[str], class_names: list[str], title: str) -> str | None:
    """Grouped bars: one group per class (rarest first), one bar per run. Returns why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "report.png needs matplotlib (pip install matplotlib, or the dev extra)"
    done = [run for run in runs if run.ok]
    if not done:
        return "no finished run to plot"
    order, how = class_order(done, class_names)
    failed = [str(run.num) for run in runs if not run.ok]
    width = 0.8 / len(done)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(order) * len(done) * 0.45), 4.8))
    cmap = plt.get_cmap("tab10" if len(done) <= 10 else "tab20")
    for i, run in enumerate(done):
        values = [_number(run.metrics.get(f"{PREFIX}/dice/{name}")) for name in order]
        xs = [c + (i - (len(done) - 1) / 2) * width for c in range(len(order))]
        bars = ax.bar(xs, values, width, label=run_label(run, varying), color=cmap(i % cmap.N))
        ax.bar_label(bars, fmt="%.3f", rotation=90, padding=2, fontsize=7)
    ax.set_xticks(range(len(order)), order)
    ax.set_ylim(0, 1.15)  # room for the value labels above bars near 1
    ax.set_ylabel("Dice (of the hard labels) on the val split")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    caption = how + (f"; failed runs not shown: {', '.join(failed)}" if failed else "")
    ax.annotate(caption, xy=(0, -0.12), xycoords="axes fraction", fontsize=7, va="top")
    fig.savefig(path, dpi=120, bbox_inches="tight")  # grows the canvas to hold legend and caption
    plt.close(fig)
    return None


def report(sweep_dir: Path, which: str = "final", extra: list[str] | None = None,
           precision: int = 4, over: str | None = None) -> tuple[str, bool]:
    """Write report.md (and report.png when matplotlib is there); returns the markdown and whether
    the PNG was written."""
    runs = load_runs(sweep_dir, which)
    common, varying = split_overrides(runs)
    task, params = read_multirun(sweep_dir)
    class_names = class_names_of(runs)
    done = [run for run in runs if run.ok]
    monitor = done[0].summary.get("monitor", f"{PREFIX}/mDice") if done else f"{PREFIX}/mDice"
    section = "final evaluation" if which == "final" else f"best checkpoint by {monitor} (step = its optimizer step)"

    for key in extra or []:
        if done and not any(key in run.metrics for run in done):
            valid = sorted({k for run in done for k in run.metrics})
            raise SystemExit(f"--extra {key}: not in the {which!r} metrics of any run; valid: {', '.join(valid)}")

    lines = [f"# Sweep report: {sweep_dir}", ""]
    if task:
        lines.append("Sweep: `python -m segtrain -m " + " ".join(task) + "`")
    if params:
        lines.append("Swept in config (hydra.sweeper.params): " + "; ".join(f"`{k}: {v}`" for k, v in params.items()))
    optuna = sweep_dir / "optimization_results.yaml"
    if optuna.is_file():
        result = yaml.safe_load(optuna.read_text()) or {}
        best = ", ".join(f"{k}={v}" for k, v in (result.get("best_params") or {}).items())
        lines.append(f"Optuna: best value {result.get('best_value')} with {best}")
    lines.append("Common to every run: " + (" ".join(f"`{o}`" for o in common) if common else "none"))
    lines += ["", f"{len(runs)} runs, {len(runs) - len(done)} failed. Metrics of the {section}, val split; "
              "Dice of the hard labels (= F1); bold = best of the column (none when all are equal).", ""]
    lines += markdown_table(runs, varying, columns_of(class_names, extra or []), which, precision)
    if over is not None:
        if over not in varying:
            raise SystemExit(f"--over {over}: not an override that varies between the runs; varying: "
                             f"{', '.join(varying) or 'none'}")
        lines += ["", f"Averaged over {over}: mean ± sample standard deviation of the runs that differ only in it.",
                  ""]
        lines += averaged_table(runs, varying, over, columns_of(class_names, extra or []), precision)
    failed = [run for run in runs if not run.ok]
    if failed:
        lines += ["", "Failed (no metrics.json): " + ", ".join(str(run.num) for run in failed)
                  + ". Either the run raised (Hydra prints its traceback on the sweep's console, not in "
                  "train.log) or it is still running."]
    (sweep_dir / "report.png").unlink(missing_ok=True)  # never leave a figure of an earlier report
    why_not = plot(sweep_dir / "report.png", runs, varying, class_names,
                   f"per-class Dice, {which} metrics: {sweep_dir.parent.name}/{sweep_dir.name}")
    lines += ["", f"Per-class Dice bars: {why_not}" if why_not else "![per-class Dice](report.png)"]
    text = "\n".join(lines) + "\n"
    (sweep_dir / "report.md").write_text(text)
    return text, why_not is None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--which", choices=("final", "best"), default="final",
                        help="metrics of the last evaluation (final) or of the best checkpoint (best)")
    parser.add_argument("--extra", action="append", default=[], metavar="KEY",
                        help="another metrics.json key as a column, e.g. val/iou/spot (repeatable)")
    parser.add_argument("--precision", type=int, default=4, help="decimals printed (and compared for bold)")
    parser.add_argument("--over", metavar="KEY", help="also a table averaged over this override, e.g. seed")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir}: no such directory")
    text, png = report(args.sweep_dir, args.which, args.extra, args.precision, args.over)
    print(text, end="")
    print(f"written: {args.sweep_dir / 'report.md'}" + (f", {args.sweep_dir / 'report.png'}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
