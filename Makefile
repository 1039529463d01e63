# goose: every target builds the environment it needs on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LATEST := .venv-latest
# The demo's ranks: goose_core/train/demo.toml trains at tp 2 x pp 2 x dp 2.
NPROC  ?= 8
# torch is pinned: 2.13.0 is a local CPU wheel on these machines; an unpinned torch downloads a
# multi-GB CUDA build from PyPI. (pyproject.toml states the range goose supports: torch >= 2.11.)
TORCH  := torch==2.13.0
# `make test-latest`'s fast subset: dp, tp and pp parity at small layouts, the plan tests, the floors.
LATEST_TESTS := tests/test_versions.py tests/test_tensor_parallel_plan.py \
	tests/test_tensor_parallel_families.py tests/test_models.py \
	'stages/05_data_parallel/test_data_parallel.py::test_equals_the_single_device_run[llama-sgd-dp2-accumulate]' \
	'stages/08_tensor_parallel/test_tensor_parallel.py::test_tp_equals_the_single_device_run[gpt2-2]' \
	'stages/08_tensor_parallel/test_tensor_parallel.py::test_tp_equals_the_single_device_run[llama-2]' \
	'stages/08_tensor_parallel/test_tensor_parallel.py::test_tp_equals_the_single_device_run[bloom-2]' \
	'stages/09_pipeline/test_gpipe.py::test_every_rank_matches_the_single_device_run[2-gpipe]'
# `make test-stage 3` as well as `make test-stage N=3` (and `make lesson 8`): the word after the
# goal is the number.
ifneq ($(filter test-stage lesson,$(firstword $(MAKECMDGOALS))),)
  N ?= $(word 2,$(MAKECMDGOALS))
  ifneq ($(N),)
    $(eval $(N):;@:)
  endif
