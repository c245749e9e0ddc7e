# The two commands a newcomer needs: `make demo` and `make test`. Each first runs the one
# idempotent set-up step (scripts/setup.sh), so a fresh machine needs nothing else.
DURATION ?= 60
PY := .venv/bin/python

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m flowtel.cli demo --duration $(DURATION)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(BENCH)

clean:
	rm -rf .venv build *.egg-info
