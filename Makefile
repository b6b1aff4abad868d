# Two commands on a fresh machine:
#   make run   set-up, then the default local cluster in the foreground
#   make test  set-up, then the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_SRC := $(wildcard proto/*.proto)
PROTO_OUT := shardnode/proto

.PHONY: setup proto run test sim-soak bench clean

setup: $(STAMP) proto

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "shardnode needs Python 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Generated code is not committed: it is rebuilt from proto/ whenever a .proto changes.
proto: $(STAMP) $(PROTO_OUT)/.generated

$(PROTO_OUT)/.generated: $(PROTO_SRC)
	# The virtual path makes generated modules import each other as shardnode.proto.X.
	$(PY) -m grpc_tools.protoc --proto_path=$(PROTO_OUT)=proto --python_out=. --grpc_python_out=. \
		$(patsubst proto/%,$(PROTO_OUT)/%,$(PROTO_SRC))
	touch $@

# The default local cluster in the foreground: one supervisord per host of etc/cluster.toml
# (each on its own address:9001), all run by etc/supervisord.conf. Both files are generated
# here (absolute paths: machine-specific, not committed), with the cluster's admin credential
# and, when [security] tls is on, its certificates created first if missing (docs/security.md).
# exec, so Ctrl-C reaches supervisord.
run: setup
	$(PY) scripts/gen_supervisor_conf.py --config etc/cluster.toml --out etc
	exec $(VENV)/bin/supervisord -c etc/supervisord.conf

test: setup
	sh scripts/install-test-deps.sh
	$(PY) -m pytest -n 2 --dist loadgroup

# Longer simulation soak: SIM_SEEDS=20000 make sim-soak
sim-soak: setup
	SIM_SEEDS=$${SIM_SEEDS:-20000} $(PY) -m pytest -n 2 tests/sim

bench: setup
	$(PY) bench/raft_core.py

clean:
	rm -rf $(VENV) $(PROTO_OUT)/*_pb2*.py $(PROTO_OUT)/.generated
