#!/usr/bin/env python3
"""Benchmarks of owproxy.py against the floors it cannot beat.

Run ``python3 bench/bench.py`` from anywhere (``--quick`` for a smoke run of a
few seconds, ``--only warm,soak`` for some sections).  It starts real proxy
processes (``owproxy.py`` next to this directory) on free ports of 127.0.0.1,
settings in their environment as an image sets them, their stdout and stderr
thrown away, and prints a table and then one JSON line with every figure.

Each figure is a median over repeated runs and comes with a floor measured in
the same bench run, as a difference or a ratio, next to its target:

image           the proxy as the Dockerfile starts it (``python3 -S owproxy.pyc``)
                against the 60-line server (BARE_SERVER below, compiled and
                started the same way, importing only what a request needs):
                cold start to the first /run (target: x1.15 of the server's),
                VmRSS idle after it (target: the server's + 1 MiB), the --loop
                cold start (target: x1.15 of the server's cold start + the Go
                proxy's --loop cold start), throughput of an instant action from
                8 and 64 clients, ``__OW_ALLOW_CONCURRENT=true`` (target at both:
                x0.95 of the server's), with the machine's context switches per
                request (/proc/stat), and a warm Python function's /run against
                the Python runtime image's (the Go proxy and its launcher.py;
                target: x1.25).  The Go figures need OWPROXY_BENCH_GO_PROXY (the
                Go proxy's executable; it listens on 8080) and, for the function,
                OWPROXY_BENCH_LAUNCHER (openwhisk-runtime-python's launcher.py);
                without them they are n/a, with a note that says so.
cold start      spawn of ``python3 owproxy.py`` until the first /run is
                answered (a baked-in action, ``/init {}`` first).  Floors: spawn
                to exit of ``python3 -c pass`` and of ``python3 -c "import
                <modules>"``, where <modules> is every module that importing
                owproxy adds to ``sys.modules`` (measured in a subprocess that
                diffs ``sys.modules`` around ``import owproxy``), ssl kept out
                as owproxy keeps it out.  Target: x1.15 of the latter.  Also shown:
                the same start from bytecode compiled as the project's
                Dockerfile compiles it (``python3 owproxy.pyc``) and the time
                ``compile()`` takes on the file, since a ``__main__`` script is
                compiled on every start.
warm /run       one new connection per call, as the invoker does, interleaved
                with the floor: ``subprocess.run`` of the same action with the
                same argv and stdin, output captured.  Exec mode, loop mode
                (``--loop``, an ActionLoop executable) and Python-function mode
                (``def main(args)`` source); a mode whose /init or first /run
                fails is reported as n/a.  A bare stdlib ThreadingHTTPServer
                round trip is the HTTP floor (targets: loop and function mode
                at most 0.25 ms over it), and the same server running the
                action with ``subprocess.run`` the floor of any proxy built on
                it (target: exec mode at most 0.15 ms over it).  Also the
                proxy's own HTTP handling: GET /healthz against the bare
                server's GET, target no slower.
throughput      8 clients on a 50 ms action, ``__OW_ALLOW_CONCURRENT=true``;
                floor 8 / 0.05 s = 160 req/s.
memory          VmRSS of the proxy idle after /init, started from the source
                (floor: a script as long as owproxy.py that imports the same
                modules and runs none of its own code, since CPython keeps a
                script's syntax tree while it runs; target: 2 MiB over it) and
                from bytecode (floor: an interpreter that imported the same
                modules; target: under 20 MiB), and its VmHWM after an action
                wrote 300 MB of 100-byte log lines (floor: the idle RSS), with
                the rate of that flood against Python reading the same pipe
                into /dev/null (target: half of it).  Each repeat is a fresh
                proxy, so VmHWM is that proxy's own peak.
archive         VmHWM of a fresh proxy after an /init of a ~400 KB zip whose
                symbolic link entry inflates to 400 MB (refused: its target is
                longer than PATH_MAX).  Floor: its VmHWM before.  Target: less
                than 32 MiB over it.
result flood    VmHWM of a ``--loop`` proxy whose action writes 300 MB on fd 3
                with no newline until the end: the result line is cut at the
                result limit (16 MiB by default) and answered 502, so the peak
                must stay under idle + twice the limit + 16 MiB of slack.
soak            20,000 runs of a tiny action from 8 clients: failures, RSS
                growth from after a 500-run warm-up to the end, processes left
                (parent or process group is the proxy) and descriptors left.
payload         a 1 MiB argument echoed back through stdin, per /run, against
                ``subprocess.run`` of the same (target: x3 at most); the
                request is encoded once, as the floor's input is.
attack          peak memory (VmHWM) of a proxy under hostile clients, against the
                bound the README states (idle RSS + what each limit allows):
                1000 connections that send a head slowly, 60 that each hold an
                unfinished 60 KB header line, 8 concurrent bodies at --max-body,
                8 bodies trickled in 1-byte chunks (a send each, from a process
                of their own, for as long as the /run latency is measured);
                and the /run latency meanwhile, against the same proxy's before
                (target: unchanged within noise).

Actions are small C programs compiled with ``cc`` into a temporary directory,
or /bin/sh scripts where there is no ``cc`` (the report says which).  Every
process runs under this interpreter, ``sys.executable``, with the same site
start-up, so whatever site-packages' .pth files import weighs on the floors
as much as on the proxy.  Timings that are compared alternate in blocks, so
that other load on the machine touches value and floor alike.
"""

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OWPROXY = os.path.join(os.path.dirname(HERE), "owproxy.py")
PYTHON = sys.executable
MIB = 1024 * 1024
RESULT_LIMIT_MIB = 16  # owproxy's default --max-result

# How many times each measurement repeats: a full run takes about a minute on
# two cores, a quick one some ten seconds.
COUNTS = {
    "full": dict(cold=25, warm_rounds=5, warm_calls=150, throughput_rounds=5,
                 throughput_calls=240, flood_rounds=5, soak_warmup=500, soak_calls=20000,
                 payload_rounds=5, payload_calls=8, attack_calls=200, attack_max_body=16 * MIB),
    "quick": dict(cold=5, warm_rounds=3, warm_calls=50, throughput_rounds=1,
                  throughput_calls=160, flood_rounds=1, soak_warmup=200, soak_calls=1000,
                  payload_rounds=2, payload_calls=4, attack_calls=40, attack_max_body=8 * MIB),
}

CLIENTS = 8
SLEEP_SECONDS = 0.05
FLOOD_BYTES = 300 * 1000 * 1000
PAYLOAD_BYTES = MIB
MAX_ARG_STRLEN = 131071  # owproxy passes the argument in argv only up to this size
READY_POLL = 0.0002  # seconds between connection attempts while a proxy starts
PARAMS = {"name": "bench"}
# The README's memory bound: per connection a thread's stack and buffers beside
# its head (--max-header, default 64 KiB); twice --body-memory, which counts each
# body with what parsing it takes (the oldest body may pass it while the others wait).
CONNECTION_KIB = 48
MAX_HEADER_KIB = 64
BODY_MEMORY_TIMES = 2
SLOW_CONNECTIONS = 1000
HEADER_CONNECTIONS = 60
BODY_CLIENTS = 8
OK = {"ok": True}

