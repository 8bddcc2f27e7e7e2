"""End-to-end tests of owproxy.py: real proxy processes on loopback, real actions.

Every test starts the proxy as a subprocess (under $OWPROXY_PYTHON, default this
interpreter) and talks HTTP to it the way the invoker does.  The sections follow
owproxy.py's; unit tests of inner functions stand beside the end-to-end tests of
the behaviour they test.
"""

import base64
import contextlib
import ctypes
import http.client
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

import owproxy

HERE = Path(__file__).resolve().parent
OWPROXY = str(HERE / "owproxy.py")
PYTHON = os.environ.get("OWPROXY_PYTHON") or sys.executable
SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
RUN_TIMED_OUT = {"error": "The action exceeded its time limit and was stopped at its deadline."}
RUN_EXITED = {"error": "The action exited before it returned a result. See logs for details."}
GO_START_FAILED = {"error": "Cannot start action. Check logs for details."}
BAD_RESULT = {"error": "The action did not return a dictionary or array."}
INIT_FAILED = {"error": "The action failed to generate or locate a binary. See logs for details."}


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def proxy_command(*args):
    """Under ``make test``, coverage follows every Python subprocess by itself."""
    return [PYTHON, OWPROXY] + list(args)


def proxy_env(extra=None, other_user=False):
    """This environment without the proxy's settings, nor PYTHONUNBUFFERED (a
    container has none); without coverage's either for a process that runs as
    another user, since it could not write coverage's data."""
    unwanted = ("__OW_", "OWPROXY_", "COVERAGE_") if other_user else ("__OW_", "OWPROXY_")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(unwanted)
           and key not in ("PROXY_ALLOW_REINIT", "FLASK_PROXY_PORT", "PYTHONUNBUFFERED")}
    env.update(extra or {})
    return env


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body) if self.body else None

    def __repr__(self):
        return "<%d %r>" % (self.status, self.body[:300])


class Proxy:
    """One proxy process, its action directory, and its two log streams.

    It listens where ``host_args`` say (by default ``--host 127.0.0.1``; ``[]`` for
    the proxy's default), on a free port given by ``--port`` or, with ``port_env``,
    by those environment variables; it is ready once ``address`` accepts.  A
    ``command(port, action_dir)`` gives another command line to start it with, and
    the extra environment for it; ``cwd`` where it starts, ``own_session`` whether
    in a session of its own (stopped as a whole: ``make run``)."""

    def __init__(self, root, args=(), env=None, action_dir=None, start=True, preexec_fn=None,
                 command=None, host_args=None, port_env=None, address="127.0.0.1", cwd=None,
                 own_session=False):
        self.command = command or self.command
        self.cwd, self.own_session = cwd, own_session
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.action_dir = Path(action_dir) if action_dir else self.root / "action"
        self.action_dir.mkdir(parents=True, exist_ok=True)
        self.host_args = ["--host", "127.0.0.1"] if host_args is None else list(host_args)
        self.port_env, self.address = port_env, address
        self.args, self.preexec_fn = list(args), preexec_fn
        self.env = proxy_env(env, other_user=preexec_fn is not None)
        self.out_path, self.err_path = self.root / "proxy.out", self.root / "proxy.err"
        self.process = None
        if start:
            self.start()

    def command(self, port, action_dir):
        """The command line that starts this proxy on ``port``, and its extra environment."""
        if self.port_env:
            return (proxy_command(*self.host_args + ["--action-dir", action_dir]),
                    {name: str(port) for name in self.port_env})
        return proxy_command(*self.host_args + ["--port", str(port), "--action-dir",
                                                action_dir]), {}

    def start(self):
        for _ in range(5):
            # Held until the proxy listens, so that no other suite's proxy is given the
            # port meanwhile and answers in its place.
            with owproxy.reserved_port() as reservation:
                self.port = reservation.getsockname()[1]
                argv, extra = self.command(self.port, str(self.action_dir))
                with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                    self.process = subprocess.Popen(argv + self.args, stdout=out, stderr=err,
                                                    env=dict(self.env, **extra),
                                                    preexec_fn=self.preexec_fn, cwd=self.cwd,
                                                    start_new_session=self.own_session)
                ready = self.wait_ready()
            if ready:
                return self
            if "Address already in use" not in self.err_path.read_text():
                raise AssertionError("proxy did not start: %s" % self.err_path.read_text())
        raise AssertionError("no free port")

    def wait_ready(self, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            if self.process.poll() is not None:
                return False
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.01)
        raise AssertionError("proxy not listening after %ss" % timeout)

    def request(self, method, path, body=None, headers=None, connection=None, timeout=60):
        conn = connection or http.client.HTTPConnection(self.address, self.port, timeout=timeout)
        if isinstance(body, (dict, list)) or body is None and method == "POST":
            body = json.dumps(body if body is not None else {}).encode()
        elif isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        response = Response(reply.status, dict(reply.getheaders()), reply.read())
        if connection is None:
            conn.close()
        return response

    def post(self, path, body=None, **kwargs):
        return self.request("POST", path, body, **kwargs)

    def init(self, code=None, binary=False, main="main", env=None, **value):
        value.update(code=code, binary=binary, main=main)
        if env is not None:
            value["env"] = env
        return self.post("/init", {"value": value})

    def init_zip(self, files, **kwargs):
        return self.init(make_zip(files), binary=True, **kwargs)

    def run(self, value=None, **fields):
        fields["value"] = {} if value is None else value
        return self.post("/run", fields)

    def logs(self):
        """Both log streams so far, as text."""
        return (self.out_path.read_bytes().decode("utf-8", "replace"),
                self.err_path.read_bytes().decode("utf-8", "replace"))

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.process.poll() is None:
            if self.own_session:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
        return self.process.wait(timeout)


@contextlib.contextmanager
def started_proxies(root):
    """``start(*args, env=None, **options)``: a Proxy in a folder of ``root`` (the
    one way the suite starts a serving proxy); each is stopped at the end."""
    started = []

    def start(*args, env=None, **kwargs):
        proxy = Proxy(Path(root) / ("p%d" % len(started)), args, env, **kwargs)
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            if proxy.process and proxy.process.poll() is None:
                proxy.stop()


@pytest.fixture
def proxies(tmp_path):
    with started_proxies(tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def shared_proxies(tmp_path_factory):
    """For a proxy the tests of a fixture share: their requests must leave it as it
    was, and they must not count its log lines, which the others add to."""
    with started_proxies(tmp_path_factory.mktemp("shared")) as start:
        yield start


@pytest.fixture
def proxy(proxies):
    return proxies()


def make_zip(files):
    """A base64 zip from {name: text or bytes or (content, mode) or ("->", target)}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            mode = 0o755 if name == "exec" else 0o644
            if isinstance(content, tuple) and content[0] == "->":
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(info, content[1])
                continue
            if isinstance(content, tuple):
                content, mode = content
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return base64.b64encode(buffer.getvalue()).decode()


def split_logs(text):
    """The text between sentinels, and how many sentinels there were."""
    return text.replace(SENTINEL, "").strip(), text.count(SENTINEL)


def check_streams(proxy, sentinels=1):
    out, err = proxy.logs()
    (o, out_count), (e, err_count) = split_logs(out), split_logs(err)
    assert (out_count, err_count) == (sentinels, sentinels), (out, err)
    return o, e


def bash(body):
    return "#!/bin/bash\n" + body.strip() + "\n"


def python_script(body):
    return "#!%s\n%s\n" % (PYTHON, body.strip())


ECHO_BASH = bash("""
echo 'hello stdout'
echo 'hello stderr' 1>&2
if [[ -z $1 || $1 == '{}' ]]; then
   echo '{ "msg": "Hello from bash script!" }'
else
   echo $1 # echo the arguments back as the result
fi
""")


STDIN_ECHO_BASH = bash("""
  read inputstring
  echo $inputstring
""")


NOT_JSON = "#!/bin/sh\necho not a json object"


NOBODY = 65534


def gone_or_zombie(pid, timeout=5.0):
    """True once ``pid`` no longer runs: it has exited, or it is a zombie nobody reaps."""
    end = time.time() + timeout
    while True:
        try:
            with open("/proc/%d/stat" % pid) as stat_file:
                state = stat_file.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.time() > end:
            return False
        time.sleep(0.02)


def wait_for(predicate, timeout=10.0):
    """Waits for a condition the test sets up (a marker file ...); True if it came."""
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            return False
        time.sleep(0.01)
    return True


def in_thread(function, *args, **kwargs):
    """Runs ``function`` in a thread; ``join()`` returns its result or raises its error."""
    outcome = {}

    def target():
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as error:  # handed to join()
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout=30):
        thread.join(timeout)
        assert not thread.is_alive(), "still waiting after %ss" % timeout
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    return join


def values_of(pairs, name):
    return [value for key, value in pairs if key.lower() == name.lower()]


class RawResponse:
    """A response as it came: ``headers`` by lower-case name, ``pairs`` in order with
    repeats."""

    def __init__(self, status_line, status, pairs, body):
        self.status_line, self.status, self.pairs, self.body = (
            status_line, status, pairs, body)
        self.headers = {name.lower(): value for name, value in pairs}

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<%s %r %r>" % (self.status_line, self.headers, self.body[:300])


class RawClient:
    """A bare TCP connection to the proxy, for requests http.client will not send."""

    def __init__(self, proxy, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def response(self):
        """The next response; 1xx ones have no body.  Fails if it has no Content-Length."""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the connection closed before a whole response head: %r"
                                     % self.buffer)
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1."), lines[0]
        status = int(lines[0].split()[1])
        pairs = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        if status < 200:
            return RawResponse(lines[0], status, pairs, b"")
        lengths = values_of(pairs, "Content-Length")
        assert len(lengths) == 1, head
        length = int(lengths[0])
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return RawResponse(lines[0], status, pairs, body)

    def closed_by_peer(self):
        """True if the proxy closes the connection with nothing more to say."""
        try:
            return self.buffer == b"" and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def head(method, path, *headers):
    return ("%s %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % (
        method, path, "".join(h + "\r\n" for h in headers))).encode()


def check_json_response(response):
    """What every error answer must carry: a length, a JSON type, an error text."""
    assert response.headers["content-type"] == "application/json", response
    assert int(response.headers["content-length"]) == len(response.body), response
    assert isinstance(response.json["error"], str) and response.json["error"], response


def cli(*args, env=None, timeout=60, preexec_fn=None):
    """owproxy.py run to completion (it must exit by itself), its output captured as text."""
    return subprocess.run(proxy_command(*[str(arg) for arg in args]),
                          env=proxy_env(env, other_user=preexec_fn is not None),
                          preexec_fn=preexec_fn, capture_output=True, text=True,
                          timeout=timeout)


def check_one_line_error(completed, *fragments):
    assert completed.returncode == 2, completed
    err = completed.stderr
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("owproxy: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert completed.stdout == ""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def as_nobody():
    """A preexec_fn that makes the proxy uid and gid 65534 (nobody), or None when the
    tests do not run as root.

    The interpreter under test may live below /root (mode 0700), where nobody could
    not even start it, so the process keeps CAP_DAC_READ_SEARCH (read and search
    anywhere, as an ambient capability so it survives exec).  It grants no write
    access, and access(2), which the proxy's writability check uses, ignores
    capabilities for a non-root user.
    """
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_keepcaps, pr_cap_ambient, pr_cap_ambient_raise, cap_dac_read_search = 8, 47, 2, 2
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = 1 << cap_dac_read_search

    def drop():
        libc.prctl(pr_set_keepcaps, 1, 0, 0, 0)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        if (libc.capset(ctypes.byref(header), data) != 0
                or libc.prctl(pr_cap_ambient, pr_cap_ambient_raise, cap_dac_read_search,
                              0, 0) != 0):
            raise OSError(ctypes.get_errno(), "cannot keep CAP_DAC_READ_SEARCH")

    return drop


@pytest.fixture
def public_dir():
    """A directory anyone may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="owproxy-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(str(path), ignore_errors=True)


ECHO_RESULT = bash("echo '{\"ok\": \"run\"}'")


def check_a_run_still_works(proxy, value=None, result=None):
    """A /run (of ECHO_RESULT, or with ``value`` giving ``result``) answers as ever."""
    response = proxy.run(value, timeout=10)
    assert (response.status, response.json) == (200, result or {"ok": "run"})


def proc_status(pid, field):
    """A number of /proc/PID/status: VmHWM (KiB), Threads, ..."""
    with open("/proc/%d/status" % pid) as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


MIB = 1024 * 1024


def zip_bytes(files):
    return base64.b64decode(make_zip(files))


def pid_namespaces_work():
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def children(pid):
    """The pids whose parent is ``pid``, with their state letter."""
    found = {}
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % name) as stat_file:
                fields = stat_file.read().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        if name.isdigit() and int(fields[1]) == pid:
            found[int(name)] = fields[0]
    return found


LOOP_ACTION = python_script(r'''
import json, os, sys, time
results = os.fdopen(3, "w")
if os.environ.get("__OW_WAIT_FOR_ACK"):  # as openwhisk-runtime-go's launchers check
    results.write('{"ok": true}\n'); results.flush()
count = 0
for line in sys.stdin:
    count += 1
    request = json.loads(line)
    value = request["value"]
    print("log from", request.get("activation_id"), flush=True)
    print("err from", request.get("activation_id"), file=sys.stderr, flush=True)
    if value.get("die"):
        sys.exit(7)
    if value.get("sleep"):
        time.sleep(value["sleep"])
    if value.get("bad"):
        results.write("not json\n"); results.flush()
        continue
    if value.get("rendezvous"):
        folder = value["rendezvous"]
        open(os.path.join(folder, str(os.getpid())), "w").close()
        end = time.time() + 10
        while len(os.listdir(folder)) < value["n"] and time.time() < end:
            time.sleep(0.01)
    results.write(json.dumps({"pid": os.getpid(), "count": count, "request": request,
                              "greeting": os.environ.get("GREETING")}) + "\n")
    results.flush()
''')


EXAMPLES = HERE / "examples"


def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = has_ipv6_loopback()


def answers(address, port):
    """True if the proxy answers /healthz at ``address``, False if nothing listens there."""
    connection = http.client.HTTPConnection(address, port, timeout=30)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except ConnectionRefusedError:
        return False
    finally:
        connection.close()


def dockerfile_lines(path):
    """A Dockerfile's instructions, continuation lines joined."""
    return path.read_text().replace("\\\n", " ").splitlines()


DOCKERFILES = [HERE / "Dockerfile", HERE / "examples" / "c" / "Dockerfile"]


COMPILE_STEP = "RUN python3 -m compileall -b -q /owproxy.py"


IMAGE_START = ["python3", "-S", "/owproxy.pyc"]


# A compile script and launcher under the runtime images' contract, modelled on
# openwhisk-runtime-python's compile and launcher.py: ``compile MAIN SRC BIN``
# turns a main(args) source (sent as exec) or a zip (__main__.py) into BIN/exec,
# a launcher that serves ActionLoop lines, plus BIN/exec.env.
LAUNCHER = r'''
import json, os, sys, traceback
from main__ import MAIN as main
results = os.fdopen(3, "wb")
if os.environ.get("__OW_WAIT_FOR_ACK"):
    results.write(b'{"ok": true}\n'); results.flush()
for line in sys.stdin.buffer:
    request = json.loads(line)
    value = request.pop("value", {})
    for key, field in request.items():
        os.environ["__OW_" + key.upper()] = str(field)
    try:
        result = main(value)
    except Exception as error:
        traceback.print_exc()
        result = {"error": str(error)}
    sys.stdout.flush(); sys.stderr.flush()
    results.write(json.dumps(result, ensure_ascii=False).encode("utf-8") + b"\n")
    results.flush()
'''


COMPILE_SCRIPT = python_script(r'''
import json, os, shutil, sys
main, src, bin = sys.argv[1:]
launcher = %r
for name in ("exec", "__main__.py"):
    if os.path.exists(os.path.join(src, name)):
        os.rename(os.path.join(src, name), os.path.join(src, "main__.py"))
with open(os.path.join(src, "exec__.py"), "w") as file:
    file.write(launcher.replace("MAIN", main))
with open(os.path.join(src, "compiler_env.json"), "w") as file:
    json.dump(dict(os.environ, cwd=os.getcwd()), file)
shutil.rmtree(bin)
shutil.move(src, bin)
with open(os.path.join(bin, "exec"), "w") as file:
    file.write('#!/bin/bash\ncd "$(dirname $0)"\nexec %s -u exec__.py "$@"\n')
if os.environ.get("__OW_EXECUTION_ENV"):
    with open(os.path.join(bin, "exec.env"), "w") as file:
        file.write(os.environ["__OW_EXECUTION_ENV"] + "\n")
''' % (LAUNCHER, PYTHON))


BAD_COMPILERS = {
    "warns": (bash("echo 'warning: this compiler always complains'"),
              "warning: this compiler always complains\n"),
    "exits silently": (bash("exit 3"), "exit status 3"),
    "makes no exec": (bash("mkdir -p \"$3\""), "cannot compile"),
    "hangs": (bash("echo $$ > \"$PIDFILE\"; sleep 600"),
              "the compiler did not finish within 3 seconds"),
}


PY_SOURCE = '''
import os
def hello(args):
    return {"greeting": "hello " + args.get("name", "stranger"),
            "execution_env": os.environ.get("__OW_EXECUTION_ENV"),
            "api_host": os.environ.get("__OW_API_HOST"),
            "activation": os.environ.get("__OW_ACTIVATION_ID"),
            "init_env": os.environ.get("FROM_INIT")}
'''


RUNTIME_IMAGE_ENV = {"OW_WAIT_FOR_ACK": "1", "OW_EXECUTION_ENV": "test/python-v1",
                     "OW_LOG_INIT_ERROR": "1", "__OW_API_HOST": "https://whisk.example"}


def compiler_file(tmp_path, script, name="compile"):
    path = tmp_path / name
    path.write_text(script)
    path.chmod(0o755)
    return str(path)


def runtime_proxy(proxies, tmp_path, script=COMPILE_SCRIPT, env=None):
    """A --loop proxy set up as a runtime image sets up the Go proxy."""
    settings = dict(RUNTIME_IMAGE_ENV, OW_COMPILER=compiler_file(tmp_path, script))
    settings.update(env or {})
    return proxies("--loop", env=settings)


READ_LINE_LOOP = bash("""
while read line; do
  echo "$line" >&3
done
""")


def too_large(size, limit):
    return {"error": "The action returned a result of %d bytes, larger than the limit of %d "
                     "bytes." % (size, limit)}


LONG_RESULT = '{"x": "%s"}' % ("y" * 3002)  # 3011 bytes


WRITTEN_RESULT = '{"b":1,"a":[1, 2.50],"\u00e9":"\u00fc \\u00e9"}'


# ---------------------------------------------------------------------------
# Configuration: settings, flags, environment variables
# ---------------------------------------------------------------------------

def test_help_lists_every_environment_variable():
    completed = cli("--help", env={"COLUMNS": "100"})
    assert completed.returncode == 0, completed
    text = completed.stdout
    for setting in owproxy.SETTINGS:
        assert setting.env in text, setting.env
        assert setting.flag in text, setting.flag


def test_the_readme_lists_every_setting():
    readme = (HERE / "README.md").read_text()
    for setting in owproxy.SETTINGS:
        envs = ", else ".join("`%s`" % env for env in setting.envs)
        assert "| `%s` | %s | %s |" % (setting.flag, envs, setting.shown()) in readme


def test_parse_size_and_flag():
    assert owproxy.parse_size("64M") == 64 * 1024 * 1024
    assert owproxy.parse_size("1GiB") == 1024 ** 3
    assert owproxy.parse_size("512") == 512
    for bad in ("0", "-1K", "lots"):
        with pytest.raises(ValueError):
            owproxy.parse_size(bad)
    assert [owproxy.parse_flag(v) for v in ("1", "TRUE", "on", "0", "", "no")] == [
        True, True, True, False, False, False]
    with pytest.raises(ValueError):
        owproxy.parse_flag("maybe")


@pytest.mark.parametrize("name, value", [
    ("FLASK_PROXY_PORT", "abc"), ("FLASK_PROXY_PORT", "70000"), ("OWPROXY_MAX_BODY", "lots"),
    ("PROXY_ALLOW_REINIT", "maybe"), ("OWPROXY_GRACE", "-1"), ("__OW_ALLOW_CONCURRENT", "2"),
])
def test_an_invalid_environment_value_is_a_one_line_error_and_exit_2(tmp_path, name, value):
    env = {"FLASK_PROXY_PORT": str(free_port())}
    env[name] = value
    completed = cli("--host", "127.0.0.1", "--action-dir", str(tmp_path), env=env)
    check_one_line_error(completed, name, value)


def test_an_empty_variable_is_an_unset_one(proxies):
    proxy = proxies(command=lambda port, action_dir: (proxy_command(
        "--host", "127.0.0.1", "--action-dir", action_dir), {
            "FLASK_PROXY_PORT": "", "PORT": str(port), "OWPROXY_LOOP": ""}))
    assert proxy.init(ECHO_RESULT).status == 200
    check_a_run_still_works(proxy)


@pytest.mark.parametrize("flag", ["--header-timeout", "--compile-timeout"])
def test_a_time_limit_of_zero_is_a_one_line_error(tmp_path, flag):
    check_one_line_error(cli(flag, "0", "--action-dir", tmp_path),
                         "owproxy: %s 0: not a positive number of seconds" % flag)


@pytest.mark.parametrize("env, message", [
    ({"__OW_RUNTIME_PLATFORM": "lambda"}, "__OW_RUNTIME_PLATFORM='lambda': not a platform"),
    ({"__OW_RUNTIME_PLATFORM": "knative", "__OW_HTTP_METHODS": "[GET, FETCH]"},
     "__OW_HTTP_METHODS='[GET, FETCH]': FETCH is not an HTTP method"),
])
def test_invalid_platform_settings_are_a_one_line_start_up_error(tmp_path, env, message):
    check_one_line_error(cli("--action-dir", tmp_path, env=env), "owproxy: " + message)


@pytest.mark.parametrize("variable", ["FLASK_PROXY_PORT", "PORT"])
def test_the_port_comes_from_a_port_variable_alone(proxies, variable):
    proxy = proxies(port_env=[variable])
    assert proxy.init(ECHO_RESULT).status == 200
    check_a_run_still_works(proxy)


@pytest.mark.parametrize("winner, loser", [(None, "FLASK_PROXY_PORT"), ("FLASK_PROXY_PORT", "PORT")],
                         ids=["port-over-flask_proxy_port", "flask_proxy_port-over-port"])
def test_the_port_setting_that_wins(proxies, winner, loser):
    """``winner`` None: --port.  Were ``loser`` used, the proxy could not start."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proxy = proxies(port_env=winner and [winner], env={loser: str(taken.getsockname()[1])})
        assert proxy.init(ECHO_RESULT).status == 200
        check_a_run_still_works(proxy)


def test_an_invalid_port_variable_is_a_one_line_error(tmp_path):
    completed = cli("--action-dir", str(tmp_path), env={"PORT": "http"})
    check_one_line_error(completed, "PORT='http'")


# ---------------------------------------------------------------------------
# Logs: log streams, sentinels, the result line
# ---------------------------------------------------------------------------

def test_nothing_is_printed_at_start_up_or_by_a_successful_init(proxy):
    assert proxy.logs() == ("", "")
    assert proxy.init(ECHO_RESULT).status == 200
    assert proxy.logs() == ("", "")


def test_logs_are_streamed_while_the_action_runs(proxy):
    # the latest stdout line that could be the result is held back
    code = bash("echo early\necho '[held'\necho early-err >&2\nsleep 2\necho '{}'")
    assert proxy.init(code).status == 200
    done = threading.Event()
    seen = []

    def watch():
        while not done.is_set():
            out, err = proxy.logs()
            if "early" in out and "early-err" in err and "held" not in out:
                seen.append(True)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert proxy.run().status == 200
    done.set()
    watcher.join()
    assert seen == [True]


def test_a_log_line_goes_out_while_the_action_still_runs(proxy, tmp_path):
    go = tmp_path / "go"
    assert proxy.init(bash("""
echo '[not a result, but it could be'
echo starting
while [ ! -e %s ]; do sleep 0.05; done
echo '{"done": true}'
""" % go)).status == 200
    answers = []
    runner = threading.Thread(target=lambda: answers.append(proxy.run()))
    runner.start()
    try:
        assert wait_for(lambda: "starting\n" in proxy.logs()[0]), "the log line was held back"
    finally:
        go.touch()
        runner.join(30)
    assert answers[0].json == {"done": True}
    assert check_streams(proxy)[0] == "[not a result, but it could be\nstarting"


def test_invalid_utf8_in_logs_is_replaced_and_never_fatal(proxy):
    code = bash(r"""
printf 'bad \xff\xfe out\n'
printf 'bad \xc3 err' >&2
echo '{"fine": true}'
""")
    assert proxy.init(code).status == 200
    assert proxy.run().json == {"fine": True}
    out, err = check_streams(proxy)
    assert out == "bad \ufffd\ufffd out"
    assert err == "bad \ufffd err"


def test_a_log_line_longer_than_the_limit_goes_out_in_pieces(proxies):
    proxy = proxies(env={"OWPROXY_MAX_RESULT": "1K"})
    assert proxy.init(bash("""
printf 'z%.0s' $(seq 2500); echo
echo '{"ok": 1}'
""")).status == 200
    assert proxy.run().json == {"ok": 1}
    pieces = check_streams(proxy)[0].splitlines()
    assert pieces == ["z" * 1024, "z" * 1024, "z" * 452]


def test_a_nonzero_exit_is_reported_on_stderr(proxy):
    assert proxy.init(bash("echo '{\"a\": 1}'\nexit 3")).status == 200
    assert proxy.run().json == {"a": 1}
    assert check_streams(proxy)[1] == "owproxy: the action exited with status 3"


def test_death_by_signal_is_reported_on_stderr(proxy):
    assert proxy.init(bash("echo partial\nkill -9 $$")).status == 200
    response = proxy.run()
    assert response.status == 502
    out, err = check_streams(proxy)
    assert out == "partial"
    assert err == "owproxy: the action was killed by signal 9 (SIGKILL)"


def test_the_result_is_the_last_non_empty_line(proxy):
    assert proxy.init(bash("echo 'log one'\necho '{\"last\": 1}'\necho\necho '   '")).status == 200
    assert proxy.run().json == {"last": 1}
    assert check_streams(proxy)[0] == "log one"


def test_result_forwarder_holds_back_only_the_last_non_empty_line():
    written, logs = [], owproxy.Logs()
    logs.out = written.append
    forwarder = owproxy.ResultForwarder(logs)
    for chunk in (b"a\n{\"x\"", b": 1}\n\n", b"  \n"):
        forwarder.feed(chunk)
    forwarder.close()
    assert forwarder.result() == b'{"x": 1}'
    assert b"".join(written) == b"a\n\n  \n"


def test_result_forwarder_keeps_the_head_of_a_long_result_fed_in_pieces():
    written, notes, logs = [], [], owproxy.Logs()
    logs.out, logs.note = written.append, notes.append
    forwarder = owproxy.ResultForwarder(logs, max_line=2048)
    line = b'log\n{"x": "' + b"y" * 5000 + b'"}\n\n'
    for start in range(0, len(line), 100):
        forwarder.feed(line[start:start + 100])
    forwarder.close()
    result = forwarder.result()
    assert (result.size, result.head) == (5009, line[4:4 + 1024])
    assert b"".join(written) == b"log\n\n" and notes == []


def test_a_long_line_that_could_be_a_result_but_is_not_the_last_is_logged_cut(proxies):
    proxy = proxies(env={"OWPROXY_MAX_RESULT": "2K"})
    assert proxy.init(bash("echo '%s'; echo '{\"ok\": 1}'" % LONG_RESULT)).status == 200
    assert proxy.run().json == {"ok": 1}
    out, err = check_streams(proxy)
    assert out == LONG_RESULT[:1024]
    assert "that line had 3011 bytes" in err


def test_a_last_line_that_cannot_be_a_result_is_logged_once(proxy):
    assert proxy.init(bash("echo 'all done'")).status == 200
    assert proxy.run().json == BAD_RESULT
    assert check_streams(proxy)[0] == "all done"


@pytest.mark.parametrize("mode", ["exec", "loop"])
def test_a_result_longer_than_the_limit_is_502_with_its_head_in_the_logs(proxies, mode):
    if mode == "exec":
        proxy, code = proxies(env={"OWPROXY_MAX_RESULT": "2K"}), bash("""
echo 'a log line'
echo '%s'
""" % LONG_RESULT)
    else:
        proxy, code = proxies("--loop", "--max-result", "2K"), bash("""
while read line; do echo 'a log line'; echo '%s' >&3; done
""" % LONG_RESULT)
    assert proxy.init(code).status == 200
    response = proxy.run()
    assert (response.status, response.json) == (502, too_large(len(LONG_RESULT), 2048))
    out, err = check_streams(proxy)
    assert out == "a log line\n" + LONG_RESULT[:1024]
    assert "that line had 3011 bytes, more than the limit of 2048" in err


def test_a_300_mb_result_line_on_fd_3_keeps_the_proxys_memory_bounded(proxies):
    proxy = proxies("--loop")
    assert proxy.init(python_script("""
import os, sys
block = b"x" * (1 << 20)
for line in sys.stdin:
    for _ in range(300):
        os.write(3, block)
    os.write(3, b"\\n")
""")).status == 200
    before = proc_status(proxy.process.pid, "VmHWM")
    response = proxy.run(timeout=120)
    assert (response.status, response.json) == (502, too_large(300 << 20, 16 << 20))
    assert proc_status(proxy.process.pid, "VmHWM") - before < 80 * 1024
    assert len(proxy.logs()[0]) < 4096


# ---------------------------------------------------------------------------
# Processes: process groups, killing, reaping, background children, deadlines, the pump
# ---------------------------------------------------------------------------

def test_each_action_runs_in_a_process_group_of_its_own(proxy):
    code = python_script("""
import json, os
print(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0)}))
""")
    assert proxy.init(code).status == 200
    first, second = proxy.run().json, proxy.run().json
    proxy_group = os.getpgid(proxy.process.pid)
    for result in (first, second):
        assert result["pgid"] == result["pid"] != proxy_group
    assert first["pgid"] != second["pgid"]


def test_the_answer_does_not_wait_for_a_background_child_which_is_then_killed(proxy):
    code = bash("""
