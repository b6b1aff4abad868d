# Two commands on a fresh machine:
#   make run   set-up, then the default local cluster in the foreground
#   make test  set-up, then the whole test suite
# `make help` lists every target (the "## " comments below).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_SRC := $(wildcard proto/*.proto)
PROTO_OUT := shardnode/proto

READY_TIMEOUT ?= 120
DATA_DIR := data

.PHONY: help setup proto run run-netns reset test sim-soak bench bench-etcd clean

# `make help` prints these lines:
## help: this list
## setup: create .venv with the pinned dependencies and generate the protobuf code
## run: start the default local cluster in the foreground (Ctrl-C stops it)
## run-netns: the same with each host in its own network namespace (root; ip, nft, tc; docs/testing.md)
## reset: delete the local cluster's data and logs (data/); the cluster must be stopped
## test: run every test (unit, simulation, integration; a few minutes)
## sim-soak: a longer simulation soak (Raft core and key-space moves): SIM_SEEDS=20000 by default
## bench: the Raft core benchmark (proposals per second, in process)
## bench-etcd: shardnode against a 3-node etcd on loopback, side by side (docs/performance.md)
## clean: remove .venv and the generated protobuf code (not the data: see reset)
help:
	@echo "make TARGET, where TARGET is one of:"
	@sed -nE 's/^## ([a-z-]+): (.*)/  \1\t\2/p' $(MAKEFILE_LIST) | expand -t 14
	@echo "Variables: READY_TIMEOUT=$(READY_TIMEOUT) (make run, run-netns), SIM_SEEDS (make sim-soak), PYTHON=$(PYTHON)"

setup: $(STAMP) proto

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "shardnode needs Python 3.11")'
	@echo "setup: creating $(VENV) and installing the pinned dependencies (first run only, about a minute)"
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# Generated code is not committed: it is rebuilt from proto/ whenever a .proto changes.
proto: $(STAMP) $(PROTO_OUT)/.generated

# The virtual path makes generated modules import each other as shardnode.proto.X.
$(PROTO_OUT)/.generated: $(PROTO_SRC)
	@$(PY) -m grpc_tools.protoc --proto_path=$(PROTO_OUT)=proto --python_out=. --grpc_python_out=. \
		$(patsubst proto/%,$(PROTO_OUT)/%,$(PROTO_SRC))
	@touch $@

# The default local cluster in the foreground: one supervisord per host of etc/cluster.toml
# (each on its own address:9001), all run by `supervisord -c etc/supervisord.conf`. Both files
# are generated first (absolute paths: machine-specific, not committed), with the cluster's admin
# credential and, when [security] tls is on, its certificates created first if missing
# (docs/security.md). scripts/run_cluster.py runs supervisord and prints one line when every
# group has a leader (or, after READY_TIMEOUT seconds, what is missing). exec, so that Ctrl-C
# reaches both.
run: setup
	@exec $(PY) scripts/run_cluster.py --config etc/cluster.toml --out etc --ready-timeout $(READY_TIMEOUT)

# `make run` with each host in its own network namespace (docs/testing.md, "Hosts in network
# namespaces"): the network is created first, etc/cluster-netns.toml written from etc/cluster.toml
# (data in data/netns, supervisord files in etc/netns), and the network removed when it stops.
run-netns: setup
	@exec $(PY) scripts/run_cluster.py --namespaces --config etc/cluster.toml --out etc --ready-timeout $(READY_TIMEOUT)

# Data and logs of every host of the default cluster (and of its namespaced run); refused while one runs.
reset:
	@for pidfile in $(DATA_DIR)/supervisord.pid $(DATA_DIR)/netns/supervisord.pid; do \
		if [ -f $$pidfile ] && kill -0 "$$(cat $$pidfile)" 2>/dev/null; then \
			echo "make reset: the cluster is running (supervisord pid $$(cat $$pidfile)): stop it first (Ctrl-C)" >&2; \
			exit 1; \
		fi; \
	done
	rm -rf $(DATA_DIR)

test: setup
	sh scripts/install-test-deps.sh
	$(PY) -m pytest -n 2 --dist loadgroup

# Longer simulation soak: SIM_SEEDS=20000 make sim-soak
sim-soak: setup
	SIM_SEEDS=$${SIM_SEEDS:-20000} $(PY) -m pytest -n 2 tests/sim

bench: setup
	$(PY) bench/raft_core.py

# Not part of `make test`: installs Debian's etcd-server when etcd is missing and we are root.
bench-etcd: setup
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	$(PY) bench/versus_etcd.py

clean:
	rm -rf $(VENV) $(PROTO_OUT)/*_pb2*.py $(PROTO_OUT)/.generated
