"""The workers' log filter: no "Compute Failed" traceback for a patient's expected failure."""
from __future__ import annotations

import logging
import re
from typing import Callable

from distributed.diagnostics.plugin import WorkerPlugin

from lungzarr.errors import PatientError


def _patient_error_names() -> set[str]:
    names, todo = set(), [PatientError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def _machine_error_names() -> set[str]:
    """The builtin OSError classes (``OSError``, ``PermissionError``, ...)."""
    names, todo = set(), [OSError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == "builtins":
            names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class _DropPatientErrorFailures(logging.Filter):
    """Drop distributed's "Compute Failed" record when the task raised a lungzarr PatientError,
    or an error of the machine: an OSError with an errno (a full disk...) or a MemoryError.

    A PatientError is an expected, recorded failure of one patient (the run's
    summary and the store's failures table show it); an error of the machine
    gets its own one-sentence message (:func:`lungzarr.errors.environment_reason`:
    the patient's failure, or the run's stop). Any other exception of a task
    still logs its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Compute Failed"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        # distributed logs (key, state, task, repr(exception), traceback); repr starts with the class name.
        text = str(args[3]) if len(args) > 3 else ""
        name = text.split("(", 1)[0]
        if name in _machine_error_names():
            return not re.match(r"\w+\(\d+, ", text)  # OSError(28, 'No space left on device'): an errno
        return name not in _patient_error_names() | {"MemoryError"}


_FILTER = _DropPatientErrorFailures()


class QuietPatientErrors(WorkerPlugin):
    """Worker plugin: install :class:`_DropPatientErrorFailures` on the worker's ``distributed.worker`` logger."""

    name = "lungzarr-quiet-patient-errors"

    def setup(self, worker):
        logger = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _DropPatientErrorFailures) for f in logger.filters):
            logger.addFilter(_FILTER)


def _register_quiet_patient_errors(client, echo: Callable[[str], None] = print) -> None:
    # Registered on the scheduler: workers that join later get it too.
    try:
        client.register_plugin(QuietPatientErrors(), name=QuietPatientErrors.name)
    except Exception as exc:  # workers with another lungzarr: the run goes on, only noisier
        try:
            client.unregister_worker_plugin(QuietPatientErrors.name)
        except Exception:
            pass
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        echo(f"note: the workers cannot load lungzarr's log filter ({first}); is the same lungzarr installed "
             f"there? A patient's failure will also print distributed's 'Compute Failed' traceback on them")
