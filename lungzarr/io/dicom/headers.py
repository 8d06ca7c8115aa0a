"""One DICOM file's header: what lungzarr needs from it (:class:`SliceHeader`) and, for a native slice,
where its pixels lie in the file (:class:`PixelLayout`).

Each file is parsed by pydicom once, for its header (:func:`read_header`). Where that header shows a
native little-endian single-frame greyscale slice of 8, 16 or 32 bits whose
(7FE0,0010) element holds exactly the bytes it needs and is followed by
nothing but later elements (:class:`PixelLayout`; :func:`_native_layout` lists
every condition), the decode (:mod:`lungzarr.io.dicom.decode`) reads the pixel
bytes straight from the file; every other file is decoded by pydicom.
"""
from __future__ import annotations

import io
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.io import geometry
from lungzarr.io.locations import describe_error, is_url


#: Photometric interpretations of a greyscale image (anything else is colour or palette: not CT).
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")

STAGE = "ingest"

#: Transfer syntaxes whose pixel data lungzarr can size from the header (native, not deflated).
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


@dataclass(frozen=True)
class PixelLayout:
    """Where one native single-frame greyscale slice's pixels lie in its file, and how to read them.

    Set by :func:`read_header` only where the file's pixels can be read straight from its bytes
    with the exact result of pydicom's ``Dataset.pixel_array`` (see :func:`read_header` for the
    cases covered); every other file is decoded by pydicom.
    """

    #: File offset of the (7FE0,0010) element's tag.
    tag_offset: int
    #: The element's tag/VR/length bytes as read (8 implicit, 12 explicit VR): checked again on decode.
    head: bytes
    #: File offset and length of the element's value (the length as in the file, a pad byte included).
    value_offset: int
    value_length: int
    rows: int
    columns: int
    #: numpy dtype of the stored values, as pydicom builds it (``'ui'[PixelRepresentation]``,
    #: BitsAllocated / 8 bytes, little-endian syntaxes only).
    dtype: str
    #: BitsAllocated - BitsStored: pydicom shifts the values left then right by this much, which
    #: masks the unused high bits (unsigned) or sign-extends bit BitsStored - 1 (signed).
    shift: int
    #: The file's size and ``st_mtime_ns`` when its header was read (mtime None: bytes of an object);
    #: a file that differs on decode is decoded by pydicom instead.
    size: int
    mtime_ns: int | None

    @property
    def nbytes(self) -> int:
        """Bytes of pixel values (the pad byte of an odd length left out)."""
        return self.rows * self.columns * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class SliceHeader:
    """What lungzarr needs from one DICOM file's header."""

    path: str
    sop_uid: str
    series_uid: str
    series_number: int | None
    acquisition: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    rows: int
    columns: int
    transfer_syntax: str
    image_type: tuple[str, ...]
    sop_class: str
    modality: str
    patient_id: str
    samples_per_pixel: int = 1
    photometric: str = "MONOCHROME2"
    n_frames: int = 1
    #: Why the file cannot give its pixels, judged from the header and the file size (None: looks whole).
    damage: str | None = None
    #: (0028,0100) BitsAllocated, (0028,0101) BitsStored, (0028,0102) HighBit, (0028,0103)
    #: PixelRepresentation (None: absent or not one integer).
    bits_allocated: int | None = None
    bits_stored: int | None = None
    high_bit: int | None = None
    pixel_representation: int | None = None
    #: Where the pixels lie in the file, for the decode without pydicom (None: pydicom decodes).
    pixels: PixelLayout | None = field(default=None, repr=False)
    #: (0018,1120) GantryDetectorTilt in degrees (None: absent), named when the stack is tilted.
    gantry_tilt: float | None = None
    #: (0018,0050) SliceThickness in mm (None: absent), named when a stack has several slice spacings.
    slice_thickness: float | None = None
    #: True for a DICOMDIR-like directory file (Media Storage Directory Storage, 1.2.840.10008.1.3.10, or a
    #: DirectoryRecordSequence): it lists files and holds no image.
    directory: bool = False
    #: The flips/transpose that lay this slice out as the stack stores it, set by :func:`read_series`
    #: from the slice's own IOP (None: as decoded); applied where the slice is decoded.
    reorient: geometry.Reorientation | None = field(default=None, repr=False)