# Each action in C and in sh.  Every one prints {"ok": true} as its last line,
# except "echo", whose result is its input, and "loop", which answers on fd 3.
ACTIONS = {
    "tiny": (r'''
#include <stdio.h>
int main(void) { puts("{\"ok\": true}"); return 0; }
''', '''echo '{"ok": true}'
'''),
    "sleep": (r'''
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec pause = {0, 50 * 1000 * 1000};
    nanosleep(&pause, NULL);
    puts("{\"ok\": true}");
    return 0;
}
''', '''sleep 0.05
echo '{"ok": true}'
'''),
    "echo": (r'''
#include <unistd.h>
int main(void) {
    static char buffer[1 << 16];
    ssize_t size;
    while ((size = read(0, buffer, sizeof buffer)) > 0)
        if (write(1, buffer, size) != size) return 1;
    return write(1, "\n", 1) != 1;
}
''', '''cat
echo
'''),
    "flood": (r'''
#include <stdio.h>
#include <string.h>
int main(void) {
    static char buffer[1 << 16];
    char line[101];
    memset(line, 'x', 99);
    line[99] = '\n';
    line[100] = 0;
    setvbuf(stdout, buffer, _IOFBF, sizeof buffer);
    for (long i = 0; i < %d / 100; i++) fputs(line, stdout);
    puts("{\"ok\": true}");
    return 0;
}
''' % FLOOD_BYTES, '''head -c %d /dev/zero | tr '\\0' x | fold -w 99
echo  # ends fold's last, partial line
echo '{"ok": true}'
''' % FLOOD_BYTES),
    "fd3flood": (r'''
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    static char block[1 << 16];
    char *line = NULL;
    size_t size = 0;
    memset(block, 'x', sizeof block);
    while (getline(&line, &size, stdin) > 0) {
        for (long done = 0; done < %d; done += sizeof block)
            if (write(3, block, sizeof block) != sizeof block) return 1;
        if (write(3, "\n", 1) != 1) return 1;
    }
    return 0;
}
''' % FLOOD_BYTES, '''while IFS= read -r line; do
  head -c %d /dev/zero | tr '\\0' x >&3
  echo >&3
done
''' % FLOOD_BYTES),
    "loop": (r'''
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    FILE *results = fdopen(3, "w");
    char *line = NULL;
    size_t size = 0;
    if (!results) return 1;
    while (getline(&line, &size, stdin) > 0) {
        fputs("{\"ok\": true}\n", results);
        fflush(results);
    }
    return 0;
}
''', '''while IFS= read -r line; do echo '{"ok": true}' >&3; done
'''),
}

PYTHON_FUNCTION = 'def main(args):\n    return {"ok": True}\n'

# The HTTP floor: the stdlib server owproxy is built on, answering at once, or,
# with BARE_ACTION set, answering with the last line of a subprocess.run of it:
# the 60-line server, importing only what a request needs, of the image figures.
BARE_SERVER = r'''
import json, os, socket, socketserver, subprocess, sys
sys.modules["ssl"] = None  # as owproxy keeps it out: 4 MiB that no request needs
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
del sys.modules["ssl"]

ACTION = os.environ.get("BARE_ACTION")

class Server(ThreadingHTTPServer):
    request_queue_size = socket.SOMAXCONN  # 5 would drop connections of 64 clients
    def server_bind(self):  # without HTTPServer's reverse DNS lookup of its address
        socketserver.TCPServer.server_bind(self)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_POST(self):
        request = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"ok": true}'
        if ACTION and self.path == "/run":
            data = json.dumps(json.loads(request)["value"])
            done = subprocess.run([ACTION, data], input=data.encode(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            body = done.stdout.strip().rsplit(b"\n", 1)[-1]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST
    def log_message(self, *args):
        pass

port = int(os.environ["FLASK_PROXY_PORT"])
Server(("127.0.0.1", port), Handler).serve_forever()
'''


# ============================================================================
# Processes and HTTP
# ============================================================================

class ProxyError(Exception):
    """A proxy would not start, or did not answer as it should."""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(extra=None):
    """This environment without the settings that would change how a proxy runs."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("__OW_", "OWPROXY_"))
           and name not in ("PROXY_ALLOW_REINIT", "FLASK_PROXY_PORT")}
    env.update(extra or {})
    return env


def open_connection(port, timeout):
    sock = socket.create_connection(("127.0.0.1", port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(sock, port, path, body, method="POST"):
    """One request on ``sock``; returns (status, body).

    A minimal HTTP client rather than http.client, whose own parsing would cost
    a good part of the half millisecond the warm targets are about.
    """
    sock.sendall(b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (method.encode(), path.encode(), port,
                                                      len(body), body))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ProxyError("the connection closed before an answer")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    chunks, size = [rest], len(rest)
    while size < length:
        chunk = sock.recv(max(65536, length - size))
        if not chunk:
            raise ProxyError("the connection closed in the middle of an answer")
        chunks.append(chunk)
        size += len(chunk)
    return int(lines[0].split()[1]), b"".join(chunks)


class Proxy:
    """A server process on a free port of 127.0.0.1: owproxy unless ``command`` says
    otherwise.  Its stdout and stderr go to /dev/null: the bench must never leave
    a pipe undrained, and the logs are not what it measures.
    """

    def __init__(self, action_dir, args=(), env=None, command=None, cwd=None, port=None):
        self.port = port or free_port()
        # Settings from the environment, as an image sets them: a start with no
        # arguments is the one to measure.
        settings = {"OWPROXY_HOST": "127.0.0.1", "FLASK_PROXY_PORT": str(self.port),
                    "OWPROXY_ACTION_DIR": action_dir}
        settings.update(env or {})
        # Its own process group, so that "left in the proxy's group" means something.
        self.process = subprocess.Popen(
            (command or [PYTHON, OWPROXY]) + list(args), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(settings),
            cwd=cwd, start_new_session=True)
        self.pid = self.process.pid

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def connect(self, patience, timeout):
        """A new connection, retried every READY_POLL while the proxy is starting."""
        give_up = time.monotonic() + patience
        while True:
            try:
                return open_connection(self.port, timeout)
            except ConnectionRefusedError:
                if self.process.poll() is not None:
                    raise ProxyError("the proxy exited with status %d" % self.process.returncode)
                if time.monotonic() > give_up:
                    raise
                time.sleep(READY_POLL)

    def post(self, path, payload, patience=0.0, timeout=60.0):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        with self.connect(patience, timeout) as sock:
            return exchange(sock, self.port, path, body)

    def get(self, path):
        with self.connect(0.0, 60.0) as sock:
            return exchange(sock, self.port, path, b"", "GET")

    def init(self, value, patience=10.0):
        """/init, waiting for the proxy to listen; the answer's (status, body)."""
        return self.post("/init", {"value": value}, patience=patience)

    def run(self, params=PARAMS, timeout=60.0):
        return self.post("/run", {"value": params, "activation_id": "bench",
                                  "deadline": str(int((time.time() + 600) * 1000))},
                         timeout=timeout)

    def run_ok(self, expected=OK):
        status, body = self.run()
        return status == 200 and json.loads(body) == expected

    def stop(self):
        """SIGTERM, then its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    # -- what the kernel says about it --------------------------------------------

    def status_kib(self, field):
        return proc_status_kib(self.pid, field)

    def fd_count(self):
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def leftovers(self):
        """Processes whose parent is the proxy or that are in its process group."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            try:
                with open("/proc/%s/stat" % entry) as stat:
                    text = stat.read()
            except OSError:
                continue  # gone meanwhile
            state, ppid, pgrp = text[text.rindex(")") + 2:].split()[:3]
            if self.pid in (int(ppid), int(pgrp)):
                found.append(int(entry))
        return found


def proc_status_kib(pid, field):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ProxyError("no %s in /proc/%d/status" % (field, pid))


