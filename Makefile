# cologen: every target sets itself up (virtual environment, data) on a fresh machine.
#
#   make stage1 / stage2 / stage3   the three curriculum stages (tiny preset; PRESET=flux_dev for FLUX.1-dev)
#   make test                       the test suite
#   make base                       retrain the tiny base model (about 1.8 h on 2 cores; a trained one is committed)
#   make base-gpu                   the same base with ~24 times the samples, on one GPU
#   make bench / bench-gpu          benchmarks (ratios against baselines run in the same process)
#   make bench-docs                 the docs' CPU benchmark figures from make bench's results file
#   make ablation / sweep / report  the tiny ablation, the gate-temperature sweep, the README's results tables
#                                   (TABLES="ablation sweep": only those; the others stay as the README has them)
#   make examples                   the README's figure of the predict examples (CKPT=... picks the checkpoint)
#   make demo                       try a model in the browser (default: the committed tiny experts; MODEL=...)
#   make tiny-experts               package stage 3's experts as the ones committed for the demo
#
# GPU users: make install TORCH="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128 (your CUDA version)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
COLOGEN := $(VENV)/bin/cologen
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
PRESET ?= tiny
CFG := experiments/$(PRESET)
RUNS := runs/$(PRESET)
ARGS ?=
# flux_dev: the local FLUX.1-dev folder and a strategy config (ddp or fsdp; empty = one GPU)
FLUX_PATH ?= models/FLUX.1-dev
STRATEGY ?=
# the configs of stage N: curriculum, the stage's data (flux_dev), the stage, the strategy, the FLUX path
stage_configs = --config $(CFG)/curriculum.yaml $(if $(wildcard $(CFG)/data_stage$(1).yaml),--config $(CFG)/data_stage$(1).yaml) \
	--config $(CFG)/stage$(1).yaml $(if $(STRATEGY),--config $(CFG)/$(STRATEGY).yaml) \
	$(if $(filter flux_dev,$(PRESET)),--model.preset.init_args.path $(FLUX_PATH))

.PHONY: install test lint data check-flux base base-continue base-gpu gate-encoder gate-referrer stage1 stage2 stage3 cotrain no_pretrain multi-condition bench bench-docs sweep ablation report bench-gpu examples demo tiny-experts

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: install
	$(VENV)/bin/ruff check cologen data_recipes tests benchmarks tools

# ShapeWorld shards for the tiny preset (seconds; skipped when already there). flux_dev reads the shard folders
# written by data_recipes (see docs/data.md).
data: install
ifeq ($(PRESET),tiny)
	$(PY) -m data_recipes.shapeworld --out data/shapeworld --if-missing
endif

base: install
	$(PY) -m data_recipes.shapeworld --out data/shapeworld_base --train 20000 --val 64 --tasks inpainting --seed 1 --if-missing
	$(COLOGEN) fit --config experiments/tiny/curriculum.yaml --config experiments/tiny/base.yaml $(ARGS)
	$(PY) -m cologen.commands.save_base runs/tiny/base/last.ckpt cologen/assets/tiny_base

# more pretraining for the committed base (10,000 steps from its weights; ~50-65 min on 2 AVX-512 cores). The committed
# base is make base followed by one make base-continue (its config.json's provenance says so).
base-continue: install
	$(PY) -m data_recipes.shapeworld --out data/shapeworld_base --train 20000 --val 64 --tasks inpainting --seed 1 --if-missing
	$(COLOGEN) fit --config experiments/tiny/curriculum.yaml --config experiments/tiny/base.yaml --config experiments/tiny/base_continue.yaml $(ARGS)
	$(PY) -m cologen.commands.save_base runs/tiny/base_continue/last.ckpt cologen/assets/tiny_base

# the same base on one GPU with about 24 times make base's samples, over 400,000 scenes of its own
# (experiments/tiny/base_gpu.yaml). The committed curriculum results and demo experts were trained on the base before
# it: rerun make stage1 stage2 stage3, make tiny-experts and make ablation after replacing it.
base-gpu: install
	$(PY) -m data_recipes.shapeworld --out data/shapeworld_base_large --train 400000 --val 64 --tasks inpainting --seed 1 --if-missing
	$(COLOGEN) fit --config experiments/tiny/curriculum.yaml --config experiments/tiny/base.yaml --config experiments/tiny/base_gpu.yaml $(ARGS)
	$(PY) -m cologen.commands.save_base runs/tiny/base_gpu/last.ckpt cologen/assets/tiny_base

# the frozen encoder the tiny preset's image-reading prompt gates can share (prw.gate_image_encoder: builtin), pretrained
# on make base's scenes to tell each token's object class, size and colour (~4 min on 2 cores)
gate-encoder: install
	$(PY) -m data_recipes.shapeworld --out data/shapeworld_base --train 20000 --val 64 --tasks inpainting --seed 1 --if-missing
	$(PY) -m cologen.commands.pretrain_gate_encoder --out cologen/assets/tiny_gate_encoder $(ARGS)

