"""The image-folder data set (``DIR/NORMAL``, ``DIR/PNEUMONIA``) and the patient-grouped split."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ("NORMAL", "PNEUMONIA")
_EXTS = {".jpeg", ".jpg", ".png"}


def patient_key(path: Path) -> str:
    """The patient a training file belongs to, from the naming scheme in the data set's README.

    ``IM-0115-0001.jpeg`` -> ``IM-0115``; ``NORMAL2-IM-0427-0001.jpeg`` -> ``NORMAL2-IM-0427``;
    ``person1000_bacteria_2931.jpeg`` -> ``person1000``.
    """
    stem = path.stem
    if stem.startswith("person"):
        return stem.split("_", 1)[0]
    m = re.match(r"^(.*)-\d+$", stem)
    return m.group(1) if m else stem


@dataclass
class Sample:
    path: Path
    label: int  # 1 = pneumonia
    patient: str


def list_samples(data_dir: Path, dedupe: bool = True) -> list[Sample]:
    """All labelled images under ``data_dir``, sorted; byte-identical duplicates dropped once."""
    samples: list[Sample] = []
    seen: set[str] = set()
    for label, cls in enumerate(CLASSES):
        folder = Path(data_dir) / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"missing class folder {folder}")
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() not in _EXTS:
                continue
            if dedupe:
                digest = hashlib.sha1(p.read_bytes()).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
            samples.append(Sample(p, label, f"{cls}/{patient_key(p)}"))
    return samples


def split_by_patient(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split with every patient wholly on one side, stratified by class."""
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in (0, 1):
        patients = sorted({s.patient for s in samples if s.label == label})
        rng.shuffle(patients)
        n_val = int(round(len(patients) * val_fraction))
        val_patients = set(patients[:n_val])
        for s in samples:
            if s.label == label:
                (val if s.patient in val_patients else train).append(s)
    return train, val


def load_images(samples: list[Sample], size: int = 224) -> torch.Tensor:
    """Decode images to a ``(N, size, size)`` uint8 tensor (grey; squashed if not already square)."""
    out = np.empty((len(samples), size, size), dtype=np.uint8)
    for i, s in enumerate(samples):
        with Image.open(s.path) as im:
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(im)
    return torch.from_numpy(out)


def labels_of(samples: list[Sample]) -> torch.Tensor:
    return torch.tensor([s.label for s in samples], dtype=torch.float32)
