# Two commands a newcomer needs: `make demo` (the main job) and `make test`. Each creates or updates the
# local virtualenv .venv and installs the project into it with pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fgds-installed

.PHONY: install demo demo-groups test test-slow dry-run lint kernels kernels-check bench bench-micro clean

# What a first install writes into .venv: 6.0 GiB (torch's CUDA build 1.2, its nvidia libraries 3.2, triton 0.9);
# with less free than NEED_GB beside it, stop before pip does, saying so (a full disk failed CI once, at 93 s).
NEED_GB ?= 6.5

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -c "import shutil, sys; \
		free = shutil.disk_usage('$(VENV)').free / 2**30; \
		sys.exit(0 if free >= $(NEED_GB) else 'make: installing into $(VENV) needs about $(NEED_GB) GiB free ' \
		'(torch with its CUDA libraries, triton, diffusers: 6.0 GiB); %.1f GiB free there' % free)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fgds demo --out demo_out

# The group-shift demo (colored digits, worst-group accuracy): about 4 min cold, 30 s cached
demo-groups: $(STAMP)
	$(BIN)/fgds demo --setting groups --out demo_out/groups

lint: $(STAMP)
	$(BIN)/ruff check fgds_engine tests benchmarks

# The CUDA library of the fused step (kernels/), when nvcc is present; the other backends do not need it.
# $(1): the build folder, $(2): further cmake flags.
define build_kernels
	@if command -v nvcc >/dev/null 2>&1 && command -v cmake >/dev/null 2>&1; then \
		cmake -S . -B $(1) -DCMAKE_BUILD_TYPE=Release $(2) >/dev/null && cmake --build $(1) -j 2; \
	else echo "nvcc or cmake not found: skipping the CUDA library build (torch and triton backends work)"; fi
endef

kernels:
	$(call build_kernels,build,)

# What `make test` builds of it: one architecture (sm_75, the oldest this nvcc targets) in build/check/, which
# the tests load: proof that the sources compile and the C ABI loads (a CPU cannot run them), in a third of the
# time of every architecture; `make kernels` and the GPU harvest build the real library.
kernels-check:
	$(call build_kernels,build/check,-DCMAKE_CUDA_ARCHITECTURES=75)

# The default suite (the tests marked slow skip, saying so); --durations: the slowest 15 in the log,
# so that a regression in time shows up. The Triton kernel tests run in their own invocation: TRITON_INTERPRET
# must be set before triton is imported.
test: $(STAMP) lint kernels-check
	FGDS_KERNELS_LIB=build/check/libfgds_kernels.so $(BIN)/python -m pytest -q --durations=15
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q --durations=5 tests/test_ops_triton.py

# The tests marked slow: the same paths at their real sizes (the harvest's dry run with SD 1.5's UNet and VAE,
# SDXL's row in float16). Not in CI: minutes on a 2-core CPU, and nothing the default suite does not cover.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --slow -m slow --durations=15

# The GPU harvest's dry run at the real sizes, by hand: dry_run_out/ gets what $$OUT would
dry-run: $(STAMP)
	OUT=dry_run_out bash benchmarks/gpu_check.sh --dry-run --dry-size real

# glibc: keep freed buffers (no page faults per temporary) so that CPU timings of memory-bound ops are stable
bench: $(STAMP)
	$(BIN)/fgds bench --preset tiny --batches 1 8 --feedback-every 5
	$(BIN)/fgds bench --preset small --batches 1 8 --feedback-every 5
	MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 $(BIN)/python benchmarks/bench_step.py
	$(BIN)/python benchmarks/bench_generate.py

# pytest-benchmark micro-benchmarks (fused step vs eager, image encoding, hardness nll): never part of `make test`
bench-micro: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider benchmarks/test_micro.py \
		--benchmark-json benchmarks/results/bench-micro-$$($(BIN)/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')").json

clean:
	rm -rf build demo_out dry_run_out .pytest_cache
