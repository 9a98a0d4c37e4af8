# tinymind: `make demo` runs the whole pipeline on a CPU in under an hour, `make test` runs the test suite
# (`make test-fast` its unit tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := --config configs/tiny.json --out_dir output/demo
# SFT, LoRA and distillation tune this 1.6M model with AdamW at lr 2e-3, above their default of 5e-4 for larger ones.
TUNE := --learning_rate 2e-3
STUDENT := --hidden_size 64 --num_hidden_layers 2 --num_attention_heads 4 --max_steps 600
# A second SFT pass on the calculator chats alone: after the mixed SFT the model calls the calculator but miscopies
# the numbers into its calls and its answers (none of the 100 held-out questions right with the tool); after it, 0.81.
TOOLS := --config configs/tiny.json --out_dir output/demo/tools --init_from output/demo/sft_dense/sft_128.pth \
	--data_path data/tools.jsonl --val_data data/tools_val.jsonl --max_seq_len 512 --learning_rate 1e-3
# Agentic GRPO: the tool-tuned model answers arithmetic beyond it by calling the calculator; the reward reads its
# final answer.
AGENT := --config configs/tiny.json --out_dir output/demo/agent --init_from output/demo/tools/sft_dense/sft_128.pth \
	--data_path data/agent.jsonl --val_data data/agent_val.jsonl --tools calculator --max_seq_len 512 \
	--max_new_tokens 80 --batch_size 8 --temperature 0.7 --learning_rate 3e-5 --max_steps 40 --eval_interval 20 \
	--log_interval 1

.PHONY: setup demo demo-seeds test test-fast gpu-check test-browser test-llama-cpp test-ollama bench bench-learning bench-nanochat bench-data bench-stages bench-serve serve clean

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
	$(PY) 2-sft.py $(DEMO) $(TUNE) --max_seq_len 512
	$(PY) 3-eval.py $(DEMO) --ppl_data data/pretrain_val.jsonl
	$(PY) 3-eval.py $(DEMO) --temperature 0 --max_new_tokens 80 --prompts_file scripts/demo_prompts.txt
	$(PY) 3-eval.py $(DEMO) --max_seq_len 512 --temperature 0 --max_new_tokens 80 --tools calculator \
		--prompt "计算：348 + 719 等于多少？"
	$(PY) 2-sft.py $(TOOLS)
	$(PY) 3-eval.py $(DEMO) --checkpoint output/demo/tools/sft_dense/sft_128.pth --max_seq_len 512 --temperature 0 \
		--max_new_tokens 80 --tools calculator --prompt "计算：348 + 719 等于多少？"
	$(PY) 4-lora.py $(DEMO) $(TUNE)
	$(PY) 3-eval.py $(DEMO) --temperature 0 --max_new_tokens 40 --prompts_file scripts/lora_prompts.txt
	$(PY) 3-eval.py $(DEMO) --temperature 0 --max_new_tokens 40 --prompts_file scripts/lora_prompts.txt \
		--lora output/demo/lora_dense/lora_128
	$(PY) 5-dpo.py $(DEMO) --learning_rate 1e-4 --max_steps 150
	$(PY) 6-grpo.py $(DEMO) --batch_size 8 --learning_rate 3e-5 --max_steps 80 --max_new_tokens 16 --log_interval 1 \
		--eval_interval 20
	$(PY) -m scripts.plot_logs output/demo/grpo_dense/grpo_128_log.csv --out docs/grpo_demo.png
	$(PY) 6-grpo.py $(AGENT)
	$(PY) 7-distill.py $(DEMO) $(TUNE) $(STUDENT) --teacher output/demo/sft_dense/sft_128.pth
	$(PY) 7-distill.py $(DEMO) $(TUNE) $(STUDENT) --teacher output/demo/sft_dense/sft_128.pth --alpha 0 \
		--out_dir output/demo/ce_only
	$(PY) -m scripts.report_card --out_dir output/demo

