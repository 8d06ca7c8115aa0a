"""lungzarr: chest-CT DICOM cohorts to a Zarr store, with lung nodule detection.

The read API for analysis code lives here; heavy modules (TensorFlow/Keras,
pydicom, zarr) are imported lazily when a function needs them.
"""
from __future__ import annotations

from lungzarr._version import __version__

_STORE_READERS = ("open_cohort", "open_patient", "open_patients", "read_nodules", "read_patients",
                  "read_failures", "read_warnings")
__all__ = ["__version__", *_STORE_READERS, "patient_nodules"]


def __getattr__(name):
    # Keep `import lungzarr` cheap: the store layer pulls in zarr and xarray.
    if name in _STORE_READERS:
        from lungzarr.io import store

        return getattr(store, name)
    if name == "patient_nodules":
        from lungzarr.pipeline.tables import patient_nodules

        return patient_nodules
    raise AttributeError(f"module 'lungzarr' has no attribute {name!r}")
