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

# The passes run at once (the suite's tests mostly wait on processes): with
# coverage under this Python, in two halves of the suite (the longest pass,
# combined at the end), then with the proxy under the oldest supported and the
# newest Python here (each skipped, with a note, when absent). A line says
# when each starts and ends, another every 30 s how many tests each has done;
# each pass's output is printed whole at the end, then the coverage table. Each
# run keeps its coverage data in a folder of its own: two runs at once must not
# combine or delete each other's.
test: $(VENV)/.ready
	@set -e; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	started=$$(date +%s); names=""; \
	start() { name=$$1; shift; echo "make test: $$name: started"; \
	  ( "$$@" ) > "$$work/$$name.log" 2>&1 & echo $$! > "$$work/$$name.pid"; names="$$names $$name"; }; \
	coverage="env COVERAGE_RCFILE=$(VENV)/coveragerc COVERAGE_FILE=$$work/data/.coverage"; \
	mkdir "$$work/data"; \
	$(VPY) -m pytest -q -p no:cacheprovider --collect-only test_owproxy.py | grep '::' > "$$work/tests"; \
	for half in 1 2; do \
	  awk "NR % 2 == $$half % 2" "$$work/tests" > "$$work/tests$$half"; \
	  start coverage-$$half $$coverage xargs -d '\n' -a "$$work/tests$$half" \
	    $(VPY) -m coverage run -m pytest -q -p no:cacheprovider; \
	done; \
	for want in "$(OLDEST)" "$(NEWEST)"; do \
	  py=$$($(call find_python,$$want)); \
	  if [ -z "$$py" ]; then echo "note: no Python $$want on this machine; skipping it"; continue; fi; \
	  start "$$($$py -c 'import sys; print("python%d.%d" % sys.version_info[:2])')" \
	    env OWPROXY_PYTHON=$$py $(VPY) -m pytest -q -p no:cacheprovider test_owproxy.py; \
	done; \
	progress() { grep -o '^[.sxXFE]*' "$$work/$$1.log" | tr -d '\n' | wc -c; }; \
	failed=0; running="$$names"; ticks=0; \
	while [ -n "$$running" ]; do \
	  sleep 1; ticks=$$((ticks + 1)); still=""; \
	  for name in $$running; do \
	    pid=$$(cat "$$work/$$name.pid"); \
	    if kill -0 $$pid 2>/dev/null; then still="$$still $$name"; continue; fi; \
	    if wait $$pid; then result=ok; else result=FAILED; failed=1; fi; \
	    echo "make test: $$name: $$result after $$(( $$(date +%s) - started )) s: $$(grep -E '^=*[ 0-9a-z,]*(passed|failed|error)' "$$work/$$name.log" | tail -n1 | tr -d '=')"; \
	  done; \
	  running="$$still"; \
	  if [ -n "$$running" ] && [ $$((ticks % 30)) = 0 ]; then \
	    line="make test: $$(( $$(date +%s) - started )) s:"; \
	    for name in $$running; do line="$$line $$name $$(progress $$name) tests done,"; done; \
	    echo "$${line%,}"; \
	  fi; \
	done; \
	for name in $$names; do echo "== $$name"; cat "$$work/$$name.log"; done; \
	[ $$failed = 0 ] || exit 1; \
	$$coverage $(VPY) -m coverage combine -q; \
	$$coverage $(VPY) -m coverage report -m

bench:
	$(PYTHON) bench/bench.py

clean:
	rm -rf $(VENV) $(DEMO) .coverage .coverage.* __pycache__ .pytest_cache
