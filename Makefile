# The Makefile is the project's interface: the README's commands and .ci/run call these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
GEN := shared/gen
# The google protos the contract imports (and google.rpc.ErrorInfo, which clients decode),
# copied from googleapis-common-protos by `make vendor-protos` and committed, so protos/ builds
# on its own (buf build, buf breaking, clients in other languages) without the network.
VENDORED_PROTOS := google/api/field_behavior.proto google/rpc/status.proto \
  google/rpc/error_details.proto google/rpc/code.proto google/type/date.proto \
  google/type/money.proto
# Our protos' descriptors with their comments (source info), served by server reflection
# (shared/reflection.py) so `grpcurl describe` shows them.
DESCRIPTOR_SET := allot_descriptor_set.pb

.DEFAULT_GOAL := help
.PHONY: help venv proto vendor-protos lock node-example proto-check lint breaking clients test run run-mtls bench profile clean

help:  ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-12s %s\n", $$1, $$2}'

# Editable installs of both distributions: allot-client (the generated stubs, package `allot`,
# and the allot_client helper; clients/python) and the server (shared, services) with its tools.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	rm -f "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/allot-generated.pth"
	$(PY) -m pip install -q -e ./clients/python -e '.[dev]'
	touch $@

venv: $(VENV)/.installed  ## Create the virtual environment with every dependency

proto: venv  ## Regenerate Python stubs (and .pyi) and the descriptor set from protos/ into shared/gen
	rm -rf $(GEN)/allot $(GEN)/$(DESCRIPTOR_SET)
	mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
	  --python_out=$(GEN) --grpc_python_out=$(GEN) --mypy_out=$(GEN) \
	  --include_source_info --descriptor_set_out=$(GEN)/$(DESCRIPTOR_SET) \
	  $$(find protos/allot -name '*.proto' | sort)
	find $(GEN)/allot -type d -exec touch {}/__init__.py \;
	touch $(GEN)/allot/py.typed

vendor-protos: venv  ## Copy the google protos the contract imports into protos/google (committed)
	for f in $(VENDORED_PROTOS); do mkdir -p protos/$$(dirname $$f) && cp $(SITE)/$$f protos/$$f; done

# requirements.lock: every runtime dependency of both distributions, transitive ones too, pinned
# for the image (deploy/Dockerfile). allot-client is not on an index: a wheel of it built here
# lets pip-compile resolve it, and it stays out of the lock (the image installs it from the
# source). tests/unit/test_lock.py fails when pyproject's pins and the lock disagree.
LOCK_WHEELS := build/lock-wheels

