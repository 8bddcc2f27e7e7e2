from test_owproxy import *  # noqa: F401,F403
from test_owproxy import proxies, proxy  # noqa: F401  (fixtures)
for _name in [n for n in globals() if n.startswith("test_")]:
    del globals()[_name]

# More end-to-end tests: ActionLoop corners, Python functions, Knative web requests and
# web results, and the client commands.  The harness is test_owproxy's.

import contextlib  # noqa: E402

MIB = 1024 * 1024
WEB_BAD = {"error": "The action returned a web response with an invalid statusCode, "
                    "headers or image body."}


def exchange(proxy, method, path, body=b"", headers=()):
    """One request on a connection of its own, which the proxy closes after its answer
    (Connection: close): the status, the header fields in order as (name, value)
    pairs, repeats included, and every byte that came after the head."""
    fields = ["Connection: close", "Content-Length: %d" % len(body)] + list(headers)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(head(method, path, *fields) + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_bytes, separator, rest = data.partition(b"\r\n\r\n")
    assert separator, data
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    pairs = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    return status, pairs, rest


def values_of(pairs, name):
    return [value for key, value in pairs if key.lower() == name.lower()]


# ---------------------------------------------------------------------------
# ActionLoop executables (--loop)
# ---------------------------------------------------------------------------

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
# Python functions
# ---------------------------------------------------------------------------

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
    proxy = proxies(start=False)
    proxy.env.pop("PYTHONUNBUFFERED", None)  # the worker's own -u must do it
    assert "PYTHONUNBUFFERED" not in proxy.env
    proxy.start()
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
])
def test_source_with_a_shebang_stays_an_executable_and_runs(proxy, code, expected):
    assert proxy.init(code).status == 200
    assert (proxy.action_dir / "exec").read_text() == code
    assert not (proxy.action_dir / "__main__.py").exists()
    response = proxy.run({})
    assert (response.status, response.json) == (200, expected)


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
    response = web_proxy.post("/?q=1", "name=Jane&x=1",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert web_args(response) == dict(CONTEXT, name="Jane", x="1", q="1")


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
    body = json.dumps({"value": {"web": web}}).encode()
    return exchange(proxy, "POST", "/", body, ["Content-Type: application/json"])


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
def main(args):
    open(os.environ["MARKER"], "a").close()
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
# Client commands
# ---------------------------------------------------------------------------

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
    assert result.stderr.startswith("usage: owproxy.py invoke")
    assert result.stderr.splitlines()[-1] == (
        "owproxy.py invoke: error: argument --repeat: invalid positive_int value: '0'")
    assert "Traceback" not in result.stderr


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

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed
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
        listener.close()
        thread.join(5)


def test_run_against_a_port_that_answers_garbage_is_a_one_line_error():
    with garbage_server() as url:
        result = cli("run", "--url", url)
    check_one_line_error(result, "owproxy: cannot reach %s" % url)
    assert result.stderr.startswith("owproxy: cannot reach %s" % url)


def test_run_against_an_invalid_port_is_a_one_line_error():
    result = cli("run", "--url", "localhost:99999")
    check_one_line_error(result, "localhost:99999")


def test_invoke_a_directory_with_a_broken_link_is_a_one_line_error(tmp_path):
    folder = tmp_path / "action"
    folder.mkdir()
    (folder / "exec").write_text(bash("echo '{}'"))
    (folder / "exec").chmod(0o755)
    (folder / "dangling").symlink_to(tmp_path / "nowhere")
    result = cli("invoke", folder)
    check_one_line_error(result, "owproxy: cannot read %s" % (folder / "dangling"))
