"""The ``pacsbridge`` command.  Each subcommand is registered by an ``_add_<name>`` function.

Settings come from ``--config FILE`` (or PACSBRIDGE_CONFIG, else /etc/pacsbridge/pacsbridge.toml when
it exists) plus PACSBRIDGE_* environment
variables; an invalid value stops the command with a message naming the key (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from pacsbridge import __version__
from pacsbridge.config import ConfigError, Settings, load_settings

log = logging.getLogger("pacsbridge")


def setup_logging(level: str, log_format: str = "text") -> None:
    from pacsbridge.logs import TEXT_FORMAT, formatter

    logging.basicConfig(level=level, format=TEXT_FORMAT, stream=sys.stderr, force=True)
    if log_format != "text":  # log_format = "json": one JSON object per line (pacsbridge/logs.py)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(formatter(log_format))
    # pynetdicom is chatty at INFO (every PDU/DIMSE message); keep it for DEBUG runs.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # APScheduler logs every job run at INFO (every few seconds): keep that for DEBUG runs too.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # Alembic logs each migration step and its context at INFO on every command that opens the
    # database; highdicom logs several "copy attributes" lines per SR built.  Both are library
    # detail: shown at DEBUG, their warnings always.
    for chatty in ("alembic", "highdicom"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # pydicom warns (and logs) about every odd value in bad input; a hostile peer could fill the journal.
    # Those go to DEBUG: the receiver logs one WARNING line per rejected instance instead.
    logging.getLogger("pydicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _WarningsToDebug) for f in warnings_logger.filters):
        warnings_logger.addFilter(_WarningsToDebug())
    # pynetdicom logs a traceback at ERROR for each malformed PDU or DIMSE message a peer sends (then aborts
    # the association): that is the peer's error, one WARNING line without the traceback (unless DEBUG).
    if level != "DEBUG":
        for handler in logging.getLogger().handlers:
            handler.addFilter(_PynetdicomOneLine())


class _PynetdicomOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("pynetdicom") and record.levelno >= logging.ERROR:
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                record.msg, record.args = f"{record.getMessage()} ({type(exc).__name__})", None
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _WarningsToDebug(logging.Filter):
    """Python warnings (pydicom's included) are logged at DEBUG, and only when DEBUG is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    setup_logging(settings.log_level, settings.log_format)
    return settings


# -- serve -------------------------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> int:
    from pacsbridge.daemon import Daemon, StartupError

    settings = _settings(args)
    log.info("pacsbridge %s starting (data dir %s)", __version__, settings.data_dir.resolve())
    try:
        return Daemon(settings).run()
    except StartupError as exc:
        from pacsbridge.logs import operator_line

        print(operator_line(f"pacsbridge serve: cannot start: {exc}", settings.log_format), file=sys.stderr)
        return 1


def _cmd_worker(args: argparse.Namespace) -> int:
    from pacsbridge.daemon import StartupError, WorkerDaemon

    settings = _settings(args)
    log.info("pacsbridge %s worker starting (data dir %s)", __version__, settings.data_dir.resolve())
    try:
        return WorkerDaemon(settings).run()
    except StartupError as exc:
        from pacsbridge.logs import operator_line

        print(operator_line(f"pacsbridge worker: cannot start: {exc}", settings.log_format), file=sys.stderr)
        return 1


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="run only the inference worker (extra worker processes; no DICOM, no HTTP)",
        description="Score instances that `pacsbridge serve` stored, until SIGTERM or SIGINT (then finish the "
        "batch in hand and exit 0).  Uses the same configuration as serve: the same database and the same "
        "data_dir (spool), and the model settings.  It does not migrate: the database must already be at the "
        "latest schema.  Several workers never score one instance twice; on PostgreSQL run as many as the "
        "hardware allows, on SQLite they must share serve's host and one write lock (one is usually enough). "
        "worker_enabled only concerns serve.",
    )
    p.set_defaults(func=_cmd_worker)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the daemon (DICOM receiver and the configured stages) until SIGTERM/SIGINT",
        description="Migrate the database to the latest schema, then receive DICOM (C-ECHO, C-STORE) and run "
        "the configured stages until SIGTERM or SIGINT; then stop accepting associations, let the running "
        "ones finish and exit 0.",
    )
    p.set_defaults(func=_cmd_serve)


