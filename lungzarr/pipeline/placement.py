"""Which workers of a cluster may run a stage's tasks: GPU workers and CPU-only workers."""
from __future__ import annotations

__all__ = ["gpu_workers", "cpu_only_workers", "compute_options", "cpu_task_workers"]


def _workers(client) -> dict:
    return client.scheduler_info().get("workers", {}) if client is not None else {}


def gpu_workers(client) -> list[str]:
    """Addresses of the workers that advertise a ``GPU`` resource (``dask worker --resources GPU=1``)."""
    return [address for address, info in _workers(client).items() if info.get("resources", {}).get("GPU", 0) > 0]


def cpu_only_workers(client) -> list[str]:
    """Addresses of the workers without a ``GPU`` resource."""
    gpus = set(gpu_workers(client))
    return [address for address in _workers(client) if address not in gpus]


def compute_options(client, stages, *, gpu: bool) -> dict:
    """``client.compute`` options per stage name: with GPU and CPU-only workers, CPU stages stay off the GPUs.

    A GPU worker's threads then only run the GPU stages, so the CPU stages of
    the next patients never delay a predict. GPU stages are restricted by the
    annotation their prepare makes (``options.gpu``).
    """
    if client is None or not gpu:
        return {}
    cpu_only = cpu_only_workers(client)
    if not cpu_only:
        return {}
    return {stage.name: {"workers": cpu_only, "allow_other_workers": False}
            for stage in stages if stage.placement == "cpu"}


def cpu_task_workers(client, *, gpu: bool) -> tuple[str, ...]:
    """Where the CPU tasks of a GPU stage may run: the CPU-only workers when the cluster has GPU workers too.

    Empty (anywhere) without a client, without ``gpu``, or when every worker
    has a GPU (a cluster of one GPU worker then runs the whole stage). A
    stage-wide ``workers=`` cannot do this: it would apply to the GPU tasks
    too, so the stage annotates its CPU tasks with these addresses.
    """
    if client is None or not gpu:
        return ()
    cpu_only = cpu_only_workers(client)
    if not cpu_only or not gpu_workers(client):
        return ()
    return tuple(cpu_only)
