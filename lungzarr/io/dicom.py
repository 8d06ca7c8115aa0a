"""DICOM series discovery, validation and lazy decoding to Hounsfield units.

The only module of lungzarr that imports pydicom. It turns one patient folder
into a :class:`Series` (headers only, validated, the chosen series and why) and
the series into a lazy dask array of HU, decoded a chunk of slices at a time
(docs/algorithms.md §1).

Each file is parsed by pydicom once, for its header. Where that header shows a
native little-endian single-frame greyscale slice of 8, 16 or 32 bits whose
(7FE0,0010) element holds exactly the bytes it needs and is followed by
nothing but later elements (:class:`PixelLayout`; :func:`_native_layout` lists
every condition), the decode reads the pixel bytes straight from the file (or
the object's bytes) with numpy: pydicom's ``pixel_array`` result (its dtype;
BitsStored < BitsAllocated masked or sign-extended as pydicom does). Every other
file (compressed, deflated, big endian, 1-bit, multi-frame, colour, excess or
missing pixel bytes...) and any file whose size or mtime changed since its
header was read is parsed and decoded by pydicom as before, with the same errors.
"""
from __future__ import annotations

import io
import os
import posixpath
import sys
import warnings
from collections import defaultdict
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.io import geometry
from lungzarr.io.locations import describe_error, is_url, list_files, read_objects
from lungzarr.io.plausible import check_hu_sample, check_spacing, int16_hu
from lungzarr.volume import Grid, files_token, z_chunks  # noqa: F401  (files_token: part of this API)

__all__ = [
    "PixelLayout",
    "SliceHeader",
    "Series",
    "find_dicom_files",
    "read_header",
    "read_series",
    "series_to_hu",
    "decode_slices_to_hu",
    "load_hu",
    "files_token",
    "write_series",
    "PADDING_VALUE",
]

#: Stored value the original treated as cylinder padding and set to 0 (§1).
PADDING_VALUE = -2000
#: Relative tolerance on slice steps before lungzarr calls a series irregular.
SPACING_RTOL = 0.05

#: Plausible RescaleSlope range (0028,1053). CT stores HU as ``slope * stored + intercept`` with slope 1
#: (rarely 0.5 or 2): a slope outside [1e-3, 100] multiplies 16-bit stored values out of int16 HU or into a
#: handful of grey levels, so it is a damaged header, not a scanner choice; NaN/inf would flatten slices.
#: These header ranges refuse what no scanner writes before any pixel is read; the values a header within
#: them gives are judged after the decode by :mod:`lungzarr.io.plausible` (int16 range, -500 HU), which
#: every reader shares: a slope of 20 passes here and is refused there when its HU leave int16.
RESCALE_SLOPE_RANGE = (1e-3, 100.0)
#: Plausible RescaleIntercept range (0028,1052): CT intercepts are -1024, -1000 or 0; beyond +-10000 the
#: converted values leave the range any tissue or metal has (and int16 HU). An intercept of 0 on unsigned
#: stored values is within it and refused by the -500 HU rule (the rescale is missing).
RESCALE_INTERCEPT_RANGE = (-10000.0, 10000.0)
#: Photometric interpretations of a greyscale image (anything else is colour or palette: not CT).
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")

STAGE = "ingest"
#: Transfer syntaxes whose pixel data lungzarr can size from the header (native, not deflated).
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_DECODER_PACKAGES = {
    # transfer syntax prefix -> what to install
    "1.2.840.10008.1.2.4.5": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline / lossless (4.50, 4.51, 4.57, 4.70)
    "1.2.840.10008.1.2.4.7": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.8": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS
    "1.2.840.10008.1.2.4.9": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.2": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE (pydicom's numpy RLE decoder also works)
}


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


@dataclass
class Series:
    """A validated, sorted axial CT series of one patient (headers only).

    Attributes
    ----------
    patient : str
        Patient identifier (the folder name).
    folder : str
        The patient folder.
    headers : list of SliceHeader
        The chosen slices, sorted by ``ImagePositionPatient[2]`` ascending.
    grid : Grid
        Native voxel grid in patient millimetres.
    slice_spacing : float
        ``|z(slice 0) - z(slice 1)|``, the spacing the original resampled with.
    reason : str
        Why this series/acquisition was chosen.
    skipped : list of (str, str)
        Files not used, with the reason.
    """

    patient: str
    folder: str
    headers: list[SliceHeader]
    grid: Grid
    slice_spacing: float
    reason: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Broken slices dropped at either end of the stack: ``{"file", "reason"}``.
    dropped: list[dict] = field(default_factory=list)
    #: Records for the store's warnings table (see :meth:`warning_records`).
    user_warnings: list[dict] = field(default_factory=list)
    #: For a folder on object storage: each object's listing entry (size, ETag, LastModified), by URL,
    #: so :func:`files_token` needs no request per object.
    file_infos: dict | None = field(default=None, repr=False)
    #: :meth:`lungzarr.io.geometry.Placement.record`: the half-voxel rule's offsets, what the geometry is
    #: and the slices reoriented (for :meth:`provenance`).
    geometry: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def paths(self) -> list[str]:
        return [h.path for h in self.headers]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice spacing, PixelSpacing[0], PixelSpacing[1]) as the original used."""
        h0 = self.headers[0]
        ps = h0.pixel_spacing[::-1] if h0.reorient is not None and h0.reorient.transpose else h0.pixel_spacing
        return (self.slice_spacing, float(ps[0]), float(ps[1]))

    def provenance(self) -> dict:
        """JSON-serialisable attrs describing where the volume came from."""
        h0 = self.headers[0]
        return {
            "patient": self.patient,
            "source_folder": self.folder,
            "source_format": "dicom",
            "series_instance_uid": h0.series_uid,
            "series_number": h0.series_number,
            "acquisition_number": h0.acquisition,
            "selection_reason": self.reason,
            # The stored slices' orientation (every slice reoriented to it; see "geometry").
            "orientation": [float(np.sign(self.grid.step[2])), 0.0, 0.0, 0.0, float(np.sign(self.grid.step[1])), 0.0],
            "geometry": dict(self.geometry),
            "spacing_mm": list(self.spacing),
            "origin_mm": list(self.grid.origin),
            "step_mm": list(self.grid.step),
            "rescale_slopes": sorted({h.slope for h in self.headers}),
            "rescale_intercepts": sorted({h.intercept for h in self.headers}),
            "transfer_syntax": h0.transfer_syntax,
            "n_files_used": len(self.headers),
            "n_files_skipped": len(self.skipped),
            "skipped_files": [{"file": f, "reason": r} for f, r in self.skipped],
            "warnings": list(self.warnings),
            "dropped_edge_slices": [dict(r) for r in self.dropped],
        }

    def warning_records(self) -> list[dict]:
        """What a user must see in ``lungzarr status``: ``{"file", "reason"}`` dicts."""
        return [dict(r) for r in self.user_warnings]

    @property
    def source(self) -> str:
        """The patient folder (named in errors)."""
        return self.folder

    @property
    def z_positions(self) -> np.ndarray:
        """``ImagePositionPatient`` z (mm) of each slice, ascending."""
        return np.array([h.position[2] for h in self.headers], dtype=np.float64)

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOPInstanceUID of each slice, in z order."""
        return sop_uids(self)

    def to_hu(self, *, chunk_slices: int = 16, store=None, files=None):
        """The lazy int16 HU dask array: :func:`series_to_hu`."""
        return series_to_hu(self, chunk_slices=chunk_slices, store=store, files=files)

    def files_token(self) -> list[tuple]:
        """:func:`files_token` of the slices (for objects: from the listing that found them)."""
        return files_token(self.paths, infos=self.file_infos)


# --------------------------------------------------------------------------
# discovery and headers
# --------------------------------------------------------------------------

def _is_dicom_file(path: Path, data: bytes | None = None) -> bool:
    """True when the file (or its bytes ``data``) has the DICM preamble, or parses as implicit-VR DICOM."""
    try:
        if data is not None:
            head = data[:132]
        else:
            with open(path, "rb") as fh:
                head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    # Old files without preamble: let pydicom try on the header only.
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path, stop_before_pixels=True, force=True,
                             specific_tags=["SOPClassUID", "Modality"])
    except Exception:
        return False
    return "SOPClassUID" in ds or "Modality" in ds


