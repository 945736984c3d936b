"""Cost of collecting every refusal reason, as ratios measured in this process.

    .venv/bin/python bench/scoring.py [--model pacsbridge/models/pneumonia-v4.pt] [--repeats 5]

An image refused by its header for intended-use reasons (pydicom-data's RG3: an adult extremity) is
now decoded and scored for its OOD reason too; a CT slice is still refused on its header alone.
Prints the median time per image of the one scoring path (:class:`pacsbridge.scoring.Scorer`) for
RG3 and for a CT slice, each as a ratio to scoring an in-scope chest radiograph (RG1 with a child's
birth date), and the ratio of RG3 to refusing it on the first header reason only (``load_gated``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from pacsbridge.imaging import NotAnalysable
from pacsbridge.inference.gates import AgeRange, load_gated
from pacsbridge.model.artifact import load_model
from pacsbridge.scoring import Scorer

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
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = load_model(args.model, "cpu")
    scorer = Scorer(model)
    with tempfile.TemporaryDirectory() as tmp:
        chest = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm", download=False))
        chest.PatientBirthDate = "20000301"
        kid = Path(tmp) / "kid.dcm"
        chest.save_as(kid)
        hand = Path(get_testdata_file("RG3_UNCR.dcm", download=False))
        ct = Path(get_testdata_file("CT_small.dcm", download=False))
        scorer.score([kid])  # warm up
        base = _median_ms(lambda: scorer.score([kid]), args.repeats)
        all_reasons = _median_ms(lambda: scorer.score([hand]), args.repeats)
        header_only = _median_ms(lambda: scorer.score([ct]), args.repeats)
        ages = AgeRange.from_card(model.card)

        def first_reason() -> None:
            try:
                load_gated(hand, ages)
            except NotAnalysable:
                pass

        first = _median_ms(first_reason, args.repeats)
    print(f"RG3 (every reason, decoded + OOD) / in-scope chest: {all_reasons / base:.2f}")
    print(f"CT slice (header reasons only) / in-scope chest:    {header_only / base:.3f}")
    print(f"RG3 every reason / RG3 first reason only:           {all_reasons / max(first, 1e-6):.1f}")


if __name__ == "__main__":
    main()
