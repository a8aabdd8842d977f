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
# DeepSpeed JIT-builds its CPU ops into TORCH_EXTENSIONS_DIR. Each venv gets its own folder: ops built against another
# venv's torch are rebuilt anyway, and a build killed half-way leaves a `lock` file behind on which every later build
# of that op waits forever (torch's FileBaton), so a shared ~/.cache/torch_extensions can hang a fresh clone's install.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# `make test-compat`: the lowest versions of the declared ranges (constraints-lowest.txt) in a venv of their own.
# torch 2.11, the range's lowest, comes from PyPI (a CUDA build, about 5 GB installed; it runs on the CPU too).
COMPAT_VENV ?= .venv-compat
TORCH_COMPAT_SPEC ?= torch==2.11.0
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_PIP := $(COMPAT_PY) -m pip install -q --disable-pip-version-check
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TESTS ?= tests/unit tests/distributed/test_parity.py \
	tests/distributed/test_resume.py::test_resume_two_processes_on_one \
	tests/distributed/test_multi_engine.py::test_gan_parity_with_plain_pytorch

.PHONY: install demo test test-unit test-gpu test-compat clean

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
	# needs them: shared-memory collectives, CPU Adam (optimizer offload), fused Adam (the config's optimizer block),
	# pinned memory, async I/O (NVMe; where libaio is installed). Locks left by a killed earlier install are removed first
	# (nothing else builds into this venv's folder while it installs); the timeout turns any other hang into a rebuild
	# inside the first test that needs the op.
	-find $(TORCH_EXTENSIONS_DIR) -name lock -type f -delete 2>/dev/null || true
	-DS_ACCELERATOR=cpu timeout 1200 $(PY) -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder; \
		[b(n).load() for n in ('ShareMemCommBuilder', 'CPUAdamBuilder', 'FusedAdamBuilder', 'PinMemoryBuilder') \
		+ (('AsyncIOBuilder',) \
		if b('AsyncIOBuilder').is_compatible() else ())]" >/dev/null 2>&1
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/train.py

test: install
	DS_ACCELERATOR=cpu $(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	DS_ACCELERATOR=cpu $(PY) -m pytest tests/unit $(PYTEST_ARGS)

$(COMPAT_STAMP): pyproject.toml constraints-lowest.txt Makefile
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PIP) --upgrade pip setuptools wheel
	$(COMPAT_PIP) $(TORCH_COMPAT_SPEC)
	$(COMPAT_PIP) --no-build-isolation -c constraints-lowest.txt deepspeed
	$(COMPAT_PIP) -c constraints-lowest.txt -e ".[test,hf]"
	touch $(COMPAT_STAMP)

# unit and contract tests plus parity at stages 0-3, resume on another world size and a GAN, at the lowest versions;
# DeepSpeed's JIT ops get their own cache (they are built from that DeepSpeed's sources)
test-compat: $(COMPAT_STAMP)
	DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(abspath $(COMPAT_VENV))/torch_extensions \
		$(COMPAT_PY) -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest tests/gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache
