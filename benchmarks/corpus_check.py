"""An external yardstick: lungzarr's DICOM reader on dcm2niix's CT validation corpus, checked against the headers.

The corpus (kept outside the repository): ``neurolabusc/dcm_qa_ct`` (BSD-2: a
Philips phantom with variable gantry tilt, a GE head with tilt and two slice
spacings) and the CT series of ``icometrix/dicom2nifti``'s tests (MIT:
``tests/data``, its gantry-tilt, slice-increment and not-a-volume series).
Every folder below CORPUS that directly holds CT images is one series to check:

1. :func:`lungzarr.io.dicom.read_series` on the folder: accepted or refused
   (the :class:`~lungzarr.errors.PatientError`'s message is recorded).
2. An accepted series is decoded (:func:`~lungzarr.io.dicom.series_to_hu`, the
   synchronous scheduler) and checked against each file's own headers, read
   here with pydicom, not through lungzarr: for stored slice ``k``
   (``series.paths[k]``) the flip/transpose that turns the file's pixels into
   the stored slice is found from the values (of the 8, the one whose values
   agree), then each of the file's four corner pixels is placed in patient LPS
   mm from its ImagePositionPatient, ImageOrientationPatient and PixelSpacing
   and compared with where the stored grid (``series.grid``: origin and step
   along z, y, x) puts the stored voxel that holds it. The mapping of a slice's
   pixel indices to millimetres is affine, so its corners bound the error of
   every voxel of the slice. HU: the stored values against pydicom's
   ``pixel_array * RescaleSlope + RescaleIntercept`` of the same file, after
   that flip (stored value -2000, the scanner's padding, is 0 before the
   rescale in lungzarr, docs/algorithms.md section 1: counted apart).
3. With ``dcm2niix`` on the PATH (PyPI's ``pip install dcm2niix`` or Debian's
   package), a second opinion: each series converted, each NIfTI's voxels
   (RAS affine, turned into LPS) compared with lungzarr's stored voxels
   (position and value) where lungzarr accepted the series; for every output
   of a series, where its voxels lie against the headers: slice by slice
   (each NIfTI slice matched to the file whose pixels it holds) for outputs
   that keep the files' pixels, and the centroid of the voxels above
   300 HU in mm for resampled outputs (``_Tilt_1``, ``_Eq_1``), whose voxels
   are interpolated. Each output is also offered to lungzarr's NIfTI reader.
4. With ``--variants``: header-edited copies of the axis-aligned Philips series
   (:data:`VARIANTS`: acquisitions numbered per 40 slices, a first slice stored
   mirrored, in-plane rotations of 0.02 and 3 deg, gantry tilts of 2, 5 and 8 deg,
   a sheared stack), the reproductions of issue 25 on real data, checked the same
   way: each accepted exactly or refused naming what it is.

Usage::

    python benchmarks/corpus_check.py CORPUS [--no-dcm2niix] [--variants] [--json PATH]

prints the table as markdown and writes ``benchmarks/results/corpus_check.json``.
``tests/test_external_corpus.py`` runs the same check where ``LUNGZARR_DICOM_CORPUS``
points to a copy.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "corpus_check.json"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.corpus_headers import (  # noqa: E402  (after the path: this file also runs as a script)
    LAYOUTS,
    _corners,
    _dataset,
    _is_ct_image,
    apply_layout,
    check_against_headers,
    describe_folder,
    file_hu,
    find_series_folders,
    label_of,
    layout_index,
    pixel_lps,
)

#: HU above which voxels count for the centroid of a resampled dcm2niix output (bone, the phantom's shell):
#: above any fill value a resampling writes (-1024, 0).
CENTROID_HU = 300.0

#: What a refusal of a series of this corpus must name (regular expressions, all must match,
#: case-insensitive), from what the headers show the series to be (see the README of each corpus).
#: A series not listed here needs only a PatientError with a reason.
EXPECTED_REFUSALS = {
    # GE HiSpeed head: GantryDetectorTilt +18.5 deg, IOP column (0, .948, -.317); slices 01-14 4.22 mm apart
    # (4 mm thick), 15-28 7.38 mm apart (7 mm): two spacings, one tilt, both named.
    "dcm_qa_ct/In/GE": [r"gantry tilt", r"18\.5", r"2 runs of regular spacing", r"4\.22 mm", r"7\.38 mm"],
    # Philips Ingenuity phantom, GantryDetectorTilt -18.5 / +16.5 deg.
    "dcm_qa_ct/In/Philips/S21610/S2010": [r"gantry tilt", r"18\.5"],
    "dcm_qa_ct/In/Philips/S21610/S3010": [r"gantry tilt", r"16\.5"],
    # A localizer (ImageType LOCALIZER, sagittal) and the DICOMDIR-like DIRFILE: the image is the example.
    "dcm_qa_ct/In/Philips/S21570/S1000": [r"e\.g\. 'I10': localizer", r"'DIRFILE': a directory file"],
    "dcm_qa_ct/In/Philips/S21610/S1000": [r"e\.g\. 'I10': localizer", r"'DIRFILE': a directory file"],
    # Exam summaries: sagittal REF_SURVIEW images and RGB screens (patient info, dose, results).
    "dcm_qa_ct/In/Philips/S21570/S4010": [r"sagittal|localizer|RGB|greyscale|not an axial|no axial CT image"],
    "dcm_qa_ct/In/Philips/S21610/S4010": [r"sagittal|localizer|RGB|greyscale|not an axial|no axial CT image"],
    # Siemens, IOP column (0, .970, -.242): 14 deg, no GantryDetectorTilt tag.
    "dicom2nifti/tests/data/failing/gantrytilting/001": [r"gantry tilt", r"14(\.0)?\b"],
    # Four images at one position, AcquisitionNumbers 12-15.
    "dicom2nifti/tests/data/failing/notavolume/001": [r"acquisitions", r"overlapping|same position"],
    # GE, AcquisitionNumbers 4,4,5,5, z 18.1/23.1/28.1/38.1: the slice at 33.1 is missing.
    "dicom2nifti/tests/data/failing/sliceincrement/001": [r"gap|missing", r"33\.1"],
    # Siemens, 15.5 deg tilt (IOP) and IM-0001-0004 missing (z -50.36): both named.
    "dicom2nifti/tests/data/failing/sliceincrement/002": [r"gap|missing", r"-50\.3", r"gantry tilt of 15\.5 deg"],
}


# --------------------------------------------------------------------------
# dcm2niix, the second opinion
# --------------------------------------------------------------------------

def dcm2niix_version(exe: str = "dcm2niix") -> str | None:
    path = shutil.which(exe)
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    match = re.search(r"v\d+\.\d+\.\d+\S*", out.stdout + out.stderr)
    return match.group(0) if match else "unknown version"


def run_dcm2niix(folder, out: Path, exe: str = "dcm2niix") -> tuple[list[Path], str]:
    """Convert ``folder`` (not its sub-folders) into ``out``: the NIfTI files written and dcm2niix's log."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([exe, "-z", "n", "-b", "n", "-d", "0", "-f", "%f_%s", "-o", str(out), str(folder)],
                          capture_output=True, text=True, timeout=600)
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                    if line.startswith(("Warning", "Error", "Gantry", "Convert", "Slices", "Unsupported")))
    return sorted(out.glob("*.nii")), log


