# owproxy: `make run` serves a demo action on :8080, `make test` runs the suite.

PYTHON ?= python3
# `make run PORT=9000`, or FLASK_PROXY_PORT as the proxy itself reads it.
PORT   ?= $(or $(FLASK_PROXY_PORT),8080)
VENV   := .venv
VPY    := $(VENV)/bin/python
DEMO   := demo-action
# Interpreters the suite also runs the proxy under: the oldest supported and
# the newest this machine has (each skipped, with a note, when absent).
OLDEST := 3.8
NEWEST := 3.20 3.19 3.18 3.17 3.16 3.15 3.14 3.13 3.12 3.11 3.10 3.9

# The first working `pythonX.Y` among its arguments, from pyenv or the PATH.
find_python = for v in $(1); do \
	  for p in "$$(pyenv prefix $$v 2>/dev/null | head -n1)/bin/python$$v" "$$(command -v python$$v)"; do \
	    if [ -x "$$p" ] && "$$p" -c pass 2>/dev/null; then echo "$$p"; exit 0; fi; \
	  done; \
	done

.PHONY: run test bench clean

# Serves examples/hello.sh on loopback only: re-init is allowed (so the README's
# curl lines can replace it), which must not be open to the network.
# The port is checked first: a second `make run` must not replace the demo
# action the first one serves (and may have re-initialised) before it fails.
run:
	@$(PYTHON) -c 'import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", $(PORT)))' 2>/dev/null \
	  || { echo "make run: port $(PORT) on 127.0.0.1 is in use (another make run?); stop that, or make run PORT=N" >&2; exit 1; }
	mkdir -p $(DEMO) && cp examples/hello.sh $(DEMO)/exec
	PROXY_ALLOW_REINIT=1 exec $(PYTHON) owproxy.py --host 127.0.0.1 --port $(PORT) --action-dir $(DEMO) --verbose

# Coverage follows every Python process the suite starts (proxies, warm
# interpreters, client commands): patch = subprocess needs coverage 7.10.
$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check "pytest>=7,<9" "coverage>=7.10,<8"
	printf '[run]\nparallel = true\npatch = subprocess\ninclude = $(CURDIR)/owproxy.py\n' > $(VENV)/coveragerc
	touch $@

# Each run keeps its coverage data in a folder of its own: two runs at once
# must not combine or delete each other's.
test: $(VENV)/.ready
	@set -e; data=$$(mktemp -d); trap 'rm -rf "$$data"' EXIT; \
	export COVERAGE_RCFILE=$(VENV)/coveragerc COVERAGE_FILE="$$data/.coverage"; \
	$(VPY) -m coverage run -m pytest -q -p no:cacheprovider test_owproxy.py; \
	$(VPY) -m coverage combine -q; \
	$(VPY) -m coverage report -m
	@# The two other interpreters' passes run side by side (the suite's tests
	@# mostly wait on processes), each printed whole once it is done.
	@set -e; logs=$$(mktemp -d); trap 'rm -rf "$$logs"' EXIT; pids=""; n=0; \
	for want in "$(OLDEST)" "$(NEWEST)"; do \
	  py=$$($(call find_python,$$want)); \
	  if [ -z "$$py" ]; then echo "note: no Python $$want on this machine; skipping it"; continue; fi; \
	  n=$$((n + 1)); log="$$logs/$$n"; \
	  echo "== the proxy under $$py ($$($$py -V 2>&1))" > "$$log"; \
	  OWPROXY_PYTHON=$$py $(VPY) -m pytest -q -p no:cacheprovider test_owproxy.py >> "$$log" 2>&1 & \
	  pids="$$pids $$!"; \
	done; \
	failed=0; for pid in $$pids; do wait $$pid || failed=1; done; \
	for log in "$$logs"/*; do [ ! -f "$$log" ] || cat "$$log"; done; exit $$failed

bench:
	$(PYTHON) bench/bench.py

clean:
	rm -rf $(VENV) $(DEMO) .coverage .coverage.* __pycache__ .pytest_cache
