"""Cost of the OOD score and the heatmap next to plain scoring, as ratios measured in this process.

    .venv/bin/python bench/gates.py [--model pacsbridge/models/pneumonia-v4.pt] [--batch 8] [--threads 2]

Prints the median time of ``probabilities_from_inputs`` (logits only) and ``score_inputs`` (logits +
OOD score, one forward pass) on the same random batch, their ratio, and the Grad-CAM time per image.
Uses CUDA when present (``--device auto``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pacsbridge.model.artifact import load_model
from pacsbridge.model.heatmap import grad_cam

REPO = Path(__file__).resolve().parents[1]


def _median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "pacsbridge" / "models" / "pneumonia-v4.pt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device)
    if model.ood is None:
        raise SystemExit(f"{args.model} carries no OOD statistics")
    x = torch.randn(args.batch, 1, model.input_size, model.input_size)
    model.probabilities_from_inputs(x), model.score_inputs(x)  # warm up
    plain, gated = [], []
    for _ in range(3):  # interleaved rounds: a noisy box slows both alike
        plain.append(_median_ms(lambda: model.probabilities_from_inputs(x), args.repeats))
        gated.append(_median_ms(lambda: model.score_inputs(x), args.repeats))
    p, g = statistics.median(plain), statistics.median(gated)
    image = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    grad_cam(model, image)
    cam = _median_ms(lambda: grad_cam(model, image), 5)
    print(f"device {model.device}, batch {args.batch}, {args.threads} threads")
    print(f"  probabilities only      {p:8.1f} ms/batch")
    print(f"  probabilities + OOD     {g:8.1f} ms/batch   ratio {g / p:.2f}")
    print(f"  Grad-CAM (1024x1024)    {cam:8.1f} ms/image")


if __name__ == "__main__":
    main()