def _lps_affine(img) -> np.ndarray:
    """The NIfTI's voxel (i, j, k) -> patient LPS mm affine (its RAS affine with x and y negated)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, dtype=np.float64)


def _nifti_values(img) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    return data.reshape(data.shape[:3])


def compare_nifti_to_lungzarr(img, series, hu: np.ndarray) -> dict:
    """dcm2niix's voxel nearest each stored voxel centre: distance (mm) and |dHU|, over the whole volume."""
    affine = _lps_affine(img)
    inverse = np.linalg.inv(affine)
    data = _nifti_values(img)
    grid = series.grid
    ny, nx = grid.shape[1:]
    jj, ii = np.meshgrid(np.arange(nx), np.arange(ny))
    x = grid.origin[2] + jj * grid.step[2]
    y = grid.origin[1] + ii * grid.step[1]
    worst_mm, worst_dhu, outside = 0.0, 0.0, 0
    for k in range(grid.shape[0]):
        z = np.full(x.shape, grid.origin[0] + k * grid.step[0])
        lps = np.stack([x, y, z, np.ones_like(x)], axis=-1)
        ijk = lps @ inverse.T
        nearest = np.rint(ijk[..., :3]).astype(np.int64)
        inside = np.all((nearest >= 0) & (nearest < np.asarray(data.shape)), axis=-1)
        outside += int((~inside).sum())
        back = np.concatenate([nearest, np.ones(nearest.shape[:-1] + (1,))], axis=-1) @ affine.T
        worst_mm = max(worst_mm, float(np.linalg.norm((back - lps)[..., :3], axis=-1).max()))
        n = nearest[inside]
        if n.size:
            worst_dhu = max(worst_dhu, float(np.abs(data[n[:, 0], n[:, 1], n[:, 2]].astype(np.float64)
                                                    - hu[k][inside]).max()))
    return {"vs_lungzarr_max_position_mm": worst_mm, "vs_lungzarr_max_abs_dhu": worst_dhu,
            "vs_lungzarr_voxels_outside": outside}


