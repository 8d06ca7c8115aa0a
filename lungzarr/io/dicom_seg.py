"""DICOM Segmentation (SEG) objects of a patient's masks, referencing the source CT series.

With :mod:`lungzarr.io.dicom` the only modules that import pydicom, and the only one that imports
highdicom (an optional extra: ``pip install 'lungzarr[seg]'``). highdicom builds the SEG from the
source images' headers (no pixel data is read): patient, study and frame of reference are copied
from them, every frame references its source image's SOPInstanceUID and carries its
``ImagePositionPatient``, so a PACS or OHIF files the SEG under the CT's study and overlays it on
the CT's slices.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungzarr.errors import LungzarrError, PatientError

__all__ = ["SEG_INSTALL_HINT", "SegmentSpec", "require_highdicom", "locate_source_files", "read_source_images",
           "write_segmentation", "deterministic_uid"]

#: What to run when highdicom is missing.
SEG_INSTALL_HINT = "pip install 'lungzarr[seg]'"
#: Series number of the SEG series (viewers sort series by it; the CT keeps its own).
SEG_SERIES_NUMBER = 9001
#: highdicom's per-frame plane positions come from the source images; lungzarr's grid must agree with them
#: (mm): a rewritten file with the same SOPInstanceUID but another position is refused.
POSITION_ATOL_MM = 1e-3
STAGE = "export"
#: Patient and study attributes highdicom copies from the first source image. Type 2 in the CT IOD
#: (present, possibly empty); anonymised archives often drop them, so an absent one is copied as empty.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")
#: What the SEG cannot do without: its study and the frame of reference it is overlaid in.
TYPE1_NEEDED = ("StudyInstanceUID", "FrameOfReferenceUID", "SOPClassUID")


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a SEG.

    Attributes
    ----------
    label : str
        ``SegmentLabel`` (what a viewer lists), e.g. ``"Lung"``, ``"Nodule 3"``.
    kind : {"lung", "nodule"}
        Sets the coded category and type (SNOMED CT: Organ / Lung, Morphologically abnormal structure / Nodule).
    tracking_id : str
        ``TrackingID``: the row of the nodule table (or the mask) the segment is.
    tracking_uid : str
        ``TrackingUID``: unique to this patient's finding (see :func:`deterministic_uid`).
    algorithm : str
        Name of the algorithm that made the mask (``AlgorithmIdentificationSequence``).
    rgb : tuple of int
        Display colour (``RecommendedDisplayCIELabValue``).
    """

    label: str
    kind: str
    tracking_id: str
    tracking_uid: str
    algorithm: str
    rgb: tuple[int, int, int]


def require_highdicom():
    """highdicom, or a :class:`~lungzarr.errors.LungzarrError` saying how to install it (a run-level error)."""
    try:
        import highdicom
    except ImportError as exc:
        raise LungzarrError(f"--format dicom-seg needs highdicom, which is not installed ({exc}); install it "
                            f"with `{SEG_INSTALL_HINT}`") from exc
    return highdicom


