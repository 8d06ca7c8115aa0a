"""Reading a patient's arrays: lazily as xarray (``open_patient``), whole (``load_patient``), one as dask."""
from __future__ import annotations

import warnings

import numpy as np

from lungzarr.errors import LungzarrError
from lungzarr.io.store.consolidated import listed_nodes


class _PatientArrays:
    """Part of :class:`~lungzarr.io.store.CohortStore`: reading the arrays of a patient group."""

    def open_patient(self, patient: str, *, subgroup: str | None = None):
        """A patient's Dataset (or its child group ``subgroup``'s), lazily (dask arrays, nothing loaded).

        One metadata read when the patient's group has its listing (see
        :mod:`~lungzarr.io.store.consolidated`) and it is current; each
        node's own metadata otherwise.
        """
        import xarray as xr

        store, consolidated, _ = self.patient_source(patient)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            return xr.open_dataset(store, group=subgroup, engine="zarr", consolidated=consolidated, chunks={},
                                   zarr_format=3)

    def open_patient_tree(self, patient: str, *, source: tuple | None = None):
        """A patient's group and its child groups as a lazy :class:`xarray.DataTree` (like
        :meth:`open_patient`); ``source``: its :meth:`patient_source` when found already."""
        import xarray as xr

        store, consolidated, _ = source or self.patient_source(patient)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            return xr.open_datatree(store, engine="zarr", consolidated=consolidated, chunks={}, zarr_format=3)

    def patient_source(self, patient: str) -> tuple:
        """``(zarr store, use the listing, stale)``: a store whose root is the patient's group, whether its
        listing is there and current, and why it is stale (``[]`` when it is not)."""
        group = self.group_path(patient)
        meta = self._group_meta(group)
        if meta is None:
            raise LungzarrError(f"patient {patient!r} is not in store {str(self.path)!r}; "
                                f"`lungzarr status {self.path}` lists the patients")
        listed = listed_nodes(meta)
        # A listing naming a node that is gone is not used: zarr would serve that array's chunks as zeros.
        stale = self.stale_listing(patient, listed) if listed is not None else []
        return self._backend.store_at(group), listed is not None and not stale, stale

    def load_patient(self, patient: str, names, *, subgroup: str | None = None):
        """Arrays of a patient (or of its child group ``subgroup``), read whole, as an in-memory Dataset.

        For a worker task that needs whole arrays (nodules, features, the
        lungs3d measures, the crop box): one open of the group with zarr and
        one read per array, where :meth:`open_patient` has xarray read every
        coordinate and every variable's metadata and builds a dask graph per
        array. The values, dtypes and variable attributes are those of
        ``open_patient(patient)[name].values``: lungzarr's arrays carry no CF
        encoding but xarray's NaN ``_FillValue`` of float arrays (a no-op
        mask); an array with any other encoding is read through xarray. The
        Dataset's attrs are the group's; it has no coordinates. Names the
        group does not hold are left out (test ``name in ds``).

        Raises
        ------
        LungzarrError
            The patient is not in the store.
        """
        import xarray as xr

        path = self.group_path(patient) + (f"/{subgroup}" if subgroup else "")
        try:
            group = self._zarr.open_group(self._zstore, path=path, mode="r", zarr_format=3, use_consolidated=False)
        except self._zarr.errors.GroupNotFoundError:
            if subgroup is not None and self.has_patient(patient):
                raise
            raise LungzarrError(f"patient {patient!r} is not in store {str(self.path)!r}; "
                                f"`lungzarr status {self.path}` lists the patients") from None
        data_vars, encoded = {}, []
        for name in names:
            # One read of the array's zarr.json; zarr's array_keys() would read every member's.
            try:
                array = group[name]
            except KeyError:
                continue
            if not isinstance(array, self._zarr.Array):
                continue
            attrs = dict(array.attrs)
            fill = attrs.pop("_FillValue", None)
            plain = not (set(attrs) & {"scale_factor", "add_offset", "_Unsigned", "dtype", "calendar"}) and (
                fill is None or (array.dtype.kind == "f" and np.isnan(array.fill_value)))
            if not plain:
                encoded.append(name)
                continue
            dims = tuple(array.metadata.dimension_names or (f"dim_{i}" for i in range(array.ndim)))
            data_vars[name] = xr.Variable(dims, array[...], attrs=attrs)
        ds = xr.Dataset(data_vars, attrs=dict(group.attrs))
        if encoded:  # not written by lungzarr: let xarray decode it
            full = self.open_patient(patient, subgroup=subgroup)
            for name in encoded:
                ds[name] = full[name].variable.load()
        return ds

    def lazy_array(self, patient: str, name: str, *, z_chunk: int | None = None):
        """One stored array of a patient as a dask array (nothing loaded).

        For a stage that needs one input array to build its graph (segment's and
        detect's ``hu_2mm``): :meth:`open_patient` has xarray read every
        coordinate and every variable's metadata in the client first. The
        values and dtype are those of ``open_patient(patient)[name].data``
        (lungzarr's arrays carry no CF encoding). The dask name is derived from
        the resolved store path, the patient, the array and its metadata file's
        modification time and size, so a rewritten array never shares a key
        with the old one.

        Parameters
        ----------
        patient, name : str
        z_chunk : int, optional
            Slices per dask chunk (y and x whole), read by one task each, the
            zarr array inlined in it: a stage reading in tasks of
            :func:`~lungzarr.pipeline.stages._common.task_slices` gets one read
            task per task, not one per stored chunk, one task holding the
            array and the rechunk merging them (the scheduler's CPU grows with
            its tasks: issue 29; 13 -> 3 tasks for a whole-scan ``hu_2mm``).
            Default: the stored chunks, the array in a task of its own.

        Raises
        ------
        LungzarrError
            The patient, or its array ``name``, is not in the store.
        """
        import dask.array as da
        from dask.base import tokenize

        path = f"{self.group_path(patient)}/{name}"
        meta = self.path / path / "zarr.json"
        try:
            stat = meta.stat()
        except FileNotFoundError:
            if not self.has_patient(patient):  # asked only now: on object storage each check is a request
                raise LungzarrError(f"patient {patient!r} is not in store {str(self.path)!r}; "
                                    f"`lungzarr status {self.path}` lists the patients") from None
            raise LungzarrError(f"patient {patient!r} has no array {name!r} in store {str(self.path)!r}; "
                                f"run the stage that writes it first") from None
        array = self._zarr.open_array(self._zstore, path=path, mode="r", zarr_format=3)
        # The stage commits' ids too: unique per write, where an object's mtime has 1 s resolution and
        # its ETag is that of metadata a rewrite of the same shape leaves unchanged.
        commits = sorted((stage, record.get("id")) for stage, record in self.stages(patient).items())
        # The chunking too: two stages' reads of one array in other chunks never share a key.
        token = tokenize(str(self.path.resolve()), patient, name, stat.st_mtime_ns, stat.st_size,
                         getattr(stat, "st_etag", None), commits, z_chunk)
        if z_chunk is None:
            return da.from_zarr(array, name=f"open-{name}-{token}")
        if int(z_chunk) < 1:
            raise ValueError(f"z_chunk must be >= 1 slice, got {z_chunk!r}")
        return da.from_zarr(array, chunks=(int(z_chunk),) + tuple(array.shape[1:]), name=f"open-{name}-{token}")

    def has_subgroup(self, patient: str, subgroup: str) -> bool:
        return (self.path / self.group_path(patient) / subgroup / "zarr.json").exists()