def _key(array: np.ndarray) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(np.rint(array).astype(np.int32)).tobytes()).digest()


def compare_nifti_to_headers(img, datasets) -> dict:
    """Where an output's voxels lie against the headers.

    Outputs that keep the files' pixels: each NIfTI slice is matched to the file (and layout) whose pixels
    it holds exactly, and the file's corners are placed by the NIfTI affine and by the file's headers
    (largest distance, mm). Every output: the centroid (LPS mm) of the voxels above :data:`CENTROID_HU`,
    from the NIfTI's affine against the same from every file's headers.
    """
    affine = _lps_affine(img)
    data = _nifti_values(img)
    index = {}
    for n, ds in enumerate(datasets):
        hu, _ = file_hu(ds)
        for layout in LAYOUTS:
            index.setdefault(_key(apply_layout(hu, layout)), (n, layout))
    matched, worst_mm, worst_xyz = 0, 0.0, np.zeros(3)
    for k in range(data.shape[2]):
        # NIfTI slice k is indexed (i, j): as a 2-D image, (j rows, i columns) is data[:, :, k].T.
        hit = index.get(_key(np.asarray(data[:, :, k], dtype=np.float64).T))
        if hit is None:
            continue
        n, layout = hit
        ds = datasets[n]
        shape = (int(ds.Rows), int(ds.Columns))
        r, c = _corners(shape)
        jrow, icol = layout_index(r, c, shape, layout)
        voxel = np.stack([icol, jrow, np.full(4, k), np.ones(4)], axis=-1).astype(np.float64)
        at = (voxel @ affine.T)[:, :3]
        true = pixel_lps(ds, r, c)
        matched += 1
        worst_mm = max(worst_mm, float(np.linalg.norm(at - true, axis=-1).max()))
        worst_xyz = np.maximum(worst_xyz, np.abs(at - true).max(axis=0))
    out = {"slices": int(data.shape[2]), "slices_matching_a_file": matched}
    if matched:
        out.update(vs_headers_max_position_mm=worst_mm, vs_headers_max_position_lps_mm=[float(v) for v in worst_xyz])
    # Centroids: sums per slice, never every point at once. A file's voxels weigh as much as the stretch
    # of the stack its slice stands for (half-way to each neighbour, a whole step at the ends), so a series
    # with two slice spacings is not centred on its densely sampled part; a regular stack weighs all alike.
    total, count, weight = np.zeros(3), 0, 0.0
    for ds, w in zip(datasets, _slab_widths(datasets)):
        hu, _ = file_hu(ds)
        r, c = np.nonzero(hu > CENTROID_HU)
        if r.size:
            total += w * pixel_lps(ds, r, c).sum(axis=0)
            count += r.size
            weight += w * r.size
    ntotal, ncount = np.zeros(3), 0
    for k in range(data.shape[2]):
        i, j = np.nonzero(np.asarray(data[:, :, k], dtype=np.float64) > CENTROID_HU)
        if i.size:
            voxel = np.stack([i, j, np.full(i.shape, k), np.ones(i.shape)], axis=-1).astype(np.float64)
            ntotal += (voxel @ affine.T)[:, :3].sum(axis=0)
            ncount += i.size
    if count and ncount:
        shift = ntotal / ncount - total / weight
        out.update(centroid_shift_lps_mm=[round(float(v), 3) for v in shift],
                   centroid_shift_mm=float(np.linalg.norm(shift)), centroid_voxels=[count, ncount])
    return out


