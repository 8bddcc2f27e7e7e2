"""End-to-end tests of owproxy.py, part B: process control, concurrency, HTTP edges,
shutdown, settings and the CLI, and the ActionRunner extension API.

Same harness as test_owproxy.py (to be merged into it): real proxy processes on
loopback, real sockets, real actions.
"""

import ctypes
import glob
import tempfile

from test_owproxy import *  # noqa: F401,F403  (the harness, as if this were that file)
from test_owproxy import proxies, proxy  # noqa: F401  (the fixtures)

for _name in [name for name in globals() if name.startswith("test_")]:
    del globals()[_name]  # until the merge: collect test_owproxy's own tests only there

import pytest

RUN_TIMED_OUT = {"error": "The action exceeded its time limit and was stopped at its deadline."}
NOBODY = 65534


# ---------------------------------------------------------------------------
# Harness additions
# ---------------------------------------------------------------------------

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


class RawResponse:
    def __init__(self, status_line, status, headers, body):
        self.status_line, self.status, self.headers, self.body = (
            status_line, status, headers, body)

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
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status < 200:
            return RawResponse(lines[0], status, headers, b"")
        assert "content-length" in headers, head
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return RawResponse(lines[0], status, headers, body)

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


def cli(*args, env=None, timeout=15, **kwargs):
    """owproxy.py run to completion (it must exit by itself), its output captured."""
    return subprocess.run(proxy_command(*args), env=proxy_env(env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, **kwargs)


def check_one_line_error(completed, *fragments):
    assert completed.returncode == 2, completed
    err = completed.stderr.decode()
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("owproxy: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert completed.stdout == b""


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


class CommandProxy(Proxy):
    """A Proxy started from another command line: ``command(port, action_dir)`` gives
    the argv and the extra environment for the free port it is to listen on."""

    def __init__(self, root, command, **kwargs):
        self.command = command
        Proxy.__init__(self, root, **kwargs)

    def start(self):
        for _ in range(5):
            self.port = free_port()
            argv, extra = self.command(self.port, str(self.action_dir))
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                self.process = subprocess.Popen(argv + self.args, stdout=out, stderr=err,
                                                env=dict(self.env, **extra),
                                                preexec_fn=self.preexec_fn)
            if self.wait_ready():
                return self
            if "Address already in use" not in self.err_path.read_text():
                raise AssertionError("proxy did not start: %s" % self.err_path.read_text())
        raise AssertionError("no free port")


@pytest.fixture
def command_proxies(tmp_path):
    started = []

    def start(command, *args, env=None, **kwargs):
        proxy = CommandProxy(tmp_path / ("c%d" % len(started)), command, args=args, env=env,
                             **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.process and proxy.process.poll() is None:
            proxy.stop()


ECHO_RESULT = bash("echo '{\"ok\": \"run\"}'")


def check_a_run_still_works(proxy):
    response = proxy.run(timeout=10)
    assert (response.status, response.json) == (200, {"ok": "run"})


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


@pytest.mark.parametrize("chunks", [b"zz\r\n", b"2\r\n{}XX", b"5\r\n{}"],
                         ids=["bad-size", "no-crlf-after-data", "short-chunk"])
def test_a_malformed_chunked_body_is_400(proxy, chunks):
    assert proxy.init(ECHO_RESULT).status == 200
    client = RawClient(proxy)
    try:
        client.send(head("POST", "/run", "Transfer-Encoding: chunked") + chunks)
        if chunks.endswith(b"{}"):
            client.sock.shutdown(socket.SHUT_WR)
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
    try:
        run()
    except (OSError, http.client.HTTPException):
        pass  # the connection may close unanswered: the proxy is gone


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
    text = completed.stdout.decode()
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


def test_the_port_comes_from_flask_proxy_port_without_port(command_proxies):
    proxy = command_proxies(lambda port, action_dir: (
        proxy_command("--host", "127.0.0.1", "--action-dir", action_dir),
        {"FLASK_PROXY_PORT": str(port)}))
    assert proxy.init(ECHO_RESULT).status == 200
    check_a_run_still_works(proxy)


def test_port_wins_over_flask_proxy_port(command_proxies):
    with socket.socket() as taken:  # were FLASK_PROXY_PORT used, the proxy could not start
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proxy = command_proxies(lambda port, action_dir: (
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
import os, sys
sys.path.insert(0, REPO)
import owproxy

EPILOGUE = r'''printf '{"who": "%s", "var": "%s", "built": "%s"}\n' "$WHO" "$MY_VAR" "$BUILT"'''


class MyRunner(owproxy.ActionRunner):
    # the source is action.sh; build compiles it into exec

    def epilogue(self, message):
        with open(self.source, "a") as source:
            source.write("\n" + EPILOGUE + "\n")

    def build(self, message):
        with open(self.source) as source:
            code = source.read()
        if "BUILD-FAILS" in code:
            sys.stderr.write("my build failed\n")
            return False
        with open(self.binary, "w") as binary:
            binary.write("#!/bin/bash\nBUILT=yes\n" + code)
        os.chmod(self.binary, 0o755)
        return True

    def env(self, message):
        env = owproxy.ActionRunner.env(self, message)
        env["MY_VAR"] = "from the env hook"
        return env


ACTION_DIR = sys.argv[sys.argv.index("--action-dir") + 1]
owproxy.setRunner(MyRunner(os.path.join(ACTION_DIR, "action.sh"),
                           os.path.join(ACTION_DIR, "exec")))
sys.exit(owproxy.main())
"""


@pytest.fixture
def extended_proxy(command_proxies, tmp_path):
    script = tmp_path / "my_proxy.py"
    script.write_text(EXTENSION.replace("REPO", repr(str(HERE))))
    return command_proxies(lambda port, action_dir: (
        [PYTHON, str(script), "--host", "127.0.0.1", "--port", str(port),
         "--action-dir", action_dir], {}), "--allow-reinit")


def test_a_runner_subclass_hooks_epilogue_build_and_env(extended_proxy):
    proxy = extended_proxy
    response = proxy.init("WHO=world")
    assert (response.status, response.json) == (200, {"ok": True})
    source = (proxy.action_dir / "action.sh").read_text()
    assert source.startswith("WHO=world\n") and source.rstrip().endswith('"$BUILT"')
    assert (proxy.action_dir / "exec").read_text().startswith("#!/bin/bash\nBUILT=yes\n")
    response = proxy.run()
    assert (response.status, response.json) == (200, {
        "who": "world", "var": "from the env hook", "built": "yes"})
    assert check_streams(proxy) == ("", "")


def test_a_build_that_returns_false_fails_init_and_keeps_the_previous_action(extended_proxy):
    proxy = extended_proxy
    assert proxy.init("WHO=first").status == 200
    response = proxy.init("WHO=second # BUILD-FAILS")
    assert (response.status, response.json) == (502, INIT_FAILED)
    assert response.body == json.dumps(INIT_FAILED).encode()
    _, err = check_streams(proxy)
    assert "my build failed" in err
    assert (proxy.action_dir / "action.sh").read_text().startswith("WHO=first\n")
    response = proxy.run()
    assert (response.status, response.json) == (200, {
        "who": "first", "var": "from the env hook", "built": "yes"})
