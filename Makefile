# Everything installs itself into .venv on first use. The CPU torch is pinned and installed
# first: an open torch range with no torch present pulls a multi-GB CUDA build. constraints.txt
# pins the versions the suite was run with, which also spares pip a long resolution.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# PyPI's Linux torch wheel is the CUDA build. For the CPU build elsewhere:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
DATA ?= ../shared/data/debian-minilm
DEMO_OUT ?= runs/demo

.PHONY: install test test-faults demo bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "install: $(TORCH) from $(if $(TORCH_INDEX),$(TORCH_INDEX),PyPI (its Linux wheel is the CUDA build, several GB, unless a CPU build is cached); for the CPU build: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu)"
	$(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c constraints.txt -e ".[cpu,dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -ra --durations=15 tests

test-faults: install
	$(PY) -m pytest -q -ra -m faults tests

lint: install
	$(VENV)/bin/ruff check pipeline jobs infra tests bench

# The demo: the shared data (or DATA=folder of the same layout) goes onto a local S3 endpoint
# (127.0.0.1), the job runs on a local Ray cluster, and the published index and report are
# copied to $(DEMO_OUT). Ray's and faiss's own messages go to $(DEMO_OUT).log. A clone without
# the shared data runs the same job on a seeded synthetic clustered set instead, says so, and
# copies it to $(DEMO_OUT)-synthetic: its figures show that the pipeline runs, not its gains.
DEMO_SYNTHETIC ?= --synthetic 30000 --dim 64
demo: install
	@if [ -f "$(DATA)/corpus.npy" ]; then \
	  src="--source $(DATA)"; prefix=s3://demo/debian-minilm; out="$(DEMO_OUT)"; \
	else \
	  echo "demo: no shared data at $(DATA) (corpus.npy, queries.npy, train_query_ids.npy,"; \
	  echo "demo: eval_query_ids.npy); running on a SYNTHETIC clustered set instead"; \
	  echo "demo: ($(DEMO_SYNTHETIC)). For real data: make demo DATA=folder"; \
	  src="$(DEMO_SYNTHETIC)"; prefix=s3://demo/synthetic; out="$(DEMO_OUT)-synthetic"; \
	fi; \
	$(PY) infra/local_s3.py --bucket demo -- sh -c "\
	  $(PY) jobs/prepare_data.py $$src --out $$prefix && \
	  $(PY) jobs/distill.py --config demo --output s3://demo/runs/demo \
	    --set data.corpus=$$prefix/corpus --set data.train_queries=$$prefix/train_queries \
	    --set eval.queries=$$prefix/eval_queries --set eval.labels=$$prefix/labels \
	    --log $$out.log && \
	  $(PY) jobs/copy_run.py s3://demo/runs/demo $$out" && \
	echo "demo: the published version is in $$out; open $$out/versions/*/report.html"

bench: install
	$(PY) bench/quality.py --json runs/bench/quality.json

clean:
	rm -rf $(VENV) runs
