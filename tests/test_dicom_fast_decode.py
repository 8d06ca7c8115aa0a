"""The decode of native slices without a second pydicom parse (``SliceHeader.pixels``).

Every check compares with what lungzarr did before: ``pydicom.dcmread(path, force=True).pixel_array``
(the pydicom path, still taken for every file the fast path does not cover) and the HU of
``decode_slices_to_hu`` without layouts.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from lungzarr.errors import PatientError
from lungzarr.io import dicom
from lungzarr.io.dicom.decode import _decode_one, _native_pixels

from dicom_phantoms import make_patient, phantom_volume


def _pydicom_array(path):
    """The pixels as lungzarr read them before the fast path (and still does in the fallback)."""
    return pydicom.dcmread(path, force=True).pixel_array


def _same_array(a, b) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            and a.flags.writeable == b.flags.writeable)


def _decode(path):
    """(header, the slice as the ingest decodes it now): the fast path where the header has a layout."""
    header = dicom.read_header(path)
    return header, _decode_one(str(path), header)


def _outcome(fn):
    """("ok", array) or ("error", the exception type): what a decode gave."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return "ok", fn()
        except Exception as exc:  # noqa: BLE001  (compared, not swallowed)
            return "error", exc


# ---------------------------------------------------------------------- real fixtures

@pytest.mark.requires_shared
def test_lidc_slices_take_the_fast_path_and_equal_pydicom(lidc_dir):
    files = sorted(p for p in Path(lidc_dir).iterdir() if p.is_file())
    assert len(files) == 16
    for path in files:
        header, array = _decode(path)
        assert header.pixels is not None, path.name          # native Explicit VR LE, int16: covered
        assert (header.bits_allocated, header.bits_stored, header.pixel_representation) == (16, 16, 1)
        assert _native_pixels(str(path), header.pixels) is not None
        assert _same_array(array, _pydicom_array(path)), path.name


@pytest.mark.requires_shared
def test_ricord_jpeg_lossless_goes_through_pydicom(ricord_dir, monkeypatch):
    files = sorted(p for p in Path(ricord_dir).iterdir() if p.is_file())[::16]   # 8 of the 128 slices
    for path in files:
        header = dicom.read_header(path)
        assert header.transfer_syntax == "1.2.840.10008.1.2.4.70" and header.pixels is None
    # The pydicom fallback is what decodes them (a full dcmread per slice).
    calls = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(1) or real(*a, **k))
    for path in files:
        assert _same_array(_decode_one(str(path), dicom.read_header(path)), _pydicom_array(path))
    assert len(calls) >= 2 * len(files)   # header + decode (+ the reference) for each


# ---------------------------------------------------------------------- pydicom's own test corpus

def _single_frame_greyscale(path):
    """pydicom's array of the file when pydicom decodes it to one greyscale frame, else None."""
    kind, value = _outcome(lambda: pydicom.dcmread(path, force=True))
    if kind == "error" or "PixelData" not in value:
        return None
    ds = value
    kind, array = _outcome(lambda: ds.pixel_array)
    if (kind == "error" or array.ndim != 2
            or str(ds.get("PhotometricInterpretation", "")) not in ("MONOCHROME1", "MONOCHROME2")):
        return None
    return array


def test_pydicom_corpus_fast_decode_equals_pixel_array():
    fast, fallback, refused = [], [], []
    for path in get_testdata_files():
        expected = _single_frame_greyscale(path)
        if expected is None:
            continue
        kind, header = _outcome(lambda path=path: dicom.read_header(path))
        if kind == "error":
            refused.append(Path(path).name)  # lungzarr skips the file at the header (as before)
            continue
        (fast if header.pixels is not None else fallback).append(Path(path).name)
        if header.pixels is not None:
            direct = _native_pixels(path, header.pixels)
            assert direct is not None and _same_array(direct, expected), path
        kind, array = _outcome(lambda path=path, header=header: _decode_one(path, header))
        assert kind == "ok" and _same_array(array, expected), path
    print(f"\npydicom corpus, single-frame greyscale files pydicom decodes: {len(fast)} fast path, "
          f"{len(fallback)} through pydicom ({', '.join(sorted(fallback))}), {len(refused)} refused at the "
          f"header ({', '.join(sorted(refused))})")
    # The corpus covers both routes: native little-endian 16-bit (signed, unsigned, 12 of 16 bits
    # stored, implicit VR) fast; big endian, deflated, 1-bit and compressed through pydicom.
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "examples_overlay.dcm", "6154"):
        assert name in fast, name
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm", "liver_1frame.dcm", "MR_small_RLE.dcm",
                 "JPGExtended.dcm", "693_J2KI.dcm"):
        assert name in fallback, name
    assert len(fast) >= 30 and len(fallback) >= 10


