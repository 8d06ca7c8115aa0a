"""NGFF 0.5 (OME-Zarr) metadata of a patient group, and its label images (``labels/<name>/0``)."""
from __future__ import annotations

import numpy as np

import lungzarr.io.store.encoding as encoding
from lungzarr.io.store.encoding import _encoded_for_store
from lungzarr.io.store.layout import _jsonable, grid_from_attrs
from lungzarr.volume import Grid

#: NGFF (OME-Zarr) metadata namespace of a patient group: an NGFF 0.5 reader (``ome_zarr``, napari,
#: vizarr, neuroglancer) opens ``patients/<id>`` as an image without lungzarr.
OME_KEY = "ome"
NGFF_VERSION = "0.5"
#: The NGFF ``labels`` group of a patient group, and its label images in the order ``ome.labels`` lists them:
#: ``lungs`` (stage segment) and ``nodules`` (stage nodules), each ``labels/<name>/0`` on the 2 mm grid.
LABELS_GROUP = "labels"
LABEL_IMAGES = ("lungs", "nodules")
#: Dimension names of the native and the 2 mm arrays (the NGFF axes must carry the arrays' dimension names).
_NATIVE_DIMS = ("z", "y", "x")
_DIMS_2MM = ("z2", "y2", "x2")
#: The images of a patient group's ``ome`` attributes, in order: (array, the grid attribute, its dimensions).
_IMAGES = (("hu", "grid_native", _NATIVE_DIMS), ("hu_2mm", "grid_2mm", _DIMS_2MM))
#: The arrays :func:`ome_multiscales` may name.
IMAGE_ARRAYS = tuple(name for name, _, _ in _IMAGES)


def _ngff_axes(names) -> list[dict]:
    return [{"name": n, "type": "space", "unit": "millimeter"} for n in names]


def _ngff_level(path: str, grid: Grid) -> dict:
    """One NGFF dataset: scale ``|step|``, translation the origin (mm of voxel 0's centre)."""
    return {"path": path, "coordinateTransformations": [
        {"type": "scale", "scale": [abs(float(s)) for s in grid.step]},
        {"type": "translation", "translation": [float(o) for o in grid.origin]}]}



def ome_multiscales(attrs: dict, arrays=None) -> dict | None:
    """NGFF 0.5 ``ome`` attributes of a patient group: the native ``hu`` image, then ``hu_2mm``.

    Metadata only: each dataset path names an array xarray wrote in the same
    group (NGFF paths are relative to the image group, so no copy). A reader
    shows the first image, ``hu`` (axes ``z``, ``y``, ``x``, the native grid,
    ``grid_native``); ``hu_2mm`` (axes ``z2``, ``y2``, ``x2``, ``grid_2mm``) is
    the second, the grid of the ``labels`` images. The axes carry xarray's
    dimension names because NGFF 0.5 requires an array's ``dimension_names``
    to match the axes' names. Each image has one level: a downsampled level of
    ``hu`` would be an array with dimensions ``z``, ``y``, ``x`` of another
    size, which xarray's DataTree (``open_cohort``, ``xr.open_datatree``)
    refuses anywhere below the patient group (its children must align with
    its ``y``/``x`` coordinates); ``hu_2mm`` is the quick view.

    Scale is a grid's ``|step|`` and translation its origin (mm, world
    coordinates of voxel 0). NGFF has no direction cosines: a negative step is
    stored as its magnitude (a viewer shows the volume in index order) and the
    direction stays in ``grid_native`` / ``grid_2mm`` / the ``lungzarr`` attrs.

    Parameters
    ----------
    attrs : dict
        The patient group's attributes.
    arrays : collection of str, optional
        The arrays the group holds (an image is listed only when its array is
        there); None assumes every array a recorded grid describes.

    Returns
    -------
    dict or None
        None when the group has neither image.
    """
    images = []
    for name, grid_key, dims in _IMAGES:
        if grid_key in attrs and (arrays is None or name in arrays):
            images.append({"name": name, "axes": _ngff_axes(dims),
                           "datasets": [_ngff_level(name, grid_from_attrs(attrs, grid_key))]})
    if not images:
        return None
    return {"version": NGFF_VERSION, "multiscales": images}