# the frozen map of where a prompt changes its condition that the tiny preset's prompt gates can read
# (prw.gate_referrer: builtin), pretrained on grounding's training examples and the committed gate encoder's features
# (~2 min on 2 cores); rerun it after make gate-encoder
gate-referrer: data
	$(PY) -m cologen.commands.pretrain_gate_referrer --out cologen/assets/tiny_gate_referrer $(ARGS)

# flux_dev: a FLUX_PATH that is not a FLUX.1 folder is refused before anything starts (one line, no traceback)
FLUX_FOLDER := model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/
check-flux:
ifeq ($(PRESET),flux_dev)
	$(if $(wildcard $(FLUX_PATH)/model_index.json),,$(error FLUX_PATH=$(FLUX_PATH) is not a FLUX.1 diffusers folder: set FLUX_PATH=/path/to/FLUX.1-dev, a folder with $(FLUX_FOLDER)))
endif

stage1: check-flux data
	$(COLOGEN) fit $(call stage_configs,1) $(ARGS)

stage2: check-flux data
	@test -f $(RUNS)/stage1/last.ckpt || { echo "$(RUNS)/stage1/last.ckpt is missing: run 'make stage1$(if $(filter-out tiny,$(PRESET)), PRESET=$(PRESET))' first"; exit 1; }
	$(COLOGEN) fit $(call stage_configs,2) $(ARGS)

stage3: check-flux data
	@test -f $(RUNS)/stage2/last.ckpt || { echo "$(RUNS)/stage2/last.ckpt is missing: run 'make stage2$(if $(filter-out tiny,$(PRESET)), PRESET=$(PRESET))' first"; exit 1; }
	$(COLOGEN) fit $(call stage_configs,3) $(ARGS)

bench: data
	$(PY) -m benchmarks.run_all $(ARGS)

# The README's, docs/data.md's and docs/logging.md's CPU figures from `make bench`'s results file (committed as
# docs/results/bench_cpu.json).
bench-docs: install
	$(PY) -m benchmarks.docs --results runs/bench/results.json

# Ablation baselines on the tiny preset, same step budget as the curriculum (docs/ablation in the README).
cotrain: data
	$(COLOGEN) fit --config $(CFG)/curriculum.yaml --config $(CFG)/cotrain.yaml $(ARGS)

no_pretrain: data
	$(COLOGEN) fit --config $(CFG)/curriculum.yaml --config $(CFG)/no_pretrain.yaml $(ARGS)

# The tiny curriculum plus a sixth step on a two-condition task (docs/multi_condition.md), in one fit.
multi-condition: data
	$(COLOGEN) fit --config $(CFG)/curriculum.yaml --config $(CFG)/multi_condition.yaml $(ARGS)

# W&B sweep over the router temperature and rho (local W&B sweep engine when no server is reachable): a table and
# a plot of the control step's SSIM and the routing statistics per trial in runs/sweeps/gate_temperature/.
SWEEP_REPORT := val_metrics/inpainting/psnr_out val_routing/control/expert1 val_routing/control/own_expert \
	val_routing/inpainting/own_expert val/routing_entropy
sweep: data
	$(PY) -m cologen.sweep experiments/sweeps/gate_temperature.yaml --report $(SWEEP_REPORT) $(SWEEP_ARGS)

# The tiny ablation (docs/ablation.md): every variant x seed on the curriculum's budget; resumable, finished runs
# are skipped. SEEDS="0" CONFIGS="curriculum cotrain" select a subset. Each finished run leaves a record in
# docs/ablation_runs/ (commit it): the table is built from the records, so runs from several machines add up.
ablation: data
	$(PY) -m cologen.ablation experiments/ablation/tiny.yaml $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(CONFIGS),--configs $(CONFIGS))

# The README's results tables from the runs' files (make stage1 stage2 stage3, make ablation).
report: data
	$(PY) -m cologen.report $(if $(TABLES),--tables $(TABLES))

# examples/results.png: examples/requests.jsonl through `cologen predict` with CKPT (default: stage 3's last.ckpt when
# there is one, else the committed base alone), shown in the README.
CKPT ?= $(wildcard runs/tiny/stage3/last.ckpt)
examples: install
	$(PY) examples/make_examples.py figure $(if $(CKPT),--ckpt $(CKPT))

# GPU benchmark (FLUX.1-dev-sized model, PRW with 5 experts of rank 128); ARGS=--tiny runs the same code on the CPU.
bench-gpu: install
	$(PY) -m benchmarks.bench_gpu $(ARGS)

# The Gradio demo on http://127.0.0.1:7860 (MODEL: a checkpoint or an exported folder; default the committed tiny
# experts, so it works on a fresh clone).
MODEL ?=
demo: install
	$(COLOGEN) demo $(MODEL) $(ARGS)

# cologen/assets/tiny_experts: stage 3's final experts as float16 adapters with their sha256 and the ShapeWorld
# examples (what `make demo` serves before any training).
tiny-experts: install
	@test -f runs/tiny/stage3/last.ckpt || { echo "runs/tiny/stage3/last.ckpt is missing: run 'make stage1 stage2 stage3' first"; exit 1; }
	$(PY) -m cologen.commands.save_experts runs/tiny/stage3/last.ckpt cologen/assets/tiny_experts
