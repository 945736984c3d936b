"""Benchmark: DICOM file -> model input tensor, reduced decode vs full-resolution reference.

For pydicom-data's RG1 chest (1955x1841, 15-bit, MONOCHROME1) stored uncompressed and as
lossless JPEG 2000, times ``load_for_model(path)`` (read, gate, decode, Modality LUT/VOI) plus
``preprocess`` (to the (1, 192, 192) tensor), on the reduced path and with
``full_resolution=True``, and prints the median milliseconds and the speed-up of each.

    .venv/bin/python bench/decode.py [--repeats 15] [--torch-threads 1]

Timings depend on the machine's load (printed); compare ratios from one run only.  On a busy
2-core box torch's default intra-op threads make ``preprocess`` of a ~240 px image take ~100 ms
(threads wait for a core) against ~0.3 ms single-threaded: ``--torch-threads 1`` shows that.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from pydicom.data import get_testdata_file

from pacsbridge.imaging import load_for_model
from pacsbridge.model.preprocess import preprocess

FILES = ("RG1_J2KR.dcm", "RG1_UNCR.dcm")


def time_once(path: str, full_resolution: bool) -> tuple[float, float, str]:
    start = time.perf_counter()
    result = load_for_model(path, full_resolution=full_resolution)
    tensor = preprocess(result.image)
    total = (time.perf_counter() - start) * 1e3
    assert tuple(tensor.shape) == (1, 192, 192)
    return total, result.decode_ms, f"{result.decoder} 1/{result.reduction} -> {result.image.shape}"


def median_ms(path: str, full_resolution: bool, repeats: int) -> tuple[float, float, str]:
    time_once(path, full_resolution)  # warm-up: imports, library loading, page cache
    runs = [time_once(path, full_resolution) for _ in range(repeats)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[0][2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per case (median is printed)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads for preprocess (0: leave torch's default)")
    args = parser.parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    load = os.getloadavg()
    print(f"CPUs: {os.cpu_count()}, load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"repeats: {args.repeats}, torch threads: {torch.get_num_threads()}")
    print(f"{'file':14s} {'path':8s} {'total ms':>9s} {'decode ms':>10s}  decoder")
    for name in FILES:
        path = get_testdata_file(name, download=False)
        if path is None:
            print(f"{name}: not installed (pydicom-data)")
            continue
        full_total, full_decode, full_how = median_ms(path, True, max(3, args.repeats // 3))
        red_total, red_decode, red_how = median_ms(path, False, args.repeats)
        print(f"{name:14s} {'full':8s} {full_total:9.1f} {full_decode:10.1f}  {full_how}")
        print(f"{name:14s} {'reduced':8s} {red_total:9.1f} {red_decode:10.1f}  {red_how}")
        print(f"{name:14s} speed-up (full / reduced, total): {full_total / red_total:.1f}x")


if __name__ == "__main__":
    main()