def ome_label_image(attrs: dict, name: str, *, colors=None, properties=None) -> dict:
    """NGFF 0.5 ``ome`` attributes of the label image ``labels/<name>``: one level ``0`` on the 2 mm grid.

    The same axes, scale and translation as ``hu_2mm`` (the label voxels are
    its voxels); ``image-label.source`` points at the patient group, two levels
    up. ``colors`` and ``properties`` are NGFF's lists of dicts with a
    ``label-value`` each.
    """
    image_label = {"source": {"image": "../../"}}
    if colors:
        image_label["colors"] = list(colors)
    if properties:
        image_label["properties"] = list(properties)
    return {"version": NGFF_VERSION,
            "multiscales": [{"name": name, "axes": _ngff_axes(_DIMS_2MM),
                             "datasets": [_ngff_level("0", grid_from_attrs(attrs, "grid_2mm"))]}],
            "image-label": image_label}


class _LabelImages:
    """Part of :class:`~lungzarr.io.store.CohortStore`: writing the NGFF label images of a patient."""

    def write_labels(self, patient: str, name: str, labels, *, colors=None, properties=None,
                     chunk_slices: int = 16) -> None:
        """Replace the NGFF label image ``patients/<id>/labels/<name>`` with ``labels`` (computed now).

        ``labels`` is an integer array on the patient's 2 mm grid; it is
        written as the label image's only level ``0`` (dimensions ``z2``,
        ``y2``, ``x2``, chunks of ``chunk_slices`` slices, checksummed like
        every chunk of the store) with :func:`ome_label_image` metadata, and
        the ``labels`` group's ``ome.labels`` lists the label images then
        present. Call it from the task of the stage that owns the label image
        (before its commit), so the image is complete exactly when the stage
        is. NGFF puts a label image's arrays inside its own group (a dataset
        path cannot point outside it), so this is a copy of the stage's array.
        """
        import xarray as xr

        if name not in LABEL_IMAGES:
            raise ValueError(f"name must be one of {LABEL_IMAGES!r}, got {name!r}")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.ndim != 3:
            raise ValueError(f"labels must be a 3-D integer array, got dtype {labels.dtype!r} and shape "
                             f"{labels.shape!r}")
        attrs = self.patient_attrs(patient)
        grid = grid_from_attrs(attrs)
        if tuple(labels.shape) != tuple(grid.shape):
            raise ValueError(f"labels shape {labels.shape!r} must be the 2 mm grid's {tuple(grid.shape)!r}")
        group = f"{self.group_path(patient)}/{LABELS_GROUP}"
        target = f"{group}/{name}"
        self._changing(patient)  # on a worker: the run's client dropped it already, so this only reads
        if (self.path / target).exists():
            self._rmtree(self.path / target)
        ds = xr.Dataset({"0": (_DIMS_2MM, labels)})
        ds["0"].encoding["chunks"] = (min(int(chunk_slices), labels.shape[0]),) + tuple(labels.shape[1:])
        if self._group_meta(group) is None:  # the labels group, which zarr would make for a write from the root
            self._put_group(group, {})
        # "w-": the image was removed just above (see prepare_stage). Through a store rooted at the image, as
        # a patient's group is written (CohortStore._group_store): no read of the groups above it per array.
        _encoded_for_store(ds).to_zarr(self._group_store(target), mode="w-", **encoding._WRITE)
        self._group(target).attrs.put(_jsonable({OME_KEY: ome_label_image(attrs, name, colors=colors,
                                                                           properties=properties)}))
        present = [n for n in LABEL_IMAGES if (self.path / group / n / "zarr.json").is_file()]
        self._group(group).attrs.put({OME_KEY: {"version": NGFF_VERSION, "labels": present}})