def find_dicom_files(folder, *, patient: str | None = None) -> tuple[list[Path], list[Path]]:
    """All DICOM files below ``folder`` (recursively) and the other files found.

    Parameters
    ----------
    folder : path
        A patient folder; nested ``study/series`` folders are searched too.
    patient : str, optional
        Patient identifier used in error messages.

    Raises
    ------
    PatientError
        If the folder does not exist, is empty or holds no DICOM file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise PatientError(f"folder does not exist: {str(folder)!r}; check the INPUT path",
                           patient=patient, stage=STAGE, file=folder)
    if not folder.is_dir():
        raise PatientError(f"{str(folder)!r} is a file, not a patient folder; pass the folder that holds the "
                           f"patient's DICOM files", patient=patient, stage=STAGE, file=folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise PatientError("the patient folder is empty; put the series' .dcm files in it or remove the folder",
                           patient=patient, stage=STAGE, file=folder)
    dicom, other = [], []
    for p in files:
        (dicom if _is_dicom_file(p) else other).append(p)
    if not dicom:
        raise PatientError(f"no DICOM file among the {len(files)} file(s) in the folder (e.g. {files[0].name!r}); "
                           f"put the series' DICOM files in it", patient=patient, stage=STAGE, file=folder)
    return dicom, other


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


# --------------------------------------------------------------------------
# series selection and validation
# --------------------------------------------------------------------------

def _not_axial_reason(h: SliceHeader) -> str | None:
    """Why a file is not a slice of an axial greyscale CT series (skipped, like a localizer), or None."""
    if "LOCALIZER" in h.image_type or "SCOUT" in h.image_type:
        return "localizer/scout image (ImageType says so)"
    if h.directory:
        return "a directory file (DICOMDIR-like: it lists files and holds no image)"
    if h.rows == 0 or h.columns == 0:
        return "no image (Rows/Columns missing)"
    if h.samples_per_pixel != 1 or (h.photometric and h.photometric not in GREYSCALE):
        return (f"not a greyscale CT image (SamplesPerPixel (0028,0002) {h.samples_per_pixel}, "
                f"PhotometricInterpretation (0028,0004) {h.photometric!r}; CT slices are MONOCHROME1/2)")
    if h.n_frames > 1:
        return f"multi-frame image (NumberOfFrames {h.n_frames}); lungzarr reads one axial slice per file"
    if h.orientation is None:
        return None  # checked later, with the position, as a series-level error
    if not np.all(np.isfinite(h.orientation)):
        return f"ImageOrientationPatient (0020,0037) is {list(h.orientation)!r}, not finite"
    if geometry.orientation_problem(h.orientation[:3], h.orientation[3:]) is not None:
        return None  # a damaged IOP: an error naming the file if the slice is in the chosen stack
    axis, plane = geometry.normal_axis(h.orientation[:3], h.orientation[3:])
    if axis != 2:
        # Sagittal/coronal (a localizer or a reformat beside an axial series); an oblique or tilted axial
        # slice is judged with its stack (half-voxel rule, geometry.place_stack).
        return (f"not an axial image (ImageOrientationPatient {list(h.orientation)!r} is a {plane} plane; "
                f"a localizer or a reformat?); lungzarr reads axial series only")
    return None


def _acquisition_label(acq) -> str:
    return "without AcquisitionNumber" if acq is None else str(acq)


def _one_stack(parts) -> bool:
    """True when acquisitions (lists of headers) of one series form one stack: their z ranges do not
    overlap (step-and-shoot; a gap between them is reported by the spacing check), or together they
    are one regular stack with no two slices at one position (interleaved)."""
    ranges = sorted((min(h.position[2] for h in hs), max(h.position[2] for h in hs)) for hs in parts)
    if all(hi < next_lo - 1e-3 for (_, hi), (next_lo, _) in zip(ranges, ranges[1:])):
        return True
    z = np.sort([h.position[2] for hs in parts for h in hs])
    steps = np.diff(z)
    if steps.size == 0 or np.any(steps < 1e-3):
        return False
    median = float(np.median(steps))
    return bool(np.all(np.abs(steps - median) <= SPACING_RTOL * median))


def _merge_acquisitions(groups: dict):
    """Acquisitions of one series that form one stack (:func:`_one_stack`) as one group.

    Step-and-shoot CT numbers each table position's images with their own AcquisitionNumber
    (0020,0012): those images are one volume. Acquisitions at overlapping positions (repeated scans,
    phases) stay apart and are returned as ``repeats``: a choice :func:`_repeats_error` spells out.

    Returns
    -------
    groups : dict
        ``(series_uid, acquisition) -> headers``; a merged series under its lowest acquisition's key.
    merged : dict
        Merged key -> what was merged (for the selection reason).
    repeats : dict
        ``series_uid -> [(acquisition, headers), ...]`` for series with overlapping acquisitions.
    """
    by_series = defaultdict(list)
    for key in groups:
        by_series[key[0]].append(key)
    out, merged, repeats = {}, {}, {}
    for series_uid, keys in by_series.items():
        keys = sorted(keys, key=lambda k: -1 if k[1] is None else k[1])
        placed = all(h.position is not None and np.all(np.isfinite(h.position)) for k in keys for h in groups[k])
        if len(keys) == 1 or not placed:  # unplaced slices: the position check names them
            out.update((k, groups[k]) for k in keys)
        elif _one_stack([groups[k] for k in keys]):
            out[keys[0]] = [h for k in keys for h in groups[k]]
            merged[keys[0]] = ("acquisitions " + ", ".join(f"{_acquisition_label(k[1])} ({len(groups[k])} slices)"
                                                           for k in keys)
                               + " of the series form one stack and are read as one volume")
        else:
            out.update((k, groups[k]) for k in keys)
            repeats[series_uid] = [(k[1], groups[k]) for k in keys]
    return out, merged, repeats


def _repeats_error(parts, patient, folder) -> PatientError:
    """Several acquisitions of one series at the same positions: which there are and how to pick one."""
    listed = "; ".join(f"acquisition {_acquisition_label(acq)}: {len(hs)} slices, z {min(h.position[2] for h in hs):g}"
                       f" to {max(h.position[2] for h in hs):g} mm (e.g. {Path(hs[0].path).name!r})"
                       for acq, hs in parts)
    uid = parts[0][1][0].series_uid
    return PatientError(f"series {uid} holds {len(parts)} acquisitions at overlapping slice positions (repeated "
                        f"scans or phases): {listed}. lungzarr stores one volume per patient and does not choose "
                        f"for you: keep one acquisition's files in this folder and move the others (by "
                        f"AcquisitionNumber (0020,0012)) to a folder of their own, ingested as another patient id",
                        patient=patient, stage=STAGE, file=str(folder))


def _choose_group(groups: dict, patient: str, folder: Path) -> tuple[tuple, str]:
    """Pick (series_uid, acquisition) as the original did: most slices; on a tie the later acquisition, then
    the higher SeriesNumber, then the larger SeriesInstanceUID (the reason says which decided); among the
    folder's own patient's series when the folder holds several PatientIDs (:func:`_own_groups`)."""
    def key(item):
        (series_uid, acq), headers = item
        # Missing AcquisitionNumber (LIDC) is one acquisition of its own, ranked lowest on a tie.
        return (len(headers), -1 if acq is None else acq, headers[0].series_number or -1, series_uid)

    own, why = _own_groups(groups, patient, folder)
    ranked = sorted(own.items(), key=key, reverse=True)
    (series_uid, acq), headers = ranked[0]
    foreign = [(k, hs) for k, hs in sorted(groups.items(), key=key, reverse=True) if k not in own]
    if len(ranked) == 1:
        reason = f"{why}the only axial CT series/acquisition ({len(headers)} slices)"
        if foreign:
            reason = f"{why}the only axial CT series/acquisition of the patient ({len(headers)} slices)"
    else:
        tie = len(ranked[1][1]) == len(headers)
        reason = f"{why}most slices ({len(headers)})"
        if tie:
            reason += f" and {_tie_break(ranked[0], ranked[1])} on a tie"
    others = [f"series {s[-12:]!s} acquisition {a} ({len(h)} slices)" for (s, a), h in ranked[1:]]
    others += [f"PatientID {_ids(h)} series {s[-12:]!s} acquisition {a} ({len(h)} slices)"
               for (s, a), h in foreign]
    if others:
        reason += f"; not used: {', '.join(others)}"
    return (series_uid, acq), reason


def _tie_break(chosen, runner_up) -> str:
    """What ranked ``chosen`` above ``runner_up`` (``((series_uid, acquisition), headers)`` items with as many
    slices), in :func:`_choose_group`'s order: the acquisition, the SeriesNumber, the SeriesInstanceUID."""
    (uid, acq), hs = chosen
    (other_uid, other_acq), other_hs = runner_up
    if (-1 if acq is None else acq) != (-1 if other_acq is None else other_acq):
        return (f"the later acquisition (AcquisitionNumber {_acquisition_label(acq)} over "
                f"{_acquisition_label(other_acq)})")
    number, other_number = hs[0].series_number, other_hs[0].series_number
    if (number or -1) != (other_number or -1):
        return f"the higher SeriesNumber ({number} over {other_number})"
    return "the larger SeriesInstanceUID (the series differ in nothing else lungzarr ranks)"


