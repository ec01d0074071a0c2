# gsq developer targets. `make demo` and `make test` each install the package first.
PY ?= python3
TEXT ?= ../shared/data/wikitext2-test.raw

.PHONY: install demo test quality

install:
	$(PY) -m pip install --quiet -e ".[dev]"

demo: install
	$(PY) -m gsq.cli demo --bits 2 --group-size 64 --text $(TEXT)

test: install
	$(PY) -m pytest -q

quality:
	ruff check src tests benchmarks
