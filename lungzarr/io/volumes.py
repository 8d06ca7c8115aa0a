"""Volume files (MetaImage ``.mhd``/``.mha``, NIfTI ``.nii``/``.nii.gz``) read lazily into the store's convention.

The only module of lungzarr that imports SimpleITK (MetaImage) and nibabel
(NIfTI). A volume file becomes a :class:`VolumeSeries` (header only, checked)
with the same interface as :class:`lungzarr.io.dicom.Series`, so the ingest
stage reads either kind the same way.

Coordinates. The store keeps patient LPS millimetres (DICOM's patient
coordinate system: x towards the patient's left, y towards posterior, z
towards head), arrays (z, y, x) with every step positive (z ascending). A
MetaImage file's ``TransformMatrix``/``Offset`` are LPS already; a NIfTI
affine is RAS (x towards right, y towards anterior), so its x and y are
negated. The direction matrix is then applied: file axes are permuted onto
(z, y, x) and an axis running against its patient axis is flipped, so the
same scan gives the same ``hu`` and the same millimetres whatever its format.
An oblique direction (one that puts a voxel centre more than half a voxel,
along any axis, from where the axis-aligned grid puts it: the rule of
:mod:`lungzarr.io.geometry`, as for DICOM) is refused with what it is and its
angle: lungzarr's tables give one mm value per array index, which an oblique
grid does not have.

Values. The volume must hold Hounsfield units (NIfTI ``scl_slope``/``scl_inter``
applied). Files whose sampled slices hold no value below -500 HU (stored values
without the rescale; CT air is about -1000 HU), values outside int16 and voxel
spacings no chest CT has are refused (:mod:`lungzarr.io.plausible`, the rule
DICOM shares).

Reading. Uncompressed data (MetaImage ``.raw``, ``.mha``, ``.nii``) is read a
block of slices at a time (ITK's streaming region reads; nibabel's
``fileslice``, which seeks to the block's bytes of the ``.nii``), so a task
holds only its own slices. NIfTI ``scl_slope``/``scl_inter`` other than 1/0
(dcm2niix writes stored values with the rescale there) make nibabel return a
block in float64 (8 bytes a voxel) before it is rounded to int16. A ``.nii.gz`` cannot be
seeked: each block decompresses the stream from the start up to its slices
(memory: one block; time: about ``n_blocks / 2`` decompressions of the file).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungzarr.errors import LungzarrError, PatientError
from lungzarr.io import geometry
from lungzarr.io.locations import as_location, describe_error, is_url, local_copies, open_object
from lungzarr.io.plausible import check_hu_sample, check_spacing, int16_hu
from lungzarr.volume import Grid, files_token, strip_suffix, z_chunks

__all__ = ["VolumeSeries", "VOLUME_SUFFIXES", "METAIMAGE_DATA_SUFFIXES", "volume_stem", "is_volume_file",
           "metaimage_data_files",
           "read_volume", "missing_reader", "write_volume", "write_nifti", "nifti_affine", "OBLIQUE_TOLERANCE_VOXELS"]

STAGE = "ingest"
#: File name endings read as one patient's volume (longest first: ``.nii.gz`` before ``.gz``).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha")
#: Data files a ``.mhd`` header names (``<stem>.raw`` in LUNA16): part of that patient, not loose files.
METAIMAGE_DATA_SUFFIXES = (".raw", ".zraw")
#: The geometry rule (:mod:`lungzarr.io.geometry`, the same for DICOM): every voxel centre within this many
#: voxels (of each axis' spacing) of where the affine puts it; float32 NIfTI affines carry ~1e-7 of rounding.
OBLIQUE_TOLERANCE_VOXELS = geometry.TOLERANCE_VOXELS
#: What to do with a volume whose values are not HU.
_WRITE_IN_HU = ("write the volume in HU (HU = RescaleSlope x stored + RescaleIntercept, e.g. convert with dcm2niix "
                "or SimpleITK's DICOM reader, which apply it)")
_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".mhd": "metaimage", ".mha": "metaimage"}
_PACKAGES = {"metaimage": ("SimpleITK", "`pip install SimpleITK` (or `pip install 'lungzarr[volumes]'`)"),
             "nifti": ("nibabel", "`pip install nibabel`")}


def volume_stem(name: str) -> str | None:
    """The patient id of a volume file name (``P1.nii.gz`` -> ``P1``), or None when it is no volume file."""
    return strip_suffix(name, VOLUME_SUFFIXES)


def is_volume_file(path) -> bool:
    """True for an existing regular file whose name ends in one of :data:`VOLUME_SUFFIXES`."""
    path = Path(path)
    return volume_stem(path.name) is not None and path.is_file()


def _format(path) -> str:
    lower = str(path).rstrip("/").rsplit("/", 1)[-1].lower()
    return next(fmt for suffix, fmt in _FORMATS.items() if lower.endswith(suffix))


def missing_reader(path) -> str | None:
    """What to install to read the volume file ``path``, or None when its library is importable."""
    import importlib.util

    module, install = _PACKAGES[_format(path)]
    return install if importlib.util.find_spec(module) is None else None


@dataclass
class VolumeSeries:
    """One patient's volume file, checked and placed in the store's convention (header only).

    Satisfies the interface the ingest stage reads (that of
    :class:`lungzarr.io.dicom.Series`): ``patient``, ``source``, ``grid``,
    ``shape``, ``z_positions``, ``sop_instance_uids``, :meth:`provenance`,
    :meth:`warning_records` and :meth:`to_hu`.

    Attributes
    ----------
    patient : str
    path : str
        The volume file (the ``.mhd`` header for MetaImage).
    files : tuple of str
        Every file the pixels come from (``.mhd`` and its ``.raw``), for task names.
    format : {"metaimage", "nifti"}
    grid : Grid
        In patient LPS mm, (z, y, x), every step positive.
    axes : tuple of (int, bool)
        For the store's (z, y, x): the file axis (0 = i, fastest) it comes from and whether it is flipped.
    file_shape : tuple of int
        The file's (i, j, k) size.
    header : dict
        What the file said (direction, spacing, origin, value scaling), for :meth:`provenance`.
    """

    patient: str
    path: str
    files: tuple[str, ...]
    format: str
    grid: Grid
    axes: tuple[tuple[int, bool], ...]
    file_shape: tuple[int, ...]
    header: dict = field(default_factory=dict)
    user_warnings: list[dict] = field(default_factory=list)
    #: For objects on object storage: each file's metadata (size, ETag, LastModified) by URL, taken where
    #: the header was read (a worker), for the task names.
    file_infos: dict | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def source(self) -> str:
        """The file the patient was read from (named in errors)."""
        return self.path

    @property
    def folder(self) -> str:
        """Alias of :attr:`source` (the DICOM Series' name for it)."""
        return self.path

    @property
    def series_uid(self) -> str:
        """The file stem: LUNA16 names each ``.mhd`` by its SeriesInstanceUID, which evaluation matches."""
        return volume_stem(Path(self.path).name)

    @property
    def z_positions(self) -> np.ndarray:
        """Patient z (mm) of each slice, ascending."""
        return self.grid.axis(0)

    @property
    def sop_instance_uids(self):
        """None: a volume file keeps no per-slice SOPInstanceUID."""
        return None

    def provenance(self) -> dict:
        """JSON-serialisable attrs describing where the volume came from and how it was turned."""
        names = "ijk"
        applied = {dim: f"file axis {names[a]}{' flipped' if flip else ''}"
                   for dim, (a, flip) in zip(("z", "y", "x"), self.axes)}
        return {
            "patient": self.patient,
            "source_file": self.path,
            "source_files": list(self.files),
            "source_format": self.format,
            "series_instance_uid": self.series_uid,
            "series_number": None,
            "acquisition_number": None,
            "selection_reason": f"the volume file {Path(self.path).name!r} ({self.format}); series UID = "
                                f"file stem",
            "orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            "coordinate_system": "LPS",
            "axes_applied": applied,
            "spacing_mm": list(self.grid.spacing),
            "origin_mm": list(self.grid.origin),
            "step_mm": list(self.grid.step),
            **self.header,
            "n_files_used": len(self.files),
            "n_files_skipped": 0,
            "skipped_files": [],
            "warnings": [r["reason"] for r in self.user_warnings],
            "dropped_edge_slices": [],
        }

    def warning_records(self) -> list[dict]:
        """What a user must see in ``lungzarr status``: ``{"file", "reason"}`` dicts."""
        return [dict(r) for r in self.user_warnings]

    def to_hu(self, *, chunk_slices: int = 16, store=None):
        """The volume as a lazy int16 dask array (z, y, x) of HU, ``chunk_slices`` slices a block.

        Each block reads only its own slices when computed. The task names are
        a ``tokenize`` of the patient, every file's resolved path, size and
        mtime, the axis mapping, the chunking and ``store`` (the resolved store
        path), so two patients, a rewritten file or another store never share a
        key in one distributed session.
        """
        import dask.array as da
        from dask.base import tokenize

        nz, ny, nx = self.shape
        token = tokenize(self.patient, files_token(self.files, infos=self.file_infos), self.format, self.axes,
                         self.file_shape, chunk_slices, None if store is None else str(store))
        # A MetaImage object is read by SimpleITK from a local copy (it reads paths only): one task copies
        # the files once and reads the whole volume, instead of every block copying the whole file again.
        whole = is_url(self.path) and self.format == "metaimage"
        hu = da.map_blocks(
            _read_block,
            chunks=((nz,) if whole else z_chunks(nz, chunk_slices), (ny,), (nx,)),
            dtype=np.int16,
            meta=np.empty((0, 0, 0), dtype=np.int16),
            name=f"read-{self.format}-{token}",
            path=self.path,
            fmt=self.format,
            axes=self.axes,
            file_shape=self.file_shape,
            patient=self.patient,
            files=self.files,
        )
        return hu.rechunk((z_chunks(nz, chunk_slices), (ny,), (nx,))) if whole else hu


def _error(reason, patient, path):
    return PatientError(reason, patient=patient, stage=STAGE, file=str(path))


# --------------------------------------------------------------------------
# headers
# --------------------------------------------------------------------------

def metaimage_data_files(path) -> list[Path]:
    """The data files a ``.mhd`` header names that exist (none for other files or a broken header).

    For INPUT scanning: a ``.raw`` named by a ``.mhd`` belongs to that patient,
    not to the loose files. Errors are left to :func:`read_volume`.
    """
    path = as_location(path)
    if not path.name.lower().endswith(".mhd") or not path.is_file():
        return []
    try:
        return _metaimage_data_files(path, None)
    except PatientError:
        return []


def _metaimage_data_files(path, patient) -> list:
    """The data file(s) a ``.mhd`` header names, to fingerprint and to name when missing.

    Pixels and geometry come from SimpleITK; this only looks up the
    ``ElementDataFile`` key (always the header's last) so that task names
    change when the ``.raw`` is rewritten and a missing ``.raw`` is named.
    """
    mha = path.suffix.lower() == ".mha"
    try:
        # A .mha holds its voxels after the header: only the header's first bytes are read.
        text = _read_head(path, MHA_HEADER_BYTES) if mha else path.read_text(encoding="latin-1")
    except Exception as exc:  # OSError locally; botocore/fsspec errors for an object
        raise _error(f"cannot read the MetaImage header ({describe_error(exc)}); check the file's permissions",
                     patient, path) from exc
    lines = text.splitlines()
    for k, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ElementDataFile":
            value = value.strip()
            if value.upper() == "LOCAL":
                return []
            # ITK follows the name wherever it points: a data file outside the .mhd's folder (``../x.raw``,
            # an absolute path) would be read from outside INPUT, so it is refused before ITK opens anything.
            if value.upper().startswith("LIST"):
                named = [n.strip() for n in lines[k + 1:] if n.strip()]
            else:
                named = [value.split()[0]] if "%" in value else [value]
            outside = [n for n in named if not _in_same_folder(n)]
            if outside:
                raise _error(f"the MetaImage header names the data file {outside[0]!r}, outside the header's "
                             f"folder; the data file must lie in the .mhd's folder: move it beside the header "
                             f"and write its bare name in ElementDataFile", patient, path)
            if mha:
                return []  # a .mha with its data elsewhere: ITK reads it from beside the header
            if value.upper().startswith("LIST") or "%" in value:
                return []  # one file per slice: ITK finds them; the header alone is fingerprinted
            data = path.parent / value
            if not data.is_file():
                raise _error(f"the MetaImage header names the data file {value!r}, which is not in "
                             f"{str(path.parent)!r}; put the .raw beside its .mhd", patient, path)
            return [data]
    if mha:
        return []  # SimpleITK judges a .mha header whose ElementDataFile is past the bytes read
    raise _error("the MetaImage header has no ElementDataFile line; it is not a MetaImage header (or is "
                 "truncated): replace the file", patient, path)


#: Bytes of a ``.mha`` read to find its ``ElementDataFile`` line (the header is text, a few hundred bytes).
MHA_HEADER_BYTES = 65536


def _read_head(path, size: int) -> str:
    """The first ``size`` bytes of a file or object, as latin-1 text."""
    if is_url(path):
        with open_object(str(path)) as fh:
            return fh.read(size).decode("latin-1")
    with open(path, "rb") as fh:
        return fh.read(size).decode("latin-1")


def _in_same_folder(name: str) -> bool:
    """Whether a data file named in a MetaImage header is a bare name: in the header's own folder."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and not (len(name) > 1 and name[1] == ":")  # C:x.raw


def _metaimage_header(path: Path, patient, shown=None):
    """The header through SimpleITK; errors name ``shown`` (the object's URL when ``path`` is its local copy)."""
    import SimpleITK as sitk

    local, path = path, (shown or path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(local))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise _error(f"SimpleITK cannot read the MetaImage header ({first}); the file is damaged or not a "
                     f"MetaImage: replace it", patient, path) from exc
    if reader.GetDimension() != 3:
        raise _error(f"the image has {reader.GetDimension()} dimensions; lungzarr reads 3-D CT volumes",
                     patient, path)
    if reader.GetNumberOfComponents() != 1:
        raise _error(f"the image has {reader.GetNumberOfComponents()} components per voxel; a CT volume has one "
                     f"(greyscale HU)", patient, path)
    shape = tuple(int(n) for n in reader.GetSize())
    direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(reader.GetSpacing(), dtype=np.float64)
    origin = np.array(reader.GetOrigin(), dtype=np.float64)
    header = {"file_direction_lps": direction.ravel().tolist(), "file_spacing_mm": spacing.tolist(),
              "file_origin_lps_mm": origin.tolist(), "file_shape": list(shape),
              "file_pixel_type": sitk.GetPixelIDValueAsString(reader.GetPixelID())}
    return shape, direction, spacing, origin, header


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


@contextmanager
def _copied(files, patient, path):
    """Local copies of a MetaImage object's files (for SimpleITK), removed on exit; yields the header's copy."""
    with ExitStack() as stack:
        try:
            local = stack.enter_context(local_copies(files))
        except Exception as exc:
            raise _error(f"cannot copy the MetaImage object for SimpleITK ({describe_error(exc)}); check that "
                         f"it exists and the credentials in the environment", patient, path) from exc
        yield local[0]


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


# --------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------

def _file_region(path, fmt, start, size):
    """The file's voxels ``start[a] : start[a] + size[a]`` along file axes (i, j, k), as an (i, j, k) array."""
    if fmt == "metaimage":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        # ITK streams uncompressed MetaImage: only this region's bytes are read.
        reader.SetExtractIndex([int(s) for s in start])
        reader.SetExtractSize([int(s) for s in size])
        return sitk.GetArrayFromImage(reader.Execute()).transpose(2, 1, 0)
    # Slicing the proxy reads only the region's bytes: seek + read in a .nii (byte-range requests for an
    # object); a .nii.gz is decompressed from its start up to the region (gzip cannot seek), never as a whole.
    proxy = _nifti_load(path).dataobj
    index = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size))
    if len(proxy.shape) == 4:
        index = index + (0,)
    return np.asarray(proxy[index])