def started_proxy(action_dir, init_value=None, args=(), env=None, command=None, expected=OK,
                  cwd=None, port=None):
    """A proxy that answered /init and a first /run as it should, or ProxyError saying why."""
    proxy = Proxy(action_dir, args, env, command, cwd, port)
    try:
        status, body = proxy.init({} if init_value is None else init_value)
        if status != 200:
            raise ProxyError("/init answered %d %s" % (status, body.decode()[:200]))
        status, body = proxy.run()
        if status != 200 or json.loads(body) != expected:
            raise ProxyError("/run answered %d %s" % (status, body.decode()[:200]))
    except BaseException:
        proxy.__exit__()
        raise
    return proxy


# ============================================================================
# Timing
# ============================================================================

def elapsed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def median_ms(call, count):
    return 1000 * statistics.median(elapsed(call) for _ in range(count))


def interleaved_ms(calls, rounds, count):
    """The median ms of each call, timed in alternating blocks so that drift in the
    machine's speed (other load, frequency scaling) touches them all alike."""
    samples = [[] for _ in calls]
    for _ in range(rounds):
        for call, times in zip(calls, samples):
            times.extend(elapsed(call) for _ in range(count))
    return [1000 * statistics.median(times) for times in samples]


def hammer(call, total, clients=CLIENTS):
    """``call()`` ``total`` times from ``clients`` threads: (seconds, failures)."""
    tickets = itertools.count()
    failures = []

    def client():
        while next(tickets) < total:
            try:
                if not call():
                    failures.append("wrong answer")
            except Exception as error:
                failures.append(repr(error))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, failures


def settle(check, seconds=3.0):
    """Waits until ``check()`` is true (server threads close their sockets a little
    after the client has its answer); its last value."""
    give_up = time.monotonic() + seconds
    while not check() and time.monotonic() < give_up:
        time.sleep(0.01)
    return check()


# ============================================================================
# The report
# ============================================================================

class Figure:
    """One line of the report: a value, the floor it is compared with, its target."""

    def __init__(self, key, label, value, unit, floor=None, floor_label="", compare="diff",
                 target=None, target_label="", note=""):
        self.key, self.label, self.value, self.unit = key, label, value, unit
        self.floor, self.floor_label, self.compare = floor, floor_label, compare
        self.target, self.target_label, self.note = target, target_label, note

    def vs_floor(self):
        if self.value is None or self.floor is None:
            return None
        if self.compare == "ratio":
            return self.value / self.floor if self.floor else None
        return self.value - self.floor

    def verdict(self):
        if self.value is None:
            return "n/a"
        if self.target is None:
            return "info"
        return "met" if self.target(self.value, self.vs_floor()) else "MISSED"

    def as_json(self):
        vs = self.vs_floor()
        return {"label": self.label, "value": rounded(self.value), "unit": self.unit,
                "floor": rounded(self.floor), "floor_label": self.floor_label or None,
                "vs_floor": rounded(vs), "vs_floor_kind": self.compare if vs is not None else None,
                "target": self.target_label or None, "verdict": self.verdict(),
                "note": self.note or None}

    def cells(self):
        vs = self.vs_floor()
        if vs is None:
            vs_text = ""
        elif self.compare == "ratio":
            vs_text = "x%.2f" % vs
        else:
            vs_text = "%+.*f %s" % (decimals(self.unit), vs, self.unit)
        floor_text = "" if self.floor is None else number(self.floor, self.unit)
        if self.floor_label:
            floor_text += " (%s)" % self.floor_label
        value = number(self.value, self.unit) if self.value is not None else "n/a"
        return [self.label, value, floor_text, vs_text, self.target_label, self.verdict()]


def rounded(value):
    return round(value, 4) if isinstance(value, float) else value


def decimals(unit):
    return {"ms": 3, "MiB": 2, "req/s": 1}.get(unit, 0)


def number(value, unit):
    return "%.*f %s" % (decimals(unit), value, unit)


def error_figure(key, label, error):
    return Figure(key, label, None, "", note="n/a: %s" % error)


def print_table(figures):
    header = ["figure", "value", "floor", "vs floor", "target", "verdict"]
    rows = [header] + [figure.cells() for figure in figures]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    for figure in figures:
        if figure.note:
            print("note: %s: %s" % (figure.label, figure.note))


# ============================================================================
# Set-up: actions, action directories, the modules owproxy imports
# ============================================================================

