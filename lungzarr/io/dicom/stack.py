"""Checking a sorted stack's geometry: slice positions, image sizes and PixelSpacing, the slice spacing,
each slice's ImageOrientationPatient, and the grid every voxel must lie within half a voxel of (through
:mod:`lungzarr.io.geometry`, the rule every reader shares)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.io import geometry
from lungzarr.io.dicom.headers import STAGE, _listed
from lungzarr.io.plausible import check_spacing


#: Relative tolerance on slice steps before lungzarr calls a series irregular.
SPACING_RTOL = 0.05


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
