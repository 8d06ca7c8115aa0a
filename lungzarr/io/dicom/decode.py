"""Decoding slices to Hounsfield units: a native slice straight from its bytes where its header located
them (:class:`~lungzarr.io.dicom.headers.PixelLayout`: pydicom's ``pixel_array`` values), any other with
pydicom, then converted to int16 HU as the original did (docs/algorithms.md §1), refused where the HU leave
int16 (:func:`lungzarr.io.plausible.int16_hu`)."""
from __future__ import annotations

import io
import os

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.io.dicom.headers import STAGE, PixelLayout, SliceHeader
from lungzarr.io.locations import describe_error, is_url, read_objects
from lungzarr.io.plausible import int16_hu


#: Stored value the original treated as cylinder padding and set to 0 (§1).
PADDING_VALUE = -2000


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
