"""Stage 10: the stream code runs on CPU stand-ins; waits are ordered; transfers overlap compute."""


from goose_core import ParallelContext, PipelineParallel
from goose_core.pipeline import GPipe, ideal_gpipe_time, local_pipeline, trace_waits
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run, run_distributed

from course import load_train_script

train_script = load_train_script("10")

SPEC = TrainSpec(family="llama", batch_size=4, seq_len=16)


def test_stream_waits_follow_the_schedule_forward_and_mirror_backward() -> None:
    n, m = 3, 2
    model = local_pipeline(SPEC.build_model(), n, m)
    with trace_waits() as waits:
        loss = model(**SPEC.batch(0)).loss
        forward = list(waits)
        loss.backward()
    expected = []
    for i, j in GPipe(m, n).forward_cells():
        if j > 0:
            expected.append((f"compute{j}", f"copy{j}"))  # the input must have arrived
        if j < n - 1:
            expected.append((f"copy{j}", f"compute{j}"))  # the output must have been computed
            expected.append((f"copy{j + 1}", f"copy{j}"))  # the copy runs on copy{j+1}
    assert forward == expected
    backward = waits[len(forward):]
    assert sorted(backward) == sorted((b, a) for a, b in expected)
    for j in range(n - 1):  # a gradient leaves partition j+1 before partition j may read it
        for k in range(m):
            sent = [t for t, w in enumerate(backward) if w == (f"copy{j + 1}", f"compute{j + 1}")][k]
            used = [t for t, w in enumerate(backward) if w == (f"compute{j}", f"copy{j}")][k]
            assert sent < used


def _in_flight(ctx: ParallelContext) -> list[tuple[int, bool, int]]:
    """As the middle stage sends each micro-batch's output (its forward is done): is the next
    receive already posted, and how many earlier sends are still in the air?"""
    seen: list[tuple[int, bool, int]] = []
    model = PipelineParallel(SPEC.build_model(), ctx, num_microbatches=4).parallelize()
    transport = model.pipeline.transport
    send = transport.send

    def probe(output, microbatch: int, partition: int):  # the executor sends once a cell is done
        channel = transport.channels.get(partition - 1)  # none before the step's first receive
        posted = channel.posted if channel else {}  # receives posted, not yet waited for
        # A message is (kind, micro-batch, boundary): the boundary with the previous stage.
        seen.append((microbatch, ("activation", microbatch + 1, partition - 1) in posted, len(transport.sends)))
        return send(output, microbatch, partition)

    transport.send = probe
    model(**SPEC.batch(0)).loss.backward()
    return seen


def test_next_receive_is_posted_while_a_micro_batch_computes() -> None:
    seen = run_distributed(_in_flight, 1, 3, 1, timeout=90)[1]
    assert [(i, posted) for i, posted, _ in seen] == [(0, True), (1, True), (2, True), (3, False)]
    assert all(sends >= 1 for _, _, sends in seen[1:])  # earlier sends are not waited for


def _sleep_steps(ctx: ParallelContext, m: int, tf: float, tb: float) -> float:
    return train_script.emulated_step_time(ctx, m, tf, tb, repeats=2)


def test_sleep_calibrated_stages_overlap_as_gpipe_predicts() -> None:
    p, m, tf, tb = 4, 4, 0.03, 0.06
    measured = run_distributed(_sleep_steps, 1, p, 1, m, tf, tb, timeout=90)[0]
    ideal = ideal_gpipe_time(m, p, tf, tb)
    sequential = m * p * (tf + tb)  # no overlap: one cell at a time
    assert ideal * 0.98 < measured < 1.3 * ideal, (measured, ideal)
    assert measured < 0.6 * sequential


def _train(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    return train_script.train(ctx, spec, 4)


def test_train_py_equals_the_single_device_run() -> None:
    spec = TrainSpec(family="gpt2", steps=2, optimizer="sgd")
    for result in run_distributed(_train, 1, 2, 1, spec, timeout=120):
        assert_matches_reference(result, reference_run(spec), PARALLEL)
