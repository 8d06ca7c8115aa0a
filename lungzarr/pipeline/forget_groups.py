"""A scheduler plugin: the scheduler lets go of lungzarr's task groups once it has forgotten them.

Every patient's stage graph has task names of its own (dask tokens of the
patient, its files and the store), so each makes new task groups
(:class:`distributed.scheduler.TaskGroup`) on the scheduler. The scheduler
drops a group when its last task is forgotten, but two records keep it for
the scheduler's whole life (dask/distributed#7977): its span, and the recent
``Scheduler.computations``. A task submitted without :func:`distributed.span`
belongs to the "default" span, which lives as long as one of its groups is
still running: in a run where patients stream through the stages, the whole
run. Measured on a 2,000-patient ``lungzarr ingest``, the scheduler grew
~17 kB per patient, ~6 task groups per patient of them: 1.3 GB at 75,000
(``benchmarks/results/cohort_scale_ingest_2000_meter.json``); ~8 kB with this plugin
(``cohort_scale_ingest_2000_forget.json``).

:class:`ForgetFinishedGroups` notes each lungzarr task as it is forgotten
(a task of a patient's stage carries the meter annotation; a stage task built
on a worker has a ``lungzarr-`` key) and, at the next graph submitted, removes
the groups the scheduler has dropped from their span and from the
computations. Other clients' groups are left alone. A span's figures on the
dashboard then count the groups still on the scheduler.
"""
from __future__ import annotations

try:
    from distributed.diagnostics.plugin import SchedulerPlugin as _SchedulerPlugin
except ImportError:  # no dask.distributed: runs without a cluster have no scheduler to keep small
    _SchedulerPlugin = object

from lungzarr.pipeline.progress import METER_ANNOTATION

__all__ = ["TASK_KEY_PREFIX", "ForgetFinishedGroups", "ensure_forgetting"]

#: Key names of lungzarr's own tasks that carry no meter annotation (a stage built on a worker:
#: ``lungzarr.pipeline.remote``).
TASK_KEY_PREFIX = "lungzarr-"


class ForgetFinishedGroups(_SchedulerPlugin):
    """Remove lungzarr's task groups the scheduler has dropped from the spans and computations that keep them.

    Parameters
    ----------
    annotation : str
        The task annotation that marks a task of a patient's stage.
    key_prefix : str
        Key names of lungzarr's other tasks start with it.
    """

    name = "lungzarr-forget-finished-groups"
    #: Registered again (every run with the same scheduler): the plugin in place is kept.
    idempotent = True

    def __init__(self, annotation: str = METER_ANNOTATION, key_prefix: str = TASK_KEY_PREFIX):
        self.annotation, self.key_prefix = annotation, key_prefix
        self.scheduler = None
        #: Groups of lungzarr tasks forgotten since the last look (a group may still have other tasks).
        self.pending = set()
        #: Groups let go of, in all (for tests and the curious).
        self.released = 0

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish != "forgotten" or self.scheduler is None:
            return
        ts = self.scheduler.tasks.get(key)  # put back for the plugins while they are told
        if ts is None:
            return
        name = key[0] if isinstance(key, tuple) else key
        ours = self.annotation in (ts.annotations or {}) or (isinstance(name, str)
                                                             and name.startswith(self.key_prefix))
        if ours:
            self.pending.add(ts.group)

    def update_graph(self, scheduler, *args, **kwargs) -> None:
        # Once per graph submitted, not per transition: a group is dropped only after its last task's
        # transition (and the plugins) ran, so it is looked at on the next submission.
        self.release()

    def release(self) -> int:
        """Let go of the pending groups the scheduler has dropped; returns how many."""
        scheduler = self.scheduler
        spans = scheduler.extensions.get("spans")
        still_there, released = set(), 0
        for group in self.pending:
            if scheduler.task_groups.get(group.name) is group:
                still_there.add(group)
                continue
            span = spans.spans.get(group.span_id) if spans is not None and group.span_id else None
            if span is not None:
                span.groups.discard(group)
            for computation in scheduler.computations:
                computation.groups.discard(group)
            released += 1
        self.pending = still_there
        self.released += released
        return released


def ensure_forgetting(client) -> None:
    """Register :class:`ForgetFinishedGroups` on the scheduler of ``client`` (kept if in place: idempotent).

    The scheduler imports lungzarr for it, as it does to unpickle the graphs' tasks.
    """
    client.register_plugin(ForgetFinishedGroups(), name=ForgetFinishedGroups.name)
