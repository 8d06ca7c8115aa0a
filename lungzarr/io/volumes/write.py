"""Writing volumes: an HU volume as MetaImage or NIfTI (tests, conversions), and lungzarr's arrays as NIfTI
exports on their grid (:func:`nifti_affine`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lungzarr.errors import LungzarrError
from lungzarr.io.volumes.formats import VOLUME_SUFFIXES, _format, volume_stem
from lungzarr.volume import Grid


def write_volume(volume_hu, path, *, grid: Grid, orientation: str = "LPS") -> Path:
    """Write an int16 HU volume (z, y, x) on ``grid`` (LPS mm) as a MetaImage or NIfTI file.

    ``orientation`` chooses how the file lays the voxels out: ``"LPS"`` keeps
    the array as is (identity direction); ``"RAS"`` flips x and y so the file's
    axes run towards right and anterior (NIfTI's native layout; the header
    says so honestly: a positive-diagonal RAS affine, or a MetaImage
    direction of diag(-1, -1, 1)). Either way the file shows the same patient
    in the same millimetres.

    Parameters
    ----------
    volume_hu : ndarray (z, y, x)
    path : path
        Ending ``.mhd``, ``.mha``, ``.nii`` or ``.nii.gz``.
    grid : Grid
        The volume's grid; every step must be positive.
    orientation : {"LPS", "RAS"}
    """
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3 or volume_hu.shape != tuple(grid.shape):
        raise ValueError(f"volume_hu has shape {volume_hu.shape!r}, the grid {tuple(grid.shape)!r}")
    if orientation not in ("LPS", "RAS"):
        raise ValueError(f"orientation must be 'LPS' or 'RAS', got {orientation!r}")
    if any(s <= 0 for s in grid.step):
        raise ValueError(f"grid steps must be positive, got {tuple(grid.step)!r}")
    path = Path(path)
    if volume_stem(path.name) is None:
        raise ValueError(f"{str(path)!r} must end in one of {VOLUME_SUFFIXES!r}")
    (z0, y0, x0), (dz, dy, dx) = grid.origin, grid.step
    nz, ny, nx = grid.shape
    data = volume_hu
    sign = np.array([1.0, 1.0, 1.0])  # LPS direction of file axes i, j, k
    origin = np.array([x0, y0, z0])
    if orientation == "RAS":
        data = volume_hu[:, ::-1, ::-1]
        sign = np.array([-1.0, -1.0, 1.0])
        origin = np.array([x0 + (nx - 1) * dx, y0 + (ny - 1) * dy, z0])
    spacing = np.array([dx, dy, dz])
    path.parent.mkdir(parents=True, exist_ok=True)
    if _format(path) == "metaimage":
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(data))
        img.SetSpacing(spacing.tolist())
        img.SetOrigin(origin.tolist())
        img.SetDirection(np.diag(sign).ravel().tolist())
        sitk.WriteImage(img, str(path))
        return path
    import nibabel as nib

    lps = np.eye(4)
    lps[:3, :3] = np.diag(sign * spacing)
    lps[:3, 3] = origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    img = nib.Nifti1Image(np.asarray(data).transpose(2, 1, 0), ras)  # NIfTI arrays are (i, j, k)
    img.set_sform(ras, code=1)
    img.set_qform(ras, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))
    return path


def nifti_affine(grid):
    """NIfTI (RAS mm) affine of a lungzarr grid, for an array in NIfTI's (i, j, k) = (x, y, z) voxel order.

    The grid's origin and step are (z, y, x) in DICOM patient LPS mm (axis
    aligned: lungzarr's resampled grids have no rotation). NIfTI's world is
    RAS: R = -x_LPS, A = -y_LPS, S = z_LPS, so the x and y rows are negated.

    Parameters
    ----------
    grid : lungzarr.volume.Grid

    Returns
    -------
    ndarray, shape (4, 4)
    """
    oz, oy, ox = (float(v) for v in grid.origin)
    sz, sy, sx = (float(v) for v in grid.step)
    return np.array([[-sx, 0.0, 0.0, -ox],
                     [0.0, -sy, 0.0, -oy],
                     [0.0, 0.0, sz, oz],
                     [0.0, 0.0, 0.0, 1.0]])


def write_nifti(volume_zyx, grid, path, *, intent: str = "none") -> Path:
    """Write a (z, y, x) array on a lungzarr grid as NIfTI: (i, j, k) = (x, y, z), the :func:`nifti_affine`.

    For masks and labels lungzarr exports (``intent`` ``"none"`` or ``"label"``).
    """
    try:
        import nibabel as nib
    except ImportError:
        raise LungzarrError("NIfTI export needs nibabel: pip install nibabel "
                            "(or pip install 'lungzarr[nifti]')") from None

    image = nib.Nifti1Image(np.ascontiguousarray(np.transpose(volume_zyx, (2, 1, 0))), nifti_affine(grid))
    image.header.set_xyzt_units("mm")
    image.set_sform(image.affine, code="scanner")
    image.set_qform(image.affine, code="scanner")
    image.header.set_intent(intent)
    nib.save(image, str(path))
    return Path(path)
