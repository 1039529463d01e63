"""``make bench-gpu``'s arithmetic and code paths, on the CPU: FLOPs, MFU, the skip, a tiny run of every case."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from benchmarks import gpu
from benchmarks.flops import attention_width, matmul_parameters, mfu, training_flops
from benchmarks.gpu_page import versus_accumulation

B, T, V = 2, 16, 100


def _gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=32,
                                      attn_implementation="eager"))


def _llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                        attn_implementation="eager"))


def test_gpt2_flops_equal_a_hand_count() -> None:
    # Per layer c_attn 64x192, attn.c_proj 64x64, c_fc 64x256, mlp.c_proj 256x64 = 12 * 64^2;
    # the tied LM head 100x64 once: N = 2 * 49152 + 6400.
    model = _gpt2()
    assert matmul_parameters(model) == 2 * 12 * 64**2 + V * 64 == 104704
    # 32 tokens x (6 N + 12 L d T) = 32 x (628224 + 12 * 2 * 64 * 16)
    assert training_flops(model, B, T) == 32 * (6 * 104704 + 24576) == 20889600


def test_llama_flops_count_query_heads_and_grouped_keys() -> None:
    # q 64x64, k and v 64x32 (2 kv-heads of 16), o 64x64, gate/up/down 3 x 64x96; head 100x64.
    model = _llama()
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96
    assert matmul_parameters(model) == 2 * per_layer + V * 64
    assert attention_width(model.config) == 64  # 4 query heads x 16: GQA does not shrink Q K^T
    assert training_flops(model, B, T) == B * T * (6 * (2 * per_layer + V * 64) + 12 * 2 * 64 * T)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_flops_equal_torchs_flop_counter(build) -> None:
    # Eager attention spells Q K^T and A V as matmuls, so torch counts exactly what the formula does.
    torch.manual_seed(0)
    model = build()
    x = torch.randint(V, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=x, labels=x).loss.backward()
    # Not torch's counting but transformers' spelling: before 5.24 (5.17 at the floor) Llama's
    # rotary embedding builds its angle table as a matmul, inv_freq (1, head_dim/2, 1) @
    # position_ids (1, 1, T), one aten.bmm torch counts as 2 * head_dim/2 * T = 256 FLOPs; 5.24
    # broadcasts a multiply, which counts none. A frequency table is no model FLOP, so the formula
    # leaves it out and the test takes the rotary module's own count off, after pinning it to
    # exactly that outer product or nothing (so the check stays exact at both).
    rotary = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(".rotary_emb"))
    if rotary:
        half_head = attention_width(model.config) // model.config.num_attention_heads // 2
        assert rotary == 2 * half_head * T, rotary
    assert counter.get_total_flops() - rotary == training_flops(model, B, T)


def test_mfu_is_model_flops_over_time_over_peak() -> None:
    # GPT-2 124M-ish: 6 * 124e6 * 32768 FLOPs in 0.1 s on a 989 TFLOP/s peak is 24.7%.
    flops = 6 * 124e6 * 32768
    assert mfu(flops, 0.1, 989e12) == pytest.approx(flops / 0.1 / 989e12)
    assert mfu(flops, 0.1, 989e12) == pytest.approx(0.2465, abs=1e-4)
    with pytest.raises(ValueError, match="positive step time"):
        mfu(flops, 0.0, 989e12)


def test_without_cuda_it_skips_cleanly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    assert "bench-gpu: skipped, no CUDA device" in capsys.readouterr().out


def test_full_size_on_the_cpu_is_refused() -> None:
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu"])


def test_every_case_runs_tiny_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every case once per family, each family in one precision (both precisions' code paths run).
    monkeypatch.setattr(gpu, "append_and_publish", lambda rows: pytest.fail("a tiny run must write nothing"))
    cpu = torch.device("cpu")
    rows = (gpu.measure_all(cpu, True, ["gpt2-124m"], ["tf32"], warmup=1, steps=2)
            + gpu.measure_all(cpu, True, ["llama-1b"], ["bf16"], warmup=1, steps=2))
    assert [(r["model"], r["case"]) for r in rows] == [(m, c.name) for m in ("gpt2-124m", "llama-1b") for c in gpu.CASES]
    flops = {m: training_flops(gpu.build_model(shape, cpu), shape.batch_size, shape.seq_len)
             for m, shape in gpu.TINY.items()}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["flops_per_step"] == flops[row["model"]]
    goose = next(r for r in rows if r["runner"] == "goose" and r["checkpoint"] == "always")
    assert versus_accumulation(goose, rows).count("[") == 1  # beside 🤗 accumulation + checkpointing
    # goose plan beside the measured: TF32 rows of one micro-batch's activations, nothing recomputed
    planned = [(r["model"], r["case"]) for r in rows if "plan_peak_bytes" in r]
    assert planned == [("gpt2-124m", c.name) for c in gpu.CASES if gpu._planned(c)]
    assert {name for _, name in planned} >= {"🤗 accumulation", "goose local_pipeline x1, checkpoint never"}
    assert "🤗 one batch" not in {name for _, name in planned}  # the whole batch's activations at once
    row = next(r for r in rows if "plan_peak_bytes" in r)
    assert row["plan_flops"] > 0 and row["plan_step_s"] == row["plan_flops"] / row["peak_flops"]


def test_each_case_has_its_own_name_and_1f1b_cases_ask_for_their_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len({case.name for case in gpu.CASES}) == len(gpu.CASES)
    calls: list[dict] = []
    monkeypatch.setattr(gpu, "local_pipeline", lambda model, *args, **kwargs: calls.append(kwargs) or model)
    shape, cpu = gpu.TINY["gpt2-124m"], torch.device("cpu")
    for schedule in ("gpipe", "1f1b"):
        gpu._prepare(gpu.Case("goose", "always", 2, schedule), torch.nn.Linear(1, 1), shape, cpu)
    # GPipe is the default and is never named: the benchmark also runs where local_pipeline has no schedule=.
    assert calls == [{"recompute": "always", "devices": [cpu, cpu]},
                     {"recompute": "always", "devices": [cpu, cpu], "schedule": "1f1b"}]
    assert gpu.Case("goose", "never", 1, "1f1b").name == "goose local_pipeline x1 1F1B, checkpoint never"
