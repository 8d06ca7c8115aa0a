"""What every reader checks before a volume is stored: plausible HU values and plausible voxel spacing.

One rule for DICOM (:mod:`lungzarr.io.dicom`), NIfTI and MetaImage
(:mod:`lungzarr.io.volumes`), so the same damaged input is refused with the
same words whatever its format. Pure numpy: the readers decode, this judges.

HU. The store keeps HU as int16. A reader converts in a wide type (float64,
exact for every 8/16/32-bit integer and their rescaled sums) and hands the
values to :func:`int16_hu`, which refuses values outside int16 instead of
letting ``astype(np.int16)`` wrap them (unsigned 40000 would become -25536, in
the lungs' range). It is an error, not a clip: no CT value lies outside int16
(extended-scale CT reaches about 30000 HU), so such a value says the header
misdescribes the pixels (signedness, bits, slope) and every other value of the
slice is wrong as well. :func:`check_hu_sample` refuses a volume with no value
below :data:`AIR_HU_MAX`: every chest CT has air (about -1000 HU) in the lungs
and around the body, so such values are stored values without the rescale.

Spacing. :data:`PIXEL_SPACING_MM` and :data:`SLICE_SPACING_MM` bound what a
chest CT can have (reasons beside them); outside them the header holds a unit
or decimal-point slip, and the 2 mm resampling would allocate tens of GiB (70.3
mm pixels) or an empty grid (0.0001 mm), so :func:`check_spacing` refuses it.
"""
from __future__ import annotations

import numpy as np

from lungzarr.errors import PatientError

__all__ = ["INT16_HU", "AIR_HU_MAX", "PIXEL_SPACING_MM", "SLICE_SPACING_MM", "int16_hu", "check_hu_sample",
           "check_spacing"]

STAGE = "ingest"
#: The HU range the store's int16 arrays hold.
INT16_HU = (-32768, 32767)
#: A volume with no value below this (HU) is not in HU. Air is about -1000 HU and lung parenchyma -900 to
#: -700, so any slice through the chest holds values far below it; stored values without the rescale (CT
#: stores HU + 1024 or + 1000 as unsigned integers) are >= 0, far above it. -500 leaves 500 HU on both sides.
AIR_HU_MAX = -500
#: Plausible pixel spacing (mm) of a chest CT: a 300-500 mm field of view on a 512 matrix gives 0.6-1 mm, a
#: 1024 matrix or a small field of view 0.25-0.5 mm, ultra-high-resolution (photon-counting) CT ~0.15 mm;
#: downsampled research exports (128-256 matrix) reach 2-4 mm. Below 0.1 mm a 512 matrix spans 5 cm, above 5
#: mm it spans 2.6 m and a 6 mm nodule is a pixel: a unit or decimal slip (70.3 for 0.703), not a scanner.
PIXEL_SPACING_MM = (0.1, 5.0)
#: Plausible slice spacing (mm, between neighbouring slice centres): overlapping thin-section
#: reconstructions go down to ~0.3 mm, older or low-dose chest CT to 5-10 mm. Below 0.1 mm or above 20 mm
#: (a gap wider than most nodules, between which nothing is seen) it is a slip, not a stack of slices.
SLICE_SPACING_MM = (0.1, 20.0)

_SPACINGS = {"pixel": PIXEL_SPACING_MM, "slice": SLICE_SPACING_MM}


def int16_hu(values: np.ndarray, *, patient=None, file=None, fix: str, source=None) -> np.ndarray:
    """``values`` (HU in any dtype, float values rounded to nearest) as int16, or a PatientError.

    Parameters
    ----------
    values : ndarray
        HU after the reader's rescale, in a type wide enough to hold them unwrapped.
    patient, file : str, optional
        Named in the error.
    fix : str
        What the user should do, for the error message.
    source : callable, optional
        Returns how the values were made (e.g. the stored range and the rescale), called for an error only.

    Raises
    ------
    PatientError
        When a value is NaN/infinite or outside :data:`INT16_HU`.
    """
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            raise PatientError(f"the values hold NaN or infinite numbers; a CT volume holds finite HU: {fix}",
                               patient=patient, stage=STAGE, file=file)
        values = np.rint(values)
    if values.size and values.dtype != np.int16:
        lo, hi = values.min(), values.max()
        if lo < INT16_HU[0] or hi > INT16_HU[1]:
            how = "" if source is None else f" ({source()})"
            raise PatientError(f"values {lo:g} .. {hi:g} HU{how} leave the int16 range {INT16_HU[0]} .. "
                               f"{INT16_HU[1]} that holds every CT value; these are not Hounsfield units: {fix}",
                               patient=patient, stage=STAGE, file=file)
    return values.astype(np.int16, copy=False)


def check_hu_sample(minimum, *, where: str, patient=None, file=None, fix: str) -> None:
    """Refuse values that are not HU: ``minimum``, the lowest HU of a sample of the volume (``where``
    says which, e.g. "slices [0, 8, 15]"), is not below :data:`AIR_HU_MAX`.

    A whole-volume property judged on a sample: every slice through the chest holds air, so a sample with
    the middle slice decides as the whole volume would, without reading it.
    """
    if minimum >= AIR_HU_MAX:
        raise PatientError(f"these are not Hounsfield units (the rescale is missing): no value below "
                           f"{AIR_HU_MAX} HU in {where} (minimum {minimum:g}), where a chest CT has air at about "
                           f"-1000 HU; {fix}", patient=patient, stage=STAGE, file=file)


def check_spacing(values_mm, *, kind: str, what: str, patient=None, file=None, n: int | None = None) -> None:
    """Refuse a pixel or slice spacing no chest CT has (:data:`PIXEL_SPACING_MM`, :data:`SLICE_SPACING_MM`).

    Parameters
    ----------
    values_mm : float or sequence of float
    kind : {"pixel", "slice"}
    what : str
        Where the value comes from, e.g. "PixelSpacing (0028,0030)".
    n : int, optional
        Voxels along the axis (largest), to show the extent the value would give.
    """
    if kind not in _SPACINGS:
        raise ValueError(f"kind must be 'pixel' or 'slice', got {kind!r}")
    lo, hi = _SPACINGS[kind]
    values = [float(v) for v in np.atleast_1d(values_mm)]
    if all(np.isfinite(v) and lo <= v <= hi for v in values):
        return
    shown = f"{values[0]:g}" if len(values) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"
    worst = max(values, key=lambda v: abs(np.log(v / np.sqrt(lo * hi))) if np.isfinite(v) and v > 0 else np.inf)
    extent = ""
    if n and np.isfinite(worst) and worst > 0:
        span = n * worst
        extent = f" ({n} voxels of {worst:g} mm would span {span:.3g} mm)" if span < 1000 else \
            f" ({n} voxels of {worst:g} mm would span {span / 1000:.3g} m)"
    raise PatientError(f"{what} is {shown} mm{extent}, outside the {lo:g} .. {hi:g} mm of a chest CT's {kind} "
                       f"spacing: the header holds a slip (a decimal point or cm for mm): fix the value from the "
                       f"scanner's protocol or replace the files from the archive",
                       patient=patient, stage=STAGE, file=file)
