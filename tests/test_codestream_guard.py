"""Decompression bombs inside the codestream: a frame whose own header (JPEG 2000 SIZ, JPEG SOF,
JPEG-LS SOF55, RLE segments) disagrees with Rows/Columns, or is larger than max_decoded_bytes, is
refused before anything is decoded -- in the worker (received over a real association) and in the
preview route (a real HTTP server); peak memory stays bounded."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless, generate_uid
from sqlalchemy import select

from pacsbridge.api.app import create_app
from pacsbridge.api.server import HttpServer
from pacsbridge.auth.users import create_user
from pacsbridge.imaging import NotAnalysable, check_decodable, load_for_model
from pacsbridge.imaging.codestream import frame_header
from pacsbridge.inference.worker import InferenceWorker
from pacsbridge.scoring import Scorer
from pacsbridge.model.artifact import load_model
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Instance
from dicom_support import running_receiver, scu_ae, send_datasets
from pipeline_support import add_instance, export_model, free_port, sample_file, synthetic_chest

MB = 1024 * 1024


# -- bombs ---------------------------------------------------------------------------------------
def j2k_bomb(path: Path, side: int = 16000, tile: int = 4000) -> bytes:
    """A real, valid JPEG 2000 codestream of ``side`` x ``side`` zeros, written tile by tile with
    glymur (OpenJPEG) so building it never holds the image: about 1.7 KB for 16000 x 16000."""
    glymur = pytest.importorskip("glymur")
    jp2 = glymur.Jp2k(str(path), shape=(side, side), tilesize=(tile, tile))
    zeros = np.zeros((tile, tile), np.uint8)
    for writer in jp2.get_tilewriters():
        writer[:] = zeros
    return path.read_bytes()


def jpeg_bomb(side: int = 13000) -> bytes:
    """A valid baseline JPEG of ``side`` x ``side`` mid-grey pixels, about 2 MB: Pillow's header
    (standard Huffman tables) with the frame size changed, and a scan in which every 8x8 block is
    DC difference 0 + EOB, i.e. the 6 bits 001010 (4 blocks = the bytes 28 A2 8A)."""
    out = io.BytesIO()
    Image.new("L", (64, 64), 128).save(out, "JPEG", quality=90)
    small = out.getvalue()
    sos = small.find(b"\xff\xda")
    header = bytearray(small[: sos + 2 + int.from_bytes(small[sos + 2:sos + 4], "big")])
    sof = header.find(b"\xff\xc0")
    header[sof + 5:sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
    blocks = (-(-side // 8)) ** 2
    bits = "001010" * (blocks % 4)
    tail = bits + "1" * (-len(bits) % 8)  # pad the last byte with 1s, as JPEG requires
    scan = b"\x28\xa2\x8a" * (blocks // 4) + (int(tail, 2).to_bytes(len(tail) // 8, "big") if tail else b"")
    return bytes(header) + scan + b"\xff\xd9"


def chest_header(rows: int = 512, cols: int = 512, bits: int = 8) -> Dataset:
    """A CR chest header that passes the quality gate (MONOCHROME2, ``bits``-bit)."""
    ds = synthetic_chest(1, rows=8, cols=8)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    ds.Modality = "CR"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    del ds.PixelData
    return ds


def encapsulated(codestream: bytes, syntax: str, rows: int = 512, cols: int = 512, bits: int = 8) -> Dataset:
    ds = chest_header(rows, cols, bits)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def rle_claiming(rows: int, cols: int, bits: int = 16) -> Dataset:
    """A real 64 x 64 RLE frame under a header claiming ``rows`` x ``cols``."""
    ds = chest_header(64, 64, bits)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 2 ** bits - 1, (64, 64)).astype(np.uint16 if bits == 16 else np.uint8)
    ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
    ds.Rows, ds.Columns = rows, cols
    return ds


@pytest.fixture(scope="module")
def j2k_16000(tmp_path_factory) -> bytes:
    return j2k_bomb(tmp_path_factory.mktemp("bomb") / "bomb.j2k")


# -- memory ----------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


class PeakRss:
    """Peak resident memory of this process while the block runs, above what it was before
    (VmHWM reset through /proc/self/clear_refs; else a 5 ms sampling thread)."""

    def __enter__(self) -> "PeakRss":
        self.before = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._sampler = None
        except OSError:
            self._peak, self._stop = self.before, threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _status_kb("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self._sampler is None:
            peak = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        self.growth_bytes = max(0, peak - self.before) * 1024


# -- the codestream header parser on real files ---------------------------------------------------
@pytest.mark.parametrize("name", [
    "RG1_J2KR.dcm", "JPEG2000.dcm", "emri_small_jpeg_2k_lossless.dcm", "JPEG-LL.dcm", "JPEG-lossy.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm",
    "MR_small_RLE.dcm", "SC_rgb_rle.dcm", "emri_small_RLE.dcm",
])
def test_real_codestreams_agree_with_their_headers(name: str) -> None:
    ds = dcmread(sample_file(name))
    head = frame_header(ds)
    assert head is not None
    if head.kind == "RLE":
        assert head.components == ds.SamplesPerPixel * (ds.BitsAllocated // 8)
    else:
        assert (head.rows, head.columns, head.components) == (ds.Rows, ds.Columns, ds.SamplesPerPixel)
    assert check_decodable(ds) is None
    assert frame_header(dcmread(sample_file("RG1_UNCR.dcm"))) is None  # native data: nothing to parse


def test_jpeg_bomb_builder_makes_a_valid_jpeg() -> None:
    small = Image.open(io.BytesIO(jpeg_bomb(200)))
    assert small.size == (200, 200)
    assert np.all(np.asarray(small) == 128)  # it decodes, to the grey it promises


def test_guard_refuses_codestreams_that_disagree_or_are_too_large(j2k_16000) -> None:
    bomb = encapsulated(j2k_16000, JPEG2000Lossless)
    reason = check_decodable(bomb)
    assert "16000 x 16000" in reason and "max_decoded_bytes" in reason
    with pytest.raises(NotAnalysable, match="16000 x 16000"):
        load_for_model(bomb, full_resolution=True)  # the reference path too: nothing is decoded
    # Under the limit, but not what the header says (a 600 x 600 JPEG under 512 x 512): refused too.
    small = encapsulated(jpeg_bomb(600), JPEGBaseline8Bit)
    assert "600 x 600 pixels but the header says 512 x 512" in check_decodable(small)
    honest = encapsulated(jpeg_bomb(600), JPEGBaseline8Bit, 600, 600)
    assert check_decodable(honest) is None
    # RLE: segment count against the header, segment length against Rows x Columns.
    assert "too large to decode" in check_decodable(rle_claiming(20000, 20000))
    assert "too short to fill 4096 x 4096" in check_decodable(rle_claiming(4096, 4096, bits=8))
    wrong_bits = rle_claiming(64, 64, bits=8)
    wrong_bits.BitsAllocated = 16
    assert "1 segment(s)" in check_decodable(wrong_bits)
    truncated = encapsulated(b"\xff\x4f\xff\x51\x00", JPEG2000Lossless)
    assert "could not be decoded: JPEG 2000 SIZ marker segment truncated" in check_decodable(truncated)


def test_codestream_bombs_received_over_dicom_end_not_analysed_in_bounded_memory(tmp_path, j2k_16000, monkeypatch) -> None:
    """The 16000 x 16000 JPEG 2000 and the 13000 x 13000 baseline JPEG, each under a 512 x 512 header,
    C-STOREd to a running receiver; the worker refuses both without decoding (< 400 MB peak growth)
    and still scores a real radiograph in the same batch."""
    bombs = {"j2k": encapsulated(j2k_16000, JPEG2000Lossless), "jpeg": encapsulated(jpeg_bomb(13000), JPEGBaseline8Bit)}
    real = dcmread(sample_file("RG1_UNCR.dcm"))
    ae = scu_ae([str(JPEG2000Lossless), str(JPEGBaseline8Bit), str(real.file_meta.TransferSyntaxUID)],
                ["1.2.840.10008.5.1.4.1.1.1"])
    model = load_model(export_model(tmp_path / "model"), "cpu", age_gate=False, ood_gate=False)
    with running_receiver(tmp_path) as rx:
        assert send_datasets(rx.port, [*bombs.values(), real], ae=ae) == [0, 0, 0]
        worker = InferenceWorker(rx.sessions, model, rx.spool.root,
                                 batch_size=8, scorer=Scorer(model, max_decoded_bytes=128 * MB))
        with PeakRss() as peak:
            out = worker.drain()
        with rx.sessions() as s:
            rows = {i.sop_instance_uid: (i.state, i.state_reason) for i in s.scalars(select(Instance))}
    assert (out.predicted, out.not_analysed) == (1, 2)
    assert rows[real.SOPInstanceUID][0] == "predicted"
    j2k_state, j2k_reason = rows[bombs["j2k"].SOPInstanceUID]
    jpeg_state, jpeg_reason = rows[bombs["jpeg"].SOPInstanceUID]
    assert j2k_state == jpeg_state == "not_analysed"
    assert "JPEG 2000 codestream too large to decode: 16000 x 16000" in j2k_reason
    assert "JPEG codestream too large to decode: 13000 x 13000" in jpeg_reason
    print(f"peak RSS growth while the worker handled both bombs and a real image: {peak.growth_bytes / MB:.1f} MB")
    assert peak.growth_bytes < 400 * MB


# -- the preview route -----------------------------------------------------------------------------
@pytest.fixture
def api(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'api.db'}")
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        token = create_user(s, "anna", "radiologist")[1]
    spool = tmp_path / "spool"
    app = create_app(sessions, spool_dir=spool, max_concurrent_renders=1)
    server = HttpServer(app, "127.0.0.1", free_port())
    server.start()
    try:
        yield sessions, spool, app, f"http://127.0.0.1:{server.port}", {"Authorization": f"Bearer {token}"}
    finally:
        server.stop()
        engine.dispose()


def _spooled(sessions, spool: Path, ds: Dataset, tmp_path: Path, uid: str) -> int:
    path = tmp_path / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return add_instance(sessions, spool, path, sop_uid=uid, study_uid="2." + uid)


def test_preview_refuses_bombs_and_caps_concurrent_renders(api, tmp_path, j2k_16000, caplog) -> None:
    sessions, spool, app, base, auth = api
    rle = _spooled(sessions, spool, rle_claiming(20000, 20000), tmp_path, "1.1")
    j2k = _spooled(sessions, spool, encapsulated(j2k_16000, JPEG2000Lossless), tmp_path, "1.2")
    good = add_instance(sessions, spool, sample_file("RG1_UNCR.dcm"), sop_uid="1.3", study_uid="2.3")
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=base, headers=auth, timeout=60) as client, PeakRss() as peak:
        r = client.get(f"/api/instances/{rle}/image.png")
        assert r.status_code == 422, r.text
        assert "too large to decode: 20000 x 20000" in r.json()["detail"] and "max_decoded_bytes" in r.json()["detail"]
        r = client.get(f"/api/instances/{j2k}/image.png?size=2048")
        assert r.status_code == 422 and "16000 x 16000" in r.json()["detail"]
        assert client.get(f"/api/instances/{good}/image.png?size=256").status_code == 200
        # Every render slot taken (here: by the test) -> 503 with the reason, not a queue of decodes.
        assert app.state.render_slots.acquire(blocking=False)
        try:
            r = client.get(f"/api/instances/{good}/image.png")
            assert r.status_code == 503 and "max_concurrent_renders" in r.json()["detail"]
        finally:
            app.state.render_slots.release()
        assert client.get(f"/api/instances/{good}/image.png").status_code == 200
        # Three previews of the bomb at once (the probe took a daemon to 5.3 GB this way).
        codes: list[int] = []

        def fetch() -> None:
            with httpx.Client(base_url=base, headers=auth, timeout=60) as c:
                codes.append(c.get(f"/api/instances/{j2k}/image.png?size=2048").status_code)

        threads = [threading.Thread(target=fetch) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(codes) == 3 and set(codes) <= {422, 503} and 422 in codes
    print(f"peak RSS growth over the preview requests: {peak.growth_bytes / MB:.1f} MB")
    assert peak.growth_bytes < 400 * MB
    assert "Traceback" not in caplog.text
    assert any("client error 422" in rec.getMessage() for rec in caplog.records)