# -- db ----------------------------------------------------------------------------------------
def _cmd_db(args: argparse.Namespace) -> int:
    from pacsbridge.store import migrations
    from pacsbridge.store.db import make_engine

    from pacsbridge.daemon import _first_line

    settings = _settings(args)
    if args.db_command == "current":  # read-only: never create a database to report on it
        engine = open_existing_database(settings, "db current", require_head=False)
        if engine is None:
            return 1
        engine.dispose()
    try:
        engine = make_engine(settings.database_url)
    except OSError as exc:
        print(f"pacsbridge db: data_dir {settings.data_dir.resolve()}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    shown = engine.url.render_as_string(hide_password=True)
    try:
        if args.db_command == "upgrade":
            migrations.upgrade(engine, args.revision)
        elif args.db_command == "downgrade":
            migrations.downgrade(engine, args.revision)
        print(f"database {shown} at revision {migrations.current_revision(engine)} (head {migrations.head_revision()})")
    except Exception as exc:  # noqa: BLE001 - unreachable server, unknown revision...: one line, no traceback
        print(f"pacsbridge db {args.db_command}: database {shown}: {_first_line(exc)}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


def _add_db(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema: upgrade (to the latest), downgrade, current",
                       description="Manage the database schema with the Alembic migrations shipped in the package.")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="{upgrade,downgrade,current}")
    up = dbsub.add_parser("upgrade", help="apply migrations up to REVISION (default: head, the latest)")
    up.add_argument("revision", nargs="?", default="head")
    down = dbsub.add_parser("downgrade", help="revert migrations down to REVISION (e.g. base: drops every table)")
    down.add_argument("revision")
    dbsub.add_parser("current", help="print the current and latest revision")
    p.set_defaults(func=_cmd_db)


# -- read-only commands: the database must exist and be migrated --------------------------------
def open_existing_database(settings: Settings, command: str, require_head: bool = True):  # noqa: ANN201 - Engine | None
    """The engine of an existing, migrated database, or None after printing one line saying what is wrong.

    Read-only commands never create anything: run from another directory without the daemon's
    configuration they would otherwise make an empty ./var and report nothing (or "no such table").
    """
    logging.getLogger("alembic").setLevel(logging.WARNING)  # only reads the revision: its INFO lines are noise
    from sqlalchemy.engine import make_url

    from pacsbridge.daemon import _first_line
    from pacsbridge.store import migrations
    from pacsbridge.store.db import make_engine

    url = make_url(settings.database_url)
    shown = url.render_as_string(hide_password=True)
    where = (f"data_dir {settings.data_dir}, current directory {Path.cwd()}" if not settings.data_dir.is_absolute()
             else f"data_dir {settings.data_dir}")
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).is_file():
        print(f"pacsbridge {command}: no pacsbridge database at {url.database} ({where}); give the daemon's "
              "configuration (--config FILE, or PACSBRIDGE_DATA_DIR / PACSBRIDGE_DATABASE_URL), or create it with "
              "`pacsbridge db upgrade`", file=sys.stderr)
        return None
    engine = make_engine(settings.database_url)
    try:
        current, head = migrations.current_revision(engine), migrations.head_revision()
    except Exception as exc:  # noqa: BLE001 - unreachable server, unreadable file
        engine.dispose()
        print(f"pacsbridge {command}: cannot read the database {shown}: {_first_line(exc)}", file=sys.stderr)
        return None
    if require_head and current != head:
        engine.dispose()
        print(f"pacsbridge {command}: the database {shown} is at schema revision {current or 'none (empty)'}, "
              f"not {head}: run `pacsbridge db upgrade` (or start `pacsbridge serve`) with the same configuration",
              file=sys.stderr)
        return None
    return engine


# -- status ------------------------------------------------------------------------------------
def _cmd_status(args: argparse.Namespace) -> int:
    from pacsbridge.status import collect_status
    from pacsbridge.store.db import make_sessionmaker

    settings = _settings(args)
    engine = open_existing_database(settings, "status")
    if engine is None:
        return 1
    try:
        status = collect_status(settings, make_sessionmaker(engine))
    except Exception as exc:  # noqa: BLE001 - e.g. the database is down or not migrated yet
        print(f"pacsbridge: cannot read status: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(status, indent=None, sort_keys=True))
    else:
        for key, value in status.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="counts of instances by state and other facts, from the database",
                       description="Print what pacsbridge holds: instances received/pending/predicted/not_analysed, "
                       "schema revision, database.  --json prints one JSON object (stable keys).")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_status)


# -- predict -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _results_stream() -> Iterator[TextIO]:
    """A stream for machine-readable results.  While it is open, anything else written to file
    descriptor 1 (a chatty C library, a stray print) goes to stderr, so stdout stays pure JSON."""
    try:
        real = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # replaced stdout (tests): nothing to protect
        real = False
    if not real:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(os.dup(saved), "w", encoding="utf-8", buffering=1)
    try:
        yield out
    finally:
        with contextlib.suppress(OSError):
            out.close()
        os.dup2(saved, 1)
        os.close(saved)


def _load_site_model(settings: Settings, model: str | None, command: str):  # noqa: ANN202 - LoadedModel | None
    """The model with the site calibration applied, or None after printing one line saying why not."""
    from pacsbridge.model.artifact import ModelError
    from pacsbridge.validation.calibration import CalibrationError, load_site_model

    try:
        return load_site_model(settings, Path(model) if model else None)
    except ModelError as exc:
        print(f"pacsbridge {command}: cannot load the model: {exc}", file=sys.stderr)
    except CalibrationError as exc:
        print(f"pacsbridge {command}: cannot use the site calibration: {exc}", file=sys.stderr)
    return None


