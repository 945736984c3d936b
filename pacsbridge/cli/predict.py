"""``predict``: score DICOM files or folders with the model (no daemon, no database)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .common import command_settings, load_site_model, require_paths, results_stream


def run(args: argparse.Namespace) -> int:
    from pacsbridge.inference.files import iter_input_files, score_files

    require_paths(args.paths)
    settings = command_settings(args)
    model = load_site_model(settings, args.model)
    results = score_files(iter_input_files(Path(p) for p in args.paths), model,
                          batch_size=args.batch_size or max(settings.inference_batch_size, 16),
                          heatmaps=Path(args.heatmaps) if args.heatmaps else None,
                          max_decoded_bytes=settings.max_decoded_bytes)
    try:
        with results_stream() as out:
            for r in results:
                if args.json:
                    out.write(json.dumps(r) + "\n")
                elif r.get("skipped"):
                    out.write(f"{r['path']}\t{'failed' if r.get('failed') else 'skipped'}: {r['reason']}\n")
                else:
                    verdict = "POSITIVE" if r["positive"] else "negative"
                    extra = f"\theatmap {r['heatmap']}" if r.get("heatmap") else ""
                    out.write(f"{r['path']}\t{r['probability']:.4f}\t{verdict}{extra}\n")
    except BrokenPipeError:  # e.g. piped into `head`
        with contextlib.suppress(OSError):
            sys.stderr.close()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="score DICOM files or folders with the model (no daemon, no database)",
        description="Score each DICOM file (folders are searched recursively) with the configured model. "
        "Every file gives one line: its probability and verdict, or 'skipped' with the reason (not a chest "
        "radiograph, not DICOM, unreadable, outside the model's intended use, ...). --json prints one JSON "
        "object per file: {path, sop_instance_uid, probability, positive, threshold, model, calibration, ood_score, "
        "state, reasons} or {path, skipped: true, reason, state, reasons}; reasons lists every reason a file was "
        "refused as {code, text}. "
        "Exit status 2 only for usage errors (e.g. a PATH that does not exist).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM file or folder")
    p.add_argument("--json", action="store_true", help="one JSON object per file per line")
    p.add_argument("--model", metavar="FILE", help="model artifact (.pt with its .json card); default: model_path")
    p.add_argument("--batch-size", type=int, default=0, metavar="N", help="images per model call (default 16)")
    p.add_argument("--heatmaps", metavar="DIR", help="write a Grad-CAM overlay PNG (not for diagnostic use) "
                   "for every scored image into DIR")
    p.set_defaults(func=run)
