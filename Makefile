# tinymind: `make demo` runs the whole pipeline on a CPU in minutes, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := --config configs/tiny.json --out_dir output/demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: setup
	$(PY) -m scripts.prepare_data --max_chars 3000000 --max_sft 20000
	rm -rf output/demo
	$(PY) 1-pretrain.py $(DEMO)
	$(PY) 2-sft.py $(DEMO)
	$(PY) 3-eval.py $(DEMO) --ppl_data data/pretrain_val.jsonl
	$(PY) 3-eval.py $(DEMO) --temperature 0 --max_new_tokens 80 --prompts_file scripts/demo_prompts.txt

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) -m scripts.bench

clean:
	rm -rf output/*_dense output/*_moe output/demo