def _ids(headers) -> str:
    ids = sorted({h.patient_id.strip() for h in headers})
    return repr(ids[0]) if len(ids) == 1 else repr(ids)


def _own_groups(groups: dict, patient: str, folder) -> tuple[dict, str]:
    """The series/acquisitions of the folder's own patient, and why (a phrase for the selection reason).

    A folder whose axial CT holds one PatientID (0010,0020) is that patient's, whatever the id (anonymised
    archives name folders otherwise): every group is kept. A folder with several PatientIDs keeps the groups
    whose PatientID is ``patient`` (the folder name, the id lungzarr stores the volume under): the
    longest series of the folder may be another patient's, and one patient's CT must never be stored under
    another's id. None matching is a PatientError listing every series (PatientID, SeriesInstanceUID,
    slices, sub-folder) and how to split the folder. Several series of the folder's own id are one
    patient's: they are ranked as in a one-patient folder.
    """
    ids = {key: {h.patient_id.strip() for h in hs} for key, hs in groups.items()}
    every = set().union(*ids.values())
    if len(every) <= 1:
        return groups, ""
    own = {key: hs for key, hs in groups.items() if patient in ids[key]}
    if own:
        return own, f"PatientID {patient!r} is the folder's name (the folder holds {len(every)} PatientIDs); "
    # Named from the headers, not the group keys: the listing holds whatever the grouping is.
    listing = "; ".join(f"PatientID {_ids(hs)} series {hs[0].series_uid}"
                        f"{'' if hs[0].acquisition is None else f' acquisition {hs[0].acquisition}'} "
                        f"({len(hs)} slices, in {_subfolder(hs, folder)!r})"
                        for hs in sorted(groups.values(), key=lambda hs: (_subfolder(hs, folder), _ids(hs))))
    example = sorted(every)[:2]
    raise PatientError(f"the folder holds the axial CT series of {len(every)} PatientIDs (0010,0020) and none is "
                       f"the folder's name {patient!r}, the id lungzarr would store it under: {listing}. lungzarr "
                       f"never stores one patient's CT under another's id: give each patient a folder of its own "
                       f"named by its PatientID (e.g. INPUT/{example[0]}/ and INPUT/{example[1]}/), or rename "
                       f"this folder after the one patient it holds", patient=patient, stage=STAGE,
                       file=str(folder))


def _subfolder(headers, folder) -> str:
    """The folder (relative to the patient folder; '.' itself) that holds the files of ``headers``."""
    root = str(folder).rstrip("/") + "/"
    parents = [posixpath.dirname(h.path[len(root):] if h.path.startswith(root) else h.path) for h in headers]
    try:
        common = posixpath.commonpath(parents)
    except ValueError:  # absolute and relative mixed: cannot happen below one folder
        common = parents[0]
    return common or "."


def read_series(folder, *, patient: str | None = None, strict: bool = False) -> Series:
    """Find, group, choose and validate the axial CT series of one patient folder.

    Only headers are read (and, for compressed transfer syntaxes, the two edge
    slices decoded once to tell whether they are damaged; then the first, middle
    and last slice decoded once to tell whether the values are HU,
    :func:`_check_values_are_hu`). Acquisitions of one series that form one
    stack (step-and-shoot) are one volume. A slice stored in another
    orientation than the stack is reoriented exactly where it is decoded
    (:attr:`SliceHeader.reorient`). A folder whose axial CT holds several
    PatientIDs keeps the series of the one equal to ``patient``
    (:func:`_own_groups`). Localizers, non-axial
    or non-greyscale images, files whose header cannot be read, non-DICOM files
    and the series/acquisitions not chosen are listed in ``Series.skipped``.

    Parameters
    ----------
    folder : path
    patient : str, optional
        Default the folder name.
    strict : bool
        Every damaged file (unreadable header, truncated or undecodable edge
        slice) is an error instead of being skipped or dropped.

    Raises
    ------
    PatientError
        With the file and the fix, when no usable series can be built: empty
        folder, no DICOM, no axial CT image, a single slice, a missing or
        non-finite ImagePositionPatient, duplicate positions from different
        images, irregular slice spacing (a gap, its missing positions named),
        acquisitions of the chosen series at overlapping positions (repeats,
        phases), a missing or damaged ImageOrientationPatient, a geometry that
        puts a voxel centre more than half a voxel off the axis-aligned grid
        (gantry tilt, rotation, oblique, sheared stack: :mod:`geometry`),
        mixed image sizes, missing or non-positive PixelSpacing, an implausible RescaleSlope/Intercept, a
        damaged slice inside the stack, or a transfer syntax with no decoder;
        several PatientIDs none of which is ``patient``; a pixel or slice
        spacing or sampled values no chest CT has (:mod:`lungzarr.io.plausible`).
    """
    remote = is_url(folder)
    folder = str(folder).rstrip("/") if remote else Path(folder)
    patient = patient if patient is not None else (folder.rsplit("/", 1)[-1] if remote else folder.name)
    if remote:
        dicom_files, other, infos, parsed = _find_remote_dicom(folder, patient)
    else:
        (dicom_files, other), infos, parsed = find_dicom_files(folder, patient=patient), None, {}
    skipped = [(str(p), "not a DICOM file") for p in other]
    notes, user = [], []
    if other:
        msg = f"{patient}: ignored {len(other)} non-DICOM file(s), e.g. {_name(other[0])!r}"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
        names = ", ".join(repr(_name(p)) for p in other[:5]) + (", ..." if len(other) > 5 else "")
        user.append({"file": str(other[0]) if len(other) == 1 else str(folder),
                     "reason": f"ignored {len(other)} non-DICOM file(s) in the folder: {names}"})

    groups: dict[tuple, list[SliceHeader]] = defaultdict(list)
    unreadable, not_slices = [], []
    for path in dicom_files:
        try:
            h = parsed.pop(str(path), None)
            if isinstance(h, PatientError):
                raise h
            if h is None:
                h = read_header(path, patient=patient)
        except PatientError as exc:
            # A stray damaged file must not cost the patient; inside the series it shows as a gap.
            if strict:
                raise
            unreadable.append(exc)
            skipped.append((str(path), exc.reason))
            continue
        why = _not_axial_reason(h)
        if why is None and h.modality and h.modality != "CT":
            why = f"modality {h.modality!r} is not CT"
        if why is not None:
            skipped.append((h.path, why))
            not_slices.append((h.path, why, _holds_image(h)))
            continue
        groups[(h.series_uid, h.acquisition)].append(h)
    if not groups:
        if unreadable and len(unreadable) == len(dicom_files):
            raise unreadable[0]
        raise _no_axial_error(not_slices, unreadable, len(dicom_files), patient, folder)
    for exc in unreadable:
        user.append({"file": exc.file, "reason": f"DICOM file skipped: {exc.reason}"})
    if not_slices:
        names = ", ".join(repr(_name(p)) for p, *_ in not_slices[:5]) + (", ..." if len(not_slices) > 5 else "")
        user.append({"file": not_slices[0][0] if len(not_slices) == 1 else str(folder),
                     "reason": f"skipped {len(not_slices)} image(s) that are not slices of an axial CT series "
                               f"({names}); e.g. {not_slices[0][1]}"})

    groups, merged, repeats = _merge_acquisitions(groups)
    (series_uid, acq), reason = _choose_group(groups, patient, folder)
    if series_uid in repeats:
        raise _repeats_error(repeats[series_uid], patient, folder)
    if (series_uid, acq) in merged:
        reason += f"; {merged[(series_uid, acq)]}"
    for key, hs in groups.items():
        if key != (series_uid, acq):
            skipped.extend((h.path, f"other series/acquisition {key[0]} / {key[1]} not chosen") for h in hs)
    headers = groups[(series_uid, acq)]
    user.extend(_patient_id_warnings(headers, groups, (series_uid, acq), folder))

    headers = _check_positions(headers, patient, skipped)
    _check_uniform_images(headers, patient)
    _check_rescale(headers, patient)
    for syntax in dict.fromkeys(h.transfer_syntax for h in headers):
        _check_decodable(next(h for h in headers if h.transfer_syntax == syntax), patient)
    headers, dropped = _drop_broken_edges(headers, patient, strict=strict)
    for d in dropped:
        skipped.append((d["file"], d["reason"]))
        user.append(dict(d))
    headers, grid, slice_spacing, geometry_record, extra_notes, extra_user = _grid_from_headers(headers, patient)
    _check_slice_spacing(headers, grid, patient)
    _check_values_are_hu(headers, patient)
    notes.extend(extra_notes)
    user.extend(extra_user)
    return Series(patient=patient, folder=str(folder), headers=headers, grid=grid,
                  slice_spacing=slice_spacing, reason=reason, skipped=skipped, warnings=notes,
                  dropped=dropped, user_warnings=user, geometry=geometry_record,
                  file_infos=None if infos is None else {h.path: infos[h.path] for h in headers})


