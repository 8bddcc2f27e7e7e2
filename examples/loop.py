#!/usr/bin/env python3
"""An ActionLoop executable (the protocol of openwhisk-runtime-go): started once,
it reads one JSON line per activation on stdin and writes one JSON result line
on file descriptor 3.  Serve it with `owproxy.py --loop`."""
import json
import os
import sys

results = os.fdopen(3, "w")
if os.environ.get("__OW_WAIT_FOR_ACK"):  # the proxy sets it when OW_WAIT_FOR_ACK is set
    results.write('{"ok": true}\n')
    results.flush()
served = 0
for line in sys.stdin:
    request = json.loads(line)
    served += 1
    print("activation", request.get("activation_id"), "served by pid", os.getpid(), flush=True)
    name = request["value"].get("name", "stranger")
    results.write(json.dumps({"greeting": "Hello, %s!" % name, "served": served}) + "\n")
    results.flush()