def _slab_widths(datasets) -> np.ndarray:
    """Per file (in the given order), the distance (mm) along the stack its slice stands for."""
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    if len(positions) < 2:
        return np.ones(len(positions))
    order = np.argsort(positions[:, 2], kind="stable")
    gaps = np.linalg.norm(np.diff(positions[order], axis=0), axis=1)
    sorted_widths = (np.concatenate([gaps[:1], gaps]) + np.concatenate([gaps, gaps[-1:]])) / 2
    widths = np.empty(len(positions))
    widths[order] = sorted_widths
    return widths


def lungzarr_nifti_verdict(path) -> str:
    """lungzarr's NIfTI reader on a dcm2niix output: 'accepted ...' or 'refused: <reason>'."""
    from lungzarr.errors import PatientError
    from lungzarr.io.volumes import read_volume

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vol = read_volume(path)
    except PatientError as exc:
        return f"refused: {exc.reason}"
    return f"accepted {vol.shape}"


# --------------------------------------------------------------------------
# one series, the corpus
# --------------------------------------------------------------------------

def expected_refusal(label: str) -> list[str] | None:
    return EXPECTED_REFUSALS.get(label)


def names_its_reason(label: str, message: str) -> bool:
    """True when a refusal names what the series is: every expected pattern for it (any reason otherwise)."""
    patterns = expected_refusal(label)
    if patterns is None:
        return bool(message.strip())
    return all(re.search(p, message, flags=re.IGNORECASE) for p in patterns)


def check_series(folder, *, root, dcm2niix: str | None = None, workdir: Path | None = None) -> dict:
    """Read one series folder with lungzarr, check it against its headers, and (optionally) dcm2niix's view."""
    from lungzarr.errors import PatientError
    from lungzarr.io.dicom import read_series, series_to_hu

    folder = Path(folder)
    label = label_of(folder, root)
    row = {"series": label, **describe_folder(folder)}
    t0 = time.perf_counter()
    series = hu = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            series = read_series(folder)
        except PatientError as exc:
            row.update(lungzarr="refused", message=exc.reason, error_file=exc.file,
                       names_reason=names_its_reason(label, exc.reason),
                       expected_words=expected_refusal(label))
    row["warnings"] = [str(w.message) for w in caught]
    if series is not None:
        hu = np.asarray(series_to_hu(series).compute(scheduler="synchronous"))
        row.update(lungzarr="accepted", shape=list(series.shape), slices_used=len(series.paths),
                   grid_origin_zyx=list(series.grid.origin), grid_step_zyx=list(series.grid.step),
                   selection=series.reason, skipped=len(series.skipped),
                   reader_geometry=series.geometry.get("max_offset_mm"))
        row.update(check_against_headers(series, hu))
        # Every image of the folder is used or listed with its reason: no slice left out in silence.
        accounted = {str(Path(p).resolve()) for p in series.paths} | {str(Path(f).resolve()) for f, _ in series.skipped}
        row["images_unaccounted"] = [p.name for p in sorted(folder.iterdir()) if p.is_file() and
                                     str(p.resolve()) not in accounted and "Rows" in (_dataset(p) or {})]
    row["lungzarr_seconds"] = round(time.perf_counter() - t0, 2)
    if dcm2niix:
        out = Path(workdir) / re.sub(r"[^A-Za-z0-9]+", "_", label)
        niis, log = run_dcm2niix(folder, out, dcm2niix)
        row["dcm2niix_log"] = log
        datasets = None
        outputs = []
        for nii in niis:
            import nibabel as nib

            img = nib.load(str(nii))
            entry = {"file": nii.name, "shape": list(img.shape)}
            if len(img.shape) == 3 and img.shape[2] > 1:
                if datasets is None:
                    datasets = [d for d in (_dataset(p, pixels=True) for p in sorted(folder.iterdir())
                                            if p.is_file()) if _is_ct_image(d) and
                                "ImagePositionPatient" in d and "ImageOrientationPatient" in d and
                                int(d.get("SamplesPerPixel", 1)) == 1]
                entry.update(compare_nifti_to_headers(img, datasets))
                if hu is not None and "_Tilt" not in nii.name and "_Eq" not in nii.name:
                    entry.update(compare_nifti_to_lungzarr(img, series, hu))
                entry["lungzarr_nifti_reader"] = lungzarr_nifti_verdict(nii)
            outputs.append(entry)
            del img
        row["dcm2niix"] = outputs
        shutil.rmtree(out, ignore_errors=True)
    return row


# --------------------------------------------------------------------------
# header-edited copies of one exact series (issue 25's reproductions, on real data)
# --------------------------------------------------------------------------