endif
comma := ,
# The most advanced stage that ships a train.py: `make demo-course` runs it.
DEMO_STAGE := $(lastword $(sort $(dir $(wildcard stages/*/train.py))))

.PHONY: help demo demo-course test test-kernels test-gpu test-stage lesson lessons test-latest docs coverage bench bench-gpu clean

help:
	@echo "make demo            goose train on $(NPROC) ranks (tp2 x pp2 x dp2 + ZeRO-1, BPE): kill -9, same command resumes"
	@echo "make demo-course     the most advanced stage on $(NPROC) ranks: 3D beside one device, resume, export"
	@echo "make test            the whole suite (stages, unit tests, docs build)"
	@echo "make test-kernels    the suite on other CPU kernels (CAPABILITY=default|avx2|avx512)"
	@echo "make test-gpu        tests/gpu on one CUDA GPU (skips, saying why, without); GPU_PYTHON=python3 uses that python"
	@echo "make test-stage N    one stage's tests (N = 3 or 03; N=3 works too)"
	@echo "make lesson N=08     stage 08's lesson: a diff of its loop against the one it extends, and its new files"
	@echo "make lessons         every lesson's size: files, and the lines of each part"
	@echo "make test-latest     a fast subset against the newest transformers & deps (.venv-latest)"
	@echo "make docs            strict mkdocs build into site/"
	@echo "make coverage        every 🤗 family at tp=2, pp=2, tp=2xpp=2 (MoE: ep=2) vs one device; docs/coverage.md"
	@echo "make bench           goose beside torch peers, paired; benchmarks/results.json, results.md"
	@echo "make bench-gpu       tokens/s, memory, MFU on one CUDA GPU (skips without); GPU_PYTHON as for test-gpu"
	@echo "make clean           remove the environments and build outputs"

# Every package at the exact version of constraints.txt: a new upstream release cannot turn
# main red overnight (`make test-latest` tries the newest releases on purpose).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# `goose train --config goose_core/train/demo.toml` on a BPE tokenizer trained from the shipped
# corpus: a rank kills itself (SIGKILL) mid-run and the same command resumes. demo-out/ gets the
# tokenizer, the checkpoints, the export, log.jsonl and loss.png.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m goose_core.train.demo --out demo-out --nproc $(NPROC)

# One thread a rank (torchrun's default, said here so it prints no warning); demo-out/ gets the
# checkpoint, the export and demo.png.
demo-course: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) $(DEMO_STAGE)train.py

test: $(STAMP)
	$(PY) -m pytest -q

# The suite again on CPU kernels other than this machine's best: parity must not depend on which
# kernels a CPU picks (a vectorised sum adds in another order). Three libraries pick kernels, and
# each is capped here: ATen's own (ATEN_CPU_CAPABILITY), MKL's, and oneDNN's, which runs bf16
# matmuls only where it finds AVX-512 (a CPU with only AVX2 takes ATen's fallback GEMM, another
# rounding: ONEDNN_MAX_CPU_ISA=AVX2 gives this machine that family, which ATen's variable alone
# does not; tests/test_kernel_families.py proves the switch changes bf16 results).
CAPABILITY ?= default
MKL_default := SSE4_2
MKL_avx2    := AVX2
MKL_avx512  := AVX512
ONEDNN_default := SSE41
ONEDNN_avx2    := AVX2
ONEDNN_avx512  := ALL
KERNELS = ATEN_CPU_CAPABILITY=$(CAPABILITY) MKL_ENABLE_INSTRUCTIONS=$(MKL_$(CAPABILITY)) \
	ONEDNN_MAX_CPU_ISA=$(ONEDNN_$(CAPABILITY))
test-kernels: $(STAMP)
	$(KERNELS) $(PY) -c "import torch; print('CPU kernels:', torch.backends.cpu.get_cpu_capability(), \
	  '| oneDNN bf16 matmuls:', torch.ops.mkldnn._is_mkldnn_bf16_supported())"
	$(KERNELS) $(PY) -m pytest -q -m "not kernel_free"

# tests/gpu (pytest -m gpu) on one CUDA GPU: the one-GPU pipeline against the plain run, stream races,
# the CUDA sanitizer, NCCL under torchrun, the profiler's allocator path. Without CUDA it says so
# and every test skips (exit 0). .venv holds the pinned CPU torch: on a GPU machine whose python
# already has a CUDA torch, `make test-gpu GPU_PYTHON=python3` runs with it (no venv is built).
GPU_PYTHON ?=
GPU_PY := $(or $(GPU_PYTHON),$(PY))
test-gpu: $(if $(GPU_PYTHON),,$(STAMP))
	@$(GPU_PY) -c "import torch; print('test-gpu: ' + (f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}' if torch.cuda.is_available() else f'no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}): every gpu test skips'))"
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m pytest -q -rs -m gpu tests/gpu

# stages/course.py prints stage N's folder, or lists the stages and fails for an unknown N.
test-stage: $(STAMP)
	@$(PY) stages/course.py "$(N)" > /dev/null
	$(PY) -m pytest -q $$($(PY) stages/course.py "$(N)")

# A lesson is built from the working tree by the standard library alone: no venv, no git history.
lesson:
	@test -n "$(N)" || { echo "make lesson: which stage? (usage: make lesson N=08)" >&2; exit 2; }
	@$(PYTHON) stages/lessons.py "$(N)"

lessons:
	@$(PYTHON) stages/lessons.py

# A separate venv, upgraded to the newest transformers and other dependencies on every run, so
# drift is seen here, on purpose, and not on main. torch stays at the local $(TORCH) CPU wheel
# (the newest torch on PyPI is a multi-GB CUDA build; the floor, 2.11, was tried by hand).
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' $(TORCH)
	@$(LATEST)/bin/python -c "import torch, transformers; print('newest: torch', torch.__version__, '/ transformers', transformers.__version__)"
	$(LATEST)/bin/python -m pytest -q $(LATEST_TESTS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Every causal-LM family of the installed transformers that declares its plans, tiny, at tp=2,
# pp=2 and tp=2 x pp=2 against the single-device run: docs/coverage.md and docs/coverage.json.
# Then ep=2 over every family with experts (~4 min), merged in as a column.
# CPU-heavy (~13 min on 2 loaded cores). COVERAGE_ARGS passes options, e.g.
# COVERAGE_ARGS='--families llama,mixtral --jobs 2', or '--resume' to continue an interrupted run.
coverage: $(STAMP)
	PYTHONPATH=tools$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m sweep $(COVERAGE_ARGS)
	PYTHONPATH=tools$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m sweep --modes ep2 --families experts --merge docs/coverage.json

# Paired and interleaved (benchmarks/paired.py): each ratio with its 95% interval and the
# environment it ran in. BENCH=zero,pipeline runs some (the names of benchmarks/bench_*.py).
bench: $(STAMP)
	$(PY) -m benchmarks $(subst $(comma), ,$(BENCH))

# One CUDA GPU: 🤗 beside goose's local_pipeline, GPT-2 124M and a 1B Llama, TF32 and bf16.
# Without CUDA (this environment pins a CPU torch) it says so and exits 0. BENCH_GPU_ARGS passes
# options, e.g. BENCH_GPU_ARGS='--model llama-1b --precision bf16'; see benchmarks/gpu.md.
# GPU_PYTHON=python3 runs it with a python that has a CUDA torch, as for test-gpu.
bench-gpu: $(if $(GPU_PYTHON),,$(STAMP))
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m benchmarks.gpu $(BENCH_GPU_ARGS)

clean:
	rm -rf $(VENV) $(LATEST) site .pytest_cache benchmarks/out demo-out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
