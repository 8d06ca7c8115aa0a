"""Volume files (MetaImage ``.mhd``/``.mha``, NIfTI ``.nii``/``.nii.gz``) read lazily into the store's convention.

The only package of lungzarr that imports SimpleITK (MetaImage) and nibabel
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

One job per module: ``formats`` (which files are volumes, which library reads
each), ``metaimage`` and ``nifti`` (each format's header), ``read``
(:func:`read_volume`: the header checked and placed on the store's grid),
``series`` (:class:`VolumeSeries` and its voxels read a block at a time),
``write`` (:func:`write_volume`, :func:`write_nifti`).
"""
from lungzarr.io.volumes.formats import (METAIMAGE_DATA_SUFFIXES, OBLIQUE_TOLERANCE_VOXELS, VOLUME_SUFFIXES,
                                         is_volume_file, missing_reader, volume_stem)
from lungzarr.io.volumes.metaimage import metaimage_data_files
from lungzarr.io.volumes.read import read_volume
from lungzarr.io.volumes.series import VolumeSeries
from lungzarr.io.volumes.write import nifti_affine, write_nifti, write_volume

__all__ = ["VolumeSeries", "VOLUME_SUFFIXES", "METAIMAGE_DATA_SUFFIXES", "volume_stem", "is_volume_file",
           "metaimage_data_files",
           "read_volume", "missing_reader", "write_volume", "write_nifti", "nifti_affine", "OBLIQUE_TOLERANCE_VOXELS"]
