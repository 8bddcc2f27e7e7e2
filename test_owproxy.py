"""End-to-end tests of owproxy.py: real proxy processes on loopback, real actions.

Every test starts the proxy as a subprocess (under $OWPROXY_PYTHON, default this
interpreter) and talks HTTP to it the way the invoker does.  Unit tests of inner
functions come last.
"""

import base64
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
import threading
import time
import zipfile
from pathlib import Path

import pytest

import owproxy

HERE = Path(__file__).resolve().parent
OWPROXY = str(HERE / "owproxy.py")
PYTHON = os.environ.get("OWPROXY_PYTHON") or sys.executable
COVERAGE = bool(os.environ.get("OWPROXY_COVERAGE")) and PYTHON == sys.executable
SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def proxy_command(*args):
    prefix = [PYTHON]
    if COVERAGE:
        prefix += ["-m", "coverage", "run", "--parallel-mode", "--include=*owproxy.py"]
    return prefix + [OWPROXY] + list(args)


def proxy_env(extra=None):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("__OW_") and key not in ("PROXY_ALLOW_REINIT", "FLASK_PROXY_PORT")
           and not key.startswith("OWPROXY_")}
    env["COVERAGE_FILE"] = str(HERE / ".coverage")
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
    """One proxy process, its action directory, and its two log streams."""

    def __init__(self, root, args=(), env=None, action_dir=None, start=True, preexec_fn=None):
        self.root = Path(root)
        self.action_dir = Path(action_dir) if action_dir else self.root / "action"
        self.action_dir.mkdir(parents=True, exist_ok=True)
        self.args, self.env, self.preexec_fn = list(args), proxy_env(env), preexec_fn
        self.out_path, self.err_path = self.root / "proxy.out", self.root / "proxy.err"
        self.process = None
        if start:
            self.start()

    def start(self):
        for _ in range(5):
            self.port = free_port()
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                self.process = subprocess.Popen(
                    proxy_command("--host", "127.0.0.1", "--port", str(self.port),
                                  "--action-dir", str(self.action_dir), *self.args),
                    stdout=out, stderr=err, env=self.env, preexec_fn=self.preexec_fn)
            if self.wait_ready():
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

    def start(*args, env=None, name="p", **kwargs):
        proxy = Proxy(tmp_path / ("%s%d" % (name, len(started))), args, env, **kwargs)
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
    assert "Cannot initialize the action more than once." in out + err


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