def _name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _holds_image(h: SliceHeader) -> bool:
    """True when the file is an image (Rows and Columns set), not a directory or other non-image file."""
    return not h.directory and h.rows > 0 and h.columns > 0


def _no_axial_error(not_slices, unreadable, n_dicom: int, patient, folder) -> PatientError:
    """The refusal of a folder without one axial CT slice, its example an image's reason where there is one.

    ``not_slices``: ``(path, reason, holds an image)`` of the DICOM files that are not axial CT slices;
    ``unreadable``: the PatientErrors of those whose header cannot be read. A localizer's "localizer/scout
    image" says what the folder is; a DICOMDIR beside it says nothing, so it is named after the image.
    """
    images = [(p, why) for p, why, image in not_slices if image]
    others = [(p, why) for p, why, image in not_slices if not image] + [(e.file, e.reason) for e in unreadable]
    if images:
        example, rest = images[0], others
    elif others:
        example, rest = others[0], others[1:]
    else:
        example, rest = (str(folder), "no image"), []
    also = ""
    if images and rest:
        also = (f"; {len(rest)} other file(s) hold no image, e.g. {_name(rest[0][0])!r}: {rest[0][1]}")
    return PatientError(f"no axial CT image in the folder ({n_dicom} DICOM file(s); e.g. {_name(example[0])!r}: "
                        f"{example[1]}{also}); lungzarr needs an axial chest CT series: put its slices in this "
                        f"folder (or give the folder that holds them), or remove the folder",
                        patient=patient, stage=STAGE, file=str(example[0]))


def _find_remote_dicom(folder: str, patient):
    """The DICOM objects below a prefix, the other objects, their listing entries and the DICOM ones' headers.

    Each object is fetched once here (in concurrent batches, see
    :func:`lungzarr.io.locations.read_objects`) to tell DICOM from other files
    and to read its header from the same bytes, which are dropped at once (a
    batch in memory at a time). An object that cannot be fetched, or whose
    header is damaged, has its PatientError in place of a header, so it is
    reported like an unreadable local file (its URL named). Nothing is
    written to disk.
    """
    try:
        infos = list_files(folder)
    except FileNotFoundError:
        infos = {}
    except Exception as exc:
        raise PatientError(f"cannot list the patient folder ({describe_error(exc)}); check the URL and the "
                           f"credentials in the environment", patient=patient, stage=STAGE, file=folder) from exc
    urls = [u for u in infos if not any(part.startswith(".") for part in u[len(folder) + 1:].split("/"))]
    if not urls:
        raise PatientError("the patient folder is empty; put the series' .dcm files in it or remove the folder",
                           patient=patient, stage=STAGE, file=folder)
    dicom, other, parsed = [], [], {}
    for url, data in read_objects(urls):
        if isinstance(data, BaseException):
            dicom.append(url)
            parsed[url] = PatientError(f"cannot read the object ({describe_error(data)}); check that it exists "
                                       f"and that the credentials in the environment may read it",
                                       patient=patient, stage=STAGE, file=url)
        elif _is_dicom_file(url, data):
            dicom.append(url)
            try:
                parsed[url] = read_header(url, patient=patient, data=data)
            except PatientError as exc:
                parsed[url] = exc
        else:
            other.append(url)
    if not dicom:
        raise PatientError(f"no DICOM file among the {len(urls)} file(s) in the folder (e.g. {_name(urls[0])!r}); "
                           f"put the series' DICOM files in it", patient=patient, stage=STAGE, file=folder)
    return dicom, other, infos, parsed


def _patient_id_warnings(headers, groups, chosen, folder) -> list[dict]:
    """Warnings when the chosen series holds several PatientIDs, or the folder another patient's files."""
    out = []
    ids = sorted({h.patient_id for h in headers})
    if len(ids) > 1:
        out.append({"file": str(folder), "reason": f"the chosen series holds {len(ids)} PatientIDs "
                    f"(0010,0020) {ids!r}: check that the folder holds one patient"})
    foreign = [h for key, hs in groups.items() if key != chosen for h in hs if h.patient_id not in ids]
    if foreign:
        others = sorted({h.patient_id for h in foreign})
        out.append({"file": foreign[0].path, "reason": f"skipped {len(foreign)} file(s) of another patient "
                    f"(PatientID {others!r}, the chosen series has {ids!r}): move them to their own folder"})
    return out


def _damage_message(h: SliceHeader, damage: str) -> str:
    return (f"cannot decode the pixel data: {damage}; the file is truncated or damaged: replace it from the "
            f"archive or remove it")


def _decode_damage(h: SliceHeader) -> str | None:
    """Decode one compressed slice now; why it fails, or None."""
    try:
        _decode_one(h.path, h)
    except PatientError as exc:
        return exc.reason
    return None


def _drop_broken_edges(headers, patient, *, strict: bool):
    """Drop damaged slices at either end of the sorted stack; a damaged slice inside is an error.

    Native syntaxes are judged from the header and the file size
    (:attr:`SliceHeader.damage`); compressed edge slices are decoded once.
    Returns the kept headers and ``[{"file", "reason"}]`` of the dropped ones.
    """
    cache: dict[int, str | None] = {}

    def broken(i):
        if i not in cache:
            h = headers[i]
            if h.damage is not None:
                cache[i] = _damage_message(h, h.damage)
            elif h.transfer_syntax in _NATIVE_SYNTAXES:
                cache[i] = None
            else:
                cache[i] = _decode_damage(h)
        return cache[i]

    lo, hi = 0, len(headers) - 1
    while lo <= hi and broken(lo):
        lo += 1
    while hi >= lo and broken(hi):
        hi -= 1
    # Native slices are all judged from headers; compressed ones only where decoded (the edges).
    judged = [i for i in range(len(headers)) if i in cache or headers[i].damage is not None]
    first = next((i for i in judged if broken(i)), None)
    if strict and first is not None:
        raise PatientError(f"{cache[first]} (--strict: every damaged file is an error)", patient=patient,
                           stage=STAGE, file=headers[first].path)
    if lo > hi:
        raise PatientError(cache[0], patient=patient, stage=STAGE, file=headers[0].path)
    inside = next((i for i in range(lo, hi + 1) if headers[i].damage is not None), None)
    if inside is not None:
        raise PatientError(_damage_message(headers[inside], headers[inside].damage), patient=patient,
                           stage=STAGE, file=headers[inside].path)
    dropped = [{"file": headers[i].path,
                "reason": f"damaged slice at the {'lower' if i < lo else 'upper'} end of the stack "
                          f"(z={headers[i].position[2]:g} mm) dropped: {cache[i]}"}
               for i in [*range(lo), *range(hi + 1, len(headers))]]
    kept = headers[lo:hi + 1]
    if len(kept) < 2:
        raise PatientError(f"only one usable axial slice ({Path(kept[0].path).name!r}) once the damaged edge "
                           f"slice(s) are dropped; replace the damaged files from the archive",
                           patient=patient, stage=STAGE, file=dropped[0]["file"])
    return kept, dropped


