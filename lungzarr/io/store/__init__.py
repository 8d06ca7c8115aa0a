"""The cohort store: one Zarr v3 store per cohort, one group per patient.

The only package of lungzarr that imports zarr. Layout::

    STORE/
      patients/<id>/          xarray Dataset: hu, hu_2mm, lungs, segmented, nodule_prob
                              (its ``ome`` attribute: NGFF 0.5 multiscales of hu and hu_2mm, see ome_multiscales)
      patients/<id>/nodules/  the nodule table: one 2-D float64 array ``table`` (nodule x column), columns,
                              dtypes and string categories in the group attrs (algorithms.nodules.NODULE_LAYOUT)
      patients/<id>/labels/   NGFF 0.5 label images ``lungs`` and ``nodules`` (``labels/<name>/0``, 2 mm
                              grid; see CohortStore.write_labels)
      tables/patients.<uuid>  cohort-wide patient table (dimension ``patient``)
      tables/nodules.<uuid>   cohort-wide nodule table (dimension ``nodule``); the ``tables``
                              group's attribute ``lungzarr:tables`` names each current group
      records/<id>/           the patient's failures, warnings and damage (group attributes), only while
                              it has any (:mod:`~lungzarr.io.store.records`)
    STORE.lock                held while a run writes (refuses a second writer); beside the
                              store's resolved path

STORE may also be an object store's URL (``s3://bucket/cohort.zarr``, any fsspec
URL): the same layout as objects, with a staged patient committed by server-side
copies (group metadata last), metadata replaced by single PUTs and the lock an
object created by a conditional write (see :class:`~lungzarr.io.store.objects._ObjectBackend`).

Every chunk of every array ends in a CRC-32C and every chunk is written (none
left implicit as the fill value), so :meth:`CohortStore.verify_patient` finds a
changed, undecodable or missing chunk; damage found is kept in the patient's record
(``records/<id>``, attribute ``lungzarr:damage``).

A stage of a patient is *complete* only once all its arrays are written: the
stage marker (group attribute ``lungzarr:stages``) is set after the write, so
an interrupted write leaves an incomplete stage, which the next run removes and
redoes (the next run that holds the writer lock: a refused writer touches nothing). Failures are kept in the patient's record (``records/<id>``, attribute ``lungzarr:failures``).

Consolidated metadata (zarr 3's inline ``consolidated_metadata``) is kept per
patient, in each patient group's ``zarr.json``: a reader opens a patient with
one metadata read, at any cohort size, and nothing lists the whole cohort. The
first write to a patient group drops its listing; the stage's commit writes it
afresh with the stage marker (one atomic replace). See
:mod:`~lungzarr.io.store.consolidated`.

One job per module; :class:`CohortStore` is composed of their parts (one mixin class each):

==================  =========================================================================
``cohort``          :class:`CohortStore`: opening a store, its groups and patients
``layout``          the names of groups and attributes; patient ids; ``grid_from_attrs``
``backend``         the seam: a path or URL picks a backend; ``is_store_url``, ``check_store_url``
``directory``       the directory backend (commit by rename, ``os.replace``)
``objects``         the object-store backend (commit by server-side copies, one PUT)
``objectpath``      an object store's keys with the pathlib methods the store uses
``lock``            the writer lock: ``flock``, the lock object with its heartbeat, ``lock()``
``staging``         writing a stage, staged patient groups, the atomic commit (``PendingStage``)
``records``         stage markers; failures, damage and warnings records
``consolidated``    each patient's listing (consolidated metadata); the root ``zarr.json``'s attributes
``tables``          the cohort tables and their pointer
``integrity``       reading every chunk (``verify_patient``)
``encoding``        codecs and write options: Blosc-LZ4, a CRC-32C on every chunk
``ngff``            NGFF (OME-Zarr) metadata and label images
``arrays``          reading a patient's arrays
``api``             the read API: ``open_cohort``, ``open_patients``, ``read_nodules``, ...
==================  =========================================================================
"""
from __future__ import annotations

# Besides ``__all__`` (the read API of analysis code): what the rest of lungzarr imports from the store.
from lungzarr.io.store.api import (MISSING_ROWS, PatientTrees, open_cohort, open_patient, open_patients,
                                   read_damage, read_failures, read_nodules, read_patients, read_warnings)
from lungzarr.io.store.backend import check_store_url, is_store_url
from lungzarr.io.store.cohort import CohortStore
from lungzarr.io.store.consolidated import ListingText
from lungzarr.io.store.layout import (CONSOLIDATED_KEY, DAMAGE_KEY, FAILURES_KEY, PATIENTS_GROUP, STAGES_KEY,
                                      STAGING_GROUP, TABLE_POINTER_KEY, TABLES_GROUP, WARNINGS_KEY,
                                      check_patient_id, grid_from_attrs)
from lungzarr.io.store.ngff import (LABEL_IMAGES, LABELS_GROUP, NGFF_VERSION, OME_KEY, ome_label_image,
                                    ome_multiscales)
from lungzarr.io.store.staging import PendingStage

__all__ = [
    "CohortStore",
    "open_cohort",
    "open_patient",
    "open_patients",
    "PatientTrees",
    "read_nodules",
    "read_patients",
    "read_failures",
    "read_warnings",
    "grid_from_attrs",
    "read_damage",
]
