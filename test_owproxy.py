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


# ---------------------------------------------------------------------------
# /init: code, archives, environment, atomic installation
# ---------------------------------------------------------------------------

INIT_FAILED = {"error": "The action failed to generate or locate a binary. See logs for details."}
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
    assert sorted(os.listdir(proxy.action_dir)) == before
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


# ---------------------------------------------------------------------------
# Warm actions: ActionLoop executables (--loop)
# ---------------------------------------------------------------------------

RUN_EXITED = {"error": "The action exited before it returned a result. See logs for details."}
TIMED_OUT = {"error": "The action exceeded its time limit and was stopped at its deadline."}
BAD_RESULT = {"error": "The action did not return a dictionary or array."}

LOOP_ACTION = python_script(r'''
import json, os, sys, time
results = os.fdopen(3, "w")
if os.environ.get("OW_WAIT_FOR_ACK"):
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
    if value.get("exit_after"):
        sys.exit(0)
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
    pid = loop_proxy.run({"exit_after": True}).json["pid"]
    time.sleep(0.2)
    after = loop_proxy.run({})
    assert after.status == 200 and after.json["pid"] != pid
    assert "a fresh process replaces one that ended between activations" in loop_proxy.logs()[1]


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
    assert (response.status, response.json) == (502, TIMED_OUT)
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
    assert check_streams(proxy, sentinels=3)


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
    assert (response.status, response.json) == (502, TIMED_OUT)
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
    assert check_streams(proxy)


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
    assert refused.status == 405 and refused.headers["Allow"] == "GET, POST"
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
    result = subprocess.run(proxy_command("--action-dir", str(tmp_path)), env=proxy_env(env),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("owproxy: " + message)
    assert len(result.stderr.splitlines()) == 1


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
    assert proxy.init(bash("sleep 2\necho '{\"done\": true}'")).status == 200
    kept = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    assert proxy.request("GET", "/readyz", connection=kept).status == 200
    results = []
    running = threading.Thread(target=lambda: results.append(proxy.run()))
    running.start()
    time.sleep(0.3)
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = proxy.request("GET", "/readyz", connection=kept)
    assert (ready.status, ready.json) == (503, {"ready": False, "reason": "shutting down"})
    running.join()
    assert results[0].json == {"done": True}
    assert proxy.process.wait(30) == 0


def test_the_dockerfile_healthcheck_uses_the_liveness_endpoint():
    dockerfile = (HERE / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile


# ---------------------------------------------------------------------------
# The local workflow: invoke, the init and run client commands, the examples
# ---------------------------------------------------------------------------

EXAMPLES = HERE / "examples"


def owproxy_cli(*args, timeout=60):
    return subprocess.run([PYTHON, OWPROXY] + [str(arg) for arg in args], capture_output=True,
                          text=True, timeout=timeout, env=proxy_env())


def assert_invoked(result, expected, logs=()):
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected
    assert SENTINEL not in result.stderr
    for line in logs:
        assert line in result.stderr


def test_invoke_the_bash_example():
    result = owproxy_cli("invoke", EXAMPLES / "hello.sh", "-p", "name", "Ada")
    assert_invoked(result, {"greeting": "Hello, Ada!"},
                   ["greeting Ada for activation ", "this line goes to stderr"])


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler on this machine")
def test_invoke_the_compiled_c_example(tmp_path):
    binary = tmp_path / "action"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(EXAMPLES / "c" / "action.c")],
                   check=True)
    result = owproxy_cli("invoke", binary, '{"a": 1}', "-p", "b", "[2]")
    assert_invoked(result, {"language": "C", "params": {"a": 1, "b": [2]}},
                   ["a log line from C"])
    dockerfile = (EXAMPLES / "c" / "Dockerfile").read_text()
    assert "COPY examples/c/action.c" in dockerfile and "/action/exec" in dockerfile


def test_invoke_the_python_function_example_warm():
    result = owproxy_cli("invoke", EXAMPLES / "hello.py", "--repeat", "3", "-p", "name", "Bo")
    assert_invoked(result, {"greeting": "Hello, Bo!", "greeted_so_far": 3},
                   ["greeting Bo in activation", "owproxy: run 3 took"])
    assert result.stderr.count("greeting Bo") == 3


def test_invoke_the_python_zip_example_as_a_directory():
    result = owproxy_cli("invoke", EXAMPLES / "python-zip", '{"text": "the quick brown fox"}')
    assert_invoked(result, {"words": 4, "longest": "quick"})


def test_invoke_the_actionloop_example_with_loop():
    result = owproxy_cli("invoke", "--loop", "--repeat", "2", EXAMPLES / "loop.py")
    assert_invoked(result, {"greeting": "Hello, stranger!", "served": 2})
    pids = {line.split()[-1] for line in result.stderr.splitlines() if "served by pid" in line}
    assert len(pids) == 1


def test_invoke_a_zip_file(tmp_path):
    archive = tmp_path / "action.zip"
    archive.write_bytes(zip_bytes({"exec": bash("echo '{\"zipped\": true}'")}))
    assert_invoked(owproxy_cli("invoke", archive), {"zipped": True})


def test_invoke_exits_1_on_an_application_error(tmp_path):
    action = tmp_path / "fails.py"
    action.write_text("def main(args):\n    raise RuntimeError('no such user')\n")
    result = owproxy_cli("invoke", action)
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
    result = owproxy_cli("invoke", action, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr


@pytest.mark.parametrize("args, message", [
    (["invoke", "/no/such/action"], "owproxy: cannot read the action /no/such/action"),
    (["invoke", str(EXAMPLES / "hello.sh"), "{not json"], "owproxy: the parameters are not JSON"),
    (["run", "--url", "127.0.0.1:1"], "owproxy: cannot reach 127.0.0.1:1"),
])
def test_client_errors_are_one_line_and_exit_2(args, message):
    result = owproxy_cli(*args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1


def test_init_and_run_a_running_container(proxy):
    url = "http://127.0.0.1:%d" % proxy.port
    init = owproxy_cli("init", "--url", url, EXAMPLES / "hello.py")
    assert (init.returncode, json.loads(init.stdout)) == (0, {"ok": True})
    run = owproxy_cli("run", "--url", url, "-p", "name", "Cy")
    assert run.returncode == 0
    assert json.loads(run.stdout) == {"greeting": "Hello, Cy!", "greeted_so_far": 1}
    again = owproxy_cli("init", "--url", url, EXAMPLES / "hello.py")
    assert again.returncode == 2 and "answered 403" in again.stderr


def test_the_compose_file_builds_the_project_image_with_its_health_check():
    compose = (EXAMPLES / "docker-compose.yml").read_text()
    assert "context: .." in compose and "dockerfile: Dockerfile" in compose
    assert '"8080:8080"' in compose and "/healthz" in compose


def readme_curls():
    """The README's one-line curl commands, each with the JSON it says comes back (or None)."""
    lines = (HERE / "README.md").read_text().splitlines()
    curls = []
    for number, line in enumerate(lines):
        if line.startswith("    curl ") and line.count("'") % 2 == 0:
            command, _, inline = line.strip().partition("  # ")
            following = lines[number + 1].strip() if number + 1 < len(lines) else ""
            expected = inline or (following[2:] if following.startswith("# {") else None)
            curls.append((command.strip(), expected and json.loads(expected)))
    return curls


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
        curls = readme_curls()
        assert len([expected for _, expected in curls if expected]) >= 4
        for command, expected in curls:
            command = command.replace("localhost:8080", "127.0.0.1:%d" % port)
            result = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                                    timeout=30)
            assert result.returncode == 0, command
            if expected is not None:
                assert json.loads(result.stdout) == expected, command
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_the_readme_lists_every_setting():
    readme = (HERE / "README.md").read_text()
    for setting in owproxy.SETTINGS:
        assert "| `%s` | `%s` | %s |" % (setting.flag, setting.env, setting.shown()) in readme
