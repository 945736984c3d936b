"""``python -m model_training {train,evaluate,export,ensemble,compare,ood,ood-eval,heatmap-eval}``."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from an image folder (DIR/NORMAL, DIR/PNEUMONIA)")
    t.add_argument("--data-dir", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True, help="folder for model.pt and training.json")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(a, a) parameter; 0 = off")
    t.add_argument("--label-smoothing", type=float, default=0.0, help="targets become y*(1-e)+e/2; 0 = off")
    t.add_argument("--frame", type=float, default=0.0,
                   help="share of training images shrunk into a black border / cut by collimation strips")
    t.add_argument("--split-seed", type=int, default=None, help="seed of the patient split (default: --seed)")
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke tests)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    e = sub.add_parser("evaluate", help="metrics, ROC and calibration plots for a model artifact")
    e.add_argument("--model", type=Path, required=True, help="artifact .pt (its .json card next to it)")
    e.add_argument("--data-dir", type=Path, required=True)
    e.add_argument("--subset", choices=["all", "val", "train"], default="all",
                   help="'val' re-creates the card's patient split and scores its validation part")
    e.add_argument("--plots", type=Path, default=None, help="folder for roc.png and calibration.png (none if omitted)")
    e.add_argument("--stress", action="store_true", help="also score shifted copies (contrast, blur, ...)")
    e.add_argument("--external", action="store_true",
                   help="OOD scores of the grey images in pydicom-data/pydicom (adult chest, extremity, CT, MR, ...)")

    x = sub.add_parser("export", help="write the daemon's artifact and model card from a training run")
    x.add_argument("--run", type=Path, required=True, help="training output folder")
    x.add_argument("--out", type=Path, default=Path("pacsbridge/models"))
    x.add_argument("--version", required=True)
    x.add_argument("--half", action="store_true", help="store weights as float16 (half the file size)")

    en = sub.add_parser("ensemble", help="average several runs (same split) and re-calibrate on validation")
    en.add_argument("--run", type=Path, action="append", default=[], help="training output folder (repeat)")
    en.add_argument("--members-of", type=Path, action="append", default=[],
                    help="also take the members of this artifact .pt (same patient split; repeat); "
                         "path.pt#1 takes only member 1")
    en.add_argument("--half", action="store_true",
                    help="calibrate on float16-rounded weights (use with export --half)")
    en.add_argument("--data-dir", type=Path, required=True)
    en.add_argument("--out", type=Path, required=True)

    c = sub.add_parser("compare", help="members and their combinations on clean and stress-shifted validation")
    c.add_argument("--run", type=Path, action="append", default=[], help="training output folder (repeat)")
    c.add_argument("--members-of", type=Path, action="append", default=[],
                   help="also the members of this artifact .pt (repeat)")
    c.add_argument("--data-dir", type=Path, required=True)
    c.add_argument("--max-size", type=int, default=2, help="largest combination to score")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    o = sub.add_parser("ood", help="fit OOD statistics (training split) and threshold (validation split) "
                       "for an exported model; writes a new artifact with them and the intended use")
    o.add_argument("--model", type=Path, required=True, help="artifact .pt (its .json card next to it)")
    o.add_argument("--data-dir", type=Path, required=True)
    o.add_argument("--out", type=Path, default=Path("pacsbridge/models"))
    o.add_argument("--version", required=True)
    o.add_argument("--keep", type=float, default=0.99, help="validation quantile kept below the threshold")
    o.add_argument("--blocks", default="0,1,2,3,4,5,6,7",
                   help="feature blocks (member-major: member m stage s = 4*m+s) averaged into the score")
    o.add_argument("--method", choices=["v1", "oe"], default="v1",
                   help="v1: Mahalanobis only; oe: outlier exposure with the adult set's fit part (needs --adult-dir)")
    o.add_argument("--adult-dir", type=Path, default=None, help="adult chest radiographs, one sub-folder per source")
    o.add_argument("--adult-seed", type=int, default=None, help="seed of the adult fit/tune/held split (default 15)")
    o.add_argument("--l2", type=float, default=0.01, help="oe: L2 penalty of the logistic head")
    o.add_argument("--maha-offset", type=float, default=2.0,
                   help="oe: the Mahalanobis component counts from this many training stds beyond its mean")
    o.add_argument("--no-variants", action="store_true",
                   help="oe: fit the logistic head without shifted copies of the training images on the in side")
    o.add_argument("--feature-cache", type=Path, default=None,
                   help="oe: scratch folder for extracted features (e.g. /tmp/ood-cache), reused across refits")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    oe = sub.add_parser("ood-eval", help="OOD refusal of the held-aside adults and in-scope rate of pediatric "
                        "validation, at the artifact's own cut")
    oe.add_argument("--model", type=Path, required=True)
    oe.add_argument("--data-dir", type=Path, required=True)
    oe.add_argument("--adult-dir", type=Path, required=True)
    oe.add_argument("--adult-seed", type=int, default=None)
    oe.add_argument("--parts", default="held", help="adult parts to score: any of fit,tune,held")
    oe.add_argument("--no-external", action="store_true", help="skip the pydicom-data images")
    oe.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    hm = sub.add_parser("heatmap-eval", help="where the heatmap mass falls on validation pneumonias "
                        "(lateral thirds vs central third, upper/lower half, outside a body box), per method")
    hm.add_argument("--model", type=Path, required=True)
    hm.add_argument("--data-dir", type=Path, required=True)
    hm.add_argument("--limit", type=int, default=200, help="evenly spaced validation pneumonias (0 = all)")
    hm.add_argument("--method", action="append", default=[],
                    help="METHOD@STAGE[/COMBINE], e.g. gradcam@4, hirescam@3/norm (repeat; default: all)")
    hm.add_argument("--holdout", action="store_true",
                    help="score the validation pneumonias outside the --limit subset instead (confirm a choice)")
    hm.add_argument("--label", choices=["pneumonia", "normal"], default="pneumonia",
                    help="which validation images (normal: where little raises the score)")
    hm.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    hm.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    if args.command == "train":
        if args.threads:
            torch.set_num_threads(args.threads)
        from .train import train

        train(args.data_dir, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
              seed=args.seed, split_seed=args.split_seed, mixup=args.mixup, label_smoothing=args.label_smoothing, frame=args.frame, val_fraction=args.val_fraction, limit=args.limit,
              command="python -m model_training " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    elif args.command == "evaluate":
        from .evaluate import evaluate

        evaluate(args.model, args.data_dir, subset=args.subset, plots=args.plots, stress=args.stress,
                 external=args.external)
    elif args.command == "ensemble":
        from .ensemble import make_ensemble

        make_ensemble(args.run, args.data_dir, args.out, members_of=args.members_of, half=args.half)
    elif args.command == "compare":
        if args.threads:
            torch.set_num_threads(args.threads)
        from .compare import compare

        compare(args.run, args.data_dir, members_of=args.members_of, max_size=args.max_size)
    elif args.command == "ood":
        if args.threads:
            torch.set_num_threads(args.threads)
        from .ood import ADULT_SEED, write_oe_artifact, write_ood_artifact

        use = [int(b) for b in args.blocks.split(",")]
        if args.method == "oe":
            if args.adult_dir is None:
                parser.error("--method oe needs --adult-dir")
            write_oe_artifact(args.model, args.data_dir, args.adult_dir, args.out, args.version, use=use,
                              keep=args.keep, lam=args.l2, maha_offset=args.maha_offset,
                              adult_seed=ADULT_SEED if args.adult_seed is None else args.adult_seed,
                              cache=args.feature_cache, variants=not args.no_variants)
        else:
            write_ood_artifact(args.model, args.data_dir, args.out, args.version, use=use, keep=args.keep)
    elif args.command == "ood-eval":
        if args.threads:
            torch.set_num_threads(args.threads)
        from .ood import ADULT_SEED, evaluate_refusal

        evaluate_refusal(args.model, args.data_dir, args.adult_dir,
                         adult_seed=ADULT_SEED if args.adult_seed is None else args.adult_seed,
                         parts=tuple(p for p in args.parts.split(",") if p), external=not args.no_external)
    elif args.command == "heatmap-eval":
        if args.threads:
            torch.set_num_threads(args.threads)
        from pacsbridge.model.heatmap import CamSpec

        from .heatmap_eval import heatmap_eval

        try:
            for m in args.method:
                CamSpec.parse(m)
        except ValueError as exc:
            parser.error(str(exc))
        heatmap_eval(args.model, args.data_dir, limit=args.limit or None, methods=args.method or None,
                     as_json=args.json, holdout=args.holdout, label=args.label)
    elif args.command == "export":
        from .export import export

        export(args.run, args.out, args.version, half=args.half)
    return 0


if __name__ == "__main__":
    sys.exit(main())
