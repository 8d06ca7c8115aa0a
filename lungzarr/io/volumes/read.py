"""Reading one volume file: its header through the format's reader, its axes placed on the store's (z, y, x)
by the half-voxel rule (:mod:`lungzarr.io.geometry`), spacings and sampled values checked
(:mod:`lungzarr.io.plausible`)."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from lungzarr.io import geometry
from lungzarr.io.locations import as_location, describe_error, is_url
from lungzarr.io.plausible import check_hu_sample, check_spacing
from lungzarr.io.volumes.formats import _PACKAGES, _WRITE_IN_HU, _error, _format, missing_reader, volume_stem
from lungzarr.io.volumes.metaimage import _copied, _metaimage_data_files, _metaimage_header
from lungzarr.io.volumes.nifti import _nifti_header
from lungzarr.io.volumes.series import VolumeSeries, _read_slices


def _place(shape, direction, spacing, origin, patient, path):
    """The file's axes on the store's (z, y, x) and their :class:`geometry.Placement` (its grid, how far
    the voxel centres are from it); a direction that puts any voxel centre more than half a voxel off is refused."""
    patient_axis = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]
    if sorted(patient_axis) != [0, 1, 2]:
        raise _error(f"the direction matrix {np.round(direction, 4).tolist()!r} maps two file axes onto one "
                     f"patient axis; the file's orientation is broken: fix the header", patient, path)
    # The first stored voxel: the file's corner at the far end of every flipped axis.
    flips = [direction[patient_axis[a], a] < 0 for a in range(3)]
    corner = np.asarray(origin, dtype=np.float64).copy()
    for a in range(3):
        if flips[a]:
            corner = corner + (shape[a] - 1) * spacing[a] * direction[:, a]
    axes = []
    for p in (2, 1, 0):  # store order z, y, x = patient axes 2, 1, 0
        a = patient_axis.index(p)
        axes.append((a, bool(flips[a])))
    # Each stored index's step in patient mm (an axis running against its patient axis is flipped).
    step = [spacing[a] * direction[:, a] * (-1.0 if flip else 1.0) for a, flip in axes]
    n = int(shape[axes[0][0]])
    if n < 2:
        raise _error(f"the volume has {n} axial slice(s); lungzarr needs a volume of at least "
                     f"two (and at least 9 at 2 mm for nodule detection)", patient, path)
    placement = geometry.place_stack(corner + np.arange(n)[:, None] * step[0], np.tile(step[1], (n, 1)),
                                     np.tile(step[2], (n, 1)), (n, int(shape[axes[1][0]]), int(shape[axes[2][0]])))
    if not placement.ok:
        raise _error(f"the direction is oblique (direction matrix {np.round(direction, 4).tolist()!r}, LPS): "
                     f"{placement.refusal()}; lungzarr stores axis-aligned grids "
                     f"only: resample it onto an axis-aligned grid (e.g. SimpleITK.Resample with an identity "
                     f"direction, which interpolates at the positions its affine gives) and ingest that",
                     patient, path)
    return tuple(axes), placement


def read_volume(path, *, patient: str | None = None) -> VolumeSeries:
    """Read and check one volume file's header (and three sample slices); no volume is decoded.

    Parameters
    ----------
    path : path
        A ``.mhd``/``.mha`` (MetaImage, LPS) or ``.nii``/``.nii.gz`` (NIfTI, RAS) file.
    patient : str, optional
        Default the file stem (:func:`volume_stem`).

    Raises
    ------
    PatientError
        Naming the file and the fix: missing library, unreadable or damaged
        header, missing ``.raw``, not 3-D or not greyscale, no orientation
        (NIfTI codes 0), an oblique direction, fewer than two slices, or
        sampled values that are all >= 0 (not HU).
    """
    remote = is_url(path)
    path = str(path).rstrip("/") if remote else Path(path)
    name = as_location(path).name
    patient = patient if patient is not None else (volume_stem(name) or name)
    try:
        exists = as_location(path).is_file()
    except Exception as exc:  # an object: no credentials, access denied, endpoint down
        raise _error(f"cannot reach the volume file ({describe_error(exc)}); check the URL and the credentials "
                     f"in the environment", patient, path) from exc
    if not exists:
        raise _error(f"the volume file {str(path)!r} does not exist; check the INPUT path", patient, path)
    fmt = _format(path)
    need = missing_reader(path)
    if need is not None:
        raise _error(f"reading {fmt} files needs {_PACKAGES[fmt][0]}, which is not installed: run {need}",
                     patient, path)
    with ExitStack() as stack:
        return _read_volume(path, fmt, patient, remote, stack)


def _read_volume(path, fmt, patient, remote, stack) -> VolumeSeries:
    local = None
    if fmt == "metaimage":
        data_files = _metaimage_data_files(as_location(path), patient)
        if remote:
            # SimpleITK reads paths only: the header (and, for the HU check below, the data) from a
            # temporary local copy, removed when read_volume returns.
            local = stack.enter_context(_copied([path, *map(str, data_files)], patient, path))
        shape, direction, spacing, origin, header = _metaimage_header(local or path, patient, shown=path)
    else:
        data_files = []
        shape, direction, spacing, origin, header = _nifti_header(path, patient)
    if not (np.all(np.isfinite(direction)) and np.all(np.isfinite(origin)) and np.all(np.isfinite(spacing))
            and np.all(spacing > 0)):
        raise _error(f"the header's spacing {spacing.tolist()!r}, origin {origin.tolist()!r} or direction is "
                     f"not finite and positive; fix the header", patient, path)
    axes, placement = _place(shape, direction, spacing, origin, patient, path)
    grid = placement.grid
    header["geometry"] = placement.record()
    # The same bounds as DICOM's PixelSpacing and slice step, on the store's (z, y, x) steps.
    check_spacing(grid.step[1:], kind="pixel", what="the in-plane spacing (y, x) of the header", patient=patient,
                  file=path, n=max(grid.shape[1:]))
    check_spacing(grid.step[0], kind="slice", what="the slice spacing (z) of the header", patient=patient,
                  file=path, n=grid.shape[0])
    if grid.shape[0] < 2:
        raise _error(f"the volume has {grid.shape[0]} axial slice(s); lungzarr needs a volume of at least "
                     f"two (and at least 9 at 2 mm for nodule detection)", patient, path)
    files = (str(path), *map(str, data_files))
    infos = {f: _object_info(f) for f in files} if remote else None
    series = VolumeSeries(patient=patient, path=str(path), files=files, format=fmt, grid=grid, axes=axes,
                          file_shape=tuple(shape), header=header, file_infos=infos)
    _check_hu(series, local=local)
    return series


def _object_info(url: str) -> dict:
    from lungzarr.io.locations import filesystem

    fs, key = filesystem(url)
    return fs.info(key)


def _check_hu(series: VolumeSeries, *, local=None) -> None:
    """Refuse values that are not HU, judged on the first, middle and last slice.

    A ``.nii.gz`` is judged on its first slice in the file only: reaching the
    middle and last ones would decompress the whole file once more (every axial
    CT slice holds air around the body or the padding outside the
    reconstruction circle, -1000 HU or below, far under the -500 HU of
    :data:`lungzarr.io.plausible.AIR_HU_MAX`).
    """
    nz = series.shape[0]
    picks = sorted({0, nz // 2, nz - 1})
    if series.path.lower().endswith(".gz"):
        (_, z_flipped) = series.axes[0]
        picks = [nz - 1 if z_flipped else 0]
    lows = [int(_read_slices(series.path, series.format, series.axes, series.file_shape, k, k + 1,
                             series.patient, local=local).min()) for k in picks]
    check_hu_sample(min(lows), where=f"slices {picks!r} of {nz}", patient=series.patient, file=series.path,
                    fix=_WRITE_IN_HU)