#: The axis-aligned Philips series the variants are made from (140 slices, 1 mm).
VARIANT_SOURCE = "dcm_qa_ct/In/Philips/S21570/S2020"
#: Slices of the source the geometry variants keep (the acquisitions variant keeps all).
VARIANT_SLICES = 40
#: name -> (what it is, the patterns a refusal must name; None: must be accepted exactly).
VARIANTS = {
    "acquisitions_per_40": ("AcquisitionNumber 1 + i // 40 (step-and-shoot numbering), all 140 slices", None),
    "first_slice_mirrored": ("slice 0 stored mirrored: IOP (-1,0,0, 0,1,0), IPP x moved to its last column, "
                             "pixels flipped left-right", None),
    "rotation_0.02deg": ("in-plane rotation of 0.02 deg about each slice's first pixel: within half a voxel",
                         None),
    "rotation_3deg": ("in-plane rotation of 3 deg about each slice's first pixel", [r"in-plane rotation", r"3\.0"]),
    "tilt_2deg": ("gantry tilt 2 deg: column cosines (0, cos, -sin), IPP unchanged, GantryDetectorTilt 2",
                  [r"gantry tilt", r"2\.0"]),
    "tilt_5deg": ("gantry tilt 5 deg", [r"gantry tilt", r"5\.0"]),
    "tilt_8deg": ("gantry tilt 8 deg", [r"gantry tilt", r"8\.0"]),
    "sheared_0.3mm": ("axial slices whose IPP y drifts 0.3 mm a slice", [r"sheared"]),
}


def write_variant(name: str, source, out) -> Path:
    """Write the header-edited copy ``name`` (:data:`VARIANTS`) of the series folder ``source`` into ``out``."""
    import pydicom

    out = Path(out) / name
    out.mkdir(parents=True, exist_ok=True)
    files = [p for p in sorted(Path(source).iterdir()) if _is_ct_image(_dataset(p))]
    datasets = sorted((pydicom.dcmread(str(p)) for p in files), key=lambda d: float(d.ImagePositionPatient[2]))
    if name != "acquisitions_per_40":
        datasets = datasets[:VARIANT_SLICES]
    for i, ds in enumerate(datasets):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        if name == "acquisitions_per_40":
            ds.AcquisitionNumber = 1 + i // 40
        elif name == "first_slice_mirrored" and i == 0:
            ipp[0] += (int(ds.Columns) - 1) * float(ds.PixelSpacing[1])
            ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
            ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
        elif name.startswith("rotation_"):
            a = np.radians(float(name[len("rotation_"):-3]))
            ds.ImageOrientationPatient = [round(v, 8) for v in (np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0)]
        elif name.startswith("tilt_"):
            t = float(name[len("tilt_"):-3])
            a = np.radians(t)
            ds.ImageOrientationPatient = [round(v, 8) for v in (1, 0, 0, 0, np.cos(a), -np.sin(a))]
            ds.GantryDetectorTilt = t
        elif name.startswith("sheared_"):
            ipp[1] += i * float(name[len("sheared_"):-2])
        ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
        ds.save_as(str(out / f"{i:04d}.dcm"))
    return out


def check_variant(name: str, root, work) -> dict:
    """The copy ``name`` of :data:`VARIANT_SOURCE` (in ``root``), written into ``work``, checked as a series."""
    what, patterns = VARIANTS[name]
    folder = write_variant(name, Path(root) / VARIANT_SOURCE, work)
    try:
        row = check_series(folder, root=work)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    row.update(series=f"{VARIANT_SOURCE} edited: {name}", variant=name, edit=what,
               expected="accepted" if patterns is None else "refused")
    if row["lungzarr"] == "refused":
        row["names_reason"] = patterns is not None and all(
            re.search(p, row["message"], flags=re.IGNORECASE) for p in patterns)
        row["expected_words"] = patterns
    return row


def check_variants(root, *, progress=print) -> list[dict]:
    """Each :data:`VARIANTS` copy of :data:`VARIANT_SOURCE` (when the corpus has it), checked as a series."""
    if not (Path(root) / VARIANT_SOURCE).is_dir():
        return []
    rows = []
    with tempfile.TemporaryDirectory(prefix="corpus-variants-") as work:
        for name in VARIANTS:
            rows.append(check_variant(name, root, work))
            if progress:
                progress(f"{rows[-1]['series']}: lungzarr {rows[-1]['lungzarr']}", flush=True)
    return rows


