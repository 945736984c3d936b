"""Site validation test data: real training radiographs (JPEG) sent as DICOM, with a labels CSV.

Also a command, to build a patient-grouped site set for a demonstration report:

    python -m tests.validation_support --data-dir ../shared/data/chest_xray/train --out DIR [--split val]

``--split val`` takes the model's validation patients (split seed and fraction from the model card),
never the images the weights were fitted on.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "chest_xray" / "train"
CR = "1.2.840.10008.5.1.4.1.1.1"


def grey_to_dicom(grey: np.ndarray, *, study_uid: str | None = None, accession: str = "",
                  sop_uid: str | None = None) -> Dataset:
    """An 8-bit MONOCHROME2 CR chest image (no age tags) of ``grey`` (uint8, 2-D)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.AccessionNumber = accession
    ds.PatientID = "SITE-TEST"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "AP"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.ascontiguousarray(grey, dtype=np.uint8).tobytes()
    return ds


def jpeg_to_dicom(src: Path, dst: Path, max_side: int = 1024, **kwargs: str) -> Dataset:
    """``src`` (a training JPEG) as a DICOM file ``dst`` (downscaled to ``max_side`` to keep tests small)."""
    im = Image.open(src).convert("L")
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    ds = grey_to_dicom(np.asarray(im), **kwargs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return ds


def write_labels(path: Path, column: str, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([column, "label"])
        w.writerows(rows)
    return path


def build_site_set(data_dir: Path, out: Path, split: str = "val", limit: int = 0, max_side: int = 1024) -> Path:
    """DICOM files of one side of the model's patient split under ``out/dicom``, labels in ``out/labels.csv``."""
    sys.path.insert(0, str(ROOT))
    from model_training.data import list_samples, split_by_patient

    card = json.loads((ROOT / "pacsbridge" / "models" / "pneumonia-v3.json").read_text())
    train, val = split_by_patient(list_samples(data_dir), float(card["val_fraction"]), int(card["seed"]))
    chosen = val if split == "val" else train
    if limit:
        chosen = chosen[:limit // 2] + chosen[-(limit - limit // 2):]
    rows = []
    for s in chosen:
        name = f"{s.path.parent.name}-{s.path.stem}.dcm"
        jpeg_to_dicom(s.path, out / "dicom" / name, max_side=max_side)
        rows.append((name, "pneumonia" if s.label else "normal"))
    return write_labels(out / "labels.csv", "path", rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=TRAIN)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", choices=("val", "train"), default="val")
    ap.add_argument("--limit", type=int, default=0)
    a = ap.parse_args()
    print(build_site_set(a.data_dir, a.out, a.split, a.limit))