def deterministic_uid(*parts) -> str:
    """A UID under pydicom's root derived from ``parts``: exporting the same result twice gives the same
    SOP/Series Instance UIDs, so a PACS replaces the object instead of filing a duplicate."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _moved_fix(patient: str, folder) -> str:
    return (f"put the series back at {str(folder)!r}, where it was ingested from, or ingest the patient again from "
            f"where it is now (`lungzarr run NEW_INPUT STORE --patients {patient} --overwrite`)")


def locate_source_files(recorded, folder, sop_uids, *, patient: str):
    """The source file of each slice (in the store's z order), and a note when they had to be searched for.

    ``recorded`` are the files ingest read (the store's ``dicom_file`` coordinate; None for stores
    ingested before it was recorded). When they all exist they are used (:func:`read_source_images`
    then checks each still holds its image). Otherwise the images are looked up by SOPInstanceUID
    among the DICOM files of ``folder`` (the patient folder ingested from): old stores, files renamed
    in place.

    Raises
    ------
    PatientError
        The folder is gone, or some SOPInstanceUID is in none of its files: naming the first missing
        recorded file (or the folder) and the fix.
    """
    import pydicom

    from lungzarr.io.dicom import find_dicom_files

    recorded = None if recorded is None else [str(f) for f in recorded]
    if recorded is not None and len(recorded) == len(sop_uids) and all(Path(f).is_file() for f in recorded):
        return recorded, None
    gone = next((f for f in recorded or [] if not Path(f).is_file()), None)
    where = Path(folder) if folder is not None else (Path(gone).parent if gone else None)
    if where is None or not where.is_dir():
        what = "a source DICOM file recorded at ingest is missing" if gone else \
            "the source DICOM folder recorded at ingest is missing"
        raise PatientError(f"{what}; the SEG must reference the source images: {_moved_fix(patient, where)}",
                           patient=patient, stage=STAGE, file=gone or where)
    found = {}
    for path in find_dicom_files(where, patient=patient)[0]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True)
        except Exception:  # unreadable files were skipped at ingest too; a wanted UID then shows as missing
            continue
        found.setdefault(str(ds.get("SOPInstanceUID", "")), str(path))
    missing = [u for u in sop_uids if u not in found]
    if missing:
        raise PatientError(f"{len(missing)} of the {len(sop_uids)} source images ingested are no longer in "
                           f"{str(where)!r} (e.g. SOPInstanceUID {missing[0]!r}); the SEG must reference the "
                           f"source images: {_moved_fix(patient, where)}", patient=patient, stage=STAGE,
                           file=gone or where)
    if gone:
        note = (f"the files recorded at ingest are not all where they were (e.g. {gone!r}): the images were "
                f"found in {str(where)!r} by SOPInstanceUID")
    else:
        note = (f"the store records no file per slice (ingested by an older lungzarr): the images were found in "
                f"{str(where)!r} by SOPInstanceUID")
    return [found[u] for u in sop_uids], note


def read_source_images(paths, *, patient: str, sop_uids, series_uid: str, z_positions, folder=None):
    """The source images' headers (pydicom Datasets, no pixel data), checked against what the store recorded.

    Absent Type 2 patient/study attributes (:data:`TYPE2_COPIED`) are set empty on the returned
    headers (as the standard allows), and said in the notes.

    Parameters
    ----------
    paths : list of str
        One file per slice, in the store's z order.
    sop_uids, z_positions : sequence
        The store's ``sop_instance_uid`` and ``z`` coordinates: each file must still hold that image
        at that position, or the SEG would reference (or be drawn on) another image.
    series_uid : str
        The store's ``series_instance_uid``.
    folder : path, optional
        The folder ingested from (named in the fix).

    Returns
    -------
    images : list of pydicom.Dataset
    notes : list of str

    Raises
    ------
    PatientError
        Naming the first missing or changed file and the fix.
    """
    import pydicom

    if len(paths) != len(sop_uids):
        raise PatientError(f"the store records {len(paths)} source files for {len(sop_uids)} slices; ingest the "
                           f"patient again (`lungzarr run INPUT STORE --patients {patient} --overwrite`)",
                           patient=patient, stage=STAGE)
    folder = folder if folder is not None else (Path(paths[0]).parent if paths else None)
    images = []
    for path, uid, z in zip(paths, sop_uids, z_positions):
        if not Path(path).is_file():
            raise PatientError(f"a source DICOM file recorded at ingest is missing; the SEG must reference the "
                               f"source images: {_moved_fix(patient, folder)}", patient=patient, stage=STAGE,
                               file=path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise PatientError(f"cannot read the DICOM header ({type(exc).__name__}: {exc}); replace the file "
                               f"from the archive", patient=patient, stage=STAGE, file=path) from exc
        got = (str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        position = ds.get("ImagePositionPatient")
        if got != (str(uid), str(series_uid)) or position is None \
                or abs(float(position[2]) - float(z)) > POSITION_ATOL_MM:
            raise PatientError(f"the file now holds another image (SOPInstanceUID {got[0]!r} of series {got[1]!r} "
                               f"at z {None if position is None else float(position[2])!r}; the store ingested "
                               f"{str(uid)!r} of {str(series_uid)!r} at z {float(z)!r}); "
                               f"{_moved_fix(patient, folder)}", patient=patient, stage=STAGE, file=path)
        images.append(ds)
    absent = sorted({k for ds in images for k in TYPE2_COPIED if k not in ds})
    for ds in images:
        for keyword in absent:
            if keyword not in ds:
                setattr(ds, keyword, "")
    missing = [k for k in TYPE1_NEEDED if any(not str(ds.get(k, "")) for ds in images)]
    if missing:
        bad = next(p for p, ds in zip(paths, images) if not str(ds.get(missing[0], "")))
        raise PatientError(f"the source image has no {missing[0]}, which a SEG needs to reference its study and "
                           f"to be overlaid on the CT; fix the header (the archive's original has it)",
                           patient=patient, stage=STAGE, file=bad)
    notes = [f"the source images have no {', '.join(absent)} (Type 2): empty in the SEG"] if absent else []
    return images, notes


def _description(hd, number: int, spec: SegmentSpec, version: str):
    from pydicom.sr.codedict import codes

    if spec.kind == "lung":
        category, kind, family = codes.SCT.Organ, codes.SCT.Lung, codes.cid7162.MorphologicalOperations
    elif spec.kind == "nodule":
        category, kind = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule
        family = codes.cid7162.ArtificialIntelligence
    else:
        raise ValueError(f"kind must be 'lung' or 'nodule', got {spec.kind!r}")
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=spec.label, segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(name=spec.algorithm, family=family,
                                                                    version=version),
        tracking_id=spec.tracking_id, tracking_uid=spec.tracking_uid,
        display_color=hd.color.CIELabColor.from_rgb(*spec.rgb))


def write_segmentation(images, masks, segments, path, *, series_uid: str, sop_uid: str, version: str,
                       series_description: str = "lungzarr lungs and nodules") -> Path:
    """Write one BINARY DICOM SEG of ``masks`` on the source images' pixel grid.

    Parameters
    ----------
    images : list of pydicom.Dataset
        The source images (headers), one per slice, in the order of ``masks``' first axis.
    masks : ndarray of bool, (slices, rows, columns, segments)
        Segment ``i + 1`` is ``masks[..., i]``; segments may overlap (a nodule lies in the lung), hence BINARY,
        not LABELMAP. Frames empty for a segment are omitted.
    segments : list of SegmentSpec
        One per segment, in order.
    path : path
        The file to write.
    series_uid, sop_uid : str
        The SEG's Series and SOP Instance UIDs.
    version : str
        lungzarr's version (SoftwareVersions, the algorithms' version).
    """
    hd = require_highdicom()
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 4 or masks.shape[-1] != len(segments):
        raise ValueError(f"masks must be (slices, rows, columns, {len(segments)}), got shape {masks.shape!r}")
    if masks.shape[0] != len(images):
        raise ValueError(f"masks has {masks.shape[0]} slices for {len(images)} source images")
    shape = {(int(ds.Rows), int(ds.Columns)) for ds in images}
    if shape != {masks.shape[1:3]}:
        raise ValueError(f"masks' slices are {masks.shape[1:3]!r}, the source images {sorted(shape)!r}")
    with warnings.catch_warnings():
        # highdicom checks the source's PatientName form (one component, "P-1"): the source's to fix, not ours.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        seg = _segmentation(hd, images, masks, segments, series_uid=series_uid, sop_uid=sop_uid, version=version,
                            series_description=series_description)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _segmentation(hd, images, masks, segments, *, series_uid, sop_uid, version, series_description):
    return hd.seg.Segmentation(
        source_images=images, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(hd, i + 1, s, version) for i, s in enumerate(segments)],
        series_instance_uid=series_uid, series_number=SEG_SERIES_NUMBER, sop_instance_uid=sop_uid,
        instance_number=1, manufacturer="lungzarr", manufacturer_model_name="lungzarr",
        software_versions=version, device_serial_number="0", content_label="LUNGZARR",
        content_description="lungzarr lung mask and nodules", series_description=series_description,
        omit_empty_frames=True)
