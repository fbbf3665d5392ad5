# The two commands a user needs: `make demo` and `make test`. Both install what they need
# into .venv, idempotently (a stamp file re-runs the install only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build is chosen here, before anything else can pull one: the CPU wheel on this
# reference machine; on a GPU node run e.g. `make TORCH_SPEC="torch==2.13.0 --index-url ..."`
# or pre-install torch in the venv (a satisfied range installs nothing more).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
NPROC ?= 2
SHARDS := data/synth/shard-000007.tar

.PHONY: install demo quality video test test-fast clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(SHARDS): | $(STAMP)
	$(VENV)/bin/scaletrain data synth --out data/synth --num-samples 1024 --per-shard 128 --resolution 64 --seed 0

# The demo starts fresh each time (checkpoint.resume=never); a plain torchrun of the same
# recipe would resume from runs/demo's latest checkpoint instead.
demo: $(STAMP) $(SHARDS)
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launchers/pretrain.py --config configs/demo.yaml \
		--set checkpoint.resume=never $(ARGS)

# The longer CPU recipe that shows what the shards teach (docs/quickstart.md, "Sample quality"). One process
# by default: on the 2-core reference machine one rank with 2 threads trains unet-small ~1.7x
# faster than 2 ranks of 1 thread (which spend the difference in gloo all-reduces).
QUALITY_NPROC ?= 1
quality: $(STAMP) $(SHARDS)
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(QUALITY_NPROC) launchers/pretrain.py --config configs/quality.yaml \
		--set checkpoint.resume=never $(ARGS)

# Text-to-video on CPU (configs/video.yaml): wan-tiny, images -> 5-frame clips mixed with images
# -> 9-frame clips, on synthetic clips of moving shapes (docs/data.md, "Video").
VIDEO_SHARDS := data/synth-video/shard-000007.tar
$(VIDEO_SHARDS): | $(STAMP)
	$(VENV)/bin/scaletrain data synth --video --out data/synth-video --num-samples 256 --per-shard 32 --resolution 32 \
		--frames 16 --fps 8 --seed 0

video: $(STAMP) $(SHARDS) $(VIDEO_SHARDS)
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launchers/pretrain.py --config configs/video.yaml \
		--set checkpoint.resume=never $(ARGS)

# Every tier (CI runs this); the 30 slowest tests are listed so each log shows where the time goes,
# and the last line is the skip count (CI must show 0). The docs site is built first, strictly (a
# broken link fails), its log shown only on failure: `mkdocs -q` would hide the warnings that
# --strict counts (mkdocs issue 4126), so the output is held back here instead.
test: $(STAMP)
	@out=$$(NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict 2>&1) || { echo "$$out"; echo "mkdocs build --strict failed"; exit 1; }
	$(PY) -m pytest -q tests --durations=30 $(PYTEST_ARGS)

# The developers' loop (not CI): the unit tier plus one short run per engine (tests marked fast).
test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "unit or fast" --durations=10 $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/demo data/synth runs/video data/synth-video
