"""End-to-end tests of owproxy.py: real proxy processes on loopback, real actions.

Every test starts the proxy as a subprocess (under $OWPROXY_PYTHON, default this
interpreter) and talks HTTP to it the way the invoker does.  Unit tests of inner
functions come last.
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
    """One proxy process, its action directory, and its two log streams.  A
    ``command(port, action_dir)`` gives another command line to start it with,
    and the extra environment for it."""

    def __init__(self, root, args=(), env=None, action_dir=None, start=True, preexec_fn=None,
                 command=None):
        self.command = command or self.command
        self.root = Path(root)
        self.action_dir = Path(action_dir) if action_dir else self.root / "action"
        self.action_dir.mkdir(parents=True, exist_ok=True)
        self.args, self.preexec_fn = list(args), preexec_fn
        self.env = proxy_env(env, other_user=preexec_fn is not None)
        self.out_path, self.err_path = self.root / "proxy.out", self.root / "proxy.err"
        self.process = None
        if start:
            self.start()

    def command(self, port, action_dir):
        """The command line that starts this proxy on ``port``, and its extra environment."""
        return proxy_command("--host", "127.0.0.1", "--port", str(port),
                             "--action-dir", action_dir), {}

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
                                                    preexec_fn=self.preexec_fn)
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
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.01)
        raise AssertionError("proxy not listening after %ss" % timeout)

    def request(self, method, path, body=None, headers=None, connection=None, timeout=60):
        conn = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
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
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@pytest.fixture
def proxies(tmp_path):
    started = []

    def start(*args, env=None, **kwargs):
        proxy = Proxy(tmp_path / ("p%d" % len(started)), args, env, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.process and proxy.process.poll() is None:
            proxy.stop()


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


def dockerfile_stub(action_dir):
    """Runs the Dockerfile's RUN step that bakes the stub /action/exec, into action_dir."""
    text = (HERE / "Dockerfile").read_text().replace("\\\n", " ")
    step = next(line for line in text.splitlines()
                if line.startswith("RUN") and "/action/exec" in line)
    script = step[len("RUN"):].replace("/action", str(action_dir))
    subprocess.run(["sh", "-c", script], check=True)


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


def raw_request(proxy, data, shut_write=False):
    client = RawClient(proxy)
    try:
        client.send(data)
        if shut_write:
            client.sock.shutdown(socket.SHUT_WR)
        return client.response()
    finally:
        client.close()


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


def check_a_run_still_works(proxy):
    response = proxy.run(timeout=10)
    assert (response.status, response.json) == (200, {"ok": "run"})


MIB = 1024 * 1024
WEB_BAD = {"error": "The action returned a web response with an invalid statusCode, "
                    "headers or image body."}


# ---------------------------------------------------------------------------
# The upstream conformance cases (dockerskeleton's ActionProxyContainerTests)
# ---------------------------------------------------------------------------

def test_init_with_empty_code_then_run_fails_with_error_in_stdout(proxy):
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


def test_init_twice_is_refused_with_the_exact_403_and_no_sentinel(proxy):
    assert proxy.init(NOT_JSON).status == 200
    response = proxy.init(NOT_JSON)
    assert response.status == 403
    assert response.json == {"error": "Cannot initialize the action more than once."}
    out, err = check_streams(proxy, sentinels=0)
    assert out == ""
    assert err.splitlines()[0] == "Cannot initialize the action more than once."


@pytest.mark.parametrize("body", [b"{nope", b"[]", b'{"value": "code"}'])
def test_a_second_init_is_refused_whatever_its_body(proxy, body):
    assert proxy.init(NOT_JSON).status == 200
    response = proxy.post("/init", body)
    assert (response.status, response.json) == (
        403, {"error": "Cannot initialize the action more than once."})
    check_streams(proxy, sentinels=0)


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


def test_a_large_argument_is_echoed_from_stdin(proxy):
    assert proxy.init(STDIN_ECHO_BASH).status == 200
    arg = {"arg": "a" * 1048561}
    response = proxy.run(arg)
    assert (response.status, response.json) == (200, arg)


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


def zip_bytes(files):
    return base64.b64decode(make_zip(files))


# ---------------------------------------------------------------------------
# /init: code, archives, environment, atomic installation
# ---------------------------------------------------------------------------

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


def test_reinit_is_allowed_with_proxy_allow_reinit(proxies):
    proxy = proxies(env={"PROXY_ALLOW_REINIT": "1"})
    assert proxy.init(bash("echo '{\"v\": 1}'")).status == 200
    assert proxy.init_zip({"exec": bash("echo '{\"v\": 2}'")}).status == 200
    assert proxy.run().json == {"v": 2}
    assert proxy.init(bash("echo '{\"v\": 3}'")).status == 200
    assert proxy.run().json == {"v": 3}


def outside_link_zip(target):
    return make_zip({"exec": bash("echo '{}'"), "link": ("->", str(target)),
                     "link/evil": "written through the link"})