# ---------------------------------------------------------------------- hand-made edge cases

def _write(path, *, bits=16, stored=None, high=None, signed=0, rows=5, cols=7, values=None, syntax=None,
           frames=None, photometric="MONOCHROME2", trailing=False, extra=b"", append=b"", rng=None):
    """One CT slice with raw pixel bytes of the given layout (high bits filled with noise).

    ``extra``: bytes added to the pixel data value; ``append``: raw bytes written after the dataset.
    """
    import random

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = rng or np.random.default_rng(0)
    stored = bits if stored is None else stored
    high = stored - 1 if high is None else high
    dtype = np.dtype(f"<u{bits // 8}")
    raw = rng.integers(0, 2 ** bits, size=rows * cols, dtype=np.uint64).astype(dtype) if values is None \
        else np.asarray(values).astype(dtype.newbyteorder("<" if syntax != ExplicitVRBigEndian else ">"))
    data = raw.tobytes() + extra
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "EDGE"
    ds.SeriesInstanceUID = generate_uid()
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, random.random()], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, high, signed
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", b"\0\0\0\0")   # Data Set Trailing Padding after the pixel data
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian,
               little_endian=syntax != ExplicitVRBigEndian)
    if append:
        with open(path, "ab") as fh:
            fh.write(append)
    return path


