"""Fixtures shared by the unit tests and the stage tests."""

import inspect
from typing import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test's own tensor work on one thread: timing two threads on a busy 2-core box
    measures their barriers, not the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def nccl_matching(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test matches point-to-point messages as NCCL does: tags are ignored, each pair's
    sends meet its receives in issue order. gloo honours tags, so force them all to 0 (the ranks
    are forked, so they inherit the patch). Code that relied on tags fails here as on a GPU."""
    import torch.distributed as dist

    originals = {}  # patched function -> torch's (P2POp accepts only torch's isend/irecv)
    for name in ("isend", "irecv", "send", "recv"):
        original = getattr(dist, name)
        signature = inspect.signature(original)

        def untagged(*args, _original=original, _signature=signature, **kwargs):  # type: ignore[no-untyped-def]
            bound = _signature.bind(*args, **kwargs)
            bound.arguments["tag"] = 0
            return _original(*bound.args, **bound.kwargs)

        monkeypatch.setattr(dist, name, untagged)
        originals[untagged] = original

    class P2POp(dist.P2POp):
        def __new__(cls, op, tensor, peer=None, group=None, tag=0, group_peer=None):  # type: ignore[no-untyped-def]
            return super().__new__(cls, originals.get(op, op), tensor, peer, group, 0, group_peer)

        def __init__(self, op, tensor, peer=None, group=None, tag=0, group_peer=None):  # type: ignore[no-untyped-def]
            super().__init__(originals.get(op, op), tensor, peer, group, 0, group_peer)

    monkeypatch.setattr(dist, "P2POp", P2POp)


# The pipeline and stream tests; the others skip the checker: it costs a Python call per
# operation, which timing tests (profiles, overlap) would measure.
_STREAM_CHECKED = ("tests/test_pipeline.py", "tests/test_stream", "tests/test_transport.py",
                   "tests/test_pipeline_generate.py",
                   "tests/test_messages.py", "tests/test_recompute.py", "tests/test_dependency.py",
                   "tests/test_composition.py", "tests/test_wrapper_order.py",
                   "tests/test_token_weighted.py", "tests/test_callbacks.py", "stages/09_",
                   "stages/10_", "stages/11_", "stages/13_", "stages/14_", "tests/test_schedule_",
                   "stages/17_3d_parallelism/test_3d", "stages/15_long_sequences/test_sequence_parallel",
                   "stages/15_long_sequences/test_context_pipeline",
                   "stages/16_expert_parallel/test_expert_parallel",
                   # bf16 activations through every pipeline transport; the loss-scaling test only
                   # scales the backward's seed (a value, no new stream traffic): it runs unchecked
                   "stages/17_3d_parallelism/test_mixed_precision_autocast")


@pytest.fixture(autouse=True)
def stream_checker(request: pytest.FixtureRequest) -> Iterator[None]:
    """The pipeline and stream tests run under the CPU stream checker: a read before the wait
    for its writer, or memory reused without record_stream, raises StreamRace as a GPU would."""
    from goose_core.engine.stream_check import check_streams

    path = request.node.path.as_posix()
    if not any(f"/{part}" in path for part in _STREAM_CHECKED):
        yield
        return
    with check_streams():
        yield


# Tests whose verdict no CPU kernel can change: they compare no floating-point result of one
# computation with another (errors and refusals, a named missing rank, counts, integers, text,
# the docs and the course's layout). `make test-kernels` (CI's second and third passes, on other
# CPUs' kernels) deselects them with ``-m "not kernel_free"``; `make test` runs them.
_KERNEL_FREE = ("tests/test_missing.py", "tests/test_bench_gpu.py", "tests/test_make_targets.py",
                "tests/test_docs.py", "tests/test_docs_course.py", "tests/test_docs_architecture.py",
                "tests/test_import_graph.py", "tests/test_pictures.py", "tests/test_gpu_machine.py",
                "tests/test_launch.py", "tests/test_grid.py", "tests/test_data_files.py",
                "tests/test_data_stream.py", "tests/test_train_config.py", "tests/test_train_watch.py",
                "tests/test_sequence_parallel.py", "tests/test_context_parallel.py",
                "tests/test_plan.py",  # bytes, FLOPs and traffic counted, plan beside accounting
                "stages/test_course.py", "stages/16_expert_parallel/test_expert_traffic.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.path.as_posix().endswith(path) for path in _KERNEL_FREE):
            item.add_marker(pytest.mark.kernel_free)
