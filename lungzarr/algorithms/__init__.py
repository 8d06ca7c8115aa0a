"""Per-volume algorithms: numpy and dask arithmetic on one patient's arrays.

Resampling to 2 mm (``resample``), the legacy per-slice lung segmentation
(``segment``), the crop box (``crop``), connected components (``components``),
the nodule table (``nodules``; its columns and stored layout: ``nodule_table``),
the DSB2017 features (``features``) and the synthetic phantom (``phantom``). Nothing here reads files or knows the store;
docs/algorithms.md is the specification they follow.
"""