#: name -> (keyword arguments of _write, True where the fast path covers the file)
EDGE_CASES = {
    "16-bit unsigned": ({}, True),
    "16-bit signed": ({"signed": 1}, True),
    "12 of 16 bits, unsigned, noise in the high bits": ({"stored": 12}, True),
    "12 of 16 bits, signed, noise in the high bits": ({"stored": 12, "signed": 1}, True),
    "12 of 16 bits, signed, HighBit 15 (pydicom ignores HighBit)": ({"stored": 12, "signed": 1, "high": 15}, True),
    "16 of 16 bits, HighBit 11": ({"high": 11}, True),
    "1 of 16 bits, signed": ({"stored": 1, "signed": 1}, True),
    "8-bit, odd pixel count (a pad byte)": ({"bits": 8}, True),
    "8-bit signed, 7 bits stored, odd count": ({"bits": 8, "stored": 7, "signed": 1}, True),
    "32-bit unsigned, 20 bits stored": ({"bits": 32, "stored": 20}, True),
    "32-bit signed": ({"bits": 32, "signed": 1}, True),
    "NumberOfFrames 1": ({"frames": 1}, True),
    "MONOCHROME1": ({"photometric": "MONOCHROME1"}, True),
    "implicit VR little endian": ({"syntax": ImplicitVRLittleEndian, "signed": 1, "stored": 12}, True),
    "explicit VR big endian": ({"syntax": ExplicitVRBigEndian, "signed": 1, "stored": 12}, False),
    "Data Set Trailing Padding after the pixel data": ({"trailing": True}, True),
    # (0028,0010) Rows = 1 after the pixel data: a full parse takes it (and refuses the pixels).
    "a Rows element after the pixel data": ({"append": b"\x28\x00\x10\x00US\x02\x00\x01\x00"}, False),
    # pydicom warns of an implicit-VR element in an explicit-VR dataset: left to pydicom (which warns).
    "an implicit-VR element after explicit-VR pixel data": ({"append": b"\xfc\xff\xfc\xff\x04\x00\x00\x00abcd"},
                                                            False),
    # A trailing element cut short: a full parse reads what is there without a word; the pixels are whole.
    "a trailing element cut short": ({"append": b"\xfc\xff\xfc\xffOB\x00\x00\xff\x00\x00\x00ab"}, True),
    "two excess bytes of pixel data": ({"extra": b"\1\2"}, False),
    "a frame's worth of excess bytes": ({"rows": 4, "cols": 4, "extra": bytes(32)}, False),
    "too few bytes": ({"values": np.arange(34)}, False),
    "NumberOfFrames 2": ({"frames": 2, "extra": bytes(70)}, False),
    "lower-case photometric (pydicom refuses it)": ({"photometric": "monochrome2"}, False),
    "BitsStored > BitsAllocated (pydicom refuses it)": ({"stored": 17}, False),
    "BitsAllocated 64": ({"bits": 64}, False),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_case_decodes_as_pydicom_or_falls_back(tmp_path, case):
    kwargs, covered = EDGE_CASES[case]
    path = _write(tmp_path / "x.dcm", **kwargs)
    kind, header = _outcome(lambda: dicom.read_header(path))
    assert kind == "ok", header
    assert (header.pixels is not None) == covered
    # The decode before the fast path: pydicom's pixel_array, then the 2-D check.
    expected = _outcome(lambda: _decode_one(str(path), replace(header, pixels=None)))
    got = _outcome(lambda: _decode_one(str(path), header))
    assert got[0] == expected[0], (got, expected)
    if expected[0] == "ok":
        assert _same_array(got[1], expected[1]) and _same_array(got[1], _pydicom_array(path))
    else:
        assert isinstance(got[1], PatientError) and got[1].file == str(path)
        assert got[1].reason == expected[1].reason


def test_unused_high_bits_are_masked_or_sign_extended_as_pydicom(tmp_path):
    # 12 of 16 bits stored: 0xF800 (unused bits set, stored -2048 signed) and 0x0FFF / 0x07FF.
    values = np.array([0xF800, 0x0FFF, 0x07FF, 0x0800, 0x1234], dtype=np.uint16)
    signed = _write(tmp_path / "s.dcm", stored=12, signed=1, rows=1, cols=5, values=values)
    unsigned = _write(tmp_path / "u.dcm", stored=12, signed=0, rows=1, cols=5, values=values)
    assert _decode_one(str(signed), dicom.read_header(signed)).tolist() == [[-2048, -1, 2047, -2048, 564]]
    assert _decode_one(str(unsigned), dicom.read_header(unsigned)).tolist() == [[2048, 4095, 2047, 2048, 564]]
    assert _pydicom_array(signed).tolist() == [[-2048, -1, 2047, -2048, 564]]


def test_no_transfer_syntax_in_the_file_meta_still_fails_as_before(tmp_path):
    path = _write(tmp_path / "x.dcm")
    ds = pydicom.dcmread(path)
    del ds.file_meta.TransferSyntaxUID
    ds.save_as(path, implicit_vr=False, little_endian=True)
    header = dicom.read_header(path)
    assert header.pixels is None   # pydicom refuses the pixels of such a file: so does lungzarr, as before
    with pytest.raises(PatientError, match="Transfer Syntax UID"):
        _decode_one(str(path), header)


# ---------------------------------------------------------------------- files changed after their header was read

def test_truncated_after_the_header_was_read_is_the_same_clear_error(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=4)
    header = dicom.read_header(paths[1])
    assert header.pixels is not None
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-1000])
    assert _native_pixels(str(paths[1]), header.pixels) is None
    with pytest.raises(PatientError) as info:
        dicom.decode_slices_to_hu([str(paths[1])], [1.0], [-1024.0], patient="P", layouts=[header.pixels])
    assert info.value.file == str(paths[1]) and info.value.patient == "P" and info.value.stage == "ingest"
    assert "cannot decode the pixel data" in info.value.reason and "truncated" in info.value.reason


def test_rewritten_after_the_header_was_read_decodes_the_new_file(tmp_path):
    # Another file under the slice's name (here of another size): pydicom reads it, as before.
    paths = make_patient(tmp_path / "P", n_slices=3, size=64)
    other = make_patient(tmp_path / "Q", n_slices=1, size=64, seed=7)[0]
    header = dicom.read_header(paths[0])
    edited = pydicom.dcmread(other)
    edited.StudyDescription = "a longer header moves the pixel data"
    edited.save_as(paths[0])
    assert _native_pixels(str(paths[0]), header.pixels) is None
    assert _same_array(_decode_one(str(paths[0]), header), _pydicom_array(paths[0]))