def check_corpus(root, *, dcm2niix: str | None = "dcm2niix", variants: bool = False, progress=print) -> dict:
    """Every series folder of the corpus, one at a time (see the module docstring), and the variants."""
    root = Path(root)
    exe = shutil.which(dcm2niix) if dcm2niix else None
    result = {"corpus": str(root), "dcm2niix": dcm2niix_version(exe) if exe else None,
              "machine": platform.platform(), "python": platform.python_version(), "series": []}
    with tempfile.TemporaryDirectory(prefix="corpus-check-") as work:
        for folder in find_series_folders(root):
            row = check_series(folder, root=root, dcm2niix=exe, workdir=Path(work))
            result["series"].append(row)
            if progress:
                progress(f"{row['series']}: lungzarr {row['lungzarr']}", flush=True)
    if variants:
        result["variants"] = check_variants(root, progress=progress)
    return result


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------

def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _dcm2niix_cell(row) -> str:
    if "dcm2niix" not in row:
        return "not run"
    parts = []
    for o in row["dcm2niix"]:
        bits = [f"`{o['file']}` {'x'.join(map(str, o['shape']))}"]
        if "vs_lungzarr_max_position_mm" in o:
            bits.append(f"vs lungzarr {_fmt(o['vs_lungzarr_max_position_mm'])} mm, |dHU| "
                        f"{_fmt(o['vs_lungzarr_max_abs_dhu'])}")
        if "vs_headers_max_position_mm" in o:
            bits.append(f"vs headers {_fmt(o['vs_headers_max_position_mm'])} mm "
                        f"({o['slices_matching_a_file']}/{o['slices']} slices)")
        elif "centroid_shift_mm" in o:
            bits.append(f"resampled: centroid >{CENTROID_HU:g} HU {_fmt(o['centroid_shift_mm'])} mm off the headers "
                        f"(LPS {o['centroid_shift_lps_mm']})")
        if "lungzarr_nifti_reader" in o:
            bits.append("lungzarr's NIfTI reader " + o["lungzarr_nifti_reader"].split(":")[0])
        parts.append(", ".join(bits))
    return "<br>".join(parts) or "no NIfTI"


def _table_row(row) -> str:
    if row["lungzarr"] == "accepted":
        lz = f"accepted {'x'.join(map(str, row['shape']))} ({row['slices_used']} slices)"
        dhu = _fmt(row["max_abs_dhu"])
        if row["padding_pixels"]:
            dhu += f" (+{row['padding_pixels']} padding px)"
        errors = ", ".join(f"{v:.3g}" for v in row["max_position_error_lps_mm"])
        half = ", ".join(f"{v:.3g}" for v in row["half_voxel_lps_mm"])
        pos = f"{row['max_position_error_mm']:.3g} (x,y,z {errors}; half voxel {half})"
    else:
        verdict = "names it" if row["names_reason"] else "DOES NOT name it"
        lz = f"refused ({verdict}): {row['message']}"
        dhu = pos = "-"
    return f"| {row['series']} | {row['images']} | {_dcm2niix_cell(row)} | {lz} | {dhu} | {pos} |"


def markdown_table(result: dict) -> str:
    """The corpus table (and the variants' rows, after it) as markdown."""
    lines = ["| series | images | dcm2niix | lungzarr | max \\|dHU\\| | largest position error vs headers (mm) |",
             "|---|---|---|---|---|---|"]
    lines += [_table_row(row) for row in result["series"] + result.get("variants", [])]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("corpus", help="folder holding dcm_qa_ct/ and/or dicom2nifti/ (any CT series folders)")
    parser.add_argument("--no-dcm2niix", action="store_true", help="skip the second opinion")
    parser.add_argument("--variants", action="store_true",
                        help=f"also check header-edited copies of {VARIANT_SOURCE} (tilt, rotation, shear, ...)")
    parser.add_argument("--json", default=str(RESULTS), help=f"where to write the result (default {RESULTS})")
    args = parser.parse_args(argv)
    result = check_corpus(args.corpus, dcm2niix=None if args.no_dcm2niix else "dcm2niix", variants=args.variants,
                          progress=lambda *a, **k: print(*a, file=sys.stderr, **k))
    result["date"] = time.strftime("%Y-%m-%d")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(markdown_table(result))
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