def _cmd_predict(args: argparse.Namespace) -> int:
    from pacsbridge.inference.files import iter_input_files, score_files

    missing = [p for p in args.paths if not os.path.lexists(p)]
    if missing:
        print(f"pacsbridge predict: error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    settings = _settings(args)
    model = _load_site_model(settings, args.model, "predict")
    if model is None:
        return 1
    results = score_files(iter_input_files(Path(p) for p in args.paths), model,
                          batch_size=args.batch_size or max(settings.inference_batch_size, 16),
                          heatmaps=Path(args.heatmaps) if args.heatmaps else None,
                          max_decoded_bytes=settings.max_decoded_bytes)
    try:
        with _results_stream() as out:
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


def _add_predict(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=_cmd_predict)


# -- validate ----------------------------------------------------------------------------------
def _cmd_validate(args: argparse.Namespace) -> int:
    from pacsbridge.inference.files import iter_input_files
    from pacsbridge.validation.calibration import write_calibration
    from pacsbridge.validation.labels import LabelsError, read_labels
    from pacsbridge.validation.run import (Options, Progress, ValidationInputError, calibration_content,
                                           evaluate_units, join, score_for_validation, validate)

    missing = [p for p in args.paths if not os.path.lexists(p)]
    if missing:
        print(f"pacsbridge validate: error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    settings = _settings(args)
    try:
        labels = read_labels(Path(args.labels))
    except LabelsError as exc:
        print(f"pacsbridge validate: labels: {exc}", file=sys.stderr)
        return 2
    model = _load_site_model(settings, args.model, "validate")
    if model is None:
        return 1
    roots = [Path(p) for p in args.paths]
    files = list(iter_input_files(roots))
    progress = Progress(sys.stderr, every_s=3.0) if not args.quiet else None
    records = score_for_validation(files, model, batch_size=args.batch_size or max(settings.inference_batch_size, 16),
                                   progress=progress, max_decoded_bytes=settings.max_decoded_bytes)
    units, accounting = join(labels, records, roots)
    opts = Options(target_sensitivity=args.target_sensitivity, ood_keep=args.ood_keep,
                   confidence=args.confidence or settings.validation_confidence,
                   min_per_class=settings.validation_min_per_class,
                   max_unusable_share=settings.validation_max_unusable_share)
    try:
        result = validate(units, accounting, model, opts)
    except ValidationInputError as exc:
        print(f"pacsbridge validate: {exc}", file=sys.stderr)
        return 2
    status = 0
    result["calibration_written"] = None
    if args.write_calibration:
        if result["calibration_refused"]:
            print(f"pacsbridge validate: no calibration written: {result['calibration_refused']}", file=sys.stderr)
            status = 1
        else:
            target = Path(args.write_calibration)
            try:
                cal_id = write_calibration(target, calibration_content(result))
            except OSError as exc:
                print(f"pacsbridge validate: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            result["calibration_written"] = {"file": str(target), "id": cal_id}
    if args.report:
        from pacsbridge.validation.report import write_report

        oods = [im.ood_score for u in units for im in u.images if im.ood_score is not None]
        try:
            write_report(Path(args.report), result, evaluate_units(units, model, result["at_current"]["ood_threshold"]),
                         evaluate_units(units, model, result["proposed"]["ood_threshold"]), oods)
        except OSError as exc:
            print(f"pacsbridge validate: cannot write the report into {args.report}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
    with _results_stream() as out:
        if args.json:
            out.write(json.dumps(result) + "\n")
        else:
            out.write(_validation_summary(result))
    return status


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


def _add_validate(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM file or folder")
    p.add_argument("--labels", required=True, metavar="FILE.csv", help="labels CSV (see above)")
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
    p.set_defaults(func=_cmd_validate)


# -- worklist ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _db_session(args: argparse.Namespace, what: str) -> Iterator:
    """A session on the configured database; a database that is down or not migrated exits 1 with a message."""
    from pacsbridge.store.db import make_sessionmaker

    engine = open_existing_database(_settings(args), args.command)
    if engine is None:
        raise SystemExit(1)  # open_existing_database printed the one-line reason
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    except _CommandError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. the database is down or not migrated yet
        raise _CommandError(f"cannot read {what}: {type(exc).__name__}: {exc}") from None
    finally:
        engine.dispose()


class _CommandError(Exception):
    """Printed as ``pacsbridge: <message>`` with exit status 1."""


def _cmd_worklist(args: argparse.Namespace) -> int:
    from pacsbridge.worklist.items import list_worklist
    from pacsbridge.worklist.viewer import viewer_link

    with _db_session(args, "the worklist") as session:
        rows = list_worklist(session, status="all" if args.all else None)
    template = load_settings(args.config).viewer_url  # the same link as GET /api/worklist gives
    for r in rows:
        r["viewer_url"] = viewer_link(template, r["study_instance_uid"], r["accession_number"])
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("worklist is empty")
    else:
        # The reader's view at a terminal: who (patient, age), which order (accession), how urgent.
        print(f"{'id':>5}  {'priority':>8}  {'prob':>5}  {'status':<11}  {'waiting':>8}  {'patient':<24}  "
              f"{'age':>4}  {'accession':<16}  {'req':<7}  {'claimed_by':<12}  {'finding':<12}  study_instance_uid")
        for r in rows:
            print(f"{r['id']:>5}  {r['priority']:8.3f}  {r['probability']:5.3f}  {r['status']:<11}  "
                  f"{_age(r['waiting_s']):>8}  {_person(r['patient_name']):<24.24}  {_years(r['patient_age']):>4}  "
                  f"{r['accession_number'] or '-':<16}  {r['requested_priority'] or '-':<7}  "
                  f"{r['claimed_by'] or '-':<12}  {r['finding'] or '-':<12}  {r['study_instance_uid']}")
    return 0


def _person(name: str | None) -> str:
    """DICOM PN ``Doe^Jane`` as ``Doe Jane``; ``-`` when absent."""
    return " ".join(p for p in (name or "").split("^") if p) or "-"


def _years(age: str | None) -> str:
    """DICOM AS ``045Y`` as ``45y`` (``8mo``, ``3wk``, ``10d``); ``-`` when absent."""
    if not age or len(age) != 4 or not age[:3].isdigit():
        return age or "-"
    return f"{int(age[:3])}{ {'Y': 'y', 'M': 'mo', 'W': 'wk', 'D': 'd'}.get(age[3].upper(), age[3])}"


def _age(seconds: float) -> str:
    m = int(seconds // 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


def _add_worklist(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worklist", help="the radiologists' worklist in priority order",
        description="Print open (scheduled and in_progress) worklist items, highest priority first; --all adds "
        "completed and canceled ones. --json prints one JSON list with the fields of GET /api/worklist "
        "(id, status, priority, probability, study_instance_uid, accession_number, patient_name, patient_id, "
        "patient_age, study_date, study_description, modality, received_at, waiting_s, claimed_by, "
        "claim_expires_at, finding, viewer_url, ...).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--all", action="store_true", help="every state (also completed and canceled)")
    p.set_defaults(func=_cmd_worklist)


# -- instances ---------------------------------------------------------------------------------
def _cmd_instances(args: argparse.Namespace) -> int:
    if getattr(args, "instances_command", None) == "retry":
        return _cmd_instances_retry(args)
    from pacsbridge.store.models import InstanceState
    from pacsbridge.worklist.reports import list_instances

    with _db_session(args, "instances") as session:
        rows = list_instances(session, study_instance_uid=args.study, state=args.state, limit=args.limit)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no instances" + (f" ({args.state})" if args.state else ""))
    else:
        print(f"{'id':>6}  {'received (UTC)':<19}  {'state':<12}  outcome (probability, or why not analysed)  study")
    for r in rows:
        outcome = (f"{r['probability']:.4f} {'POSITIVE' if r['positive'] else 'negative'} (threshold "
                   f"{r['threshold']:.4f}, {r['model_id']})" if r["probability"] is not None else (r["reason"] or ""))
        if r["state"] == InstanceState.FAILED.value:
            outcome = (f"attempt {r['attempts']}, " + (f"next at {r['next_attempt_at'][:19]}: " if r["next_attempt_at"]
                                                        else "no retry left: ") + outcome)
        print(f"{r['id']:>6}  {r['received_at'][:19]}  {r['state']:<12}  {outcome}  study {r['study_instance_uid']}")
    return 0


def _cmd_instances_retry(args: argparse.Namespace) -> int:
    from pacsbridge.store import queue
    from pacsbridge.store.db import make_sessionmaker

    if not args.ids and not args.all_failed:
        print("pacsbridge instances retry: give instance IDs or --all-failed", file=sys.stderr)
        return 2
    engine = open_existing_database(_settings(args), "instances retry")
    if engine is None:
        return 1
    try:
        moved = queue.retry(make_sessionmaker(engine), args.ids, all_failed=args.all_failed, actor="cli")
    except (queue.InstanceNotFound, queue.NotRetryable) as exc:
        print(f"pacsbridge instances retry: {exc}; nothing changed", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - e.g. the database went away
        print(f"pacsbridge instances retry: cannot update the database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(f"{len(moved)} instance{'' if len(moved) == 1 else 's'} queued again"
          + (f": {', '.join(map(str, moved))}" if moved and len(moved) <= 20 else ""))
    return 0


def _add_instances(sub: argparse._SubParsersAction) -> None:
    from pacsbridge.store.models import InstanceState

    p = sub.add_parser(
        "instances", help="received instances with their state, probability or refusal reason; retry failed ones",
        description="Print received instances, newest first: state (received, processing, predicted, "
        "not_analysed, failed), probability and positive flag, or the reason an image was not analysed (the "
        "image was refused) or failed (a fault of the system, retried automatically up to inference_max_attempts). "
        "Use it to answer 'why was this study not flagged?'. --json prints the fields of GET /api/instances. "
        "`instances retry ID...` or `instances retry --all-failed` queues failed instances again.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    p.add_argument("--state", choices=[s.value for s in InstanceState], help="only this state (e.g. failed)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100, max 1000)")
    isub = p.add_subparsers(dest="instances_command", metavar="{retry}")
    rt = isub.add_parser("retry", help="queue failed instances again (a fresh count of attempts): IDs or --all-failed")
    rt.add_argument("ids", nargs="*", type=int, metavar="ID")
    rt.add_argument("--all-failed", action="store_true", help="every failed instance")
    p.set_defaults(func=_cmd_instances)


# -- labels ------------------------------------------------------------------------------------
def _cmd_labels(args: argparse.Namespace) -> int:
    from pacsbridge.validation.ris_labels import LabelsImportError, import_labels

    path = Path(args.file)
    with _db_session(args, "labels") as session:
        try:
            result = import_labels(session, path, source=args.source)
        except LabelsImportError as exc:
            raise _CommandError(f"labels import: {exc}; nothing imported") from None
        session.commit()
    out = result.as_dict()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['source']}: {out['rows']} rows: {out['added']} added, {out['updated']} updated, "
              f"{out['unchanged']} unchanged, {len(out['bad'])} not usable; {out['matched']} labels of this "
              "source match a received study (the others are matched when their study arrives)")
    for b in out["bad"]:
        print(f"pacsbridge: labels import: line {b['line']}: {b['key'] or '(no key)'}: {b['reason']}", file=sys.stderr)
    return 1 if out["bad"] else 0


def _add_labels(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labels", help="ground truth from the RIS: import final report findings (CSV)",
                       description="Labels are the final findings of studies, used for live sensitivity, NPV and "
                       "site validation from the database.")
    lsub = p.add_subparsers(dest="labels_command", required=True, metavar="{import}")
    imp = lsub.add_parser(
        "import", help="import a CSV of findings (idempotent)",
        description="FILE.csv: a header row; a 'finding' column (pneumonia, no_pneumonia or other); a study key "
        "column 'study_instance_uid' or 'accession_number'; optional 'reported_at' (ISO 8601). Each row is kept "
        "with its source (the file name, or --source); importing the same file again changes nothing. A label for "
        "a study not received yet is kept and matched when it arrives. Rows that cannot be used are named one "
        "line each on stderr; the others are imported. Exit status 0 when every row was used, 1 when some rows "
        "(or the whole file, then nothing is imported) could not be.")
    imp.add_argument("file", metavar="FILE.csv")
    imp.add_argument("--source", metavar="NAME", help="record the rows under this source (default: the file name)")
    imp.add_argument("--json", action="store_true", help="print one JSON object: source, rows, added, updated, "
                     "unchanged, matched, bad [{line, key, reason}]")
    imp.set_defaults(func=_cmd_labels)


# -- stats -------------------------------------------------------------------------------------
def _fmt_rate(r: dict | None, value_key: str = "value") -> str:
    if not r or r.get(value_key) is None:
        return "-"
    ci = r.get("ci")
    return f"{r[value_key]:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "") + f" n={r.get('n', 0)}"


def _cmd_stats(args: argparse.Namespace) -> int:
    from pacsbridge.store.events import parse_since
    from pacsbridge.validation.live import live_stats

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise _CommandError(f"stats: --since: {exc}") from None
    settings = _settings(args)
    if args.weekly:
        return _stats_weekly(args)
    with _db_session(args, "stats") as session:
        out = {**live_stats(session, since), "mode": settings.mode}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"mode: {out['mode']}" + ("  (shadow mode: nothing goes on the worklist or to the destinations)"
                                    if out["mode"] == "shadow" else ""))
    print(f"window: since {out['window']['since'][:19]} UTC")
    if not out["models"]:
        print("no predictions recorded yet")
    for m in out["models"]:
        for label, e in (("total", m), ("window", m["window"])):
            ppv = {"value": e["ppv"], "ci": e["ppv_ci"], "n": e["completed_total"]}
            t = e["receipt_to_completion_s"]
            print(f"{m['model_id']} ({m['calibration']}) {label}: {e['scored']} images scored, {e['flagged']} flagged; "
                  f"PPV {_fmt_rate(ppv)}; "
                  f"sensitivity {_fmt_rate(e['sensitivity'])} ({e['sensitivity']['method']}); "
                  f"NPV {_fmt_rate(e['npv'])}; receipt to read p50 {t['p50'] if t['p50'] is not None else '-'} s")
    refused = out["refused"]["window"]
    print("refused in the window: " + (", ".join(f"{k}: {v}" for k, v in refused.items()) or "none"))
    lab = out["labels"]
    print(f"labels: {lab['ris']} from the RIS ({lab['ris_unmatched']} not matched to a received study yet), "
          f"{lab['reader']} reader findings, {lab['disagreements']} studies where they disagree")
    return 0


def _stats_weekly(args: argparse.Namespace) -> int:
    from pacsbridge.validation.weekly import MAX_WEEKS, week_rows, weekly_figures

    if not 1 <= args.weeks <= MAX_WEEKS:
        raise _CommandError(f"stats: --weeks must be 1 to {MAX_WEEKS}, got {args.weeks}")
    with _db_session(args, "stats") as session:
        out = weekly_figures(session, args.weeks)
    print(json.dumps(out) if args.json else "\n".join(week_rows(out)))
    return 0


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats", help="live performance per model and calibration: PPV, sensitivity, NPV, refusals",
        description="Per model and calibration, in total and over a window: images and studies scored and flagged, "
        "PPV of flags read by radiologists (Wilson 95 %% interval), sensitivity and NPV from RIS labels "
        "(pacsbridge labels import), receipt-to-read time, refusals by reason, label counts. Reads the database "
        "only. --json prints the object GET /api/stats serves.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--since", metavar="T", help="start of the window: an ISO date/time or a duration back from now "
                   "(90m, 24h, 7d); default the last 30 days")
    p.add_argument("--weekly", action="store_true", help="per ISO week (UTC) instead: scored, flag rate, refusal "
                   "rate, PPV and sensitivity with 95 %% intervals (--json: the object GET /api/stats/weekly serves)")
    p.add_argument("--weeks", type=int, default=12, metavar="N", help="with --weekly: the last N weeks (default 12)")
    p.set_defaults(func=_cmd_stats)


# -- events ------------------------------------------------------------------------------------
def _cmd_events(args: argparse.Namespace) -> int:
    from pacsbridge.store.events import MAX_LIMIT, list_events, parse_since

    if not 1 <= args.limit <= MAX_LIMIT:
        raise _CommandError(f"events: --limit must be between 1 and {MAX_LIMIT}")
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise _CommandError(f"events: --since: {exc}") from None
    with _db_session(args, "events") as session:
        rows = list_events(session, kind=args.kind, since=since, limit=args.limit)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("no events" + (f" of kind {args.kind}" if args.kind else "") + (" in that time" if since else ""))
    else:
        print(f"{'at (UTC)':<19}  {'level':<7}  {'kind':<22}  {'actor / peer':<24}  detail")
        for r in rows:
            who = r["actor"] or r["peer"] or "-"
            print(f"{r['at'][:19]}  {r['level']:<7}  {r['kind']:<22}  {who:<24.24}  {r['detail'] or ''}")
    return 0


def _add_events(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "events", help="the audit trail: rejections, failures, claims, forwards (newest first)",
        description="Print recorded events, newest first: rejected associations (association_rejected, "
        "association_aborted), refused or failed C-STOREs (store_rejected, store_failed), images not analysed "
        "(not_analysed), faults while scoring (analysis_failed), worklist claims and completions, dead forwards "
        "(outbox_dead), users and tokens. "
        "Reads the database only (creates nothing). --json prints one JSON list of objects with at, kind, "
        "level, actor, detail (and peer, instance_id, worklist_item_id).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--kind", metavar="K", help="only this kind, e.g. store_rejected")
    p.add_argument("--since", metavar="T", help="only from T on: an ISO date/time (2026-12-01, "
                   "2026-12-01T20:00:00Z) or a duration back from now (90m, 24h, 7d)")
    p.add_argument("--limit", metavar="N", type=int, default=100, help="at most N events (default 100, max 1000)")
    p.set_defaults(func=_cmd_events)


# -- users -------------------------------------------------------------------------------------
def _cmd_users(args: argparse.Namespace) -> int:
    from pacsbridge.auth.users import (
        AuthError, bind_ae, create_user, issue_token, list_users, revoke_user, unbind_ae,
    )
    from pacsbridge.store import migrations

    with _db_session(args, "users") as session:
        engine = session.get_bind()
        if migrations.current_revision(engine) != migrations.head_revision():
            raise _CommandError("the database schema is not at the latest revision: run `pacsbridge db upgrade` "
                                "(or start `pacsbridge serve` once) first")
        try:
            if args.users_command == "add":
                user, token = create_user(session, args.name, args.role)
                for ae in args.ae_title or ():  # one transaction: no user left half made
                    bind_ae(session, args.name, ae, tls_subject=args.tls_subject)
                session.commit()
                if args.json:
                    out = {"name": user.name, "role": user.role, "token": token}
                    if args.ae_title:
                        out["ae_titles"] = [a.strip() for a in args.ae_title]
                    print(json.dumps(out))
                else:
                    bound = f", DICOM UPS as AE title {', '.join(a.strip() for a in args.ae_title)}" \
                        if args.ae_title else ""
                    print(f"user {user.name} ({user.role}{bound}) created. API token (shown once, keep it "
                          f"secret):\n{token}")
            elif args.users_command in ("bind", "unbind"):
                if args.users_command == "bind":
                    bind_ae(session, args.name, args.ae_title, tls_subject=args.tls_subject)
                else:
                    unbind_ae(session, args.name, args.ae_title)
                session.commit()
                if args.json:
                    print(json.dumps({"name": args.name, "ae_title": args.ae_title.strip(),
                                      "bound": args.users_command == "bind"}))
                elif args.users_command == "bind":
                    print(f"AE title {args.ae_title.strip()} now uses DICOM UPS as {args.name}"
                          + (f" (only with TLS client certificate {args.tls_subject})" if args.tls_subject else ""))
                else:
                    print(f"AE title {args.ae_title.strip()} unbound from {args.name}: its UPS requests are refused")
            elif args.users_command == "token":
                token = issue_token(session, args.name)
                session.commit()
                if args.json:
                    print(json.dumps({"name": args.name, "token": token}))
                else:
                    print(f"new API token for {args.name} (shown once; older tokens keep working):\n{token}")
            elif args.users_command == "revoke":
                n = revoke_user(session, args.name)
                session.commit()
                print(json.dumps({"name": args.name, "revoked_tokens": n}) if args.json
                      else f"user {args.name} revoked; {n} token(s) stop working now")
            else:
                rows = list_users(session)
                if args.json:
                    print(json.dumps(rows))
                elif not rows:
                    print("no users (create one: pacsbridge users add NAME --role admin)")
                else:
                    for r in rows:
                        state = "active" if r["active"] else f"revoked {r['revoked_at'][:19]}"
                        aes = ",".join(b["ae_title"] + ("(tls)" if b["tls_subject"] else "") for b in r["ae_titles"])
                        print(f"{r['name']:<20} {r['role']:<12} {state:<28} tokens {r['tokens']}  last used "
                              f"{(r['last_used_at'] or 'never')[:19]}" + (f"  AE {aes}" if aes else ""))
        except AuthError as exc:
            raise _CommandError(str(exc)) from None
    return 0


def _add_users(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "users", help="accounts (HTTP API, DICOM UPS): add, list, revoke, token, bind, unbind",
        description="Accounts for the HTTP API, the web page and DICOM UPS. Roles: radiologist (works the "
        "worklist), admin (everything, incl. cancel, /docs), monitor (/metrics and /api/stats). A token is "
        "printed once; only its SHA-256 is stored. Revoking a user stops all its tokens (and its AE titles) "
        "at once. A reading station may use DICOM UPS only with a calling AE title bound to a user "
        "(--ae-title, `users bind`); it then acts as that user, with its role.",
    )
    us = p.add_subparsers(dest="users_command", required=True, metavar="{add,list,revoke,token,bind,unbind}")
    add = us.add_parser("add", help="create a user and print its first token")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=("radiologist", "admin", "monitor"))
    add.add_argument("--ae-title", action="append", metavar="AE",
                     help="a DICOM calling AE title that uses UPS as this user (repeatable)")
    add.add_argument("--tls-subject", metavar="SUBJECT",
                     help="with --ae-title: also require this mutual-TLS client certificate subject, "
                     "e.g. CN=READSTATION1,O=Hospital")
    add.add_argument("--json", action="store_true", help='print {"name", "role", "token"} (and "ae_titles")')
    for verb, text in (("bind", "let a DICOM calling AE title use UPS as this user"),
                       ("unbind", "stop a DICOM calling AE title acting as this user")):
        b = us.add_parser(verb, help=text)
        b.add_argument("name")
        b.add_argument("--ae-title", required=True, metavar="AE")
        if verb == "bind":
            b.add_argument("--tls-subject", metavar="SUBJECT",
                           help="require this mutual-TLS client certificate subject, e.g. CN=READSTATION1,O=Hospital")
        b.add_argument("--json", action="store_true")
    lst = us.add_parser("list", help="users, roles, state, token counts")
    lst.add_argument("--json", action="store_true")
    rev = us.add_parser("revoke", help="revoke a user and all its tokens")
    rev.add_argument("name")
    rev.add_argument("--json", action="store_true")
    tok = us.add_parser("token", help="print a new token for a user")
    tok.add_argument("name")
    tok.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_users)


# -- outbox ------------------------------------------------------------------------------------
def _cmd_outbox(args: argparse.Namespace) -> int:
    from pacsbridge.forward import outbox
    from pacsbridge.store.db import make_engine, make_sessionmaker

    settings = _settings(args)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        if args.outbox_command == "list":
            with sessions() as session:
                rows = outbox.list_entries(session, state=args.state, limit=args.limit or None)
            if args.json:
                print(json.dumps(rows))
            elif not rows:
                print("outbox is empty" + (f" (state {args.state})" if args.state else ""))
            else:
                print(f"{'id':>6}  {'state':<7}  {'tries':>5}  {'destination':<16}  {'object':<7}  sop_instance_uid / last error")
                for r in rows:
                    print(f"{r['id']:>6}  {r['state']:<7}  {r['attempts']:>5}  {r['destination']:<16}  {r['object']:<7}  "
                          f"{r['sop_instance_uid']}" + (f"  {r['last_error']}" if r["last_error"] else ""))
            return 0
        if not args.ids and not args.all_dead:
            print("pacsbridge outbox retry: give entry IDs or --all-dead", file=sys.stderr)
            return 2
        moved = outbox.retry(sessions, args.ids, all_dead=args.all_dead)
        not_dead = sorted(set(args.ids) - set(moved))
        print(f"{len(moved)} entr{'y' if len(moved) == 1 else 'ies'} queued again"
              + (f"; not dead (left as they are): {not_dead}" if not_dead else ""))
        return 0 if moved or args.all_dead else 1
    except Exception as exc:  # noqa: BLE001 - e.g. the database is down or not migrated yet
        print(f"pacsbridge: cannot use the outbox: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def _add_outbox(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "outbox", help="results waiting to be forwarded, sent or dead; retry dead ones",
        description="Each result makes one outbox entry per destination and object (sr, heatmap, images, oru). "
        "Entries are pending until the destination acknowledged them (sent) or failed permanently or for too "
        "long (dead, with the reason).  `retry` queues dead entries again (after fixing the configuration).",
    )
    osub = p.add_subparsers(dest="outbox_command", required=True, metavar="{list,retry}")
    ls = osub.add_parser("list", help="list entries, newest first")
    ls.add_argument("--json", action="store_true", help="one JSON list of {id, destination, object, state, attempts, "
                    "last_error, object_uid, study_instance_uid, sop_instance_uid, positive, probability, created_at, "
                    "next_attempt_at, sent_at}")
    ls.add_argument("--state", choices=["pending", "sent", "dead"], help="only entries in this state")
    ls.add_argument("--limit", type=int, default=0, metavar="N", help="at most N entries")
    rt = osub.add_parser("retry", help="queue dead entries again: IDs, or --all-dead")
    rt.add_argument("ids", nargs="*", type=int, metavar="ID")
    rt.add_argument("--all-dead", action="store_true", help="every dead entry")
    p.set_defaults(func=_cmd_outbox)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsbridge",
        description="AI triage bridge for chest radiographs: a DICOM Storage SCP that scores each image "
        "and keeps a prioritized worklist.",
        epilog="Settings: --config FILE (TOML) or PACSBRIDGE_CONFIG, overridden by PACSBRIDGE_<KEY> environment "
        "variables; see deploy/pacsbridge.example.toml for every key.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (default: $PACSBRIDGE_CONFIG, "
                        "else /etc/pacsbridge/pacsbridge.toml when it exists)")
    parser.add_argument("--version", action="version", version=f"pacsbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_serve, _add_worker, _add_db, _add_status, _add_predict, _add_validate, _add_worklist,
                _add_instances, _add_events, _add_users, _add_outbox, _add_labels, _add_stats, _add_doctor):
        add(sub)
    _accept_config_anywhere(parser)
    return parser


