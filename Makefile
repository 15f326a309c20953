# Every target installs what it needs into .venv first; `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline by default: nothing here needs a network once the packages are installed.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install demo test test-fast lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv with the pinned packages

# Overrides for every step of `demo`, e.g. `make demo ARGS=trainer=gpu` (bf16 on one GPU) or `ARGS=seed=1`.
ARGS ?=

demo: install  ## the main job: build the miniature world, align, finetune, evaluate (ARGS=overrides)
	$(PY) -m llava_lit.world.demo $(ARGS)

test: install  ## every test CI runs (slow ones included, GPU ones skip without a GPU)
	$(VENV)/bin/pytest -q

test-fast: install  ## the quick loop: skips tests marked slow
	$(VENV)/bin/pytest -q -m "not slow"

lint: install  ## ruff lint + format check + import contracts (pyproject's [tool.importlinter])
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: install  ## data-pipeline and stage-2 step benchmarks (print numbers; the step one builds the world if missing)
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train_step.py

clean:  ## remove run outputs and caches (keeps .venv and the built world)
	rm -rf outputs .pytest_cache .ruff_cache