def test_same_size_and_mtime_but_other_bytes_at_the_pixel_tag_fall_back(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=2)
    header = dicom.read_header(paths[0])
    layout = header.pixels
    st = paths[0].stat()
    with open(paths[0], "r+b") as fh:           # the element's VR overwritten in place
        fh.seek(layout.tag_offset + 4)
        fh.write(b"UN")
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert paths[0].stat().st_size == layout.size and paths[0].stat().st_mtime_ns == layout.mtime_ns
    assert _native_pixels(str(paths[0]), layout) is None
    assert _outcome(lambda: _decode_one(str(paths[0]), header))[0] == _outcome(
        lambda: _pydicom_array(paths[0]))[0]


def test_object_bytes_take_the_fast_path(tmp_path):
    # An object on object storage: the header is read from its bytes, the decode slices the bytes.
    path = make_patient(tmp_path / "P", n_slices=2)[0]
    data = path.read_bytes()
    header = dicom.read_header("s3://bucket/P/0000.dcm", data=data)
    assert header.pixels is not None and header.pixels.mtime_ns is None
    direct = _native_pixels("s3://bucket/P/0000.dcm", header.pixels, data)
    assert direct is not None and _same_array(direct, _pydicom_array(path))
    got = _decode_one("s3://bucket/P/0000.dcm", header, data=data)
    assert _same_array(got, _pydicom_array(path))
    # Other bytes (a rewritten object of another size) go to pydicom.
    assert _native_pixels("s3://bucket/P/0000.dcm", header.pixels, data[:-2]) is None


# ---------------------------------------------------------------------- HU volumes bit for bit

def _old_hu(series):
    """HU as before: every slice decoded by pydicom (no layouts)."""
    return dicom.decode_slices_to_hu(series.paths, [h.slope for h in series.headers],
                                     [h.intercept for h in series.headers], patient=series.patient)


@pytest.mark.requires_shared
def test_lidc_hu_bit_identical_to_the_pydicom_path(lidc_dir):
    series = dicom.read_series(lidc_dir)
    assert all(h.pixels is not None for h in series.headers)
    old = _old_hu(series)
    new, _ = dicom.load_hu(lidc_dir)
    lazy = dicom.series_to_hu(series, chunk_slices=5).compute(scheduler="sync")
    assert old.dtype == new.dtype == lazy.dtype == np.int16
    assert np.array_equal(old, new) and np.array_equal(old, lazy)


def test_phantom_series_hu_bit_identical_to_the_pydicom_path(tmp_path, monkeypatch):
    volume = phantom_volume(10, 48, seed=3)
    volume[0, :4, :4] = -1024     # stored 0 (the lowest value write_series stores)
    volume[1, :2, :2] = 3000
    dicom.write_series(volume, tmp_path / "P", spacing=(1.25, 0.7, 0.7))
    series = dicom.read_series(tmp_path / "P")
    assert all(h.pixels is not None for h in series.headers)
    old = _old_hu(series)
    calls = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(1) or real(*a, **k))
    lazy = dicom.series_to_hu(series, chunk_slices=4).compute(scheduler="sync")
    assert calls == []            # no second parse: every slice read straight from its bytes
    assert np.array_equal(old, lazy) and np.array_equal(lazy, volume)


@pytest.mark.parametrize("tag, fast", [(b"\x28\x00\x01\x01US\x02\x00", False),   # BitsStored: pydicom refuses
                                       (b"\x28\x00\x02\x01US\x02\x00", True)])   # HighBit: pydicom ignores it
def test_a_damaged_image_pixel_value_costs_no_header_and_decodes_as_before(tmp_path, tag, fast):
    # A 3-byte US value: pydicom raises when it converts it. The header read never did (it does not need
    # BitsStored or HighBit), and must not now that it records them.
    path = make_patient(tmp_path / "P", n_slices=1)[0]
    data = path.read_bytes()
    i = data.index(tag)
    path.write_bytes(data[:i] + tag[:6] + b"\x03\x00" + data[i + 8:i + 10] + b"\x00" + data[i + 10:])
    header = dicom.read_header(path)
    assert (header.pixels is not None) == fast
    expected = _outcome(lambda: _decode_one(str(path), replace(header, pixels=None)))
    got = _outcome(lambda: _decode_one(str(path), header))
    assert got[0] == expected[0]
    if fast:
        assert _same_array(got[1], expected[1]) and header.high_bit is None
    else:
        assert got[1].reason == expected[1].reason and header.bits_stored is None