def _check_rescale(headers, patient):
    """Refuse RescaleSlope/Intercept no CT scanner writes (a NaN slope would flatten slices to -1024 HU)."""
    (slo, shi), (ilo, ihi) = RESCALE_SLOPE_RANGE, RESCALE_INTERCEPT_RANGE
    for h in headers:
        if not (np.isfinite(h.slope) and slo <= h.slope <= shi):
            raise PatientError(f"RescaleSlope (0028,1053) is {h.slope!r}; a CT slope must be finite and within "
                               f"[{slo:g}, {shi:g}]: the header is damaged, fix it or remove the file",
                               patient=patient, stage=STAGE, file=h.path)
        if not (np.isfinite(h.intercept) and ilo <= h.intercept <= ihi):
            raise PatientError(f"RescaleIntercept (0028,1052) is {h.intercept!r}; a CT intercept must be finite "
                               f"and within [{ilo:g}, {ihi:g}]: the header is damaged, fix it or remove the file",
                               patient=patient, stage=STAGE, file=h.path)


def _check_positions(headers, patient, skipped):
    missing = [h for h in headers if h.position is None]
    if missing:
        raise PatientError(f"{len(missing)} slice(s) have no ImagePositionPatient (0020,0032), e.g. "
                           f"{Path(missing[0].path).name!r}: lungzarr cannot place them in z; fix the header or "
                           f"remove the file(s)", patient=patient, stage=STAGE, file=missing[0].path)
    bad = next((h for h in headers if not np.all(np.isfinite(h.position))), None)
    if bad is not None:
        raise PatientError(f"ImagePositionPatient (0020,0032) is {list(bad.position)!r}, not finite: lungzarr "
                           f"cannot place the slice in z; fix the header or remove the file",
                           patient=patient, stage=STAGE, file=bad.path)
    headers = sorted(headers, key=lambda h: (h.position[2], h.path))
    kept = [headers[0]]
    for h in headers[1:]:
        prev = kept[-1]
        if abs(h.position[2] - prev.position[2]) < 1e-3:
            if h.sop_uid and h.sop_uid == prev.sop_uid:
                skipped.append((h.path, f"duplicate copy of {Path(prev.path).name} (same SOPInstanceUID)"))
                continue
            raise PatientError(f"two different images at the same slice position z={h.position[2]:g} mm: "
                               f"{Path(prev.path).name!r} and {Path(h.path).name!r}; remove the wrong one or "
                               f"split the series into two folders", patient=patient, stage=STAGE, file=h.path)
        kept.append(h)
    if len(kept) < 2:
        raise PatientError(f"only one axial slice ({Path(kept[0].path).name!r}); lungzarr needs a volume of at "
                           f"least two slices (and at least 9 at 2 mm for nodule detection)",
                           patient=patient, stage=STAGE, file=kept[0].path)
    return kept


def _check_uniform_images(headers, patient):
    for h in headers:
        if h.pixel_spacing is not None and not all(np.isfinite(v) and v > 0 for v in h.pixel_spacing):
            raise PatientError(f"PixelSpacing (0028,0030) is {list(h.pixel_spacing)!r}; it must be two positive "
                               f"finite millimetre values: fix the header", patient=patient, stage=STAGE,
                               file=h.path)
    ref = headers[0]
    for h in headers[1:]:
        if (h.rows, h.columns) != (ref.rows, ref.columns):
            raise PatientError(f"slice size {h.rows}x{h.columns} differs from {ref.rows}x{ref.columns} of "
                               f"{Path(ref.path).name!r}; the folder mixes images of different series: split it",
                               patient=patient, stage=STAGE, file=h.path)
        if h.pixel_spacing != ref.pixel_spacing:
            raise PatientError(f"PixelSpacing {h.pixel_spacing!r} differs from {ref.pixel_spacing!r} of "
                               f"{Path(ref.path).name!r}; split the folder by series",
                               patient=patient, stage=STAGE, file=h.path)
    if ref.pixel_spacing is None:
        raise PatientError("no PixelSpacing (0028,0030) in the header; lungzarr cannot resample without it: fix the "
                           "header", patient=patient, stage=STAGE, file=ref.path)
    check_spacing(ref.pixel_spacing, kind="pixel", what="PixelSpacing (0028,0030)", patient=patient,
                  file=ref.path, n=max(ref.rows, ref.columns))


def _check_slice_spacing(headers, grid, patient):
    """Refuse a slice step no chest CT has (:data:`lungzarr.io.plausible.SLICE_SPACING_MM`): the grid's z step,
    from the slices' ImagePositionPatient (regular within SPACING_RTOL by then)."""
    check_spacing(abs(grid.step[0]), kind="slice",
                  what=f"the slice spacing (ImagePositionPatient z of {Path(headers[0].path).name!r} .. "
                       f"{Path(headers[-1].path).name!r}, {len(headers)} slices)",
                  patient=patient, file=headers[1].path, n=len(headers))


