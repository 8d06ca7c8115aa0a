"""Choosing the series: which files are slices of an axial CT, which acquisitions of a series are one
stack, which series/acquisition of the patient is read and why, and the refusals when none can be."""
from __future__ import annotations

import posixpath
from collections import defaultdict
from pathlib import Path

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.io import geometry
from lungzarr.io.dicom.discover import _name
from lungzarr.io.dicom.headers import GREYSCALE, STAGE, SliceHeader
from lungzarr.io.dicom.stack import SPACING_RTOL


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