# -- doctor ------------------------------------------------------------------------------------
def _cmd_doctor(args: argparse.Namespace) -> int:
    from pacsbridge.doctor import run_checks
    from pacsbridge.health import Check

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # a failed echo is a check line, not a log line
    from pacsbridge.config import config_path

    source = config_path(args.config)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        checks = [Check("config", False, str(exc))]
    else:
        checks = run_checks(settings, f"config file {source}" if source else "no config file (defaults and "
                            "PACSBRIDGE_* environment)")
    if args.json:
        print(json.dumps([{**c.as_dict(), "status": c.word.lower()} for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{c.word:<4} {c.name}: {c.detail}")
    return 0 if all(c.ok for c in checks) else 1


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check the installation: config, database, spool, model, ports, destinations, certificates",
        description="One line per check (ok, warn or FAIL, and why); exit status 1 when a check fails.  "
                    "Changes nothing.")
    p.add_argument("--json", action="store_true", help="a JSON list of {name, ok, detail, status}")
    p.set_defaults(func=_cmd_doctor)


def _accept_config_anywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --config after the command too (`pacsbridge serve --config FILE`, `db upgrade --config F`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                                     help="TOML configuration file (default: $PACSBRIDGE_CONFIG)")
                _accept_config_anywhere(command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"pacsbridge: configuration error: {exc}", file=sys.stderr)
        return 2
    except _CommandError as exc:
        print(f"pacsbridge: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