lock: venv  ## Re-pin requirements.lock from pyproject.toml and clients/python/pyproject.toml
	rm -rf $(LOCK_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w $(LOCK_WHEELS) ./clients/python
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
	  --find-links $(LOCK_WHEELS) --unsafe-package allot-client --output-file requirements.lock \
	  pyproject.toml clients/python/pyproject.toml

# examples/node: a grpc-js client run by tests/service/test_node_client.py; its packages from the
# committed package-lock.json (npm ci), installed again only when the lock changes.
node-example: examples/node/node_modules/.package-lock.json  ## Install examples/node's packages (npm ci)

examples/node/node_modules/.package-lock.json: examples/node/package-lock.json
	cd examples/node && timeout 300 npm ci --no-audit --no-fund --loglevel=error
	touch $@

proto-check: proto  ## Fail when the committed stubs drift from protos/
	@git diff --exit-code --stat -- $(GEN) && test -z "$$(git status --porcelain -- $(GEN))" \
	  || { echo "generated code in $(GEN) drifts from protos/: run 'make proto' and commit"; exit 1; }

lint: venv proto  ## ruff, buf lint and buf breaking (against the previous commit)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	$(MAKE) -s breaking

# `make breaking`: the contract (protos/, rules in buf.yaml) against the previous commit's,
# extracted with git archive (works in a worktree and any full clone). Skipped with a note
# where there is no previous commit (a shallow clone) or its protos/ did not build on its own.
BREAKING_BASE := build/breaking-base

breaking: venv  ## buf breaking: protos/ against the previous commit's
	@if ! git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null; then \
	  echo "buf breaking: skipped: no previous commit here (shallow clone? git fetch --deepen=1)"; \
	else \
	  rm -rf $(BREAKING_BASE) && mkdir -p $(BREAKING_BASE) \
	  && git archive HEAD~1 buf.yaml protos | tar -x -C $(BREAKING_BASE) \
	  && if ! $(BIN)/buf build $(BREAKING_BASE) -o /dev/null 2>/dev/null; then \
	    echo "buf breaking: skipped: the previous commit's protos/ does not build on its own"; \
	  else \
	    $(BIN)/buf breaking --against $(BREAKING_BASE) && echo "buf breaking: no breaking change"; \
	  fi; \
	fi

clients: venv  ## Go, Java and TypeScript clients into gen/ (buf.gen.yaml; needs the Buf registry)
	$(BIN)/buf generate --template buf.gen.yaml --path protos/allot

# Two workers (pytest-xdist) for two cores, each test module on one worker (its module fixtures
# made once); the 15 slowest tests are printed so the next change sees where the time goes.
TEST_WORKERS ?= 2

test: venv  ## Run the whole test suite (PostgreSQL tests need 127.0.0.1:5432; CI=true makes them required)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=15

run: venv  ## Start the whole suite on SQLite under ALLOT_DATA_DIR (default ./var)
	$(BIN)/allot run

# `make run-mtls`: development certificates (made once) under the data dir, one per service.
TLS_DIR = $(or $(ALLOT_DATA_DIR),var)/tls

run-mtls: venv  ## Like run, with mTLS: certificates per service in ALLOT_DATA_DIR/tls (made once)
	test -f $(TLS_DIR)/ca.pem || $(BIN)/allot certs new $(TLS_DIR)
	ALLOT_QUOTA_TLS_CERT_FILE=$(TLS_DIR)/quota.pem ALLOT_QUOTA_TLS_KEY_FILE=$(TLS_DIR)/quota-key.pem \
	ALLOT_BILLING_TLS_CERT_FILE=$(TLS_DIR)/billing.pem \
	ALLOT_BILLING_TLS_KEY_FILE=$(TLS_DIR)/billing-key.pem \
	ALLOT_NOTIFICATION_TLS_CERT_FILE=$(TLS_DIR)/notification.pem \
	ALLOT_NOTIFICATION_TLS_KEY_FILE=$(TLS_DIR)/notification-key.pem \
	ALLOT_TLS_CA_FILE=$(TLS_DIR)/ca.pem ALLOT_TLS_CLIENT_AUTH=require $(BIN)/allot run

# `make bench`: every scenario on both databases; BENCH_ONLY=<scenario,...> and
# BENCH_DATABASES=sqlite|postgresql select (README, "Benchmarks"). Figures also go to
# build/bench/<UTC timestamp>-<short commit>.json.
bench: venv  ## Quota's hot path (ReportUsage, BatchReportUsage, CheckQuota, ...) beside a bare echo
	$(PY) -m tests.bench.report_usage

# `make profile`: one scenario at one concurrency on one database with quota recorded by
# py-spy; the flame graph goes to build/profile-<scenario>.svg.
PROFILE_SCENARIO ?= report_usage
PROFILE_CONCURRENCY ?= 64
PROFILE_DATABASE ?= postgresql

profile: venv  ## Flame graph of quota under one bench scenario (PROFILE_SCENARIO, default report_usage c64)
	BENCH_ONLY=$(PROFILE_SCENARIO) BENCH_DATABASES=$(PROFILE_DATABASE) \
	BENCH_CONCURRENCIES=$(PROFILE_CONCURRENCY) \
	BENCH_PROFILE=build/profile-$(PROFILE_SCENARIO).svg $(PY) -m tests.bench.report_usage

clean:  ## Remove the virtual environment and local data
	rm -rf $(VENV) build var