def _floats(value, n=None):
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    return out


def _int_or_none(value):
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _number(value, default: float) -> float:
    """A DS/IS value as float: ``default`` when absent or empty, NaN when it does not parse."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _gantry_tilt(value) -> float | None:
    """(0018,1120) GantryDetectorTilt in degrees (or another DS recorded for messages, e.g. SliceThickness),
    or None when absent or not one finite number."""
    tilt = _number(value, float("nan"))
    return tilt if np.isfinite(tilt) else None


def _listed(values) -> str:
    return f"{values[0]:g}" if len(values) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


#: Media Storage Directory Storage: the SOP class of a DICOMDIR (a list of files, no image).
_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"


def _is_directory(ds) -> bool:
    """True when the dataset is a DICOMDIR-like directory file (any file name: Philips writes ``DIRFILE``)."""
    meta = getattr(ds, "file_meta", None)
    classes = {str(ds.get("SOPClassUID", "") or ""),
               str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else ""}
    return _DIRECTORY_STORAGE in classes or "DirectoryRecordSequence" in ds


def _pixel_damage(fh, ds, size: int, tsyntax: str) -> tuple[str | None, tuple | None]:
    """Why the file cannot hold the pixels its header describes, or None; and where its pixel data is.

    ``fh`` stands where ``stop_before_pixels`` stopped: at the (7FE0,0010) tag.
    For native (uncompressed) syntaxes the bytes the header needs
    (Rows x Columns x frames x BitsAllocated/8 x SamplesPerPixel) are compared
    with the bytes the file holds after the tag; compressed pixel data is
    checked by decoding (see :func:`read_series`).

    The second value is ``(tag offset, the element's tag/VR/length bytes, implicit VR, little
    endian)`` when a (7FE0,0010) tag stands there, else None (for :func:`_native_layout`).
    """
    tag_offset = fh.tell()
    head = fh.read(12)
    implicit, little = getattr(ds, "original_encoding", (False, True))
    implicit = implicit if implicit is not None else tsyntax == "1.2.840.10008.1.2"
    little = little is not False
    if len(head) < 8:
        return "the file ends before its pixel data (7FE0,0010): it is truncated", None
    order = "little" if little else "big"
    group, elem = int.from_bytes(head[0:2], order), int.from_bytes(head[2:4], order)
    if (group, elem) != (0x7FE0, 0x0010):
        return None, None  # no plain PixelData tag here (float pixel data, trailing tags...): left to the decoder
    element = (tag_offset, head, implicit, little)
    if tsyntax not in _NATIVE_SYNTAXES:
        return None, element
    if not implicit and len(head) == 12:  # explicit VR OB/OW: tag, VR, 2 reserved bytes, 4-byte length
        length, offset = int.from_bytes(head[8:12], order), fh.tell()
    else:  # implicit VR: a 4-byte length after the tag
        length, offset = int.from_bytes(head[4:8], order), fh.tell() - 4
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = max(1, _int_or_none(ds.get("NumberOfFrames")) or 1)
    if bits not in (8, 16, 32):
        return None, element  # not sizeable here (packed or float pixels): the decoder judges
    need = rows * cols * frames * samples * bits // 8
    have = size - offset
    if length == 0xFFFFFFFF:
        return None, element
    if have < need:
        return (f"the file holds {have} vs {need} bytes of PixelData (7FE0,0010) that "
                f"Rows x Columns x BitsAllocated/8 needs"), element
    return None, element


#: The syntaxes the decode without pydicom covers: little-endian native ones (big endian, deflated and
#: every compressed syntax go to pydicom).
_FAST_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _quiet_int(ds, keyword: str) -> int | None:
    """:func:`_as_int` of an element lungzarr only records: None where reading it warns or fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return _as_int(ds.get(keyword))
    except Exception:
        return None


