"""DICOM series discovery, validation and lazy decoding to Hounsfield units.

The only package of lungzarr that imports pydicom. It turns one patient folder
into a :class:`Series` (headers only, validated, the chosen series and why) and
the series into a lazy dask array of HU, decoded a chunk of slices at a time
(docs/algorithms.md §1).

Each file is parsed by pydicom once, for its header. Where that header shows a
native little-endian single-frame greyscale slice of 8, 16 or 32 bits whose
(7FE0,0010) element holds exactly the bytes it needs and is followed by
nothing but later elements (:class:`PixelLayout`; :func:`headers._native_layout` lists
every condition), the decode reads the pixel bytes straight from the file (or
the object's bytes) with numpy: pydicom's ``pixel_array`` result (its dtype;
BitsStored < BitsAllocated masked or sign-extended as pydicom does). Every other
file (compressed, deflated, big endian, 1-bit, multi-frame, colour, excess or
missing pixel bytes...) and any file whose size or mtime changed since its
header was read is parsed and decoded by pydicom as before, with the same errors.

One job per module, in the order :func:`read_series` runs them:

- ``discover``: the DICOM files below a folder or an object-storage prefix;
- ``headers``: one file's header (:class:`SliceHeader`) and where a native slice's pixels lie
  (:class:`PixelLayout`);
- ``choose``: which files are axial CT slices, which acquisitions are one stack, which series is read and why;
- ``stack``: the stack's geometry (positions, spacings, orientations, the half-voxel rule through
  :mod:`lungzarr.io.geometry`);
- ``pixel_checks``: decoders, rescale values, damaged slices and values that are HU before the volume is decoded;
- ``decode``: slices to int16 HU;
- ``series``: the validated :class:`Series` and its lazy HU array (:func:`series_to_hu`);
- ``read``: :func:`read_series` and :func:`load_hu`, the steps above in order;
- ``write``: an HU volume as DICOM files (:func:`write_series`: phantoms, test inputs, the demo).
"""
from lungzarr.io.dicom.decode import PADDING_VALUE, decode_slices_to_hu
from lungzarr.io.dicom.discover import find_dicom_files
from lungzarr.io.dicom.headers import PixelLayout, SliceHeader, read_header
from lungzarr.io.dicom.read import load_hu, read_series
from lungzarr.io.dicom.series import Series, series_to_hu, sop_uids
from lungzarr.io.dicom.write import write_series
from lungzarr.volume import files_token

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
    "sop_uids",
]