(sleep 60) &
echo "{\\"child\\": $!}"
""")
    assert proxy.init(code).status == 200
    started = time.time()
    response = proxy.run(timeout=30)
    assert time.time() - started < 10, "the answer waited for the background child"
    assert response.status == 200
    assert gone_or_zombie(response.json["child"]), "the background child still runs"
    check_streams(proxy)


def processes_with(marker):
    """The pids whose command line holds ``marker`` (a zombie's has none)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % name, "rb") as cmdline:
                if marker.encode() in cmdline.read():
                    found.append(int(name))
        except (OSError, ValueError):
            continue
    return found


def unique_sleep():
    """A ``sleep`` argument no other process on the machine has."""
    return "77.%d%d" % (os.getpid(), int.from_bytes(os.urandom(4), "big"))


ESCAPES = {
    "setsid": "setsid sleep {seconds} </dev/null >/dev/null 2>&1 &",
    "double fork": "( (sleep {seconds} </dev/null >/dev/null 2>&1 &) & )",
    "own group": "set -m; sleep {seconds} </dev/null >/dev/null 2>&1 &",
    "no environment": "setsid env -i /bin/sleep {seconds} </dev/null >/dev/null 2>&1 &",
    "no environment, its children": "setsid env -i /bin/sh -c '/bin/sleep {seconds} & wait' "
                                    "</dev/null >/dev/null 2>&1 &",
    "empty marker": "OWPROXY_ACTIVATION= setsid sleep {seconds} </dev/null >/dev/null 2>&1 &",
    "made-up marker": "OWPROXY_ACTIVATION=made-up setsid sleep {seconds} "
                      "</dev/null >/dev/null 2>&1 &",
    "an earlier activation's marker":
        "OWPROXY_ACTIVATION=${{OWPROXY_ACTIVATION%-*}}-$(( ${{OWPROXY_ACTIVATION##*-}} - 1 )) "
        "setsid sleep {seconds} </dev/null >/dev/null 2>&1 &",
}


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_nothing_an_activation_starts_survives_its_answer(proxy, escape):
    seconds = unique_sleep()
    assert proxy.init(bash(ESCAPES[escape].format(seconds=seconds) + """
sleep 0.3
echo '{"ok": true}'
""")).status == 200
    assert proxy.run().json == {"ok": True}
    assert wait_for(lambda: not processes_with(seconds)), "the %s process escaped" % escape
    assert "subreaper" not in check_streams(proxy)[1]


def test_one_activations_cleanup_spares_another_activations_processes(proxies, tmp_path):
    proxy = proxies(env={"__OW_ALLOW_CONCURRENT": "true"})
    slow, quick = unique_sleep(), unique_sleep()
    go = tmp_path / "go"
    assert proxy.init(bash("""
case "$1" in
  *slow*) setsid sleep %s </dev/null >/dev/null 2>&1 &
          while [ ! -e %s ]; do sleep 0.05; done ;;
  *) setsid sleep %s </dev/null >/dev/null 2>&1 & ;;
esac
echo '{"ok": true}'
""" % (slow, go, quick))).status == 200
    answers = []
    runner = threading.Thread(target=lambda: answers.append(proxy.run({"slow": 1})))
    runner.start()
    assert wait_for(lambda: processes_with(slow))
    assert proxy.run({"quick": 1}).json == {"ok": True}
    assert wait_for(lambda: not processes_with(quick))
    assert processes_with(slow), "the other activation's process was killed"
    go.touch()
    runner.join(30)
    assert answers[0].json == {"ok": True}
    assert wait_for(lambda: not processes_with(slow))



def test_a_borrowed_marker_saves_no_process_that_stays_in_its_activations_session(
        proxies, tmp_path):
    """A process that copies a running activation's marker (from /proc/PID/environ)
    but stays in its own activation's session, which none can join, dies with that
    activation; one that also starts a session of its own (whose id is its own
    pid, telling nothing of where it came from) lives until the other one ends."""
    proxy = proxies(env={"__OW_ALLOW_CONCURRENT": "true"})
    own, in_session, own_session = unique_sleep(), unique_sleep(), unique_sleep()
    go, marker, left = tmp_path / "go", tmp_path / "marker", tmp_path / "left"
    assert proxy.init(bash("""
case "$1" in
  *slow*) setsid sleep %s </dev/null >/dev/null 2>&1 &
          echo "$OWPROXY_ACTIVATION" > %s
          while [ ! -e %s ]; do sleep 0.05; done ;;
  *) borrowed=$(cat %s)
     set -m
     OWPROXY_ACTIVATION=$borrowed sleep %s </dev/null >/dev/null 2>&1 &
     OWPROXY_ACTIVATION=$borrowed setsid sh -c 'touch %s; exec sleep %s' \
       </dev/null >/dev/null 2>&1 &
     while [ ! -e %s ]; do sleep 0.01; done ;;  # in its session by now
esac
echo '{"ok": true}'
""" % (own, marker, go, marker, in_session, left, own_session, left))).status == 200
    slow = in_thread(proxy.run, {"slow": 1}, timeout=30)
    assert wait_for(lambda: processes_with(own) and marker.exists() and marker.read_text())
    assert proxy.run({"quick": 1}).json == {"ok": True}
    assert wait_for(lambda: not processes_with(in_session)), "a borrowed marker saved it"
    assert processes_with(own), "the other activation's process was killed"
    assert processes_with(own_session)  # until the activation whose marker it took ends
    go.touch()
    assert slow().json == {"ok": True}
    assert wait_for(lambda: not processes_with(own) and not processes_with(own_session))


def test_an_escaped_process_dies_at_the_deadline_and_at_shutdown(proxy):
    """Even one whose marker is forged."""
    at_deadline, at_shutdown = unique_sleep(), unique_sleep()
    assert proxy.init(bash("""
OWPROXY_ACTIVATION=forged setsid sleep $(echo "$1" | sed 's/.*"s": "\\([^"]*\\)".*/\\1/') </dev/null >/dev/null 2>&1 &
sleep 60
""")).status == 200
    deadline = str(int((time.time() + 1.5) * 1000))
    assert proxy.run({"s": at_deadline}, deadline=deadline).json == RUN_TIMED_OUT
    assert wait_for(lambda: not processes_with(at_deadline))
    runner = threading.Thread(target=lambda: proxy.run({"s": at_shutdown}))
    runner.start()
    assert wait_for(lambda: processes_with(at_shutdown))
    proxy.process.send_signal(signal.SIGTERM)
    proxy.process.send_signal(signal.SIGTERM)  # the second cuts the grace short
    assert proxy.process.wait(30) == 0
    runner.join(30)
    assert wait_for(lambda: not processes_with(at_shutdown))


def test_an_escaped_process_of_a_warm_action_dies_with_its_worker_not_before(proxies):
    proxy = proxies("--loop", env={"PROXY_ALLOW_REINIT": "1"})
    seconds = unique_sleep()
    assert proxy.init(bash("""
setsid sleep %s </dev/null >/dev/null 2>&1 &
while read line; do echo '{"ok": true}' >&3; done
""" % seconds)).status == 200
    assert proxy.run().json == {"ok": True}
    assert processes_with(seconds), "the warm worker's own process was killed"
    assert proxy.init(bash("while read line; do echo '[]' >&3; done")).status == 200
    assert wait_for(lambda: not processes_with(seconds)), "it outlived its worker"
    assert proxy.run().json == []


def test_without_a_subreaper_the_process_group_is_killed_and_stderr_says_so_once(proxies,
                                                                                  tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ctypes'] = None\n")
    proxy = proxies(env={"PYTHONPATH": str(tmp_path)})
    seconds = unique_sleep()
    assert proxy.init(bash("sleep %s &\necho '{\"ok\": true}'" % seconds)).status == 200
    for _ in range(2):
        assert proxy.run().json == {"ok": True}
    assert wait_for(lambda: not processes_with(seconds))
    err = check_streams(proxy, 2)[1]
    assert err.count("owproxy: cannot become a child subreaper") == 1, err
    assert "what an action moves out of its process group may outlive its activation" in err


def as_pid_1(port, action_dir):
    """The command line of a proxy that is PID 1 in a PID namespace of its own."""
    return (["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
            + proxy_command("--host", "127.0.0.1", "--port", str(port), "--action-dir",
                            action_dir), {})


@pytest.mark.skipif(not pid_namespaces_work(), reason="no PID namespaces (unshare) here")
def test_as_pid_1_the_proxy_reaps_what_actions_leave_behind(proxies):
    proxy = proxies(command=as_pid_1)
    (pid_1,) = children(proxy.process.pid)  # unshare's one child: PID 1 inside
    try:
        assert proxy.init(bash("""
(sleep 60) &
(sleep 60 &)
echo '{"ok": true}'
""")).status == 200
        for _ in range(3):
            assert proxy.run().json == {"ok": True}
        assert wait_for(lambda: "Z" not in children(pid_1).values()), children(pid_1)
        assert proxy.run().json == {"ok": True}
    finally:
        os.kill(pid_1, signal.SIGTERM)  # unshare itself does not pass signals on
    assert proxy.process.wait(10) == 0


@pytest.mark.skipif(not pid_namespaces_work(), reason="no PID namespaces (unshare) here")
def test_as_pid_1_the_proxy_reaps_session_leaders_too(proxies):
    proxy = proxies(command=as_pid_1)
    (pid_1,) = children(proxy.process.pid)
    try:
        assert proxy.init(bash("""
setsid sh -c 'exit 0' &
setsid sh -c 'sleep 0.3' &
echo '{"ok": true}'
""")).status == 200
        for _ in range(3):
            assert proxy.run().json == {"ok": True}
        # The leaders' parent is now PID 1: once they end, nothing of them may be left.
        assert wait_for(lambda: not children(pid_1)), children(pid_1)
    finally:
        os.kill(pid_1, signal.SIGTERM)
    assert proxy.process.wait(10) == 0


@pytest.mark.skipif(not pid_namespaces_work(), reason="no PID namespaces (unshare) here")
def test_as_pid_1_the_proxy_needs_no_ctypes_to_end_what_escaped_its_group(proxies, tmp_path):
    """Orphans come to PID 1 by themselves: without ctypes it is still a subreaper."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ctypes'] = None\n")
    proxy = proxies(command=as_pid_1, env={"PYTHONPATH": str(tmp_path)})
    (pid_1,) = children(proxy.process.pid)
    seconds = unique_sleep()
    try:
        assert proxy.init(bash(ESCAPES["setsid"].format(seconds=seconds)
                               + "\necho '{\"ok\": true}'")).status == 200
        assert proxy.run().json == {"ok": True}
        assert wait_for(lambda: not processes_with(seconds))
        assert proxy.run().json == {"ok": True}
    finally:
        os.kill(pid_1, signal.SIGTERM)
    assert proxy.process.wait(10) == 0
    assert "cannot become a child subreaper" not in proxy.logs()[1]



def held_spawn(processes, argv, cwd):
    """A thread spawning ``argv`` whose child waits, before its exec, until the
    returned ``release()``; the thread's Popen lands in the list returned."""
    hold, release = os.pipe()
    forked, fork_seen = os.pipe()
    spawned = []

    def child():
        os.write(fork_seen, b"x")
        os.read(hold, 1)

    thread = threading.Thread(target=lambda: spawned.append(processes.spawn(
        argv, dict(os.environ), cwd, preexec_fn=child)))
    thread.start()
    # Forked, so that no later spawn's pipes leak into this child until its exec.
    assert os.read(forked, 1) == b"x" and processes.starting == 1

    def done():
        os.write(release, b"x")
        thread.join(30)
        for fd in (hold, release, forked, fork_seen):
            os.close(fd)
    return spawned, done



def test_a_spawn_under_way_holds_up_no_other_activations_spawn(tmp_path):
    processes = owproxy.Processes(owproxy.Logs())
    processes.subreaper = False  # no prctl on the test process itself
    spawned, release = held_spawn(processes, ["true"], str(tmp_path))
    try:
        other = threading.Thread(target=lambda: spawned.append(
            processes.spawn(["true"], dict(os.environ), str(tmp_path))))
        other.start()
        other.join(30)
        assert len(spawned) == 1, "the second spawn waited for the first"
    finally:
        release()
    assert len(spawned) == 2
    for process in spawned:
        assert process.wait(30) == 0
        processes.discard(process)



def test_a_shutdown_kills_the_process_of_a_spawn_under_way(tmp_path):
    processes = owproxy.Processes(owproxy.Logs())
    processes.subreaper = False  # the group kill alone, so the wait is what counts
    spawned, release = held_spawn(processes, ["sleep", "600"], str(tmp_path))
    killer = threading.Thread(target=processes.kill_all)
    killer.start()
    release()
    killer.join(30)
    assert spawned[0].wait(30) == -signal.SIGKILL
    processes.discard(spawned[0])


def test_a_compiler_that_exits_at_once_keeps_its_exit_status_while_orphans_are_reaped(
        tmp_path, monkeypatch):
    """A periodic reap in the instant between the compiler's fork and its Popen
    having the pid must not take the compiler for an orphan (its status would
    read 0, and a failed compile "cannot compile")."""
    compiler = tmp_path / "compile"
    compiler.write_text("#!/bin/sh\nexit 3\n")
    compiler.chmod(0o755)
    processes = owproxy.Processes(owproxy.Logs())
    processes.subreaper, processes.reap_interval = True, 0  # the test's own children

    class ReapedWhileForking(subprocess.Popen):
        def _execute_child(self, *args):
            super()._execute_child(*args)
            pid, self.pid = self.pid, None  # as just after the fork
            assert wait_for(lambda: owproxy.process_state(pid) == b"Z")
            processes.reap_orphans()
            self.pid = pid
    monkeypatch.setattr(owproxy.subprocess, "Popen", ReapedWhileForking)
    with pytest.raises(owproxy.InitError, match="^exit status 3$"):
        owproxy.compile_action(str(compiler), "main", str(tmp_path), str(tmp_path),
                               dict(os.environ), 30, processes)


def test_the_proxy_reaps_the_orphans_it_inherits(proxy):
    assert proxy.init(bash("""
(setsid sh -c 'exit 0' &)
(sleep 0.01 &)
sleep 0.2
echo '{"ok": true}'
""")).status == 200
    for _ in range(3):
        assert proxy.run().json == {"ok": True}
    assert wait_for(lambda: "Z" not in children(proxy.process.pid).values()), \
        children(proxy.process.pid)


DEADLINE_ACTION = bash("""
sleep 60 &
echo $! > child.pid
echo 'first log line'
echo 'second log line'
echo 'an error line' >&2
wait
echo '{"finished": true}'
""")


@pytest.mark.parametrize("as_string", [True, False], ids=["string", "number"])
def test_a_passed_deadline_kills_the_group_with_the_exact_502(proxy, as_string):
    assert proxy.init(DEADLINE_ACTION).status == 200
    deadline = int(time.time() * 1000) + 1500
    started = time.time()
    response = proxy.run({}, deadline=str(deadline) if as_string else deadline, timeout=30)
    assert time.time() - started < 10, "the deadline was not enforced"
    assert (response.status, response.json) == (502, RUN_TIMED_OUT)
    assert response.body == json.dumps(RUN_TIMED_OUT).encode()
    out, err = check_streams(proxy)
    assert "first log line" in out and "second log line" in out
    assert "an error line" in err
    assert gone_or_zombie(int((proxy.action_dir / "child.pid").read_text()))


@pytest.mark.parametrize("fields", [{}, {"deadline": "123"}, {"deadline": 123}],
                         ids=["absent", "past-string", "past-number"])
def test_a_run_without_a_future_deadline_is_not_cut_short(proxy, fields):
    assert proxy.init(bash("sleep 1.5\necho '{\"slept\": true}'")).status == 200
    response = proxy.run({}, **fields)
    assert (response.status, response.json) == (200, {"slept": True})
    check_streams(proxy)


def test_an_action_that_ignores_a_large_stdin_still_answers(proxy):
    assert proxy.init(bash("echo '{\"ignored\": true}'")).status == 200
    assert proxy.run({"big": "y" * 3000000}).json == {"ignored": True}


@pytest.mark.parametrize("action, data", [
    ("#!/bin/sh\ncat\necho\n", "\u00e9x" * 35000),
    ("#!/bin/sh\ncat\necho\n", "\u00e9x" * (3 * 1024 * 1024 // 2)),
    (STDIN_ECHO_BASH, "a" * 1048561),  # upstream's testLargeInput: read(1) takes no \\
], ids=["cat-70000", "cat-3-mib", "read-line-1-mib"])
def test_a_large_argument_comes_back_whole_through_stdin(proxy, action, data):
    assert proxy.init(action).status == 200
    value = {"data": data}
    for _ in range(2):
        response = proxy.run(value)
        assert (response.status, response.json) == (200, value)
    assert check_streams(proxy, 2) == ("", "")


# ---------------------------------------------------------------------------
# Installation: /init with files and archives, compile scripts, versions and atomic swaps
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"[1, 2]", b'{"value": "code"}', b"{nope"])
def test_init_bodies_of_the_wrong_shape_are_400(proxy, body):
    response = proxy.post("/init", body)
    assert response.status == 400
    assert "error" in response.json
    assert proxy.init(bash("echo '{}'")).status == 200


def test_base64_with_line_breaks_is_accepted(proxy):
    code = make_zip({"exec": bash("echo '{\"wrapped\": true}'")})
    wrapped = "\n".join(code[i:i + 76] for i in range(0, len(code), 76))
    assert proxy.init(wrapped, binary=True).status == 200
    assert proxy.run().json == {"wrapped": True}


C_ACTIONLOOP = r'''
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    static char line[1 << 16];
    if (argc > 1) { printf("{\"exec\": %s}\n", argv[1]); return 0; }
    FILE *results = fdopen(3, "w");
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        fprintf(results, "{\"loop\": %s}\n", line);
        fflush(results);
    }
    return 0;
}
'''


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler on this machine")
@pytest.mark.parametrize("mode", ["exec", "loop"])
def test_a_compiled_c_executable_sent_base64_is_the_action(proxies, tmp_path, mode):
    source, binary = tmp_path / "action.c", tmp_path / "action"
    source.write_text(C_ACTIONLOOP)
    subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
    proxy = proxies(*(["--loop"] if mode == "loop" else []))
    response = proxy.init(base64.b64encode(binary.read_bytes()).decode(), binary=True)
    assert response.status == 200
    assert (proxy.action_dir / "exec").read_bytes() == binary.read_bytes()
    result = proxy.run({"snow": "\u2744"}).json
    if mode == "loop":
        assert result == {"loop": {"value": {"snow": "\u2744"}}}
    else:
        assert result == {"exec": {"snow": "\u2744"}}


def test_a_plain_binary_is_never_written_outside_the_stage(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(owproxy.InitError, match="neither a zip nor a tar.gz archive"):
        owproxy.unpack(b"\x7fELF...", str(stage), 1024, os.path.join(os.pardir, "exec"))
    assert os.listdir(tmp_path) == ["stage"] and os.listdir(stage) == []


def test_the_zip_exec_runs_whatever_its_mode_bits(proxy):
    response = proxy.init_zip({"exec": (bash("echo '{\"mode\": \"fixed\"}'"), 0o644)})
    assert response.status == 200
    assert proxy.run().json == {"mode": "fixed"}


def test_a_zip_keeps_folders_modes_and_links_inside_the_action(proxy):
    files = {
        "exec": bash('echo "{\\"helper\\": $(./bin/helper), \\"linked\\": $(cat data-link)}"'),
        "bin/helper": (bash("echo 1"), 0o755),
        "data.txt": "true",
        "data-link": ("->", "data.txt"),
    }
    assert proxy.init_zip(files).status == 200
    assert proxy.run().json == {"helper": 1, "linked": True}
    assert os.readlink(proxy.action_dir / "data-link") == "data.txt"


def make_tar(files, mode="w:gz"):
    """A base64 tar.gz from {name: text or ("->", target) or ("dir",) or ("fifo",)}."""
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple) and content[0] == "->":
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
            elif content == ("dir",):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif content == ("fifo",):
                info.type = tarfile.FIFOTYPE
            else:
                data = content.encode() if isinstance(content, str) else content
                info.size, info.mode = len(data), 0o755 if name.endswith("exec") else 0o644
                archive.addfile(info, io.BytesIO(data))
                continue
            archive.addfile(info)
    return base64.b64encode(buffer.getvalue()).decode()


TAR_ACTION = bash("""
echo "$(cat lib/data.txt) $(cat linked)" >&2
echo '{"from": "tar"}'
""")


@pytest.mark.parametrize("mode", ["exec", "loop"])
def test_a_tar_gz_archive_is_unpacked_like_a_zip(proxies, mode):
    proxy = proxies(*(["--loop"] if mode == "loop" else []))
    action = TAR_ACTION if mode == "exec" else READ_LINE_LOOP
    code = make_tar({"./": ("dir",), "./exec": action, "./lib/": ("dir",),
                     "./lib/data.txt": "tar data", "./linked": ("->", "lib/data.txt")})
    assert proxy.init(code, binary=True).status == 200
    assert os.readlink(proxy.action_dir / "linked") == "lib/data.txt"
    assert (proxy.action_dir / "lib" / "data.txt").read_text() == "tar data"
    if mode == "exec":
        assert proxy.run({}).json == {"from": "tar"}
        assert "tar data tar data" in check_streams(proxy)[1]
    else:
        assert proxy.run({"x": 1}).json["value"] == {"x": 1}


def test_init_without_an_executable_fails_and_can_be_retried(proxy):
    response = proxy.post("/init", {})
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "exec is missing: POST /init with the action's code first" in check_streams(proxy)[1]
    assert proxy.init(bash("echo '{\"retried\": true}'")).status == 200
    assert proxy.run().json == {"retried": True}


def outside_link_zip(target):
    return make_zip({"exec": bash("echo '{}'"), "link": ("->", str(target)),
                     "link/evil": "written through the link"})


BAD_INITS = {
    "zip without exec": (lambda out: {"code": make_zip({"main.sh": "x"}), "binary": True},
                         "the archive has no exec file (or __main__.py) at its top level"),
    "invalid base64": (lambda out: {"code": "not base64 at all!", "binary": True},
                       "the code is not valid base64"),
    "corrupt zip": (lambda out: {"code": base64.b64encode(b"PK\x03\x04, broken").decode(),
                                 "binary": True}, "the code is not a zip archive"),
    "code not a string": (lambda out: {"code": 42}, "code must be a string, not a number"),
    "binary not a boolean": (lambda out: {"code": "x", "binary": "yes"},
                             "binary must be true or false, not a string"),
    "env not an object": (lambda out: {"code": "x", "env": ["A"]},
                          "env must be a JSON object, not an array"),
    "env value with NUL": (lambda out: {"code": "x", "env": {"A": "a\u0000b"}},
                           "cannot be exported as an environment variable"),
    "env value with a lone surrogate": (lambda out: {"code": "x", "env": {"A": "\ud800"}},
                                        "'A' cannot be exported as an environment variable"),
    "source with a lone surrogate": (lambda out: {"code": "#!/bin/sh\necho '\ud800'"},
                                     "surrogates not allowed"),
    "archive too big": (lambda out: {"code": make_zip({"exec": "#" * 5000}), "binary": True},
                        "the archive expands to 5000 bytes, more than the limit of 4096"),
    "dot-dot entry": (lambda out: {"code": make_zip({"exec": "x", "../evil": "x"}),
                                   "binary": True}, "points outside the action directory"),
    "absolute entry": (lambda out: {"code": make_zip({"exec": "x", str(out / "evil"): "x"}),
                                    "binary": True}, "has an absolute path"),
    "entry below a link": (lambda out: {"code": outside_link_zip(out), "binary": True},
                           "lies below the symbolic link 'link'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INITS))
def test_a_failed_init_is_the_exact_502_with_its_cause_and_changes_nothing(proxies, tmp_path,
                                                                           case):
    outside = tmp_path / "outside"
    outside.mkdir()
    make_value, cause = BAD_INITS[case]
    proxy = proxies("--max-archive", "4K", env={"PROXY_ALLOW_REINIT": "1"})
    assert proxy.init(bash("echo '{\"version\": \"old\"}'"), env={"OLD": "1"}).status == 200
    before = sorted(os.listdir(proxy.action_dir))
    response = proxy.post("/init", {"value": make_value(outside)})
    assert (response.status, response.json) == (502, INIT_FAILED)
    _, err = check_streams(proxy)
    assert cause in err
    assert sorted(os.listdir(proxy.action_dir)) == before  # no staging left behind either
    assert os.listdir(outside) == []
    assert not (tmp_path / "evil").exists()
    assert proxy.run().json == {"version": "old"}


def test_a_corrupt_archive_fails_init_and_leaves_no_staging_behind(proxy):
    raw = bytearray(zip_bytes({"exec": bash("echo '{}'") + "#" * 2000}))
    start = raw.index(b"PK\x03\x04") + 30 + len("exec")
    raw[start + 10:start + 20] = b"\xff" * 10  # damage the deflated data
    response = proxy.init(base64.b64encode(bytes(raw)).decode(), binary=True)
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "cannot extract 'exec' from the archive" in check_streams(proxy)[1]
    assert os.listdir(proxy.action_dir) == []


BAD_TARS = {
    "dot-dot entry": ({"exec": "x", "../evil": "x"}, "points outside the action directory"),
    "absolute entry": ({"exec": "x", "/tmp/evil": "x"}, "has an absolute path"),
    "entry below a link": ({"exec": "x", "link": ("->", "/tmp"), "link/evil": "x"},
                           "lies below the symbolic link 'link'"),
    "a fifo": ({"exec": "x", "pipe": ("fifo",)}, "'pipe' is not a file, folder or symbolic link"),
    "too big": ({"exec": "#" * 5000}, "the archive expands to more than the limit of 4096"),
    "link target past PATH_MAX": ({"exec": "x", "link": ("->", "a/" * 4000)},
                                  "has a target longer than PATH_MAX"),
    "huge extended header": ({"x" * (2 * MIB): "x"}, "the archive has an extended header of"),
    "the same file twice": ({"exec": "x", "./exec": "y"}, "cannot extract './exec'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARS) + ["corrupt tar.gz", "corrupt zip",
                                                     "zip link not UTF-8"])
def test_an_unsafe_or_corrupt_archive_is_refused_with_its_cause(proxies, tmp_path, case):
    proxy = proxies("--max-archive", "4K")
    if case == "corrupt tar.gz":
        code, cause = base64.b64encode(b"\x1f\x8b\x08broken").decode(), "not a tar.gz archive"
    elif case == "corrupt zip":
        code, cause = base64.b64encode(b"PK\x03\x04broken").decode(), "not a zip archive"
    elif case == "zip link not UTF-8":
        code = make_zip({"exec": "x", "link": ("->", b"\xff\xfe")})
        cause = "the symbolic link 'link' has a target that is not UTF-8"
    else:
        files, cause = BAD_TARS[case]
        code = make_tar(files)
    response = proxy.init(code, binary=True)
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert cause in check_streams(proxy)[1]
    assert os.listdir(proxy.action_dir) == []
    assert not (tmp_path / "evil").exists()


def test_a_gzip_that_is_garbage_is_refused_with_its_cause(proxy):
    code = base64.b64encode(b"\x1f\x8b\x08" + b"garbage").decode()
    response = proxy.init(code, binary=True)
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "the code is not a tar.gz archive (" in check_streams(proxy)[1]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_the_entry_count_limit(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(owproxy, "MAX_ARCHIVE_ENTRIES", 3)
    files = {"exec": "x", "a": "a", "b": "b", "c": "c"}
    extract, data, message = {
        "zip": (owproxy.extract_zip, zip_bytes(files),
                "the archive has 4 entries, more than the limit of 3"),
        "tar.gz": (owproxy.extract_tar, base64.b64decode(make_tar(files)),
                   "more entries than the limit of 3"),
    }[kind]
    with pytest.raises(owproxy.InitError, match=message):
        extract(data, str(tmp_path), 1024)


@pytest.fixture
def memory_flood_zip(tmp_path_factory):
    """A zip of about 400 KB whose one symbolic link entry inflates to 400 MB."""
    path = tmp_path_factory.mktemp("flood") / "flood.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr(zipfile.ZipInfo("exec"), "#!/bin/sh\necho '{}'\n")
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as target:
            block = b"a" * MIB
            for _ in range(400):
                target.write(block)
    return path


def test_a_symlink_entry_that_inflates_to_400_mb_is_refused_in_bounded_memory(
        proxies, memory_flood_zip):
    assert memory_flood_zip.stat().st_size < MIB
    proxy = proxies()
    before = proc_status(proxy.process.pid, "VmHWM")
    response = proxy.post("/init", {"value": {
        "code": base64.b64encode(memory_flood_zip.read_bytes()).decode(), "binary": True}})
    assert (response.status, response.json) == (502, INIT_FAILED)
    grown = proc_status(proxy.process.pid, "VmHWM") - before
    assert grown < 32 * 1024, "peak memory grew by %d KiB" % grown
    assert "'link' has a target longer than PATH_MAX" in check_streams(proxy)[1]


def oldest_python():
    """Python 3.8, the oldest the proxy supports, if this machine has it."""
    candidates = [PYTHON, shutil.which("python3.8") or ""]
    try:
        prefix = subprocess.run(["pyenv", "prefix", "3.8"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        candidates.append(os.path.join(prefix, "bin", "python3.8"))
    except OSError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK) and subprocess.run(
                [path, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 8))"],
                stderr=subprocess.DEVNULL).returncode == 0:
            return path
    return None


DEEP = "d/" * 1200


@pytest.mark.skipif(not oldest_python(), reason="no Python 3.8 on this machine")
def test_a_failed_init_with_a_folder_1200_deep_leaves_the_baked_action_on_python_3_8(
        proxies):
    python = oldest_python()
    proxy = proxies("--allow-reinit", command=lambda port, action_dir: ([
        python, OWPROXY, "--host", "127.0.0.1", "--port", str(port),
        "--action-dir", action_dir], {}), start=False)
    (proxy.action_dir / "exec").write_text(ECHO_BASH)
    (proxy.action_dir / "exec").chmod(0o755)
    proxy.start()
    response = proxy.init(make_tar({DEEP + "file": "deep", "other": "x"}), binary=True)
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "has no exec file" in check_streams(proxy)[1]
    assert os.listdir(proxy.action_dir) == ["exec"]
    assert proxy.run({}).json == {"msg": "Hello from bash script!"}
    # installed, then replaced by a re-init: the deep folder goes, the answer is 200
    deep_action = make_tar({"exec": bash("echo '{\"v\": 1}'"), DEEP + "file": "deep"})
    assert proxy.init(deep_action, binary=True).status == 200
    assert proxy.run({}).json == {"v": 1}
    assert proxy.init(ECHO_BASH).status == 200
    assert sorted(os.listdir(proxy.action_dir)) == ["exec"]
    assert [path.name for path in proxy.action_dir.parent.iterdir()
            if path.name.startswith(".owproxy-")] == []
    assert proxy.run({}).json == {"msg": "Hello from bash script!"}


BAKED = {
    "exec": ({"exec": ECHO_RESULT}, []),
    "function": ({"__main__.py": "def main(args):\n    return {'ok': 'run'}\n"}, []),
    "loop": ({"exec": LOOP_ACTION}, ["--loop"]),
}


def proxy_uid():
    """The uid a proxy started with ``as_nobody()`` runs as."""
    return 65534 if os.geteuid() == 0 else os.geteuid()


@pytest.mark.parametrize("kind", sorted(BAKED))
def test_a_read_only_action_dir_serves_its_baked_action_as_a_non_root_user(
        proxies, public_dir, kind):
    """Root owns the directory, mode 555; the proxy runs as nobody (or, not being
    root, as this user, who cannot write there either)."""
    files, args = BAKED[kind]
    read_only = public_dir / "action"
    read_only.mkdir()
    for name, text in files.items():
        (read_only / name).write_text(text)
        (read_only / name).chmod(0o755)
    read_only.chmod(0o555)
    proxy = proxies(*args, action_dir=read_only, preexec_fn=as_nobody())
    code = {"exec": ECHO_BASH, "function": "def main(args):\n    return {}\n",
            "loop": LOOP_ACTION}[kind]
    response = proxy.init(code)
    cause = ("the action directory %s is not writable by uid %d, so /init cannot install "
             "code there: bake the action into the image, or point --action-dir "
             "(OWPROXY_ACTION_DIR) at a writable directory" % (read_only, proxy_uid()))
    # --loop answers as the Go proxy does without OW_LOG_INIT_ERROR: with the cause itself.
    expected = {"error": cause} if kind == "loop" else INIT_FAILED
    assert (response.status, response.json) == (502, expected)
    err = proxy.logs()[1]
    assert "owproxy: %s\n" % cause in err, err
    assert proxy.init().status == 200  # /init without code keeps what the image has
    for count in (1, 2):
        response = proxy.run()
        assert response.status == 200, (response, proxy.logs())
        if kind == "loop":  # one warm child, started from the read-only directory
            assert response.json["count"] == count, response
        else:
            assert response.json == {"ok": "run"}, response
    assert sorted(os.listdir(str(read_only))) == sorted(files)
    assert proxy.stop() == 0


def test_a_zip_into_a_read_only_action_dir_is_refused_alike(proxies, public_dir):
    read_only = public_dir / "action"
    read_only.mkdir()
    read_only.chmod(0o555)
    proxy = proxies(action_dir=read_only, preexec_fn=as_nobody())
    response = proxy.init_zip({"exec": ECHO_RESULT})
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "is not writable by uid %d, so /init cannot install code" % proxy_uid() in \
        proxy.logs()[1]
    assert os.listdir(str(read_only)) == []


def test_an_action_dir_on_a_read_only_mount_is_called_read_only(proxies, tmp_path):
    """Writable by its owner, yet on a read-only filesystem (a read-only root): the
    cause is the mount, whoever the proxy runs as."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k",
                                            "tmpfs", str(mount)]).returncode != 0:
        print("note: cannot mount a read-only tmpfs here (needs root); not checked")
        pytest.skip("cannot mount a read-only filesystem here")
    try:
        proxy = proxies(action_dir=mount)
        response = proxy.init(ECHO_BASH)
        assert (response.status, response.json) == (502, INIT_FAILED)
        err = proxy.logs()[1]
        assert "owproxy: the action directory %s is read-only, so /init cannot install " \
               "code there" % mount in err, err
        assert proxy.stop() == 0
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_scratch_dir_uses_the_parent_only_when_writable(tmp_path, monkeypatch):
    action = tmp_path / "parent" / "action"
    action.mkdir(parents=True)
    scratch = owproxy.scratch_dir(str(action))
    assert os.path.dirname(scratch) == str(tmp_path / "parent")
    os.rmdir(scratch)
    elsewhere = tmp_path / "tmp"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))  # as TMPDIR would set it
    monkeypatch.setattr(owproxy, "writable", lambda folder: folder != str(action.parent))
    scratch = owproxy.scratch_dir(str(action))
    assert os.path.dirname(scratch) == str(elsewhere)
    assert os.path.basename(scratch).startswith(".owproxy-")


def test_stage_dir_falls_back_inside_dest_when_a_rename_cannot_reach_it(tmp_path, monkeypatch):
    dest = tmp_path / "action"
    dest.mkdir()
    first = owproxy.stage_dir(str(dest))
    assert os.path.dirname(first) == str(tmp_path) and os.listdir(str(dest)) == []
    real_rename = os.rename

    def cross_device(source, target):
        if str(target).startswith(str(dest) + os.sep):
            raise OSError(18, "Invalid cross-device link")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", cross_device)
    stage = owproxy.stage_dir(str(dest))
    assert os.path.dirname(stage) == str(dest)
    assert sorted(os.listdir(str(tmp_path))) == sorted(["action", os.path.basename(first)])


def compiled_versions(proxy):
    """The folders of the versions a proxy with a compiler installed, N/src and
    N/bin as the Go proxy lays them out, oldest first."""
    versions = [path for path in proxy.action_dir.parent.glob(".owproxy-*/*")
                if path.name.isdigit() and (path / "bin").is_dir()]
    return sorted(versions, key=lambda path: int(path.name))


@pytest.mark.parametrize("form", ["source", "zip"])
def test_a_compile_script_turns_python_source_into_the_images_actionloop_launcher(
        proxies, tmp_path, form):
    proxy = runtime_proxy(proxies, tmp_path)
    if form == "source":
        response = proxy.init(PY_SOURCE, main="hello", env={"FROM_INIT": "yes"})
    else:
        response = proxy.init_zip({"__main__.py": PY_SOURCE}, main="hello",
                                  env={"FROM_INIT": "yes"})
    assert response.status == 200, proxy.logs()
    first = proxy.run({"name": "world"}, activation_id="a1").json
    assert first == {"greeting": "hello world", "execution_env": "test/python-v1",
                     "api_host": "https://whisk.example", "activation": "a1", "init_env": "yes"}
    assert proxy.run({"name": "\u2744"}).json["greeting"] == "hello \u2744"
    # the image's launcher, not owproxy's own function runner, serves it, from where
    # the compiler wrote it; the action directory stays as the image made it
    [version] = compiled_versions(proxy)
    assert (version / "bin" / "exec.env").read_text() == "test/python-v1\n"
    assert (version / "bin" / "exec").read_text().startswith("#!/bin/bash")
    assert os.listdir(proxy.action_dir) == []
    seen = json.loads((version / "bin" / "compiler_env.json").read_text())
    assert (seen["__OW_API_HOST"], seen["__OW_EXECUTION_ENV"], seen["FROM_INIT"]) == (
        "https://whisk.example", "test/python-v1", "yes")
    assert "OW_COMPILER" not in seen and seen["PATH"] == os.environ["PATH"]
    assert seen["cwd"] == str(proxy.action_dir)
    assert [name for name in os.listdir(proxy.action_dir) if name.startswith(".")] == []
    check_streams(proxy, sentinels=2)


def action_files(proxy):
    return sorted((str(path.relative_to(proxy.action_dir)), path.read_bytes())
                  for path in proxy.action_dir.rglob("*") if path.is_file())


@pytest.mark.parametrize("log_init_error", [True, False])
@pytest.mark.parametrize("compiler", sorted(BAD_COMPILERS))
def test_a_failed_compile_answers_as_the_go_proxy_and_keeps_the_previous_action(
        proxies, tmp_path, compiler, log_init_error):
    script, cause = BAD_COMPILERS[compiler]
    env = {"PROXY_ALLOW_REINIT": "1", "OWPROXY_COMPILE_TIMEOUT": "3"}
    if not log_init_error:
        env["OW_LOG_INIT_ERROR"] = ""
    proxy = runtime_proxy(proxies, tmp_path, script, env=env)
    good = make_zip({"exec": python_script(LAUNCHER.replace("from main__ import MAIN as main",
                                                            "main = lambda args: {'v': 1}")),
                     "exec.env": "test/python-v1"})
    assert proxy.init(good, binary=True).status == 200
    before = action_files(proxy)
    pidfile = tmp_path / "compiler.pid"
    response = proxy.init(PY_SOURCE, main="hello", env={"PIDFILE": str(pidfile)})
    expected = INIT_FAILED if log_init_error else {"error": cause}
    assert (response.status, response.json) == (502, expected)
    assert action_files(proxy) == before
    assert proxy.run({}).json == {"v": 1}
    assert cause.strip() in check_streams(proxy, sentinels=2)[1]
    if compiler == "hangs":
        assert gone_or_zombie(int(pidfile.read_text()))


def test_a_compiler_that_cannot_run_fails_the_init_with_its_cause(proxies, tmp_path):
    proxy = proxies(env={"OW_COMPILER": str(tmp_path / "missing")})
    response = proxy.init(PY_SOURCE)
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "cannot run the compiler %s: No such file" % (tmp_path / "missing") in \
        check_streams(proxy)[1]


SH_COMPILER = bash("""
printf '#!/bin/sh\\n' > "$3/exec"
cat "$2/exec" >> "$3/exec"
""")


def test_in_exec_mode_a_compile_script_builds_the_exec_of_every_run(proxies, tmp_path):
    proxy = proxies(env={"OW_COMPILER": compiler_file(tmp_path, SH_COMPILER)})
    assert proxy.init("echo '{\"compiled\": true}'\n").status == 200
    [version] = compiled_versions(proxy)
    assert (version / "bin" / "exec").read_text().startswith("#!/bin/sh\n")
    assert proxy.run({}).json == {"compiled": True}
    assert proxy.run({}).json == {"compiled": True}


def test_in_exec_mode_a_failed_compile_keeps_the_dockerskeleton_text(proxies, tmp_path):
    compiler = compiler_file(tmp_path, BAD_COMPILERS["warns"][0])
    proxy = proxies(env={"OW_COMPILER": compiler})
    response = proxy.init(PY_SOURCE)
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "warning: this compiler always complains" in check_streams(proxy)[1]
    assert not (proxy.action_dir / "exec").exists()
    # code that runs as it is (#!) is never compiled
    assert proxy.init(ECHO_BASH).status == 200
    assert proxy.run({"a": 1}).json == {"a": 1}


# Compile scripts that do what openwhisk-runtime-php's compile.php and
# openwhisk-runtime-java's bin/compile do: bake the absolute SRC or BIN path into
# exec, and read at run time files left there (the code sent is a version word).
BAKED_PATH_COMPILERS = {
    "php": bash("""
[ "$(cat "$2/exec")" != bad ] || { echo "cannot compile bad code"; exit 1; }
mkdir "$2/vendor"
mv "$2/exec" "$2/vendor/autoload.txt"
cat > "$3/exec" <<END
#!/bin/bash
cd "$2"
while read -r line; do
  echo "{\\"version\\": \\"\\$(cat vendor/autoload.txt)\\", \\"cwd\\": \\"\\$PWD\\"}" >&3
done
END
"""),
    "java": bash("""
[ "$(cat "$2/exec")" != bad ] || { echo "cannot compile bad code"; exit 1; }
mv "$2/exec" "$3/Main.class"
cat > "$3/exec" <<END
#!/bin/bash
cd "$3"
CLASSPATH="$3"
while read -r line; do
  echo "{\\"version\\": \\"\\$(cat "\\$CLASSPATH/Main.class")\\", \\"cwd\\": \\"\\$PWD\\"}" >&3
done
END
"""),
}


@pytest.mark.parametrize("runtime", sorted(BAKED_PATH_COMPILERS))
def test_a_compiled_action_runs_where_its_compile_script_put_it_until_replaced(
        proxies, tmp_path, runtime):
    proxy = proxies("--loop", "--allow-reinit", env={
        "OW_COMPILER": compiler_file(tmp_path, BAKED_PATH_COMPILERS[runtime])})
    assert proxy.init("v1").status == 200, proxy.logs()
    [first] = compiled_versions(proxy)
    where = first / ("src" if runtime == "php" else "bin")
    assert proxy.run({}).json == {"version": "v1", "cwd": str(where)}
    assert proxy.init("v2").status == 200
    assert proxy.run({}).json["version"] == "v2"
    # the replaced version goes once no run holds it; a failed init changes nothing
    assert wait_for(lambda: compiled_versions(proxy)[0] != first)
    current = compiled_versions(proxy)
    response = proxy.init("bad")
    assert (response.status, response.json) == (502, {"error": "cannot compile bad code\n"})
    assert compiled_versions(proxy) == current
    assert proxy.run({}).json["version"] == "v2"
    assert os.listdir(proxy.action_dir) == []


def test_with_ow_save_jar_a_jar_reaches_the_compiler_as_a_file_and_a_zip_unpacked(
        proxies, tmp_path):
    compiler = bash("""
if [ -f "$2/exec.jar" ]; then found="jar $(wc -c < "$2/exec.jar")"; else found="$(ls "$2")"; fi
printf '#!/bin/bash\\nwhile read -r line; do echo "{\\\\"found\\\\": \\\\"%s\\\\"}" >&3; done\\n' \
  "$found" > "$3/exec"
""")
    proxy = proxies("--loop", "--allow-reinit", env={
        "OW_COMPILER": compiler_file(tmp_path, compiler), "OW_SAVE_JAR": "exec.jar"})
    jar = make_zip({"META-INF/MANIFEST.MF": "Manifest-Version: 1.0\n", "Main.class": "x"})
    assert proxy.init(jar, binary=True).status == 200, proxy.logs()
    assert proxy.run({}).json == {"found": "jar %d" % len(base64.b64decode(jar))}
    assert proxy.init_zip({"Main.class": "x"}).status == 200
    assert proxy.run({}).json == {"found": "Main.class"}


def test_sigterm_during_a_compile_stops_it_and_answers_the_init_503(proxies, tmp_path):
    started = tmp_path / "started"
    slow = bash("""
sleep 600 &
echo "$$ $!" > "%s.tmp"; mv "%s.tmp" "%s"
wait
""" % (started, started, started))
    proxy = proxies(env={"OW_COMPILER": compiler_file(tmp_path, slow)})
    (proxy.action_dir / "exec").write_text(ECHO_BASH)
    (proxy.action_dir / "exec").chmod(0o755)
    init = in_thread(proxy.init, "code to compile")
    assert wait_for(started.exists)
    assert proxy.stop() == 0
    response = init()
    assert (response.status, response.json) == (503, {"error": "The proxy is shutting down."})
    assert all(gone_or_zombie(int(pid)) for pid in started.read_text().split())
    assert os.listdir(proxy.action_dir) == ["exec"]
    assert (proxy.action_dir / "exec").read_text() == ECHO_BASH
    assert [path.name for path in proxy.action_dir.parent.iterdir()
            if path.name.startswith(".owproxy-")] == []
    check_streams(proxy, sentinels=0)


EXEC_ENV_MISMATCH = "Execution environment version mismatch. See logs for details."


def test_compile_round_trip_and_exec_env_match_and_mismatch(proxies, tmp_path):
    env = proxy_env(dict(RUNTIME_IMAGE_ENV,
                         OW_COMPILER=compiler_file(tmp_path, COMPILE_SCRIPT)))
    for spelling in ("--compile", "-compile"):
        done = subprocess.run(proxy_command(spelling, "hello"), input=PY_SOURCE.encode(),
                              env=env, capture_output=True, timeout=60)
        assert (done.returncode, done.stderr) == (0, b"")
        with zipfile.ZipFile(io.BytesIO(done.stdout)) as archive:
            names = set(archive.namelist())
            mode = archive.getinfo("exec").external_attr >> 16
        assert {"exec", "exec.env", "exec__.py", "main__.py"} <= names
        assert mode & 0o111
    compiled = base64.b64encode(done.stdout).decode()
    # an image whose compiler would fail: the compiled zip skips it (its exec runs as it is)
    warns = compiler_file(tmp_path, BAD_COMPILERS["warns"][0], "warns")
    proxy = proxies("--loop", env=dict(RUNTIME_IMAGE_ENV, OW_COMPILER=warns))
    assert proxy.init(compiled, binary=True).status == 200
    assert proxy.run({"name": "zip"}).json["greeting"] == "hello zip"
    for log_init_error, expected in (("1", GO_START_FAILED),
                                     ("", {"error": "cannot start action: " + EXEC_ENV_MISMATCH})):
        other = proxies("--loop", env=dict(RUNTIME_IMAGE_ENV, OW_EXECUTION_ENV="test/python-v2",
                                           OW_LOG_INIT_ERROR=log_init_error))
        response = other.init(compiled, binary=True)
        assert (response.status, response.json) == (502, expected)
        out, err = check_streams(other)
        assert out == "Expected exec.env should start with test/python-v2\nActual value: " \
                      "test/python-v1"
        assert EXEC_ENV_MISMATCH in err
        assert not (other.action_dir / "exec").exists()


def test_an_action_without_the_exec_env_the_image_expects_does_not_start(proxies):
    proxy = proxies("--loop", env={"OW_EXECUTION_ENV": "test/python-v1"})
    response = proxy.init(READ_LINE_LOOP)
    assert (response.status, response.json) == (
        502, {"error": "cannot start action: cannot read exec.env: No such file or directory"})
    assert not (proxy.action_dir / "exec").exists()


GO_INIT_NO_CODE = {"error": "Missing main/no code to execute."}


@pytest.mark.parametrize("body", [{"value": {"code": ""}}, {"value": {"code": None}}, {}])
def test_empty_code_in_loop_mode_is_the_go_proxys_403(proxies, body):
    proxy = proxies("--loop")
    response = proxy.post("/init", body)
    assert (response.status, response.json) == (403, GO_INIT_NO_CODE)
    assert proxy.logs() == ("", "")
    assert os.listdir(str(proxy.action_dir)) == []


@pytest.mark.parametrize("body", [{"value": {"code": ""}}, {"value": {"code": None}}, {}])
def test_empty_code_in_loop_mode_keeps_an_image_s_own_executable(proxies, body):
    """Where the Go proxy would refuse, owproxy serves what the image baked in."""
    proxy = proxies("--loop")
    (proxy.action_dir / "exec").write_text(READ_LINE_LOOP)
    (proxy.action_dir / "exec").chmod(0o755)
    assert proxy.post("/init", body).status == 200
    assert (proxy.action_dir / "exec").read_text() == READ_LINE_LOOP
    assert proxy.run({"name": "Ada"}).status == 200


@pytest.mark.parametrize("code", ["", None])
def test_empty_code_in_exec_mode_without_an_executable_is_the_dockerskeletons_502(proxy, code):
    response = proxy.init(code)
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert os.listdir(proxy.action_dir) == []
    response = proxy.run()
    assert (response.status, response.json) == (502, {"error": "The action failed to locate a "
                                                                "binary. See logs for details."})


def test_reinit_is_allowed_with_proxy_allow_reinit(proxies):
    proxy = proxies(env={"PROXY_ALLOW_REINIT": "1"})
    assert proxy.init(bash("echo '{\"v\": 1}'")).status == 200
    assert proxy.init_zip({"exec": bash("echo '{\"v\": 2}'")}).status == 200
    assert proxy.run().json == {"v": 2}
    assert proxy.init(bash("echo '{\"v\": 3}'")).status == 200
    assert proxy.run().json == {"v": 3}


def test_a_reinit_whose_archive_drops_a_file_leaves_nothing_of_it(proxies):
    proxy = proxies("--allow-reinit")
    action = bash("""
echo "{\\"extra\\": \\"$(cat extra.txt 2>/dev/null || echo none)\\", \\"lib\\": \\"$(ls lib)\\"}"
""")
    assert proxy.init_zip({"exec": action, "extra.txt": "old", "lib/a": "1"}).status == 200
    assert proxy.run({}).json == {"extra": "old", "lib": "a"}
    assert proxy.init_zip({"exec": action, "lib/b": "2"}).status == 200
    assert proxy.run({}).json == {"extra": "none", "lib": "b"}
    assert sorted(os.listdir(proxy.action_dir)) == ["exec", "lib"]


def test_a_run_during_a_reinit_always_finds_an_executable(proxies):
    proxy = proxies(env={"PROXY_ALLOW_REINIT": "1", "__OW_ALLOW_CONCURRENT": "true"})
    assert proxy.init(ECHO_RESULT).status == 200
    stop = threading.Event()

    def reinit():
        while not stop.is_set():
            assert proxy.init(ECHO_RESULT).status == 200

    reinits = in_thread(reinit)
    try:
        statuses = [proxy.run().status for _ in range(150)]
    finally:
        stop.set()
        reinits()
    assert statuses == [200] * 150


@pytest.mark.parametrize("layout", ["action directory", "compiled"])
def test_a_reinit_under_concurrent_runs_gives_each_run_one_whole_version(
        proxies, tmp_path, layout):
    # the action reads two files of its version, a moment apart
    action = bash("""
a=$(cat a.txt); sleep 0.02; b=$(cat b.txt)
echo "{\\"a\\": \\"$a\\", \\"b\\": \\"$b\\"}"
""")
    env = {}
    if layout == "compiled":  # exec is compiled into a launcher that runs it from SRC
        env["OW_COMPILER"] = compiler_file(tmp_path, bash("""
mv "$2/exec" "$2/action"; chmod +x "$2/action"
printf '#!/bin/bash\\ncd "%s"\\nexec bash ./action\\n' "$2" > "$3/exec"
"""))
    proxy = proxies("--allow-reinit", "--concurrent", env=env)

    def install(number):
        code = make_zip({"exec": action.replace("#!", "# ", 1) if layout == "compiled"
                         else action, "a.txt": number, "b.txt": number})
        assert proxy.init(code, binary=True).status == 200, proxy.logs()

    install("0")
    stop, answers = threading.Event(), []

    def runs():
        while not stop.is_set():
            answers.append(proxy.run({}).json)

    runners = [in_thread(runs) for _ in range(4)]
    for number in range(1, 7):
        install(str(number))
    stop.set()
    for runner in runners:
        runner()
    assert answers and all(answer["a"] == answer["b"] for answer in answers), answers
    assert len({answer["a"] for answer in answers}) > 1
    assert proxy.run({}).json == {"a": "6", "b": "6"}


# ---------------------------------------------------------------------------
# Runners: exec runs, results, the activation environment, concurrency, the extension API
# ---------------------------------------------------------------------------

ARGS_BASH = bash('echo "{\\"argc\\": $#, \\"argv_len\\": ${#1}, \\"stdin_len\\": $(wc -c)}"')


@pytest.mark.parametrize("length, argc", [(131071, 1), (131072, 0)])
def test_the_argument_is_on_argv_up_to_max_arg_strlen_and_always_on_stdin(proxy, length, argc):
    assert proxy.init(ARGS_BASH).status == 200
    value = {"a": "x" * (length - 9)}
    assert len(json.dumps(value)) == length
    result = proxy.run(value).json
    assert result == {"argc": argc, "argv_len": length if argc else 0, "stdin_len": length}


ENV_PARTITION = python_script("""
import json, os
print(json.dumps({k: os.environ.get(k) for k in ("ARRAY", "OBJECT", "STRING", "NUMBER", "BOOL", "NULL")}))
""")


def test_init_env_is_exported_to_every_run_as_strings(proxy):
    env = {"ARRAY": ["a", "b"], "OBJECT": {"a": "A"}, "STRING": "xyz", "NUMBER": 3,
           "BOOL": True, "NULL": None}
    assert proxy.init(ENV_PARTITION, env=env).status == 200
    for _ in range(2):
        result = proxy.run().json
        assert json.loads(result["ARRAY"]) == ["a", "b"]
        assert json.loads(result["OBJECT"]) == {"a": "A"}
        assert (result["STRING"], result["NUMBER"], result["BOOL"], result["NULL"]) == (
            "xyz", "3", "true", "")
    assert check_streams(proxy, sentinels=2) == ("", "")


def test_activation_fields_of_any_type_are_exported_for_that_run_only(proxy):
    code = python_script("""
import json, os
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith("__OW_")}))
""")
    assert proxy.init(code).status == 200
    deadline = int(time.time() * 1000) + 60000
    first = proxy.run({}, api_key="secret", deadline=deadline, extra={"a": 1}, flag=True)
    assert first.status == 200
    assert first.json == {"__OW_API_KEY": "secret", "__OW_DEADLINE": str(deadline),
                          "__OW_EXTRA": '{"a": 1}', "__OW_FLAG": "true"}
    second = proxy.run({}, activation_id="two")
    assert second.json == {"__OW_ACTIVATION_ID": "two"}


def test_an_activation_field_that_cannot_be_exported_is_400(proxy):
    assert proxy.init(bash("echo '{}'")).status == 200
    response = proxy.run({}, **{"a=b": "x"})
    assert response.status == 400
    assert "cannot be exported" in response.json["error"]
    check_streams(proxy)


@pytest.mark.parametrize("line", ["NaN", '{"a": NaN}', "42", '"text"', "null", "[1, 2"])
def test_results_that_are_not_json_objects_or_arrays_are_502(proxy, line):
    assert proxy.init(bash("echo '%s'" % line)).status == 200
    response = proxy.run()
    assert (response.status, response.json) == (502, {
        "error": "The action did not return a dictionary or array."})
    assert check_streams(proxy)[0] == line


@pytest.mark.parametrize("args", [[], ["--loop"]])
def test_a_result_with_a_number_too_large_for_a_float_is_no_result(proxies, args):
    """Python's json would read 1e999 as inf and send Infinity, which no parser takes."""
    code = (bash("echo '{\"a\": 1e999}'") if not args
            else bash("while read line; do echo '{\"a\": -1e999}' >&3; done"))
    proxy = proxies(*args)
    assert proxy.init(code).status == 200
    assert (proxy.run().status, proxy.run().json) == (502, BAD_RESULT)


@pytest.mark.parametrize("args, action", [
    ([], bash("printf '%s\\n' 'a log line' '  " + WRITTEN_RESULT + "  '")),
    (["--loop"], python_script(r"""
import os, sys
results = os.fdopen(3, "w")
for line in sys.stdin:
    print("a log line", flush=True)
    results.write(%r + "\n")
    results.flush()
""" % WRITTEN_RESULT)),
], ids=["exec", "loop"])
def test_a_result_line_is_answered_as_the_bytes_the_action_wrote(proxies, args, action):
    proxy = proxies(*args)
    assert proxy.init(action).status == 200
    for _ in range(2):
        response = proxy.run()
        assert (response.status, response.body) == (200, WRITTEN_RESULT.encode("utf-8"))
    assert "a log line" in check_streams(proxy, 2)[0]


def test_a_result_line_that_is_not_utf8_is_answered_as_valid_json(proxy):
    assert proxy.init(bash(r"""printf '{"a": "\xff"}\n'""")).status == 200
    response = proxy.run()
    assert response.status == 200
    assert response.body.decode("utf-8") == '{"a": "\ufffd"}'


@pytest.mark.parametrize("mode", [None, 0o644])
def test_run_without_a_runnable_exec_is_the_exact_502(proxy, mode):
    if mode:
        (proxy.action_dir / "exec").write_text(bash("echo '{}'"))
        (proxy.action_dir / "exec").chmod(mode)
    response = proxy.run()
    assert (response.status, response.json) == (502, {
        "error": "The action failed to locate a binary. See logs for details."})
    check_streams(proxy)


def test_an_exec_that_cannot_start_is_502_with_the_cause_in_stdout(proxy):
    assert proxy.init("no shebang, not a binary\n").status == 200
    response = proxy.run()
    assert response.status == 502
    assert "error: cannot start the action" in check_streams(proxy)[0]


@pytest.mark.parametrize("code, diagnosis", [
    ("echo '{\"ok\": 1}'\n", "exec is text without a #! line, and not an ELF binary: make its "
                            "first line name its interpreter, e.g. #!/bin/sh"),
    ("#!/bin/sh\r\necho '{}'\r\n", "the #! line of %s ends with a carriage return (Windows line "
                                   "endings): convert the file to Unix line endings"),
    ("#include <stdio.h>\nint main(void) { puts(\"{}\"); return 0; }\n",
     "exec is C source, not a program: compile it (cc -o exec main.c)"),
    ("#!/no/such/interpreter -x\necho\n",
     "names /no/such/interpreter as its interpreter in its #! line, which is not in this image"),
    ("\x7fELF" + "\x00" * 60, "exec is an ELF binary for another machine"),
])
def test_an_exec_that_cannot_start_is_diagnosed_with_a_fix(proxy, code, diagnosis):
    assert proxy.init(code).status == 200
    response = proxy.run()
    assert (response.status, response.json) == (502, BAD_RESULT)
    out, err = check_streams(proxy)
    assert "error: cannot start the action" in out
    assert "owproxy: " in err and diagnosis.replace("%s", str(proxy.action_dir / "exec")) in err


def test_an_exec_that_is_not_executable_is_diagnosed_with_a_fix(proxy):
    (proxy.action_dir / "exec").write_text(ECHO_RESULT)
    (proxy.action_dir / "exec").chmod(0o644)
    assert proxy.run().json == {"error": "The action failed to locate a binary. See logs for "
                                         "details."}
    assert "exec is not an executable file: chmod +x it" in check_streams(proxy)[1]


@pytest.mark.parametrize("program", ["bash", "python"])
def test_an_actionloop_program_without_loop_is_diagnosed(proxy, program):
    code = (bash("read line; echo '{\"ok\": 1}' >&3") if program == "bash"
            else (HERE / "examples" / "loop.py").read_text())
    assert proxy.init(code).status == 200
    assert proxy.run().json == BAD_RESULT
    assert ("the action met a closed file descriptor: if it is an ActionLoop program, which "
            "answers on fd 3, start the proxy with --loop" in check_streams(proxy)[1])


OVERLAP_DETECTOR = python_script("""
import json, os, time
try:
    os.close(os.open("busy", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
except FileExistsError:
    print(json.dumps({"overlap": True}))
else:
    time.sleep(0.3)
    os.unlink("busy")
    print(json.dumps({"overlap": False}))
""")


def test_runs_are_serialised_by_default(proxy):
    assert proxy.init(OVERLAP_DETECTOR).status == 200
    runs = [in_thread(proxy.run, {}, activation_id=str(n)) for n in range(4)]
    results = [join() for join in runs]
    assert [(r.status, r.json) for r in results] == [(200, {"overlap": False})] * 4
    check_streams(proxy, sentinels=4)


RENDEZVOUS = python_script("""
import glob, json, os, sys, time
me = os.environ["__OW_ACTIVATION_ID"]
open("arrived-" + me, "w").close()
wanted = json.loads(sys.argv[1])["n"]
end = time.time() + 5
while len(glob.glob("arrived-*")) < wanted and time.time() < end:
    time.sleep(0.01)
print(json.dumps({"met": len(glob.glob("arrived-*")) >= wanted, "id": me,
                  "api_key": os.environ.get("__OW_API_KEY")}))
""")


def test_concurrent_runs_are_parallel_each_with_its_own_environment(proxies):
    proxy = proxies(env={"__OW_ALLOW_CONCURRENT": "true"})
    assert proxy.init(RENDEZVOUS).status == 200
    runs = [in_thread(proxy.run, {"n": 4}, activation_id="a%d" % n,
                      **({"api_key": "secret"} if n == 0 else {})) for n in range(4)]
    results = [join() for join in runs]
    assert [r.status for r in results] == [200] * 4
    assert [r.json for r in results] == [
        {"met": True, "id": "a%d" % n, "api_key": "secret" if n == 0 else None}
        for n in range(4)]
    later = proxy.run({"n": 0}, activation_id="later")
    assert later.json == {"met": True, "id": "later", "api_key": None}
    check_streams(proxy, sentinels=5)


EXTENSION = r"""
import os, subprocess, sys, time
sys.path.insert(0, REPO)
import owproxy

EPILOGUE = ("printf '{\"who\": \"%s\", \"var\": \"%s\", \"built\": \"%s\", \"cwd\": \"%s\"}\\n' "
            "\"$WHO\" \"$MY_VAR\" \"$BUILT\" \"$PROXY_CWD\"")


class MyRunner(owproxy.ActionRunner):
    # the source is action.sh; build compiles it into exec

    def epilogue(self, message):
        with open(self.source, "a") as source:
            source.write("\n" + EPILOGUE + "\n")

    def build(self, message):
        with open(self.source) as source:
            code = source.read()
        os.makedirs(os.path.dirname(self.binary), exist_ok=True)
        with open(self.binary, "w") as binary:
            binary.write("#!/bin/bash\nBUILT=yes\n" + code)
        os.chmod(self.binary, 0o755)
        if "BUILD-FAILS" in code:  # after writing a binary: the init must take it back
            print("my build failed")  # sys.stdout, block-buffered: not yet written
            return False
        return True

    def env(self, message):
        env = owproxy.ActionRunner.env(self, message)
        env["MY_VAR"] = "from the env hook"
        env["PROXY_CWD"] = os.getcwd()
        return env

    def run(self, args, env):
        if args.get("answer") == "bytes":
            return 200, {"raw": b"not JSON"}
        if args.get("answer") == "three":
            return 200, {}, "one too many"
        if args.get("answer") == "exit":
            sys.exit(3)
        if args.get("answer") == "text-status":
            return "200", {}
        if args.get("answer") == "changed":
            status, result = owproxy.ActionRunner.run(self, args, env)
            result["changed"] = True
            return status, result
        return owproxy.ActionRunner.run(self, args, env)


class SpawnerRunner(MyRunner):
    def build(self, message):
        child = subprocess.Popen(["sh", "-c", "exit 3"], start_new_session=True)
        time.sleep(1.2)  # long enough for a scan of the orphan reaper, as PID 1
        with open(self.binary, "w") as binary:
            binary.write("#!/bin/sh\necho '{\"status\": %d}'\n" % child.wait())
        os.chmod(self.binary, 0o755)
        return True


class VerifyOnlyRunner(owproxy.ActionRunner):
    def verify(self):  # upstream style: no call to the base class
        return os.access(self.binary, os.X_OK)


class RaisingRunner(owproxy.ActionRunner):
    def init(self, message):
        raise RuntimeError("boom in init")


ACTION_DIR = sys.argv[sys.argv.index("--action-dir") + 1]
RUNNERS = {
    "build": lambda: MyRunner(os.path.join(ACTION_DIR, "action.sh"),
                              os.path.join(ACTION_DIR, "exec")),
    "nested": lambda: MyRunner(os.path.join(ACTION_DIR, "action.sh"),
                               os.path.join(ACTION_DIR, "bin", "exec")),
    "spawner": lambda: SpawnerRunner(os.path.join(ACTION_DIR, "action.sh"),
                                     os.path.join(ACTION_DIR, "exec")),
    "verify-only": VerifyOnlyRunner,
    "nowhere": lambda: MyRunner("/no/such/folder/action.sh", "/no/such/folder/exec"),
    "raising": RaisingRunner,
}
owproxy.setRunner(RUNNERS[os.environ["RUNNER"]]())
owproxy.main()  # upstream style: main() exits by itself
"""


@pytest.fixture
def extended_proxies(proxies, tmp_path):
    """Proxies started from a script that subclasses ActionRunner, as runtimes do."""
    script = tmp_path / "my_proxy.py"
    script.write_text(EXTENSION.replace("REPO", repr(str(HERE))))

    def start(runner="build"):
        return proxies("--allow-reinit", command=lambda port, action_dir: (
            [PYTHON, str(script), "--host", "127.0.0.1", "--port", str(port),
             "--action-dir", action_dir], {"RUNNER": runner}))

    return start


def built_result(proxy, who):
    return {"who": who, "var": "from the env hook", "built": "yes",
            "cwd": str(proxy.action_dir)}


def test_a_runner_subclass_hooks_epilogue_build_and_env(extended_proxies):
    proxy = extended_proxies()
    response = proxy.init("WHO=world")
    assert (response.status, response.json) == (200, {"ok": True})
    source = (proxy.action_dir / "action.sh").read_text()
    assert source.startswith("WHO=world\n") and source.rstrip().endswith('"$PROXY_CWD"')
    assert (proxy.action_dir / "exec").read_text().startswith("#!/bin/bash\nBUILT=yes\n")
    response = proxy.run()
    assert (response.status, response.json) == (200, built_result(proxy, "world"))
    assert check_streams(proxy) == ("", "")


def test_a_build_that_returns_false_fails_init_and_keeps_the_previous_action(extended_proxies):
    proxy = extended_proxies()
    assert proxy.init("WHO=first").status == 200
    response = proxy.init("WHO=second # BUILD-FAILS")
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert response.body == json.dumps(INIT_FAILED).encode()
    out, _ = proxy.logs()
    assert out.index("my build failed") < out.index(SENTINEL), "printed after the sentinel"
    assert (proxy.action_dir / "action.sh").read_text().startswith("WHO=first\n")
    response = proxy.run()
    assert (response.status, response.json) == (200, built_result(proxy, "first"))


def test_a_failed_zip_init_puts_back_a_binary_in_a_subfolder(extended_proxies):
    proxy = extended_proxies("nested")
    assert proxy.init("WHO=first").status == 200
    response = proxy.init_zip({"action.sh": ("WHO=second # BUILD-FAILS\n", 0o644)})
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert proxy.run().json == built_result(proxy, "first")
    assert sorted(os.listdir(proxy.action_dir)) == ["action.sh", "bin"]


def test_a_zip_with_the_folder_of_a_binary_it_lacks(extended_proxies):
    proxy = extended_proxies("nested")
    assert proxy.init("WHO=first").status == 200
    response = proxy.init_zip({"action.sh": ("WHO=zipped\n", 0o644),
                               "bin/readme.txt": ("the build puts exec here\n", 0o644)})
    assert (response.status, response.json) == (200, {"ok": True})
    assert proxy.run().json == built_result(proxy, "zipped")
    assert sorted(os.listdir(proxy.action_dir / "bin")) == ["exec", "readme.txt"]


def test_an_init_without_code_skips_epilogue_and_build(extended_proxies):
    proxy = extended_proxies()
    assert proxy.init("WHO=first").status == 200
    source = (proxy.action_dir / "action.sh").read_text()
    assert proxy.post("/init", {"value": {}}).status == 200
    assert (proxy.action_dir / "action.sh").read_text() == source
    assert proxy.run().json == built_result(proxy, "first")


def test_a_zip_whose_executable_the_build_makes(extended_proxies):
    proxy = extended_proxies()
    response = proxy.init_zip({"action.sh": ("WHO=zipped\n", 0o644)})
    assert (response.status, response.json) == (200, {"ok": True})
    assert proxy.run().json == built_result(proxy, "zipped")


@pytest.mark.parametrize("answer", ["bytes", "three", "exit", "text-status"])
def test_a_run_hook_that_fails_or_cannot_be_answered_is_a_500_with_sentinels(extended_proxies,
                                                                              answer):
    proxy = extended_proxies()
    assert proxy.init("WHO=x").status == 200
    response = proxy.run({"answer": answer})
    assert response.status == 500
    assert response.json["error"].startswith("Internal error. ")
    check_streams(proxy)
    assert proxy.run().json == built_result(proxy, "x")


def test_an_init_hook_that_raises_is_the_exact_502(extended_proxies):
    proxy = extended_proxies("raising")
    response = proxy.init("anything")
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "boom in init" in check_streams(proxy)[1]


def test_a_runner_whose_run_changes_the_result_answers_the_change(extended_proxies):
    proxy = extended_proxies()
    assert proxy.init("WHO=world").status == 200
    response = proxy.run({"answer": "changed"})
    assert (response.status, response.json) == (200, dict(built_result(proxy, "world"),
                                                          changed=True))


@pytest.mark.skipif(not pid_namespaces_work(), reason="no PID namespaces (unshare) here")
def test_as_pid_1_the_proxy_leaves_a_hook_the_exit_status_of_its_child(proxies, tmp_path):
    script = tmp_path / "my_proxy.py"
    script.write_text(EXTENSION.replace("REPO", repr(str(HERE))))
    proxy = proxies(command=lambda port, action_dir: (
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", PYTHON, str(script),
         "--host", "127.0.0.1", "--port", str(port), "--action-dir", action_dir],
        {"RUNNER": "spawner"}))
    (pid_1,) = children(proxy.process.pid)
    try:
        assert proxy.init("WHO=anyone").status == 200
        assert proxy.run().json == {"status": 3}
    finally:
        os.kill(pid_1, signal.SIGTERM)
    assert proxy.process.wait(10) == 0


def test_a_runner_whose_source_folder_is_missing_is_a_one_line_error(tmp_path):
    script = tmp_path / "my_proxy.py"
    script.write_text(EXTENSION.replace("REPO", repr(str(HERE))))
    completed = subprocess.run(
        [PYTHON, str(script), "--host", "127.0.0.1", "--port", str(free_port()),
         "--action-dir", str(tmp_path)], env=proxy_env({"RUNNER": "nowhere"}),
        capture_output=True, text=True, timeout=30)
    check_one_line_error(completed, "cannot work in the folder of /no/such/folder/action.sh")


def test_a_runner_that_overrides_verify_alone_runs_the_baked_exec(extended_proxies):
    proxy = extended_proxies("verify-only")
    (proxy.action_dir / "exec").write_text(bash("echo '{\"baked\": 1}'"))
    (proxy.action_dir / "exec").chmod(0o755)
    response = proxy.run()
    assert (response.status, response.json) == (200, {"baked": 1})


# ---------------------------------------------------------------------------
# Warm processes: ActionLoop executables, Python functions, the runtime images' launcher
# ---------------------------------------------------------------------------

def started_loop(proxies, *args):
    proxy = proxies("--loop", *args)
    assert proxy.init(LOOP_ACTION, env={"GREETING": "hi"}).status == 200
    return proxy


@pytest.fixture
def loop_proxy(proxies):
    return started_loop(proxies)


def test_a_loop_executable_serves_activations_from_one_warm_process(loop_proxy):
    first = loop_proxy.run({"n": 1}, activation_id="a1", namespace="ns").json
    second = loop_proxy.run({"n": 2}, activation_id="a2").json
    assert first["pid"] == second["pid"]
    assert (first["count"], second["count"]) == (1, 2)
    assert first["greeting"] == "hi"
    assert first["request"]["value"] == {"n": 1}
    assert (first["request"]["activation_id"], first["request"]["namespace"]) == ("a1", "ns")
    assert second["request"]["activation_id"] == "a2" and "namespace" not in second["request"]
    out, err = check_streams(loop_proxy, sentinels=2)
    assert out.split() == ["log", "from", "a1", "log", "from", "a2"]
    assert err.split() == ["err", "from", "a1", "err", "from", "a2"]


def test_a_loop_executable_acks_on_fd3_when_asked(proxies):
    proxy = proxies("--loop", env={"OW_WAIT_FOR_ACK": "1"})
    assert proxy.init(LOOP_ACTION).status == 200
    assert proxy.run({}).json["count"] == 1


ACK_IF_ASKED = python_script(r'''
import json, os, sys
asked = os.environ.get("__OW_WAIT_FOR_ACK")
if asked:  # as openwhisk-runtime-go's launchers do
    os.write(3, (os.environ.get("ACK", '{"ok": true}') + "\n").encode())
for line in sys.stdin:
    value = json.loads(line)["value"]
    os.write(3, (json.dumps({"asked": asked, "value": value}) + "\n").encode())
''')


def test_ow_wait_for_ack_makes_the_proxy_ask_for_the_ack_and_wait_for_it(proxies):
    proxy = proxies("--loop", env={"OW_WAIT_FOR_ACK": "1"})
    assert proxy.init(ACK_IF_ASKED).status == 200
    for n in (1, 2):
        response = proxy.run({"n": n})
        assert (response.status, response.json) == (200, {"asked": "1", "value": {"n": n}})
    # The ack was read as the ack: no "dropped result line" note, nothing at all.
    assert check_streams(proxy, sentinels=2) == ("", "")


def test_an_ack_other_than_ok_true_fails_init_with_the_exact_502(proxies):
    proxy = proxies("--loop", env={"OW_WAIT_FOR_ACK": "1", "OW_LOG_INIT_ERROR": "1"})
    response = proxy.init(ACK_IF_ASKED, env={"ACK": '{"ok": false}'})
    assert (response.status, response.json) == (502, GO_START_FAILED)
    out, err = check_streams(proxy)
    assert out == ""
    assert err.startswith("owproxy: The action did not initialize properly."), err


@pytest.mark.parametrize("ack,log_init_error,expected,cause", [
    ("1", "1", GO_START_FAILED, "Command exited abruptly during initialization."),
    ("", "1", GO_START_FAILED, "command exited"),
    ("1", "", {"error": "cannot start action: Command exited abruptly during initialization."},
     "Command exited abruptly during initialization."),
    ("", "", {"error": "cannot start action: command exited"}, "command exited"),
])
def test_a_loop_executable_that_exits_at_start_gets_the_go_proxys_texts(
        proxies, ack, log_init_error, expected, cause):
    proxy = proxies("--loop", env={"OW_WAIT_FOR_ACK": ack, "OW_LOG_INIT_ERROR": log_init_error})
    response = proxy.init(bash("echo 'starting'\nexit 4"))
    assert (response.status, response.json) == (502, expected)
    out, err = check_streams(proxy)
    assert out == "starting"
    assert cause in err
    assert "the action exited with status 4 at start: maybe it is not an ActionLoop program" in err


@pytest.mark.parametrize("code", ["\n", "package main\n\nfunc main() {}\n"])
def test_a_loop_binary_that_is_no_executable_is_the_go_proxys_command_exited(proxies, code):
    proxy = proxies("--loop")
    response = proxy.init(base64.b64encode(code.encode()).decode(), binary=True)
    assert (response.status, response.json) == (502, {"error": "cannot start action: "
                                                                "command exited"})
    assert ("cannot start the action: %s is text without a #! line, and not an ELF binary"
            % (proxy.action_dir / "exec")) in check_streams(proxy)[1]


def test_a_loop_executable_that_cannot_start_leaves_no_descriptor_open(proxies):
    proxy = proxies("--loop")
    (proxy.action_dir / "exec").write_text("no interpreter line: execve refuses it\n")
    (proxy.action_dir / "exec").chmod(0o755)
    response = proxy.run()
    assert (response.status, response.json) == (502, RUN_EXITED)

    def descriptors():
        return len(os.listdir("/proc/%d/fd" % proxy.process.pid))

    before = descriptors()
    for _ in range(10):
        assert proxy.run().status == 502
    assert wait_for(lambda: descriptors() <= before, timeout=5)  # connections close after
    assert "cannot start the action" in check_streams(proxy, sentinels=11)[1]


def test_a_plain_executable_under_loop_is_diagnosed(proxies):
    proxy = proxies("--loop")
    assert proxy.init(ECHO_RESULT).json == {"error": "cannot start action: command exited"}
    assert ("the action exited at start: maybe it is not an ActionLoop program, which reads one "
            "request per line on stdin and answers each on fd 3" in check_streams(proxy)[1])


@pytest.mark.parametrize("args,env,logged", [
    ((), {"OW_LOG_INIT_ERROR": "1"}, True),
    ((), {"OW_LOG_INIT_ERROR": "0"}, True),  # any value at all, as the Go proxy reads it
    (("--log-init-error",), {}, True),
    ((), {"OW_LOG_INIT_ERROR": ""}, False),
    ((), {}, False),
])
def test_a_loop_init_failure_names_its_cause_unless_the_image_logs_it(proxies, args, env, logged):
    proxy = proxies("--loop", *args, env=env)
    response = proxy.init(base64.b64encode(b"PK\x03\x04broken").decode(), binary=True)
    assert response.status == 502
    if logged:
        assert response.json == INIT_FAILED
    else:
        assert response.json["error"].startswith("the code is not a zip archive (")
    assert "the code is not a zip archive" in check_streams(proxy)[1]


def test_a_run_before_any_init_is_the_go_proxys_500_and_explained_with_verbose(proxies):
    proxy = proxies("--loop", "--verbose")
    response = proxy.run({})
    assert (response.status, response.json) == (500, {"error": "no action defined yet"})
    assert ("owproxy: %s is missing: POST /init with the action's code first"
            % (proxy.action_dir / "exec")) in check_streams(proxy)[1]


def test_a_loop_process_that_dies_during_a_run_is_the_go_proxys_400_then_replaced(loop_proxy):
    pid = loop_proxy.run({}).json["pid"]
    response = loop_proxy.run({"die": True})
    assert (response.status, response.json) == (400, {"error": "command exited"})
    after = loop_proxy.run({}).json
    assert after["pid"] != pid and after["count"] == 1
    out, err = check_streams(loop_proxy, sentinels=3)  # the action's lines, nothing else
    assert (out.split(), err.split()) == (["log", "from", "None"] * 3, ["err", "from", "None"] * 3)


def test_with_verbose_the_loop_logs_say_why_a_process_was_replaced(proxies):
    proxy = started_loop(proxies, "--verbose")
    assert proxy.run({"die": True}).status == 400
    pid = proxy.run({}).json["pid"]
    os.kill(pid, signal.SIGKILL)
    assert gone_or_zombie(pid)
    assert proxy.run({}).status == 200
    err = check_streams(proxy, sentinels=3)[1]
    assert "owproxy: the action exited with status 7" in err
    assert ("owproxy: a fresh process replaces one that ended between activations (the action "
            "was killed by signal 9 (SIGKILL))") in err


def test_a_loop_process_that_dies_between_runs_is_replaced(loop_proxy):
    pid = loop_proxy.run({}).json["pid"]
    os.kill(pid, signal.SIGKILL)
    assert gone_or_zombie(pid)
    after = loop_proxy.run({})
    assert after.status == 200 and after.json["pid"] != pid
    assert "owproxy" not in check_streams(loop_proxy, sentinels=2)[1]


def test_a_loop_result_that_is_not_json_is_the_exact_502_and_the_process_serves_on(loop_proxy):
    pid = loop_proxy.run({}).json["pid"]
    response = loop_proxy.run({"bad": True})
    assert (response.status, response.json) == (502, BAD_RESULT)
    after = loop_proxy.run({}).json
    assert (after["pid"], after["count"]) == (pid, 3)
    assert "not json" not in check_streams(loop_proxy, sentinels=3)[0]  # as the Go proxy


def test_a_loop_process_past_its_deadline_is_killed_and_replaced(loop_proxy):
    pid = loop_proxy.run({}).json["pid"]
    deadline = str(int(time.time() * 1000) + 1000)
    started = time.time()
    response = loop_proxy.run({"sleep": 60}, deadline=deadline)
    assert (response.status, response.json) == (502, RUN_TIMED_OUT)
    assert time.time() - started < 20
    assert not os.path.exists("/proc/%d" % pid) or " Z " in Path(
        "/proc/%d/stat" % pid).read_text()
    assert loop_proxy.run({}).json["pid"] != pid


def rendezvous_runs(proxy, folder, n):
    """n runs at once, each waiting for the others; the results in order."""
    folder.mkdir()
    results = [None] * n

    def one(i):
        results[i] = proxy.run({"rendezvous": str(folder), "n": n}, activation_id="act%d" % i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_loop_runs_get_a_process_each(proxies, tmp_path):
    proxy = proxies("--loop", env={"__OW_ALLOW_CONCURRENT": "true"})
    assert proxy.init(LOOP_ACTION).status == 200
    results = rendezvous_runs(proxy, tmp_path / "meet", 3)
    assert [r.status for r in results] == [200, 200, 200]
    assert len({r.json["pid"] for r in results}) == 3
    assert [r.json["request"]["activation_id"] for r in results] == ["act0", "act1", "act2"]
    # Three activations share each stream, their sentinel lines among the others'
    # lines (which split_logs would leave blank): whole lines, each activation's log
    # before its sentinel, so no part of the stream holds more sentinels than logs.
    for stream, word in zip(proxy.logs(), ("log", "err")):
        lines = stream.split("\n")
        assert lines.pop() == "", stream
        assert sorted(lines) == [SENTINEL] * 3 + ["%s from act%d" % (word, n) for n in range(3)]
        assert all(2 * lines[:end].count(SENTINEL) <= end for end in range(7)), stream


TWO_RESULTS_FIRST = python_script(r'''
import json, os, sys
count = 0
for line in sys.stdin:
    count += 1
    value = json.loads(line)["value"]
    if count == 1:  # one write, so both lines reach the proxy together
        os.write(3, b'{"count": 1, "line": "first"}\n{"count": 1, "line": "extra"}\n')
    else:
        os.write(3, (json.dumps({"count": count, "n": value["n"]}) + "\n").encode())
''')


@pytest.mark.parametrize("verbose", [False, True])
def test_a_loop_result_line_too_many_is_dropped_so_later_runs_get_their_own(proxies, verbose):
    proxy = proxies("--loop", *["--verbose"][:verbose])
    assert proxy.init(TWO_RESULTS_FIRST).status == 200
    first = proxy.run({"n": 1})
    assert (first.status, first.json) == (200, {"count": 1, "line": "first"})
    for n in (2, 3):
        response = proxy.run({"n": n})
        assert (response.status, response.json) == (200, {"count": n, "n": n})
    out, err = check_streams(proxy, sentinels=3)
    note = "owproxy: dropped 1 result line(s) the action wrote outside an activation"
    assert (out, note in err, err == "") == ("", verbose, not verbose)


KEYS_LOOP = python_script(r'''
import json, os, sys
for line in sys.stdin:
    request = json.loads(line)
    os.write(3, (json.dumps({"keys": sorted(request), "value": request["value"],
                             "api_host": os.environ.get("__OW_API_HOST"),
                             "namespace": os.environ.get("__OW_NAMESPACE")}) + "\n").encode())
''')


def test_the_loop_input_line_holds_the_run_fields_not_the_container_variables(proxies):
    proxy = proxies("--loop", env={"__OW_API_HOST": "somewhere"})
    assert proxy.init(KEYS_LOOP, env={"__OW_NAMESPACE": "guest"}).status == 200
    fields = {"activation_id": "a1", "action_name": "/guest/keys", "action_version": "0.0.1",
              "api_key": "uuid:key", "transaction_id": "t1",
              "deadline": str(int(time.time() * 1000) + 60000)}
    first = proxy.run({"n": 1}, **fields)
    assert first.status == 200
    assert first.json == {"keys": sorted(list(fields) + ["value"]), "value": {"n": 1},
                          "api_host": "somewhere", "namespace": "guest"}
    second = proxy.run({"n": 2}, activation_id="a2")
    assert second.json["keys"] == ["activation_id", "value"]  # nothing left of the first
    same = proxy.run({"n": 3}, namespace="guest")  # the value the process started with
    assert same.json["keys"] == ["namespace", "value"]


@pytest.mark.parametrize("binary", [False, True])
def test_utf8_parameters_reach_a_read_line_loop_as_utf8(proxies, binary):
    proxy = proxies("--loop")
    code = base64.b64encode(READ_LINE_LOOP.encode()).decode() if binary else READ_LINE_LOOP
    assert proxy.init(code, binary=binary).status == 200
    params = {"snow": "\u2744", "caf\u00e9": "cr\u00e8me", "line": "a\nb"}
    response = proxy.run(params, activation_id="\u00e9t\u00e9")
    assert response.json["value"] == {"snow": "\u2744", "caf\u00e9": "cr\u00e8me", "line": "anb"}
    assert response.json["activation_id"] == "\u00e9t\u00e9"


BIG_RESULT_LOOP = python_script(r'''
import json, os, string, sys
for line in sys.stdin:
    size = json.loads(line)["value"]["size"]
    text = (string.ascii_lowercase * (size // 26 + 1))[:size]
    view = memoryview((json.dumps({"data": text, "size": size}) + "\n").encode())
    while view:
        view = view[os.write(3, view):]
''')


def test_a_5_mb_loop_result_comes_back_intact(proxies):
    proxy = proxies("--loop")
    assert proxy.init(BIG_RESULT_LOOP).status == 200
    size = 5 * MIB + 7
    response = proxy.run({"size": size})
    assert response.status == 200
    result = response.json
    assert result["size"] == size and len(result["data"]) == size
    assert result["data"] == ("abcdefghijklmnopqrstuvwxyz" * (size // 26 + 1))[:size]
    small = proxy.run({"size": 3})
    assert (small.status, small.json) == (200, {"data": "abc", "size": 3})
    assert check_streams(proxy, sentinels=2) == ("", "")


FUNCTION = '''
import os, sys
calls = []

def main(args):
    calls.append(1)
    print("hello from main")
    if args.get("fail"):
        raise ValueError("boom: " + args["fail"])
    if args.get("set"):
        return {"a": {1, 2}}
    if args.get("text"):
        return "just text"
    if args.get("exit"):
        sys.exit(3)
    if args.get("sleep"):
        import time
        time.sleep(args["sleep"])
    return {"calls": len(calls), "pid": os.getpid(), "args": args, "stdin": sys.stdin.read(),
            "id": os.environ.get("__OW_ACTIVATION_ID"), "env": os.environ.get("LEVEL")}
'''


@pytest.fixture
def function_proxy(proxy):
    assert proxy.init(FUNCTION, env={"LEVEL": "3"}).status == 200
    return proxy


def test_a_python_function_is_served_warm_with_its_own_activation_variables(function_proxy):
    first = function_proxy.run({"x": 1}, activation_id="one").json
    second = function_proxy.run({"x": 2}).json
    assert (first["calls"], second["calls"]) == (1, 2)
    assert first["pid"] == second["pid"]
    assert (first["args"], first["id"], first["env"], first["stdin"]) == ({"x": 1}, "one", "3", "")
    assert (second["id"], second["env"]) == (None, "3")
    out, err = check_streams(function_proxy, sentinels=2)
    assert out.split() == ["hello", "from", "main"] * 2 and err == ""
    assert not (function_proxy.action_dir / "exec").exists()



def test_a_python_function_gets_an_argument_that_takes_its_worker_many_reads(proxy):
    assert proxy.init("def main(args):\n    return {'size': len(args['text'])}\n").status == 200
    for size in (3 * 65536 + 5, 3 * MIB):
        assert proxy.run({"text": "x" * size}).json == {"size": size}


def test_a_python_function_with_another_entry_point(proxy):
    assert proxy.init("def handler(args):\n    return {'handled': args}\n",
                      main="handler").status == 200
    assert proxy.run({"a": 1}).json == {"handled": {"a": 1}}


def test_a_python_function_has_the_whole_standard_library(proxy):
    code = ("from http import client\nimport ssl\n"
            "def main(args):\n    return {'https': hasattr(client, 'HTTPSConnection'),"
            " 'ssl': ssl.OPENSSL_VERSION_INFO[0] > 0}\n")
    assert proxy.init(code).status == 200
    assert proxy.run().json == {"https": True, "ssl": True}


def test_a_python_function_sees_ordinary_modules_where_the_proxy_defers_them(proxy):
    code = ("import sys, types\n" + "".join("import %s\n" % name for name in
                                          owproxy.DEFERRED_MODULES)
            + "def main(args):\n    return sorted(name for name in %r\n"
              "        if type(sys.modules[name]) is not types.ModuleType)\n"
            % (owproxy.DEFERRED_MODULES,))
    assert proxy.init(code).status == 200
    assert proxy.run().json == []


def test_a_baked_python_function_runs_without_init(proxy):
    (proxy.action_dir / "__main__.py").write_text("def main(args):\n    return {'baked': 1}\n")
    assert proxy.run({}).json == {"baked": 1}


def test_a_python_zip_imports_its_siblings_and_its_virtualenv(proxy):
    version = subprocess.run([PYTHON, "-c", "import sys; print('python%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    files = {
        "__main__.py": "import helper, vendored\ndef main(args):\n"
                       "    return {'helper': helper.twice(args['n']), 'vendored': vendored.NAME}\n",
        "helper.py": "def twice(n):\n    return 2 * n\n",
        "virtualenv/lib/%s/site-packages/vendored/__init__.py" % version: "NAME = 'from venv'\n",
    }
    assert proxy.init_zip(files).status == 200
    assert proxy.run({"n": 21}).json == {"helper": 42, "vendored": "from venv"}


def test_source_that_is_not_python_stays_an_executable(proxy):
    assert proxy.init("echo not python\n").status == 200
    assert (proxy.action_dir / "exec").exists()


@pytest.mark.parametrize("code, expected", [
    (bash("echo '{\"bash\": \"ran\"}'"), {"bash": "ran"}),
    # Python with a shebang and a main(): an executable all the same.
    (python_script("import json\ndef main(args):\n    return {'function': True}\n"
                   "print(json.dumps({'script': 'ran'}))"), {"script": "ran"}),
], ids=["bash", "python-with-a-main"])
def test_source_with_a_shebang_stays_an_executable_and_runs(proxy, code, expected):
    assert proxy.init(code).status == 200
    assert (proxy.action_dir / "exec").read_text() == code
    assert not (proxy.action_dir / "__main__.py").exists()
    response = proxy.run({})
    assert (response.status, response.json) == (200, expected)


@pytest.mark.parametrize("code, cause", [
    ("import os\ndef main(args)\n    return {}\n", ["__main__.py\", line 2", "SyntaxError"]),
    ("def handler(args):\n    return {}\n", ["__main__.py defines no function 'main'"]),
    ("import no_such_module_here\ndef main(args):\n    return {}\n",
     ["line 1", "ModuleNotFoundError"]),
])
def test_a_python_function_that_cannot_load_fails_init_with_file_and_line(proxies, code, cause):
    proxy = proxies(env={"PROXY_ALLOW_REINIT": "1"})
    assert proxy.init("def main(args):\n    return {'old': True}\n").status == 200
    response = proxy.init(code)
    assert (response.status, response.json) == (502, INIT_FAILED)
    _, err = check_streams(proxy)
    for text in cause:
        assert text in err
    assert proxy.run({}).json == {"old": True}


def test_python_with_an_indentation_error_fails_init_with_the_line(proxy):
    response = proxy.init("import os\n  x = 1\n")
    assert (response.status, response.json) == (502, INIT_FAILED)
    out, err = check_streams(proxy)
    assert out == ""
    assert '__main__.py", line 2' in err and "IndentationError: unexpected indent" in err
    assert not (proxy.action_dir / "exec").exists()


@pytest.mark.parametrize("code, note", [
    ("def main(args)\n    return {}\n",
     "__main__.py failed to load: SyntaxError: "),
    ("import no_such_module_here\n", "__main__.py failed to load: ModuleNotFoundError: No module "
                                     "named 'no_such_module_here'"),
    ("def handler(args):\n    return {}\n", "__main__.py defines no function 'main'"),
])
def test_a_function_that_cannot_load_says_what_happened_from_the_actions_folder(proxy, code,
                                                                                 note):
    response = proxy.init(code)
    assert (response.status, response.json) == (502, INIT_FAILED)
    err = check_streams(proxy)[1]
    assert "owproxy: " + note in err
    assert str(proxy.action_dir) not in err


def test_an_exception_is_an_application_error_with_the_traceback_on_stderr(function_proxy):
    response = function_proxy.run({"fail": "bad input"})
    assert (response.status, response.json) == (200, {"error": "boom: bad input"})
    _, err = check_streams(function_proxy)
    assert 'File "__main__.py", line 9, in main' in err  # named from the action's folder
    assert "ValueError: boom: bad input" in err
    assert "owproxy.py" not in err


def test_a_result_json_cannot_encode_is_a_502_naming_its_type(function_proxy):
    response = function_proxy.run({"set": True})
    assert response.status == 502
    assert response.json["error"].startswith("The action returned a dict that JSON cannot encode")
    assert "set" in response.json["error"]
    assert function_proxy.run({}).json["calls"] == 2  # the same interpreter serves on


def test_a_result_that_is_not_an_object_is_the_exact_502(function_proxy):
    response = function_proxy.run({"text": True})
    assert (response.status, response.json) == (502, BAD_RESULT)
    assert '"just text"' in check_streams(function_proxy)[0]


def test_a_function_returning_none_says_so(proxy):
    assert proxy.init("def main(args):\n    pass\n").status == 200
    assert proxy.run().json == BAD_RESULT
    assert "owproxy: main returned None, not a dictionary or an array" in check_streams(proxy)[1]


def test_a_function_result_longer_than_the_limit_is_502(proxies):
    proxy = proxies(env={"OWPROXY_MAX_RESULT": "2K"})
    assert proxy.init("def main(args):\n    return {'x': 'y' * 3002}\n").status == 200
    response = proxy.run()
    assert (response.status, response.json) == (502, too_large(3011, 2048))
    out, err = check_streams(proxy)
    assert out == LONG_RESULT[:1024] and "that result had 3011 bytes" in err


ODD_RESULTS = r'''
import os, sys

def main(args):
    kind = args.get("kind")
    if kind == "close":
        sys.stdout.close()
        return {"a": 1}
    if kind == "surrogate":
        return {"x": "\ud800"}
    if kind == "deep":
        nested = []
        for _ in range(100000):
            nested = [nested]
        return nested
    return {"pid": os.getpid()}
'''


@pytest.fixture
def odd_proxy(proxy):
    assert proxy.init(ODD_RESULTS).status == 200
    return proxy


def test_a_lone_surrogate_in_a_python_result_comes_back_escaped(odd_proxy):
    response = odd_proxy.run({"kind": "surrogate"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.body) == {"x": "\ud800"}


def test_a_result_nested_too_deep_for_json_is_a_502_and_the_interpreter_serves_on(odd_proxy):
    pid = odd_proxy.run({}).json["pid"]
    response = odd_proxy.run({"kind": "deep"})
    assert response.status == 502
    error = response.json["error"]
    assert error.startswith("The action returned a list that JSON cannot encode: "), error
    assert "recursion" in error
    assert odd_proxy.run({}).json == {"pid": pid}  # the same interpreter


def nested_run_body(depth):
    """A /run body whose value holds arrays ``depth`` deep (text: this process need not
    be able to encode it)."""
    return '{"value": {"deep": %s%s}}' % ("[" * depth, "]" * depth)


NESTED_FUNCTION = """
def main(args):
    deep = []
    for _ in range(args["depth"]):
        deep = [deep]
    return {"deep": deep}
"""


def test_deep_nesting_is_the_actions_502_and_the_worker_serves_on(proxies):
    function = proxies()
    assert function.init(NESTED_FUNCTION).status == 200
    response = function.run({"depth": 100000})
    assert response.json == {"error": "The action returned a dict that JSON cannot encode: "
                                      "RecursionError: maximum recursion depth exceeded"
                                      " while encoding a JSON object"}, response
    assert response.status == 502
    for depth in (960, 980, 995):
        assert function.run({"depth": depth}).status in (200, 502)  # never 500
        assert function.post("/run", nested_run_body(depth)).status in (200, 400, 502)
    assert function.run({"depth": 2}).json == {"deep": [[[]]]}
    executable = proxies(env={"PROXY_ALLOW_REINIT": "1"})
    assert executable.init(python_script(
        "print('{\"deep\": ' + '[' * 100000 + ']' * 100000 + '}')")).status == 200
    response = executable.run()
    assert (response.status, response.json) == (502, {
        "error": "The action's result is nested too deeply to be encoded as JSON."})
    assert executable.init(ECHO_RESULT).status == 200
    for depth in (960, 980, 995):
        response = executable.post("/run", nested_run_body(depth))
        assert response.status in (200, 400, 502), response  # never 500
        if response.status == 502:
            assert response.json == {"error": "The action's argument is nested too deeply "
                                              "to be encoded as JSON."}


def test_a_result_whose_methods_raise_is_a_502_naming_it_and_the_worker_serves_on(proxy):
    assert proxy.init("""
import os
class Sneaky(dict):
    def items(self):
        raise KeyError("sneaky")
def main(args):
    return Sneaky(a=1) if args.get("sneaky") else {"pid": os.getpid()}
""").status == 200
    pid = proxy.run({}).json["pid"]
    response = proxy.run({"sneaky": True})
    assert (response.status, response.json) == (502, {
        "error": "The action returned a Sneaky that JSON cannot encode: KeyError: 'sneaky'"})
    assert proxy.run({}).json["pid"] == pid
    err = check_streams(proxy, 3)[1]
    assert 'File "__main__.py", line 5, in items' in err
    assert "owproxy" not in err.replace("owproxy: ", "") and "json" not in err


def test_sys_exit_gives_an_error_and_a_fresh_interpreter(function_proxy):
    pid = function_proxy.run({}).json["pid"]
    response = function_proxy.run({"exit": True})
    assert (response.status, response.json) == (502, RUN_EXITED)
    after = function_proxy.run({}).json
    assert (after["calls"], after["pid"] != pid) == (1, True)
    assert "the action exited with status 3" in check_streams(function_proxy, sentinels=3)[1]


def test_a_function_that_closes_its_stderr_gets_a_fresh_interpreter(proxy):
    assert proxy.init("import os\ndef main(args):\n    os.close(2)\n    return {'ok': 1}\n"
                      ).status == 200
    answers = [proxy.run() for _ in range(4)]
    assert answers[0].json == {"ok": 1}
    assert [answer.json for answer in answers[1:]].count({"ok": 1}) >= 1, answers


def test_a_python_function_that_closes_sys_stdout_still_answers(odd_proxy):
    pid = odd_proxy.run({}).json["pid"]
    for _ in range(2):
        response = odd_proxy.run({"kind": "close"})
        assert (response.status, response.json) == (200, {"a": 1})
    assert odd_proxy.run({}).json == {"pid": pid}


FD3_WRITER = '''
import os
calls = 0

def main(args):
    global calls
    calls += 1
    os.write(3, b"garbage\\n")
    return {"ok": calls}
'''


def test_a_python_function_writing_on_fd3_does_not_disturb_the_results(proxy):
    assert proxy.init(FD3_WRITER).status == 200
    for calls in (1, 2, 3):
        response = proxy.run({})
        assert (response.status, response.json) == (200, {"ok": calls})
    assert check_streams(proxy, sentinels=3) == ("", "")


CHANNEL_ABUSER = """
import os, json

def pipes():
    for name in os.listdir("/proc/self/fd"):
        try:
            if int(name) > 2 and os.readlink("/proc/self/fd/" + name).startswith("pipe:"):
                yield int(name)
        except OSError:
            pass

def main(args):
    how = args.get("how")
    if how == "fd 5":
        os.write(5, b"garbage\\n")
    for fd in pipes():
        try:
            if how == "garbage":
                os.write(fd, b"garbage\\n")
            elif how == "forged":
                os.write(fd, b"[999, {}]\\n")
            elif how == "read":
                os.read(fd, 65536)
        except OSError as error:
            pass
    return {"pid": os.getpid()}
"""


@pytest.mark.parametrize("how", ["garbage", "forged"])
def test_what_a_function_writes_on_its_workers_channel_is_a_502_and_a_fresh_worker(proxy,
                                                                                    how):
    assert proxy.init(CHANNEL_ABUSER).status == 200
    pid = proxy.run({}).json["pid"]
    response = proxy.run({"how": how})
    assert response.status == 502
    assert response.json["error"].startswith(
        "The action wrote on its Python worker's result channel, which is the proxy's: b'")
    assert ("garbage" if how == "garbage" else "999") in response.json["error"]
    after = proxy.run({})
    assert after.status == 200 and after.json["pid"] != pid
    assert "a fresh interpreter serves the next activation" in check_streams(proxy, 3)[1]


def test_the_workers_channel_is_not_at_the_usual_descriptors_nor_readable_by_the_action(
        proxy):
    assert proxy.init(CHANNEL_ABUSER).status == 200
    response = proxy.run({"how": "fd 5"})
    assert (response.status, response.json) == (200, {"error": "[Errno 9] Bad file descriptor"})
    pid = proxy.run({"how": "read"}).json["pid"]
    for _ in range(3):  # no request was swallowed: the same worker answers each
        assert proxy.run({}).json["pid"] == pid


def test_a_python_function_past_its_deadline_is_stopped(function_proxy):
    deadline = int(time.time() * 1000) + 1000
    response = function_proxy.run({"sleep": 60}, deadline=deadline)
    assert (response.status, response.json) == (502, RUN_TIMED_OUT)
    assert function_proxy.run({}).json["calls"] == 1


def test_a_python_function_s_print_survives_its_deadline_without_pythonunbuffered(proxies):
    proxy = proxies()
    assert "PYTHONUNBUFFERED" not in proxy.env  # the worker's own -u must do it
    code = "import time\ndef main(args):\n    print('printed before the deadline')\n" \
           "    time.sleep(30)\n    return {}\n"
    assert proxy.init(code).status == 200
    deadline = int(time.time() * 1000) + 1500
    response = proxy.run({}, deadline=deadline, timeout=20)
    assert (response.status, response.json) == (502, RUN_TIMED_OUT)
    out, err = proxy.logs()
    assert out == "printed before the deadline\n" + SENTINEL + "\n"
    assert err == "owproxy: the action was stopped at its deadline\n" + SENTINEL + "\n"


def test_concurrent_python_functions_get_an_interpreter_each(proxies, tmp_path):
    proxy = proxies(env={"__OW_ALLOW_CONCURRENT": "true"})
    code = """
import os, time
def main(args):
    open(os.path.join(args["rendezvous"], str(os.getpid())), "w").close()
    end = time.time() + 10
    while len(os.listdir(args["rendezvous"])) < args["n"] and time.time() < end:
        time.sleep(0.01)
    return {"pid": os.getpid(), "id": os.environ["__OW_ACTIVATION_ID"]}
"""
    assert proxy.init(code).status == 200
    results = rendezvous_runs(proxy, tmp_path / "meet", 3)
    assert len({r.json["pid"] for r in results}) == 3
    assert [r.json["id"] for r in results] == ["act0", "act1", "act2"]


# What openwhisk-runtime-python's own tests check of its launcher under the Go proxy
# ("not returning JSON", "detect termination at run", "return on action error").
QUIET_FUNCTION = '''
import sys
def main(args):
    if args.get("text"):
        return "not a json object"
    if args.get("exit"):
        sys.exit(1)
    if args.get("fail"):
        raise ValueError("boom")
    return {"ok": True}
'''


def test_under_loop_a_python_function_answers_as_the_python_runtime_image(proxies):
    proxy = proxies("--loop")
    assert proxy.init(QUIET_FUNCTION).status == 200
    response = proxy.run({"text": True})
    assert (response.status, response.json) == (502, BAD_RESULT)
    response = proxy.run({"exit": True})
    assert (response.status, response.json) == (400, {"error": "command exited"})
    assert proxy.run({}).json == {"ok": True}  # a fresh interpreter
    assert check_streams(proxy, sentinels=3) == ("", "")  # nothing but what main wrote
    assert proxy.run({"fail": True}).json == {"error": "boom"}
    out, err = check_streams(proxy, sentinels=4)
    assert out == "" and "Traceback" in err and "ValueError: boom" in err


def test_under_loop_a_python_function_that_exits_at_import_is_the_go_proxys_start_failure(
        proxies):
    proxy = proxies("--loop", env={"OW_LOG_INIT_ERROR": "1", "OW_WAIT_FOR_ACK": "1"})
    response = proxy.init("import sys\nsys.exit(1)\ndef main(args):\n    pass\n")
    assert (response.status, response.json) == (502, GO_START_FAILED)
    out, err = check_streams(proxy)
    assert out == "" and "Command exited abruptly during initialization." in err


QUIET_SOURCE = QUIET_FUNCTION.replace("def main", "def hello")


def test_the_images_launcher_logs_hold_what_the_action_wrote_and_nothing_else(
        proxies, tmp_path):
    proxy = runtime_proxy(proxies, tmp_path)
    response = proxy.run({})
    assert (response.status, response.json) == (500, {"error": "no action defined yet"})
    assert proxy.init(QUIET_SOURCE, main="hello").status == 200
    assert proxy.run({}).json == {"ok": True}  # prints nothing
    response = proxy.run({"text": True})  # "not returning JSON"
    assert (response.status, response.json) == (502, BAD_RESULT)
    response = proxy.run({"exit": True})  # "detect termination at run"
    assert (response.status, response.json) == (400, {"error": "command exited"})
    assert check_streams(proxy, sentinels=4) == ("", "")


def test_the_runtime_image_example_replaces_the_go_proxy_and_keeps_the_images_settings():
    dockerfile = (EXAMPLES / "runtime-python" / "Dockerfile").read_text()
    assert "\nFROM openwhisk/action-python-v3" in dockerfile
    assert "\nCOPY owproxy.py /owproxy.py\n" in dockerfile
    assert "\nENV OWPROXY_LOOP=true\n" in dockerfile
    assert "\n%s\n" % COMPILE_STEP in dockerfile
    assert "\nENTRYPOINT %s\n" % json.dumps(IMAGE_START) in dockerfile
    assert "OW_COMPILER" not in dockerfile.split("FROM", 1)[1]  # the image's own settings
    readme = (HERE / "README.md").read_text()
    recipe = readme.split("## In an official runtime image")[1].split("```dockerfile\n")[1]
    for line in recipe.split("```")[0].splitlines():
        assert "\n%s\n" % line in dockerfile


# ---------------------------------------------------------------------------
# Platforms: OpenWhisk, Knative, health endpoints
# ---------------------------------------------------------------------------

def dockerfile_stub(action_dir):
    """Runs the Dockerfile's RUN step that bakes the stub /action/exec, into action_dir."""
    text = (HERE / "Dockerfile").read_text().replace("\\\n", " ")
    step = next(line for line in text.splitlines()
                if line.startswith("RUN") and "/action/exec" in line)
    script = step[len("RUN"):].replace("/action", str(action_dir))
    subprocess.run(["sh", "-c", script], check=True)


def test_init_with_empty_code_then_run_fails_with_error_in_stdout(proxy):
    dockerfile_stub(proxy.action_dir)  # upstream's image has it
    assert proxy.init("").status == 200
    assert (proxy.action_dir / "exec").read_text() == ""
    response = proxy.post("/run", b"null")
    assert response.status == 502
    assert response.json == {"error": "The action did not return a dictionary or array."}
    out, _ = check_streams(proxy)
    assert "error" in out


def test_init_with_empty_object_keeps_the_baked_executable(proxy):
    (proxy.action_dir / "exec").write_text(bash("echo '{\"baked\": true}'"))
    (proxy.action_dir / "exec").chmod(0o755)
    assert proxy.post("/init", {}).status == 200
    assert proxy.post("/init", b"").status == 403  # the first one counted
    assert proxy.run().json == {"baked": True}


def test_result_that_is_not_json_is_the_exact_502_with_the_line_in_stdout(proxy):
    assert proxy.init(NOT_JSON).status == 200
    response = proxy.run()
    assert response.status == 502
    assert response.json == {"error": "The action did not return a dictionary or array."}
    out, err = check_streams(proxy)
    assert out == "not a json object"
    assert err == ""


@pytest.mark.parametrize("body", [
    {"value": {"code": NOT_JSON, "binary": False, "main": "main"}},  # upstream's testInitTwice
    b"{nope", b"[]", b'{"value": "code"}'], ids=["the-same-code", "{nope", "[]", "value-a-string"])
def test_a_second_init_is_refused_with_the_exact_403_and_no_sentinel_whatever_its_body(
        proxy, body):
    assert proxy.init(NOT_JSON).status == 200
    response = proxy.post("/init", body)
    assert (response.status, response.json) == (
        403, {"error": "Cannot initialize the action more than once."})
    out, err = check_streams(proxy, sentinels=0)
    assert out == ""
    assert err.splitlines()[0] == "Cannot initialize the action more than once."


def test_entry_point_other_than_main(proxy):
    assert proxy.init(STDIN_ECHO_BASH, main="exec").status == 200
    response = proxy.run({"string": "hello"})
    assert (response.status, response.json) == (200, {"string": "hello"})
    assert check_streams(proxy) == ("", "")


def test_echo_four_argument_sets_with_logs_on_both_streams(proxy):
    assert proxy.init(ECHO_BASH).status == 200
    argss = [{"string": "hello"}, {"string": "❄ ☃ ❄"}, {"numbers": [42, 1]},
             {"object": {"a": "A"}}]
    for args in argss:
        response = proxy.run(args)
        assert (response.status, response.json) == (200, args)
    out, err = check_streams(proxy, sentinels=4)
    assert "hello stdout" in out and "hello stderr" in err


def test_unicode_in_source_arguments_logs_and_result(proxy):
    code = python_script("""
import json, sys
j = json.loads(sys.argv[1])
sep = j["delimiter"]
s = sep + " ☃ " + sep
print(s)
print(json.dumps({"winter": s}))
""")
    assert proxy.init(code).status == 200
    response = proxy.run({"delimiter": "❄"})
    assert response.json == {"winter": "❄ ☃ ❄"}
    out, _ = check_streams(proxy)
    assert "❄ ☃ ❄" in out


ENV_BASH = bash(r'''
echo "{ \
\"api_host\": \"$__OW_API_HOST\", \"api_key\": \"$__OW_API_KEY\", \
\"namespace\": \"$__OW_NAMESPACE\", \"action_name\": \"$__OW_ACTION_NAME\", \"action_version\": \"$__OW_ACTION_VERSION\", \
\"activation_id\": \"$__OW_ACTIVATION_ID\", \"deadline\": \"$__OW_DEADLINE\" }"
''')


def test_ow_variables_come_from_the_container_and_the_run(proxies):
    proxy = proxies(env={"__OW_API_HOST": "xyz"})
    assert proxy.init(ENV_BASH).status == 200
    props = {"api_key": "abc", "namespace": "zzz", "action_name": "xxx",
             "action_version": "0.0.1", "activation_id": "iii", "deadline": "123"}
    response = proxy.run({}, **props)
    assert response.status == 200
    assert response.json == dict(props, api_host="xyz")
    assert check_streams(proxy) == ("", "")


def test_run_without_init_on_the_baked_stub(proxy):
    dockerfile_stub(proxy.action_dir)
    response = proxy.run()
    assert response.status == 200
    assert response.json == {"error": "This is a stub action. Replace it with custom logic."}
    out, _ = check_streams(proxy)
    assert "This is a stub action" in out


def test_init_with_null_code_keeps_the_baked_stub(proxy):
    dockerfile_stub(proxy.action_dir)
    assert proxy.post("/init", {"value": {"code": None}}).status == 200
    response = proxy.run()
    assert response.json == {"error": "This is a stub action. Replace it with custom logic."}


def test_a_value_that_is_not_an_object_or_array_is_the_exact_404(proxy):
    dockerfile_stub(proxy.action_dir)
    response = proxy.post("/run", {"value": "A"})
    assert response.status == 404
    assert response.json == {
        "error": "The action did not receive a dictionary or array as an argument."}
    assert check_streams(proxy) == ("", "")


def test_zip_exec_runs_with_its_log_line(proxy):
    exec_code = bash("""
echo "This is an example zip used with the docker skeleton action."
echo '{"msg": "hello zip"}'
""")
    assert proxy.init_zip({"exec": exec_code}).status == 200
    response = proxy.run()
    assert (response.status, response.json) == (200, {"msg": "hello zip"})
    assert check_streams(proxy) == (
        "This is an example zip used with the docker skeleton action.", "")


def test_the_working_directory_is_the_action_directory(proxy):
    code = bash('echo "{\\"pwd_env\\":\\"$PWD\\",\\"pwd_cmd\\":\\"$(pwd)\\"}"')
    assert proxy.init(code).status == 200
    result = proxy.run().json
    assert result["pwd_env"] == result["pwd_cmd"] == os.path.realpath(proxy.action_dir)


def test_an_array_result(proxy):
    assert proxy.init(bash("echo '[\"a\", \"b\"]'")).status == 200
    response = proxy.run()
    assert (response.status, response.json) == (200, ["a", "b"])


def test_an_array_argument(proxy):
    assert proxy.init(bash("arr=$1\necho $arr")).status == 200
    response = proxy.run(["a", "b"])
    assert (response.status, response.json) == (200, ["a", "b"])


C_ACTION = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    fprintf(stderr, "hello from C\n");
    printf("{\"argc\": %d, \"echo\": %s}", argc, argc > 1 ? argv[1] : "null");
    return 0;
}
"""


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler on this machine")
def test_a_compiled_c_action_without_trailing_newline(proxy, tmp_path):
    source = tmp_path / "action.c"
    source.write_text(C_ACTION)
    binary = tmp_path / "exec"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
    code = base64.b64encode(zip_bytes({"exec": (binary.read_bytes(), 0o755)})).decode()
    assert proxy.init(code, binary=True).status == 200
    response = proxy.run({"x": 1})
    assert (response.status, response.json) == (200, {"argc": 2, "echo": {"x": 1}})
    assert check_streams(proxy) == ("", "hello from C")


def test_proxy_hints_for_a_run_without_value_a_second_init_and_no_exec(proxy):
    response = proxy.run()
    assert response.status == 502
    assert "is missing: POST /init with the action's code first" in proxy.logs()[1]
    assert proxy.init(bash('echo "{\\"length\\": ${#1}}"')).status == 200
    assert proxy.post("/run", {"name": "Ada", "activation_id": "1"}).json == {"length": 2}
    hint = ('owproxy: hint: the /run body has no "value", so the action gets no parameters; '
            'name is no activation field: send {"value": {...}}\n')
    assert proxy.logs()[1].count(hint) == 1
    assert proxy.run({"name": "Ada"}).status == 200
    assert proxy.post("/run", {"activation_id": "2", "deadline": "0"}).status == 200
    assert proxy.logs()[1].count(hint) == 1  # nothing to say about well-formed bodies
    assert proxy.init(ECHO_RESULT).status == 403
    err = split_logs(proxy.logs()[1])[0].splitlines()
    assert err[-2:] == ["Cannot initialize the action more than once.",
                        "owproxy: hint: to replace the action, start the proxy with "
                        "--allow-reinit (PROXY_ALLOW_REINIT=1), for local development only"]


KNATIVE_ACTION = '''
import os
def main(args):
    if "web" in args:
        return args["web"]
    return {"args": args, "id": os.environ.get("__OW_ACTIVATION_ID"),
            "name": os.environ.get("__OW_ACTION_NAME"), "deadline": os.environ.get("__OW_DEADLINE")}
'''


def knative(proxies, methods=None, **env):
    env["__OW_RUNTIME_PLATFORM"] = "knative"
    if methods:
        env["__OW_HTTP_METHODS"] = methods
    return proxies(env=env)


def test_knative_inits_and_runs_in_one_request_with_the_http_context(proxies):
    proxy = knative(proxies)
    deadline = int(time.time() * 1000) + 60000
    response = proxy.post("/?q=1", {"init": {"code": KNATIVE_ACTION, "name": "greeter"},
                                    "activation": {"activation_id": "k1", "namespace": "ns",
                                                   "deadline": deadline},
                                    "value": {"name": "x"}},
                          headers={"X-Trace": "t1"})
    assert response.status == 200
    result = response.json
    args = result.pop("args")
    assert result == {"id": "k1", "name": "greeter", "deadline": str(deadline)}
    headers = args.pop("__ow_headers")
    assert headers["x-trace"] == "t1" and "host" in headers
    assert args == {"name": "x", "q": "1", "__ow_method": "post", "__ow_path": "",
                    "__ow_user": "ns"}
    assert check_streams(proxy) == ("", "")


def test_knative_runs_on_a_warm_container_with_per_activation_fields(proxies):
    proxy = knative(proxies)
    assert proxy.post("/", {"init": {"code": KNATIVE_ACTION}}).status == 200
    first = proxy.post("/", {"activation": {"activation_id": "a1"}, "value": {"n": 1}})
    second = proxy.post("/", {"value": {"n": 2}})
    plain = proxy.post("/", {"n": 3})
    assert (first.json["id"], first.json["args"]["n"]) == ("a1", 1)
    assert (second.json["id"], second.json["args"]["n"]) == (None, 2)
    assert plain.json["args"]["n"] == 3


def test_knative_refuses_new_code_but_accepts_the_same_init_again(proxies):
    proxy = knative(proxies)
    init = {"code": KNATIVE_ACTION}
    assert proxy.post("/", {"init": init, "value": {"n": 1}}).json["args"]["n"] == 1
    again = proxy.post("/", {"init": init, "value": {"n": 2}})
    assert (again.status, again.json["args"]["n"]) == (200, 2)
    other = proxy.post("/", {"init": {"code": "def main(a):\n    return {}\n"}, "value": {}})
    assert (other.status, other.json) == (403, {"error": "Cannot initialize the action more than once."})
    assert proxy.post("/", {"value": {"n": 3}}).json["args"]["n"] == 3


def test_a_knative_request_that_only_initialises_writes_no_sentinels(proxies):
    proxy = knative(proxies)
    response = proxy.post("/", {"init": {"code": ECHO_RESULT}})
    assert response.status == 200
    assert proxy.logs() == ("", "")  # as a 200 /init
    assert proxy.post("/", {"value": {}}).json == {"ok": "run"}
    check_streams(proxy, sentinels=1)


DEDICATED = {"error": "Cannot initialize a runtime with a dedicated function."}


def test_a_dedicated_knative_container_initialises_itself_and_refuses_init(proxies):
    proxy = knative(proxies, __OW_ACTION_CODE=make_zip({"__main__.py": KNATIVE_ACTION}),
                    __OW_ACTION_BINARY="true", __OW_ACTION_NAME="/ns/dedicated")
    response = proxy.post("/", {"n": 1})
    assert (response.status, response.json["name"], response.json["args"]["n"]) == (
        200, "/ns/dedicated", 1)
    refused = proxy.post("/", {"init": {"code": KNATIVE_ACTION}, "value": {}})
    assert (refused.status, refused.json) == (403, DEDICATED)


def test_a_dedicated_knative_container_whose_code_fails_answers_502(proxies):
    proxy = knative(proxies, __OW_ACTION_CODE="def main(args)\n")
    response = proxy.post("/", {})
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "SyntaxError" in check_streams(proxy)[1]


def test_concurrent_first_requests_to_a_dedicated_knative_function_start_one_pool(proxies):
    """Each first request would otherwise initialise, and leave its warm interpreters."""
    proxy = knative(proxies, __OW_ALLOW_CONCURRENT="true", __OW_ACTION_CODE=(
        "import time\ndef main(args):\n    time.sleep(0.3)\n    return {'ok': True}\n"))
    counts = []
    for _ in range(2):
        answers = []
        burst = [threading.Thread(target=lambda: answers.append(proxy.post("/", {"value": {}})))
                 for _ in range(6)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join(60)
        assert [answer.status for answer in answers] == [200] * 6
        counts.append(len([pid for pid in children(proxy.process.pid)
                           if b"function-worker" in Path("/proc/%d/cmdline" % pid).read_bytes()]))
    assert counts[0] <= 6 and counts[1] == counts[0], counts


def test_knative_errors_carry_accurate_statuses(proxies):
    proxy = knative(proxies)
    assert proxy.post("/", b"{not json").status == 400
    assert proxy.post("/", {"init": "code", "value": {}}).status == 400
    assert proxy.post("/", {"init": {"code": "def main(args)\n"}}).status == 502
    assert proxy.post("/", {"init": {"code": bash("exit 1")}}).status == 200
    failed = proxy.post("/", {"value": {}})
    assert (failed.status, failed.json) == (502, BAD_RESULT)


def test_knative_raw_mode_passes_the_body_and_query_as_they_are(proxies):
    proxy = knative(proxies)
    assert proxy.post("/", {"init": {"code": KNATIVE_ACTION, "raw": True}}).status == 200
    response = proxy.post("/?a=1&b=2", b"hello raw, not JSON",
                          headers={"Content-Type": "text/plain"})
    args = response.json["args"]
    assert (args["__ow_body"], args["__ow_query"], args["__ow_method"]) == (
        "hello raw, not JSON", "a=1&b=2", "post")
    envelope = proxy.post("/", {"activation": {}, "value": "text in the envelope"})
    assert envelope.json["args"]["__ow_body"] == "text in the envelope"


def test_a_dedicated_raw_container_passes_its_first_request_as_it_is(proxies):
    proxy = knative(proxies, __OW_ACTION_CODE=KNATIVE_ACTION, __OW_ACTION_RAW="true")
    response = proxy.post("/?a=1&b=2", "Hello, not JSON {", headers={"Content-Type": "text/plain"})
    assert response.status == 200, response
    args = response.json["args"]
    args.pop("__ow_headers")
    assert args == {"__ow_body": "Hello, not JSON {", "__ow_query": "a=1&b=2",
                    "__ow_method": "post", "__ow_path": "", "__ow_user": ""}


@pytest.fixture(scope="module")
def web_proxy(shared_proxies):
    """The Knative action, initialised: its tests send requests and read answers."""
    proxy = knative(shared_proxies)
    assert proxy.post("/", {"init": {"code": KNATIVE_ACTION}}).status == 200
    return proxy


def web_args(response):
    assert response.status == 200, response
    args = response.json["args"]
    args.pop("__ow_headers")
    return args


CONTEXT = {"__ow_method": "post", "__ow_path": "", "__ow_user": ""}


@pytest.mark.parametrize("content_type, body, parameters", [
    ("text/plain", "Jane", {"__ow_body": "Jane"}),
    ("application/x-www-form-urlencoded", "name=José&x=1", {"name": "José", "x": "1"}),
    ("application/json", {"name": "Jane", "n": 2}, {"name": "Jane", "n": 2}),
], ids=["plain-text-is-ow_body", "form-becomes-parameters", "json-object-is-merged"])
def test_a_body_and_the_query_become_parameters(web_proxy, content_type, body, parameters):
    response = web_proxy.post("/?q=1", body, headers={"Content-Type": content_type})
    assert web_args(response) == dict(CONTEXT, q="1", **parameters)


def test_invalid_json_declared_as_json_is_400(web_proxy):
    response = web_proxy.post("/", "{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400
    check_json_response(Response(response.status,
                                 {k.lower(): v for k, v in response.headers.items()},
                                 response.body))
    assert response.json["error"].startswith("The request body is not valid JSON"), response


WEB_CASES = [
    ({"body": "<b>hi</b>"}, 200, "text/html; charset=utf-8", b"<b>hi</b>"),
    ({"headers": {"content-type": "text/plain"}, "body": "plain"}, 200, "text/plain", b"plain"),
    ({"headers": {"Content-Type": "image/png"}, "body": base64.b64encode(b"\x89PNG").decode()},
     200, "image/png", b"\x89PNG"),
    ({"body": {"json": True}}, 200, "application/json", b'{"json": true}'),
    ({"statusCode": 201, "headers": {"Location": "/x"}, "body": "made"}, 201,
     "text/html; charset=utf-8", b"made"),
    ({"statusCode": 200}, 204, None, b""),
    ({"statusCode": 404, "body": ""}, 404, None, b""),
]


@pytest.mark.parametrize("web, status, content_type, body", WEB_CASES)
def test_knative_web_results_become_http_responses(web_proxy, web, status, content_type, body):
    response = web_proxy.post("/", {"init": {"code": KNATIVE_ACTION}, "value": {"web": web}})
    assert (response.status, response.body) == (status, body)
    assert response.headers.get("Content-Type") == content_type
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Content-Length"] == str(len(body))
    sent = {name.lower(): value for name, value in response.headers.items()}
    for name, value in web.get("headers", {}).items():
        assert sent[name.lower()] == value


@pytest.mark.parametrize("web", [{"statusCode": "teapot"}, {"statusCode": 200, "headers": []},
                                 {"headers": {"content-type": "image/png"}, "body": "%%%"}])
def test_invalid_web_results_are_502(web_proxy, web):
    response = web_proxy.post("/", {"init": {"code": KNATIVE_ACTION}, "value": {"web": web}})
    assert response.status == 502 and "web response" in response.json["error"]


WEB_BAD = {"error": "The action returned a web response with an invalid statusCode, "
                    "headers or image body."}


def web_result(proxy, web):
    """The status, the header pairs and the body of a web action's answer; nothing
    may follow the body its Content-Length announces."""
    body = json.dumps({"value": {"web": web}}).encode()
    client = RawClient(proxy)
    try:
        client.send(head("POST", "/", "Connection: close", "Content-Type: application/json",
                         "Content-Length: %d" % len(body)) + body)
        response = client.response()
        assert client.closed_by_peer(), "bytes after the announced body"
    finally:
        client.close()
    return response.status, response.pairs, response.body


def test_a_latin_1_header_value_is_sent_as_it_is(web_proxy):
    status, pairs, body = web_result(web_proxy, {"headers": {"X-Name": "José"}, "body": "x"})
    assert (status, body) == (200, b"x")
    assert values_of(pairs, "X-Name") == ["José"]


def test_a_web_results_date_and_server_replace_the_proxys(web_proxy):
    date = "Tue, 01 Jan 2030 00:00:00 GMT"
    status, pairs, body = web_result(web_proxy, {"headers": {"Date": date, "Server": "mine"},
                                                 "body": "x"})
    assert (status, body) == (200, b"x")
    assert (values_of(pairs, "Date"), values_of(pairs, "Server")) == ([date], ["mine"])


@pytest.mark.parametrize("name, value", [
    ("X-Name", "José ☃"), ("X-Note", "a\r\nX-Injected: yes"), ("X-Note", "a\x1bb"),
    ("X-Note", "a\x7fb"), ("X\x00Note", "a"), ("X Note", "a")],
    ids=["not-latin-1", "line-break", "escape", "delete", "nul-in-name", "space-in-name"])
def test_a_header_not_latin_1_with_a_line_break_a_control_character_or_a_bad_name_is_a_502(
        web_proxy, name, value):
    """None of it is sent: a line break cannot inject a header."""
    status, pairs, body = web_result(web_proxy, {"headers": {name: value}, "body": "x"})
    assert (status, json.loads(body)) == (502, WEB_BAD)
    assert values_of(pairs, name) == [] and values_of(pairs, "X-Injected") == []


def test_a_header_given_as_an_array_is_sent_once_per_value(web_proxy):
    status, pairs, body = web_result(web_proxy, {"headers": {"Set-Cookie": ["a=1", "b=2"]},
                                                 "body": "x"})
    assert (status, body) == (200, b"x")
    assert values_of(pairs, "Set-Cookie") == ["a=1", "b=2"]


def test_the_action_cannot_set_a_false_content_length(web_proxy):
    status, pairs, body = web_result(web_proxy, {"headers": {"Content-Length": "1"},
                                                 "body": "hello"})
    assert (status, body) == (200, b"hello")
    assert values_of(pairs, "Content-Length") == ["5"]


@pytest.mark.parametrize("code", ["201", 201.0, " 201 "])
def test_a_status_code_as_a_string_or_a_float_is_taken(web_proxy, code):
    status, pairs, body = web_result(web_proxy, {"statusCode": code, "body": "made"})
    assert (status, body) == (201, b"made")


@pytest.mark.parametrize("code", [100, 199, 600, 201.5, True])
def test_a_status_code_the_proxy_cannot_send_is_the_web_response_502(web_proxy, code):
    status, _, body = web_result(web_proxy, {"statusCode": code, "body": "x"})
    assert (status, json.loads(body)) == (502, WEB_BAD)


def test_a_304_sends_no_body(web_proxy):
    status, pairs, body = web_result(web_proxy, {"statusCode": 304, "body": "not sent"})
    assert (status, body) == (304, b"")
    assert values_of(pairs, "Content-Length") == ["0"]


def test_knative_keeps_cors_headers_the_action_sets(web_proxy):
    web = {"headers": {"Access-Control-Allow-Origin": "https://example.org"}, "body": "x"}
    response = web_proxy.post("/", {"init": {"code": KNATIVE_ACTION}, "value": {"web": web}})
    assert response.headers["Access-Control-Allow-Origin"] == "https://example.org"


MARKER_ACTION = '''
import os
import time
def main(args):
    open(os.environ["MARKER"], "a").close()
    time.sleep(args.get("sleep", 0))
    if args.get("fail"):
        return {"error": args["fail"]}
    if args.get("text"):
        return "not an object"
    return {"ran": True}
'''


def check_cors(headers):
    headers = {name.lower(): value for name, value in headers.items()}
    assert headers["access-control-allow-origin"] == "*"
    assert headers["access-control-allow-methods"] == \
        "OPTIONS, GET, DELETE, POST, PUT, HEAD, PATCH"
    assert "Content-Type" in headers["access-control-allow-headers"]


def test_every_knative_answer_of_the_action_has_cors_and_options_does_not_run_it(proxies,
                                                                                tmp_path):
    marker = tmp_path / "ran"
    proxy = knative(proxies, __OW_ACTION_CODE=MARKER_ACTION, MARKER=str(marker))
    preflight = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    options = proxy.request("OPTIONS", "/", headers=preflight)
    assert (options.status, options.body) == (200, b"")
    check_cors(options.headers)
    assert not marker.exists()

    cases = [({}, 200, {"ran": True}), ({"fail": "boom"}, 200, {"error": "boom"}),
             ({"text": True}, 502, BAD_RESULT)]
    for value, status, body in cases:
        response = proxy.post("/", {"value": value})
        assert (response.status, response.json) == (status, body)
        assert response.headers["Content-Type"] == "application/json"
        check_cors(response.headers)
    assert marker.exists()
    marker.unlink()
    options = proxy.request("OPTIONS", "/", headers=preflight)
    assert (options.status, options.body) == (200, b"")
    check_cors(options.headers)
    assert not marker.exists()
    bad = proxy.post("/", b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status == 400
    check_cors(bad.headers)
    check_streams(proxy, sentinels=4)  # the three activations and the bad request


def test_a_preflight_waits_for_no_activation(proxies, tmp_path):
    proxy = knative(proxies, __OW_ACTION_CODE=MARKER_ACTION, MARKER=str(tmp_path / "ran"))
    run = in_thread(proxy.post, "/", {"value": {"sleep": 3}})
    assert wait_for(lambda: (tmp_path / "ran").exists())
    options = proxy.request("OPTIONS", "/", timeout=2)  # no answer in time: a timeout
    assert options.status == 200
    assert run().json == {"ran": True}


def test_a_preflights_body_is_never_read_and_its_connection_closes(proxies):
    """A body of any declared size, even beyond --max-body: answered at once, the
    body dropped as it comes, never held in memory."""
    proxy = knative(proxies, __OW_ACTION_CODE=KNATIVE_ACTION)
    client = RawClient(proxy)
    try:
        client.send(head("OPTIONS", "/", "Content-Length: %d" % (200 * MIB)) + b"x" * 65536)
        response = client.response()
        assert (response.status, response.headers["connection"]) == (200, "close")
        assert "Access-Control-Allow-Origin" in dict(response.pairs)
        assert client.closed_by_peer()
    finally:
        client.close()
    assert proxy.post("/", {"value": {}}).status == 200


def test_knative_methods_come_from_ow_http_methods(proxies):
    proxy = knative(proxies, methods=" [ get , POST ] ")
    assert proxy.post("/", {"init": {"code": KNATIVE_ACTION}}).status == 200
    response = proxy.request("GET", "/?name=q")
    assert response.status == 200 and response.json["args"]["__ow_method"] == "get"
    assert response.json["args"]["name"] == "q"
    refused = proxy.request("PUT", "/", b"{}")
    assert refused.status == 405 and refused.headers["Allow"] == "GET, POST, OPTIONS"
    assert proxy.post("/run", {}).status == 404


@pytest.mark.parametrize("methods", ['["GET","POST"]', "[GET,,POST]", "GET, POST"])
def test_http_methods_in_any_list_style_accept_get(proxies, methods):
    proxy = knative(proxies, __OW_HTTP_METHODS=methods)
    assert proxy.post("/", {"init": {"code": KNATIVE_ACTION}}).status == 200
    got = proxy.request("GET", "/?name=q")
    assert got.status == 200, got
    assert (got.json["args"]["__ow_method"], got.json["args"]["name"]) == ("get", "q")
    refused = proxy.request("PUT", "/", b"{}")
    assert (refused.status, refused.headers["Allow"]) == (405, "GET, POST, OPTIONS")


def test_an_empty_http_methods_means_post(proxies):
    proxy = knative(proxies, __OW_HTTP_METHODS="")
    refused = proxy.request("GET", "/")
    assert (refused.status, refused.headers["Allow"]) == (405, "POST, OPTIONS")
    response = proxy.post("/", {"init": {"code": KNATIVE_ACTION}, "value": {"n": 1}})
    assert (response.status, response.json["args"]["n"]) == (200, 1)


@pytest.mark.parametrize("platform", ["openwhisk", "knative"])
def test_health_endpoints_answer_while_an_action_runs_and_stay_out_of_the_logs(proxies,
                                                                            platform):
    proxy = proxies("--verbose", env={"__OW_RUNTIME_PLATFORM": platform})
    code = bash("touch started\nwhile [ ! -e release ]; do sleep 0.02; done\necho '{}'")
    if platform == "knative":
        assert proxy.post("/", {"init": {"code": code}}).status == 200
        running = threading.Thread(target=proxy.post, args=("/", {"value": {}}))
    else:
        assert proxy.init(code).status == 200
        running = threading.Thread(target=proxy.run)
    running.start()
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    before = proxy.logs()
    live = proxy.request("GET", "/healthz", timeout=10)  # answered while the action waits
    ready = proxy.request("GET", "/readyz", timeout=10)
    head = proxy.request("HEAD", "/readyz", timeout=10)
    assert not (proxy.action_dir / "release").exists()
    (proxy.action_dir / "release").write_text("")
    assert (live.status, live.json) == (200, {"status": "ok"})
    assert (ready.status, ready.json) == (200, {"ready": True})
    assert (head.status, head.body) == (200, b"")
    assert proxy.logs() == before
    running.join()


def test_readiness_fails_once_shutdown_has_begun(proxies):
    proxy = proxies()
    assert proxy.init(bash("touch started\nwhile [ ! -e release ]; do sleep 0.02; done\n"
                           "echo '{\"done\": true}'")).status == 200
    assert proxy.request("GET", "/readyz").status == 200
    run = in_thread(proxy.run, timeout=30)
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    proxy.process.send_signal(signal.SIGTERM)
    # Each a new connection: still answered.
    assert wait_for(lambda: proxy.request("GET", "/readyz").status == 503)
    ready = proxy.request("GET", "/readyz")
    assert (ready.status, ready.json) == (503, {"ready": False, "reason": "shutting down"})
    assert proxy.request("GET", "/healthz").status == 200
    refused = proxy.run()
    assert (refused.status, refused.json) == (503, {"error": "The proxy is shutting down."})
    (proxy.action_dir / "release").write_text("")
    assert run().json == {"done": True}
    assert proxy.process.wait(30) == 0


# ---------------------------------------------------------------------------
# HTTP server: errors, strict requests, bodies and limits, connections, where it listens, shutdown
# ---------------------------------------------------------------------------

def test_unknown_paths_are_404_and_wrong_methods_405_with_allow(proxy):
    assert proxy.init(ECHO_RESULT).status == 200
    for method, path in (("GET", "/"), ("POST", "/nowhere"), ("GET", "/run/extra")):
        response = proxy.request(method, path)
        assert response.status == 404, (method, path, response)
        assert response.headers["Content-Type"] == "application/json"
        assert "error" in response.json
    for method, path in (("GET", "/run"), ("PUT", "/init"), ("DELETE", "/run"),
                         ("GET", "/init")):
        response = proxy.request(method, path)
        assert response.status == 405, (method, path, response)
        assert response.headers["Allow"] == "POST"
        assert response.headers["Content-Type"] == "application/json"
        assert "error" in response.json
    check_a_run_still_works(proxy)


def raw_request(proxy, data, shut_write=False):
    client = RawClient(proxy)
    try:
        client.send(data)
        if shut_write:
            client.sock.shutdown(socket.SHUT_WR)
        return client.response()
    finally:
        client.close()


RAW_ERRORS = {
    "garbage request line": (b"GARBAGE\r\n\r\n", 400, False),
    "garbage with three words": (b"this is garbage\r\n\r\n", 400, False),
    "content-length not a number": (head("POST", "/run", "Content-Length: abc"), 400, False),
    "body ended early": (head("POST", "/run", "Content-Length: 100") + b'{"value"', 400, True),
    "invalid json": (head("POST", "/run", "Content-Length: 5") + b"{nope", 400, False),
    "unknown path": (head("POST", "/nowhere", "Content-Length: 2") + b"{}", 404, False),
    "wrong method": (head("GET", "/run"), 405, False),
    "content-length over the limit": (head("POST", "/run", "Content-Length: 5000"), 413, False),
    "chunked over the limit": (head("POST", "/init", "Transfer-Encoding: chunked")
                               + b"1000\r\n", 413, False),
    "malformed chunk size": (head("POST", "/init", "Transfer-Encoding: chunked") + b"x\r\n",
                             400, False),
    "header line too long": (head("POST", "/run", "X-Long: " + "a" * 70000), 431, False),
}


@pytest.mark.parametrize("case", sorted(RAW_ERRORS))
def test_an_error_answer_is_json_with_a_length_and_disturbs_no_later_request(proxies, case):
    data, status, shut_write = RAW_ERRORS[case]
    proxy = proxies("--max-body", "1000")
    assert proxy.init(ECHO_RESULT).status == 200
    response = raw_request(proxy, data, shut_write)
    assert response.status == status, response
    check_json_response(response)
    check_a_run_still_works(proxy)
    check_a_run_still_works(proxy)


def test_malformed_json_is_400_and_a_run_still_writes_its_sentinels(proxy):
    for path in ("/init", "/run"):
        response = proxy.post(path, b'{"value": {nope')
        assert response.status == 400
        assert response.headers["Content-Type"] == "application/json"
        assert "not valid JSON" in response.json["error"]
    out, err = proxy.logs()
    assert out.count(SENTINEL) >= 1 and err.count(SENTINEL) >= 1  # at least the /run's
    before = (out.count(SENTINEL), err.count(SENTINEL))
    assert proxy.post("/run", b"[1, 2").status == 400
    out, err = proxy.logs()
    assert (out.count(SENTINEL), err.count(SENTINEL)) == (before[0] + 1, before[1] + 1)
    assert proxy.init(ECHO_RESULT).status == 200
    check_a_run_still_works(proxy)


NON_JSON_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]


@pytest.mark.parametrize("number", NON_JSON_NUMBERS, ids=lambda n: n.decode())
@pytest.mark.parametrize("mode", ["exec", "loop", "function", "knative"])
def test_non_json_numbers_are_400_in_every_mode(proxies, mode, number):
    if mode == "loop":
        proxy = proxies("--loop")
        code = bash("while read -r line; do touch ran; echo '{}' >&3; done")
    elif mode == "function":
        proxy = proxies()
        code = "import os\ndef main(args):\n    open('ran', 'w').close()\n    return {}\n"
    else:
        proxy = proxies(env={"__OW_RUNTIME_PLATFORM": "knative"} if mode == "knative" else {})
        code = bash("touch ran\necho '{}'")
    path = "/" if mode == "knative" else "/run"
    if mode == "exec":
        response = proxy.post("/init", b'{"value": {"code": "x", "n": %s}}' % number)
        assert (response.status, "not valid JSON" in response.json["error"]) == (400, True)
    if mode == "knative":
        assert proxy.post("/", {"init": {"code": code}}).status == 200
    else:
        assert proxy.init(code).status == 200
    response = proxy.post(path, b'{"value": {"x": %s}}' % number,
                          headers={"Content-Type": "application/json"})
    assert response.status == 400, response
    assert "not valid JSON" in response.json["error"], response
    assert not (proxy.action_dir / "ran").exists()


def test_the_date_is_the_one_email_utils_writes_without_datetime():
    import email.utils
    for seconds in (0, 951782400, 1735689599.9, time.time()):
        assert owproxy.http_date(seconds) == email.utils.formatdate(seconds, usegmt=True)


def test_a_request_line_without_a_version_still_gets_a_status_line(proxy):
    response = raw_request(proxy, b"GET /healthz\r\n\r\n")
    assert (response.status, response.json) == (200, {"status": "ok"})
    assert int(response.headers["content-length"]) == len(response.body)


def test_a_head_cut_off_by_end_of_file_is_no_request(proxy):
    assert proxy.init(bash("touch ran\necho '{}'")).status == 200
    for path in ("/run", "/init"):
        client = RawClient(proxy)
        try:
            client.send(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" % path.encode())
            client.sock.shutdown(socket.SHUT_WR)
            assert client.closed_by_peer(), client.buffer  # closed, and nothing answered
        finally:
            client.close()
    assert not (proxy.action_dir / "ran").exists()
    assert proxy.logs() == ("", "")


def test_a_cut_off_init_does_not_seal_a_baked_action(proxy):
    (proxy.action_dir / "exec").write_text(ECHO_RESULT)
    (proxy.action_dir / "exec").chmod(0o755)
    client = RawClient(proxy)
    try:
        client.send(b"POST /init HTTP/1.1\r\nHost: x\r\n")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.closed_by_peer()
    finally:
        client.close()
    assert proxy.init(ECHO_BASH).status == 200  # the invoker's own /init is still the first
    check_a_run_still_works(proxy, {"n": 1}, {"n": 1})


SMUGGLED = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"


def refused_alone(proxy, data, status, fragment=None):
    """Sends ``data`` (a smuggled request at its end), expects one JSON error of
    ``status``, then the connection closed with nothing more: the smuggled request
    is never answered."""
    client = RawClient(proxy)
    try:
        client.send(data + SMUGGLED)
        response = client.response()
        assert response.status == status, (data, response)
        check_json_response(response)
        assert response.headers["connection"] == "close", response
        if fragment:
            assert fragment in response.json["error"], response
        assert client.closed_by_peer(), (data, client.buffer)
        return response
    finally:
        client.close()


SMUGGLING = {
    "conflicting content-lengths": (
        head("POST", "/run", "Content-Length: 0", "Content-Length: %d" % len(SMUGGLED)),
        400, "differing Content-Length"),
    "a list of content-lengths": (
        head("POST", "/run", "Content-Length: 0, %d" % len(SMUGGLED)), 400, "differing"),
    "a line without a colon hides a content-length": (
        head("POST", "/run", "X-No-Colon", "Content-Length: %d" % len(SMUGGLED)),
        400, "not a name, a colon and a value"),
    "content-length and transfer-encoding": (
        head("POST", "/run", "Content-Length: %d" % len(SMUGGLED), "Transfer-Encoding: chunked")
        + b"0\r\n\r\n", 400, "both a Content-Length and a Transfer-Encoding"),
    "xchunked": (head("POST", "/run", "Transfer-Encoding: xchunked") + b"0\r\n\r\n", 501,
                 "xchunked is not supported"),
    "chunked then gzip": (head("POST", "/run", "Transfer-Encoding: chunked, gzip")
                          + b"0\r\n\r\n", 501, "chunked, gzip is not supported"),
    "chunked twice": (head("POST", "/run", "Transfer-Encoding: chunked",
                           "Transfer-Encoding: chunked") + b"0\r\n\r\n", 501, "supported"),
    "content-length with a plus": (head("POST", "/run", "Content-Length: +17"), 400,
                                   "not a length"),
    "content-length with an underscore": (head("POST", "/run", "Content-Length: 1_7"), 400,
                                          "not a length"),
    "obs-fold": (head("POST", "/run", "X-A: 1", " folded", "Content-Length: 0"), 400, "folded"),
    "bare CR in a value": (head("POST", "/run", "X-A: 1\r2", "Content-Length: 0"), 400,
                           "bare CR"),
    "a name that is no token": (head("POST", "/run", "X(A): 1", "Content-Length: 0"), 400,
                                "not a name"),
    "a space before the colon": (head("POST", "/run", "Content-Length : 0"), 400, "not a name"),
    "a control character in a value": (head("POST", "/run", "X-A: 1\x002"), 400,
                                       "control character"),
    "HTTP/1.1 without a Host": (b"POST /run HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400,
                                "exactly one Host header; this one has 0"),
    "two Hosts": (head("POST", "/run", "Host: y", "Content-Length: 0"), 400, "has 2"),
    "NBSP between the parts": (b"POST\xa0/run\xa0HTTP/1.1\r\nHost: x\r\n\r\n", 400,
                               "Bad request syntax"),
    "NEL between the parts": (b"POST\x85/run\x85HTTP/1.1\r\nHost: x\r\n\r\n", 400,
                              "Bad request syntax"),
    "0x1F between the parts": (b"POST /run\x1fHTTP/1.1 HTTP/1.1\r\nHost: x\r\n\r\n", 400,
                               "Bad request syntax"),
    "transfer-encoding in HTTP/1.0": (
        b"POST /run HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
        "not allowed in HTTP/1.0"),
}


def check_quiet_but_for_runs(proxy):
    assert proxy.logs() == ("", ""), proxy.logs()
    check_a_run_still_works(proxy)


def test_request_line_and_host_refusals_write_no_logs(proxy):
    assert proxy.init(ECHO_RESULT).status == 200
    for case in ("HTTP/1.1 without a Host", "two Hosts", "NBSP between the parts"):
        refused_alone(proxy, *SMUGGLING[case][:2])
    check_quiet_but_for_runs(proxy)


def test_absolute_form_targets_and_tabs_between_the_parts_are_served(proxy):
    assert proxy.init(ECHO_RESULT).status == 200
    body = b'{"value": {}}'
    client = RawClient(proxy)
    try:
        client.send(b"POST http://localhost:8080/run HTTP/1.1\r\nHost: localhost:8080\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert client.response().json == {"ok": "run"}
        client.send(b"GET\thttp://localhost?x=1\tHTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert client.response().status == 404  # the path "/" of the target
    finally:
        client.close()
    client = RawClient(proxy)
    try:
        client.send(b"GET HTTP://other/healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert client.response().json == {"status": "ok"}
    finally:
        client.close()


def test_an_http_0_9_request_is_answered_at_once(proxies):
    """Not when the header timeout ends it: the client's own 10 s would pass first."""
    proxy = proxies("--header-timeout", "60")
    client = RawClient(proxy, timeout=10)
    try:
        client.send(b"GET /healthz\r\n")
        assert client.response().json == {"status": "ok"}
        assert client.closed_by_peer()
    finally:
        client.close()


ECHO_ARGUMENT = "#!/bin/sh\nprintf '%s\\n' \"$1\"\n"


@pytest.fixture(scope="module")
def strict_proxy(tmp_path_factory):
    """One proxy for the many framing cases: its action echoes its argument."""
    with started_proxies(tmp_path_factory.mktemp("strict")) as start:
        proxy = start("--max-body", "100000")
        assert proxy.init(ECHO_ARGUMENT).status == 200
        yield proxy


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_ambiguous_framing_is_refused_and_closes(strict_proxy, case):
    data, status, fragment = SMUGGLING[case]
    refused_alone(strict_proxy, data, status, fragment)
    check_a_run_still_works(strict_proxy, {"n": 1}, {"n": 1})


def framing_variants():
    """(name, request bytes, expected): expected is a status the proxy must refuse
    with, closing, or the JSON result of a request it must serve.  Every request
    ends with a smuggled GET /readyz that must never be answered."""
    value = {"value": {"n": 7}}
    body = json.dumps(value).encode()
    result = {"n": 7}
    variants = []

    def add(name, data, expected):
        variants.append((name, data, expected))

    def post(*headers):
        return head("POST", "/run", *headers)

    good_lengths = ["%d" % len(body), "0%d" % len(body), " %d " % len(body),
                    "%d, %d" % (len(body), len(body))]
    for length in good_lengths:
        add("content-length %r" % length, post("Content-Length: " + length, "Connection: close")
            + body, result)
    for length in ["+%d" % len(body), "-1", "0x%x" % len(body), "1_0", "%d.0" % len(body), "",
                   "\xb2", "1 0", "%d, %d" % (len(body), len(body) + 1), ",", "%d," % len(body),
                   "99999999999999999999999999999999999999", "abc"]:
        expected = 413 if length.startswith("9999") else 400
        add("content-length %r" % length, post("Content-Length: " + length) + body, expected)
        add("content-length %r after a good one" % length,
            post("Content-Length: %d" % len(body), "Content-Length: " + length) + body, 400)
        add("content-length %r in a chunked request" % length,
            post("Transfer-Encoding: chunked", "Content-Length: " + length)
            + b"0\r\n\r\n", 400)
    add("two equal content-lengths", post("Content-Length: %d" % len(body),
                                          "Content-Length: %d" % len(body),
                                          "Connection: close") + body, result)
    for coding in ["chunked", "Chunked", "CHUNKED", " chunked "]:
        add("transfer-encoding %r" % coding, post("Transfer-Encoding: " + coding,
                                                  "Connection: close")
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), result)
    for coding in ["xchunked", "chunkedx", "chunked, gzip", "gzip, chunked", "gzip", "identity",
                   "chunked;q=1", "chunked, chunked", "", ",", "chunked,", "deflate"]:
        add("transfer-encoding %r" % coding, post("Transfer-Encoding: " + coding)
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), 501 if coding else 501)
    for zeros in [0, 1, 2, 15, 16, 1023, 1024, 1025, 4096, 10000]:
        for last in [0, 1, 2000]:
            add("chunk size after %d zeros, last chunk %d zeros" % (zeros, last),
                post("Transfer-Encoding: chunked", "Connection: close")
                + b"0" * zeros + b"%x\r\n%s\r\n" % (len(body), body)
                + b"0" * max(last, 1) + b"\r\n\r\n", result)
    for extension in [b";a=b", b"; a=b", b";a", b';a="b;c"', b" ;a=b", b";" + b"x" * 1000]:
        add("chunk extension %r" % extension[:20], post("Transfer-Encoding: chunked",
                                                       "Connection: close")
            + b"%x%s\r\n%s\r\n0\r\n\r\n" % (len(body), extension, body), result)
    for trailer in [b"X-T: 1\r\n", b"X-T: 1\r\nX-U: 2\r\n"]:
        add("trailer %r" % trailer, post("Transfer-Encoding: chunked", "Connection: close")
            + b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailer), result)
    split = len(body) // 2
    add("two chunks", post("Transfer-Encoding: chunked", "Connection: close")
        + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (split, body[:split], len(body) - split,
                                                       body[split:]), result)
    chunk = b"%x\r\n%s" % (len(body), body)
    for name, tail in [("no CRLF after the data", b"XX0\r\n\r\n"),
                       ("LF alone after the data", b"\n0\r\n\r\n"),
                       ("a size too short", b"\r\n"),
                       ("a bad trailer", b"\r\n0\r\nno colon\r\n\r\n"),
                       ("a folded trailer", b"\r\n0\r\nX: 1\r\n folded\r\n\r\n"),
                       ("too many trailers", b"\r\n0\r\n" + b"X: 1\r\n" * 101 + b"\r\n"),
                       ("a trailer too large", b"\r\n0\r\nX: " + b"a" * 70000 + b"\r\n\r\n")]:
        status = 431 if "too" in name and "trailer" in name else 400
        if name == "a size too short":
            data = post("Transfer-Encoding: chunked") + b"%x\r\n%s\r\n" % (len(body) - 5, body)
        else:
            data = post("Transfer-Encoding: chunked") + chunk + tail
        add("chunked, " + name, data, status)
    for size in [b"", b"x", b"-1", b"+1", b"0x1", b"1_0", b" 1", b"\t1", b"1 1",
                 b"f" * 16, b"0" * 10 + b"1" * 17]:
        status = 413 if len(size.strip(b"0")) > 15 and size.strip(b"0").isalnum() else 400
        add("chunk size %r" % size[:20], post("Transfer-Encoding: chunked") + size
            + b"\r\n" + body + b"\r\n0\r\n\r\n", status)
    add("both framings", post("Content-Length: %d" % len(body), "Transfer-Encoding: chunked")
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), 400)
    add("both framings, reversed", post("Transfer-Encoding: chunked",
                                        "Content-Length: %d" % len(body))
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), 400)
    bad_lines = ["NoColon", " folded: 1", "\tfolded: 1", "X A: 1", "X(A): 1", ": empty-name",
                 "X-A : 1", "X-A: 1\r2", "X-A: \x00", "X-A: \x7f", "X-A: \x1b[31m",
                 "X/A: 1", "X[A]: 1", "X\"A: 1", "X{A}: 1", "X@A: 1", "X=A: 1", "X,A: 1"]
    for line in bad_lines:
        add("header line %r" % line, post("Content-Length: %d" % len(body), line) + body, 400)
        add("header line %r before the length" % line,
            post(line, "Content-Length: %d" % len(body)) + body, 400)
        add("header line %r in an /init" % line,
            head("POST", "/init", line, "Content-Length: 2") + b"{}", 400)
        add("header line %r in a chunked request" % line,
            post("Transfer-Encoding: chunked", line) + b"2\r\n{}\r\n0\r\n\r\n", 400)
    good_lines = ["X-A:1", "X-A:   spaced   ", "X-A:\t1\t", "X-A: caf\xe9", "x!#$%&'*+-.^_`|~: 1",
                  "X-A:", "X-A: a: b"]
    for line in good_lines:
        add("header line %r" % line, post(line, "Content-Length: %d" % len(body),
                                          "Connection: close") + body, result)
    for ending in [b"\n", b"\r\n"]:
        data = (b"POST /run HTTP/1.1" + ending + b"Host: x" + ending
                + b"Content-Length: %d" % len(body) + ending
                + b"Connection: close" + ending + ending + body)
        add("lines ended by %r" % ending, data, result)
    for line, status in [(b"POST /run HTTP/2.0", 505), (b"POST /run HTTP/1", 400),
                         (b"POST /run HTTP/1.1 extra", 400), (b"POST /run", 400),
                         (b"POST /run HTTP/1.x", 400), (b"P(ST /run HTTP/1.1", 400),
                         (b"POST /run HTTP/1.1\r", 400), (b"POST\r/run HTTP/1.1", 400),
                         (b"POST /run http/1.1", 400), (b"POST /run HTTP/11.1", 400)]:
        add("request line %r" % line, line + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body, status)
    add("empty lines before the request line", b"\r\n\r\n" + post(
        "Content-Length: %d" % len(body), "Connection: close") + body, result)
    for connection in ["close", "Close", "keep-alive, close", "close, keep-alive",
                       "upgrade,close", "x, y, close"]:
        add("connection %r" % connection, post("Content-Length: %d" % len(body),
                                               "Connection: " + connection) + body, result)
    add("connection headers repeated", post("Content-Length: %d" % len(body),
                                            "Connection: keep-alive", "Connection: close")
        + body, result)
    for path, method in [("/nowhere", "POST"), ("/run", "GET"), ("/run", "PUT"),
                         ("/init", "DELETE")]:
        add("%s %s with a body" % (method, path), head(method, path, "Content-Length: %d"
                                                      % len(body)) + body,
            404 if path == "/nowhere" else 405)
    add("a body over the limit", post("Content-Length: 100001"), 413)
    add("a chunked body over the limit", post("Transfer-Encoding: chunked")
        + b"186a1\r\n" + b"x" * 100, 413)
    return variants


def test_hundreds_of_framing_variants_each_followed_by_a_normal_run(strict_proxy):
    variants = framing_variants()
    assert len(variants) >= 200
    served = 0
    for name, data, expected in variants:
        client = RawClient(strict_proxy, timeout=20)
        try:
            client.send(data + SMUGGLED)
            response = client.response()
            if isinstance(expected, dict):
                assert (response.status, response.json) == (200, expected), (name, response)
                served += 1
            else:
                assert response.status == expected, (name, response)
                check_json_response(response)
            assert client.closed_by_peer(), (name, client.buffer)
        finally:
            client.close()
        check_a_run_still_works(strict_proxy, {"after": name}, {"after": name})
    out, err = strict_proxy.logs()  # the runs' sentinels, and not a word more
    assert (split_logs(out)[0], split_logs(err)[0]) == ("", ""), (out[-500:], err[-500:])
    assert err.count(SENTINEL) >= served + len(variants)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_header_bytes_and_fields_are_bounded(proxies, how):
    proxy = (proxies("--max-header", "2K") if how == "flag"
             else proxies(env={"OWPROXY_MAX_HEADER": "2K"}))
    assert proxy.init(ECHO_RESULT).status == 200
    refused_alone(proxy, head("POST", "/run", *["X-A: " + "a" * 100] * 20), 431,
                  "larger than the limit of 2048 bytes")
    refused_alone(proxy, head("POST", "/run", "X-Long: " + "a" * 3000), 431, "2048")
    refused_alone(proxy, head("POST", "/run", *["X: 1"] * 101), 431, "more than 100 header")
    refused_alone(proxy, b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n", 414, "request line")
    ok = raw_request(proxy, head("POST", "/run", "Content-Length: 2", *["X: 1"] * 95) + b"{}")
    assert (ok.status, ok.json) == (200, {"ok": "run"})
    check_streams(proxy, sentinels=1)  # the one /run; the refusals wrote nothing


def test_chunked_request_bodies_are_accepted_for_init_and_run(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        init = json.dumps({"value": {"code": ECHO_BASH}}).encode()
        conn.request("POST", "/init", body=iter([init[:10], init[10:30], init[30:]]),
                     headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()
        reply.read()
    finally:
        conn.close()
    client = RawClient(proxy)
    try:  # chunk extensions and a trailer, as RFC 9112 allows
        body = json.dumps({"value": {"chunked": "yes"}}).encode()
        client.send(head("POST", "/run", "Transfer-Encoding: chunked")
                    + b"%x;ext=1\r\n%s\r\n" % (5, body[:5])
                    + b"%x\r\n%s\r\n" % (len(body) - 5, body[5:])
                    + b"0\r\nX-Trailer: ignored\r\n\r\n")
        response = client.response()
        assert (response.status, response.json) == (200, {"chunked": "yes"})
    finally:
        client.close()


def test_a_chunk_size_with_any_number_of_leading_zeros_is_read_as_its_value(proxy):
    assert proxy.init(ECHO_ARGUMENT).status == 200
    body = json.dumps({"value": {"text": SMUGGLED.decode()}}).encode()
    client = RawClient(proxy)
    try:
        client.send(head("POST", "/run", "Transfer-Encoding: chunked", "Connection: close")
                    + b"0" * 5000 + b"%x\r\n" % len(body) + body + b"\r\n"
                    + b"0" * 3000 + b"\r\n\r\n" + SMUGGLED)
        response = client.response()
        assert (response.status, response.json) == (200, {"text": SMUGGLED.decode()})
        assert client.closed_by_peer()  # the request after Connection: close is not read
    finally:
        client.close()


@pytest.mark.parametrize("chunks", [b"zz\r\n", b"2\r\n{}XX", b"5\r\n{}", b"-1\r\n{}\r\n",
                                    b"+2\r\n{}\r\n", b"0x2\r\n{}\r\n", b"0_2\r\n{}\r\n"],
                         ids=["bad-size", "no-crlf-after-data", "short-chunk", "negative",
                              "plus-sign", "0x-prefix", "underscore"])
def test_a_malformed_chunked_body_is_400(proxy, chunks):
    assert proxy.init(ECHO_RESULT).status == 200
    client = RawClient(proxy)
    try:
        client.send(head("POST", "/run", "Transfer-Encoding: chunked") + chunks)
        if chunks.endswith(b"{}"):
            client.sock.shutdown(socket.SHUT_WR)  # were it read to the end, this would end it
        response = client.response()
        assert response.status == 400, response
        check_json_response(response)
        assert "chunked" in response.json["error"]
    finally:
        client.close()
    check_a_run_still_works(proxy)


@pytest.mark.parametrize("expect", [True, False], ids=["expect-100", "no-expect"])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_body_over_the_limit_is_413_before_it_is_read(proxies, how, expect):
    proxy = (proxies("--max-body", "1000") if how == "flag"
             else proxies(env={"OWPROXY_MAX_BODY": "1000"}))
    assert proxy.init(ECHO_RESULT).status == 200
    client = RawClient(proxy)
    try:
        client.send(head("POST", "/run", "Content-Type: application/json",
                         "Content-Length: 1001", *(["Expect: 100-continue"] if expect else [])))
        response = client.response()  # the body is never sent
        assert response.status == 413, response
        check_json_response(response)
        assert client.closed_by_peer()
    finally:
        client.close()
    check_streams(proxy, sentinels=1)  # a /run answer, however early
    assert proxy.run({"fits": "x" * 900}).status == 200


def test_a_chunked_body_over_the_limit_is_413(proxies):
    proxy = proxies("--max-body", "1000")
    assert proxy.init(ECHO_RESULT).status == 200
    client = RawClient(proxy)
    try:
        client.send(head("POST", "/run", "Transfer-Encoding: chunked")
                    + b"200\r\n" + b" " * 0x200 + b"\r\n" + b"300\r\n")
        response = client.response()
        assert response.status == 413, response
        check_json_response(response)
    finally:
        client.close()
    check_a_run_still_works(proxy)



def test_a_body_in_1_byte_chunks_among_other_chunks_arrives_whole_or_413_past_the_limit(
        proxies):
    """Plain chunks the proxy's buffer holds whole are taken together; the others
    (an extension, leading zeros, one split over sends, the last) one by one."""
    proxy = proxies("--max-body", "1000")
    assert proxy.init(ECHO_BASH).status == 200
    body = json.dumps({"value": {"s": "0123456789abcdef" * 20}}).encode()
    tiny = b"".join(b"1\r\n%c\r\n" % byte for byte in body[:200])
    chunks = (tiny + b"3;ext=1\r\n%s\r\n" % body[200:203] + b"00004\r\n%s\r\n" % body[203:207]
              + b"%x\r\n%s\r\n" % (len(body) - 207, body[207:]) + b"0\r\n\r\n")
    request = head("POST", "/run", "Transfer-Encoding: chunked") + chunks
    client = RawClient(proxy)
    try:
        for start in range(0, len(request), 333):  # pieces that split chunks anywhere
            client.send(request[start:start + 333])
        response = client.response()
        assert (response.status, response.json) == (200, json.loads(body)["value"])
    finally:
        client.close()
    too_long = b"".join(b"1\r\n \r\n" for _ in range(1001))
    response = raw_request(proxy, head("POST", "/run", "Transfer-Encoding: chunked") + too_long)
    assert response.status == 413 and "limit of 1000 bytes" in response.json["error"], response


def tiny_chunks(body):
    return [b"1\r\n%c\r\n" % byte for byte in body] + [b"0\r\n\r\n"]


def test_a_body_sent_a_byte_per_send_is_answered_whole(proxy):
    assert proxy.init(ECHO_BASH).status == 200
    body = json.dumps({"value": {"s": "trickled " * 30}}).encode()
    client = RawClient(proxy)
    try:
        client.send(head("POST", "/run", "Transfer-Encoding: chunked"))
        for chunk in tiny_chunks(body):
            client.send(chunk)
            time.sleep(0.0005)
        response = client.response()
        assert (response.status, response.json) == (200, json.loads(body)["value"])
    finally:
        client.close()


class CountingReader(owproxy.RequestReader):
    """A RequestReader that counts its waits for bytes."""

    waits = 0

    def may_wait(self):
        self.waits += 1
        super().may_wait()


def test_a_body_that_keeps_arriving_in_tiny_pieces_is_read_in_pauses():
    """Once TRICKLE_WAITS waits have each brought a few bytes, each wait after
    such a one pauses first: a trickle costs a read per TRICKLE_PAUSE, not one
    per piece (a wait that brought TRICKLE_PIECE bytes or more is followed by
    one that does not pause)."""
    ours, theirs = socket.socketpair()
    budget = owproxy.BodyBudget(owproxy.MIB)
    reader = CountingReader(ours.makefile("rb"), ours, 1024, 30)
    body = b"x" * 200
    chunks = tiny_chunks(body)

    def trickle():
        for chunk in chunks:
            theirs.sendall(chunk)
            time.sleep(0.0005)
    sender = threading.Thread(target=trickle)
    started = time.monotonic()
    sender.start()
    try:
        with budget.share(0) as share:
            assert reader.body(owproxy.CHUNKED, 1000, share, 30) == body
        elapsed = time.monotonic() - started
    finally:
        sender.join(30)
        ours.close()
        theirs.close()
    large_waits = len(b"".join(chunks)) // owproxy.TRICKLE_PIECE
    assert reader.waits <= (owproxy.TRICKLE_WAITS + elapsed / owproxy.TRICKLE_PAUSE
                            + large_waits + 2), (reader.waits, elapsed)
    readme = " ".join((HERE / "README.md").read_text().split())
    assert ("Once %d of a head's or body's waits for bytes have each brought fewer than %d "
            "bytes, a wait after another such one pauses %d ms first" % (
                owproxy.TRICKLE_WAITS, owproxy.TRICKLE_PIECE, owproxy.TRICKLE_PAUSE * 1000)
            in readme)


def test_a_trickling_request_pauses_only_where_its_deadline_leaves_time(monkeypatch):
    """With less time left than a pause, what has arrived is read at once."""
    pauses = []
    monkeypatch.setattr(owproxy.time, "sleep", pauses.append)
    ours, theirs = socket.socketpair()
    reader = owproxy.RequestReader(ours.makefile("rb"), ours, 1024, 30)
    try:
        for left, paused in ((owproxy.TRICKLE_PAUSE / 2, []), (30, [owproxy.TRICKLE_PAUSE])):
            theirs.sendall(b"arrived")
            with reader.within(time.monotonic() + left):
                reader.small_waits, reader.last_small = owproxy.TRICKLE_WAITS, True
                assert reader.read(len(b"arrived")) == b"arrived"
            assert pauses == paused
    finally:
        ours.close()
        theirs.close()


def test_expect_100_continue_within_the_limit_gets_continue_then_the_answer(proxies):
    proxy = proxies("--max-body", "1000")
    assert proxy.init(ECHO_RESULT).status == 200
    client = RawClient(proxy)
    try:
        body = json.dumps({"value": {"x": "y" * 500}}).encode()
        client.send(head("POST", "/run", "Content-Length: %d" % len(body),
                         "Expect: 100-continue"))
        assert client.response().status == 100
        client.send(body)
        response = client.response()
        assert (response.status, response.json) == (200, {"ok": "run"})
    finally:
        client.close()


def test_a_body_that_could_never_fit_is_413_at_once_saying_why(proxies):
    proxy = proxies("--max-body", "1M", "--body-memory", "1M")
    assert proxy.init(ECHO_RESULT).status == 200
    refused_alone(proxy, head("POST", "/run", "Content-Length: 100000"), 413,
                  "more than the proxy's --body-memory of 1048576 bytes")


def test_a_body_declared_over_the_limit_is_refused_without_waiting_for_the_budget(proxies):
    proxy = proxies("--concurrent", "--max-header", "1K", "--max-body", "10K",
                    "--body-memory", "200K")  # a 9 KB body with its parse fits, two do not
    assert proxy.init(bash("touch started\nwhile [ ! -e release ]; do sleep 0.02; done\n"
                           "echo '{\"slow\": true}'")).status == 200
    slow = in_thread(proxy.run, {"pad": "x" * 9000}, timeout=30)
    # Its 9 KB body holds the budget until it is answered, which waits for the release.
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    client = RawClient(proxy)
    try:
        client.send(head("POST", "/run", "Content-Length: 20000"))
        response = client.response()  # did it wait for the activation: a timeout
    finally:
        client.close()
    assert response.status == 413
    (proxy.action_dir / "release").write_text("")
    assert slow().json == {"slow": True}


def server_rx_queue(port, client_port):
    """Bytes the proxy's kernel holds unread for the connection from ``client_port``."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            local, remote, _, queues = line.split()[1:5]
            if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16)) == (
                    port, client_port):
                return int(queues.split(":")[1], 16)
    return None


def test_a_body_beyond_the_memory_budget_waits_unread_in_its_socket(proxies):
    # one 90 KB body fits (x 13 with its parse), two do not
    proxy = proxies("--max-body", "200K", "--body-memory", "1200K")
    assert proxy.init(bash("""
touch started
while [ ! -e release ]; do sleep 0.02; done
echo '{"done": true}'""")).status == 200
    body = json.dumps({"value": {"x": "y" * 90000}}).encode()  # over a head's 64 KiB
    first = in_thread(proxy.post, "/run", body, timeout=60)
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    waiting = RawClient(proxy, timeout=60)
    try:
        waiting.send(head("POST", "/run", "Content-Length: %d" % len(body)) + body)
        client_port = waiting.sock.getsockname()[1]
        assert wait_for(lambda: (server_rx_queue(proxy.port, client_port) or 0) > 60000)
        time.sleep(0.3)
        assert server_rx_queue(proxy.port, client_port) > 60000  # still unread
        (proxy.action_dir / "release").write_text("")
        assert first().json == {"done": True}
        response = waiting.response()
        assert (response.status, response.json) == (200, {"done": True})
    finally:
        waiting.close()



def test_a_body_that_waits_for_the_budget_is_408_at_its_body_timeout(proxies):
    """The wait for room counts in a body's --body-timeout: it once moved the
    deadline, so that a body behind a long run waited as long as the run."""
    # one 90 KB body fits (x 13 with its parse), two do not
    proxy = proxies("--max-body", "200K", "--body-memory", "1200K", "--body-timeout", "2",
                    "--concurrent")
    assert proxy.init(bash("""
case "$1" in *hold*) touch started; while [ ! -e release ]; do sleep 0.02; done ;; esac
echo '{"done": true}'""")).status == 200
    body = json.dumps({"value": {"x": "y" * 90000}}).encode()
    first = in_thread(proxy.post, "/run", {"value": {"x": "y" * 90000, "hold": True}},
                      timeout=60)
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    waiting = RawClient(proxy, timeout=30)
    try:
        waiting.send(head("POST", "/run", "Content-Length: %d" % len(body)) + body)
        response = waiting.response()
        assert response.status == 408, response
        assert "no room in the proxy's --body-memory within its --body-timeout" in (
            response.json["error"])
        assert waiting.closed_by_peer()
    finally:
        waiting.close()
    check_a_run_still_works(proxy, result={"done": True})  # a small body has room
    (proxy.action_dir / "release").write_text("")
    assert first().json == {"done": True}
    assert proxy.post("/run", body, timeout=30).json == {"done": True}  # what it held is free


def memory_bound(settings, idle):
    """The README's bound, in KiB: idle RSS + --max-connections x (48 KiB +
    --max-header) + 2 x --body-memory."""
    return idle + settings["connections"] * (48 + settings["header"]) + 2 * settings["body"]


def test_the_worst_body_shapes_stay_within_the_memory_bound(proxies):
    """1-byte chunks, and empty containers (a parsed ``{}`` costs some 24 times its
    3 bytes), each alone, then a cap's worth of containers at once, measured with
    VmHWM: once, four such bodies fitted a budget counted in raw bytes."""
    settings = {"connections": 4, "header": 4, "body": 42 * 1024}  # KiB
    proxy = proxies("--max-connections", "4", "--max-header", "4K", "--max-body", "1M",
                    "--body-memory", "42M", "--concurrent")
    assert proxy.init(ECHO_RESULT).status == 200
    idle = proc_status(proxy.process.pid, "VmHWM")
    containers = b'{"value": {"a": [' + b",".join([b"{}"] * 300000) + b"]}}"
    text = json.dumps({"value": {"a": "x" * 60000}}).encode()
    trickled = b"".join(b"1\r\n%c\r\n" % byte for byte in text) + b"0\r\n\r\n"
    requests = [head("POST", "/run", "Content-Length: %d" % len(containers)) + containers,
                head("POST", "/run", "Transfer-Encoding: chunked") + trickled]
    for request in requests:
        assert raw_request(proxy, request).json == {"ok": "run"}
    together = [in_thread(raw_request, proxy, requests[0]) for _ in range(4)]
    assert [answer().json for answer in together] == [{"ok": "run"}] * 4
    assert proc_status(proxy.process.pid, "VmHWM") <= memory_bound(settings, idle)


def test_keep_alive_serves_several_requests_on_one_connection(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        assert proxy.post("/init", {"value": {"code": ECHO_BASH}}, connection=conn).status == 200
        sock = conn.sock
        assert sock is not None, "the proxy closed the connection after /init"
        for n in range(3):
            response = proxy.post("/run", {"value": {"n": n}}, connection=conn)
            assert (response.status, response.json) == (200, {"n": n})
            assert response.headers.get("Connection", "").lower() != "close"
            assert conn.sock is sock, "the connection was not kept alive"
        bad = proxy.post("/run", b"{nope", connection=conn)  # answered with the body read
        assert bad.status == 400
        response = proxy.post("/run", {"value": {"n": 9}}, connection=conn)
        assert response.json == {"n": 9}
        assert conn.sock is sock
    finally:
        conn.close()
    check_streams(proxy, sentinels=5)


def test_connection_close_anywhere_in_the_list_closes(proxy):
    assert proxy.init(ECHO_RESULT).status == 200
    client = RawClient(proxy)
    try:
        client.send(head("POST", "/run", "Content-Length: 2", "Connection: keep-alive, close")
                    + b"{}" + SMUGGLED)
        response = client.response()
        assert (response.status, response.headers["connection"]) == (200, "close")
        assert client.closed_by_peer()
    finally:
        client.close()


def test_http_1_0_closes_unless_asked_to_keep_alive(proxy):
    assert proxy.init(ECHO_RESULT).status == 200
    request = b"GET /healthz HTTP/1.0\r\n%s\r\n"
    client = RawClient(proxy)
    try:
        client.send(request % b"" + SMUGGLED)
        assert client.response().status == 200
        assert client.closed_by_peer()
    finally:
        client.close()
    client = RawClient(proxy)
    try:
        client.send(request % b"Connection: Keep-Alive\r\n" + SMUGGLED)
        assert client.response().json == {"status": "ok"}
        assert client.response().json == {"ready": True}  # kept alive, as asked
    finally:
        client.close()


def test_a_4xx_with_the_body_unread_closes(proxy):
    assert proxy.init(ECHO_RESULT).status == 200
    refused_alone(proxy, head("POST", "/nowhere", "Content-Length: %d" % len(SMUGGLED)), 404)
    refused_alone(proxy, head("PUT", "/run", "Content-Length: %d" % len(SMUGGLED)), 405)
    check_quiet_but_for_runs(proxy)


def thread_ids(pid):
    return set(os.listdir("/proc/%d/task" % pid))


def test_handler_threads_are_kept_for_the_next_connection(proxy):
    """Sixty connections one after the other are served by a handful of threads
    (at most 16 wait idle), not by sixty new ones."""
    seen = thread_ids(proxy.process.pid)
    for _ in range(60):
        assert proxy.request("GET", "/healthz").status == 200
        seen |= thread_ids(proxy.process.pid)
    assert len(seen) < 20, seen


RELEASED_BY_TEST = bash("""
touch started
while [ ! -e release ]; do sleep 0.02; done
echo '{"released": true}'
""")


def test_a_running_action_never_blocks_the_server(proxy):
    assert proxy.init(RELEASED_BY_TEST).status == 200
    run = in_thread(proxy.run, timeout=30)
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    assert proxy.request("GET", "/nowhere", timeout=5).status == 404
    again = proxy.init(ECHO_RESULT)
    assert (again.status, again.json) == (403, {
        "error": "Cannot initialize the action more than once."})
    (proxy.action_dir / "release").touch()
    response = run()
    assert (response.status, response.json) == (200, {"released": True})


def test_a_stalled_client_blocks_nobody(proxy):
    assert proxy.init(ECHO_RESULT).status == 200
    stalled = []
    for path in ("/run", "/init"):
        client = RawClient(proxy)
        client.send(head("POST", path, "Content-Length: 100") + b'{"value": {')
        stalled.append(client)
    try:
        for _ in range(2):
            check_a_run_still_works(proxy)
    finally:
        for client in stalled:
            client.close()
    check_a_run_still_works(proxy)


def test_a_slow_head_is_cut_off_at_the_header_timeout(proxies):
    proxy = proxies("--header-timeout", "0.5")
    assert proxy.init(bash("touch ran\necho '{}'")).status == 200
    client = RawClient(proxy, timeout=30)
    try:
        for byte in head("POST", "/run", "Content-Length: 2"):  # never ends its head
            try:
                client.send(bytes([byte]))
            except OSError:
                break  # closed by the proxy
            time.sleep(0.05)
        assert client.closed_by_peer(), client.buffer  # closed without an answer
    finally:
        client.close()
    assert not (proxy.action_dir / "ran").exists()
    silent = RawClient(proxy, timeout=30)
    try:
        assert silent.closed_by_peer()  # a connection that sends nothing at all
    finally:
        silent.close()
    assert proxy.logs() == ("", "")


def test_a_trickled_body_holds_no_budget_and_is_408_after_the_body_timeout(proxies):
    """A chunked body that stalls would once have held --max-body of the budget
    until it ended: a large /run beside it is answered while it is still open."""
    proxy = proxies("--max-body", "1M", "--body-memory", "1M", "--body-timeout", "3")
    assert proxy.init(ECHO_RESULT).status == 200
    trickle = RawClient(proxy, timeout=20)
    try:
        trickle.send(head("POST", "/run", "Transfer-Encoding: chunked") + b"100\r\n{")
        assert proxy.run({"pad": "x" * 70000}, timeout=20).json == {"ok": "run"}
        trickle.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            trickle.sock.recv(1)  # the trickle is still waiting for its answer
        trickle.sock.setblocking(True)
        response = trickle.response()
        assert response.status == 408 and "within 3 seconds" in response.json["error"]
        assert trickle.closed_by_peer()
    finally:
        trickle.close()
    check_a_run_still_works(proxy)


def test_a_resting_connection_is_closed_after_the_idle_timeout(proxies):
    proxy = proxies("--idle-timeout", "1")
    client = RawClient(proxy, timeout=20)
    try:
        client.send(head("GET", "/healthz"))
        assert client.response().status == 200
        assert client.closed_by_peer()
    finally:
        client.close()
    assert proxy.logs() == ("", "")


def test_a_caps_worth_of_resting_connections_lets_a_run_in(proxies):
    proxy = proxies("--max-connections", "4", "--idle-timeout", "60")
    assert proxy.init(ECHO_RESULT).status == 200
    resting = []
    try:
        while len(resting) < 8:  # each sends one request, then rests
            client = RawClient(proxy)
            client.send(head("GET", "/healthz"))
            assert client.response().status == 200
            resting.append(client)
        assert proxy.run(timeout=10).json == {"ok": "run"}
        assert resting[0].closed_by_peer()  # the longest resting made room
    finally:
        for client in resting:
            client.close()


def busy_client(proxy):
    """A connection served, so surely accepted, then busy with the head of its next
    request, which it sent with the first (a resting one would be closed to admit
    another); None if it was turned away."""
    client = RawClient(proxy)
    client.send(head("GET", "/healthz") + b"GET /healthz HTTP/1.1\r\n")
    if client.response().status == 200:
        return client
    client.close()
    return None


def test_past_the_connection_cap_a_503_at_once_without_a_thread(proxies):
    proxy = proxies("--max-connections", "2", "--header-timeout", "60")
    assert proxy.init(ECHO_RESULT).status == 200
    held = []

    def hold():
        """Once the connections of the /init are done, two busy ones fill the cap."""
        client = busy_client(proxy)
        if client:
            held.append(client)
        return len(held) == 2

    try:
        assert wait_for(hold)
        threads = proc_status(proxy.process.pid, "Threads")
        for _ in range(30):
            response = refused_alone(proxy, head("POST", "/run", "Content-Length: 2") + b"{}",
                                     503, "limit of 2 connections")
        assert proc_status(proxy.process.pid, "Threads") <= threads
    finally:
        for client in held:
            client.close()
    # A connection counts until its thread has seen it close: wait for the slots.
    assert wait_for(lambda: proxy.run(timeout=10).status == 200)
    assert check_streams(proxy) == ("", "")  # one run's sentinels, no word of the 503s


def test_the_connection_cap_stays_within_the_descriptor_limit(proxies):
    """With only 100 descriptors, the proxy answers 503 past 36 connections rather
    than failing to accept (and spinning) once they run out."""
    import resource

    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))

    proxy = proxies(preexec_fn=few_descriptors)
    assert proxy.init(ECHO_RESULT).status == 200
    clients = []
    try:
        while len(clients) < 36:
            client = busy_client(proxy)
            if client:  # else a connection of the /init was not yet done
                clients.append(client)
        refused_alone(proxy, head("POST", "/run", "Content-Length: 2") + b"{}", 503,
                      "limit of 36 connections")
    finally:
        for client in clients:
            client.close()
    # A connection counts until its thread has seen it close: wait for the slots.
    assert wait_for(lambda: proxy.run(timeout=10).json == {"ok": "run"})


def test_the_default_host_takes_ipv4_and_ipv6_clients_on_one_port(proxies):
    proxy = proxies("--verbose", host_args=[])
    assert answers("127.0.0.1", proxy.port)
    if IPV6:  # dual-stack: the same socket answers ::1
        assert answers("::1", proxy.port)
    proxy.request("POST", "/run", {"value": {}})
    assert wait_for(lambda: '"POST /run HTTP/1.1" 502' in proxy.logs()[1], 30)
    err = proxy.logs()[1]
    assert "\n127.0.0.1 - - [" in err and "::ffff:" not in err, err  # mapped, shown as IPv4
    banners = ["owproxy %s: serving %s on http://%s:%d\n" % (
        owproxy.__version__, proxy.action_dir, host, proxy.port) for host in ("[::]", "0.0.0.0")]
    assert banners[0] in err if IPV6 else any(banner in err for banner in banners), err


needs_ipv6 = pytest.mark.skipif(not IPV6, reason="this machine has no IPv6 loopback (::1)")


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_with_or_without_brackets_listens_on_ipv6_only(proxies, host):
    proxy = proxies(host_args=["--host", host, "--verbose"], address="::1")
    assert answers("::1", proxy.port)
    assert not answers("127.0.0.1", proxy.port)
    connection = http.client.HTTPConnection("::1", proxy.port, timeout=30)
    connection.request("POST", "/run", b'{"value": {}}')
    assert connection.getresponse().status == 502  # nothing baked, but served over ::1
    connection.close()
    assert wait_for(lambda: "\n::1 - - [" in proxy.logs()[1], 30), proxy.logs()


def test_an_ipv4_host_listens_on_ipv4_only(proxies):
    proxy = proxies()
    assert answers("127.0.0.1", proxy.port)
    if IPV6:
        assert not answers("::1", proxy.port)


def test_a_host_name_listens_where_the_name_resolves(proxies):
    family, _, _, _, address = socket.getaddrinfo("localhost", None, 0, socket.SOCK_STREAM, 0,
                                                  socket.AI_PASSIVE)[0]
    proxy = proxies(host_args=["--host", "localhost"], address=address[0])
    assert answers(address[0], proxy.port)
    other = "::1" if family == socket.AF_INET else "127.0.0.1"
    if IPV6:
        assert not answers(other, proxy.port)


@pytest.mark.parametrize("host, family", [("127.0.0.1", socket.AF_INET),
                                          ("localhost", None), ("[::1]", socket.AF_INET6)])
def test_a_listening_host_resolves_as_getaddrinfo_has_it(host, family):
    if family == socket.AF_INET6 and not IPV6:
        pytest.skip("no IPv6 here")
    expected = socket.getaddrinfo(host.strip("[]"), 8080, 0, socket.SOCK_STREAM, 0,
                                  socket.AI_PASSIVE)[0]
    assert owproxy.listening_address(host, 8080) == (expected[0], expected[4])


def test_binding_looks_up_no_name(monkeypatch):
    def no_dns(*args):
        raise AssertionError("a DNS lookup at bind")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    server = owproxy.ProxyServer(owproxy.Settings(host="127.0.0.1", port=0), {},
                                 owproxy.Logs(), owproxy.Processes())
    try:
        assert server.server_name == "127.0.0.1" and server.server_port > 0
    finally:
        server.server_close()


def test_listening_address_of_every_kind_of_host(monkeypatch):
    assert owproxy.listening_address("127.0.0.1", 80) == (socket.AF_INET, ("127.0.0.1", 80))
    for host in ("::1", "[::1]"):
        family, address = owproxy.listening_address(host, 80)
        assert (family, address[:2]) == (socket.AF_INET6, ("::1", 80))
    family, address = owproxy.listening_address("::", 80)
    assert (family, address[:2]) == (socket.AF_INET6, ("::", 80)) if owproxy.has_ipv6() \
        else (family, address) == (socket.AF_INET, ("0.0.0.0", 80))
    monkeypatch.setattr(owproxy, "has_ipv6", lambda: False)  # a host without IPv6
    assert owproxy.listening_address("::", 80) == (socket.AF_INET, ("0.0.0.0", 80))
    assert owproxy.url_host("::") == "[::]" and owproxy.url_host("[::1]") == "[::1]"
    assert owproxy.url_host("0.0.0.0") == "0.0.0.0"


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::1", "[2001:db8::1]"])
def test_an_address_that_cannot_be_bound_is_the_one_line_error(tmp_path, host):
    """Documentation addresses (RFC 5737, RFC 3849): no machine has them."""
    port = free_port()
    completed = cli("--host", host, "--port", str(port), "--action-dir", str(tmp_path))
    shown = "[%s]" % host.strip("[]") if ":" in host else host
    check_one_line_error(completed, "owproxy: cannot listen on %s:%d: " % (shown, port))


def test_a_port_in_use_is_a_one_line_error_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        completed = cli("--host", "127.0.0.1", "--port", str(port),
                        "--action-dir", str(tmp_path))
    check_one_line_error(completed, str(port))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_proxy_exits_0_promptly_on_sigterm_or_sigint(proxy, sig):
    assert proxy.init(ECHO_RESULT).status == 200
    check_a_run_still_works(proxy)
    started = time.time()
    proxy.process.send_signal(sig)
    assert proxy.process.wait(10) == 0
    assert time.time() - started < 5, "an idle proxy waited for its grace period"
    out, err = proxy.logs()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_lets_the_run_in_flight_finish_saying_so_then_exits_0(proxy, sig):
    assert proxy.init(bash("touch started\nsleep 1\necho '{\"finished\": true}'")).status == 200
    run = in_thread(proxy.run, timeout=30)
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    proxy.process.send_signal(sig)
    response = run()
    assert (response.status, response.json) == (200, {"finished": True})
    assert proxy.process.wait(30) == 0
    _, err = check_streams(proxy)
    assert ("owproxy: stopping: 1 activation(s) in flight get up to 8 s to finish (a second "
            "signal stops them now)") in err.splitlines(), err
    assert "Traceback" not in err


def test_sigterm_stops_an_overdue_action_after_the_grace_and_exits_0(proxies):
    proxy = proxies("--grace", "0.5")
    code = bash("""
sleep 60 &
echo $! > child.pid
echo $$ > main.pid
wait
""")
    assert proxy.init(code).status == 200
    run = in_thread(proxy.run, timeout=30)
    assert wait_for(lambda: (proxy.action_dir / "main.pid").exists()
                    and (proxy.action_dir / "main.pid").read_text().strip())
    started = time.time()
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(10) == 0
    assert time.time() - started < 5, "the proxy waited for the action, not the grace"
    for name in ("main.pid", "child.pid"):
        assert gone_or_zombie(int((proxy.action_dir / name).read_text())), name
    response = run()  # answered before the proxy exits
    assert (response.status, response.json) == (502, BAD_RESULT)
    assert "the action was killed by signal 9 (SIGKILL)" in check_streams(proxy)[1]


def test_a_second_signal_cuts_the_grace_short(proxies):
    proxy = proxies("--grace", "60")
    assert proxy.init(bash("touch started\nsleep 60")).status == 200
    run = in_thread(proxy.run, timeout=30)
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    proxy.process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proxy.process.poll() is None, "the first signal did not wait for the action"
    proxy.process.send_signal(signal.SIGINT)
    assert proxy.process.wait(10) == 0
    response = run()
    assert (response.status, response.json) == (502, BAD_RESULT)
    _, err = check_streams(proxy)
    assert "Traceback" not in err and "killed by signal 9" in err


def test_between_the_grace_and_the_close_a_request_gets_503_not_a_reset(proxies):
    proxy = proxies("--loop")
    # An idle warm process that ignores the end of its input: closing it takes the
    # whole second the proxy gives it, while the proxy no longer serves.
    assert proxy.init(bash("""
while true; do
  IFS= read -r line || { touch closing; sleep 30; }
  echo '{"ok": "run"}' >&3
done""")).status == 200
    check_a_run_still_works(proxy)
    proxy.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: (proxy.action_dir / "closing").exists())
    client = RawClient(proxy, timeout=30)
    try:
        client.send(head("POST", "/run", "Content-Length: 2") + b"{}")
        response = client.response()
        assert (response.status, response.json) == (503, {"error": "The proxy is shutting down."})
        assert client.closed_by_peer()
    finally:
        client.close()
    assert proxy.process.wait(30) == 0


def test_in_serial_mode_a_run_during_the_grace_gets_503_before_the_running_one_ends(proxies):
    proxy = proxies("--grace", "60")
    assert proxy.init(bash("""
touch started
while [ ! -e release ]; do sleep 0.02; done
echo '{"done": true}'""")).status == 200
    run = in_thread(proxy.run, timeout=60)
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    proxy.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: proxy.request("GET", "/readyz").status == 503)
    refused = proxy.run(timeout=30)  # without the fix: waits for the release, forever
    assert (refused.status, refused.json) == (503, {"error": "The proxy is shutting down."})
    assert not (proxy.action_dir / "release").exists()
    (proxy.action_dir / "release").write_text("")
    assert run().json == {"done": True}
    assert proxy.process.wait(30) == 0
    out, err = proxy.logs()
    assert (out.count(SENTINEL), err.count(SENTINEL)) == (1, 1)  # the refused run wrote none


def test_a_run_waiting_for_the_lock_at_shutdown_gets_503_without_sentinels(proxy):
    assert proxy.init(bash("sleep 1.5\necho '{\"done\": true}'")).status == 200
    answers = {}

    def run(name):
        answers[name] = proxy.run(timeout=30)

    first = threading.Thread(target=run, args=("first",))
    first.start()
    time.sleep(0.5)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    time.sleep(0.5)  # the second waits for the lock the first holds
    proxy.process.send_signal(signal.SIGTERM)
    first.join(30)
    second.join(30)
    assert (answers["first"].status, answers["first"].json) == (200, {"done": True})
    assert (answers["second"].status, answers["second"].json) == (
        503, {"error": "The proxy is shutting down."})
    assert proxy.process.wait(30) == 0
    check_streams(proxy, sentinels=1)  # the running activation's, no more


def test_a_request_whose_head_is_still_coming_at_shutdown_gets_its_503(proxy):
    """The proxy has no activation in flight, so it ends at once; the connection it
    is reading a head from still gets its answer, not a reset or a silent close."""
    assert proxy.init(ECHO_RESULT).status == 200
    client = RawClient(proxy)
    try:
        client.send(b"POST /run HTTP/1.1\r\n")
        time.sleep(0.3)  # a handler thread holds the connection, its head half read
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        client.send(b"Host: x\r\nContent-Length: 2\r\n\r\n{}")
        response = client.response()
    finally:
        client.close()
    assert (response.status, response.json) == (503, {"error": "The proxy is shutting down."})
    assert proxy.process.wait(30) == 0


# ---------------------------------------------------------------------------
# Client: invoke, the init and run commands, the health check, the examples and the README
# ---------------------------------------------------------------------------

def assert_invoked(result, expected, logs=()):
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected
    assert SENTINEL not in result.stderr
    for line in logs:
        assert line in result.stderr


@pytest.mark.parametrize("args, expected, logs", [
    (["hello.sh", "-p", "name", "Ada"], {"greeting": "Hello, Ada!"},
     ["greeting Ada for activation ", "this line goes to stderr"]),
    (["python-zip", '{"text": "the quick brown fox"}'], {"words": 4, "longest": "quick"}, []),
], ids=["bash", "python-zip-as-a-directory"])
def test_invoke_an_example(args, expected, logs):
    result = cli("invoke", EXAMPLES / args[0], *args[1:])
    assert_invoked(result, expected, logs)


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler on this machine")
def test_invoke_the_compiled_c_example(tmp_path):
    binary = tmp_path / "action"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(EXAMPLES / "c" / "action.c")],
                   check=True)
    result = cli("invoke", binary, '{"a": 1}', "-p", "b", "[2]")
    assert_invoked(result, {"language": "C", "params": {"a": 1, "b": [2]}},
                   ["a log line from C"])
    dockerfile = (EXAMPLES / "c" / "Dockerfile").read_text()
    assert "COPY examples/c/action.c" in dockerfile and "/action/exec" in dockerfile


def test_invoke_the_python_function_example_warm():
    result = cli("invoke", EXAMPLES / "hello.py", "--repeat", "3", "-p", "name", "Bo")
    assert_invoked(result, {"greeting": "Hello, Bo!", "greeted_so_far": 3},
                   ["greeting Bo in activation", "owproxy: run 3 took"])
    assert result.stderr.count("greeting Bo") == 3


def test_invoke_the_actionloop_example_with_loop():
    result = cli("invoke", "--loop", "--repeat", "2", EXAMPLES / "loop.py")
    assert_invoked(result, {"greeting": "Hello, stranger!", "served": 2})
    pids = {line.split()[-1] for line in result.stderr.splitlines() if "served by pid" in line}
    assert len(pids) == 1


def test_invoke_a_zip_file(tmp_path):
    archive = tmp_path / "action.zip"
    archive.write_bytes(zip_bytes({"exec": bash("echo '{\"zipped\": true}'")}))
    assert_invoked(cli("invoke", archive), {"zipped": True})


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler on this machine")
@pytest.mark.parametrize("path", ["c", "c/action.c"])
def test_invoke_compiles_the_c_example(path):
    result = cli("invoke", EXAMPLES / path, '{"a": 1}')
    assert_invoked(result, {"language": "C", "params": {"a": 1}}, ["a log line from C"])


def test_invoke_without_cc_says_how_to_compile(tmp_path):
    result = cli("invoke", EXAMPLES / "c", env={"PATH": str(tmp_path)})
    check_one_line_error(result, "action.c is C source and there is no cc here",
                         "cc -O2 -o action ")


NO_INTERPRETER = "#!/no/such/interpreter\necho '{}'\n"


@pytest.mark.parametrize("kind, named", [
    ("script", "{path}"), ("binary", "{path}"), ("zip", "{path}:exec"),
    ("directory", "{path}/exec")])
def test_invoke_names_the_users_file_not_the_copy_it_installed(tmp_path, kind, named):
    path = tmp_path / {"script": "broken.sh", "binary": "broken", "zip": "broken.zip",
                       "directory": "broken"}[kind]
    if kind == "script":
        path.write_text(NO_INTERPRETER)
    elif kind == "binary":
        path.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\0\xff\xff")
    elif kind == "zip":
        path.write_bytes(zip_bytes({"exec": NO_INTERPRETER}))
    else:
        path.mkdir()
        (path / "exec").write_text(NO_INTERPRETER)
        (path / "exec").chmod(0o755)
    result = cli("invoke", path)
    assert result.returncode == 2, result
    name = named.format(path=path)
    assert ("owproxy: %s names /no/such/interpreter as its interpreter" % name
            if kind != "binary" else "owproxy: %s is an ELF binary for another machine" % name) \
        in result.stderr, result.stderr
    assert "owproxy-invoke-" not in result.stderr, result.stderr


def test_invoke_names_a_python_file_as_the_user_wrote_it(tmp_path):
    source = tmp_path / "broken.py"
    source.write_text("def main(args)\n    return {}\n")
    result = cli("invoke", source)
    assert result.returncode == 2, result
    assert 'File "%s", line 1' % source in result.stderr, result.stderr
    assert "owproxy: %s failed to load: SyntaxError" % source in result.stderr
    assert "__main__.py" not in result.stderr


def test_invoke_a_directory_with_a_broken_link_is_a_one_line_error(tmp_path):
    folder = tmp_path / "action"
    folder.mkdir()
    (folder / "exec").write_text(bash("echo '{}'"))
    (folder / "exec").chmod(0o755)
    (folder / "dangling").symlink_to(tmp_path / "nowhere")
    result = cli("invoke", folder)
    check_one_line_error(result, "owproxy: cannot read %s" % (folder / "dangling"))


def test_invoke_help_shows_the_defaults():
    text = cli("invoke", "--help", env={"COLUMNS": "100"}).stdout
    for default in ("(default: 60)", "(default: main)", "(default: 1)", "(default: the file's)"):
        assert default in text, text


ECHO_ARGS = '''
import os

def main(args):
    names = ("A", "B", "C", "__OW_ACTION_NAME")
    return dict(args, env={name: os.environ.get(name) for name in names})
'''


def test_invoke_takes_parameters_from_a_file_stdin_json_and_pairs_and_init_env(tmp_path):
    action = tmp_path / "echo.py"
    action.write_text(ECHO_ARGS)
    params = tmp_path / "params.json"
    params.write_text('{"a": 1, "b": 2}')
    env_file = tmp_path / "action.env"
    env_file.write_text("# settings\nA=1\n\nB=two words\n")
    result = cli("invoke", action, '{"b": 3}', "-P", params, "-p", "c", "4",
                 "--env-file", env_file, "-e", "C", "x=y", "--name", "mine")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"a": 1, "b": 3, "c": 4, "env": {
        "A": "1", "B": "two words", "C": "x=y", "__OW_ACTION_NAME": "/guest/mine"}}
    piped = subprocess.run(proxy_command("invoke", str(action), "-P", "-"), env=proxy_env(),
                           input='{"from": "stdin"}', capture_output=True, text=True,
                           timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["from"] == "stdin"


@pytest.mark.parametrize("args, message", [
    (["-P", "/no/such.json"], "owproxy: cannot read the parameters file /no/such.json"),
    (["-P", str(EXAMPLES / "hello.sh")], "is not JSON"),
    (["--env-file", str(EXAMPLES / "hello.sh")], "hello.sh line 5: not KEY=VALUE"),
])
def test_bad_parameter_or_env_files_are_one_line_errors(args, message):
    check_one_line_error(cli("invoke", EXAMPLES / "hello.sh", *args), message)


def test_invoke_ignores_the_callers_proxy_settings():
    env = {"__OW_RUNTIME_PLATFORM": "knative", "OWPROXY_VERBOSE": "1", "OWPROXY_LOOP": "1",
           "__OW_HTTP_METHODS": "[GET]"}
    result = cli("invoke", EXAMPLES / "hello.sh", "-p", "name", "Ada", env=env)
    assert_invoked(result, {"greeting": "Hello, Ada!"}, ["this line goes to stderr"])
    assert "HTTP/1.1\"" not in result.stderr  # no access log
    assert "serving" not in result.stderr  # no banner


def test_invoke_exits_1_on_an_application_error(tmp_path):
    action = tmp_path / "fails.py"
    action.write_text("def main(args):\n    raise RuntimeError('no such user')\n")
    result = cli("invoke", action)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"error": "no such user"}
    assert "RuntimeError: no such user" in result.stderr


@pytest.mark.parametrize("code, args, message", [
    (NOT_JSON, [], "owproxy: /run answered 502: The action did not return a dictionary or array."),
    (bash("sleep 30"), ["--timeout", "1"], "owproxy: /run answered 502: The action exceeded its time limit"),
    ("def main(args)\n", [], "owproxy: /init answered 502: The action failed to generate"),
])
def test_invoke_exits_2_on_a_developer_error(tmp_path, code, args, message):
    action = tmp_path / "action"
    action.write_text(code)
    result = cli("invoke", action, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr


SECOND_RUN_FAILS = '''
calls = 0

def main(args):
    global calls
    calls += 1
    if calls == 2:
        return {"error": "boom"}
    return {"calls": calls}
'''


def test_invoke_repeat_exits_1_when_any_run_was_an_application_error(tmp_path):
    action = tmp_path / "flaky.py"
    action.write_text(SECOND_RUN_FAILS)
    result = cli("invoke", action, "--repeat", "3")
    assert result.returncode == 1, result
    assert json.loads(result.stdout) == {"calls": 3}  # the last run's, after the error
    assert "owproxy: /run answered an application error: boom\n" in result.stderr
    assert [line.split()[1:3] for line in result.stderr.splitlines()
            if " took " in line] == [["run", "1"], ["run", "2"], ["run", "3"]]
    assert "Traceback" not in result.stderr


def test_invoke_repeat_0_is_a_usage_error():
    result = cli("invoke", "--repeat", "0", EXAMPLES / "hello.sh")
    assert (result.returncode, result.stdout) == (2, "")
    check_one_line_error(result, "owproxy: --repeat 0: not a positive whole number")


ACTIVATION_ID = bash('echo "id $__OW_ACTIVATION_ID"; echo oops >&2; echo \'{"error": "no"}\'')


def test_invoke_activation_prints_the_activation_record(tmp_path):
    action = tmp_path / "fails"
    action.write_text(ACTIVATION_ID)
    result = cli("invoke", action, "--activation")
    assert result.returncode == 1
    record = json.loads(result.stdout)
    assert record["activationId"] in result.stderr
    assert record["name"] == "fails" and record["namespace"] == "guest"
    assert record["duration"] == record["end"] - record["start"] >= 0
    assert record["statusCode"] == 1
    assert record["response"] == {"status": "application error", "statusCode": 1,
                                  "success": False, "result": {"error": "no"}}
    assert sorted(line.split(" ", 1)[1] for line in record["logs"]) == [
        "stderr: oops", "stdout: id " + record["activationId"]]  # two pipes: no set order
    assert all(line.split(" ", 1)[0].endswith("Z") for line in record["logs"])


LIVE_ORDER = '''
import os, sys, time

def main(args):
    print("out-1", flush=True)
    while not os.path.exists(args["go"]):  # the test's word that it saw out-1
        time.sleep(0.02)
    print("err-1", file=sys.stderr, flush=True)
    time.sleep(0.2)
    print("out-2", flush=True)
    time.sleep(0.2)
    print("err-2", file=sys.stderr, flush=True)
    return {"done": True}
'''


class LineWatcher:
    """A process's stderr read line by line as it comes, on a thread."""

    def __init__(self, process):
        self.lines, self.process = [], process
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text, timeout=30):
        return wait_for(lambda: any(text in line for line in self.lines), timeout)


def start_cli(*args, **options):
    return subprocess.Popen(proxy_command(*[str(arg) for arg in args]), env=proxy_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


def test_invoke_streams_the_logs_live_in_their_order_then_the_result(tmp_path):
    action = tmp_path / "order.py"
    action.write_text(LIVE_ORDER)
    go = tmp_path / "go"
    process = start_cli("invoke", action, "-p", "go", go)
    watcher = LineWatcher(process)
    try:
        assert watcher.saw("out-1"), watcher.lines  # while the action still waits
        go.touch()
        out = process.stdout.read()
        assert process.wait(60) == 0
    finally:
        process.kill()
    watcher.thread.join(10)
    assert json.loads(out) == {"done": True}
    assert [line for line in watcher.lines if line[:4] in ("out-", "err-")] == [
        "out-1", "err-1", "out-2", "err-2"]  # on a pipe: no marks
    assert watcher.lines[-1].startswith("owproxy: run took ")
    assert SENTINEL not in "".join(watcher.lines)


def test_invoke_marks_each_stream_on_a_terminal():
    import pty
    master, slave = pty.openpty()
    try:
        completed = subprocess.run(proxy_command("invoke", str(EXAMPLES / "hello.sh")),
                                   env=proxy_env(), stdout=subprocess.PIPE, stderr=slave,
                                   timeout=60)
        os.close(slave)
        slave = None
        shown = b""
        with contextlib.suppress(OSError):  # EIO once everything is read
            while True:
                shown += os.read(master, 65536)
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)
    assert completed.returncode == 0
    text = shown.decode()
    assert "out|\x1b[0m greeting stranger for activation" in text, text
    assert "err|\x1b[0m this line goes to stderr" in text, text


SLOW_ACTION = bash('echo "pid $$" >&2; sleep 120; echo "{}"')


@pytest.mark.parametrize("to_group", [True, False], ids=["process-group", "invoke-alone"])
def test_ctrl_c_stops_invoke_and_its_action_at_once_with_one_clear_line(tmp_path, to_group):
    action = tmp_path / "slow"
    action.write_text(SLOW_ACTION)
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so.
    process = start_cli("invoke", action, start_new_session=True,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watcher = LineWatcher(process)
    try:
        assert watcher.saw("pid "), watcher.lines
        if to_group:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130  # the action would sleep 120 s
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    watcher.thread.join(10)
    text = "\n".join(watcher.lines)
    assert "owproxy: interrupted" in text and "Traceback" not in text, text
    assert "KeyboardInterrupt" not in text, text
    action_pid = int(next(line for line in watcher.lines if line.startswith("pid ")).split()[1])
    assert gone_or_zombie(action_pid, 30)


def test_a_local_proxy_that_cannot_start_is_reported_with_its_own_stderr(tmp_path, monkeypatch):
    fails = tmp_path / "fails.py"
    fails.write_text("import sys\nsys.stderr.write('owproxy: cannot listen: no way\\n')\n"
                     "sys.exit(2)\n")
    monkeypatch.setattr(owproxy, "OWPROXY_FILE", str(fails))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(owproxy.ClientError) as raised:
        owproxy.LocalProxy(False, "action.sh")
    assert str(raised.value) == "the local proxy did not start: cannot listen: no way"
    assert os.listdir(str(tmp_path)) == ["fails.py"]  # its folder is gone


def test_a_local_proxy_takes_another_port_when_its_own_is_taken(monkeypatch):
    taken = socket.socket()  # without SO_REUSEADDR: the proxy cannot bind its port
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    reservations = [taken]
    real_reserved_port = owproxy.reserved_port
    monkeypatch.setattr(owproxy, "reserved_port", lambda: reservations.pop() if reservations
                        else real_reserved_port())
    proxy = owproxy.LocalProxy(False, "action.sh")
    try:
        assert not reservations and proxy.port != port
        assert proxy.post("/run", {"value": {}}, 30) == (502, {
            "error": "The action failed to locate a binary. See logs for details."})
    finally:
        proxy.close()


def test_init_and_run_a_running_container(proxy):
    url = "http://127.0.0.1:%d" % proxy.port
    init = cli("init", "--url", url, EXAMPLES / "hello.py")
    assert (init.returncode, json.loads(init.stdout)) == (0, {"ok": True})
    run = cli("run", "--url", url, "-p", "name", "Cy")
    assert run.returncode == 0
    assert json.loads(run.stdout) == {"greeting": "Hello, Cy!", "greeted_so_far": 1}
    again = cli("init", "--url", url, EXAMPLES / "hello.py")
    assert again.returncode == 2, again
    assert again.stderr == ("owproxy: /init answered 403: Cannot initialize the action more "
                            "than once. (to replace the action, start the proxy with "
                            "--allow-reinit (PROXY_ALLOW_REINIT=1), for local development "
                            "only)\n"), again.stderr


@pytest.mark.parametrize("args, message", [
    (["invoke", "/no/such/action"], "owproxy: cannot read the action /no/such/action"),
    (["invoke", str(EXAMPLES / "hello.sh"), "{not json"], "owproxy: the parameters are not JSON"),
    (["run", "--url", "127.0.0.1:1"], "owproxy: cannot reach 127.0.0.1:1"),
    (["run", "--url", "localhost:99999"],
     "owproxy: 'localhost:99999' is not the URL of an action container: Port out of range"),
    (["run", "--url", "https://localhost:8080"],
     "owproxy: 'https://localhost:8080' is not the URL of an action container"),
])
def test_client_errors_are_one_line_and_exit_2(args, message):
    result = cli(*args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1


@contextlib.contextmanager
def garbage_server():
    """A TCP port that answers every request with a line that is not HTTP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.05)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:  # a timeout: look at done again
                continue
            with connection:
                connection.settimeout(5)
                try:
                    connection.recv(65536)
                    connection.sendall(b"garbage\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1:%d" % listener.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        listener.close()


def test_run_against_a_port_that_answers_garbage_is_a_one_line_error():
    with garbage_server() as url:
        result = cli("run", "--url", url)
    check_one_line_error(result, "owproxy: cannot reach %s" % url)
    assert result.stderr.startswith("owproxy: cannot reach %s" % url)



def test_invoke_a_directory_sends_what_its_links_point_to(tmp_path):
    """As zip -r does: a link to a file outside the directory is sent as that file
    (a link kept as a link would point outside the action directory)."""
    outside = tmp_path / "shared.txt"
    outside.write_text("from outside")
    folder = tmp_path / "action"
    folder.mkdir()
    (folder / "exec").write_text(bash('printf \'{"text": "%s"}\\n\' "$(cat data.txt)"'))
    (folder / "exec").chmod(0o755)
    (folder / "data.txt").symlink_to(outside)
    result = cli("invoke", folder)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"text": "from outside"}
    sent = owproxy.action_init(str(folder), "main")
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(sent["code"]))) as archive:
        entry = archive.getinfo("data.txt")
        assert stat.S_ISREG(entry.external_attr >> 16) and archive.read(entry) == b"from outside"


def yaml_scalar(text):
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    text = text.split(" #")[0].strip()
    if text in ("{}", "[]"):
        return json.loads(text)
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.lstrip("-").isdigit() else text


class YamlReader:
    KEY = __import__("re").compile(r"^([A-Za-z_][\w.-]*):(?:\s+(.*))?$")

    def __init__(self, lines):
        self.lines, self.at = list(lines), 0

    def peek(self):
        """(indent, text) of the next line that holds something."""
        while self.at < len(self.lines):
            text = self.lines[self.at].strip()
            if text and not text.startswith("#"):
                return len(self.lines[self.at]) - len(self.lines[self.at].lstrip()), text
            self.at += 1
        return None

    def block(self, indent):
        return self.sequence(indent) if self.peek()[1].startswith("- ") else self.mapping(indent)

    def mapping(self, indent):
        result = {}
        while self.peek() and self.peek()[0] == indent and self.KEY.match(self.peek()[1]):
            key, rest = self.KEY.match(self.peek()[1]).groups()
            self.at += 1
            nested = self.peek()
            if rest == "|":
                result[key] = self.literal(indent)
            elif rest:
                result[key] = yaml_scalar(rest)
            elif nested and (nested[0] > indent or nested[1].startswith("- ")
                             and nested[0] == indent):
                result[key] = self.block(nested[0])
            else:
                result[key] = None
        return result

    def sequence(self, indent):
        items = []
        while self.peek() and self.peek()[0] == indent and self.peek()[1].startswith("- "):
            line = self.lines[self.at]
            self.lines[self.at] = line[:indent] + " " + line[indent + 1:]  # the item's block
            content = self.peek()[1]
            if self.KEY.match(content):
                items.append(self.mapping(indent + 2))
            else:
                self.at += 1
                items.append(yaml_scalar(content))
        return items

    def literal(self, indent):
        lines = []
        while self.at < len(self.lines) and (not self.lines[self.at].strip() or len(
                self.lines[self.at]) - len(self.lines[self.at].lstrip()) > indent):
            lines.append(self.lines[self.at])
            self.at += 1
        margin = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        return "\n".join(line[margin:] for line in lines).rstrip("\n") + "\n"



def yaml_documents(text):
    """The documents of a YAML file written in the block subset the examples use:
    mappings, sequences, plain and quoted scalars, ``|`` blocks and ``{}``."""
    import re
    documents = []
    for part in re.split(r"(?m)^---[ \t]*$", text):
        reader = YamlReader(part.splitlines())
        if reader.peek():
            documents.append(reader.block(reader.peek()[0]))
    return documents


def healthchecks():
    """The health-check command of every file that has one: {file: shell command}."""
    found = {}
    for path in DOCKERFILES + [HERE / "README.md"]:
        for line in dockerfile_lines(path):
            if line.startswith("HEALTHCHECK"):
                found[str(path.relative_to(HERE))] = line.split(" CMD ", 1)[1]
    compose = yaml_documents((HERE / "examples" / "docker-compose.yml").read_text())[0]
    found["examples/docker-compose.yml"] = compose["services"]["action"]["healthcheck"]["test"]
    return found


def run_healthchecks(env, *args):
    """Each health check run as Docker runs it (sh -c, the container's env), this
    checkout's owproxy.py for the image's, with ``args`` added (a --pid: the test's
    proxy is not PID 1): {file: (exit status, stderr)}."""
    image_command = "python3 -S /owproxy.pyc healthcheck"
    checks = {}
    for where, command in healthchecks().items():
        assert command == image_command, (where, command)
        argv = [PYTHON, OWPROXY, "healthcheck"] + list(args)
        done = subprocess.run(argv, env=dict(proxy_env(), **env), capture_output=True,
                              timeout=60)
        checks[where] = done.returncode, done.stderr.decode()
    return checks


HOSTS = [([], "127.0.0.1"), (["--host", "127.0.0.1"], "127.0.0.1")] + (
    [(["--host", "::1"], "::1")] if IPV6 else [])


@pytest.mark.parametrize("port_env", ["FLASK_PROXY_PORT", "PORT", None])
@pytest.mark.parametrize("host_args, address", HOSTS)
def test_every_health_check_follows_the_port_and_host_the_proxy_was_given(
        proxies, port_env, host_args, address):
    """Read from the proxy's own command line and environment (PID 1's in a
    container): a --port in an image's CMD counts, and the check's own environment
    need not hold the port."""
    commands = healthchecks()
    assert sorted(commands) == ["Dockerfile", "README.md", "examples/c/Dockerfile",
                                "examples/docker-compose.yml"]
    proxy = proxies(host_args=host_args, address=address, port_env=port_env and [port_env])
    assert proxy.port != 8080
    pid = ["--pid", str(proxy.process.pid)]
    assert {code for code, err in run_healthchecks({}, *pid).values()} == {0}
    os.kill(proxy.process.pid, signal.SIGSTOP)  # listening, yet answering nothing
    try:
        checks = run_healthchecks({}, "--timeout", "0.2", *pid)
    finally:
        os.kill(proxy.process.pid, signal.SIGCONT)
    for code, err in checks.values():
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("owproxy: healthcheck: GET /healthz on %s:%d (the port from "
                              "PID %d: " % ("[%s]" % address if ":" in address
                                            else "localhost" if not host_args else address,
                                            proxy.port, proxy.process.pid)), err
        assert err.endswith("): timed out\n"), err
    proxy.stop()
    for code, err in run_healthchecks({"PORT": str(proxy.port)}, *pid).values():
        assert code == 1 and err.count("\n") == 1, err
        assert "localhost:%d (the port from this environment; no Python process at PID %d" % (
            proxy.port, proxy.process.pid) in err, err


def readme_curls(section):
    """The one-line curl commands of a README section, each with what it says comes
    back: JSON (``# {...}``) or text (``# <text>   (Content-Type: ...)``), or None."""
    text = (HERE / "README.md").read_text()
    lines = text.split("\n## " + section + "\n", 1)[1].split("\n## ", 1)[0].splitlines()
    curls = []
    for number, line in enumerate(lines):
        if line.startswith("    curl ") and line.count("'") % 2 == 0:
            command, _, inline = line.strip().partition("  # ")
            following = lines[number + 1].strip() if number + 1 < len(lines) else ""
            expected = inline or (following[2:] if following.startswith("# ") else None)
            curls.append((command.strip(), expected))
    return curls


def run_curls(curls, port):
    """Runs README curl lines against a proxy on ``port``; their outputs."""
    outputs = []
    for command, _ in curls:
        command = command.replace("localhost:8080", "127.0.0.1:%d" % port)
        result = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, command
        outputs.append(result.stdout)
    return outputs


def test_make_run_serves_the_demo_action_and_the_readme_curl_lines_work(proxies, tmp_path):
    shutil.copytree(HERE, tmp_path / "repo", ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", ".coverage*"))
    proxy = proxies(cwd=tmp_path / "repo", own_session=True, command=lambda port, action_dir: (
        ["make", "-s", "run", "PORT=%d" % port, "PYTHON=%s" % PYTHON], {}))
    response = proxy.run({"name": "Dee"})
    assert (response.status, response.json) == (200, {"greeting": "Hello, Dee!"})
    curls = (readme_curls("The two commands") + readme_curls("Your own image")
                 + readme_curls("Actions"))
    assert len([expected for _, expected in curls if expected]) >= 4
    for (command, expected), output in zip(curls, run_curls(curls, proxy.port)):
        if expected is not None:
            assert json.loads(output) == json.loads(expected), command


def test_a_second_make_run_fails_on_the_port_before_it_touches_the_demo_action(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "exec").write_text("#!/bin/sh\necho '{\"first\": \"run\"}'\n")
    with socket.socket() as first:  # the first make run, serving
        first.bind(("127.0.0.1", 0))
        first.listen(1)
        port = first.getsockname()[1]
        second = subprocess.run(["make", "-s", "run", "PORT=%d" % port, "DEMO=%s" % demo,
                                 "PYTHON=%s" % PYTHON], cwd=HERE, env=proxy_env(),
                                capture_output=True, text=True, timeout=60)
    assert second.returncode != 0 and second.stdout == "", second
    assert second.stderr.startswith(
        "make run: port %d on 127.0.0.1 is in use (another make run?); stop that, or make "
        "run PORT=N\n" % port), second.stderr
    assert "Traceback" not in second.stderr, second.stderr
    assert (demo / "exec").read_text() == "#!/bin/sh\necho '{\"first\": \"run\"}'\n"
    assert os.listdir(str(demo)) == ["exec"]


def test_make_run_listens_on_loopback_on_port_or_flask_proxy_port():
    def dry_run(*args, **env):
        return subprocess.run(["make", "-s", "-n", "run"] + list(args), cwd=HERE, timeout=30,
                              env=proxy_env(env), capture_output=True, text=True).stdout
    assert "--host 127.0.0.1 --port 8080 " in dry_run()
    assert "--host 127.0.0.1 --port 19300 " in dry_run(FLASK_PROXY_PORT="19300")
    assert "--port 19301 " in dry_run("PORT=19301", FLASK_PROXY_PORT="19300")
    assert "--port 19302 " in dry_run(PORT="19302")


def test_the_readme_knative_request_works(proxies):
    proxy = proxies(env={"__OW_RUNTIME_PLATFORM": "knative"})
    ((command, expected),) = readme_curls("Knative")
    (output,) = run_curls([(command + " -i", expected)], proxy.port)
    body, _, content_type = expected.partition("(Content-Type: ")
    assert output.endswith("\n\n" + body.strip()), output  # text mode: \r\n read as \n
    assert "Content-Type: " + content_type.rstrip(")") in output


def test_the_readme_snippets_are_the_examples_real_content():
    readme = (HERE / "README.md").read_text()
    for name in ("hello.py", "hello.sh"):
        marker = "<!-- examples/%s -->\n" % name
        assert marker in readme, name
        block = readme.split(marker, 1)[1].split("```", 2)[1].split("\n", 1)[1]
        assert block == (EXAMPLES / name).read_text(), name


def test_the_examples_that_allow_reinit_listen_on_loopback_only():
    """Re-init lets anyone who reaches the port replace the action; so does Knative's
    init in a request."""
    action = yaml_documents((EXAMPLES / "docker-compose.yml").read_text())[0]["services"][
        "action"]
    assert action["environment"]["PROXY_ALLOW_REINIT"] == "1"
    assert action["ports"] == ["127.0.0.1:8080:8080"]
    starts = [line.strip() for line in (HERE / "README.md").read_text().splitlines()
              if line.startswith("    ") and "python3 owproxy.py --" in line]
    reinit = [line for line in starts if "knative" in line or "REINIT" in line]
    assert reinit and all("--host 127.0.0.1 " in line for line in reinit), starts


def test_the_compose_file_builds_the_project_image_with_its_health_check():
    compose = (EXAMPLES / "docker-compose.yml").read_text()
    assert "context: .." in compose and "dockerfile: Dockerfile" in compose
    assert "python3 -S /owproxy.pyc healthcheck" in compose


def test_the_dockerfiles_install_packages_without_questions():
    for dockerfile in DOCKERFILES:
        stages = "\n".join(dockerfile_lines(dockerfile)).split("\nFROM ")[1:]
        assert stages
        for stage in stages:
            if "apt-get" in stage:
                before = stage[:stage.index("apt-get")]
                assert "\nARG DEBIAN_FRONTEND=noninteractive\n" in before, (dockerfile, stage)


def test_the_yaml_reader_reads_the_examples_as_a_yaml_library_would():
    text = """
# a comment
a:
  b: 1
  c: "x: y"
  list:
    - name: one
      value: 'it''s'
    - plain
  empty: {}
  code: |
    def main(args):
        return {}
flag: true
---
second: doc
"""
    assert yaml_documents(text) == [
        {"a": {"b": 1, "c": "x: y", "list": [{"name": "one", "value": "it's"}, "plain"],
               "empty": {}, "code": "def main(args):\n    return {}\n"}, "flag": True},
        {"second": "doc"}]


def container_env(container):
    return {entry["name"]: entry["value"] for entry in container.get("env", [])}


def check_reads_only_what_the_proxy_reads(env):
    """Every variable set is one owproxy.py reads."""
    source = (HERE / "owproxy.py").read_text()
    for name in env:
        assert '"%s"' % name in source, name


def check_hardened(pod, container):
    """Non-root, read-only root, and an emptyDir under every path that must be writable."""
    security = dict(pod.get("securityContext", {}), **container["securityContext"])
    assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    assert all(volume["emptyDir"] == {} for volume in mounts.values())
    assert "/tmp" in mounts
    assert container["resources"]["limits"]["memory"]
    return mounts


def test_the_knative_service_runs_a_dedicated_function_by_the_knative_contract(proxies):
    (service,) = yaml_documents((EXAMPLES / "knative" / "service.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("serving.knative.dev/v1", "Service")
    pod = service["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container)
    check_reads_only_what_the_proxy_reads(env)
    assert env["__OW_RUNTIME_PLATFORM"] == "knative" and env["__OW_ACTION_CODE"]
    assert owproxy.parse_flag(env["__OW_ALLOW_CONCURRENT"]) == (pod["containerConcurrency"] != 1)
    assert container["livenessProbe"]["httpGet"]["path"] == owproxy.LIVENESS_PATH
    assert container["readinessProbe"]["httpGet"]["path"] == owproxy.READINESS_PATH
    assert [port["containerPort"] for port in container["ports"]] == [8080]
    assert not {"FLASK_PROXY_PORT", "PORT"} & set(env)  # Knative's PORT must be the one read
    assert "/action" in check_hardened(pod, container)  # the dedicated code is written there
    # The container as Knative starts it: its env, PORT set by Knative.
    proxy = proxies(host_args=[], port_env=["PORT"], env=env)
    for path in (owproxy.LIVENESS_PATH, owproxy.READINESS_PATH):
        assert proxy.request("GET", path).status == 200
    response = proxy.request("GET", "/?name=Ada")
    assert (response.status, response.json) == (200, {"greeting": "Hello, Ada!"})


def test_the_kubernetes_deployment_serves_a_baked_action_read_only_behind_a_service(
        proxies, public_dir):
    deployment, service = yaml_documents(
        (EXAMPLES / "kubernetes" / "deployment.yaml").read_text())
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    (container,) = pod["containers"]
    env = container_env(container)
    check_reads_only_what_the_proxy_reads(env)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": int(env["FLASK_PROXY_PORT"])}
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]
    for probe, path in (("livenessProbe", owproxy.LIVENESS_PATH),
                        ("readinessProbe", owproxy.READINESS_PATH)):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    assert "/action" not in check_hardened(pod, container)  # the baked action, read-only
    assert pod["terminationGracePeriodSeconds"] > float(env["OWPROXY_GRACE"])
    # Its env, as the pod's user, on a read-only action directory that holds the action.
    baked = public_dir / "action"
    baked.mkdir()
    (baked / "exec").write_text(ECHO_RESULT)
    (baked / "exec").chmod(0o755)
    baked.chmod(0o555)
    env = dict(env, OWPROXY_ACTION_DIR=str(baked))
    del env["FLASK_PROXY_PORT"]  # a free port's instead
    proxy = proxies(host_args=[], port_env=["FLASK_PROXY_PORT"], env=env, action_dir=baked,
                    preexec_fn=as_nobody())
    assert proxy.init().status == 200
    check_a_run_still_works(proxy)


# ---------------------------------------------------------------------------
# CLI: main(), --compile, start-up checks, deferred modules and cold starts
# ---------------------------------------------------------------------------

def test_help_names_the_commands_and_version_matches_the_server_header(proxy):
    completed = cli("--help", env={"COLUMNS": "100"})
    assert completed.returncode == 0, completed
    for command in ("owproxy.py invoke ACTION", "owproxy.py init", "owproxy.py run"):
        assert command in completed.stdout
    version = cli("--version")
    assert (version.returncode, version.stdout) == (0, "owproxy %s\n" % owproxy.__version__)
    assert proxy.init(ECHO_RESULT).headers["Server"] == "owproxy/" + owproxy.__version__


@pytest.mark.parametrize("args, message", [
    (["invok", "x"], "owproxy: 'invok' is not a command; did you mean invoke? (see "),
    (["serve"], "owproxy: 'serve' is not a command; the commands are invoke, init, run"),
    (["--port", "99999"], "owproxy: --port 99999: not a port number (0-65535)"),
    (["--platform", "lambda"], "owproxy: --platform lambda: not a platform (use openwhisk or knative)"),
    (["--grace", "soon"], "owproxy: --grace soon: not a number of seconds"),
    (["--max-body", "lots"], "owproxy: --max-body lots: not a positive size"),
    (["--bogus"], "owproxy: unrecognized arguments: --bogus (see owproxy.py --help)"),
    (["--action-dir", str(HERE / "README.md")], "owproxy: the action directory %s is not a directory"
     % (HERE / "README.md")),
    (["invoke", "--timeout", "-1", "x"], "owproxy: --timeout -1: not a time limit in seconds"),
    (["invoke", "--timeout", "0", "x"], "owproxy: --timeout 0: not a time limit in seconds"),
    (["invoke", "--timeout", "0.001", "x"], "owproxy: --timeout 0.001: not a time limit"),
    (["invoke", "x", "-p", "name"],
     "owproxy: -p/--param: expected 2 arguments: write -p KEY VALUE, e.g. -p name Ada"),
    (["invoke", "x", "-p", "name=Ada"], "owproxy: -p name=Ada: write -p KEY VALUE, e.g. -p name Ada"),
    (["invoke", "-p", "name=Ada", "x"], "owproxy: -p name=Ada: write -p KEY VALUE, e.g. -p name Ada"),
    (["run", "--param", "a=b=c"], "owproxy: --param a=b=c: write -p KEY VALUE, e.g. -p a b=c"),
    (["invoke", str(EXAMPLES)], "owproxy: the directory %s has no exec or __main__.py" % EXAMPLES),    (["init", "--url", "127.0.0.1:1", str(EXAMPLES / "hello.sh")],
     "owproxy: cannot reach 127.0.0.1:1: [Errno 111] Connection refused (is an action "
     "container, or make run, serving there?)"),
])
def test_command_line_mistakes_are_one_line_errors_without_internal_names(args, message):
    completed = cli(*args)
    check_one_line_error(completed, message)
    assert "parse_" not in completed.stderr and "usage:" not in completed.stderr


def test_a_missing_action_dir_is_a_one_line_error_and_exit_2(tmp_path):
    missing = tmp_path / "no-such-dir"
    completed = cli("--host", "127.0.0.1", "--port", str(free_port()),
                    "--action-dir", str(missing))
    check_one_line_error(completed, str(missing))


NEXT_STEPS = (": serve one with --action-dir DIR, try the demo with `make run`, or run an "
              "action once with `python3 owproxy.py invoke FILE`\n")


def test_a_bare_start_without_an_action_dir_says_what_to_do_next(tmp_path):
    """A workstation has no /action: the error leads on to the three ways to start."""
    missing = tmp_path / "no-such-dir"
    completed = cli("--action-dir", str(missing))
    check_one_line_error(completed)
    assert completed.stderr == "owproxy: the action directory %s does not exist%s" % (
        missing, NEXT_STEPS)
    if os.path.exists("/action"):  # a bare start would serve it on 8080
        pytest.skip("/action exists here; the start without arguments is not tried")
    bare = cli()
    assert (bare.returncode, bare.stderr) == (
        2, "owproxy: the action directory /action does not exist" + NEXT_STEPS)


def test_the_proxy_works_as_an_unprivileged_user(proxies, public_dir):
    action_dir = public_dir / "action"
    action_dir.mkdir()
    if os.geteuid() == 0:
        os.chown(str(action_dir), NOBODY, NOBODY)
    proxy = proxies(action_dir=action_dir, preexec_fn=as_nobody())
    code = python_script("""
import json, os
print(json.dumps({"uid": os.getuid(), "euid": os.geteuid()}))
""")
    assert proxy.init(code).status == 200
    response = proxy.run()
    expected = NOBODY if os.geteuid() == 0 else os.geteuid()
    assert (response.status, response.json) == (200, {"uid": expected, "euid": expected})
    assert (action_dir / "exec").stat().st_uid == expected
    check_streams(proxy)


def test_compile_without_a_compiler_zips_the_code_as_init_would_install_it(proxies):
    tree = make_zip({"exec": ECHO_BASH, "lib/data.txt": "data", "link": ("->", "lib/data.txt")})
    done = subprocess.run(proxy_command("--compile"), input=base64.b64decode(tree),
                          env=proxy_env(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    proxy = proxies()
    assert proxy.init(base64.b64encode(done.stdout).decode(), binary=True).status == 200
    assert os.readlink(proxy.action_dir / "link") == "lib/data.txt"
    assert proxy.run({"b": 2}).json == {"b": 2}


def test_compile_reports_a_failure_with_exit_status_1(tmp_path):
    env = proxy_env({"OW_COMPILER": compiler_file(tmp_path, BAD_COMPILERS["warns"][0])})
    done = subprocess.run(proxy_command("--compile", "main"), input=PY_SOURCE.encode(),
                          env=env, capture_output=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, b"")
    assert b"warning: this compiler always complains" in done.stderr
    corrupt = subprocess.run(proxy_command("-compile", "main"), input=b"PK\x03\x04broken",
                             env=proxy_env(), capture_output=True, timeout=60)
    assert corrupt.returncode == 1 and b"the code is not a zip archive" in corrupt.stderr
    usage = subprocess.run(proxy_command("--compile", "main", "extra"), input=b"",
                           env=proxy_env(), capture_output=True, timeout=60)
    assert (usage.returncode, usage.stdout) == (2, b"") and b"usage:" in usage.stderr


def test_compile_leaves_nothing_behind_and_explains_itself(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    compiled = subprocess.run(proxy_command("--compile", "main"), input=ECHO_RESULT.encode(),
                              env=proxy_env({"TMPDIR": str(scratch)}), capture_output=True,
                              timeout=60)
    assert compiled.returncode == 0, compiled.stderr
    assert zipfile.ZipFile(io.BytesIO(compiled.stdout)).namelist() == ["exec"]
    assert os.listdir(str(scratch)) == []
    usage = cli("--compile", "--help")
    assert usage.returncode == 0 and "usage: owproxy.py --compile [MAIN]" in usage.stdout
    assert "--compile [MAIN]" in cli("--help").stdout


@pytest.mark.parametrize("spelling", ["--compile", "-compile"])
def test_compile_takes_the_proxy_s_flags_before_it(tmp_path, spelling):
    compiler = tmp_path / "compile"
    compiler.write_text("#!/bin/sh\nprintf '#!/bin/sh\\necho compiled\\n' > \"$3/exec\"\n"
                        "chmod +x \"$3/exec\"\n")
    compiler.chmod(0o755)
    compiled = subprocess.run(
        proxy_command("--loop", "--compiler", str(compiler), spelling, "main"),
        input=b"def main(args):\n    return {}\n", env=proxy_env(), capture_output=True,
        timeout=60)
    assert compiled.returncode == 0, compiled.stderr
    archive = zipfile.ZipFile(io.BytesIO(compiled.stdout))
    assert archive.read("exec") == b"#!/bin/sh\necho compiled\n"


MINIMAL_PYTHON = """
import sys

LACKING = {"socketserver", "http", "shutil", "uuid"}  # as Debian's python3-minimal lacks them


class Lacking:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in LACKING:
            raise ModuleNotFoundError("No module named %r" % name, name=name)


for name in list(sys.modules):  # what site imported before this ran
    if name.partition(".")[0] in LACKING:
        del sys.modules[name]
sys.meta_path.insert(0, Lacking())
"""


@pytest.mark.parametrize("args", [[], ["function-worker"], ["run", "--url", "127.0.0.1:1"]])
def test_an_incomplete_python_is_a_one_line_error_naming_what_to_install(tmp_path, args):
    shadow = tmp_path / "site"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(MINIMAL_PYTHON)
    completed = cli(*args, env={"PYTHONPATH": str(shadow)})
    check_one_line_error(
        completed, "owproxy: needs the standard modules http, shutil, socketserver, uuid, "
        "which %s lacks: install the whole Python (on Debian and Ubuntu the package python3, "
        "not python3-minimal)\n" % PYTHON)


def test_the_incomplete_python_check_knows_every_module_the_proxy_imports():
    import ast
    tree = ast.parse((HERE / "owproxy.py").read_text())
    imported = {alias.name.partition(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.partition(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported - {"sys"} == set(owproxy.STANDARD_MODULES)


def old_pythons():
    """The pyenv interpreters older than 3.8 on this machine."""
    def run(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        except OSError:
            return ""

    found = []
    for version in run("pyenv", "versions", "--bare").split():
        major, _, minor = version.partition(".")[0], None, version.split(".")[1:2]
        if major == "3" and minor and minor[0].isdigit() and int(minor[0]) < 8:
            prefix = run("pyenv", "prefix", version).strip()
            found.append(os.path.join(prefix, "bin", "python3.%s" % minor[0]))
    return [path for path in found if os.access(path, os.X_OK)]


@pytest.mark.skipif(not old_pythons(), reason="no Python older than 3.8 in pyenv here")
@pytest.mark.parametrize("python", old_pythons() or ["none"])
def test_a_python_older_than_3_8_is_a_one_line_error(tmp_path, python):
    completed = subprocess.run([python, OWPROXY, "--action-dir", str(tmp_path)],
                               env=proxy_env(), capture_output=True, text=True, timeout=60)
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    check_one_line_error(completed, "owproxy: needs Python 3.8 or newer, not %s\n" % version)


def test_a_start_without_arguments_imports_neither_ssl_nor_argparse_yet_both_work():
    probe = ("import sys; sys.path.insert(0, %r); import owproxy; "
             "owproxy.resolve_settings([], {'OWPROXY_ACTION_DIR': %r}); "
             "print('ssl' in sys.modules, 'argparse' in sys.modules); "
             "from http import client; print(hasattr(client, 'HTTPSConnection')); "
             "import urllib.request; print(hasattr(urllib.request, 'HTTPSHandler'))"
             % (str(HERE), str(HERE)))
    result = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["False", "False", "True", "True"], result


# How the standard library itself uses each module the proxy defers, each true.
DEFERRED_USES = {
    "calendar": "calendar.timegm((2020, 1, 1, 0, 0, 0)) == 1577836800",
    "copy": "copy.deepcopy({'a': [1]}) == {'a': [1]}",
    "datetime": "email.utils.format_datetime(datetime.datetime(2020, 1, 2, "
                "tzinfo=datetime.timezone.utc)) == 'Thu, 02 Jan 2020 00:00:00 +0000'",
    "email.parser": "http.client.parse_headers(io.BytesIO(b'A: b\\r\\n\\r\\n'))['A'] == 'b'",
    "html": "html.escape('<') + html.unescape('&eacute;') == '&lt;\\xe9'",
    "ipaddress": "urllib.parse.urlsplit('http://[::1]:8/').hostname == '::1' "
                 "and ipaddress.ip_address('::1').version == 6",
    "locale": "isinstance(locale.getpreferredencoding(False), str)",
    "mimetypes": "mimetypes.guess_type('a.json')[0] == 'application/json'",
    "random": "email.utils.make_msgid(domain='x').endswith('@x>') and 0 <= random.random() < 1",
    "shutil": "shutil.which('sh') is not None",
}


# Python 3.8's http.server reads mimetypes' tables as it is imported.
PROXY_PYTHON_VERSION = tuple(json.loads(subprocess.run(
    [PYTHON, "-c", "import sys; print(list(sys.version_info[:2]))"], capture_output=True,
    check=True, timeout=60).stdout))


USED_AT_IMPORT = {"mimetypes"} if PROXY_PYTHON_VERSION < (3, 9) else set()


# The proxy run as its own __main__ by a script that, on SIGUSR1, uses the module
# USE_MODULE names (DEFERRED_USES), says whether every holder of it holds the same
# ordinary module, and at exit says which deferred modules were never loaded.
DEFERRED_PROBE = """
import sys
# What the interpreter's own start loaded (coverage's, in the coverage pass) is
# no longer the proxy's to defer.
PRELOADED = set(sys.modules)
import json, os, signal

USES = json.loads(os.environ["DEFERRED_USES"])


def use(signum, frame):
    import email.utils, http.client, importlib, io, urllib.parse
    name = os.environ["USE_MODULE"]
    deferred = type(sys.modules.get(name)).__name__ == "DeferredModule"
    module = importlib.import_module(name)
    top = name.partition(".")[0]
    used = eval(USES[name], {top: sys.modules[top], "email": email, "http": http, "io": io,
                             "urllib": urllib})
    holders = [vars(other).get(name.rpartition(".")[2]) for other in list(sys.modules.values())
               if other is not None]
    same = all(holder is module for holder in holders
               if isinstance(holder, type(sys)) and holder.__name__ == name)
    sys.stderr.write("used %s: deferred %s, %s, %s, one module: %s\\n"
                     % (name, deferred, used, type(module) is type(sys), same))
    sys.stderr.flush()


def unloaded():
    sys.stderr.write("preloaded: %s\\n" % " ".join(sorted(set(USES) & PRELOADED)))
    sys.stderr.write("never loaded: %s\\n" % " ".join(sorted(
        name for name in USES if type(sys.modules.get(name)).__name__ == "DeferredModule")))


signal.signal(signal.SIGUSR1, use)
import atexit
atexit.register(unloaded)
path = sys.argv[0] = os.environ["PROBED_PROXY"]
with open(path) as source:
    code = compile(source.read(), path, "exec")
exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
"""


def probed_proxy(proxies, tmp_path, use=""):
    probe = tmp_path / "probe.py"
    probe.write_text(DEFERRED_PROBE)
    env = {"PROBED_PROXY": OWPROXY, "USE_MODULE": use, "DEFERRED_USES": json.dumps(DEFERRED_USES)}
    return proxies(command=lambda port, action_dir: ([PYTHON, str(probe)], dict(
        env, OWPROXY_HOST="127.0.0.1", FLASK_PROXY_PORT=str(port),
        OWPROXY_ACTION_DIR=action_dir)))  # no arguments, as an image starts it


def deferred_report(proxy):
    """The probe's last words: the deferred modules never loaded, and those the
    interpreter had loaded before the proxy's code ran."""
    err = proxy.logs()[1]
    words = lambda label: err.split(label)[1].split("\n")[0].split()
    return words("never loaded: "), set(words("preloaded: "))


def test_a_start_and_runs_of_a_baked_action_load_none_of_the_deferred_modules(proxies,
                                                                           tmp_path):
    assert sorted(DEFERRED_USES) == sorted(owproxy.DEFERRED_MODULES)
    proxy = probed_proxy(proxies, tmp_path)
    (proxy.action_dir / "exec").write_text(ECHO_RESULT)  # baked into the image
    (proxy.action_dir / "exec").chmod(0o755)
    assert proxy.post("/init", {}).status == 200
    assert proxy.run().json == {"ok": "run"}
    assert proxy.request("GET", "/healthz").status == 200
    assert proxy.stop() == 0
    never, preloaded = deferred_report(proxy)
    assert never == sorted(set(owproxy.DEFERRED_MODULES) - USED_AT_IMPORT - preloaded)


@pytest.mark.parametrize("name", owproxy.DEFERRED_MODULES)
def test_a_deferred_module_loads_on_first_use_and_the_proxy_works_after(proxies, tmp_path,
                                                                         name):
    proxy = probed_proxy(proxies, tmp_path, use=name)
    proxy.process.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: "used " in proxy.logs()[1])
    assert proxy.init_zip({"exec": ECHO_RESULT}).status == 200
    assert proxy.run().json == {"ok": "run"}
    assert proxy.stop() == 0
    never, preloaded = deferred_report(proxy)
    deferred = name not in USED_AT_IMPORT and name not in preloaded
    assert ("used %s: deferred %s, True, True, one module: True\n" % (name, deferred)
            in proxy.logs()[1]), proxy.logs()
    assert name not in never


FUNCTION_FAILING = """
def main(args):
    if args.get("fail"):
        raise ValueError("boom")
    return {"ok": "function"}
"""



def test_the_readme_dockerfile_is_the_projects_with_an_action_in_place_of_the_stub():
    readme = (HERE / "README.md").read_text()
    copied = readme.split("\n## Your own image\n", 1)[1].split("```dockerfile\n", 1)[1]
    project = (HERE / "Dockerfile").read_text()
    project = ("FROM" + project.split("\nFROM", 1)[1]).splitlines()
    stub = [number for number, line in enumerate(project) if "stub" in line]
    assert len(stub) == 2 and stub[1] == stub[0] + 1, project  # its comment and its RUN
    action = ["# Your action: an executable called exec (or a __main__.py with a main(args)).",
              "COPY my-action /action/exec"]
    assert copied.split("```", 1)[0].splitlines() == (
        project[:stub[0]] + action + project[stub[1] + 1:])


def test_the_images_start_from_bytecode_compiled_at_build_time_without_site(proxies, tmp_path):
    """The Dockerfiles' compile step, run here, then the proxy started as their CMD
    says, without site, and its Python function worker, with site, from the .pyc
    alone (the source is gone)."""
    for dockerfile in DOCKERFILES:
        lines = dockerfile_lines(dockerfile)
        assert COMPILE_STEP in lines and lines[-1] == "CMD " + json.dumps(IMAGE_START)
        assert lines.index("COPY owproxy.py /owproxy.py") < lines.index(COMPILE_STEP)
    image = tmp_path / "image"
    image.mkdir()
    shutil.copy(OWPROXY, str(image / "owproxy.py"))
    step = COMPILE_STEP[len("RUN "):].replace("/owproxy.py", str(image / "owproxy.py"))
    subprocess.run([PYTHON] + step.split()[1:], check=True)
    (image / "owproxy.py").unlink()
    start = [PYTHON] + IMAGE_START[1:-1] + [str(image / "owproxy.pyc")]
    proxy = proxies(command=lambda port, action_dir: (
        start + ["--host", "127.0.0.1", "--port", str(port), "--action-dir", action_dir], {}))
    reporting_site = FUNCTION_FAILING.replace(
        'return {"ok": "function"}',
        'import sys\n    return {"ok": "function", "no_site": sys.flags.no_site}')
    assert proxy.init(reporting_site).status == 200
    with open("/proc/%d/cmdline" % proxy.process.pid, "rb") as cmdline:
        assert cmdline.read().split(b"\0")[1] == b"-S"
    response = proxy.run()
    assert (response.status, response.json) == (200, {"ok": "function", "no_site": 0})
    response = proxy.run({"fail": True})
    assert (response.status, response.json) == (200, {"error": "boom"})
    err = proxy.logs()[1]
    assert "__main__.py\", line 4, in main" in err and "ValueError: boom" in err, err
    assert "owproxy.py" not in err, err  # the proxy's own frames stay out, from a .pyc too
    assert proxy.stop() == 0


def module_map_titles(docstring):
    """The map's titles, in order: ``N. title`` for a section, ``-- title`` for a
    family under it (a title ends where two spaces or the line do)."""
    import re
    return [("%s. %s" % found[:2]) if found[0] else "-- " + found[2]
            for found in re.findall(r"^ ?(?:(\d+)\. (\S.*?)|    -- (\S.*?))(?:  |$)",
                                    docstring, re.MULTILINE)]



def test_the_module_map_names_every_banner_in_order():
    import ast
    import re
    source = (HERE / "owproxy.py").read_text()
    banners = ["%s. %s" % found[:2] if found[0] else "-- " + found[2]
               for found in re.findall(r"^# (?:(\d+)\. (.+)|-- (.+?) -+)$", source, re.MULTILINE)]
    mapped = module_map_titles(ast.get_docstring(ast.parse(source)))
    assert len(banners) > 20 and mapped == banners



def test_the_module_map_reader_sees_a_missing_family():
    doc = " 1. Configuration\n    -- Settings    each a flag\n 2. Logs        streams\n"
    assert module_map_titles(doc) == ["1. Configuration", "-- Settings", "2. Logs"]
    assert module_map_titles(doc.replace("    -- Settings    each a flag\n", "")) != [
        "1. Configuration", "-- Settings", "2. Logs"]



def top_level_statements(source):
    """Each top-level statement of ``source``: the names it defines, and the
    module's names it uses, in its own code or in any function or class in it
    (a name a function binds for itself is its own, not the module's)."""
    import ast
    import symtable
    import textwrap
    lines = source.splitlines(keepends=True)
    statements = []
    for node in ast.parse(source).body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        table = symtable.symtable(textwrap.dedent("".join(lines[first - 1:node.end_lineno])),
                                  "owproxy.py", "exec")
        defined = {symbol.get_name() for symbol in table.get_symbols()
                   if symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace()}
        used = {symbol.get_name() for symbol in table.get_symbols() if symbol.is_referenced()}
        scopes = list(table.get_children())
        while scopes:
            scope = scopes.pop()
            scopes.extend(scope.get_children())
            used.update(symbol.get_name() for symbol in scope.get_symbols()
                        if symbol.is_referenced() and symbol.is_global())
        statements.append((node.lineno, defined, used))
    return statements



def forward_references(source):
    """(line, name) for each use of a module name that is first defined further down."""
    statements = top_level_statements(source)
    first_defined = {}
    for index, (_, defined, _) in enumerate(statements):
        for name in defined:
            first_defined.setdefault(name, index)
    return sorted((line, name) for index, (line, _, used) in enumerate(statements)
                  for name in used if first_defined.get(name, index) > index)



def test_no_definition_in_the_module_uses_one_further_down():
    assert forward_references((HERE / "owproxy.py").read_text()) == []



def test_a_forward_reference_is_found_in_a_method_and_not_in_a_local_name():
    source = ("class A:\n    def m(self):\n        return later()\n\n\n"
              "def f():\n    later = 1\n    return later\n\n\n"
              "def later():\n    return A\n")
    assert forward_references(source) == [(1, "later")]