def _to_int16(values, patient, path) -> np.ndarray:
    return int16_hu(values, patient=patient, file=str(path), fix=_WRITE_IN_HU)


def _read_slices(path, fmt, axes, file_shape, z0, z1, patient, *, local=None) -> np.ndarray:
    """Store slices ``z0:z1`` (z, y, x) as int16 HU; read from ``local`` (a local copy of ``path``) when given."""
    (az, fz), (ay, fy), (ax, fx) = axes
    nz = file_shape[az]
    start, size = [0, 0, 0], list(file_shape)
    # A flipped z axis: store slice z is file slice nz - 1 - z.
    start[az], size[az] = ((nz - z1) if fz else z0), z1 - z0
    try:
        block = _file_region(local or path, fmt, start, size)
    except PatientError:
        raise
    except Exception as exc:
        raise _error(f"cannot read slices {z0}..{z1 - 1} ({describe_error(exc)}); the file is truncated "
                     f"or damaged: replace it", patient, path) from exc
    block = block.transpose(az, ay, ax)
    flips = tuple(slice(None, None, -1) if f else slice(None) for f in (fz, fy, fx))
    return _to_int16(np.ascontiguousarray(block[flips]), patient, path)


def _read_block(*, path, fmt, axes, file_shape, patient, files=None, block_info=None):
    (z0, z1), _, _ = block_info[None]["array-location"]
    if is_url(path) and fmt == "metaimage":
        with _copied(files or (path,), patient, path) as local:
            return _read_slices(path, fmt, axes, file_shape, z0, z1, patient, local=local)
    return _read_slices(path, fmt, axes, file_shape, z0, z1, patient)


# --------------------------------------------------------------------------
# writing (tests, conversions)
# --------------------------------------------------------------------------

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
