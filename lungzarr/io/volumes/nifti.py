"""NIfTI (``.nii``, ``.nii.gz``) headers through nibabel, from a file or streamed from an object: the
RAS affine turned into LPS direction, spacing and origin, and the value scaling nibabel applies."""
from __future__ import annotations

import numpy as np

from lungzarr.io.locations import describe_error, is_url, open_object
from lungzarr.io.volumes.formats import _error


def _nifti_from_stream(fileobj, path):
    """A NIfTI image read through a file object (an object on object storage): header now, voxels on slicing.

    A ``.nii.gz`` is decompressed as it is read (gzip cannot seek: a block
    decompresses the stream from its start, as for a local ``.nii.gz``).
    """
    import gzip

    import nibabel as nib

    if str(path).lower().endswith(".gz"):
        fileobj = gzip.GzipFile(fileobj=fileobj, mode="rb")
    # The test nib.load makes on a path (header sizes and magic), so a damaged object fails as the file would.
    try:
        sniff = fileobj.read(1024)
        fileobj.seek(0)
    except (OSError, EOFError):  # a truncated .nii.gz: nibabel's sniff gives up the same way
        sniff = b""
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        if klass.header_class.may_contain_header(sniff[:klass.header_class.sizeof_hdr]):
            return klass.from_stream(fileobj)
    raise nib.filebasedimages.ImageFileError(f'Cannot work out file type of "{path}"')


def _nifti_load(path):
    import nibabel as nib

    if is_url(path):
        # A .nii is read by seeking: small blocks, so a header or one block of slices fetches little more than
        # its own bytes; a .nii.gz is streamed from its start: large blocks, fewer requests.
        gz = str(path).lower().endswith(".gz")
        return _nifti_from_stream(open_object(str(path), block_size=(8 << 20) if gz else (256 << 10)), path)
    return nib.load(str(path), mmap=True)


def _nifti_header(path, patient):
    try:
        img = _nifti_load(path)
    except Exception as exc:  # nibabel raises many kinds on damaged files
        raise _error(f"nibabel cannot read the NIfTI file ({describe_error(exc)}); the file is damaged "
                     f"or not NIfTI: replace it", patient, path) from exc
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise _error(f"the image has shape {tuple(img.shape)!r}; lungzarr reads one 3-D CT volume per file "
                     f"(split 4-D series into one file per volume)", patient, path)
    hdr = img.header
    sform, qform = int(hdr["sform_code"]), int(hdr["qform_code"])
    if sform == 0 and qform == 0:
        raise _error("the NIfTI header has sform_code 0 and qform_code 0: its voxels have no patient "
                     "coordinates, so nodule millimetres would be wrong; convert the DICOM series again "
                     "(e.g. with dcm2niix), which writes the scanner's orientation", patient, path)
    ras = np.asarray(img.affine, dtype=np.float64)
    # NIfTI world space is RAS; the store's (DICOM's) is LPS: x and y change sign.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lps)):
        raise _error(f"the NIfTI affine {ras[:3].tolist()!r} is degenerate; fix the header", patient, path)
    direction = columns / spacing
    # nibabel moves scl_slope/scl_inter from the loaded header onto the array proxy, which applies them.
    slope, inter = getattr(img.dataobj, "slope", None), getattr(img.dataobj, "inter", None)
    header = {"file_affine_ras": ras[:3].ravel().tolist(), "file_direction_lps": direction.ravel().tolist(),
              "file_spacing_mm": spacing.tolist(), "file_origin_lps_mm": lps[:3, 3].tolist(),
              "file_shape": list(shape), "file_pixel_type": str(img.get_data_dtype()),
              "nifti_sform_code": sform, "nifti_qform_code": qform,
              "nifti_affine_from": "sform" if sform > 0 else "qform",
              "nifti_scl_slope": None if slope is None else float(slope),
              "nifti_scl_inter": None if inter is None else float(inter)}
    if img.get_data_dtype().kind not in "iuf":
        raise _error(f"the voxels are {img.get_data_dtype()!s}; a CT volume holds integer or float HU",
                     patient, path)
    return shape, direction, spacing, lps[:3, 3], header
