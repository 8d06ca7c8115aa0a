"""MetaImage (``.mhd`` + its data file, ``.mha``) headers through SimpleITK: the data files a header names
(refused outside its folder), the geometry SimpleITK reads, and local copies of objects for SimpleITK."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.io.locations import as_location, describe_error, is_url, local_copies, open_object
from lungzarr.io.volumes.formats import _error


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
