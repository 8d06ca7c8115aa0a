"""Reading one patient folder: its DICOM files found, their headers read, the axial CT series chosen and
validated (:func:`read_series`, headers only), and the whole series in memory (:func:`load_hu`)."""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.io.dicom.choose import (_choose_group, _holds_image, _merge_acquisitions, _no_axial_error,
                                      _not_axial_reason, _patient_id_warnings, _repeats_error)
from lungzarr.io.dicom.decode import decode_slices_to_hu
from lungzarr.io.dicom.discover import _find_remote_dicom, _name, find_dicom_files
from lungzarr.io.dicom.headers import SliceHeader, read_header
from lungzarr.io.dicom.pixel_checks import (_check_decodable, _check_rescale, _check_values_are_hu,
                                            _drop_broken_edges)
from lungzarr.io.dicom.series import Series
from lungzarr.io.dicom.stack import (_check_positions, _check_slice_spacing, _check_uniform_images,
                                     _grid_from_headers)
from lungzarr.io.locations import is_url
from lungzarr.volume import Grid


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


def load_hu(folder, *, patient: str | None = None, strict: bool = False) -> tuple[np.ndarray, Grid]:
    """Read a whole series into memory as int16 HU (for tests and baselines)."""
    series = read_series(folder, patient=patient, strict=strict)
    hu = decode_slices_to_hu(series.paths, [h.slope for h in series.headers],
                             [h.intercept for h in series.headers], patient=series.patient,
                             layouts=[h.pixels for h in series.headers],
                             reorient=[h.reorient for h in series.headers])
    return hu, series.grid