def _check_values_are_hu(headers, patient):
    """Refuse a series whose values are not HU (:func:`lungzarr.io.plausible.check_hu_sample`).

    "No value below -500 HU" is a property of the whole series, but the decode runs a z-chunk per dask
    task, and a reduction over the ingest write would fail the patient only after its volume was written.
    The first, middle and last slices decide it here instead, before any chunk is decoded, with the
    ingest's own decode (so their int16 range is checked too): every slice through a chest holds air, so
    a real CT passes on its middle slice alone, and stored values without the rescale are >= 0 in every
    slice. Three slices per patient, read where the headers are read (a worker, when prefetched), never the
    whole volume twice. The rescale values are named in the message: they are what is missing.
    """
    picks = sorted({0, len(headers) // 2, len(headers) - 1})
    chosen = [headers[k] for k in picks]
    hu = decode_slices_to_hu([h.path for h in chosen], [h.slope for h in chosen], [h.intercept for h in chosen],
                             patient=patient, layouts=[h.pixels for h in chosen])
    slopes = sorted({h.slope for h in headers})
    intercepts = sorted({h.intercept for h in headers})
    check_hu_sample(int(hu.min()), where=f"slices {picks!r} of {len(headers)}", patient=patient,
                    file=chosen[len(chosen) // 2].path,
                    fix=f"the series' RescaleIntercept (0028,1052) is {_listed(intercepts)} and RescaleSlope "
                        f"(0028,1053) {_listed(slopes)}; set them to what the scanner wrote (CT: intercept "
                        f"-1024 or -1000, slope 1) or replace the files from the archive")


def _listed(values) -> str:
    return f"{values[0]:g}" if len(values) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _check_decodable(h: SliceHeader, patient):
    """Fail before any pixel is read when the transfer syntax has no decoder here."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(h.transfer_syntax)
    except NotImplementedError:
        raise PatientError(f"transfer syntax {h.transfer_syntax} is not supported by pydicom; convert the series "
                           f"to an uncompressed syntax (e.g. `gdcmconv --raw`)",
                           patient=patient, stage=STAGE, file=h.path) from None
    if not decoder.is_available:
        package = next((pkg for prefix, pkg in _DECODER_PACKAGES.items() if h.transfer_syntax.startswith(prefix)),
                       "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
        raise PatientError(f"pixel data is compressed ({decoder.UID.name}, {h.transfer_syntax}) and no decoder "
                           f"is installed: run `pip install {package}` (or python-gdcm)",
                           patient=patient, stage=STAGE, file=h.path)


@dataclass(frozen=True)
class _SpacingDefect:
    """An irregular slice spacing: what it is (``what``), the fix alone (``fix``), the file to name, and the
    fix when the stack is also off its axis-aligned grid (``fix_with_geometry``: both fixed at once)."""

    what: str
    fix: str
    joiner: str
    file: str
    fix_with_geometry: str

    def error(self, patient) -> PatientError:
        return PatientError(f"{self.what}{self.joiner}{self.fix}", patient=patient, stage=STAGE, file=self.file)


#: How to put a stack whose voxels are off an axis-aligned grid onto one (lungzarr does not resample DICOM).
_RESAMPLE_FIX = ("resample the series exactly from its per-slice headers (ImagePositionPatient, "
                 "ImageOrientationPatient) onto {grid} (e.g. 3D Slicer's DICOM import with acquisition geometry "
                 "regularization, then a resample to identity directions) and ingest that volume as NIfTI")


def _spacing_runs(steps) -> list[tuple[int, int]] | None:
    """The stack as runs of regular spacing, or None when it is not several of them.

    ``steps``: the z steps between consecutive slices. Runs are maximal stretches of at least two steps
    equal within :data:`SPACING_RTOL`, as ``(first step, last step)`` index pairs; consecutive runs may be
    separated by at most one other step (the step from one reconstruction to the next) and must differ in
    spacing (equal spacings either side of one odd step are a gap or a stray slice, not two spacings).
    A series reconstructed at two slice thicknesses (GE head CT: 4 mm, then 7 mm) is two runs.
    """
    runs, start = [], 0
    for k in range(1, len(steps) + 1):
        if k == len(steps) or abs(steps[k] - steps[start]) > SPACING_RTOL * abs(steps[start]):
            runs.append((start, k - 1))
            start = k
    long = [r for r in runs if r[1] > r[0]]
    if len(long) < 2 or sum(r[1] - r[0] + 1 for r in long) < len(steps) - (len(long) - 1):
        return None
    if long[0][0] > 0 or long[-1][1] < len(steps) - 1:
        return None
    for (_, end), (begin, _) in zip(long, long[1:]):
        if begin - end > 2:
            return None
    spacings = [float(np.median(steps[a:b + 1])) for a, b in long]
    if any(abs(x - y) <= SPACING_RTOL * max(x, y) for x, y in zip(spacings, spacings[1:])):
        return None
    return long


def _spacing_defect(headers, z, steps, median) -> _SpacingDefect | None:
    """What is irregular in the slice spacing of a sorted stack, or None when it is regular.

    Several runs of regular spacing (:func:`_spacing_runs`) are named with each run's slices, spacing and
    SliceThickness; else the first irregular step: a gap (a whole number of steps: the missing positions
    named) or a step that fits nothing (a slice missing or the folder mixing series).
    """
    bad = np.flatnonzero(np.abs(steps - median) > SPACING_RTOL * median)
    if not bad.size:
        return None
    names = [Path(h.path).name for h in headers]
    runs = _spacing_runs(steps)
    if runs is not None:
        parts, joins = [], []
        for a, b in runs:
            thick = sorted({h.slice_thickness for h in headers[a:b + 2] if h.slice_thickness is not None})
            thickness = f", SliceThickness {_listed(thick)} mm" if thick else ""
            parts.append(f"{names[a]!r} .. {names[b + 1]!r} ({b - a + 2} slices{thickness}) "
                         f"{float(np.median(steps[a:b + 1])):.3g} mm apart")
        for (_, end), (begin, _) in zip(runs, runs[1:]):
            if begin - end == 2:
                k = end + 1
                joins.append(f"{steps[k]:.3g} mm between {names[k]!r} (z={z[k]:g}) and {names[k + 1]!r} "
                             f"(z={z[k + 1]:g})")
        between = f", with {'; '.join(joins)}" if joins else ""
        others = ", ".join(f"{names[a]!r} .. {names[b + 1]!r}" for a, b in runs[1:])
        return _SpacingDefect(
            what=(f"slice spacing is not regular: the stack is {len(runs)} runs of regular spacing, "
                  f"{', then '.join(parts)}{between}: a series reconstructed at {len(runs)} slice spacings/"
                  f"thicknesses"),
            joiner="; ",
            fix=(f"resample it onto one regular grid from its per-slice headers and ingest that volume as NIfTI "
                 f"(lungzarr does not interpolate between slices), or keep one spacing's slices in this folder "
                 f"and move the others ({others}) to a folder of their own, ingested as another patient id"),
            fix_with_geometry=_RESAMPLE_FIX.format(grid="one regular axis-aligned grid") + (
                " (split by spacing, each part would still be off its grid)"),
            file=headers[runs[1][0]].path)
    i = int(bad[0])
    a, b = names[i], names[i + 1]
    n_missing = int(round(steps[i] / median)) - 1
    if n_missing >= 1 and abs(steps[i] - (n_missing + 1) * median) <= SPACING_RTOL * median:
        where = z[i] + median * np.arange(1, n_missing + 1)
        listed = ", ".join(f"{v:g}" for v in where[:6]) + (f", ... {where[-1]:g}" if n_missing > 6 else "")
        acqs = sorted({h.acquisition for h in headers if h.acquisition is not None})
        hint = f" (the series has acquisitions {acqs}: is one missing?)" if len(acqs) > 1 else ""
        fix = "add the missing slice(s) from the archive (lungzarr does not interpolate across a gap)"
        return _SpacingDefect(
            what=(f"slice spacing is not regular: {steps[i]:g} mm between {a!r} (z={z[i]:g}) and {b!r} "
                  f"(z={z[i + 1]:g}) where the series steps {median:g} mm: the stack has a gap, {n_missing} "
                  f"slice(s) missing at z = {listed} mm{hint}"),
            joiner="; ", fix=fix, file=headers[i + 1].path,
            fix_with_geometry=f"{fix}, then " + _RESAMPLE_FIX.format(grid="an axis-aligned grid"))
    fix = "add the missing slice(s) or remove the stray file(s)"
    return _SpacingDefect(
        what=(f"slice spacing is not regular: {steps[i]:g} mm between {a!r} (z={z[i]:g}) and {b!r} "
              f"(z={z[i + 1]:g}) where the series has {median:g} mm; a slice is missing or the folder mixes series"),
        joiner=": ", fix=fix, file=headers[i + 1].path,
        fix_with_geometry=f"{fix}, then " + _RESAMPLE_FIX.format(grid="an axis-aligned grid"))


def _check_orientations(headers, patient):
    """Every slice of the stack has a usable ImageOrientationPatient, or a PatientError naming the file."""
    missing = [h for h in headers if h.orientation is None]
    if missing:
        raise PatientError(f"{len(missing)} slice(s) have no ImageOrientationPatient (0020,0037), e.g. "
                           f"{Path(missing[0].path).name!r}: lungzarr cannot tell which way the pixels lie in the "
                           f"patient; fix the header (an axial slice has 1\\0\\0\\0\\1\\0) or remove the "
                           f"file(s)", patient=patient, stage=STAGE, file=missing[0].path)
    for h in headers:
        why = geometry.orientation_problem(h.orientation[:3], h.orientation[3:])
        if why is not None:
            raise PatientError(f"ImageOrientationPatient (0020,0037) is {list(h.orientation)!r}: {why}; the "
                               f"header is damaged: fix it or remove the file", patient=patient, stage=STAGE,
                               file=h.path)


def _geometry_detail(placement: geometry.Placement, headers) -> tuple[str, str]:
    """The reader's words on a stack's geometry (the odd slice, GantryDetectorTilt) and the file to name."""
    kinds = {kind for kind, _ in placement.deviations}
    detail = ""
    file = headers[0].path
    if "slices disagree" in kinds:
        file = headers[placement.worst_slice].path
        detail = f" ({Path(file).name!r} against {Path(headers[0].path).name!r})"
    tilts = sorted({h.gantry_tilt for h in headers if h.gantry_tilt is not None})
    if tilts and (kinds & {"gantry tilt", "oblique", "sheared stack"} or any(tilts)):
        detail += f"; GantryDetectorTilt (0018,1120) says {', '.join(f'{t:g}' for t in tilts)} deg"
    return detail, file


def _geometry_error(placement: geometry.Placement, headers, patient) -> PatientError:
    """The refusal of a stack whose voxels do not lie on an axis-aligned grid: what it is, how far, the fix."""
    detail, file = _geometry_detail(placement, headers)
    return PatientError(f"the voxels do not lie on an axis-aligned grid: {placement.refusal(detail)}: "
                        f"{_RESAMPLE_FIX.format(grid='an axis-aligned grid')}",
                        patient=patient, stage=STAGE, file=file)


def _stack_error(spacing: _SpacingDefect, placement: geometry.Placement, headers, patient) -> PatientError:
    """The refusal of a stack whose spacing is irregular: the spacing defect and, where its slices are also off
    an axis-aligned grid (each slice at its own z: :attr:`geometry.Placement.in_slice_ok`), that geometry with
    its angles, in one message, so that a user who fixes one is not refused again for the other."""
    if placement.in_slice_ok or not placement.deviations:
        return spacing.error(patient)
    detail, _ = _geometry_detail(placement, headers)
    return PatientError(f"{spacing.what}; and the voxels do not lie on an axis-aligned grid either: "
                        f"{placement.what()}{detail}. Even with each slice at its own z, voxel centres lie up to "
                        f"{placement.offset_text(in_slice=True)} from where an axis-aligned grid would put them. "
                        f"Both must be fixed before lungzarr can store the series (it never approximates "
                        f"geometry): {spacing.fix_with_geometry}",
                        patient=patient, stage=STAGE, file=spacing.file)


def _grid_from_headers(headers, patient):
    """The stored grid of a sorted stack, from every slice's own IOP, IPP and PixelSpacing (the geometry rule).

    Each slice is laid out as the stack stores it (:func:`geometry.orient_slice`: flips/transpose only,
    towards the orientation most slices have), then every voxel centre must lie within half a voxel
    (per axis) of where the axis-aligned grid puts it (:func:`geometry.place_stack`), or the series is
    refused with what its geometry is (gantry tilt, in-plane rotation, oblique, sheared stack, slices
    that disagree) and the fix.

    Returns
    -------
    headers : list of SliceHeader
        With :attr:`SliceHeader.reorient` set where a slice is stored otherwise than the stack.
    grid, slice_spacing
    record : dict
        :meth:`geometry.Placement.record` with the reoriented slices (provenance).
    notes, user_warnings : list
    """
    _check_orientations(headers, patient)
    z = np.array([h.position[2] for h in headers])
    steps = np.diff(z)
    slice_spacing = float(abs(z[0] - z[1]))
    median = float(np.median(steps))
    # The spacing and the geometry are both judged before either refuses: one message names every defect.
    spacing = _spacing_defect(headers, z, steps, median)
    signs = geometry.stack_signs((h.orientation[:3], h.orientation[3:]) for h in headers)
    laid = [geometry.orient_slice(h.position, h.orientation[:3], h.orientation[3:], h.pixel_spacing,
                                  (h.rows, h.columns), signs) for h in headers]
    shape = laid[0][4]
    odd = next((h for h, lay in zip(headers, laid) if lay[4] != shape), None)
    if odd is not None:
        if spacing is not None:
            raise spacing.error(patient)
        raise PatientError(f"the slice is stored transposed (ImageOrientationPatient {list(odd.orientation)!r}) "
                           f"and its {odd.rows}x{odd.columns} pixels do not fit the stack's {shape[0]}x{shape[1]}; "
                           f"the folder mixes series: split it", patient=patient, stage=STAGE, file=odd.path)
    placement = geometry.place_stack([lay[1] for lay in laid], [lay[2] for lay in laid],
                                     [lay[3] for lay in laid], (len(headers), *shape))
    if spacing is not None:
        raise _stack_error(spacing, placement, headers, patient)
    if not placement.ok:
        raise _geometry_error(placement, headers, patient)
    notes, user = [], []
    reoriented = [(h, lay[0]) for h, lay in zip(headers, laid) if not lay[0].identity]
    headers = [replace(h, reorient=None if lay[0].identity else lay[0]) for h, lay in zip(headers, laid)]
    record = placement.record()
    record["reoriented_slices"] = [{"file": h.path, "orientation": list(h.orientation), "applied": op.describe()}
                                   for h, op in reoriented]
    if reoriented:
        names = ", ".join(repr(Path(h.path).name) for h, _ in reoriented[:5]) + (", ..." if len(reoriented) > 5
                                                                                  else "")
        msg = (f"{len(reoriented)} slice(s) stored in another orientation than the rest of the stack "
               f"({names}; e.g. ImageOrientationPatient {list(reoriented[0][0].orientation)!r}) reoriented exactly "
               f"({reoriented[0][1].describe()}): check that their headers and pixels agree")
        notes.append(msg)
        user.append({"file": reoriented[0][0].path, "reason": msg})
    if any(o > 1e-3 for o in placement.offset_mm):
        notes.append(f"geometry: {placement.what()}; voxel centres lie up to {placement.offset_text()} from the "
                     f"stored axis-aligned grid (accepted: within half a voxel)")
    return headers, placement.grid, slice_spacing, record, notes, user


# --------------------------------------------------------------------------
# pixel decoding
# --------------------------------------------------------------------------

def _fetch(path, patient):
    """The bytes of an object (a URL), or a PatientError naming it."""
    ((url, data),) = read_objects([path])
    return _fetched(url, data, patient)


def _native_pixels(path, layout: PixelLayout, data: bytes | None = None) -> np.ndarray | None:
    """The slice's stored values read straight from the file's bytes (see :class:`PixelLayout`), or
    None when the file is no longer the one whose header was read (another size or mtime, or other
    bytes where its pixel data element stood) or cannot be read: then pydicom decodes it, and fails
    with the file's own message where it is damaged.

    Equal to pydicom's ``dcmread(path, force=True).pixel_array`` for the files a layout is made for:
    the values as ``np.frombuffer`` of the value's first Rows x Columns x BitsAllocated/8 bytes
    (the pad byte of an odd length left out), of pydicom's dtype; where BitsStored < BitsAllocated
    shifted left then right by the difference in that dtype, as pydicom's ``correct_unused_bits``
    does (HighBit is not used, by pydicom either); a writeable (rows, columns) array.
    """
    span = layout.value_offset - layout.tag_offset + layout.nbytes
    if data is not None:
        if len(data) != layout.size:
            return None
        raw = bytearray(memoryview(data)[layout.tag_offset:layout.tag_offset + span])
    else:
        raw = bytearray(span)
        try:
            with open(path, "rb", buffering=0) as fh:
                st = os.fstat(fh.fileno())
                if st.st_size != layout.size or st.st_mtime_ns != layout.mtime_ns:
                    return None
                fh.seek(layout.tag_offset)
                got = fh.readinto(raw)
        except OSError:
            return None
        if got != span:
            return None
    if raw[:len(layout.head)] != layout.head:
        return None
    array = np.frombuffer(raw, dtype=layout.dtype, count=layout.rows * layout.columns,
                          offset=layout.value_offset - layout.tag_offset).reshape(layout.rows, layout.columns)
    if layout.shift:
        np.left_shift(array, layout.shift, out=array)
        np.right_shift(array, layout.shift, out=array)
    return array


def _decode_one(path, header: SliceHeader | None = None, *, patient: str | None = None,
                data: bytes | None = None, layout: PixelLayout | None = None) -> np.ndarray:
    """One slice's stored pixel values (2-D), or a PatientError naming the file.

    ``data``: the file's bytes when fetched already (an object on object
    storage); a URL without them is fetched here. ``layout`` (default
    ``header.pixels``): where the header found the pixels of a native slice,
    read straight from the bytes (:func:`_native_pixels`); without one, or
    when the file changed since, pydicom parses the file again and decodes it.
    """
    import pydicom

    if layout is None and header is not None:
        layout = header.pixels
    if data is None and is_url(path):
        data = _fetch(path, patient)
    if layout is not None:
        array = _native_pixels(path, layout, data)
        if array is not None:
            return array
    try:
        ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path, force=True)
        array = ds.pixel_array
    except Exception as exc:
        raise PatientError(f"cannot decode the pixel data ({describe_error(exc)}); the file is truncated "
                           f"or damaged: replace it from the archive or remove it",
                           patient=patient, stage=STAGE, file=str(path)) from exc
    if array.ndim != 2 or (header is not None and array.shape != (header.rows, header.columns)):
        raise PatientError(f"the pixel data decodes to shape {array.shape!r}, not one {ds.get('Rows')}x"
                           f"{ds.get('Columns')} greyscale slice; the file is damaged or not a CT slice: "
                           f"remove it", patient=patient, stage=STAGE, file=path)
    return array


def decode_slices_to_hu(paths, slopes, intercepts, *, patient: str | None = None, layouts=None,
                        reorient=None) -> np.ndarray:
    """Decode slices and convert them to int16 HU as the original (§1), without its wrap-around.

    Per slice, in float64 (exact for every 8/16/32-bit stored value and their
    rescaled sums): set stored values of -2000 (cylinder padding) to 0; if the
    slope is not 1 multiply and truncate toward zero; add the intercept
    truncated toward zero (the original's ``np.int16(intercept)``). The result
    must fit int16 (:func:`lungzarr.io.plausible.int16_hu`): where the
    original's ``astype(np.int16)`` wrapped (unsigned stored 40000 -> -25536,
    BitsAllocated 32, a slope of 20), the slice is refused with its file and
    values. Every value that fits is the original's.

    ``layouts``: each slice's :attr:`SliceHeader.pixels` (None entries
    allowed): native slices are then read straight from their bytes, with
    pydicom's ``pixel_array`` values, without a second pydicom parse; the
    others (and files changed since their header was read) are decoded by
    pydicom. Both give the same stored values to the same rescale and checks.

    ``reorient``: each slice's :attr:`SliceHeader.reorient` (None entries allowed): the exact
    flips/transpose that lay a slice stored in another orientation out as the stack.
    """
    layouts = [None] * len(paths) if layouts is None else list(layouts)
    if len(layouts) != len(paths):
        raise ValueError(f"layouts has {len(layouts)} entries for {len(paths)} paths; pass one "
                         f"SliceHeader.pixels (or None) per path")
    if paths and is_url(paths[0]):
        # Objects: the chunk's slices are fetched concurrently, then decoded from memory.
        arrays = [_decode_one(url, patient=patient, data=_fetched(url, data, patient), layout=layout)
                  for (url, data), layout in zip(read_objects(paths), layouts)]
    else:
        arrays = [_decode_one(path, patient=patient, layout=layout) for path, layout in zip(paths, layouts)]
    if reorient is not None:
        arrays = [a if op is None else op.apply(a) for a, op in zip(arrays, reorient)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise PatientError(f"decoded slices have different sizes {sorted(shapes)!r}; the headers' Rows/Columns "
                           f"are wrong: split or fix the series", patient=patient, stage=STAGE, file=paths[0])
    image = np.empty((len(arrays), *(arrays[0].shape if arrays else (0, 0))), dtype=np.int16)
    for k, (stored, slope, intercept, path) in enumerate(zip(arrays, slopes, intercepts, paths)):
        image[k] = _slice_to_hu(stored, slope, intercept, patient=patient, path=path)
    return image


def _slice_to_hu(stored: np.ndarray, slope: float, intercept: float, *, patient, path) -> np.ndarray:
    """One slice's stored values as int16 HU (see :func:`decode_slices_to_hu`), or a PatientError."""
    values = stored.astype(np.float64)
    if stored.dtype.kind == "f":  # float pixel data (not CT): the original's astype(np.int16) truncated it
        values = np.trunc(values)
    values[values == PADDING_VALUE] = 0
    if slope != 1:
        values = np.trunc(slope * values)
    values += np.trunc(intercept)

    def source():
        kind = {"u": "unsigned", "i": "signed"}.get(stored.dtype.kind, stored.dtype.name)
        return (f"stored {stored.min():g} .. {stored.max():g} ({kind} {stored.dtype.itemsize * 8}-bit) x "
                f"RescaleSlope {slope:g} + RescaleIntercept {intercept:g}")

    return int16_hu(values, patient=patient, file=str(path), source=source,
                    fix="the header's BitsAllocated/PixelRepresentation (0028,0100/0103) or RescaleSlope/"
                        "RescaleIntercept (0028,1053/1052) do not describe the pixels: fix the header or replace "
                        "the file from the archive")


def _fetched(url, data, patient):
    if isinstance(data, BaseException):
        raise PatientError(f"cannot read the object ({describe_error(data)}); check that it exists and that the "
                           f"credentials in the environment may read it", patient=patient, stage=STAGE, file=url)
    return data


class _Layouts:
    """The slices' :class:`PixelLayout` (or :class:`geometry.Reorientation`) in one opaque object: dask
    walks a tuple of dataclasses given to ``map_blocks`` field by field looking for collections
    (~0.8 CPU-s for 300 slices)."""

    __slots__ = ("layouts",)

    def __init__(self, layouts):
        self.layouts = tuple(layouts)

    def __getitem__(self, index):
        return self.layouts[index]


def _decode_block(*, paths, slopes, intercepts, patient, layouts=None, reorient=None, block_info=None):
    (z0, z1), _, _ = block_info[None]["array-location"]
    return decode_slices_to_hu(paths[z0:z1], slopes[z0:z1], intercepts[z0:z1], patient=patient,
                               layouts=None if layouts is None else layouts[z0:z1],
                               reorient=None if reorient is None else reorient[z0:z1])


def series_to_hu(series: Series, *, chunk_slices: int = 16, store=None, files=None):
    """The series as a lazy int16 dask array (z, y, x) of HU, ``chunk_slices`` slices a chunk.

    Each chunk decodes only its own files when computed, so writing the
    volume never holds more than a few chunks in memory: native slices straight
    from their bytes where the header located them (:attr:`SliceHeader.pixels`),
    the others with pydicom.

    Parameters
    ----------
    series : Series
    chunk_slices : int
    store : str or path, optional
        Where the volume is written (the pipeline passes the resolved store
        path). The task names are a ``tokenize`` of the patient, every file's
        resolved path, size and mtime, the rescale values, the chunking and
        this, so two patients, a rewritten file or another store never share
        a key in one distributed session.
    files : list, optional
        ``files_token(series.paths)`` taken already, when the headers were read
        (the pipeline stats the files on the worker that read them, not in the
        client that builds the graph); default: taken now.
    """
    import dask.array as da
    from dask.base import tokenize

    nz, ny, nx = series.shape
    slopes = tuple(h.slope for h in series.headers)
    intercepts = tuple(h.intercept for h in series.headers)
    if files is None:
        files = series.files_token()
    elif len(files) != len(series.paths):
        raise ValueError(f"files has {len(files)} entries for the {len(series.paths)} files of the series; pass "
                         f"files_token(series.paths)")
    reorient = tuple(h.reorient for h in series.headers)
    token = tokenize(series.patient, files, slopes, intercepts,
                     [None if op is None else astuple(op) for op in reorient],
                     chunk_slices, None if store is None else str(store))
    return da.map_blocks(
        _decode_block,
        chunks=(z_chunks(nz, chunk_slices), (ny,), (nx,)),
        dtype=np.int16,
        meta=np.empty((0, 0, 0), dtype=np.int16),
        name=f"decode-dicom-{token}",
        paths=tuple(series.paths),
        slopes=slopes,
        intercepts=intercepts,
        patient=series.patient,
        # Where each native slice's pixels lie (read from the headers, so from these files: the token).
        layouts=_Layouts(h.pixels for h in series.headers),
        # Each slice's flips/transpose from its own IOP (None: stored as the stack), applied on decode.
        reorient=None if not any(reorient) else _Layouts(reorient),
    )


def load_hu(folder, *, patient: str | None = None, strict: bool = False) -> tuple[np.ndarray, Grid]:
    """Read a whole series into memory as int16 HU (for tests and baselines)."""
    series = read_series(folder, patient=patient, strict=strict)
    hu = decode_slices_to_hu(series.paths, [h.slope for h in series.headers],
                             [h.intercept for h in series.headers], patient=series.patient,
                             layouts=[h.pixels for h in series.headers],
                             reorient=[h.reorient for h in series.headers])
    return hu, series.grid


def sop_uids(series: Series) -> list[str]:
    """SOPInstanceUID of each slice, in z order (to map annotations onto slices)."""
    return [h.sop_uid for h in series.headers]


# --------------------------------------------------------------------------
# writing (synthetic phantoms, test inputs)
# --------------------------------------------------------------------------

def write_series(volume_hu, folder, *, spacing, origin=(0.0, 0.0, 0.0), patient_id="PHANTOM",
                 series_uid=None, study_uid=None, acquisition=1, slice_thickness=None,
                 filename="{index:04d}.dcm") -> list[Path]:
    """Write an int16 HU volume (z, y, x) as an axial CT series of real DICOM files.

    Pixels are stored as unsigned 16-bit with RescaleIntercept -1024, the common
    CT convention.

    Parameters
    ----------
    volume_hu : ndarray
        HU values, (z, y, x), in [-1024, 64511].
    folder : path
        Created if needed.
    spacing : (float, float, float)
        Slice spacing and PixelSpacing (row, column), in mm.
    origin : (float, float, float)
        Patient coordinate (z, y, x) of the first voxel.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3:
        raise ValueError(f"volume_hu must be 3-D (z, y, x), got shape {volume_hu.shape!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    stored = np.clip(np.rint(volume_hu.astype(np.float64)) + 1024, 0, 65535).astype(np.uint16)
    paths = []
    for k in range(volume_hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = _CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = acquisition
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        z = origin[0] + k * spacing[0]
        ds.ImagePositionPatient = [f"{origin[2]:.6f}", f"{origin[1]:.6f}", f"{z:.6f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z:.6f}"
        ds.SliceThickness = f"{slice_thickness or spacing[0]:.6f}"
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[2]:.6f}"]
        ds.Rows, ds.Columns = volume_hu.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = stored[k].tobytes()
        path = folder / filename.format(index=k)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
