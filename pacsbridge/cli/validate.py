"""``validate``: the model on this site's labelled studies; a proposed site calibration."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    CommandError,
    command_settings,
    database_session,
    load_site_model,
    require_paths,
    results_stream,
)


def run(args: argparse.Namespace) -> int:
    from pacsbridge.inference.files import iter_input_files
    from pacsbridge.validation.labels import LabelsError, read_labels
    from pacsbridge.validation.run import Progress, join, score_for_validation

    if args.from_db:
        return run_from_db(args)
    if args.since:
        raise CommandError("--since goes with --from-db", status=2)
    if not args.paths or not args.labels:
        raise CommandError("give PATH... and --labels FILE.csv, or --from-db", status=2)
    require_paths(args.paths)
    settings = command_settings(args)
    try:
        labels = read_labels(Path(args.labels))
    except LabelsError as exc:
        raise CommandError(f"labels: {exc}", status=2) from None
    model = load_site_model(settings, args.model)
    roots = [Path(p) for p in args.paths]
    files = list(iter_input_files(roots))
    progress = Progress(sys.stderr, every_s=3.0) if not args.quiet else None
    records = score_for_validation(files, model, batch_size=args.batch_size or max(settings.inference_batch_size, 16),
                                   progress=progress, max_decoded_bytes=settings.max_decoded_bytes)
    units, accounting = join(labels, records, roots)
    return _validate_and_report(args, settings, units, accounting, model)


def run_from_db(args: argparse.Namespace) -> int:
    """``validate --from-db``: the same report from recorded predictions and labels (no image sent again)."""
    from pacsbridge.store.events import parse_since
    from pacsbridge.validation.from_db import units_from_db

    if args.paths or args.labels:
        raise CommandError("--from-db takes no PATH and no --labels (the labels are those imported with "
                           "`pacsbridge labels import` and the readers' findings)", status=2)
    since = None
    if args.since:
        try:
            since = parse_since(args.since)
        except ValueError as exc:
            raise CommandError(f"--since: {exc}", status=2) from None
    settings = command_settings(args)
    model = load_site_model(settings, args.model)
    with database_session(settings, "read", "read the recorded predictions") as session:
        units, accounting = units_from_db(session, model, since)
    return _validate_and_report(args, settings, units, accounting, model)


def _validate_and_report(args: argparse.Namespace, settings: object, units: list, accounting: object,
                         model: object) -> int:
    """Validate, write the calibration and report asked for, print the result (files and --from-db alike)."""
    from pacsbridge.validation.run import Options, ValidationInputError, validate

    opts = Options(target_sensitivity=args.target_sensitivity, ood_keep=args.ood_keep,
                   confidence=args.confidence or settings.validation_confidence,
                   min_per_class=settings.validation_min_per_class,
                   max_unusable_share=settings.validation_max_unusable_share)
    try:
        result = validate(units, accounting, model, opts)
    except ValidationInputError as exc:
        raise CommandError(str(exc), status=2) from None
    status = _write_calibration(args, result)
    if args.report:
        _write_report(Path(args.report), result, units, model)
    with results_stream() as out:
        if args.json:
            out.write(json.dumps(result) + "\n")
        else:
            out.write(_validation_summary(result))
    return status


def _write_calibration(args: argparse.Namespace, result: dict) -> int:
    """Write the proposed calibration when asked (1 when it cannot be: the results are printed all the same)."""
    from pacsbridge.validation.calibration import write_calibration
    from pacsbridge.validation.run import calibration_content

    result["calibration_written"] = None
    if not args.write_calibration:
        return 0
    if result["calibration_refused"]:
        print(f"pacsbridge validate: no calibration written: {result['calibration_refused']}", file=sys.stderr)
        return 1
    target = Path(args.write_calibration)
    try:
        cal_id = write_calibration(target, calibration_content(result))
    except OSError as exc:
        raise CommandError(f"cannot write {target}: {exc.strerror or exc}") from None
    result["calibration_written"] = {"file": str(target), "id": cal_id}
    return 0


def _write_report(folder: Path, result: dict, units: list, model: object) -> None:
    from pacsbridge.validation.report import write_report
    from pacsbridge.validation.run import evaluate_units

    oods = [im.ood_score for u in units for im in u.images if im.ood_score is not None]
    try:
        write_report(folder, result, evaluate_units(units, model, result["at_current"]["ood_threshold"]),
                     evaluate_units(units, model, result["proposed"]["ood_threshold"]), oods)
    except OSError as exc:
        raise CommandError(f"cannot write the report into {folder}: {exc.strerror or exc}") from None


def _validation_summary(r: dict) -> str:
    def point(name: str, p: dict) -> str:
        def v(key: str) -> str:
            ci = p.get(key + "_ci")
            return "n/a" if p[key] is None else f"{p[key]:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
        thr = "none" if p["threshold"] is None else f"{p['threshold']:.4f}"
        cut = "none" if p["ood_threshold"] is None else f"{p['ood_threshold']:.3f}"
        return (f"{name}: threshold {thr}, OOD cut {cut}, refused {p['refused']}\n"
                f"  sensitivity {v('sensitivity')}  specificity {v('specificity')}  PPV {v('ppv')}  NPV {v('npv')}\n")
    auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f} (95% CI {r['auc_ci'][0]:.3f}-{r['auc_ci'][1]:.3f}, DeLong)"
    lab = r["labels"]
    lines = (f"{r['n']} labelled {r['unit']}s ({r['n_pneumonia']} pneumonia, {r['n_normal']} normal), {r['scored']} "
             f"scored; refused: {', '.join(f'{k} {v}' for k, v in r['refused'].items()) or 'none'}\n"
             f"label rows: {lab['rows']}, unusable {lab['rows_unusable']}; files without a label "
             f"{lab['files_without_label']}\nAUC {auc}\n"
             + point(f"in force ({r['at_current']['calibration']})", r["at_current"])
             + point(f"proposed (target sensitivity {r['target_sensitivity']})", r["proposed"]))
    if r.get("calibration_written"):
        lines += f"calibration written: {r['calibration_written']['file']} (id {r['calibration_written']['id']})\n"
    elif r["calibration_refused"]:
        lines += f"no calibration can be written: {r['calibration_refused']}\n"
    return lines


def _fraction(lo: float, hi: float):  # noqa: ANN202
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo < value < hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return value
    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="validate the model on this site's labelled studies; propose a site calibration",
        description="Score every DICOM file under PATH exactly as the daemon does (header and age gates, "
        "out-of-distribution gate, model, the site calibration in force) and join the scores with --labels: a CSV "
        "with a header, a 'label' column (pneumonia/normal or 1/0) and one key column, the first present of path, "
        "sop_instance_uid, study_instance_uid, accession_number (a study's score is its highest image). Prints n, "
        "refusals, AUC with a 95 % DeLong interval, and sensitivity, specificity, PPV, NPV with 95 % Wilson intervals "
        "at the threshold in force and at the proposed site threshold (the highest whose one-sided lower Wilson bound "
        "on sensitivity is at least the target); the proposed OOD cut keeps --ood-keep of the site's images, never "
        "looser than the model allows. --json prints one object (keys n, scored, refused, auc, auc_ci, at_current, "
        "proposed, ...). Exit status 2 when the labels cannot be used, 1 when a calibration was asked for but "
        "cannot be written (too few labelled images: validation_min_per_class).",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="DICOM file or folder (not with --from-db)")
    p.add_argument("--labels", metavar="FILE.csv", help="labels CSV (see above; not with --from-db)")
    p.add_argument("--from-db", action="store_true", help="build the same report from the predictions the daemon "
                   "recorded and the labels it holds (imported RIS labels, else readers' findings): no image is "
                   "sent again, so a shadow period becomes a site calibration")
    p.add_argument("--since", metavar="DATE", help="with --from-db: only images received since (ISO date/time or 7d)")
    p.add_argument("--target-sensitivity", type=_fraction(0.5, 1.0), default=0.95, metavar="S",
                   help="sensitivity the proposed threshold must reach with confidence (default 0.95)")
    p.add_argument("--ood-keep", type=_fraction(0.5, 1.0), default=0.97, metavar="Q",
                   help="share of the site's images the proposed OOD cut keeps in scope (default 0.97)")
    p.add_argument("--confidence", type=_fraction(0.5, 1.0), default=None, metavar="C",
                   help="one-sided confidence of the sensitivity bound (default: validation_confidence, 0.80)")
    p.add_argument("--write-calibration", metavar="OUT.json", help="write the proposed site calibration here")
    p.add_argument("--report", metavar="DIR", help="write report.html and its PNG figures into DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", metavar="FILE", help="model artifact (.pt with its .json card); default: model_path")
    p.add_argument("--batch-size", type=int, default=0, metavar="N", help="images per model call (default 16)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)
