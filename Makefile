# gsq developer targets. `make demo` and `make test` each install the package first.
PY ?= python3
TEXT ?= ../shared/data/wikitext2-test.raw

.PHONY: install demo demo-full test quality

# llama-cpp-python (a dev/verify dependency, the real llama.cpp client for GGUF checks) compiles
# llama.cpp from its sdist; its multimodal library is not needed.
# An earlier install of this project under the distribution name "gsq" (now gsq-quant; "gsq" on
# the package index is another project) would shadow the import path: it is removed first.
install:
	$(PY) -m pip uninstall --quiet --yes gsq 2>/dev/null || true
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
		$(PY) -m pip install --quiet -e ".[dev]"

# The quick demo (under 10 minutes on 2 CPU cores) and the full one (the cpu preset, about an hour).
demo: install
	$(PY) -m gsq.cli demo --text $(TEXT)

demo-full: install
	$(PY) -m gsq.cli demo --budget full --text $(TEXT)

test: install
	$(PY) -m pytest -q

quality:
	ruff check src tests benchmarks
