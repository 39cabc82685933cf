# mimbench: `make test` and `make report` are all a fresh machine needs.
# Both run `make setup` first when .venv is missing or older than its recipe.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
SUITE  ?= ablation_masking
PROFILE ?= cpu

.PHONY: setup test report measure archive smoke bench bench-data gpu-check

# setup installs mmcv-lite (no compiler; scripts/setup.sh says why UperNet needs no compiled op).
# Full mmcv with compiled ops is opt-in: `MMCV_FULL=1 make setup` on a fresh clone, or
# `bash scripts/setup.sh --full-mmcv` on an existing .venv (built once, ~25 min; the wheel is cached)
setup: $(STAMP)

$(STAMP): scripts/setup.sh requirements.txt pyproject.toml
	bash scripts/setup.sh
	touch $(STAMP)

# PYTEST_ARGS narrows the run (e.g. PYTEST_ARGS="-k masking"); an empty selection
# (pytest exit code 5) is reported, not treated as a failure
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# `make report`: the measurements committed in results/, then the report. The records are restored
# into outputs/ first (runs.archive), so on a fresh clone nothing below trains that has a record:
#   the budget curve under the tuned recipe, TUNED_ARGS (every method at its held-out lr, against
#     its own init; the measurement of `make measure`): its finished runs only (--table-only);
#   the shared recipe's curve, CURVE_ARGS (mae and none, 2 seeds, k-NN): every run has a record;
#   the compute-matched block at BUDGET (1.3 MAE-epochs, 3 seeds, k-NN + linear), RECIPE=shared for
#     the other recipe: its finished runs only (--table-only).
# SUITE=NAME runs that suite's whole grid instead (`make report SUITE=ablation_masking`), training
# what is missing. BUDGET=2.5h solves E for 2.5 h of this machine; EVALS / SEEDS / ONLY adjust the block.
BUDGET ?= 1.3ep
CURVE ?= 0.5,1,2.5,5ep
CURVE_ARGS = compare_methods --curve $(CURVE) --recipe shared --only mae,none --seeds 2 --evals knn \
	--profile $(PROFILE)
TUNED_ARGS = compare_methods --curve $(CURVE) --recipe tuned --seeds 3 --evals knn,linear --profile $(PROFILE)
REPORT_ARGS = $(if $(filter file,$(origin SUITE)),compare_methods --budget $(BUDGET) --table-only \
	$(if $(EVALS),--evals $(EVALS)),$(SUITE)) --profile $(PROFILE) $(if $(RECIPE),--recipe $(RECIPE)) \
	$(if $(SEEDS),--seeds $(SEEDS)) $(if $(ONLY),--only $(ONLY))
report: $(STAMP)
	$(PY) -m runs.archive restore
	$(if $(filter file,$(origin SUITE)),$(PY) -m suites.run $(CURVE_ARGS) --dry-run)
	rc=0; $(if $(filter file,$(origin SUITE)),$(PY) -m suites.run $(TUNED_ARGS) --table-only || rc=$$?; \
	$(PY) -m suites.run $(CURVE_ARGS) || rc=$$?;) \
	$(PY) -m suites.run $(REPORT_ARGS) || rc=$$?; \
	$(PY) -m reports.build; exit $$rc

# `make measure`: the tuned recipe's budget curve (issue: fair at every budget), resumable, one
# method per one-thread lane (MEASURE_SEEDS seeds, k-NN and linear at every budget); the lrs first
# where results/tuned/$(PROFILE).json has none (suites.tune). Then `make archive` and commit.
MEASURE_SEEDS ?= 3
MEASURE_METHODS ?= mae pixel beit ibot
measure: $(STAMP)
	$(PY) -m runs.archive restore
	mkdir -p outputs
	for m in $(MEASURE_METHODS); do \
	  ( OMP_NUM_THREADS=1 $(PY) -m suites.tune --profile $(PROFILE) --only $$m --no-progress && \
	    OMP_NUM_THREADS=1 $(PY) -m suites.run $(TUNED_ARGS) --only $$m,none --seeds $(MEASURE_SEEDS) \
	      --no-progress ) > outputs/measure-$$m.log 2>&1 & \
	done; wait; $(PY) -m suites.run $(TUNED_ARGS) --table-only

# the records of every finished run in outputs/ (config, result, metrics; no weights) and the suite
# indexes into results/, to commit: `make report` restores them first on a fresh machine
archive: $(STAMP)
	$(PY) -m runs.archive save

# throughput of every method vs lightly's MAE and a plain timm ViT, in one process
bench: $(STAMP)
	$(PY) -c "import lightly" 2>/dev/null || $(PY) -m pip install --quiet lightly
	$(PY) -m bench $(BENCH_ARGS)

# the streaming loader (engine.stream) vs MAE's torchvision loader at 1, 2 and all workers, the
# decode-only ceiling, peak RSS at 10x the images, on JPEGs it makes (bench/data_results.json)
bench-data: $(STAMP)
	$(PY) -m bench.data $(BENCH_DATA_ARGS)

# the prepared GPU check (scripts/gpu_check.py): smoke suite, every method's step (bf16, MFU),
# MAE ViT-B/16 224 px eager/compiled/lightly, a gpu-profile MAE pre-train + fine-tune beside
# the from-scratch baseline; outputs/gpu_check/summary.{json,md}. Without CUDA: the same steps
# at micro size on the CPU. It uses .venv when there is one and never builds it (a GPU lease
# is minutes; mmcv's build alone is longer): elsewhere, any python with the requirements.
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

smoke: $(STAMP)
	$(PY) -m suites.run $(SUITE) --profile smoke
