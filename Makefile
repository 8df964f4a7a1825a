# The README's two promises: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# torch first and pinned: a CPU wheel is installed before anything that depends on torch, so that
# nothing resolves a newer (CUDA) build.
TORCH  ?= torch==2.13.0

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash demo/run.sh

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/convert_bench.py
	$(PY) benchmarks/archive_bench.py
	$(PY) benchmarks/reshard_bench.py
	$(PY) benchmarks/save_bench.py
	$(PY) benchmarks/dcp_bench.py
	$(PY) benchmarks/torch_dist_bench.py
	$(PY) benchmarks/clip_bench.py
	$(PY) benchmarks/s3_bench.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .hypothesis