BAD_INITS = {
    "zip without exec": (lambda out: {"code": make_zip({"main.sh": "x"}), "binary": True},
                         "the archive has no exec file (or __main__.py) at its top level"),
    "invalid base64": (lambda out: {"code": "not base64 at all!", "binary": True},
                       "the code is not valid base64"),
    "not a zip": (lambda out: {"code": base64.b64encode(b"hello, not a zip").decode(),
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


def test_base64_with_line_breaks_is_accepted(proxy):
    code = make_zip({"exec": bash("echo '{\"wrapped\": true}'")})
    wrapped = "\n".join(code[i:i + 76] for i in range(0, len(code), 76))
    assert proxy.init(wrapped, binary=True).status == 200
    assert proxy.run().json == {"wrapped": True}


def test_init_without_an_executable_fails_and_can_be_retried(proxy):
    response = proxy.post("/init", {})
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert "is not an executable file" in check_streams(proxy)[1]
    assert proxy.init(bash("echo '{\"retried\": true}'")).status == 200
    assert proxy.run().json == {"retried": True}


@pytest.mark.parametrize("body", [b"[1, 2]", b'{"value": "code"}', b"{nope"])
def test_init_bodies_of_the_wrong_shape_are_400(proxy, body):
    response = proxy.post("/init", body)
    assert response.status == 400
    assert "error" in response.json
    assert proxy.init(bash("echo '{}'")).status == 200


# ---------------------------------------------------------------------------
# /run: arguments, environment, logs, results
# ---------------------------------------------------------------------------

ARGS_BASH = bash('echo "{\\"argc\\": $#, \\"argv_len\\": ${#1}, \\"stdin_len\\": $(wc -c)}"')


@pytest.mark.parametrize("length, argc", [(131071, 1), (131072, 0)])
def test_the_argument_is_on_argv_up_to_max_arg_strlen_and_always_on_stdin(proxy, length, argc):
    assert proxy.init(ARGS_BASH).status == 200
    value = {"a": "x" * (length - 9)}
    assert len(json.dumps(value)) == length
    result = proxy.run(value).json
    assert result == {"argc": argc, "argv_len": length if argc else 0, "stdin_len": length}


def test_an_action_that_ignores_a_large_stdin_still_answers(proxy):
    assert proxy.init(bash("echo '{\"ignored\": true}'")).status == 200
    assert proxy.run({"big": "y" * 3000000}).json == {"ignored": True}


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


def test_the_result_is_the_last_non_empty_line(proxy):
    assert proxy.init(bash("echo 'log one'\necho '{\"last\": 1}'\necho\necho '   '")).status == 200
    assert proxy.run().json == {"last": 1}
    assert check_streams(proxy)[0] == "log one"


@pytest.mark.parametrize("line", ["NaN", '{"a": NaN}', "42", '"text"', "null", "[1, 2"])
def test_results_that_are_not_json_objects_or_arrays_are_502(proxy, line):
    assert proxy.init(bash("echo '%s'" % line)).status == 200
    response = proxy.run()
    assert (response.status, response.json) == (502, {
        "error": "The action did not return a dictionary or array."})
    assert check_streams(proxy)[0] == line


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


def test_logs_are_streamed_while_the_action_runs(proxy):
    # the latest stdout line is held back: it may be the result
    code = bash("echo early\necho held\necho early-err >&2\nsleep 2\necho '{}'")
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


# ---------------------------------------------------------------------------
# Process control: process groups, background children, deadlines
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


@pytest.mark.skipif(not pid_namespaces_work(), reason="no PID namespaces (unshare) here")
def test_as_pid_1_the_proxy_reaps_what_actions_leave_behind(proxies):
    proxy = proxies(command=lambda port, action_dir: (
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
        + proxy_command("--host", "127.0.0.1", "--port", str(port), "--action-dir",
                        action_dir), {}))
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


# ---------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# HTTP edges
# ---------------------------------------------------------------------------

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


def test_a_request_line_without_a_version_still_gets_a_status_line(proxy):
    response = raw_request(proxy, b"GET /healthz\r\n\r\n")
    assert (response.status, response.json) == (200, {"status": "ok"})
    assert int(response.headers["content-length"]) == len(response.body)


# ---------------------------------------------------------------------------
# Shutdown
# ---------------------------------------------------------------------------

def test_sigterm_lets_the_run_in_flight_finish_then_exits_0(proxy):
    assert proxy.init(bash("touch started\nsleep 1\necho '{\"finished\": true}'")).status == 200
    run = in_thread(proxy.run, timeout=30)
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    proxy.process.send_signal(signal.SIGTERM)
    response = run()
    assert (response.status, response.json) == (200, {"finished": True})
    assert proxy.process.wait(10) == 0
    check_streams(proxy)


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


# ---------------------------------------------------------------------------
# Settings and command line
# ---------------------------------------------------------------------------

def test_help_lists_every_environment_variable():
    completed = cli("--help", env={"COLUMNS": "100"})
    assert completed.returncode == 0, completed
    text = completed.stdout
    for setting in owproxy.SETTINGS:
        assert setting.env in text, setting.env
        assert setting.flag in text, setting.flag


def test_a_missing_action_dir_is_a_one_line_error_and_exit_2(tmp_path):
    missing = tmp_path / "no-such-dir"
    completed = cli("--host", "127.0.0.1", "--port", str(free_port()),
                    "--action-dir", str(missing))
    check_one_line_error(completed, str(missing))


def test_an_unwritable_action_dir_is_a_one_line_error_and_exit_2(public_dir):
    read_only = public_dir / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555 if os.geteuid() != 0 else 0o755)  # root-owned: nobody cannot write
    completed = cli("--host", "127.0.0.1", "--port", str(free_port()),
                    "--action-dir", str(read_only), preexec_fn=as_nobody())
    check_one_line_error(completed, str(read_only), "not writable")


@pytest.mark.parametrize("name, value", [
    ("FLASK_PROXY_PORT", "abc"), ("FLASK_PROXY_PORT", "70000"), ("OWPROXY_MAX_BODY", "lots"),
    ("PROXY_ALLOW_REINIT", "maybe"), ("OWPROXY_GRACE", "-1"), ("__OW_ALLOW_CONCURRENT", "2"),
])
def test_an_invalid_environment_value_is_a_one_line_error_and_exit_2(tmp_path, name, value):
    env = {"FLASK_PROXY_PORT": str(free_port())}
    env[name] = value
    completed = cli("--host", "127.0.0.1", "--action-dir", str(tmp_path), env=env)
    check_one_line_error(completed, name, value)


def test_the_port_comes_from_flask_proxy_port_without_port(proxies):
    proxy = proxies(command=lambda port, action_dir: (
        proxy_command("--host", "127.0.0.1", "--action-dir", action_dir),
        {"FLASK_PROXY_PORT": str(port)}))
    assert proxy.init(ECHO_RESULT).status == 200
    check_a_run_still_works(proxy)


def test_port_wins_over_flask_proxy_port(proxies):
    with socket.socket() as taken:  # were FLASK_PROXY_PORT used, the proxy could not start
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proxy = proxies(command=lambda port, action_dir: (
            proxy_command("--host", "127.0.0.1", "--port", str(port), "--action-dir",
                          action_dir),
            {"FLASK_PROXY_PORT": str(taken.getsockname()[1])}))
        assert proxy.init(ECHO_RESULT).status == 200
        check_a_run_still_works(proxy)


def test_a_port_in_use_is_a_one_line_error_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        completed = cli("--host", "127.0.0.1", "--port", str(port),
                        "--action-dir", str(tmp_path))
    check_one_line_error(completed, str(port))


def test_nothing_is_printed_at_start_up_or_by_a_successful_init(proxy):
    assert proxy.logs() == ("", "")
    assert proxy.init(ECHO_RESULT).status == 200
    assert proxy.logs() == ("", "")


def test_the_proxy_works_as_an_unprivileged_user(proxies, public_dir, tmp_path):
    action_dir = public_dir / "action"
    action_dir.mkdir()
    if os.geteuid() == 0:
        os.chown(str(action_dir), NOBODY, NOBODY)
    (tmp_path / "p0").mkdir()  # the fixture's log folder; Proxy makes only the action dir
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


# ---------------------------------------------------------------------------
# The extension API: ActionRunner subclasses and setRunner
# ---------------------------------------------------------------------------

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
# Warm actions: ActionLoop executables (--loop)
# ---------------------------------------------------------------------------


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


@pytest.fixture
def loop_proxy(proxies):
    proxy = proxies("--loop")
    assert proxy.init(LOOP_ACTION, env={"GREETING": "hi"}).status == 200
    return proxy


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


@pytest.mark.parametrize("env", [{}, {"OW_WAIT_FOR_ACK": "1"}])
def test_a_loop_executable_that_exits_at_once_fails_init(proxies, env):
    proxy = proxies("--loop", env=env)
    response = proxy.init(bash("echo 'starting'\nexit 4"))
    assert (response.status, response.json) == (502, INIT_FAILED)
    out, err = check_streams(proxy)
    assert out == "starting"
    assert "the action did not start: the action exited with status 4" in err


def test_a_loop_process_that_dies_during_a_run_is_replaced(loop_proxy):
    pid = loop_proxy.run({}).json["pid"]
    response = loop_proxy.run({"die": True})
    assert (response.status, response.json) == (502, RUN_EXITED)
    after = loop_proxy.run({}).json
    assert after["pid"] != pid and after["count"] == 1
    _, err = check_streams(loop_proxy, sentinels=3)
    assert "owproxy: the action exited with status 7" in err


def test_a_loop_process_that_dies_between_runs_is_replaced(loop_proxy):
    pid = loop_proxy.run({}).json["pid"]
    os.kill(pid, signal.SIGKILL)
    assert gone_or_zombie(pid)
    after = loop_proxy.run({})
    assert after.status == 200 and after.json["pid"] != pid
    assert ("a fresh process replaces one that ended between activations (the action was "
            "killed by signal 9 (SIGKILL))") in loop_proxy.logs()[1]


def test_a_loop_result_that_is_not_json_is_the_exact_502_and_the_process_serves_on(loop_proxy):
    pid = loop_proxy.run({}).json["pid"]
    response = loop_proxy.run({"bad": True})
    assert (response.status, response.json) == (502, BAD_RESULT)
    after = loop_proxy.run({}).json
    assert (after["pid"], after["count"]) == (pid, 3)
    assert "not json" in check_streams(loop_proxy, sentinels=3)[0]


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
    out, _ = check_streams(proxy, sentinels=3)
    assert sorted(out.split("\n")) == ["log from act0", "log from act1", "log from act2"]



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


def test_a_loop_result_line_too_many_is_dropped_so_later_runs_get_their_own(proxies):
    proxy = proxies("--loop")
    assert proxy.init(TWO_RESULTS_FIRST).status == 200
    first = proxy.run({"n": 1})
    assert (first.status, first.json) == (200, {"count": 1, "line": "first"})
    for n in (2, 3):
        response = proxy.run({"n": n})
        assert (response.status, response.json) == (200, {"count": n, "n": n})
    out, err = check_streams(proxy, sentinels=3)
    assert out == ""
    assert err == ("owproxy: dropped 1 result line(s) the action wrote outside "
                   "an activation")


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
    proxy = proxies("--loop", env={"OW_WAIT_FOR_ACK": "1"})
    response = proxy.init(ACK_IF_ASKED, env={"ACK": '{"ok": false}'})
    assert (response.status, response.json) == (502, INIT_FAILED)
    out, err = check_streams(proxy)
    assert out == ""
    assert err.startswith("owproxy: the action did not initialize properly"), err


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


# ---------------------------------------------------------------------------
# Warm actions: Python functions
# ---------------------------------------------------------------------------

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


def test_an_exception_is_an_application_error_with_the_traceback_on_stderr(function_proxy):
    response = function_proxy.run({"fail": "bad input"})
    assert (response.status, response.json) == (200, {"error": "boom: bad input"})
    _, err = check_streams(function_proxy)
    assert 'File "%s", line 9, in main' % (function_proxy.action_dir / "__main__.py") in err
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


def test_sys_exit_gives_an_error_and_a_fresh_interpreter(function_proxy):
    pid = function_proxy.run({}).json["pid"]
    response = function_proxy.run({"exit": True})
    assert (response.status, response.json) == (502, RUN_EXITED)
    after = function_proxy.run({}).json
    assert (after["calls"], after["pid"] != pid) == (1, True)
    assert "the action exited with status 3" in check_streams(function_proxy, sentinels=3)[1]


def test_a_python_function_past_its_deadline_is_stopped(function_proxy):
    deadline = int(time.time() * 1000) + 1000
    response = function_proxy.run({"sleep": 60}, deadline=deadline)
    assert (response.status, response.json) == (502, RUN_TIMED_OUT)
    assert function_proxy.run({}).json["calls"] == 1


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


def test_a_baked_python_function_runs_without_init(proxy):
    (proxy.action_dir / "__main__.py").write_text("def main(args):\n    return {'baked': 1}\n")
    assert proxy.run({}).json == {"baked": 1}


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


def test_source_that_is_not_python_stays_an_executable(proxy):
    assert proxy.init("echo not python\n").status == 200
    assert (proxy.action_dir / "exec").exists()



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


def test_a_python_function_that_closes_sys_stdout_still_answers(odd_proxy):
    pid = odd_proxy.run({}).json["pid"]
    for _ in range(2):
        response = odd_proxy.run({"kind": "close"})
        assert (response.status, response.json) == (200, {"a": 1})
    assert odd_proxy.run({}).json == {"pid": pid}


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


def test_python_with_an_indentation_error_fails_init_with_the_line(proxy):
    response = proxy.init("import os\n  x = 1\n")
    assert (response.status, response.json) == (502, INIT_FAILED)
    out, err = check_streams(proxy)
    assert out == ""
    assert '__main__.py", line 2' in err and "IndentationError: unexpected indent" in err
    assert not (proxy.action_dir / "exec").exists()


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


# ---------------------------------------------------------------------------
# The Knative platform
# ---------------------------------------------------------------------------

KNATIVE_ACTION = '''
import os
def main(args):
    if "web" in args:
        return args["web"]
    return {"args": args, "id": os.environ.get("__OW_ACTIVATION_ID"),
            "name": os.environ.get("__OW_ACTION_NAME"), "deadline": os.environ.get("__OW_DEADLINE")}
'''
DEDICATED = {"error": "Cannot initialize a runtime with a dedicated function."}


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
def test_knative_web_results_become_http_responses(proxies, web, status, content_type, body):
    proxy = knative(proxies)
    response = proxy.post("/", {"init": {"code": KNATIVE_ACTION}, "value": {"web": web}})
    assert (response.status, response.body) == (status, body)
    assert response.headers.get("Content-Type") == content_type
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Content-Length"] == str(len(body))
    sent = {name.lower(): value for name, value in response.headers.items()}
    for name, value in web.get("headers", {}).items():
        assert sent[name.lower()] == value


def test_knative_keeps_cors_headers_the_action_sets(proxies):
    proxy = knative(proxies)
    web = {"headers": {"Access-Control-Allow-Origin": "https://example.org"}, "body": "x"}
    response = proxy.post("/", {"init": {"code": KNATIVE_ACTION}, "value": {"web": web}})
    assert response.headers["Access-Control-Allow-Origin"] == "https://example.org"


@pytest.mark.parametrize("web", [{"statusCode": "teapot"}, {"statusCode": 200, "headers": []},
                                 {"headers": {"content-type": "image/png"}, "body": "%%%"}])
def test_invalid_web_results_are_502(proxies, web):
    proxy = knative(proxies)
    response = proxy.post("/", {"init": {"code": KNATIVE_ACTION}, "value": {"web": web}})
    assert response.status == 502 and "web response" in response.json["error"]


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


def test_knative_methods_come_from_ow_http_methods(proxies):
    proxy = knative(proxies, methods=" [ get , POST ] ")
    assert proxy.post("/", {"init": {"code": KNATIVE_ACTION}}).status == 200
    response = proxy.request("GET", "/?name=q")
    assert response.status == 200 and response.json["args"]["__ow_method"] == "get"
    assert response.json["args"]["name"] == "q"
    refused = proxy.request("PUT", "/", b"{}")
    assert refused.status == 405 and refused.headers["Allow"] == "GET, POST, OPTIONS"
    assert proxy.post("/run", {}).status == 404


def test_knative_errors_carry_accurate_statuses(proxies):
    proxy = knative(proxies)
    assert proxy.post("/", b"{not json").status == 400
    assert proxy.post("/", {"init": "code", "value": {}}).status == 400
    assert proxy.post("/", {"init": {"code": "def main(args)\n"}}).status == 502
    assert proxy.post("/", {"init": {"code": bash("exit 1")}}).status == 200
    failed = proxy.post("/", {"value": {}})
    assert (failed.status, failed.json) == (502, BAD_RESULT)


@pytest.mark.parametrize("env, message", [
    ({"__OW_RUNTIME_PLATFORM": "lambda"}, "__OW_RUNTIME_PLATFORM='lambda': not a platform"),
    ({"__OW_RUNTIME_PLATFORM": "knative", "__OW_HTTP_METHODS": "[GET, FETCH]"},
     "__OW_HTTP_METHODS='[GET, FETCH]': FETCH is not an HTTP method"),
])
def test_invalid_platform_settings_are_a_one_line_start_up_error(tmp_path, env, message):
    check_one_line_error(cli("--action-dir", tmp_path, env=env), "owproxy: " + message)


# ---------------------------------------------------------------------------
# Knative: plain web requests
# ---------------------------------------------------------------------------


def test_a_dedicated_raw_container_passes_its_first_request_as_it_is(proxies):
    proxy = knative(proxies, __OW_ACTION_CODE=KNATIVE_ACTION, __OW_ACTION_RAW="true")
    response = proxy.post("/?a=1&b=2", "Hello, not JSON {", headers={"Content-Type": "text/plain"})
    assert response.status == 200, response
    args = response.json["args"]
    args.pop("__ow_headers")
    assert args == {"__ow_body": "Hello, not JSON {", "__ow_query": "a=1&b=2",
                    "__ow_method": "post", "__ow_path": "", "__ow_user": ""}


@pytest.fixture
def web_proxy(proxies):
    proxy = knative(proxies)
    assert proxy.post("/", {"init": {"code": KNATIVE_ACTION}}).status == 200
    return proxy


def web_args(response):
    assert response.status == 200, response
    args = response.json["args"]
    args.pop("__ow_headers")
    return args


CONTEXT = {"__ow_method": "post", "__ow_path": "", "__ow_user": ""}


def test_a_plain_text_body_is_ow_body(web_proxy):
    response = web_proxy.post("/?q=1", "Jane", headers={"Content-Type": "text/plain"})
    assert web_args(response) == dict(CONTEXT, __ow_body="Jane", q="1")


def test_a_form_body_becomes_parameters(web_proxy):
    response = web_proxy.post("/?q=1", "name=José&x=1",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert web_args(response) == dict(CONTEXT, name="José", x="1", q="1")


def test_a_json_object_body_is_merged_with_the_query(web_proxy):
    response = web_proxy.post("/?q=1", {"name": "Jane", "n": 2},
                              headers={"Content-Type": "application/json"})
    assert web_args(response) == dict(CONTEXT, name="Jane", n=2, q="1")


def test_invalid_json_declared_as_json_is_400(web_proxy):
    response = web_proxy.post("/", "{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400
    check_json_response(Response(response.status,
                                 {k.lower(): v for k, v in response.headers.items()},
                                 response.body))
    assert response.json["error"].startswith("The request body is not valid JSON"), response




# ---------------------------------------------------------------------------
# Knative: web results
# ---------------------------------------------------------------------------


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


def test_a_header_value_that_is_not_latin_1_is_the_web_response_502(web_proxy):
    status, pairs, body = web_result(web_proxy, {"headers": {"X-Name": "José ☃"},
                                                 "body": "x"})
    assert (status, json.loads(body)) == (502, WEB_BAD)
    assert values_of(pairs, "X-Name") == []


def test_a_latin_1_header_value_is_sent_as_it_is(web_proxy):
    status, pairs, body = web_result(web_proxy, {"headers": {"X-Name": "José"}, "body": "x"})
    assert (status, body) == (200, b"x")
    assert values_of(pairs, "X-Name") == ["José"]


def test_a_header_value_with_a_line_break_cannot_inject_a_header(web_proxy):
    status, pairs, body = web_result(web_proxy, {"headers": {"X-Note": "a\r\nX-Injected: yes"},
                                                 "body": "x"})
    assert (status, json.loads(body)) == (502, WEB_BAD)
    assert values_of(pairs, "X-Injected") == [] and values_of(pairs, "X-Note") == []


@pytest.mark.parametrize("name, value", [("X-Note", "a\x1bb"), ("X-Note", "a\x7fb"),
                                         ("X\x00Note", "a"), ("X Note", "a")])
def test_a_header_with_control_characters_or_a_bad_name_is_refused(web_proxy, name, value):
    status, pairs, body = web_result(web_proxy, {"headers": {name: value}, "body": "x"})
    assert (status, json.loads(body)) == (502, WEB_BAD)


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




# ---------------------------------------------------------------------------
# Knative: CORS and methods
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Health endpoints
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("platform", ["openwhisk", "knative"])
def test_health_endpoints_answer_while_an_action_runs_and_stay_out_of_the_logs(proxies,
                                                                            platform):
    proxy = proxies("--verbose", env={"__OW_RUNTIME_PLATFORM": platform})
    code = bash("sleep 2\necho '{}'")
    if platform == "knative":
        assert proxy.post("/", {"init": {"code": code}}).status == 200
        running = threading.Thread(target=proxy.post, args=("/", {"value": {}}))
    else:
        assert proxy.init(code).status == 200
        running = threading.Thread(target=proxy.run)
    running.start()
    time.sleep(0.3)
    before = proxy.logs()
    started = time.time()
    live = proxy.request("GET", "/healthz")
    ready = proxy.request("GET", "/readyz")
    head = proxy.request("HEAD", "/readyz")
    assert time.time() - started < 1.5  # answered while the action still sleeps
    assert (live.status, live.json) == (200, {"status": "ok"})
    assert (ready.status, ready.json) == (200, {"ready": True})
    assert (head.status, head.body) == (200, b"")
    assert proxy.logs() == before
    running.join()


def test_readiness_fails_once_shutdown_has_begun(proxies):
    proxy = proxies()
    assert proxy.init(bash("touch started\nsleep 2\necho '{\"done\": true}'")).status == 200
    assert proxy.request("GET", "/readyz").status == 200
    run = in_thread(proxy.run, timeout=30)
    assert wait_for(lambda: (proxy.action_dir / "started").exists())
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = proxy.request("GET", "/readyz")  # a new connection: still answered
    assert (ready.status, ready.json) == (503, {"ready": False, "reason": "shutting down"})
    assert proxy.request("GET", "/healthz").status == 200
    refused = proxy.run()
    assert (refused.status, refused.json) == (503, {"error": "The proxy is shutting down."})
    assert run().json == {"done": True}
    assert proxy.process.wait(30) == 0


def test_the_dockerfile_healthcheck_uses_the_liveness_endpoint():
    dockerfile = (HERE / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile


# ---------------------------------------------------------------------------
# The local workflow: invoke, the init and run client commands, the examples
# ---------------------------------------------------------------------------

EXAMPLES = HERE / "examples"


def assert_invoked(result, expected, logs=()):
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected
    assert SENTINEL not in result.stderr
    for line in logs:
        assert line in result.stderr


def test_invoke_the_bash_example():
    result = cli("invoke", EXAMPLES / "hello.sh", "-p", "name", "Ada")
    assert_invoked(result, {"greeting": "Hello, Ada!"},
                   ["greeting Ada for activation ", "this line goes to stderr"])


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


def test_invoke_the_python_zip_example_as_a_directory():
    result = cli("invoke", EXAMPLES / "python-zip", '{"text": "the quick brown fox"}')
    assert_invoked(result, {"words": 4, "longest": "quick"})


def test_invoke_the_actionloop_example_with_loop():
    result = cli("invoke", "--loop", "--repeat", "2", EXAMPLES / "loop.py")
    assert_invoked(result, {"greeting": "Hello, stranger!", "served": 2})
    pids = {line.split()[-1] for line in result.stderr.splitlines() if "served by pid" in line}
    assert len(pids) == 1


def test_invoke_a_zip_file(tmp_path):
    archive = tmp_path / "action.zip"
    archive.write_bytes(zip_bytes({"exec": bash("echo '{\"zipped\": true}'")}))
    assert_invoked(cli("invoke", archive), {"zipped": True})


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


def test_init_and_run_a_running_container(proxy):
    url = "http://127.0.0.1:%d" % proxy.port
    init = cli("init", "--url", url, EXAMPLES / "hello.py")
    assert (init.returncode, json.loads(init.stdout)) == (0, {"ok": True})
    run = cli("run", "--url", url, "-p", "name", "Cy")
    assert run.returncode == 0
    assert json.loads(run.stdout) == {"greeting": "Hello, Cy!", "greeted_so_far": 1}
    again = cli("init", "--url", url, EXAMPLES / "hello.py")
    assert again.returncode == 2 and "answered 403" in again.stderr


def test_the_compose_file_builds_the_project_image_with_its_health_check():
    compose = (EXAMPLES / "docker-compose.yml").read_text()
    assert "context: .." in compose and "dockerfile: Dockerfile" in compose
    assert '"8080:8080"' in compose and "/healthz" in compose


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


def test_make_run_serves_the_demo_action_and_the_readme_curl_lines_work(tmp_path):
    port = free_port()
    shutil.copytree(HERE, tmp_path / "repo", ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", ".coverage*"))
    server = subprocess.Popen(["make", "-s", "run", "PORT=%d" % port, "PYTHON=%s" % PYTHON],
                              cwd=tmp_path / "repo", stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env=proxy_env())
    try:
        proxy = Proxy.__new__(Proxy)
        proxy.port, proxy.process = port, server
        assert proxy.wait_ready()
        response = proxy.run({"name": "Dee"})
        assert (response.status, response.json) == (200, {"greeting": "Hello, Dee!"})
        curls = readme_curls("The two commands") + readme_curls("Actions")
        assert len([expected for _, expected in curls if expected]) >= 4
        for (command, expected), output in zip(curls, run_curls(curls, port)):
            if expected is not None:
                assert json.loads(output) == json.loads(expected), command
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_the_readme_knative_request_works(proxies):
    proxy = proxies(env={"__OW_RUNTIME_PLATFORM": "knative"})
    ((command, expected),) = readme_curls("Knative")
    (output,) = run_curls([(command + " -i", expected)], proxy.port)
    body, _, content_type = expected.partition("(Content-Type: ")
    assert output.endswith("\n\n" + body.strip()), output  # text mode: \r\n read as \n
    assert "Content-Type: " + content_type.rstrip(")") in output


def test_the_readme_lists_every_setting():
    readme = (HERE / "README.md").read_text()
    for setting in owproxy.SETTINGS:
        assert "| `%s` | `%s` | %s |" % (setting.flag, setting.env, setting.shown()) in readme



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


def test_invoke_ignores_the_callers_proxy_settings():
    env = {"__OW_RUNTIME_PLATFORM": "knative", "OWPROXY_VERBOSE": "1", "OWPROXY_LOOP": "1",
           "__OW_HTTP_METHODS": "[GET]"}
    result = cli("invoke", EXAMPLES / "hello.sh", "-p", "name", "Ada", env=env)
    assert_invoked(result, {"greeting": "Hello, Ada!"}, ["this line goes to stderr"])
    assert "HTTP/1.1\"" not in result.stderr  # no access log
    assert "serving" not in result.stderr  # no banner


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


def test_invoke_a_directory_with_a_broken_link_is_a_one_line_error(tmp_path):
    folder = tmp_path / "action"
    folder.mkdir()
    (folder / "exec").write_text(bash("echo '{}'"))
    (folder / "exec").chmod(0o755)
    (folder / "dangling").symlink_to(tmp_path / "nowhere")
    result = cli("invoke", folder)
    check_one_line_error(result, "owproxy: cannot read %s" % (folder / "dangling"))


# ---------------------------------------------------------------------------
# firsthour: the CLI explains itself, invoke streams live, Ctrl-C, hints, suite safety
# ---------------------------------------------------------------------------

def test_help_names_the_commands_and_version_matches_the_server_header(proxy):
    completed = cli("--help", env={"COLUMNS": "100"})
    assert completed.returncode == 0, completed
    for command in ("owproxy.py invoke ACTION", "owproxy.py init", "owproxy.py run"):
        assert command in completed.stdout
    version = cli("--version")
    assert (version.returncode, version.stdout) == (0, "owproxy %s\n" % owproxy.__version__)
    assert proxy.init(ECHO_RESULT).headers["Server"] == "owproxy/" + owproxy.__version__


def test_invoke_help_shows_the_defaults():
    text = cli("invoke", "--help", env={"COLUMNS": "100"}).stdout
    for default in ("(default: 60)", "(default: main)", "(default: 1)", "(default: the file's)"):
        assert default in text, text


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


def test_a_serving_proxy_interrupted_mid_activation_says_it_waits_and_finishes_it(proxy):
    assert proxy.init(bash('echo started >&2; sleep 1; echo \'{"finished": true}\'')).status == 200
    answer = in_thread(proxy.run)
    assert wait_for(lambda: "started" in proxy.logs()[1], 30)
    proxy.process.send_signal(signal.SIGINT)
    response = answer(60)
    assert (response.status, response.json) == (200, {"finished": True})
    assert proxy.process.wait(30) == 0
    err = proxy.logs()[1]
    assert ("owproxy: stopping: 1 activation(s) in flight get up to 8 s to finish (a second "
            "signal stops them now)\n") in err, err
    assert "Traceback" not in err


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


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler on this machine")
@pytest.mark.parametrize("path", ["c", "c/action.c"])
def test_invoke_compiles_the_c_example(path):
    result = cli("invoke", EXAMPLES / path, '{"a": 1}')
    assert_invoked(result, {"language": "C", "params": {"a": 1}}, ["a log line from C"])


def test_invoke_without_cc_says_how_to_compile(tmp_path):
    result = cli("invoke", EXAMPLES / "c", env={"PATH": str(tmp_path)})
    check_one_line_error(result, "action.c is C source and there is no cc here",
                         "cc -O2 -o action ")


def test_make_run_listens_on_loopback_on_port_or_flask_proxy_port():
    def dry_run(*args, **env):
        return subprocess.run(["make", "-s", "-n", "run"] + list(args), cwd=HERE, timeout=30,
                              env=proxy_env(env), capture_output=True, text=True).stdout
    assert "--host 127.0.0.1 --port 8080 " in dry_run()
    assert "--host 127.0.0.1 --port 19300 " in dry_run(FLASK_PROXY_PORT="19300")
    assert "--port 19301 " in dry_run("PORT=19301", FLASK_PROXY_PORT="19300")
    assert "--port 19302 " in dry_run(PORT="19302")


def test_the_readme_snippets_are_the_examples_real_content():
    readme = (HERE / "README.md").read_text()
    for name in ("hello.py", "hello.sh"):
        marker = "<!-- examples/%s -->\n" % name
        assert marker in readme, name
        block = readme.split(marker, 1)[1].split("```", 2)[1].split("\n", 1)[1]
        assert block == (EXAMPLES / name).read_text(), name


# ---------------------------------------------------------------------------
# Inner functions
# ---------------------------------------------------------------------------

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


def test_result_forwarder_holds_back_only_the_last_non_empty_line():
    written = []
    forwarder = owproxy.ResultForwarder(written.append)
    for chunk in (b"a\n{\"x\"", b": 1}\n\n", b"  \n"):
        forwarder.feed(chunk)
    forwarder.close()
    assert forwarder.result() == b'{"x": 1}'
    assert b"".join(written) == b"a\n\n  \n"


def test_the_entry_count_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(owproxy, "MAX_ARCHIVE_ENTRIES", 3)
    data = zip_bytes({"exec": "x", "a": "a", "b": "b", "c": "c"})
    with pytest.raises(owproxy.InitError, match="the archive has 4 entries, more than the limit of 3"):
        owproxy.extract_zip(data, str(tmp_path), 1024)


def test_a_start_without_arguments_imports_neither_ssl_nor_argparse_yet_both_work():
    probe = ("import sys; sys.path.insert(0, %r); import owproxy; "
             "owproxy.resolve_settings([], {'OWPROXY_ACTION_DIR': %r}); "
             "print('ssl' in sys.modules, 'argparse' in sys.modules); "
             "from http import client; print(hasattr(client, 'HTTPSConnection')); "
             "import urllib.request; print(hasattr(urllib.request, 'HTTPSHandler'))"
             % (str(HERE), str(HERE)))
    result = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["False", "False", "True", "True"], result


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


def test_a_local_proxy_that_cannot_start_is_reported_with_its_own_stderr(tmp_path, monkeypatch):
    fails = tmp_path / "fails.py"
    fails.write_text("import sys\nsys.stderr.write('owproxy: cannot listen: no way\\n')\n"
                     "sys.exit(2)\n")
    monkeypatch.setattr(owproxy, "OWPROXY_FILE", str(fails))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(owproxy.ClientError) as raised:
        owproxy.LocalProxy(False)
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
    proxy = owproxy.LocalProxy(False)
    try:
        assert not reservations and proxy.port != port
        assert proxy.post("/run", {"value": {}}, 30) == (502, {
            "error": "The action failed to locate a binary. See logs for details."})
    finally:
        proxy.close()
