"""What a pipeline stage is: one :class:`Stage` per stage, the only description of it.

The registry (:mod:`lungzarr.pipeline.stages`) lists them in run order; the
runner, the store's markers, the CLI, ``status`` and the docs read it. Adding
a stage means writing one module in ``stages/`` that defines its ``Stage``
and naming it in the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lungzarr.model.geometry import DEFAULT_CROP

__all__ = ["Stage", "StageOptions", "PLACEMENTS"]

#: Where a stage's tasks may run: ``"cpu"`` (CPU-only workers when the cluster has GPU workers too) or
#: ``"gpu"`` (workers with a ``GPU`` resource, when there are any).
PLACEMENTS = ("cpu", "gpu")


@dataclass(frozen=True)
class StageOptions:
    """The run's options that stages read (one object for every stage of a run).

    Attributes
    ----------
    chunk_slices : int
        Slices per store chunk along z.
    weights : path or None
        d8 weights; None is the shipped file.
    precision : str
        UNet precision (``fp32``, ``bf16``, ``fp16``).
    infer_batch : int or None
        8-slice windows per UNet call; None: :data:`lungzarr.model.infer.INFER_BATCH`
        (2 on CPU workers, 8 on GPU workers).
    gpu : bool
        The cluster has GPU workers: GPU stages are annotated to run there.
    labels : dict or None
        ``{patient: cancer}`` from ``--labels``.
    strict : bool
        Every broken DICOM file is an error (no edge slice is dropped).
    engine : str
        What runs the UNet (:data:`lungzarr.model.engines.ENGINES`): ``auto``
        (OpenVINO on CPU workers when installed, Keras on GPU workers),
        ``keras``, ``openvino`` or ``onnxruntime``. :func:`lungzarr.pipeline.run`
        resolves ``auto`` and checks the engine before any patient.
    cpu_workers : tuple of str
        With ``gpu``: the CPU-only workers' addresses when the cluster has
        some (:func:`lungzarr.pipeline.placement.cpu_task_workers`, set by
        :func:`lungzarr.pipeline.run`); a GPU stage's CPU tasks are annotated
        to run only there. Empty: anywhere.
    crop : str
        What the UNet predicts (:data:`lungzarr.model.geometry.CROPS`): ``lungs``
        (one box per patient around its lung mask; 0 outside it; the default,
        :data:`~lungzarr.model.geometry.DEFAULT_CROP`) or ``fixed`` (the whole
        detection crop, the original's).
    fold_upsampling : bool
        The d8 network's form (:func:`lungzarr.model.d8.build_d8`): upsampling
        folded into the next convolution (default), or the original's literal layers.
    """

    chunk_slices: int = 16
    weights: object = None
    precision: str = "fp32"
    infer_batch: int | None = None
    gpu: bool = False
    labels: dict | None = None
    strict: bool = False
    engine: str = "auto"
    crop: str = DEFAULT_CROP
    cpu_workers: tuple = ()
    fold_upsampling: bool = True


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes
    ----------
    name : str
        As in the store's stage markers, the CLI and ``status``.
    requires : tuple of str
        Stages that must be complete first. A stage is redone when one of
        them was redone after it (its marker records which completion of
        each it was computed from).
    prepare : callable
        ``prepare(store, patient, payload, options) -> PendingStage``: reads
        what it needs lazily, starts the write (metadata only) and returns
        the pending stage whose ``delayed`` writes the voxels on the workers.
        ``payload`` is the INPUT entry for a stage that creates the patient.
    summary : str
        One line for ``--help``, ``status`` and the README.
    placement : {"cpu", "gpu"}
        Where its tasks may run.
    arrays : tuple of str
        Variables of the patient group it writes.
    subgroups : tuple of str
        Child groups of the patient group it writes.
    creates_patient : bool
        It builds the patient group from INPUT (a new group, swapped in on commit).
    uses_model : bool
        It runs the d8 network: the weights and precision are checked before any patient.
    prefetch : callable, optional
        ``prefetch(client, patient, payload, strict, compute_options) -> payload``: slow
        per-patient reads started on the workers before the patient's turn; the stage's
        prepare gets what it returned, or its future.
    records_warnings : bool
        Its prepare lists what the user should know about the patient's input (the
        PendingStage's ``warnings``; on a PatientError it raises, the error's ``warnings``):
        they replace the stage's recorded warnings each time it runs.
    """

    name: str
    requires: tuple[str, ...]
    prepare: Callable
    summary: str
    placement: str = "cpu"
    arrays: tuple[str, ...] = ()
    subgroups: tuple[str, ...] = ()
    creates_patient: bool = False
    uses_model: bool = False
    prefetch: Callable | None = field(default=None, compare=False)
    records_warnings: bool = False

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS!r}, got {self.placement!r}")
