# The README's two commands: `make run` and `make test`. Both set up everything first.
# Setup is idempotent; built tools are cached under ~/.cache/meshgate, keyed by version,
# and linked into the clone's ignored .tools/ folder.

PYTHON      ?= python3
VENV        := .venv
CACHE       := $(HOME)/.cache/meshgate
TOOLS       := .tools
OPA_VERSION := v1.22.2
OPA_CACHED  := $(CACHE)/opa-$(OPA_VERSION)/opa
PLUGIN_OUT  := build/plugins
CARGO_TARGET_DIR ?= $(CACHE)/cargo-target
export CARGO_TARGET_DIR

.PHONY: run test setup venv pgo opa rust-target plugins lint bench clean

run: setup
	$(VENV)/bin/meshgate up

test: setup
	bash tests/run_all.sh

# In this order: the profile-guided build trains on the plugins just built.
setup: venv opa rust-target plugins pgo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard meshgate/gateway/wasm/*.c meshgate/gateway/wasm/*.h)
	@echo "==> Python virtual environment with meshgate (editable, its C crossings compiled), Envoy 1.40 wheel, test and bench tools"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	@touch $@

pgo: $(VENV)/.pgo

# The editable install builds the C crossings plainly; this rebuilds them laid out by the
# profile of a training run through the plugins (decision 2700). A second `make setup`
# skips it until the C sources, the plugins or the training change.
$(VENV)/.pgo: $(VENV)/.installed setup.py bench/plugin_chain.py $(PLUGIN_OUT)/rate_limit.wasm $(PLUGIN_OUT)/auth.wasm
	@echo "==> The C crossings, profile-guided: instrumented build, training run, final build"
	$(VENV)/bin/python setup.py -q build_pgo --plugins $(PLUGIN_OUT)
	@touch $@

opa: $(TOOLS)/opa

$(TOOLS)/opa: $(OPA_CACHED)
	@mkdir -p $(TOOLS)
	ln -sf $(OPA_CACHED) $@

$(OPA_CACHED):
	@echo "==> Building OPA $(OPA_VERSION) with go install (about 2 minutes on 2 cores, once per machine)"
	@mkdir -p $(dir $@)
	GOBIN=$(abspath $(dir $@)) go install github.com/open-policy-agent/opa@$(OPA_VERSION)

rust-target:
	@rustup target list --installed | grep -qx wasm32-wasip1 || \
		{ echo "==> Adding the Rust target wasm32-wasip1"; rustup target add wasm32-wasip1; }

plugins: rust-target
	@echo "==> Building the proxy-wasm plugins (release, opt-level 3) into $(PLUGIN_OUT)"
	bash plugins/build.sh $(PLUGIN_OUT)

lint: venv
	$(VENV)/bin/ruff check meshgate tests bench

bench: setup
	@command -v wrk >/dev/null || { echo "==> Installing wrk (Debian) for the data-plane benchmark"; \
		apt-get update -qq && apt-get install -y -qq wrk; }
	bash bench/run_all.sh

clean:
	rm -rf $(VENV) $(TOOLS) build
