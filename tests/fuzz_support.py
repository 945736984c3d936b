"""Seeded mutations of valid DICOM associations and C-STOREs for tests/test_fuzz_dicom.py.

Every case is a list of byte strings: the first is sent alone (normally the A-ASSOCIATE-RQ), the rest
after the server's first answer (see ``hostile_support.exchange``); ``raw`` cases are one write.
``make_case(rng)`` returns (name, items, raw, sop_instance_uid_or_None).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import MRImageStorage

from dicom_support import make_image
from hostile_support import RELEASE_RQ, assoc_rq, c_echo_pdus, c_store_pdus, encode_dataset


@dataclass
class Case:
    name: str
    items: list[bytes]
    raw: bool = False
    uid: str | None = None  # SOP Instance UID of a data-set case (to check what was acknowledged)


def _valid_store(seed: int) -> tuple[list[bytes], str]:
    ds = make_image(rows=32, cols=32, seed=seed)
    return [assoc_rq(), *c_store_pdus(encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID), RELEASE_RQ], \
        ds.SOPInstanceUID


def _pdu_offsets(stream: bytes) -> list[int]:
    out, i = [], 0
    while i + 6 <= len(stream):
        out.append(i)
        i += 6 + struct.unpack(">L", stream[i + 2:i + 6])[0]
    return out


# -- byte-level mutations of a whole association ------------------------------------------------
def _truncate(rng: random.Random, items: list[bytes]) -> list[bytes]:
    stream = b"".join(items[1:])
    if not stream:
        return [items[0][:rng.randrange(len(items[0]) + 1)]]
    return [items[0], stream[:rng.randrange(len(stream))]]


def _bitflip(rng: random.Random, items: list[bytes]) -> list[bytes]:
    k = rng.randrange(len(items))
    b = bytearray(items[k])
    if not b:
        return items
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return items[:k] + [bytes(b)] + items[k + 1:]


def _pdu_length(rng: random.Random, items: list[bytes]) -> list[bytes]:
    k = rng.randrange(len(items))
    b = bytearray(items[k])
    offsets = _pdu_offsets(bytes(b)) or [0]
    o = rng.choice(offsets)
    real = struct.unpack(">L", b[o + 2:o + 6])[0] if len(b) >= o + 6 else 0
    value = rng.choice([0, 1, max(real - 1, 0), real + 1, real * 2, 0xFFFFFFFF, 0x7FFFFFFF, rng.getrandbits(32),
                        rng.randint(65537, 10_000_000)])
    if len(b) >= o + 6:
        b[o + 2:o + 6] = struct.pack(">L", value & 0xFFFFFFFF)
    return items[:k] + [bytes(b)] + items[k + 1:]


def _pdv_length(rng: random.Random, items: list[bytes]) -> list[bytes]:
    pdatas = [k for k, it in enumerate(items) if it[:1] == b"\x04" and len(it) > 12]
    if not pdatas:
        return _bitflip(rng, items)
    k = rng.choice(pdatas)
    b = bytearray(items[k])
    b[6:10] = struct.pack(">L", rng.choice([0, 1, 2, 0xFFFFFFFF, rng.getrandbits(32), len(b), len(b) - 9]))
    if rng.random() < 0.3:
        b[10] = rng.randrange(256)  # presentation context ID
    if rng.random() < 0.3:
        b[11] = rng.randrange(256)  # message control header
    return items[:k] + [bytes(b)] + items[k + 1:]


def _splice(rng: random.Random, items: list[bytes]) -> list[bytes]:
    k = rng.randrange(len(items))
    b = bytearray(items[k])
    i = rng.randrange(len(b) + 1)
    if rng.random() < 0.5:
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    else:
        del b[i:i + rng.randint(1, 64)]
    return items[:k] + [bytes(b)] + items[k + 1:]


def _reorder(rng: random.Random, items: list[bytes]) -> list[bytes]:
    body = items[1:]
    choice = rng.randrange(4)
    if choice == 0:
        body = body + [rng.choice(body)]  # an extra copy of some PDU
    elif choice == 1:
        rng.shuffle(body)
    elif choice == 2:
        body = [assoc_rq()] + body  # a second A-ASSOCIATE-RQ inside the association
    else:
        body = [b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"] + body  # release before the data
    return [items[0]] + body


def _garbage(rng: random.Random, items: list[bytes]) -> list[bytes]:
    junk = rng.randbytes(rng.randint(0, 3000))
    if rng.random() < 0.5 and junk:
        junk = bytes([rng.randint(1, 7), 0]) + junk[2:]  # a known PDU type, then nonsense
    return [junk] if rng.random() < 0.5 else [items[0], junk]


def _apply(mutation, rng: random.Random, items: list[bytes]) -> list[bytes]:  # noqa: ANN001
    """A mutation that has nothing to work on (e.g. an empty stream after a truncation) leaves it as is."""
    try:
        return mutation(rng, items)
    except (IndexError, ValueError):
        return items


BYTE_MUTATIONS = [_truncate, _bitflip, _pdu_length, _pdv_length, _splice, _reorder, _garbage]


# -- data-set-level mutations (well-framed PDUs carrying a bad data set) -----------------------
def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC", b"UR"):
        return struct.pack("<HH", group, elem) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def _nested_sequence(depth: int, defined: bool) -> bytes:
    inner = _element(0x00100010, b"PN", b"Deep^Nest ")
    for _ in range(depth):
        if defined:
            item = b"\xfe\xff\x00\xe0" + struct.pack("<L", len(inner)) + inner
            inner = _element(0x00400275, b"SQ", item)
        else:
            item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
            inner = (struct.pack("<HH", 0x0040, 0x0275) + b"SQ\x00\x00\xff\xff\xff\xff" + item
                     + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return inner


def _dataset_case(rng: random.Random, seed: int) -> Case:
    ds = make_image(rows=rng.choice([16, 32, 64]), cols=32, seed=seed)
    request_uid = ds.SOPInstanceUID
    sop_class = ds.SOPClassUID
    kind = rng.choice(["invalid_vr", "nested", "odd_uid", "huge_length", "truncated", "wrong_class",
                       "pixel_undefined", "flip", "request_mismatch", "valid"])
    if kind == "odd_uid":
        bad = rng.choice(["1.2.3.abc", "1." * 40 + "1", "", "01.2.3", "1.2.3.", "1..2", "\x00\x01", "1.2.3 " * 20,
                          "9" * 65, "1.2.840.10008.\u00e9"])
        target = rng.choice(["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
        if target == "SOPInstanceUID":
            ds.SOPInstanceUID = request_uid = bad or "1"
        else:
            setattr(ds, target, bad)
    try:
        raw = encode_dataset(ds)
    except Exception:  # noqa: BLE001 - pydicom refuses to encode some odd values: keep the valid one
        ds = make_image(rows=32, cols=32, seed=seed)
        request_uid, raw = ds.SOPInstanceUID, encode_dataset(ds)
    if kind == "invalid_vr":
        vr = bytes(rng.choice([b"ZZ", b"\x00\x00", b"S\xff", b"xx", b"SQ", b"UN"]))
        raw = _element(0x00091001, vr, rng.randbytes(rng.randint(0, 40))) + raw if rng.random() < 0.5 else \
            raw[:40] + _element(0x00081030, vr, rng.randbytes(8)) + raw[40:]
    elif kind == "nested":
        raw = _nested_sequence(rng.choice([5, 50, 200, 600]), rng.random() < 0.5) + raw
    elif kind == "huge_length":
        raw = raw[:60] + struct.pack("<HH", 0x0008, 0x103E) + b"LO" + b"\xff\xff" + raw[60:] if rng.random() < 0.5 \
            else raw + struct.pack("<HH", 0x7FE1, 0x0010) + b"OB\x00\x00" + struct.pack("<L", 0xFFFFFFF0) + b"\x00" * 16
    elif kind == "truncated":
        raw = raw[:rng.randrange(len(raw))]
    elif kind == "wrong_class":
        sop_class = MRImageStorage
    elif kind == "pixel_undefined":
        raw = raw[:-len(ds.PixelData) - 12] + struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00\xff\xff\xff\xff" + \
            b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0" + struct.pack("<L", 1000) + b"\x01" * 10
    elif kind == "flip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        raw = bytes(b)
    elif kind == "request_mismatch":
        request_uid = generate_uid()
    try:
        pdus = c_store_pdus(raw, sop_class, request_uid)
    except Exception:  # noqa: BLE001 - an UID pynetdicom will not even encode in a command: send a valid one
        request_uid = ds.SOPInstanceUID = generate_uid()
        pdus = c_store_pdus(encode_dataset(ds), sop_class, request_uid)
    uid = request_uid if isinstance(request_uid, str) else None
    return Case(f"dataset:{kind}", [assoc_rq(), *pdus, RELEASE_RQ], uid=uid)


def make_case(rng: random.Random, index: int) -> Case:
    r = rng.random()
    if r < 0.45:
        return _dataset_case(rng, index)
    base, _ = _valid_store(index) if rng.random() < 0.8 else ([assoc_rq(), *c_echo_pdus(), RELEASE_RQ], None)
    mutation = rng.choice(BYTE_MUTATIONS)
    items = _apply(mutation, rng, base)
    if rng.random() < 0.3:  # stack a second mutation
        items = _apply(rng.choice(BYTE_MUTATIONS), rng, items)
    items = [it for it in items if it] or [b""]
    return Case(f"bytes:{mutation.__name__[1:]}", items)


def dataset_blob(rng: random.Random) -> Dataset:
    """A small valid image, for the hypothesis harness's seeds."""
    return make_image(rows=32, cols=32, seed=rng.randrange(1 << 30))