# The demo's reinforcement learning again with two more seeds (1 and 2 beside the demo's 42): every RL figure in the
# README is the mean and spread of these three runs. Needs make demo first.
demo-seeds: setup
	for seed in 1 2; do \
		$(PY) 6-grpo.py $(DEMO) --out_dir output/demo/seed$$seed --init_from output/demo/sft_dense/sft_128.pth \
			--seed $$seed --batch_size 8 --learning_rate 3e-5 --max_steps 80 --max_new_tokens 16 --log_interval 1 \
			--eval_interval 20 || exit 1; \
		$(PY) 6-grpo.py $(AGENT) --out_dir output/demo/seed$$seed/agent --seed $$seed || exit 1; \
	done
	$(PY) -m scripts.seed_spread output/demo/grpo_dense output/demo/seed1/grpo_dense output/demo/seed2/grpo_dense
	$(PY) -m scripts.seed_spread output/demo/agent/grpo_dense output/demo/seed1/agent/grpo_dense \
		output/demo/seed2/agent/grpo_dense --tool_task output/demo/tools/sft_dense/sft_128.pth

# Tests run in two processes (pytest-xdist) of one thread each: most of a test's time is Python and tiny
# tensors, which one core does as well as two.
TEST := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=10 tests

test: setup
	$(TEST)

# The unit tests alone (one to two minutes on 2 cores): every test that runs no stage script, torchrun or server.
test-fast: setup
	$(TEST) -m "not slow"

# The chat page's test in a real headless browser: Debian's chromium and its driver, selenium from PyPI.
test-browser: setup
	apt-get install -y -q chromium chromium-driver || sudo apt-get install -y -q chromium chromium-driver
	$(PY) -m pip install --quiet selenium==4.36.0
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_chat_page.py

# GGUF files in llama.cpp itself: llama-cpp-python builds llama.cpp from the source in its package (cmake and a
# C++ compiler from Debian; about 5.5 minutes on 2 cores).
test-llama-cpp: setup
	$(PY) -m pip install --quiet llama-cpp-python==0.3.36
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_gguf.py

# The Modelfile's template rendered as ollama renders it (tests/ollama/render.go, run with Debian's Go) against
# tinymind's own rendering of the same chats, tools and thinking included.
test-ollama: setup
	(apt-get update -q && apt-get install -y -q golang-go) || (sudo apt-get update -q && sudo apt-get install -y -q golang-go)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_gguf.py -k ollama

# On a machine with a GPU: the training, loss and decoding figures of scripts/gpu_check.py in one table.
gpu-check: setup
	$(PY) -m scripts.gpu_check

bench: setup
	$(PY) -m scripts.bench

bench-learning: setup
	$(PY) -m scripts.bench_learning --out docs/learning.png

# tinymind's recipes against nanochat's, on English-heavy text with a tokenizer fitted to it (README)
bench-nanochat: setup
	$(PY) -m scripts.prepare_data --sources shakespeare,reviews --out_dir data/prose
	$(PY) -m scripts.bench_learning --data data/prose/pretrain.jsonl --val data/prose/pretrain_val.jsonl \
		--fit_tokenizer --reference nanochat --budget 100 --repeats 1 --out docs/learning_nanochat.png \
		--calibration_steps 32 --recipes nanochat nanochat_no_softcap default default@50 warm_start

bench-data: setup
	$(PY) -m scripts.bench_data --size_gb 2

bench-stages: setup
	$(PY) -m scripts.bench_stages --config configs/tiny.json --checkpoint output/demo/sft_dense/sft_128.pth

bench-serve: setup
	$(PY) -m scripts.bench_serve --config configs/small.json

serve: setup
	$(PY) -m scripts.serve --config configs/tiny.json --checkpoint output/demo/sft_dense/sft_128.pth

clean:
	rm -rf output/*_dense output/*_moe output/demo
