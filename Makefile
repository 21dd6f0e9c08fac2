# Two commands do everything on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is pinned in pyproject.toml: on this CPU machine pip takes the wheel on disk; on a CUDA
# box the same pin takes the CUDA build.

.PHONY: install run test test-suite test-browser test-gpu test-deploy lint docs bench demo-model clean

$(BIN)/imagen: pyproject.toml requirements-no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r requirements-no-deps.txt
	@touch $@

install: $(BIN)/imagen

run: install
	$(BIN)/imagen serve

# Everything, as CI runs it: lint, types, the docs build and every test (the real pipelines and the web page
# in chromium included). Tests run in parallel: most of them wait on processes (servers, workers, Redis), not
# on the CPU. Pick a part by what it needs with MARK, e.g. `make test MARK="not browser"`. One torch thread per
# process: four test workers and the servers and workers they start, each with a thread per core, would
# spin against each other on two cores (the suite took a quarter more CPU that way).
PYTEST_WORKERS ?= 4
MARK ?=
# Lint, types and the docs build run beside the tests (mypy alone takes a core for a minute on a clean checkout,
# while the tests leave about a third of a core idle); each one's output is printed whole when it ends.
test: install
	@$(MAKE) --no-print-directory -j3 --output-sync=target lint docs test-suite

test-suite: install
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(if $(MARK),-m "$(MARK)")

# The web page in a real browser (Debian's /usr/bin/chromium) alone.
test-browser: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m browser

# On a CUDA box: the paths only a GPU runs (tests/test_gpu.py; skipped, so passing, without one).
test-gpu: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu

# The Dockerfile built and compose.yaml's cluster (api, two workers, redis) run for real with Podman, on a local
# Debian base instead of the CUDA one: a job's PNG comes back, a worker killed mid-job loses nothing
# (deploy/check_cluster.py; needs root, podman, runc, debootstrap). Not part of `make test`; .ci/run runs it
# after it.
test-deploy: install
	$(BIN)/python deploy/check_cluster.py

lint: install
	$(BIN)/ruff check imagen tests bench training deploy docs_hooks.py
	$(BIN)/mypy
	$(BIN)/mypy bench

# The manual (docs/) as a site in build/site; --strict: a broken link or anchor fails. Preview: .venv/bin/mkdocs serve
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The CPU benchmarks (a few minutes on 2 cores), then one summary table; what each measures: bench/README.md
bench: install
	$(BIN)/python bench/run_cpu_set.py

# Retrain the shipped demo model from its seed (about 105-110 min on 2 CPU cores) with training/ (kept out of
# the package, like diffusers' examples/) and put it in the package:
# imagen/data/demo gets model/ (without tokenizers: the shared CLIP vocabulary), loras/, ip-adapter/, controlnet/
# and training.json; the contact sheet stays in build/demo-model.
demo-model: install
	$(BIN)/python -m training.train_demo build/demo-model
	$(BIN)/python -m training.train_embedding build/demo-model/embeddings --model build/demo-model/model --record build/demo-model/training.json
	rm -rf imagen/data/demo && mkdir -p imagen/data/demo
	cp -r build/demo-model/model build/demo-model/loras build/demo-model/ip-adapter build/demo-model/controlnet build/demo-model/embeddings build/demo-model/training.json imagen/data/demo/
	rm -rf imagen/data/demo/model/tokenizer imagen/data/demo/model/tokenizer_2

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
