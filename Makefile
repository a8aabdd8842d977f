# Quick start: `make demo` (trains the example) and `make test` (the whole suite). Both set everything up themselves.
# torch comes from TORCH_SPEC; the default is the CPU build this project's CI machines carry. On a GPU machine:
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-gpu clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) $(TORCH_SPEC)
	# DeepSpeed ships as a source archive whose build imports torch: build it against the torch installed above
	# (build isolation would pull a second, multi-GB torch into the build environment).
	$(PIP) --no-build-isolation -c constraints.txt deepspeed
	$(PIP) -c constraints.txt -e ".[test,examples,hf]"
	-@[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s libaio-dev >/dev/null 2>&1 \
		&& (apt-get install -y -qq libaio-dev >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libaio-dev >/dev/null 2>&1)) \
		|| true
	# Build DeepSpeed's CPU ops once now (cached in the torch extensions folder) rather than inside the first test that
	# needs them: shared-memory collectives, CPU Adam (optimizer offload), async I/O (NVMe; where libaio is installed).
	-DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder; \
		[b(n).load() for n in ('ShareMemCommBuilder', 'CPUAdamBuilder') + (('AsyncIOBuilder',) \
		if b('AsyncIOBuilder').is_compatible() else ())]" >/dev/null 2>&1
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/train.py

test: install
	DS_ACCELERATOR=cpu $(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	DS_ACCELERATOR=cpu $(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest tests/gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
