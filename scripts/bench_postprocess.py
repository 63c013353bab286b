"""What the component rules add to prediction: images/s of ``Predictor`` (the model, then its labels) with and
without a checkpoint's post-processing rules, per image size, as a ratio in the same run.

A UNet-R18 with random weights predicts 3 classes on random images, which gives far more, smaller components than a
trained model (the rules' worst case). The rules: remove components under 64 px in classes 1 and 2, fill holes up
to 64 px in class 1, keep class 2's largest component; whole-image inference (sliding windows for 2048x2048, tile
512), the labels as ``segtrain.predict`` computes them.

    python scripts/bench_postprocess.py                     # 512 and 2048 on CPU
    python scripts/bench_postprocess.py --sizes 512 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import segtrain  # noqa: F401
from segtrain.analysis.postprocess import ClassRules, PostProcess
from segtrain.inference import InferenceOptions, labels_of, predict_probs
from segtrain.inference.postprocessing import apply_to_probabilities
from segtrain.models import UNet

RULES = PostProcess({1: ClassRules(min_size=64, max_hole=64), 2: ClassRules(min_size=64, keep_largest=True)})


def _seconds(size: int, repeats: int, rules: PostProcess | None, model: torch.nn.Module) -> float:
    options = InferenceOptions(mode="whole" if size <= 1024 else "slide", tile=(512, 512), overlap=0.25)
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(size))
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        probs = predict_probs(model, image, options)
        labels = labels_of(probs) if rules is None else apply_to_probabilities(probs, rules)
        np.asarray(labels)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNet(num_classes=3, encoder="resnet18").eval()
    print(f"UNet(resnet18), 3 classes, random weights, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| image | without rules (images/s) | with rules (images/s) | time added |\n|---|---|---|---|")
    with torch.no_grad():
        for size in args.sizes:
            plain, ruled = (_seconds(size, args.repeats, rules, model) for rules in (None, RULES))
            print(f"| {size}x{size} | {1 / plain:.3f} | {1 / ruled:.3f} | {100 * (ruled / plain - 1):+.1f}% |")


if __name__ == "__main__":
    main()
