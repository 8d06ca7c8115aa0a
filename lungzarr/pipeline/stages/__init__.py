"""The stage registry: every pipeline stage, in run order, each described once by its :class:`Stage`.

To add a stage, write ``stages/<name>.py`` defining a ``Stage`` (what it
requires, how it prepares a patient, where it runs, what it writes) and add
it to :data:`STAGES` below, after the stages it requires. The runner, the
store's markers, ``lungzarr run``/``status`` and the CLI's stage commands
read this list.
"""
from __future__ import annotations

from lungzarr.errors import LungzarrError
from lungzarr.pipeline.stage import Stage
from lungzarr.pipeline.stages.detect import DETECT
from lungzarr.pipeline.stages.features import FEATURES
from lungzarr.pipeline.stages.ingest import INGEST
from lungzarr.pipeline.stages.lungs3d import LUNGS3D
from lungzarr.pipeline.stages.nodules import NODULES
from lungzarr.pipeline.stages.segment import SEGMENT

__all__ = ["STAGES", "STAGE_NAMES", "stage_names", "get_stage", "ordered_stages", "check_registry"]

#: Every stage, in run order (each after the stages it requires).
STAGES: tuple[Stage, ...] = (INGEST, SEGMENT, LUNGS3D, DETECT, NODULES, FEATURES)
#: The names of the stages shipped with lungzarr, in run order (:func:`stage_names` reads the registry as it is).
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def check_registry(stages=None) -> None:
    """Raise when a stage's name repeats or it requires a stage that does not come before it."""
    seen = set()
    for stage in STAGES if stages is None else stages:
        if stage.name in seen:
            raise RuntimeError(f"two stages are called {stage.name!r}")
        missing = [r for r in stage.requires if r not in seen]
        if missing:
            raise RuntimeError(f"stage {stage.name!r} requires {missing!r}, which come later or not at all in STAGES")
        seen.add(stage.name)


check_registry()


def stage_names() -> tuple[str, ...]:
    """The registered stages' names, in run order."""
    return tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    """The registered stage called ``name``."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise LungzarrError(f"unknown stage {name!r}; the stages are {list(stage_names())!r}")


def ordered_stages(names=None) -> tuple[Stage, ...]:
    """The stages called ``names`` (default all), in run order."""
    if names is None:
        return STAGES
    wanted = {get_stage(n).name for n in names}
    return tuple(s for s in STAGES if s.name in wanted)
