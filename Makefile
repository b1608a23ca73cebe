# Two commands, each doing all of its set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdiqa-installed

.PHONY: demo test test-onnxruntime-gpu install lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdiqa-edge demo --out runs/demo

# Two pytest-xdist workers, a file's tests in one of them: the suite is mostly single-threaded Python (imports,
# exports, subprocesses), so two workers on two cores take about 60% of the sequential time (13.5 -> 8 min here).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The provider and FP16 tests again on onnxruntime-gpu (what GPU users install; it lists CUDA and TensorRT
# here too, where they cannot start), from a side folder put first on PYTHONPATH. A 256 MB download.
ORT_GPU ?= onnxruntime-gpu==1.31.1
test-onnxruntime-gpu: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target .ort-gpu '$(ORT_GPU)'
	PYTHONPATH=$(CURDIR)/.ort-gpu $(PY) -c "import onnxruntime as o, sys; \
	  sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 'not the GPU build: ' + o.__file__)"
	PYTHONPATH=$(CURDIR)/.ort-gpu $(PY) -m pytest -q tests/test_runtime.py tests/test_providers.py tests/test_export.py \
	  tests/test_export_auto.py -k "provider or fp16 or twin or accelerator or running or reason or builds"

lint: $(STAMP)
	$(VENV)/bin/ruff check kdiqa_edge tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache .ort-gpu
