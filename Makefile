# ecsnap: the two set-up commands are `make run` and `make test`.
# The venv is made from Debian's /usr/bin/python3 (when there is one): Ceph's Python
# bindings (python3-rados, python3-rbd: not on PyPI) are built for that interpreter. Only
# those two modules are linked into the venv (scripts/link-ceph-bindings.sh), not Debian's
# whole site-packages, whose older copies (pyOpenSSL, requests, urllib3...) would stand in
# for ours. A venv made otherwise is remade from scratch once (.made-with records how).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
MAKE_VENV = $(PYTHON) -m venv
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= $(CURDIR)/var/data
LISTEN ?= 127.0.0.1:8080
PYTEST_ARGS ?=
SHELL  := /bin/bash

.PHONY: test test-fast run deps venv lint bench soak clean

deps:
	bash scripts/system-deps.sh

$(BIN)/.installed: pyproject.toml
	test "$$(cat $(VENV)/.made-with 2>/dev/null)" = "$(MAKE_VENV)" || \
	    { $(MAKE_VENV) --clear $(VENV) && echo "$(MAKE_VENV)" > $(VENV)/.made-with; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	bash scripts/link-ceph-bindings.sh $(BIN)/python
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo  # the layer contracts: [tool.importlinter]

# Two pytest processes side by side on the 2 cores CI has: the VM-heavy half (end-to-end
# tests, the QEMU driver, the cluster's fencing tests with VMs, the benchmark and soak smoke
# runs) and the rest; each has its own PostgreSQL and Ceph (free ports) and tmp dir. The
# first one's report follows the second's.
VM_TESTS := tests/e2e tests/compute tests/cluster/test_failover_rbd.py \
            tests/cluster/test_cluster_vm.py tests/test_bench_smoke.py tests/test_soak_smoke.py
# LIBC_FATAL_STDERR_: glibc's own fatal messages (heap corruption) go to stderr, into the
# log, not to a terminal CI does not have
test: deps venv lint
	@rm -f .test-vms.log .test-rest.log; export LIBC_FATAL_STDERR_=1; \
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(VM_TESTS) > .test-vms.log 2>&1 & vms=$$!; \
	set -o pipefail; $(BIN)/pytest -q $(PYTEST_ARGS) $(addprefix --ignore=,$(VM_TESTS)) 2>&1 \
	    | tee .test-rest.log; rest=$$?; \
	wait $$vms; vm=$$?; echo "== $(VM_TESTS)"; cat .test-vms.log; \
	bash scripts/test-why.sh "$$rest" .test-rest.log "$$vm" .test-vms.log

# the tests that need no QEMU VM, no PostgreSQL server and no Ceph cluster, in under a
# minute on two pytest-xdist workers: the service tests on in-memory fakes (tests/fast),
# the contracts, the domain, the API, the store on SQLite, the qcow2 backend (qemu-img).
# Not the real-file service stories, crash tests, the demo image build, end-to-end tests
# (the SDK conformance run: 40 s of CPU), the CLI's tables (a process per command: 20 s)
# and benchmarks of `make test`. The PostgreSQL and RBD cases are parametrised, not marked:
# -k deselects them by their IDs.
FAST_TESTS := tests/fast tests/test_contracts.py tests/test_layers.py tests/domain tests/api \
              tests/store tests/storage tests/compute tests/console \
              tests/service/test_accounts.py tests/service/test_task_runner.py \
              tests/service/test_plans.py tests/test_logs.py tests/test_cli_admin.py \
              tests/test_readme_actions.py --ignore=tests/compute/test_guest_image.py
test-fast: venv
	@command -v qemu-img >/dev/null || { echo "make test-fast needs qemu-img (apt-get install qemu-utils, or make deps)"; exit 1; }
	$(BIN)/pytest -q -n 2 -m "not qemu and not postgres" -k "not postgres and not rbd" \
	    $(PYTEST_ARGS) $(FAST_TESTS)

run: deps venv
	$(BIN)/ecsnap init --data-dir $(DATA)
	$(BIN)/ecsnap image build-demo --data-dir $(DATA)
	$(BIN)/ecsnap serve --data-dir $(DATA) --listen $(LISTEN)

bench: deps venv
	$(BIN)/python -m bench.run --out docs/benchmarks.md

# the reliability soak: 210 kill -9 crash trials, 6 rounds of 50 concurrent calls, 10,000
# fuzzed requests (10-15 min on 2 cores); results in docs/reliability.md (bench/soak.py)
soak: deps venv
	$(BIN)/python -m bench.soak --out docs/reliability.md

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
