# gsq developer targets. `make demo` and `make test` each install the package first.
PY ?= python3
TEXT ?= ../shared/data/wikitext2-test.raw

.PHONY: install demo test quality

# llama-cpp-python (a dev/verify dependency, the real llama.cpp client for GGUF checks) compiles
# llama.cpp from its sdist; its multimodal library is not needed.
install:
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
		$(PY) -m pip install --quiet -e ".[dev]"

demo: install
	$(PY) -m gsq.cli demo --bits 2 --group-size 64 --text $(TEXT)

test: install
	$(PY) -m pytest -q

quality:
	ruff check src tests benchmarks
