# mimbench: `make test` and `make report` are all a fresh machine needs.
# Both run `make setup` first when .venv is missing or older than its recipe.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
SUITE  ?= ablation_masking
PROFILE ?= cpu

.PHONY: setup test report smoke bench

setup: $(STAMP)

$(STAMP): scripts/setup.sh requirements.txt pyproject.toml
	bash scripts/setup.sh
	touch $(STAMP)

# PYTEST_ARGS narrows the run (e.g. PYTEST_ARGS="-k masking"); an empty selection
# (pytest exit code 5) is reported, not treated as a failure
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# the default suite on the shipped CIFAR-10 (finished runs are skipped), then the report;
# SEEDS=1 ONLY=mae,none narrow the grid (e.g. `make report SEEDS=1 ONLY=mae,pixel,none`)
report: $(STAMP)
	$(PY) -m suites.run $(SUITE) --profile $(PROFILE) $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(ONLY),--only $(ONLY)); rc=$$?; \
	$(PY) -m reports.build; exit $$rc

# throughput of every method vs lightly's MAE and a plain timm ViT, in one process
bench: $(STAMP)
	$(PY) -c "import lightly" 2>/dev/null || $(PY) -m pip install --quiet lightly
	$(PY) -m bench $(BENCH_ARGS)

smoke: $(STAMP)
	$(PY) -m suites.run $(SUITE) --profile smoke