def _as_int(value) -> int | None:
    """``value`` when it is one integer (a US/IS value), else None (absent, empty, several values)."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _pixel_options(ds) -> dict | None:
    """The image pixel values exactly as pydicom's decoder takes them (``as_pixel_options``), or None
    when taking them warns or fails (a damaged value: the file is left to pydicom, which then warns
    or fails as it did)."""
    from pydicom.pixels import as_pixel_options

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return as_pixel_options(ds)
    except Exception:
        return None


def _native_layout(ds, opts, element, size: int, mtime_ns: int | None, fh) -> PixelLayout | None:
    """The :class:`PixelLayout` of a file whose pixels lungzarr reads without pydicom, or None.

    Only where the result is plainly pydicom's own (``pydicom.pixels`` backend, the native
    decoder with its defaults): a file meta TransferSyntaxUID of Implicit or Explicit VR Little
    Endian (pydicom refuses pixels without one), the dataset read little-endian, one (7FE0,0010)
    element of explicit VR OB/OW or implicit VR, of defined length, holding exactly
    Rows x Columns x BitsAllocated/8 bytes (plus the pad byte of an odd length), encoded as the
    dataset was read, and followed by nothing or by elements after (7FE0,0010) that pydicom parses
    without a warning (e.g. (FFFC,FFFC) Data Set Trailing Padding, see :func:`_plain_tail`); no
    Float/Double Float Pixel Data; ``opts`` (:func:`_pixel_options`) with BitsAllocated 8, 16 or
    32, 1 <= BitsStored <= BitsAllocated, PixelRepresentation 0 or 1, SamplesPerPixel 1,
    PhotometricInterpretation exactly MONOCHROME1/MONOCHROME2, Rows and Columns in 1..65535 and
    one frame, each one integer. Anything else (1-bit or 64-bit, colour, YBR, multi-frame, an
    empty or 0 NumberOfFrames, excess or missing bytes, big endian, deflated, compressed) is None:
    pydicom decodes.
    """
    if element is None or opts is None:
        return None
    tag_offset, head, implicit, little = element
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not tsyntax or str(tsyntax) not in _FAST_SYNTAXES or not little:
        return None
    # pydicom's own test of a dataset's encoding (filereader._is_implicit_vr): two capitals after the
    # tag are an explicit VR. An element that looks otherwise than the dataset was read is left to pydicom.
    if (not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)) != bool(implicit):
        return None
    if implicit:
        length, value_offset, head = int.from_bytes(head[4:8], "little"), tag_offset + 8, bytes(head[:8])
    elif len(head) == 12 and head[4:6] in (b"OB", b"OW"):
        length, value_offset, head = int.from_bytes(head[8:12], "little"), tag_offset + 12, bytes(head)
    else:
        return None

    def value(name):
        return _as_int(opts.get(name))

    rows, cols, bits, stored = value("rows"), value("columns"), value("bits_allocated"), value("bits_stored")
    signed, samples, photometric = value("pixel_representation"), value("samples_per_pixel"), \
        opts.get("photometric_interpretation")
    if (bits not in (8, 16, 32) or stored is None or not 1 <= stored <= bits or signed not in (0, 1)
            or samples != 1 or not isinstance(photometric, str) or photometric not in GREYSCALE
            or rows is None or cols is None or not (0 < rows <= 0xFFFF and 0 < cols <= 0xFFFF)
            or value("number_of_frames") != 1):
        return None
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return None  # pydicom refuses a dataset with more than one pixel data element
    expected = rows * cols * bits // 8
    if length == 0xFFFFFFFF or length not in (expected, expected + expected % 2) or value_offset + length > size:
        return None
    if value_offset + length < size and not _plain_tail(fh, value_offset + length, implicit):
        return None
    dtype = np.dtype(f"{'ui'[signed]}{bits // 8}")
    if sys.byteorder != "little":  # as pydicom: the syntax's byte order on a big-endian machine
        dtype = dtype.newbyteorder("S")
    return PixelLayout(tag_offset=tag_offset, head=head, value_offset=value_offset, value_length=length,
                       rows=rows, columns=cols, dtype=dtype.str, shift=bits - stored, size=size,
                       mtime_ns=mtime_ns)


def _plain_tail(fh, start: int, implicit: bool) -> bool:
    """True when the bytes after the pixel data parse (as a full ``dcmread`` goes on to parse them)
    without a warning into elements after (7FE0,0010) only: nothing there that the pixel decode reads."""
    from pydicom.filereader import read_dataset

    fh.seek(start)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tail = read_dataset(fh, bool(implicit), True)
    except Exception:
        return False
    return all(int(tag) > 0x7FE00010 for tag in tail.keys())


def read_header(path, *, patient: str | None = None, data: bytes | None = None) -> SliceHeader:
    """Read the header of one DICOM file (no pixel data), and size its pixel data against the file.

    ``data``: the file's bytes, already fetched (an object on object storage,
    ``path`` its URL); else the file ``path`` is opened.

    For a slice whose pixels can be read without pydicom (native little-endian,
    one greyscale frame of 8/16/32 bits, the pixel data element whole and last:
    :func:`_native_layout` lists every condition) :attr:`SliceHeader.pixels`
    records where they lie, their dtype and the unused-bit shift, with the
    file's size and mtime (taken from the open file before it is parsed); else
    it is None and the decode parses the file with pydicom.
    """
    import pydicom

    path = str(path) if is_url(path) else Path(path)
    try:
        with (io.BytesIO(data) if data is not None else open(path, "rb")) as fh:
            # Stat the open file before parsing it: a file changed after this has another mtime on decode.
            st = None if data is not None else os.fstat(fh.fileno())
            ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
            tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
            size = len(data) if data is not None else path.stat().st_size
            damage, element = _pixel_damage(fh, ds, size, tsyntax)
            opts = _pixel_options(ds) or {}
            layout = None
            if damage is None and (st is None or st.st_size == size):
                try:  # what the fast path needs must never cost a file its header: pydicom decodes it instead
                    layout = _native_layout(ds, opts, element, size, None if st is None else st.st_mtime_ns, fh)
                except Exception:
                    layout = None
        header = SliceHeader(
            path=str(path),
            sop_uid=str(ds.get("SOPInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            series_number=_int_or_none(ds.get("SeriesNumber")),
            acquisition=_int_or_none(ds.get("AcquisitionNumber")),
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
            slope=_number(ds.get("RescaleSlope"), 1.0),
            intercept=_number(ds.get("RescaleIntercept"), 0.0),
            rows=_int_or_none(ds.get("Rows")) or 0,
            columns=_int_or_none(ds.get("Columns")) or 0,
            transfer_syntax=tsyntax,
            image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
            sop_class=str(ds.get("SOPClassUID", "")),
            modality=str(ds.get("Modality", "")),
            patient_id=str(ds.get("PatientID", "")),
            samples_per_pixel=_int_or_none(ds.get("SamplesPerPixel")) or 1,
            photometric=str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
            n_frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
            damage=damage,
            bits_allocated=_as_int(opts.get("bits_allocated")),
            bits_stored=_as_int(opts.get("bits_stored")),
            high_bit=_quiet_int(ds, "HighBit"),
            pixel_representation=_as_int(opts.get("pixel_representation")),
            pixels=layout,
            gantry_tilt=_gantry_tilt(ds.get("GantryDetectorTilt")),
            slice_thickness=_gantry_tilt(ds.get("SliceThickness")),
            directory=_is_directory(ds),
        )
    except Exception as exc:  # pydicom raises many kinds on damaged headers
        raise PatientError(f"cannot read the DICOM header ({describe_error(exc)}); the file is damaged: "
                           f"replace or remove it", patient=patient, stage=STAGE, file=str(path)) from exc
    return header
