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
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test test-fast test-slow demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/fix_torchvision.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -c "import torch; v = torch.__version__.split('+')[0]; print(f'torch=={v}')" > $(VENV)/constraints.txt
	echo "torchvision==0.28.0" >> $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(PY) -m pip install -q -e '.[dev,imagen]'
	$(PY) scripts/fix_torchvision.py
	touch $@

# Fast suite, then the slow end-to-end tests; both must pass.
test: setup
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=10
	$(PY) -m pytest -q -m slow --durations=10 || [ $$? -eq 5 ]

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

demo: setup
	$(VENV)/bin/unclip demo --out runs/demo

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs data wandb lightning_logs
