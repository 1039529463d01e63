"""Code written against the former names still runs: the module paths of goose_core.pipeline before
the engine moved out, its public names, activation checkpointing's names, and ``checkpoint=``."""

import importlib
import warnings
from pathlib import Path
from types import ModuleType

import pytest

import goose_core.pipeline
from goose_core import engine, instruments, testing
from goose_core.engine import recompute
from goose_core.pipeline import PipelineParallel, local_pipeline
from goose_core.testing import TrainSpec

#: Every public name goose_core.pipeline exported before the engine moved out.
EXPORTED = {
    "Callback", "CallbackList", "CheckpointMode", "Event", "GPipe", "InFlight", "LiveActivations", "MODES",
    "OneFOneB", "PipelineParallel", "SCHEDULES", "Schedule", "Sleep", "SleepPipeline", "Span", "Timeline",
    "adapter_for", "bubble_fraction", "busy_time", "cell_order", "checkpoint_stop", "clock_cycles", "draw_gantt",
    "format_timetable", "ideal_gpipe_time", "is_checkpointing", "is_pipelined", "is_recomputing",
    "local_pipeline", "makespan", "timetable", "trace_waits", "trim_waits",
}

#: goose_core.pipeline's former submodule -> the module that holds it now.
MOVED = {
    **{name: f"goose_core.engine.{name}" for name in (
        "activations", "callbacks", "dependency", "emulation", "messages", "microbatch", "p2p", "parked",
        "pipeline", "schedule", "stream", "stream_check", "transport")},
    "checkpoint": "goose_core.engine.recompute",
    "gantt": "goose_core.instruments.gantt",
    "timeline": "goose_core.instruments.timeline",
}

def test_the_pipeline_package_exports_every_former_name() -> None:
    assert EXPORTED <= set(goose_core.pipeline.__all__)
    assert all(hasattr(goose_core.pipeline, name) for name in goose_core.pipeline.__all__)


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_a_former_module_path_is_the_moved_module(old: str, new: str) -> None:
    module = importlib.import_module(new)
    assert importlib.import_module(f"goose_core.pipeline.{old}") is module  # the same objects, not a copy
    assert getattr(goose_core.pipeline, old) is module  # `from goose_core.pipeline import schedule`


#: Modules written after the move: they never had a goose_core.pipeline name to keep.
NEWER = {"goose_core.engine.block_recompute", "goose_core.engine.selective", "goose_core.engine.split_backward",
         "goose_core.instruments.accounting"}


def test_the_aliases_cover_the_moved_modules_exactly() -> None:
    now = {f"{package.__name__}.{f.stem}" for package in (engine, instruments)
           for f in Path(_file(package)).parent.glob("*.py") if f.stem != "__init__"}
    assert set(MOVED.values()) == now - NEWER


def _file(module: ModuleType) -> str:
    assert module.__file__ is not None
    return module.__file__


def test_activation_checkpointing_names_are_the_recompute_ones() -> None:
    assert recompute.CheckpointMode is recompute.RecomputeMode
    assert recompute.Checkpointing is recompute.Recomputation
    assert recompute.checkpoint_stop is recompute.recompute_stop
    assert recompute.is_checkpointing is recompute.will_recompute
    assert goose_core.pipeline.checkpoint_stop is recompute.recompute_stop


def test_the_tiny_models_keep_their_former_name() -> None:
    assert testing.FAMILIES is testing.TINY_MODELS


SPEC = TrainSpec(family="llama", steps=1)


def _losses(**recompute_kwargs: str) -> list[float]:
    model = local_pipeline(SPEC.build_model(), 2, 2, **recompute_kwargs)
    assert model.pipeline.recompute == "always"
    batch = SPEC.batch(0)
    loss = model(**batch).loss
    loss.backward()
    return [loss.item()]


def test_checkpoint_keyword_warns_naming_recompute_and_still_works() -> None:
    with pytest.warns(DeprecationWarning, match=r"local_pipeline\(checkpoint=\.\.\.\) is deprecated: pass "
                                                 r"recompute='always'"):
        old = _losses(checkpoint="always")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new keyword warns nothing
        new = _losses(recompute="always")
    assert old == new


@pytest.mark.parametrize("entry", [local_pipeline, PipelineParallel])
def test_checkpoint_and_recompute_together_are_refused(entry) -> None:  # type: ignore[no-untyped-def]
    # refused first, before the context is read: None stands in for it
    with pytest.raises(TypeError, match="got both recompute='never' and checkpoint='always'"):
        entry(SPEC.build_model(), None, 2, recompute="never", checkpoint="always")