class Bench:
    """What every measurement needs: the counts, the compiled actions, a scratch dir."""

    def __init__(self, counts, scratch):
        self.counts, self.scratch = counts, scratch
        self.dirs = itertools.count()
        self.compiler = shutil.which("cc")
        self.actions = {name: self.build_action(name, c, sh) for name, (c, sh) in ACTIONS.items()}
        self.action_kind = "C, compiled with %s" % self.compiler if self.compiler else "/bin/sh"
        self.modules = owproxy_modules(self.copy_owproxy())

    def build_action(self, name, c_source, sh_source):
        """The action as a C program if cc works here, else as a sh script."""
        path = os.path.join(self.scratch, name)
        if self.compiler:
            with open(path + ".c", "w") as source:
                source.write(c_source)
            built = subprocess.run([self.compiler, "-O2", "-o", path, path + ".c"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if built.returncode == 0:
                return path
            self.compiler = None  # all actions in one language, so figures compare
            return self.build_action(name, c_source, sh_source)
        with open(path, "w") as script:
            script.write("#!/bin/sh\n" + sh_source)
        os.chmod(path, 0o755)
        return path

    def action_dir(self, action=None):
        """A fresh action directory, with ``action`` baked in as its exec."""
        path = os.path.join(self.scratch, "action-%d" % next(self.dirs))
        os.mkdir(path)
        if action:
            shutil.copy2(self.actions[action], os.path.join(path, "exec"))
        return path

    def script_holding_owproxy(self):
        """A script whose source is owproxy.py's, never run (under ``if False:``): CPython
        keeps a script's syntax tree for as long as the script runs, so this is what
        ``python3 owproxy.py`` holds before any of its code runs."""
        path = os.path.join(self.scratch, "script-%d.py" % next(self.dirs))
        with open(OWPROXY) as source, open(path, "w") as script:
            script.write("if False:\n")
            script.writelines("    " + line for line in source)
            script.write("\n")
        return path

    def copy_owproxy(self):
        """owproxy.py copied and byte-compiled in the scratch dir, as the project's
        Dockerfile compiles it (owproxy.pyc beside it), and for the module list (a
        __pycache__): neither may be written into the repository."""
        directory = os.path.join(self.scratch, "module")
        os.mkdir(directory)
        shutil.copy2(OWPROXY, directory)
        source = os.path.join(directory, "owproxy.py")
        subprocess.run([PYTHON, "-m", "py_compile", source], check=True)
        subprocess.run([PYTHON, "-m", "compileall", "-b", "-q", source], check=True)
        self.compiled_command = [PYTHON, source + "c"]
        self.image_command = [PYTHON, "-S", source + "c"]
        self.small_command = [PYTHON, "-S", self.compiled(BARE_SERVER, "small_server.py")]
        return directory

    def compiled(self, text, name):
        """``text`` as a script compiled to bytecode as the Dockerfile compiles owproxy.py."""
        source = os.path.join(self.scratch, name)
        with open(source, "w") as script:
            script.write(text)
        subprocess.run([PYTHON, "-m", "compileall", "-b", "-q", source], check=True)
        return source + "c"

    def binary_code(self, action):
        """An /init value that installs ``action`` as an executable."""
        import base64
        with open(self.actions[action], "rb") as executable:
            return {"code": base64.b64encode(executable.read()).decode(), "binary": True,
                    "main": "main"}


def import_statement(modules):
    """Python that imports ``modules`` as owproxy does: without ssl, which it keeps
    out of http.client (see import_http_server_without_ssl in owproxy.py)."""
    return "import sys; sys.modules['ssl'] = None; import %s" % ", ".join(modules)


def owproxy_modules(directory):
    """Every module ``import owproxy`` adds to a bare interpreter's sys.modules."""
    probe = ("import sys; sys.path.insert(0, %r); before = set(sys.modules); import owproxy; "
             "print(' '.join(sorted(set(sys.modules) - before - {'owproxy'})))" % directory)
    output = subprocess.run([PYTHON, "-c", probe], check=True, stdout=subprocess.PIPE,
                            universal_newlines=True).stdout
    return output.split()


def action_argv(executable, data):
    """The argv owproxy gives an action: the argument too, while execve can carry it."""
    return [executable] if len(data) > MAX_ARG_STRLEN else [executable, data]


def subprocess_floor(executable, params=PARAMS):
    """The floor of an exec-mode /run: the same process, argv and stdin, run directly."""
    data = json.dumps(params)
    argv = action_argv(executable, data)
    return lambda: subprocess.run(argv, input=data.encode(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)


# ============================================================================
# Measurements: each returns a list of Figures
# ============================================================================

def measure_cold_start(bench):
    """The four starts alternate, one of each per round, so they share the machine's mood."""
    imports = import_statement(bench.modules)

    def cold_start(command=None):
        with Proxy(bench.action_dir("tiny"), command=command) as proxy:
            if proxy.init({})[0] != 200 or not proxy.run_ok():
                raise ProxyError("the first /init or /run failed")

    bare, imported, script, cached = interleaved_ms([
        lambda: subprocess.run([PYTHON, "-c", "pass"], check=True),
        lambda: subprocess.run([PYTHON, "-c", imports], check=True),
        cold_start,
        lambda: cold_start(bench.compiled_command),
    ], bench.counts["cold"], 1)
    compiling = statistics.median(fresh_compile_ms() for _ in range(bench.counts["cold"]))
    return [
        Figure("cold_floor_pass", "floor: python3 -c pass", bare, "ms"),
        Figure("cold_floor_imports", "floor: python3 -c 'import <%d modules>'"
               % len(bench.modules), imported, "ms", bare, "-c pass"),
        Figure("cold_start", "cold start: python3 owproxy.py -> 1st /run", script, "ms",
               imported, "imports", compare="ratio", target=lambda value, vs: vs <= 1.15,
               target_label="<= x1.15 imports"),
        Figure("cold_start_vs_compiled", "cold start vs imports + compile()", script, "ms",
               imported + compiling, "imports + compile", compare="ratio"),
        Figure("cold_start_vs_pass", "cold start vs bare interpreter", script, "ms",
               bare, "-c pass", compare="ratio"),
        Figure("cold_start_cached_pyc", "cold start: python3 owproxy.pyc -> 1st /run", cached,
               "ms", imported, "imports", compare="ratio"),
        Figure("compile_owproxy", "compile() of owproxy.py in a new interpreter",
               compiling, "ms"),
    ]


def fresh_compile_ms():
    """What compiling owproxy.py costs a new interpreter, as ``python3 owproxy.py`` does
    on every start (a __main__ script has no .pyc); in a warm process it is about half."""
    probe = ("import time; source = open(%r).read(); start = time.perf_counter(); "
             "compile(source, 'owproxy.py', 'exec'); print(time.perf_counter() - start)" % OWPROXY)
    output = subprocess.run([PYTHON, "-c", probe], check=True, stdout=subprocess.PIPE,
                            universal_newlines=True).stdout
    return 1000 * float(output)


def context_switches():
    """Every context switch the machine has made: a server's threads that come and
    go with its connections leave no count of their own behind in /proc."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("ctxt "):
                return int(line.split()[1])
    return 0


# The runtime image's own proxy and launcher, for the figures that compare with it
# (the bench ships neither): the Go proxy's executable (it listens on 8080, in
# its working directory's ./action) and openwhisk-runtime-python's launcher.py.
GO_PROXY = os.environ.get("OWPROXY_BENCH_GO_PROXY")
LAUNCHER = os.environ.get("OWPROXY_BENCH_LAUNCHER")
GO_PORT = 8080
NO_GO = ("no Go proxy: set OWPROXY_BENCH_GO_PROXY to its executable "
         "(and OWPROXY_BENCH_LAUNCHER to launcher.py)")


def go_proxy(bench, init_value, env=None):
    """The Go ActionLoop proxy, initialised with ``init_value``, as a runtime image runs it."""
    home = bench.action_dir()
    return started_proxy(home, init_value, command=[GO_PROXY], env=env, cwd=home, port=GO_PORT)


def runtime_image_function(bench):
    """An /init value that is what the Python runtime image's compile script makes
    of PYTHON_FUNCTION: the launcher beside main__.py, started by exec."""
    source = bench.action_dir()
    with open(LAUNCHER) as launcher, open(os.path.join(source, "exec__.py"), "w") as copy:
        copy.write(launcher.read())
    with open(os.path.join(source, "main__.py"), "w") as function:
        function.write(PYTHON_FUNCTION)
    return {"code": "#!/bin/sh\ncd %s\nexec %s exec__.py \"$@\"\n" % (source, PYTHON),
            "main": "main"}


def measure_image(bench):
    """The proxy as the Dockerfile starts it (``python3 -S owproxy.pyc``) against the
    60-line server (BARE_SERVER, started the same way) and, where the bench has
    it, the Go proxy: cold starts, idle memory, throughput, a function's round trip."""
    figures = measure_image_starts(bench)
    for clients in (8, 64):
        figures.extend(measure_image_throughput(bench, clients))
    figures.append(measure_function_round_trip(bench))
    return figures


def measure_image_starts(bench):
    small_env = {"BARE_ACTION": bench.actions["tiny"]}
    loop_env = {"OWPROXY_LOOP": "true"}
    loop_code = bench.binary_code("loop")
    rss = {"small": [], "proxy": []}

    def cold_start(command, action, init_value, env, memory=None, **where):
        with started_proxy(bench.action_dir(action), init_value, command=command, env=env,
                           **where) as server:
            if memory is not None:
                rss[memory].append(server.status_kib("VmRSS") / 1024)

    starts = [
        lambda: cold_start(bench.small_command, None, {}, small_env, "small"),
        lambda: cold_start(bench.image_command, "tiny", {}, None, "proxy"),
        lambda: cold_start(bench.image_command, None, loop_code, loop_env),
    ]
    if GO_PROXY:
        starts.append(lambda: cold_start([GO_PROXY], None, loop_code, None,
                                         cwd=bench.action_dir(), port=GO_PORT))
    timings = interleaved_ms(starts, bench.counts["cold"], 1)
    small, proxy, loop = timings[:3]
    go_loop = timings[3] if GO_PROXY else None
    small_rss, proxy_rss = statistics.median(rss["small"]), statistics.median(rss["proxy"])
    loop_floor = 1.15 * small + (go_loop or 0)
    return [
        Figure("image_floor_cold", "floor: 60-line server, python3 -S .pyc -> 1st /run",
               small, "ms"),
        Figure("image_cold", "cold start: python3 -S owproxy.pyc -> 1st /run", proxy, "ms",
               small, "60-line server", compare="ratio", target=lambda value, vs: vs <= 1.15,
               target_label="<= x1.15 floor"),
        Figure("image_idle_rss", "idle VmRSS after the 1st /run, python3 -S owproxy.pyc",
               proxy_rss, "MiB", small_rss, "60-line server",
               target=lambda value, vs: vs <= 1.0, target_label="<= floor + 1 MiB"),
        Figure("image_go_loop_cold", "Go proxy --loop: spawn -> 1st /run", go_loop, "ms",
               note="" if GO_PROXY else NO_GO),
        Figure("image_loop_cold", "--loop cold start: python3 -S owproxy.pyc -> 1st /run",
               loop, "ms", loop_floor if GO_PROXY else None, "x1.15 floor + Go --loop",
               compare="ratio", target=(lambda value, vs: vs <= 1.0) if GO_PROXY else None,
               target_label="<= x1.00", note="x%.2f of the 60-line server's cold start%s"
               % (loop / small, "" if GO_PROXY else "; " + NO_GO)),
    ]


def measure_image_throughput(bench, clients):
    """An instant action, ``__OW_ALLOW_CONCURRENT=true``, rounds alternating with the
    60-line server's; context switches per request, the whole machine's."""
    calls = bench.counts["throughput_calls"] * max(1, clients // CLIENTS)
    rates = {"small": [], "proxy": []}
    switches = {"small": [], "proxy": []}
    with started_proxy(bench.action_dir(), command=bench.small_command,
                       env={"BARE_ACTION": bench.actions["tiny"]}) as small, \
            started_proxy(bench.action_dir("tiny"), command=bench.image_command,
                          env={"__OW_ALLOW_CONCURRENT": "true"}) as proxy:
        for _ in range(bench.counts["throughput_rounds"]):
            for name, server in (("small", small), ("proxy", proxy)):
                before = context_switches()
                seconds, failures = hammer(server.run_ok, calls, clients)
                switches[name].append((context_switches() - before) / calls)
                if failures:
                    raise ProxyError("%d failed runs, e.g. %s" % (len(failures), failures[0]))
                rates[name].append(calls / seconds)
    small_rate, proxy_rate = statistics.median(rates["small"]), statistics.median(rates["proxy"])
    return [
        Figure("image_throughput_%d" % clients, "throughput, %d clients, instant action"
               % clients, proxy_rate, "req/s", small_rate, "60-line server", compare="ratio",
               target=lambda value, vs: vs >= 0.95, target_label=">= x0.95 floor"),
        Figure("image_switches_%d" % clients, "context switches per request, %d clients"
               % clients, statistics.median(switches["proxy"]), "",
               statistics.median(switches["small"]), "60-line server", compare="ratio"),
    ]


def measure_function_round_trip(bench):
    """A warm Python function's /run: owproxy's worker against the Python runtime
    image's Go proxy and launcher, interleaved."""
    label = "warm Python function /run vs the runtime image"
    if not (GO_PROXY and LAUNCHER):
        return Figure("image_function", label, None, "ms", note=NO_GO)
    with started_proxy(bench.action_dir(), {"code": PYTHON_FUNCTION},
                       command=bench.image_command) as proxy, \
            go_proxy(bench, runtime_image_function(bench), {"OW_WAIT_FOR_ACK": "1"}) as image:
        value, floor = interleaved_ms([proxy.run, image.run], bench.counts["warm_rounds"],
                                      bench.counts["warm_calls"])
    return Figure("image_function", label, value, "ms", floor, "Go proxy + launcher.py",
                  compare="ratio", target=lambda value, vs: vs <= 1.25,
                  target_label="<= x1.25 floor")


def measure_warm_runs(bench):
    """Exec, loop and Python-function modes, each interleaved with the exec floor and
    with a bare stdlib HTTP server (what any ThreadingHTTPServer proxy pays)."""
    floor_call = subprocess_floor(bench.actions["tiny"])
    modes = [
        ("exec", "tiny", {}, ()),
        ("loop", "loop", {}, ("--loop",)),
        ("function", None, {"code": PYTHON_FUNCTION}, ()),
    ]
    figures, exec_floors, http_floors = [], [], []
    bare_command = [PYTHON, "-c", BARE_SERVER]
    with started_proxy(bench.action_dir(), command=bare_command) as bare, \
            started_proxy(bench.action_dir(), command=bare_command,
                          env={"BARE_ACTION": bench.actions["tiny"]}) as bare_exec:
        for mode, action, init_value, args in modes:
            label = "warm /run, %s mode" % mode
            try:
                with started_proxy(bench.action_dir(action), init_value, args) as proxy:
                    value, floor, http, bare_exec_ms = interleaved_ms(
                        [proxy.run, floor_call, bare.run, bare_exec.run],
                        bench.counts["warm_rounds"], bench.counts["warm_calls"])
            except (ProxyError, OSError, ValueError) as error:
                figures.append(error_figure("warm_" + mode, label, error))
                continue
            exec_floors.append(floor)
            http_floors.append(http)
            if mode == "exec":
                figures.append(Figure("warm_floor_bare_exec",
                                      "floor: bare ThreadingHTTPServer + subprocess.run",
                                      bare_exec_ms, "ms"))
                figures.append(Figure("warm_exec", label, value, "ms", bare_exec_ms,
                                      "bare server + action", target=lambda value, vs: vs <= 0.15,
                                      target_label="<= floor + 0.15 ms",
                                      note="%.3f ms over subprocess.run of the action"
                                      % (value - floor)))
            else:
                figures.append(Figure("warm_" + mode, label, value, "ms", http, "HTTP floor",
                                      target=lambda value, vs: vs <= 0.25,
                                      target_label="<= floor + 0.25 ms",
                                      note="x%.2f of subprocess.run of the exec action"
                                      % (value / floor)))
    figures.append(measure_trivial_route(bench))
    if http_floors:
        figures[:0] = [
            Figure("warm_floor_http", "floor: bare ThreadingHTTPServer POST",
                   statistics.median(http_floors), "ms"),
            Figure("warm_floor_exec", "floor: subprocess.run of the action",
                   statistics.median(exec_floors), "ms"),
        ]
    return figures


def measure_trivial_route(bench):
    """The proxy's own HTTP handling: GET /healthz, against the bare server's GET."""
    bare_command = [PYTHON, "-c", BARE_SERVER]
    with started_proxy(bench.action_dir(), command=bare_command) as bare, \
            started_proxy(bench.action_dir("tiny")) as proxy:
        value, floor = interleaved_ms([lambda: proxy.get("/healthz"), lambda: bare.get("/")],
                                      bench.counts["warm_rounds"], bench.counts["warm_calls"])
    return Figure("trivial_route", "GET /healthz, the proxy's own HTTP handling", value, "ms",
                  floor, "bare server GET", compare="ratio",
                  target=lambda value, vs: vs <= 1.0, target_label="<= x1.00 floor")


def measure_throughput(bench):
    floor = CLIENTS / SLEEP_SECONDS
    calls = bench.counts["throughput_calls"]
    rates = []
    with started_proxy(bench.action_dir("sleep"),
                       env={"__OW_ALLOW_CONCURRENT": "true"}) as proxy:
        for _ in range(bench.counts["throughput_rounds"]):
            seconds, failures = hammer(proxy.run_ok, calls)
            if failures:
                raise ProxyError("%d failed runs, e.g. %s" % (len(failures), failures[0]))
            rates.append(calls / seconds)
    return [Figure("throughput", "throughput, %d clients, 50 ms action" % CLIENTS,
                   statistics.median(rates), "req/s", floor, "8 / 0.05 s", compare="ratio",
                   target=lambda value, vs: vs >= 0.8, target_label=">= 80% of floor")]


def measure_memory(bench):
    """A fresh proxy per repeat, so that VmHWM is the peak of that one flood; no /run
    before the flood, so that the idle figure is the state right after /init."""
    idle, idle_compiled, peak, seconds = [], [], [], []
    for _ in range(bench.counts["flood_rounds"]):
        with Proxy(bench.action_dir("flood"), command=bench.compiled_command) as proxy:
            idle_compiled.append(idle_rss_mib(proxy))
        with Proxy(bench.action_dir("flood")) as proxy:
            idle.append(idle_rss_mib(proxy))
            start = time.perf_counter()
            status, body = proxy.run(timeout=600)
            seconds.append(time.perf_counter() - start)
            if status != 200:
                raise ProxyError("the flood /run answered %d %s" % (status, body[:200]))
            peak.append(proxy.status_kib("VmHWM") / 1024)
    floor_seconds = statistics.median(pipe_floor_seconds(bench.actions["flood"])
                                      for _ in range(bench.counts["flood_rounds"]))
    bare = interpreter_rss_mib([])
    interpreter = interpreter_rss_mib(bench.modules)
    script = interpreter_rss_mib(bench.modules, bench.script_holding_owproxy())
    idle_mib = statistics.median(idle)
    flood_seconds = statistics.median(seconds)
    return [
        Figure("rss_floor_bare", "floor: bare interpreter, RSS", bare, "MiB"),
        Figure("rss_floor", "floor: interpreter + the same imports, RSS", interpreter, "MiB",
               bare, "bare"),
        Figure("rss_floor_script", "floor: the same, run as a script the size of owproxy.py",
               script, "MiB", interpreter, "interpreter"),
        Figure("rss_idle", "proxy RSS idle after /init", idle_mib, "MiB", script,
               "script floor", target=lambda value, vs: vs < 2, target_label="< floor + 2 MiB"),
        Figure("rss_idle_compiled", "the same, started as python3 owproxy.pyc",
               statistics.median(idle_compiled), "MiB", interpreter, "interpreter",
               target=lambda value, vs: value < 20, target_label="< 20 MiB"),
        Figure("rss_flood_peak", "proxy peak (VmHWM), 300 MB of logs", statistics.median(peak),
               "MiB", idle_mib, "idle", target=lambda value, vs: value < 40,
               target_label="< 40 MiB"),
        Figure("flood_rate", "log forwarding rate during the flood",
               FLOOD_BYTES / MIB / flood_seconds, "MiB/s", FLOOD_BYTES / MIB / floor_seconds,
               "pipe to /dev/null", compare="ratio", target=lambda value, vs: vs >= 0.5,
               target_label=">= 50% of floor",
               note="%.2f s for the 300 MB run" % flood_seconds),
    ]


def pipe_floor_seconds(executable):
    """The flood action's stdout read by Python in 64 KiB chunks and written to
    /dev/null: what forwarding its logs costs before any line is looked at."""
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        process = subprocess.Popen([executable, "{}"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE)
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            sink.write(chunk)
        process.stdout.close()
        process.wait()
    return time.perf_counter() - start


def idle_rss_mib(proxy):
    """VmRSS of a proxy just after its /init."""
    status, body = proxy.init({})
    if status != 200:
        raise ProxyError("/init answered %d" % status)
    return proxy.status_kib("VmRSS") / 1024


LINK_FLOOD_BYTES = 400 * MIB


def link_flood_zip():
    """A zip of about 400 KB whose one symbolic link entry inflates to 400 MB."""
    import io
    import stat
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("exec", "#!/bin/sh\necho '{}'\n")
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as target:
            for _ in range(LINK_FLOOD_BYTES // MIB):
                target.write(b"a" * MIB)
    return buffer.getvalue()


def measure_archive(bench):
    """Peak memory of an /init whose zip's link entry would inflate to 400 MB: the
    proxy reads a link's target only up to PATH_MAX and refuses it."""
    import base64
    data = link_flood_zip()
    with Proxy(bench.action_dir()) as proxy:
        proxy.connect(10.0, 10.0).close()
        before = proxy.status_kib("VmHWM") / 1024
        status, body = proxy.init({"code": base64.b64encode(data).decode(), "binary": True})
        if status != 502:
            raise ProxyError("the link flood /init answered %d %s" % (status, body[:200]))
        peak = proxy.status_kib("VmHWM") / 1024
    return [Figure("archive_link_flood_peak", "proxy peak (VmHWM), zip with a 400 MB link",
                   peak, "MiB", before, "before", target=lambda value, vs: vs < 32,
                   target_label="< before + 32 MiB",
                   note="an /init of %d KB, refused" % (len(data) // 1024))]


DEEP_LEVELS = 800  # folders nested in the deep-name tar.gz (shutil.rmtree, which
# cleans the scratch folder up, recurses: keep it under the recursion limit)


def deep_name_tar():
    """A tar.gz of folders nested DEEP_LEVELS deep, one-letter names, then an exec:
    a link-safety check that compares each name's prefixes is quadratic in depth."""
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        for depth in range(1, DEEP_LEVELS + 1):
            info = tarfile.TarInfo("a/" * depth)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(info)
        script = b"#!/bin/sh\necho '{}'\n"
        info = tarfile.TarInfo("exec")
        info.size, info.mode = len(script), 0o755
        archive.addfile(info, io.BytesIO(script))
    return buffer.getvalue()


def pax_header_tar(count=400):
    """A tar.gz of ``count`` 1 MiB global pax headers (tarfile keeps every global
    one for the rest of the archive), then an exec: a few hundred KB of request."""
    import gzip
    import tarfile
    blocks = [tarfile.TarInfo.create_pax_global_header({"comment%d" % number: "x" * MIB})
              for number in range(count)]
    script = b"#!/bin/sh\necho '{}'\n"
    info = tarfile.TarInfo("exec")
    info.size, info.mode = len(script), 0o755
    blocks += [info.tobuf(tarfile.USTAR_FORMAT), script.ljust(tarfile.BLOCKSIZE, b"\0"),
               b"\0" * tarfile.RECORDSIZE]
    return gzip.compress(b"".join(blocks), 9)


def timed_init(bench, data):
    """Seconds and peak memory (VmHWM, MiB; and before) of an /init of ``data``."""
    import base64
    with Proxy(bench.action_dir()) as proxy:
        proxy.connect(10.0, 10.0).close()
        before = proxy.status_kib("VmHWM") / 1024
        start = time.perf_counter()
        status, body = proxy.init({"code": base64.b64encode(data).decode(), "binary": True})
        seconds = time.perf_counter() - start
        peak = proxy.status_kib("VmHWM") / 1024
    return status, body, seconds, peak, before


def measure_tar_headers(bench):
    """A deep-name tar.gz installs in time linear in its names; a tar.gz of global
    pax headers is refused with memory the request's plus a constant."""
    deep = deep_name_tar()
    status, body, seconds, peak, before = timed_init(bench, deep)
    if status != 200:
        raise ProxyError("the deep-name /init answered %d %s" % (status, body[:200]))
    floor = elapsed(lambda: deep_name_floor(bench))
    figures = [Figure("archive_deep_names_s", "/init of a tar.gz %d folders deep" % DEEP_LEVELS,
                      seconds, "s", floor, "mkdir of the same folders", compare="ratio",
                      target=lambda value, vs: vs < 20, target_label="< 20 x floor",
                      note="%d KB request, peak %.0f MiB (%.0f before)"
                           % (len(deep) // 1024, peak, before))]
    pax = pax_header_tar()
    status, body, seconds, peak, before = timed_init(bench, pax)
    if status != 502:
        raise ProxyError("the pax-header /init answered %d %s" % (status, body[:200]))
    request_mib = len(pax) * 4 / 3 / MIB
    figures.append(Figure("archive_pax_headers_peak", "proxy peak (VmHWM), tar.gz of 1 MiB "
                          "global pax headers", peak, "MiB", before, "before",
                          target=lambda value, vs: vs < 32 + 3 * request_mib,
                          target_label="< before + 3 x request + 32 MiB",
                          note="an /init of %d KB, refused in %.2f s"
                               % (len(pax) * 4 // 3 // 1024, seconds)))
    return figures


def deep_name_floor(bench):
    """The floor of the deep-name install: the same folders made by os.makedirs."""
    import shutil
    folder = os.path.join(bench.action_dir(), "floor")
    os.makedirs(os.path.join(folder, *(["a"] * DEEP_LEVELS)))
    shutil.rmtree(folder)


def measure_result_flood(bench):
    """A fresh --loop proxy per repeat, whose one /run gets a 300 MB result line."""
    idle, peak = [], []
    for _ in range(bench.counts["flood_rounds"]):
        with Proxy(bench.action_dir("fd3flood"), args=["--loop"]) as proxy:
            idle.append(idle_rss_mib(proxy))
            status, body = proxy.run(timeout=600)
            if status != 502 or b"larger than the limit" not in body:
                raise ProxyError("the fd 3 flood answered %d %s" % (status, body[:200]))
            peak.append(proxy.status_kib("VmHWM") / 1024)
    idle_mib = statistics.median(idle)
    bound = idle_mib + 2 * RESULT_LIMIT_MIB + 16
    return [Figure("rss_result_flood_peak", "proxy peak (VmHWM), 300 MB result line on fd 3",
                   statistics.median(peak), "MiB", idle_mib, "idle",
                   target=lambda value, vs, bound=bound: value < bound,
                   target_label="< %.0f MiB" % bound)]


def interpreter_rss_mib(modules, script=None):
    """VmRSS of an interpreter that has imported ``modules`` and waits: run as
    ``-c``, or as ``script``, which must end by running ``code``."""
    code = "%s; print('ready', flush=True); sys.stdin.read()" % import_statement(
        ["sys"] + list(modules))
    if script:
        with open(script, "a") as file:
            file.write(code + "\n")
    process = subprocess.Popen([PYTHON] + ([script] if script else ["-c", code]),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        process.stdout.readline()
        return proc_status_kib(process.pid, "VmRSS") / 1024
    finally:
        process.stdin.close()
        process.stdout.close()
        process.wait()


def measure_soak(bench):
    warmup, total = bench.counts["soak_warmup"], bench.counts["soak_calls"]
    with started_proxy(bench.action_dir("tiny"),
                       env={"__OW_ALLOW_CONCURRENT": "true"}) as proxy:
        _, failures = hammer(proxy.run_ok, warmup)
        settle(lambda: not proxy.leftovers())
        rss_before, fds_before = proxy.status_kib("VmRSS"), proxy.fd_count()
        seconds, more = hammer(proxy.run_ok, total - warmup)
        failures += more
        settle(lambda: proxy.fd_count() <= fds_before and not proxy.leftovers())
        rss_after, fds_after = proxy.status_kib("VmRSS"), proxy.fd_count()
        leftovers = proxy.leftovers()
        exit_status = proxy.stop()
    note = "%d runs in %.1f s (%.0f req/s)" % (total - warmup, seconds, (total - warmup) / seconds)
    if failures:
        note += "; first failure: %s" % failures[0]
    return [
        Figure("soak_failures", "soak: failed runs of %d" % total, len(failures), "runs", 0,
               "none", target=lambda value, vs: value == 0, target_label="0", note=note),
        Figure("soak_rss_growth", "soak: RSS growth after the warm-up",
               (rss_after - rss_before) / 1024, "MiB", 0.0, "none",
               target=lambda value, vs: value < 2, target_label="< 2 MiB",
               note="RSS %.2f -> %.2f MiB" % (rss_before / 1024, rss_after / 1024)),
        Figure("soak_leftover_processes", "soak: processes left", len(leftovers), "procs", 0,
               "none", target=lambda value, vs: value == 0, target_label="0"),
        Figure("soak_leftover_fds", "soak: descriptors open at the end", fds_after, "fds",
               fds_before, "after warm-up", target=lambda value, vs: vs <= 0,
               target_label="<= after warm-up"),
        Figure("sigterm_exit_status", "exit status on SIGTERM", exit_status, "", 0, "clean",
               target=lambda value, vs: value == 0, target_label="0"),
    ]


def measure_payload(bench):
    """The request encoded once, as the floor's input is: the client's own JSON is
    not the proxy's time."""
    params = {"data": "x" * PAYLOAD_BYTES}
    request = json.dumps({"value": params, "activation_id": "bench"}).encode()
    with started_proxy(bench.action_dir("echo"), expected=PARAMS) as proxy:
        def echo():
            status, body = proxy.post("/run", request)
            if status != 200 or len(body) < PAYLOAD_BYTES:
                raise ProxyError("the echo /run answered %d with %d bytes" % (status, len(body)))

        value, floor = interleaved_ms([echo, subprocess_floor(bench.actions["echo"], params)],
                                      bench.counts["payload_rounds"],
                                      bench.counts["payload_calls"])
    return [Figure("payload_1mib", "1 MiB argument echoed via stdin, per /run", value, "ms",
                   floor, "subprocess.run", compare="ratio", target=lambda value, vs: vs <= 3,
                   target_label="<= x3 floor")]


def measure_attacks(bench):
    """Each attack on a fresh proxy: its idle RSS, the /run latency before and
    during the attack, and its VmHWM at the end, against the README's bound."""
    raise_descriptor_limit(2 * SLOW_CONNECTIONS + 200)
    max_body = bench.counts["attack_max_body"]
    body_memory = 16 * max_body  # a --max-body /run with its parse fits
    bodies_bound = (BODY_MEMORY_TIMES * body_memory / MIB
                    + BODY_CLIENTS * (CONNECTION_KIB + MAX_HEADER_KIB) / 1024)
    budget = {"OWPROXY_MAX_BODY": str(max_body), "OWPROXY_BODY_MEMORY": str(body_memory),
              "__OW_ALLOW_CONCURRENT": "true"}
    attacks = [
        ("slow", "%d connections sending a head slowly" % SLOW_CONNECTIONS, {},
         slow_heads, SLOW_CONNECTIONS * (CONNECTION_KIB + MAX_HEADER_KIB) / 1024),
        ("headers", "%d connections holding a 60 KB header line" % HEADER_CONNECTIONS, {},
         long_header_lines, HEADER_CONNECTIONS * (CONNECTION_KIB + MAX_HEADER_KIB) / 1024),
        ("bodies", "%d concurrent bodies at --max-body %d MiB" % (BODY_CLIENTS, max_body // MIB),
         budget, lambda proxy: big_bodies(proxy, string_body(max_body)), bodies_bound),
        ("containers", "%d concurrent [{},{},...] bodies of %d MiB"
         % (BODY_CLIENTS, max_body // 4 // MIB), budget,
         lambda proxy: big_bodies(proxy, containers_body(max_body // 4)), bodies_bound),
        ("chunks", "%d concurrent bodies of 128 KiB in 1-byte chunks" % BODY_CLIENTS, budget,
         lambda proxy: big_bodies(proxy, string_body(128 * 1024), chunked=True), bodies_bound),
        ("trickle", "%d bodies trickling 1-byte chunks, a send each" % BODY_CLIENTS, budget,
         trickled_chunks, bodies_bound),
    ]
    figures = []
    for key, label, env, attack, allowance in attacks:
        with started_proxy(bench.action_dir("tiny"), env=env) as proxy:
            idle = proxy.status_kib("VmRSS") / 1024
            before = median_ms(checked_run(proxy), bench.counts["attack_calls"])
            with attack(proxy) as during:
                during_ms = median_ms(checked_run(proxy), bench.counts["attack_calls"])
                during()
            peak = proxy.status_kib("VmHWM") / 1024
        bound = idle + allowance
        figures.append(Figure("attack_%s_peak" % key, "attack: VmHWM, " + label, peak, "MiB",
                              idle, "idle", target=lambda value, vs, bound=bound: value <= bound,
                              target_label="<= %.0f MiB" % bound))
        figures.append(Figure("attack_%s_run" % key, "attack: /run during " + label, during_ms,
                              "ms", before, "before", compare="ratio",
                              target=lambda value, vs: vs <= 1.3, target_label="<= x1.3 (noise)"))
    figures.append(preflight_figure(bench, dict(budget, __OW_RUNTIME_PLATFORM="knative"),
                                    bodies_bound))
    return figures


def preflight_figure(bench, env, allowance):
    """Knative's OPTIONS preflights with bodies, which once were read outside the
    budget; a Knative proxy has no /run to time beside them."""
    with Proxy(bench.action_dir("tiny"), env=env) as proxy:
        proxy.connect(10.0, 10.0).close()
        idle = proxy.status_kib("VmRSS") / 1024
        with preflights(proxy) as finish:
            finish()
        peak = proxy.status_kib("VmHWM") / 1024
    bound = idle + allowance
    return Figure("attack_preflights_peak", "attack: VmHWM, %d Knative preflights with "
                  "32 MiB bodies" % BODY_CLIENTS, peak, "MiB", idle, "idle",
                  target=lambda value, vs: value <= bound, target_label="<= %.0f MiB" % bound)


def raise_descriptor_limit(wanted):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:  # the proxies started next inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def checked_run(proxy):
    def call():
        if not proxy.run_ok():
            raise ProxyError("a /run during the attack failed")
    return call


@contextlib.contextmanager
def slow_heads(proxy):
    """Connections that each start a request head and add a byte now and then."""
    sockets = [open_connection(proxy.port, 30) for _ in range(SLOW_CONNECTIONS)]
    try:
        for sock in sockets:
            sock.sendall(b"POST /run HTTP/1.1\r\nX-Slow: ")
        yield lambda: trickle(sockets)
    finally:
        for sock in sockets:
            sock.close()


def trickle(sockets):
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.sendall(b"x")
    time.sleep(0.5)


@contextlib.contextmanager
def long_header_lines(proxy):
    """Connections that each send 60 KB of one header line and never end it."""
    sockets = [open_connection(proxy.port, 30) for _ in range(HEADER_CONNECTIONS)]
    try:
        for sock in sockets:
            sock.sendall(b"POST /run HTTP/1.1\r\nX-Long: " + b"a" * 60000)
        yield lambda: time.sleep(0.5)
    finally:
        for sock in sockets:
            sock.close()


def string_body(size):
    return b'{"value": {"x": "' + b"y" * (size - 20) + b'"}}'


def containers_body(size):
    """Empty objects, the shape that expands most when parsed."""
    return b'{"value": {"x": [' + b",".join([b"{}"] * (size // 3)) + b"]}}"


def raw_status(port, request):
    """The status of one request sent as it is on a connection of its own."""
    with open_connection(port, 120) as sock:
        sock.sendall(request)
        return int(sock.makefile("rb").readline().split()[1])


@contextlib.contextmanager
def preflights(proxy):
    """OPTIONS requests whose bodies of 32 MiB mean nothing."""
    request = (b"OPTIONS / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (32 * MIB)
               + b"x" * (32 * MIB))
    with client_threads(lambda: raw_status(proxy.port, request), "preflights") as finish:
        yield finish


@contextlib.contextmanager
def big_bodies(proxy, body, chunked=False):
    """Clients that each post ``body`` to /run, all at once; ``chunked``: in chunks
    of one byte."""
    if chunked:
        data = b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n"
        request = (b"POST /run HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                   b"Connection: close\r\n\r\n" + data)

    def post():
        return raw_status(proxy.port, request) if chunked else proxy.post("/run", body)[0]

    with client_threads(post, "large bodies") as finish:
        yield finish


# Clients that each send a /run body in 1-byte chunks, one send() per chunk, from a
# process of their own (their loop would hold the GIL of the bench's own client).
TRICKLER = r'''
import select, socket, sys
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1])), 120)
         for _ in range(int(sys.argv[2]))]
for sock in socks:
    sock.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Connection: close\r\n\r\n11\r\n{\"value\": {\"x\": \"\r\n")
print("sending", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:  # until the bench closes it
    for sock in socks:
        sock.sendall(b"1\r\ny\r\n")
for sock in socks:
    sock.sendall(b"3\r\n\"}}\r\n0\r\n\r\n")
print(" ".join(sock.makefile("rb").readline().split()[1].decode() for sock in socks))
'''


@contextlib.contextmanager
def trickled_chunks(proxy):
    """``BODY_CLIENTS`` bodies trickled for as long as the /run latency is measured."""
    trickler = subprocess.Popen([PYTHON, "-c", TRICKLER, str(proxy.port), str(BODY_CLIENTS)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def finish():
        trickler.stdin.close()
        statuses = trickler.stdout.read().split()
        trickler.wait()
        if statuses != ["200"] * BODY_CLIENTS:
            raise ProxyError("the trickled bodies were answered %s" % statuses)

    try:
        if trickler.stdout.readline() != "sending\n":
            raise ProxyError("the trickling clients did not start")
        yield finish
    finally:
        if trickler.poll() is None:
            trickler.kill()
            trickler.wait()


@contextlib.contextmanager
def client_threads(call, what):
    """``BODY_CLIENTS`` threads that each make ``call`` (a status) at once."""
    results = []
    threads = [threading.Thread(target=lambda: results.append(call()))
               for _ in range(BODY_CLIENTS)]
    for thread in threads:
        thread.start()

    def finish():
        for thread in threads:
            thread.join()
        if results != [200] * BODY_CLIENTS:
            raise ProxyError("the %s were answered %s" % (what, results))

    try:
        yield finish
    finally:
        finish()


MEASUREMENTS = [
    ("image", measure_image),
    ("cold", measure_cold_start),
    ("warm", measure_warm_runs),
    ("throughput", measure_throughput),
    ("memory", measure_memory),
    ("archive", measure_archive),
    ("tar", measure_tar_headers),
    ("result", measure_result_flood),
    ("soak", measure_soak),
    ("payload", measure_payload),
    ("attack", measure_attacks),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument("--only", default="", metavar="NAMES",
                        help="comma-separated subset of: " + ", ".join(
                            name for name, _ in MEASUREMENTS))
    options = parser.parse_args()
    wanted = set(filter(None, options.only.split(","))) or {name for name, _ in MEASUREMENTS}
    counts = COUNTS["quick" if options.quick else "full"]
    started = time.perf_counter()
    figures = []
    with tempfile.TemporaryDirectory(prefix="owproxy-bench-") as scratch:
        bench = Bench(counts, scratch)
        print("owproxy bench: %s (Python %s), actions in %s, %s run"
              % (OWPROXY, sys.version.split()[0], bench.action_kind,
                 "quick" if options.quick else "full"), flush=True)
        for name, measure in MEASUREMENTS:
            if name not in wanted:
                continue
            try:
                figures.extend(measure(bench))
            except Exception as error:  # one broken measurement must not hide the others
                figures.append(error_figure(name, name, "%s: %s" % (type(error).__name__, error)))
    print()
    print_table(figures)
    summary = {
        "python": PYTHON, "python_version": sys.version.split()[0], "owproxy": OWPROXY,
        "actions": bench.action_kind, "quick": options.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "figures": {figure.key: figure.as_json() for figure in figures},
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
