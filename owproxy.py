#!/usr/bin/env python3
"""owproxy: an Apache OpenWhisk action proxy in one file.

Copy this file into any image that has a ``python3`` (3.8 or newer), start it
with ``python3 owproxy.py``, and the image is an OpenWhisk action container: the
invoker's ``POST /init`` installs an executable, a script or a zip into the
action directory (``/action``), and every ``POST /run`` starts ``/action/exec``
with the activation's parameters, streams its logs and answers with the last
line it printed.  It needs nothing but the Python standard library.

It is a drop-in replacement for the Flask + gevent ``actionproxy.py`` of
OpenWhisk's dockerskeleton image, with the same routes, statuses and messages,
and without its faults: every activation gets its own environment, a deadline
stops a runaway action, background children cannot hold an answer back, and a
bad request or a broken action never takes the proxy down.  It also keeps
actions warm: ActionLoop executables (``--loop``) and Python ``main(args)``
functions, and it speaks Knative.

The file reads top to bottom:

1. Configuration   settings, each a command-line flag and an environment variable
2. Logs            the action's log streams and the end-of-activation sentinels
3. HTTP layer      the server, a thin request handler, JSON bodies and errors
4. Init            installing code: source, zip archives, atomic replacement
5. Execution       processes and their pump; warm processes (ActionLoop, Python
                   functions); ActionRunner, the subclassable runner
6. Platforms       the OpenWhisk and Knative routes, health endpoints
7. Client          ``invoke`` an action locally, its logs relayed live; ``init``
                   and ``run`` a container
8. CLI             ``main()``: the proxy or a command
"""

import contextlib
import functools
import json
import os
import selectors
import signal
import socketserver
import subprocess
import sys
import threading
import time

__version__ = "1.0.0"
OWPROXY_FILE = os.path.abspath(__file__)


# ============================================================================
# 1. Configuration
# ============================================================================

LOG_SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"

# Linux's MAX_ARG_STRLEN: the longest single argument execve() accepts.
MAX_ARG_STRLEN = 131071

# An archive with more entries than this is refused whatever their size.
MAX_ARCHIVE_ENTRIES = 250000

# The exact texts the invoker, the upstream tests and users already know.
INIT_TWICE = "Cannot initialize the action more than once."
INIT_FAILED = "The action failed to generate or locate a binary. See logs for details."
RUN_NO_BINARY = "The action failed to locate a binary. See logs for details."
RUN_BAD_ARGUMENT = "The action did not receive a dictionary or array as an argument."
RUN_BAD_RESULT = "The action did not return a dictionary or array."
RUN_TIMED_OUT = "The action exceeded its time limit and was stopped at its deadline."
RUN_EXITED = "The action exited before it returned a result. See logs for details."
RUN_UNENCODABLE = "The action returned a {} that JSON cannot encode: {}"
DEDICATED = "Cannot initialize a runtime with a dedicated function."
WEB_BAD_RESULT = ("The action returned a web response with an invalid statusCode, headers "
                  "or image body.")

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
INTERNAL_ERROR = "Internal error. {}"

MIB = 1024 * 1024
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")


class ConfigError(Exception):
    """A setting has a value the proxy cannot use; reported in one line."""


def parse_port(text):
    port = int(text) if str(text).strip().isdigit() else -1
    if not 0 <= port <= 65535:
        raise ValueError("not a port number (0-65535)")
    return port


def parse_flag(text):
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean (use true or false)")


def parse_size(text):
    """Bytes, with an optional K, M or G suffix (powers of 1024)."""
    text = str(text).strip().upper().rstrip("B").rstrip("I")
    scale = {"K": 1024, "M": MIB, "G": 1024 * MIB}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    size = int(digits) * scale if digits.isdigit() else 0
    if size <= 0:
        raise ValueError("not a positive size (bytes, or with a K, M or G suffix)")
    return size


def parse_platform(text):
    platform = text.strip().lower() or "openwhisk"
    if platform not in ("openwhisk", "knative"):
        raise ValueError("not a platform (use openwhisk or knative)")
    return platform


def parse_methods(text):
    """``[GET, POST]``, ``["GET","POST"]`` or ``GET,POST``: the methods the Knative
    route accepts; none at all means the default, POST."""
    names = (name.strip().strip("'\"").strip().upper()
             for name in text.strip().strip("[]").split(","))
    methods = tuple(dict.fromkeys(name for name in names if name)) or ("POST",)
    invalid = [method for method in methods if method not in HTTP_METHODS]
    if invalid:
        raise ValueError("%s is not an HTTP method (use %s)"
                         % (", ".join(invalid), ", ".join(HTTP_METHODS)))
    return methods


def parse_seconds(text):
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError("not a number of seconds")
    return seconds


class Setting:
    """One setting: a command-line flag, an environment variable and a default."""

    def __init__(self, name, flag, env, default, parse, help):
        self.name, self.flag, self.env = name, flag, env
        self.default, self.parse, self.help = default, parse, help

    def shown(self):
        """The default as a user would write it."""
        if self.parse is parse_size:
            return "%dM" % (self.default // MIB)
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)


SETTINGS = (
    Setting("host", "--host", "OWPROXY_HOST", "0.0.0.0", str,
            "address to listen on"),
    Setting("port", "--port", "FLASK_PROXY_PORT", 8080, parse_port,
            "port to listen on"),
    Setting("action_dir", "--action-dir", "OWPROXY_ACTION_DIR", "/action", str,
            "directory that holds the action; its 'exec' is what runs"),
    Setting("allow_reinit", "--allow-reinit", "PROXY_ALLOW_REINIT", False, parse_flag,
            "accept /init more than once (local development)"),
    Setting("loop", "--loop", "OWPROXY_LOOP", False, parse_flag,
            "keep the executable running between activations (ActionLoop protocol)"),
    Setting("concurrent", "--concurrent", "__OW_ALLOW_CONCURRENT", False, parse_flag,
            "run activations in parallel instead of one at a time"),
    Setting("platform", "--platform", "__OW_RUNTIME_PLATFORM", "openwhisk", parse_platform,
            "openwhisk (/init and /run) or knative (one route, /)"),
    Setting("http_methods", "--http-methods", "__OW_HTTP_METHODS", ("POST",), parse_methods,
            "methods the knative route accepts, e.g. [GET,POST]"),
    Setting("max_body", "--max-body", "OWPROXY_MAX_BODY", 80 * MIB, parse_size,
            "largest request body accepted (K, M, G suffixes)"),
    Setting("max_archive", "--max-archive", "OWPROXY_MAX_ARCHIVE", 1024 * MIB, parse_size,
            "largest total size a zip may expand to"),
    Setting("grace", "--grace", "OWPROXY_GRACE", 8.0, parse_seconds,
            "seconds in-flight activations get to finish on SIGTERM"),
    Setting("verbose", "--verbose", "OWPROXY_VERBOSE", False, parse_flag,
            "print a start-up banner and an access log on stderr"),
)


class Settings:
    """The resolved value of every setting, as attributes."""

    def __init__(self, **values):
        for setting in SETTINGS:
            setattr(self, setting.name, values.get(setting.name, setting.default))


COMMANDS_HELP = """commands (each with its own --help):
  owproxy.py invoke ACTION [PARAMS]   run an action on a proxy of its own, as the invoker would
  owproxy.py init [--url URL] ACTION  POST /init to a running container
  owproxy.py run [--url URL] [PARAMS] POST /run to a running container

Each flag falls back to its environment variable, then to its default."""


def argument_parser(**options):
    """An argparse parser whose errors are one line, ``owproxy: ...``, exit status 2."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            if message.startswith("argument "):
                message = message[len("argument "):]
            if message.startswith("-p/--param"):
                message += ": write -p KEY VALUE, e.g. -p name Ada"
            self.exit(2, "owproxy: %s (see %s --help)\n" % (message, self.prog))

    return Parser(formatter_class=argparse.RawDescriptionHelpFormatter, **options)


def settings_parser():
    parser = argument_parser(
        prog="owproxy.py",
        description="Serve an OpenWhisk action (the /init and /run protocol) over HTTP.",
        epilog=COMMANDS_HELP)
    parser.add_argument("--version", action="version", version="owproxy " + __version__)
    for setting in SETTINGS:
        text = "%s [env %s, default %s]" % (setting.help, setting.env, setting.shown())
        if setting.parse is parse_flag:
            parser.add_argument(setting.flag, dest=setting.name, action="store_const",
                                const="true", default=None, help=text)
        else:
            parser.add_argument(setting.flag, dest=setting.name, default=None,
                                metavar=setting.name.upper(), help=text)
    return parser


def resolve_settings(argv, environ):
    """Flags win over environment variables, which win over defaults."""
    # No arguments, a container's usual start: argparse need not even be imported.
    given = vars(settings_parser().parse_args(argv)) if argv else {}
    values = {}
    for setting in SETTINGS:
        if given.get(setting.name) is not None:
            values[setting.name] = flag_value(setting.flag, given[setting.name], setting.parse)
        elif setting.env in environ:
            try:
                values[setting.name] = setting.parse(environ[setting.env])
            except ValueError as error:
                raise ConfigError("%s=%r: %s" % (setting.env, environ[setting.env], error))
    settings = Settings(**values)
    settings.action_dir = os.path.abspath(settings.action_dir)  # the action's cwd is there
    check_action_dir(settings.action_dir)
    return settings


def flag_value(flag, text, parse):
    """``parse(text)``; a value it refuses is a one-line error naming the flag."""
    try:
        return parse(text)
    except ValueError as error:
        raise ConfigError("%s %s: %s" % (flag, text, error))


def check_action_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("the action directory %s is not a directory" % path)
    if not os.path.isdir(path):
        raise ConfigError("the action directory %s does not exist" % path)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("the action directory %s is not writable" % path)


def env_string(value):
    """How OpenWhisk exports a JSON value as an environment variable."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def exported(names_and_values, prefix=""):
    """The environment entries for a JSON object, refusing what execve cannot carry."""
    entries = {}
    for name, value in names_and_values:
        key, text = prefix + name, env_string(value)
        if not name or not exportable(key, text):
            raise ValueError("%r cannot be exported as an environment variable" % name)
        entries[key] = text
    return entries


def exportable(key, text):
    try:
        os.fsencode(key + text)
    except UnicodeEncodeError:  # a lone surrogate has no bytes
        return False
    return "=" not in key and "\0" not in key + text


# ============================================================================
# 2. Logs
# ============================================================================

class Logs:
    """The proxy's stdout and stderr, which the invoker reads as the action's logs.

    Writes go straight to the file descriptors, whole lines at a time under one
    lock, so that concurrent activations never split each other's lines.
    """

    def __init__(self, out_fd=1, err_fd=2):
        self.out_fd, self.err_fd = out_fd, err_fd
        self.lock = threading.Lock()

    def _write(self, fd, data):
        with self.lock:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                pass  # nobody reads the logs any more; the activation goes on

    def out(self, data):
        self._write(self.out_fd, data)

    def err(self, data):
        self._write(self.err_fd, data)

    def note(self, text):
        """A line of the proxy's own on stderr, for the user to read in the logs."""
        self.err(("owproxy: %s\n" % text).encode("utf-8", "replace"))

    def sentinels(self):
        flush_python_streams()
        line = (LOG_SENTINEL + "\n").encode()
        self.out(line)
        self.err(line)


def flush_python_streams():
    """What Python code in the proxy (a runner's hooks) printed goes out before
    the sentinels, which bypass sys.stdout, close the activation's logs."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass  # no stream, or one closed: nothing of it can be lost


def clean_utf8(data):
    """The bytes, with invalid UTF-8 replaced so the log stream stays text."""
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace").encode("utf-8")


class LineForwarder:
    """Forwards a child's output to a log stream, whole lines at a time."""

    max_line = 16 * MIB  # a longer line is forwarded in pieces

    def __init__(self, write):
        self.write = write
        self.partial = []
        self.partial_size = 0

    def feed(self, chunk):
        head, newline, tail = chunk.rpartition(b"\n")
        if newline:
            self.lines(b"".join(self.partial) + head + newline)
            self.partial, self.partial_size = [], 0
            chunk = tail
        if chunk:
            self.partial.append(chunk)
            self.partial_size += len(chunk)
            if self.partial_size > self.max_line:
                self.lines(b"".join(self.partial) + b"\n")
                self.partial, self.partial_size = [], 0

    def close(self):
        if self.partial:
            self.lines(b"".join(self.partial) + b"\n")
            self.partial = []

    def lines(self, data):
        self.write(clean_utf8(data))


class ResultForwarder(LineForwarder):
    """Forwards stdout but holds back its last non-empty line: the action's result."""

    def __init__(self, write):
        LineForwarder.__init__(self, write)
        self.held = []  # the latest non-empty line, then the blank lines after it

    def lines(self, data):
        end = len(data) - 1
        while True:
            start = data.rfind(b"\n", 0, end) + 1
            if data[start:end].strip():
                break
            if start == 0:
                self.held.append(data)
                return
            end = start - 1
        logs = b"".join(self.held) + data[:start]
        self.held = [data[start:]]
        if logs:
            LineForwarder.lines(self, logs)

    def result(self):
        """The result line, once the stream is closed; blank lines after it are logs."""
        held = b"".join(self.held)
        self.held = []
        line, _, blanks = held.partition(b"\n")
        if not line.strip():
            line, blanks = None, held
        if blanks:
            LineForwarder.lines(self, blanks)
        return line


# ============================================================================
# 3. HTTP layer
# ============================================================================

def import_http_server_without_ssl():
    """Imports http.server without ssl, unless something has imported ssl already.

    http.server imports http.client, which imports ssl: some 4 MiB and several
    milliseconds at every start, for TLS that nothing here speaks.  ssl is kept
    out while they load; http.client completes itself, reloading with ssl, the
    first time code (a runner's, a Python action's) asks for what ssl brings.
    """
    if "ssl" in sys.modules or "http.client" in sys.modules:
        return
    sys.modules["ssl"] = None
    try:
        __import__("http.server")
    finally:
        del sys.modules["ssl"]
    client = sys.modules["http.client"]

    def complete(name):
        if name in ("HTTPSConnection", "ssl"):
            import importlib
            importlib.reload(client)
            if name in client.__dict__:
                return client.__dict__[name]
        raise AttributeError("module 'http.client' has no attribute %r" % name)

    client.__getattr__ = complete


import_http_server_without_ssl()
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402


class HTTPError(Exception):
    """An answer other than success, raised from anywhere in a request."""

    def __init__(self, status, message, close=False):
        Exception.__init__(self, message)
        self.status, self.message, self.close = status, message, close


class Route:
    """What a path accepts: its methods, its handler (a Request in, ``(status,
    payload)`` out), the lock it runs under, and after which answers the log
    sentinels close an activation.  A quiet route stays out of the access log.
    ``headers`` go with every answer that does not set them itself; with
    ``preflight``, an OPTIONS request gets them at once, without the handler."""

    def __init__(self, handle, methods=("POST",), lock=None, sentinels=None, quiet=False,
                 headers=(), preflight=False):
        self.handle, self.methods = handle, methods
        self.lock = lock or threading.Lock()
        self.sentinels = sentinels or (lambda status: False)
        self.quiet = quiet
        self.headers, self.preflight = list(headers), preflight


class Request:
    """What a handler sees of a request."""

    def __init__(self, method, query, headers, body):
        self.method, self.query, self.headers, self.body = method, query, headers, body

    def json(self):
        """The body as JSON; an empty body or ``null`` is an empty object."""
        if not self.body.strip():
            return {}
        try:
            message = json.loads(self.body)
        except (ValueError, RecursionError) as error:
            raise HTTPError(400, "The request body is not valid JSON: %s" % error)
        return {} if message is None else message


class WebResponse:
    """A payload sent as it is, with its own headers (name, value pairs, so
    that one may repeat), instead of as JSON."""

    def __init__(self, body, headers):
        self.body, self.headers = body, headers


def encode_answer(status, payload):
    """``(status, body, headers)`` for a handler's answer: a WebResponse as it is,
    anything else as JSON.  Raises TypeError for what cannot be sent."""
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise TypeError("the status %r is not an HTTP status" % (status,))
    if isinstance(payload, WebResponse):
        return status, payload.body, payload.headers
    return status, json_bytes(payload), [("Content-Type", "application/json")]


class ProxyServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, routes from the platform."""

    request_queue_size = 128
    poll_interval = 0.05  # seconds serve_forever() waits for a connection at most

    def __init__(self, settings, routes, logs, processes):
        self.settings, self.routes, self.logs, self.processes = settings, routes, logs, processes
        self.stopping = self.hurried = False
        self.in_flight = 0
        self.counting = threading.Lock()
        ThreadingHTTPServer.__init__(self, (settings.host, settings.port), ProxyHandler)

    def handle_error(self, request, client_address):
        """A client that went away is not news; the logs belong to the action."""
        if self.settings.verbose:
            ThreadingHTTPServer.handle_error(self, request, client_address)

    def server_bind(self):
        """HTTPServer's, without its reverse DNS lookup of the address (for a
        server_name nothing here uses), which can stall a start where DNS is slow."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def service_actions(self):
        """Called by serve_forever() between requests, at least every poll_interval:
        where the serving loop ends once a signal has asked it to."""
        if self.stopping:
            raise Shutdown()
        self.processes.reap_orphans()

    def working(self, delta):
        with self.counting:
            self.in_flight += delta

    def serve_until_idle(self, timeout):
        """Goes on serving while requests are in flight, at most ``timeout`` seconds
        or until ``hurried`` is set (by a second signal); True if none is left.
        Meanwhile health probes hear that the proxy is not ready, new activations
        get 503."""
        self.timeout = 0.05  # how long handle_request() waits for a connection
        end = time.monotonic() + timeout
        while self.in_flight and not self.hurried and time.monotonic() < end:
            self.handle_request()
        return not self.in_flight


def json_bytes(payload):
    """UTF-8 JSON; escaped to ASCII only when it holds lone surrogates."""
    try:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload).encode("ascii")


class ProxyHandler(BaseHTTPRequestHandler):
    """Reads one request, finds its route, and writes one answer."""

    protocol_version = "HTTP/1.1"
    server_version = "owproxy/" + __version__
    disable_nagle_algorithm = True
    wbufsize = 65536  # so that head and body leave in one write
    timeout = 120  # seconds a client may stall while sending
    route = None

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def dispatch(self):
        path, _, query = self.path.partition("?")
        route = self.route = self.server.routes.get(path)
        if route is None:
            self.refuse(404, "There is no %s here." % path)
        elif self.command not in route.methods:
            self.refuse(405, "%s does not accept %s; use %s." % (
                path, self.command, " or ".join(route.methods)),
                [("Allow", ", ".join(route.methods))] + route.headers)
        elif self.command == "OPTIONS" and route.preflight:
            self.preflight(route)
        else:
            self.server.working(+1)
            try:
                self.serve(route, query)
            finally:
                self.server.working(-1)

    def serve(self, route, query):
        """Reads the body, then runs the handler under the route's lock: a slow
        upload holds up nobody."""
        try:
            request = Request(self.command, query, self.headers, self.read_body())
        except HTTPError as error:
            request = error
        with route.lock:
            status, body, headers = self.outcome(route, request)
            if route.sentinels(status):
                self.server.logs.sentinels()
        if route.headers:
            given = {name.lower() for name, _ in headers}
            headers = headers + [(name, value) for name, value in route.headers
                                 if name.lower() not in given]
        self.answer(status, body, headers)

    def preflight(self, route):
        """A CORS preflight, answered with the route's headers at once."""
        try:
            self.read_body()
        except HTTPError as error:
            return self.refuse(error.status, error.message)
        self.answer(200, b"", route.headers)

    def outcome(self, route, request):
        """The encoded answer to a request: whatever goes wrong on the way, even in
        a runner's hooks, is an error answer, so sentinels and answer always follow."""
        try:
            if isinstance(request, HTTPError):
                raise request
            if self.server.stopping and not route.quiet:
                raise HTTPError(503, "The proxy is shutting down.", close=True)
            status, payload = route.handle(request)
            return encode_answer(status, payload)
        except HTTPError as error:
            self.close_connection = self.close_connection or error.close
            return encode_answer(error.status, {"error": error.message})
        except BaseException as error:  # a hook's sys.exit() too: this thread answers
            self.server.logs.note("internal error: %r" % (error,))
            return encode_answer(500, {"error": INTERNAL_ERROR.format(error)})

    # -- request bodies --------------------------------------------------------

    def handle_expect_100(self):
        """Answer 100 Continue only once the body is known to be wanted (read_body)."""
        return True

    def read_body(self):
        limit = self.server.settings.max_body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.continue_if_expected()
            return self.read_chunked(limit)
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError
        except ValueError:
            raise HTTPError(400, "The Content-Length header is not a length.", close=True)
        if length > limit:
            raise HTTPError(413, "The request body has %d bytes, more than the limit of %d."
                            % (length, limit), close=True)
        self.continue_if_expected()
        body = self.rfile.read(length)
        if len(body) < length:
            raise HTTPError(400, "The request body ended early.", close=True)
        return body

    def continue_if_expected(self):
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
            self.wfile.flush()

    def read_chunked(self, limit):
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            digits = line.split(b";", 1)[0].strip()
            if not digits or not set(digits) <= HEX_DIGITS:
                raise HTTPError(400, "The chunked request body is malformed.", close=True)
            size = int(digits, 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise HTTPError(413, "The request body is more than the limit of %d bytes."
                                % limit, close=True)
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.read(2) != b"\r\n":
                raise HTTPError(400, "The chunked request body is malformed.", close=True)
            chunks.append(chunk)
        while self.rfile.readline(1024).strip():
            pass  # trailer fields carry nothing the proxy uses
        return b"".join(chunks)

    # -- answers ---------------------------------------------------------------

    def answer(self, status, body, headers):
        if self.request_version == "HTTP/0.9":  # http.server would send the body alone
            self.request_version = self.protocol_version
        if status in (204, 304):
            body = b""  # these statuses carry none
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()  # now, while the request still counts as in flight

    def refuse(self, status, message, headers=()):
        """An answer to a request whose body is left unread, so the connection must close."""
        self.close_connection = True
        status, body, json_headers = encode_answer(status, {"error": message})
        self.answer(status, body, json_headers + list(headers))

    def send_error(self, code, message=None, explain=None):
        """The server's own errors (a garbage request line, ...) as JSON too."""
        self.close_connection = True
        message = message or self.responses.get(code, ("Error",))[0]
        self.answer(*encode_answer(code, {"error": message}))

    def version_string(self):
        return self.server_version

    def log_request(self, code="-", size="-"):
        if self.server.settings.verbose and not getattr(self.route, "quiet", False):
            BaseHTTPRequestHandler.log_request(self, code, size)

    def log_message(self, format, *args):
        if self.server.settings.verbose:
            BaseHTTPRequestHandler.log_message(self, format, *args)


# ============================================================================
# 4. Init: installing code into the action directory
# ============================================================================

class InitError(Exception):
    """Why an /init failed; written to stderr for the user to read."""


def stage_dir(dest):
    """A fresh, hidden directory beside ``dest``'s contents, on the same filesystem."""
    import tempfile
    return tempfile.mkdtemp(prefix=".owproxy-", dir=dest)


def is_directory(path):
    return os.path.isdir(path) and not os.path.islink(path)


def remove_tree(path):
    import shutil
    if is_directory(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def put(path, target):
    """Moves ``path`` to ``target``, replacing it: in one step (rename(2)) unless a
    directory is involved, so that a file such as ``exec`` never goes missing."""
    if is_directory(path) or is_directory(target):
        remove_tree(target)
    os.replace(path, target)


class Installation:
    """Moves a staged tree into a directory, and the ``displaced`` names out of it,
    so that leaving with an error puts back exactly what was there before.  A file
    is replaced in one step, its old version kept as a hard link, so ``exec``
    always names a complete action, the old one or the new one, even for a run
    that starts meanwhile; ``exec`` is moved last.
    """

    def __init__(self, stage, dest, displaced=()):
        self.stage, self.dest, self.displaced = stage, dest, displaced
        self.backup = None
        self.moved = []  # (name, where its old version is kept, or None)

    def __enter__(self):
        try:
            for name in self.displaced:
                target = os.path.join(self.dest, name)
                if os.path.lexists(target):
                    kept = self.keep(target, os.path.join("displaced", name), link=False)
                    self.moved.append((name, kept))
            for name in sorted(os.listdir(self.stage), key=lambda name: name == "exec"):
                target = os.path.join(self.dest, name)
                kept = None
                if os.path.lexists(target):
                    kept = self.keep(target, os.path.join("replaced", name), link=True)
                self.moved.append((name, kept))
                put(os.path.join(self.stage, name), target)
        except OSError as error:
            self.__exit__(OSError, error, None)
            raise InitError("cannot install the action: %s" % error)
        return self

    def keep(self, target, name, link):
        """Keeps ``target`` in the backup as ``name``: as a hard link, leaving it in
        place, where ``link`` asks and the file system allows, else moved there."""
        self.backup = self.backup or stage_dir(self.dest)
        kept = os.path.join(self.backup, name)
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        if link and not is_directory(target):
            try:
                os.link(target, kept, follow_symlinks=False)
                return kept
            except OSError:
                pass  # no hard links on this file system: a move will do
        os.replace(target, kept)
        return kept

    def __exit__(self, kind, error, trace):
        if kind is not None:
            for name, kept in reversed(self.moved):
                target = os.path.join(self.dest, name)
                if kept and os.path.lexists(kept):
                    put(kept, target)
                else:
                    remove_tree(target)
        remove_tree(self.stage)
        if self.backup:
            remove_tree(self.backup)
        return False


def decode_base64(code):
    import base64
    import binascii
    try:
        return base64.b64decode("".join(code.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InitError("the code is not valid base64 (%s)" % error)


def archive_path(name):
    """The parts of an archive member's path, refusing any that leave the directory."""
    if name.startswith("/"):
        raise InitError("the archive entry %r has an absolute path" % name)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InitError("the archive entry %r points outside the action directory" % name)
    return parts


def extract_zip(data, dest, max_total):
    """Extracts a zip archive into the empty directory ``dest``.

    Nothing is written outside ``dest``: absolute and ``..`` names are refused,
    symbolic links are created last and no other entry may lie below one, and
    every file is created afresh (O_EXCL, O_NOFOLLOW).  The sizes the archive
    declares are checked before anything is written; zipfile never inflates an
    entry past its declared size.
    """
    import io
    import zipfile
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as error:
        raise InitError("the code is not a zip archive (%s)" % error)
    with archive:
        members = archive.infolist()
        if len(members) > MAX_ARCHIVE_ENTRIES:
            raise InitError("the archive has %d entries, more than the limit of %d"
                            % (len(members), MAX_ARCHIVE_ENTRIES))
        total = sum(member.file_size for member in members)
        if total > max_total:
            raise InitError("the archive expands to %d bytes, more than the limit of %d"
                            % (total, max_total))
        entries = [(member, archive_path(member.filename)) for member in members]
        links = []
        for member, parts in entries:
            if parts:
                links.extend(extract_member(archive, member, os.path.join(dest, *parts)))
        link_parts = set(tuple(parts) for parts, _, _ in links)
        for member, parts in entries:
            for depth in range(1, len(parts)):
                if tuple(parts[:depth]) in link_parts:
                    raise InitError("the archive entry %r lies below the symbolic link %r"
                                    % (member.filename, "/".join(parts[:depth])))
        for parts, path, target in links:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.symlink(target, path)
            except OSError as error:
                raise InitError("cannot create the link %r: %s" % ("/".join(parts), error))


def extract_member(archive, member, path):
    """Writes one file or directory; a symbolic link is returned to be made last."""
    import shutil
    import stat
    mode = member.external_attr >> 16
    try:
        if stat.S_ISLNK(mode):
            parts = archive_path(member.filename)
            return [(parts, path, archive.read(member).decode("utf-8"))]
        if member.is_dir():
            os.makedirs(path, exist_ok=True)
            return []
        os.makedirs(os.path.dirname(path), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        permissions = (mode & 0o777 | 0o600) if mode & 0o777 else 0o644
        with archive.open(member) as source, \
                os.fdopen(os.open(path, flags, permissions), "wb") as target:
            shutil.copyfileobj(source, target, MIB)
        return []
    except Exception as error:
        raise InitError("cannot extract %r from the archive: %s" % (member.filename, error))


# ============================================================================
# 5. Execution
# ============================================================================

class Processes:
    """Every action process alive, so that shutdown can stop them all.

    It also reaps orphans when the proxy is PID 1, as it is when it is a
    container's CMD: the kernel hands whatever an action leaves behind (children
    killed with its process group) to PID 1, and nobody else would collect them.
    """

    reap_interval = 0.5  # seconds between two scans of /proc

    def __init__(self):
        self.lock = threading.Lock()
        self.alive = set()
        self.reaper = os.getpid() == 1
        self.reaped_at = 0.0

    def spawn(self, argv, env, cwd, **options):
        """Starts an action process in a session (and process group) of its own, its
        pipes to the proxy; under the lock, so the reaper never sees it unknown."""
        with self.lock:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, cwd=cwd, env=env,
                                       start_new_session=True, **options)
            self.alive.add(process)
        return process

    def discard(self, process):
        with self.lock:
            self.alive.discard(process)

    def kill_all(self):
        with self.lock:
            for process in self.alive:
                kill_group(process)

    def reap_orphans(self):
        """Collects the exit status of dead orphans: children of the proxy that it
        did not start itself, in another session than its own and not leading one
        (so never a process a runner's hooks started, even in a session of its
        own, and will wait for)."""
        if not self.reaper or time.monotonic() - self.reaped_at < self.reap_interval:
            return
        self.reaped_at = time.monotonic()
        with self.lock:
            known = {process.pid for process in self.alive}
            own_session = os.getsid(0)
            for name in os.listdir("/proc"):
                if name.isdigit() and int(name) not in known:
                    reap_if_orphan(int(name), own_session)


def reap_if_orphan(pid, own_session):
    try:
        with open("/proc/%d/stat" % pid, "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
        state, parent, session = fields[0], int(fields[1]), int(fields[3])
        if state == b"Z" and parent == 1 and session not in (own_session, pid):
            os.waitpid(pid, os.WNOHANG)
    except (OSError, IndexError, ValueError):
        pass  # gone already, or not ours


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass  # the group is already gone


def deadline_of(env):
    """The activation's deadline on the monotonic clock, or None.

    ``__OW_DEADLINE`` is epoch milliseconds.  One already past when the run
    begins is not enforced: the invoker never sends one, test harnesses do.
    """
    try:
        remaining = float(env.get("__OW_DEADLINE", "")) / 1000.0 - time.time()
    except ValueError:
        return None
    return time.monotonic() + remaining if remaining > 0 else None


def exit_note(returncode):
    """Why an action process ended, when that was not a plain exit 0."""
    if not returncode:
        return None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return "the action was killed by signal %d (%s)" % (-returncode, name)
    return "the action exited with status %d" % returncode


class LineReader:
    """Collects the lines a warm action writes on its result descriptor (fd 3)."""

    def __init__(self):
        self.partial = []  # the pieces of an unfinished line, joined once it ends
        self.lines = []

    def feed(self, chunk):
        *complete, rest = chunk.split(b"\n")
        if complete:
            complete[0] = b"".join(self.partial) + complete[0]
            self.lines.extend(complete)
            self.partial = []
        if rest:
            self.partial.append(rest)

    def close(self):
        self.partial = []

    def take_stale(self):
        """Drops the lines no activation asked for; says how many there were."""
        count = len(self.lines) + bool(self.partial)
        self.lines, self.partial = [], []
        return count


class Pump:
    """Moves bytes between the proxy and one action process, on the calling thread:
    writes its stdin without ever blocking, forwards its stdout and stderr to the
    logs line by line, collects its result lines, and notices when it exits or
    the deadline passes.  A warm process keeps its pump from one activation to
    the next.
    """

    poll_interval = 0.05  # how often to look for the exit where pidfds are missing
    longest_wait = 3600.0  # selectors overflow on far-future deadlines

    def __init__(self, process, stdout, stderr, results=None, result_pipe=None):
        self.process = process
        self.stdout, self.stderr, self.results = stdout, stderr, results
        self.selector = selectors.DefaultSelector()
        self.pending = b""
        self.exit_fd = pidfd_for(process.pid)
        self.selector.register(process.stdout, selectors.EVENT_READ, stdout)
        self.selector.register(process.stderr, selectors.EVENT_READ, stderr)
        if result_pipe is not None:
            self.selector.register(result_pipe, selectors.EVENT_READ, results)
        if self.exit_fd is not None:
            self.selector.register(self.exit_fd, selectors.EVENT_READ, "exit")
        os.set_blocking(process.stdin.fileno(), False)

    def send(self, data, close=False):
        """Queues ``data`` for the process's stdin, to be closed after it if ``close``."""
        self.pending, self.close_stdin = memoryview(data), close
        if self.write_stdin():
            self.stdin_written()
        else:
            self.selector.register(self.process.stdin, selectors.EVENT_WRITE, "stdin")

    def stdin_written(self):
        if self.close_stdin:
            self.process.stdin.close()

    def serve(self, deadline, finished=lambda: False):
        """Serves the pipes until ``finished()``; returns "finished", "exited" or "deadline".
        A process that exits right after its result has still finished."""
        while not finished():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return "deadline"
            longest = self.poll_interval if self.exit_fd is None else self.longest_wait
            timeout = longest if remaining is None else min(remaining, longest)
            exited = False
            for key, _ in self.selector.select(timeout):
                if key.data == "exit":
                    exited = True
                elif key.data == "stdin":
                    if self.write_stdin():
                        self.selector.unregister(self.process.stdin)
                        self.stdin_written()
                else:
                    self.read(key)
            if exited or self.exit_fd is None and self.process.poll() is not None:
                self.take_ready()  # a result written just before the exit
                return "finished" if finished() else "exited"
        return "finished"

    def read(self, key):
        """Takes one chunk from a pipe the selector found ready."""
        chunk = os.read(key.fd, 65536)
        if chunk:
            key.data.feed(chunk)
        else:
            self.selector.unregister(key.fileobj)
            key.data.close()

    def write_stdin(self):
        """Writes what the pipe takes; True once everything queued is written."""
        try:
            while self.pending:
                self.pending = self.pending[os.write(self.process.stdin.fileno(),
                                                     self.pending[:65536]):]
        except BlockingIOError:
            return False
        except OSError:
            self.pending = b""  # the action does not read its stdin: its choice
        return True

    def take_ready(self):
        """Takes what the pipes already hold, without waiting for more."""
        for _ in range(64):  # a bound: a process may write faster than this reads
            ready = [key for key, _ in self.selector.select(0) if not isinstance(key.data, str)]
            if not ready:
                return
            for key in ready:
                self.read(key)

    def drain(self):
        """Takes what the pipes already hold and ends the logs' last lines, so the
        sentinels that follow stand alone."""
        self.take_ready()
        self.stdout.close()
        self.stderr.close()

    def close(self):
        self.selector.close()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()
        if self.exit_fd is not None:
            os.close(self.exit_fd)


def pidfd_for(pid):
    """A descriptor that becomes readable when ``pid`` exits (Linux 5.3, Python 3.9)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def parse_result(line):
    """The action's result from its result line: a JSON object or array, else None."""
    if line is None:
        return None
    try:
        result = json.loads(line.decode("utf-8", "replace"), parse_constant=reject_constant)
    except (ValueError, RecursionError):
        return None
    return result if isinstance(result, (dict, list)) else None


def reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def result_answer(line, logs):
    """200 with the result, or the exact 502 with the offending line in the logs."""
    result = parse_result(line)
    if result is None:
        log_line(line, logs)
        return 502, {"error": RUN_BAD_RESULT}
    return 200, result


def log_line(line, logs):
    """A line held back as a possible result that turned out to be a log."""
    if line is not None:
        logs.out(clean_utf8(line) + b"\n")


def run_once(argv, data, env, cwd, logs, processes):
    """Runs an executable for one activation: ``data`` on stdin, the result its last line."""
    try:
        process = processes.spawn(argv, env, cwd)
    except OSError as error:
        logs.out(("error: cannot start the action: %s\n" % error).encode())
        return 502, {"error": RUN_BAD_RESULT}
    stdout = ResultForwarder(logs.out)
    pump = Pump(process, stdout, LineForwarder(logs.err))
    try:
        pump.send(data, close=True)
        ending = pump.serve(deadline_of(env))
        kill_group(process)
        pump.drain()
        returncode = process.wait()
    finally:
        pump.close()
        processes.discard(process)
    line = stdout.result()
    if ending == "deadline":
        log_line(line, logs)
        logs.note("the action was stopped at its deadline")
        return 502, {"error": RUN_TIMED_OUT}
    note = exit_note(returncode)
    if note:
        logs.note(note)
    return result_answer(line, logs)


class WarmProcess:
    """One long-lived action process that serves activations one at a time over
    the ActionLoop protocol: a JSON line in on stdin, a result line out on fd 3.
    """

    def __init__(self, argv, env, cwd, logs, processes):
        self.logs, self.processes = logs, processes
        read_end, write_end = os.pipe()
        if write_end == 3:  # dup2(3, 3) would leave it close-on-exec
            write_end, old = os.dup(write_end), write_end
            os.close(old)
        try:
            self.process = processes.spawn(argv, env, cwd, close_fds=False,
                                           preexec_fn=functools.partial(os.dup2, write_end, 3))
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.result_pipe = os.fdopen(read_end, "rb", buffering=0)
        self.results = LineReader()
        self.pump = Pump(self.process, LineForwarder(logs.out), LineForwarder(logs.err),
                         self.results, self.result_pipe)

    def start(self, wait_for_ack):
        """Waits for the ack line, ``{"ok": true}``, or a moment to see that the
        process stays up."""
        if wait_for_ack:
            ending = self.pump.serve(None, lambda: self.results.lines)
            ack = parse_result(self.results.lines.pop(0)) if ending == "finished" else None
            if ending == "finished" and not (isinstance(ack, dict) and ack.get("ok") is True):
                self.stop()
                raise InitError("the action did not initialize properly: it acknowledged "
                                "with something other than {\"ok\": true}")
        else:
            ending = self.pump.serve(time.monotonic() + 0.05)
        self.pump.drain()
        if ending == "exited":
            raise InitError("the action did not start: %s" % self.stop())
        return self

    def alive(self):
        return self.process.poll() is None

    def request(self, message, deadline):
        """Serves one activation; returns ``(status, payload)``."""
        self.pump.drain()  # what the process wrote since the last activation
        stale = self.results.take_stale()
        if stale:
            self.logs.note("dropped %d result line(s) the action wrote outside an activation"
                           % stale)
        self.pump.send(json.dumps(message).encode() + b"\n")
        ending = self.pump.serve(deadline, lambda: self.results.lines)
        self.pump.drain()
        if ending == "finished":
            return self.answer(self.results.lines.pop(0))
        if ending == "deadline":
            self.stop()
            self.logs.note("the action was stopped at its deadline")
            return 502, {"error": RUN_TIMED_OUT}
        self.logs.note(self.stop())
        return 502, {"error": RUN_EXITED}

    def answer(self, line):
        return result_answer(line, self.logs)

    def stop(self):
        """Kills the process group; says how the process ended."""
        kill_group(self.process)
        returncode = self.process.wait()
        if not self.result_pipe.closed:
            self.pump.drain()
            self.pump.close()
            self.result_pipe.close()
        self.processes.discard(self.process)
        return exit_note(returncode) or "the action exited"


class FunctionProcess(WarmProcess):
    """A warm interpreter serving a Python ``main(args)``; its result lines are
    ``[status, payload]`` pairs (see ``function_worker``)."""

    def answer(self, line):
        status, payload = json.loads(line)
        return status, payload


class WarmPool:
    """The warm processes of an action: one per activation in flight, reused;
    ``start(env)`` makes a new one."""

    def __init__(self, start, env):
        self.start, self.env = start, env
        self.lock = threading.Lock()
        self.idle = []
        self.busy = set()

    def acquire(self, logs):
        """An idle live process, else a new one (InitError if it will not start)."""
        with self.lock:
            while self.idle:
                process = self.idle.pop()
                if process.alive():
                    self.busy.add(process)
                    return process
                logs.note("a fresh process replaces one that ended between activations (%s)"
                          % process.stop())
        process = self.start(self.env)
        with self.lock:
            self.busy.add(process)
        return process

    def release(self, process):
        with self.lock:
            self.busy.discard(process)
            if process.alive():
                self.idle.append(process)
                return
        process.stop()

    def close(self, grace):
        """Ends every process: an idle one gets the end of its input and ``grace``
        seconds to exit on its own; a busy one is killed, its activation answered."""
        with self.lock:
            idle, self.idle = self.idle, []
            for process in self.busy:
                kill_group(process.process)
        for process in idle:
            process.process.stdin.close()
        end = time.monotonic() + grace
        for process in idle:
            try:
                process.process.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            process.stop()


# -- Python functions ----------------------------------------------------------

def looks_like_python(code):
    """Source that is not an executable (no ``#!``, not ELF) and is Python: it
    parses, or a line starts as Python does (so a syntax error is reported as one
    at init rather than as "Exec format error" at every run)."""
    import ast
    import re
    if not code.strip() or code.startswith(("#!", "\x7fELF")):
        return False
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return re.search(r"^(async\s+def|def|class|import|from\s+\S+\s+import)\s", code,
                         re.MULTILINE) is not None


def function_worker(path, name):
    """The warm interpreter of a Python action (started with ``python3 -u``, so its
    logs stream): imports ``path`` once, acks on fd 3, then for each JSON line on
    stdin calls ``name(value)`` with that activation's ``__OW_*`` variables and
    writes ``[status, payload]`` on fd 3.  The protocol's descriptors move out of
    the action's way: its stdin and fd 3 are /dev/null."""
    requests = os.fdopen(os.dup(0), "rb")
    results = os.fdopen(os.dup(3), "wb")
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    os.dup2(0, 3)
    sys.stdin = open(os.devnull)
    main = load_function(path, name)
    reply(results, '{"ok": true}')
    for line in requests:
        reply(results, "[%d, %s]" % call_function(main, json.loads(line)))


def reply(results, line):
    """Writes a line of the protocol after the logs that came before it."""
    flush_python_streams()
    results.write(line.encode("ascii") + b"\n")
    results.flush()


def load_function(path, name):
    """The function ``name`` of the Python file ``path``, its folder and its
    ``virtualenv/`` on the import path.  Exits with the traceback when it cannot."""
    import glob
    import importlib.util
    import site
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)
    for packages in glob.glob(os.path.join(folder, "virtualenv", "lib", "python3*",
                                           "site-packages")):
        site.addsitedir(packages)
    try:
        spec = importlib.util.spec_from_file_location("main__", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["main__"] = module
        spec.loader.exec_module(module)
    except BaseException as error:
        print_user_traceback(error)
        sys.exit(1)
    function = getattr(module, name, None)
    if not callable(function):
        sys.stderr.write("%s defines no function %r\n" % (path, name))
        sys.exit(1)
    return function


def print_user_traceback(error):
    """The traceback from the action's own code on: the proxy's frames are noise there."""
    import traceback
    frames = error.__traceback__
    while frames and (frames.tb_frame.f_code.co_filename == OWPROXY_FILE
                      or frames.tb_frame.f_code.co_filename.startswith("<frozen")):
        frames = frames.tb_next
    traceback.print_exception(type(error), error, frames)


def call_function(main, message):
    """Calls ``main`` for one activation; returns ``(status, payload as JSON text)``."""
    fields = exported(((key.upper(), value) for key, value in message.items()
                       if key != "value"), prefix="__OW_")
    saved = {key: os.environ.get(key) for key in fields}
    os.environ.update(fields)
    try:
        result = main(message.get("value", {}))
    except Exception as error:
        print_user_traceback(error)
        return 200, json.dumps({"error": str(error)})
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        text = json.dumps(result, allow_nan=False)  # ASCII: lone surrogates travel too
    except (TypeError, ValueError, RecursionError) as error:
        message = RUN_UNENCODABLE.format(type(result).__name__, error)
        return 502, json.dumps({"error": message})
    if not isinstance(result, (dict, list)):
        print(text)
        return 502, json.dumps({"error": RUN_BAD_RESULT})
    return 200, text


# -- the runner ------------------------------------------------------------------

class ActionRunner:
    """Prepares and runs the action.  Subclass it to change one step, keeping the
    upstream dockerskeleton hook names:

    - ``init(message)``      installs ``message['code']``, then calls the three below
    - ``epilogue(message)``  adds to the installed source (default: nothing)
    - ``build(message)``     turns the source into ``self.binary`` (default: nothing)
    - ``verify()``           True when the action can run
    - ``env(message)``       the environment of one activation
    - ``run(args, env)``     runs one activation, returns ``(status, result)``

    ``epilogue`` or ``build`` returning False, or raising, fails the init, and
    the action directory is put back as it was.  Start the proxy with a runner
    of your own with ``setRunner(MyRunner())`` then ``main()``.

    An action is one of three kinds: "exec" (a process per activation), "loop"
    (an ActionLoop executable kept warm, with ``--loop``) or "function" (a
    Python ``main(args)`` in a warm interpreter).
    """

    LOG_SENTINEL = LOG_SENTINEL

    def __init__(self, source=None, binary=None, zipdest=None):
        self.source, self.binary, self.zipdest = source, binary, zipdest
        self.settings = Settings()
        self.logs = Logs()
        self.processes = Processes()
        self.init_env = {}
        self.kind = None  # decided by init, or from the action directory at the first run
        self.function = None  # (file, function name) of a Python action
        self.pool = None  # the warm processes of a "loop" or "function" action
        self.lock = threading.Lock()

    def configure(self, settings, logs, processes):
        """Called once by the proxy before it serves; paths default into the action dir."""
        self.settings, self.logs, self.processes = settings, logs, processes
        self.binary = self.binary or os.path.join(settings.action_dir, "exec")
        self.source = self.source or self.binary
        self.zipdest = self.zipdest or os.path.dirname(self.source)
        try:  # as upstream: the hooks may use paths relative to the source
            os.chdir(os.path.dirname(self.source) or ".")
        except OSError as error:
            raise ConfigError("cannot work in the folder of %s: %s" % (self.source,
                                                                        error.strerror))

    # -- init ------------------------------------------------------------------

    def init(self, message):
        """Installs the code of an /init ``value``; True if the action is ready to run."""
        previous = self.kind, self.function, self.pool
        try:
            env = self.init_environment(message)
            with self.install(message):
                if message.get("code") is not None and (
                        self.epilogue(message) is False or self.build(message) is False):
                    raise InitError("the action could not be built")
                if not self.verify():
                    raise InitError(self.unverified(message))
                self.pool = self.warm_up(env)
        except Exception as error:
            self.logs.note(str(error) if isinstance(error, InitError)
                           else "the action could not be initialized: %s" % error)
            self.kind, self.function, self.pool = previous
            return False
        if previous[2] is not None:
            previous[2].close(0.0)
        self.init_env = env
        return True

    def init_environment(self, message):
        env = message.get("env")
        if env is None:
            return {}
        if not isinstance(env, dict):
            raise InitError("env must be a JSON object, not %s" % json_type(env))
        try:
            return exported(env.items())
        except ValueError as error:
            raise InitError("env: %s" % error)

    def install(self, message):
        """Stages the code of the message and returns the Installation that moves it
        into place; decides the kind of action on the way."""
        code = message.get("code")
        binary = message.get("binary", False)
        if not isinstance(binary, bool) and binary is not None:
            raise InitError("binary must be true or false, not %s" % json_type(binary))
        main = message.get("main") or "main"
        if not isinstance(main, str):
            raise InitError("main must be a string, not %s" % json_type(main))
        if code is None:
            self.decide_kind(os.path.dirname(self.binary), main)
            return contextlib.nullcontext()  # keep what the action directory holds
        if not isinstance(code, str):
            raise InitError("code must be a string, not %s" % json_type(code))
        data = decode_base64(code) if binary else None
        folder = self.zipdest if binary else os.path.dirname(self.source)
        stage = stage_dir(folder)
        try:
            if binary:
                extract_zip(data, stage, self.settings.max_archive)
            else:
                self.write_source(stage, code)
            self.decide_kind(stage, main)
            if binary:
                self.prepare_archive(stage)
        except BaseException:
            remove_tree(stage)
            raise
        return Installation(stage, folder, self.displaced(stage, folder))

    def displaced(self, stage, folder):
        """The old executable goes when the new code does not replace it (a Python
        function's source, an archive without one, a source to build), so that a
        failed init puts it back, and a build that fails leaves no half-new one."""
        name = os.path.relpath(self.binary, folder)
        if name.startswith(os.pardir) or os.path.lexists(os.path.join(stage, name)):
            return ()
        return (name,)

    def write_source(self, stage, code):
        """The source as the source file, or as ``__main__.py`` if it is a Python function."""
        python = self.source == self.binary and looks_like_python(code)
        path = os.path.join(stage, "__main__.py" if python else os.path.basename(self.source))
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as source:
            source.write(code)
        os.chmod(path, 0o644 if python else 0o755)

    def decide_kind(self, folder, main="main"):
        """An ``exec`` runs as a process ("exec", or "loop" with --loop); without
        one, a ``__main__.py`` is a Python function."""
        script = os.path.join(folder, "__main__.py")
        binary = os.path.join(folder, os.path.basename(self.binary))
        if not os.path.lexists(binary) and os.path.isfile(script):
            self.kind = "function"
            self.function = (os.path.join(os.path.dirname(self.binary), "__main__.py"), main)
        else:
            self.kind = "loop" if self.settings.loop else "exec"
            self.function = None

    def prepare_archive(self, stage):
        """The archive's executable runs whatever its mode bits (one a build makes
        later, or one outside the archive's directory, is the build's business)."""
        name = os.path.relpath(self.binary, self.zipdest)
        staged = os.path.join(stage, name)
        if (self.kind != "function" and not name.startswith(os.pardir)
                and os.path.isfile(staged) and not os.path.islink(staged)):
            os.chmod(staged, 0o755)

    def unverified(self, message):
        """Why ``verify()`` failed, as the user should read it."""
        if message.get("binary") and message.get("code") is not None:
            return "the archive has no %s file (or __main__.py) at its top level" % (
                os.path.relpath(self.binary, self.zipdest))
        return "%s is not an executable file" % self.binary

    def epilogue(self, message):
        return None

    def build(self, message):
        return None

    def verify(self):
        if self.current_kind() == "function":
            return os.path.isfile(self.function[0])
        return os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)

    def current_kind(self):
        """The kind decided by the last init, else by what the action directory holds."""
        if self.kind is None:
            self.decide_kind(os.path.dirname(self.binary))
        return self.kind

    def warm_up(self, init_env):
        """The pool of a warm action, its first process started to prove it can."""
        if self.kind == "exec":
            return None
        pool = self.warm_pool(init_env)
        pool.release(pool.acquire(self.logs))
        return pool

    def warm_pool(self, init_env):
        """The pool, empty, with the environment its processes start with; an
        ActionLoop executable learns that it must ack as openwhisk-runtime-go says."""
        env = dict(os.environ)
        env.update(init_env)
        if env.get("OW_WAIT_FOR_ACK"):
            env["__OW_WAIT_FOR_ACK"] = "1"
        return WarmPool(self.start_warm, env)

    def start_warm(self, env):
        """A new warm process for this action (InitError when it does not come up)."""
        cwd = os.path.dirname(self.binary)
        try:
            if self.kind == "function":
                process = FunctionProcess(
                    [sys.executable, "-u", OWPROXY_FILE, "function-worker"]
                    + list(self.function), env, cwd, self.logs, self.processes)
            else:
                process = WarmProcess([self.binary], env, cwd, self.logs, self.processes)
        except OSError as error:
            raise InitError("cannot start the action: %s" % error)
        return process.start(self.kind == "function" or "__OW_WAIT_FOR_ACK" in env)

    def close(self, grace):
        """Ends the warm processes, if any, at shutdown."""
        if self.pool is not None:
            self.pool.close(grace)

    # -- run -------------------------------------------------------------------

    def env(self, message):
        """The container's environment, the init ``env``, then this activation's
        fields as ``__OW_<KEY>``: a fresh dict, never the proxy's own."""
        try:
            fields = exported(((key.upper(), value) for key, value in message.items()
                               if key != "value"), prefix="__OW_")
        except ValueError as error:
            raise HTTPError(400, "Activation field %s" % error)
        env = ActivationEnv(os.environ, fields)
        env.update(self.init_env)
        env.update(fields)
        return env

    def run(self, args, env):
        """Runs one activation with ``args``; returns ``(status, result)``."""
        if self.current_kind() == "exec":
            data = json.dumps(args)
            argv = [self.binary] if len(data) > MAX_ARG_STRLEN else [self.binary, data]
            return run_once(argv, data.encode(), env, os.path.dirname(self.binary),
                            self.logs, self.processes)
        with self.lock:
            self.pool = self.pool or self.warm_pool(self.init_env)
        pool = self.pool
        try:
            process = pool.acquire(self.logs)
        except InitError as error:
            self.logs.note(str(error))
            return 502, {"error": RUN_EXITED}
        fields = getattr(env, "fields", env)  # a runner's own env() may give a plain dict
        message = {key[len("__OW_"):].lower(): value for key, value in fields.items()
                   if key.startswith("__OW_")}
        message["value"] = args
        try:
            return process.request(message, deadline_of(env))
        finally:
            pool.release(process)


class ActivationEnv(dict):
    """An activation's environment, which knows the activation's own fields among
    its entries: a warm process gets those (and only those) on its input line."""

    def __init__(self, base, fields):
        dict.__init__(self, base)
        self.fields = fields


def json_type(value):
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


# ============================================================================
# 6. Platforms
# ============================================================================

class OpenWhisk:
    """The OpenWhisk routes: POST /init once, then POST /run per activation."""

    def __init__(self, settings, runner, logs):
        self.settings, self.runner, self.logs = settings, runner, logs
        self.initialized = False
        self.serial = contextlib.nullcontext() if settings.concurrent else threading.Lock()

    def routes(self):
        return {
            "/init": Route(self.init, sentinels=lambda status: status not in (200, 403)),
            "/run": Route(self.run, lock=self.serial, sentinels=lambda status: True),
        }

    def init(self, request):
        if self.sealed():
            return self.refuse_init()  # whatever the body, as upstream does
        message = request.json()
        value = message.get("value", {}) if isinstance(message, dict) else None
        if not isinstance(value, dict):
            raise HTTPError(400, "The init body must be a JSON object whose value is an object.")
        return self.initialize(value)

    def sealed(self):
        return self.initialized and not self.settings.allow_reinit

    def refuse_init(self):
        self.logs.err((INIT_TWICE + "\n").encode())
        self.logs.note("hint: to replace the action, start the proxy with --allow-reinit "
                       "(PROXY_ALLOW_REINIT=1), for local development only")
        return 403, {"error": INIT_TWICE}

    def initialize(self, value):
        try:
            ready = self.runner.init(value)
        except Exception as error:  # a runner whose own init raises
            self.logs.note("the action could not be initialized: %s" % error)
            ready = False
        if not ready:
            return 502, {"error": INIT_FAILED}
        self.initialized = True
        return 200, {"ok": True}

    def run(self, request):
        message = request.json()
        if not isinstance(message, dict):
            return 404, {"error": RUN_BAD_ARGUMENT}
        unknown = sorted(set(message) - ACTIVATION_FIELDS)
        if "value" not in message and unknown:
            self.logs.note("hint: the /run body has no \"value\", so the action gets no "
                           "parameters; %s %s no activation field: send {\"value\": {...}}"
                           % (", ".join(unknown), "is" if len(unknown) == 1 else "are"))
        return self.activate(message)

    def activate(self, message):
        """Runs the action for a /run body: ``value`` and the activation fields."""
        value = message.get("value", {})
        if not isinstance(value, (dict, list)):
            return 404, {"error": RUN_BAD_ARGUMENT}
        if not self.runner.verify():
            self.logs.note(self.no_binary())
            return 502, {"error": RUN_NO_BINARY}
        return self.runner.run(value, self.runner.env(message))

    def no_binary(self):
        """What is wrong with the executable, and what to do."""
        binary = self.runner.binary
        if os.path.exists(binary):
            return "%s is not executable: chmod +x it, or POST /init with the code" % binary
        return ("%s is missing: POST /init with the action's code first, or put an "
                "executable exec in the image" % binary)


# The fields of a /run body besides "value", as the invoker sends them.
ACTIVATION_FIELDS = frozenset(("namespace", "action_name", "action_version", "activation_id",
                               "transaction_id", "deadline", "api_key"))


class Knative(OpenWhisk):
    """The Knative routes: one path, ``/``, that initialises, runs, or both.

    A request body may carry ``init`` (an /init value, plus ``raw`` and
    ``name``), ``activation`` (the activation fields) and ``value`` (the
    parameters).  Any other request is a plain web request, whose parameters
    come from its query and body as an OpenWhisk web action's do.  With
    ``__OW_ACTION_CODE`` set the container is dedicated to that action and
    initialises itself.  A result with ``statusCode``, ``headers`` or ``body``
    becomes that response.  Every answer carries CORS headers (unless the action
    set its own), and a CORS preflight (OPTIONS, unless the action takes OPTIONS
    itself) is answered at once, without the action.
    """

    ENVELOPE = ("init", "activation", "value")

    def __init__(self, settings, runner, logs, environ):
        OpenWhisk.__init__(self, settings, runner, logs)
        self.dedicated = dedicated_init(environ)
        self.namespace = environ.get("__OW_NAMESPACE", "")
        self.accepted = None  # the init this container took, to recognise a repeat of it
        self.raw = False
        self.name = ""

    def routes(self):
        methods = tuple(dict.fromkeys(self.settings.http_methods + ("OPTIONS",)))
        return {"/": Route(self.handle, methods=methods, lock=self.serial,
                           sentinels=lambda status: status != 403, headers=CORS.items(),
                           preflight="OPTIONS" not in self.settings.http_methods)}

    def handle(self, request):
        if self.dedicated is not None and not self.initialized:
            status, payload = self.knative_init(self.dedicated)
            if status != 200:
                return status, payload
        envelope, plain = self.envelope(request)
        init = envelope.get("init")
        if init is not None:
            if self.dedicated is not None:
                raise HTTPError(403, DEDICATED)
            status, payload = self.knative_init(init)
            if status != 200 or not set(envelope) & {"activation", "value"}:
                return status, payload
        return self.web_activate(request, envelope, plain)

    def envelope(self, request):
        """The body as ``{init, activation, value}``, and whether the request was a
        plain web request, its parameters made here."""
        try:
            body = request.json()
        except HTTPError:
            if not self.raw and is_json_type(request.headers.get("Content-Type")):
                raise
            body = None
        if isinstance(body, dict) and set(body) & set(self.ENVELOPE):
            return body, False
        return {"value": self.web_parameters(request, body)}, True

    def web_parameters(self, request, body):
        """A plain web request's parameters: in raw mode its body (text, or base64 if
        it is not UTF-8) and query as they are; else its query, and a body that is a
        JSON object or a form merged in, any other body as ``__ow_body``."""
        if self.raw:
            return {"__ow_body": body_text(request.body), "__ow_query": request.query}
        params = parse_query(request.query)
        content_type = request.headers.get("Content-Type", "").lower()
        if isinstance(body, dict):
            params.update(body)
        elif content_type.startswith("application/x-www-form-urlencoded"):
            params.update(parse_query(request.body.decode("utf-8", "replace")))
        elif request.body.strip():
            params["__ow_body"] = body_text(request.body)
        return params

    def knative_init(self, init):
        if not isinstance(init, dict):
            raise HTTPError(400, "init must be a JSON object.")
        raw, name = init.get("raw", False), init.get("name", "")
        if not isinstance(raw, bool) or not isinstance(name, str):
            raise HTTPError(400, "init.raw must be true or false and init.name a string.")
        key = json.dumps(init, sort_keys=True)
        if self.initialized and key == self.accepted:
            return 200, {"ok": True}  # the same init again: clients may send it every time
        if self.sealed():
            return self.refuse_init()
        status, payload = self.initialize(init)
        if status == 200:
            self.accepted, self.raw, self.name = key, raw, name
        return status, payload

    def web_activate(self, request, envelope, plain):
        activation = envelope.get("activation") or {}
        if not isinstance(activation, dict):
            raise HTTPError(400, "activation must be a JSON object.")
        params = envelope.get("value", {})
        if self.raw and not plain:
            params = {"__ow_body": params if isinstance(params, str) else json.dumps(params),
                      "__ow_query": request.query}
        elif isinstance(params, dict) and not plain:
            params = dict(parse_query(request.query), **params)
        if isinstance(params, dict):
            params = dict(params, __ow_method=request.method.lower(), __ow_path="",
                          __ow_headers={k.lower(): v for k, v in request.headers.items()},
                          __ow_user=activation.get("namespace") or self.namespace)
        message = dict(activation, value=params)
        if not message.get("action_name") and self.name:
            message["action_name"] = self.name
        status, result = self.activate(message)
        if status == 200 and isinstance(result, dict) and set(result) & {
                "statusCode", "headers", "body"}:
            return web_response(result)
        return status, result


def dedicated_init(environ):
    """The init of a container dedicated to one action by its environment, or None."""
    if not environ.get("__OW_ACTION_CODE"):
        return None
    return {"code": environ["__OW_ACTION_CODE"],
            "main": environ.get("__OW_ACTION_MAIN") or "main",
            "binary": environ.get("__OW_ACTION_BINARY", "").lower() == "true",
            "raw": environ.get("__OW_ACTION_RAW", "").lower() == "true",
            "name": environ.get("__OW_ACTION_NAME", "")}


def is_json_type(content_type):
    """True for a JSON content type, and for none at all."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def parse_query(query):
    from urllib.parse import parse_qsl
    return dict(parse_qsl(query))


def body_text(body):
    """A raw body as text: as it is when it is UTF-8, else base64 (OpenWhisk's rule)."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        import base64
        return base64.b64encode(body).decode("ascii")


CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "OPTIONS, GET, DELETE, POST, PUT, HEAD, PATCH",
    "Access-Control-Allow-Headers": "Authorization, Origin, X-Requested-With, Content-Type, "
                                    "Accept, User-Agent",
}

# Headers the proxy writes itself: an action's own would contradict them.
FRAMING_HEADERS = ("content-length", "transfer-encoding", "connection")


def web_response(result):
    """The HTTP response a web action's ``{statusCode, headers, body}`` describes:
    a header whose value is an array is sent once per element, as OpenWhisk does."""
    status = web_status(result.get("statusCode", 200))
    headers = result.get("headers")
    headers = {} if headers is None else headers
    if status is None or not isinstance(headers, dict):
        return 502, {"error": WEB_BAD_RESULT}
    pairs = [(str(name), env_string(value))
             for name, values in headers.items() if str(name).lower() not in FRAMING_HEADERS
             for value in (values if isinstance(values, list) else [values])]
    if not all(valid_header(name, value) for name, value in pairs):
        return 502, {"error": WEB_BAD_RESULT}
    content_type = next((value for name, value in pairs if name.lower() == "content-type"),
                        None)
    body = result.get("body")
    if body is None or body == "":
        data = b""
        status = 204 if status == 200 else status
    elif isinstance(body, str) and (content_type or "").lower().startswith("image/"):
        try:
            data = decode_base64(body)
        except InitError:
            return 502, {"error": WEB_BAD_RESULT}
    elif isinstance(body, str):
        data = body.encode("utf-8", "surrogateescape")
        content_type = content_type or "text/html; charset=utf-8"
    else:
        data = json_bytes(body)
        content_type = content_type or "application/json"
    if content_type:
        pairs = [(name, value) for name, value in pairs if name.lower() != "content-type"]
        pairs.append(("Content-Type", content_type))
    return status, WebResponse(data, pairs)


def web_status(code):
    """A web action's statusCode as an int (a number or a string of digits, as
    OpenWhisk takes it), or None when it is none the proxy can send."""
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code)
    if isinstance(code, float) and code.is_integer():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 200 <= code <= 599:
        return code
    return None


HEADER_NAME = frozenset("!#$%&'*+-.^_`|~0123456789"
                        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def valid_header(name, value):
    """A header http.server can write as it is (RFC 9110): a token for a name,
    visible Latin-1 characters, spaces and tabs for a value, so that no action
    can split the response."""
    return (bool(name) and set(name) <= HEADER_NAME
            and all(c == "\t" or " " <= c <= "~" or "\x80" <= c <= "\xff" for c in value))


def health_routes(server):
    """Liveness and readiness for Kubernetes, Knative and Docker: never locked,
    never in the logs; readiness fails once shutdown has begun."""
    def live(request):
        return 200, {"status": "ok"}

    def ready(request):
        if server.stopping:
            return 503, {"ready": False, "reason": "shutting down"}
        return 200, {"ready": True}

    return {path: Route(handle, methods=("GET", "HEAD"), lock=contextlib.nullcontext(),
                        quiet=True)
            for path, handle in ((LIVENESS_PATH, live), (READINESS_PATH, ready))}


# ============================================================================
# 7. Client: trying an action locally, and talking to a running container
# ============================================================================

class ClientError(Exception):
    """A client command cannot go on; reported in one line, exit status 2."""


def action_init(path, main):
    """The /init value for an action on disk: an executable, a source file, a zip,
    a C source file (compiled here), or a directory (zipped here, with its ``exec``
    or ``__main__.py``, or an ``action.c`` to compile into ``exec``)."""
    import base64
    import zipfile
    if os.path.isdir(path):
        files = directory_files(path)
        if "exec" not in files and "__main__.py" not in files and "action.c" in files:
            files["exec"] = compile_c(os.path.join(path, "action.c"))
        if "exec" not in files and "__main__.py" not in files:
            raise ClientError("the directory %s has no exec or __main__.py" % path)
        return {"code": base64.b64encode(zip_files(files, path)).decode(), "binary": True,
                "main": main}
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ClientError("cannot read the action %s: %s" % (path, error.strerror))
    if zipfile.is_zipfile(path):
        return {"code": base64.b64encode(data).decode(), "binary": True, "main": main}
    if path.endswith(".c"):
        data = compile_c(path)
    try:
        return {"code": data.decode("utf-8"), "binary": False, "main": main}
    except UnicodeDecodeError:
        return {"code": base64.b64encode(zip_files({"exec": data})).decode(), "binary": True,
                "main": main}


def compile_c(source):
    """The executable ``cc`` makes of a C source file, as the image's build would."""
    import shutil
    import tempfile
    if not shutil.which("cc"):
        raise ClientError("%s is C source and there is no cc here to compile it: compile it "
                          "yourself (cc -O2 -o action %s) and invoke the binary" % (source, source))
    with tempfile.TemporaryDirectory(prefix="owproxy-cc-") as folder:
        binary = os.path.join(folder, "exec")
        built = subprocess.run(["cc", "-O2", "-o", binary, source], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
        if built.returncode != 0:
            sys.stderr.write(built.stdout.decode("utf-8", "replace"))
            raise ClientError("cc could not compile %s (its messages are above)" % source)
        with open(binary, "rb") as file:
            return file.read()


def directory_files(folder):
    """``{relative name: bytes}`` of every file below ``folder``."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as file:
                    files[os.path.relpath(path, folder)] = file.read()
            except OSError as error:
                raise ClientError("cannot read %s: %s" % (path, error.strerror))
    return files


def zip_files(files, folder=None):
    """A zip of ``{name: bytes}``, each with the mode it has in ``folder`` (exec: 0755)."""
    import io
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(name)
            path = os.path.join(folder, name) if folder else None
            mode = os.stat(path).st_mode if path and os.path.exists(path) else 0o100755
            info.external_attr = (mode & 0xFFFF) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


def parameters(args):
    """The action's parameters: a JSON file (``-P``, ``-`` for stdin), then a JSON
    object or array, then ``-p KEY VALUE`` pairs (a VALUE that is JSON is taken as
    JSON, else as a string)."""
    value = {}
    if args.param_file:
        value = json_object(args.param_file, "the parameters file %s" % args.param_file)
    if args.params:
        try:
            given = json.loads(args.params)
        except ValueError as error:
            raise ClientError("the parameters are not JSON: %s" % error)
        if not isinstance(given, (dict, list)):
            raise ClientError("the parameters must be a JSON object or array")
        value = dict(value, **given) if isinstance(given, dict) else given
    for key, text in args.param or ():
        if not isinstance(value, dict):
            raise ClientError("-p needs the parameters to be an object, not an array")
        try:
            value[key] = json.loads(text)
        except ValueError:
            value[key] = text
    return value


def json_object(path, what):
    """The JSON object in the file ``path`` (``-``: stdin)."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        value = json.loads(text)
    except OSError as error:
        raise ClientError("cannot read %s: %s" % (what, error.strerror))
    except ValueError as error:
        raise ClientError("%s is not JSON: %s" % (what, error))
    if not isinstance(value, dict):
        raise ClientError("%s must hold a JSON object, not %s" % (what, json_type(value)))
    return value


def init_env(args):
    """The init ``env``: ``--env-file`` lines (KEY=VALUE, # comments), then ``-e KEY VALUE``."""
    env = {}
    if args.env_file:
        try:
            with open(args.env_file, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except OSError as error:
            raise ClientError("cannot read the env file %s: %s" % (args.env_file,
                                                                    error.strerror))
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                key, equals, text = line.partition("=")
                if not equals or not key.strip():
                    raise ClientError("%s line %d: not KEY=VALUE" % (args.env_file, number))
                env[key.strip()] = text
    env.update(args.env or ())
    return env


def init_value(args, name):
    """The /init ``value`` for the action the command line names."""
    value = dict(action_init(args.action, args.main), name=name)
    env = init_env(args)
    if env:
        value["env"] = env
    return value


def activation(name, timeout):
    """The activation fields the invoker would send for one run."""
    import uuid
    return {"namespace": "guest", "action_name": "/guest/" + name, "action_version": "0.0.1",
            "activation_id": uuid.uuid4().hex, "transaction_id": uuid.uuid4().hex,
            "deadline": str(int((time.time() + timeout) * 1000))}


def post(url, path, payload, timeout):
    """POSTs JSON to a proxy; returns ``(status, decoded JSON or text)``."""
    import http.client
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url if "//" in url else "http://" + url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("not http://HOST:PORT")
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                                timeout=timeout)
    except ValueError as error:
        raise ClientError("%r is not the URL of an action container: %s" % (url, error))
    try:
        connection.request("POST", parts.path.rstrip("/") + path, json.dumps(payload),
                           {"Content-Type": "application/json"})
        reply = connection.getresponse()
        body = reply.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as error:
        reason = " ".join(str(error).split()) or type(error).__name__  # one line, always
        if isinstance(error, ConnectionRefusedError):
            reason += " (is an action container, or make run, serving there?)"
        raise ClientError("cannot reach %s: %s" % (url, reason))
    finally:
        connection.close()
    try:
        return reply.status, json.loads(body)
    except ValueError:
        return reply.status, body


def outcome(what, status, payload):
    """Says on stderr what went wrong; returns the exit status: 0 success, 1
    application error, 2 developer error (also an activation's statusCode)."""
    if status != 200:
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        sys.stderr.write("owproxy: %s answered %d: %s\n" % (what, status, error))
        return 2
    if isinstance(payload, dict) and "error" in payload:
        sys.stderr.write("owproxy: %s answered an application error: %s\n"
                         % (what, payload["error"]))
        return 1
    return 0


def show(payload):
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def activation_record(message, name, times, code, payload, logs):
    """What ``wsk activation get`` shows of one run (times in ms since the epoch)."""
    start, end = (int(moment * 1000) for moment in times)
    result = payload if isinstance(payload, (dict, list)) else {"error": payload}
    return {"namespace": message["namespace"], "name": name,
            "version": message["action_version"], "subject": message["namespace"],
            "activationId": message["activation_id"], "start": start, "end": end,
            "duration": end - start, "statusCode": code,
            "response": {"status": ACTIVATION_STATUS[code], "statusCode": code,
                         "success": code == 0, "result": result},
            "logs": logs, "annotations": [{"key": "path", "value": "guest/" + name}],
            "publish": False}


ACTIVATION_STATUS = {0: "success", 1: "application error", 2: "action developer error"}


class LogRelay:
    """Copies the local proxy's stdout and stderr to this stderr as their lines come,
    in the order they come, without the sentinels; on a terminal each line is marked
    with its stream.  Keeps each line, as ``wsk`` shows it, for the activation record."""

    marks = {"stdout": "\033[2mout|\033[0m ", "stderr": "\033[31merr|\033[0m "}

    def __init__(self, stdout, stderr, marked):
        self.pipes = {stdout: "stdout", stderr: "stderr"}
        self.marked = marked
        self.lines = []
        self.sentinels = dict.fromkeys(self.pipes.values(), 0)
        self.changed = threading.Condition()
        self.ended = False
        self.thread = threading.Thread(target=self.relay, daemon=True)
        self.thread.start()

    def relay(self):
        selector = selectors.DefaultSelector()
        for pipe, stream in self.pipes.items():
            selector.register(pipe, selectors.EVENT_READ,
                              LineForwarder(functools.partial(self.show, stream)))
        while selector.get_map():
            for key, _ in selector.select():
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data.feed(chunk)
                else:
                    key.data.close()
                    selector.unregister(key.fileobj)
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def show(self, stream, data):
        now = time.time()
        for line in data.decode("utf-8", "replace").splitlines():
            with self.changed:
                if line == LOG_SENTINEL:
                    self.sentinels[stream] += 1
                    self.changed.notify_all()
                    continue
                self.lines.append("%s.%06dZ %s: %s" % (
                    time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
                    now % 1 * 1e6, stream, line))
            sys.stderr.write((self.marks[stream] if self.marked else "") + line + "\n")
            sys.stderr.flush()

    def wait_for_sentinels(self, count, timeout=10.0):
        """Waits until both streams have closed ``count`` activations' logs."""
        with self.changed:
            self.changed.wait_for(lambda: self.ended or min(self.sentinels.values()) >= count,
                                  timeout)

    def take(self):
        """The lines since the last take."""
        with self.changed:
            lines, self.lines = self.lines, []
        return lines


class LocalProxy:
    """A proxy of invoke's own on a free loopback port, its logs relayed live.  It
    has no grace period, so that an interrupted ``invoke`` stops at once."""

    def __init__(self, loop):
        import tempfile
        self.folder = tempfile.mkdtemp(prefix="owproxy-invoke-")
        action_dir = os.path.join(self.folder, "action")
        os.mkdir(action_dir)
        # The local proxy is an OpenWhisk one whatever this shell's proxy settings say.
        env = {key: value for key, value in os.environ.items()
               if key not in {setting.env for setting in SETTINGS}}
        for _ in range(5):  # a program that picked the same port earlier may bind it first
            with reserved_port() as reservation:
                self.port = reservation.getsockname()[1]
                self.process = subprocess.Popen(
                    [sys.executable, OWPROXY_FILE, "--host", "127.0.0.1", "--port",
                     str(self.port), "--action-dir", action_dir, "--grace", "0"]
                    + (["--loop"] if loop else []),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                try:
                    failure = self.wait_ready()
                except BaseException:  # Ctrl-C while it starts: leave nothing behind
                    self.process.kill()
                    self.process.wait()
                    remove_tree(self.folder)
                    raise
            if failure is None or "Address already in use" not in failure:
                break
        if failure is not None:
            remove_tree(self.folder)
            raise ClientError("the local proxy did not start: %s" % failure)
        self.url = "http://127.0.0.1:%d" % self.port
        self.relay = LogRelay(self.process.stdout, self.process.stderr, sys.stderr.isatty())
        self.activations = 0

    def wait_ready(self):
        """None once the proxy listens, else why it did not start: its own stderr."""
        import socket
        end = time.monotonic() + 30
        while self.process.poll() is None and time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return None
            except OSError:
                time.sleep(0.01)
        self.process.kill()
        out, err = self.process.communicate()
        text = " ".join(err.decode("utf-8", "replace").split())
        return text.replace("owproxy: ", "") or "it did not listen within 30 s"

    def post(self, path, payload, timeout):
        """POSTs to the local proxy; returns its answer once the logs it closed are shown."""
        status, answer = post(self.url, path, payload, timeout)
        if path == "/run" or status not in (200, 403):  # the answers that write sentinels
            self.activations += 1
            self.relay.wait_for_sentinels(self.activations)
        return status, answer

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.relay.thread.join(5)
        self.process.stdout.close()
        self.process.stderr.close()
        remove_tree(self.folder)


def reserved_port():
    """A socket bound to a free loopback port and not listening: while it is open
    no other program is given that port, yet the proxy may bind it too (both
    with SO_REUSEADDR) and listen on it."""
    import socket
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.bind(("127.0.0.1", 0))
    return probe


def invoke(args):
    """Runs an action the way the invoker would, on a proxy of its own."""
    name = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.action)))[0]
    init = init_value(args, name)
    value = parameters(args)
    proxy = LocalProxy(args.loop)
    try:
        status, payload = proxy.post("/init", {"value": init}, args.timeout + 5)
        if status != 200:
            return outcome("/init", status, payload)
        worst = 0
        for number in range(1, args.repeat + 1):
            message = dict(activation(name, args.timeout), value=value)
            started = time.time()
            status, payload = proxy.post("/run", message, args.timeout + 5)
            times = started, time.time()
            sys.stderr.write("owproxy: run%s took %.1f ms\n" % (
                " %d" % number if args.repeat > 1 else "", (times[1] - times[0]) * 1000))
            code = outcome("/run", status, payload)
            worst = max(worst, code)
            if number == args.repeat or code == 2:
                break
            proxy.relay.take()
        if args.activation:
            show(activation_record(message, name, times, code, payload, proxy.relay.take()))
        elif status == 200:
            show(payload)
        return worst
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        sys.stderr.write("owproxy: interrupted; stopping the action\n")
        return 130
    finally:
        proxy.close()


def client_init(args):
    status, payload = post(args.url, "/init", {"value": init_value(args, args.name)},
                           args.timeout + 5)
    if status == 200:
        show(payload)
    return outcome("/init", status, payload)


def client_run(args):
    message = dict(activation(args.name, args.timeout), value=parameters(args))
    status, payload = post(args.url, "/run", message, args.timeout + 5)
    if status == 200:
        show(payload)
    return outcome("/run", status, payload)


def client_parser():
    parser = argument_parser(prog="owproxy.py", description=(
        "Try an action locally (invoke), or talk to a running action container (init, run). "
        "Exit status: 0 success, 1 application error, 2 developer error, 130 interrupted."))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    invoke_command = commands.add_parser(
        "invoke", help="run an action on a proxy of its own, as the invoker would",
        description="Run an action on a proxy of its own, as the invoker would: its logs "
                    "stream to stderr as they come, its result ends on stdout.")
    invoke_command.add_argument("action", help="an executable, a source file (a C file is "
                                               "compiled with cc), a zip, or a directory "
                                               "(with exec, __main__.py or action.c)")
    init_command = commands.add_parser("init", help="POST /init to a running container")
    init_command.add_argument("action", help="as for invoke")
    run_command = commands.add_parser("run", help="POST /run to a running container")
    for command in (invoke_command, init_command, run_command):
        command.add_argument("--timeout", type=str, default="60",
                             help="seconds the action may run, its deadline (default: "
                                  "%(default)s)")
        command.add_argument("--name", default=None if command is invoke_command else "action",
                             help="the action's name (default: %s)" % (
                                 "the file's" if command is invoke_command else "%(default)s"))
    for command in (invoke_command, init_command):
        command.add_argument("--main", default="main",
                             help="the entry point (default: %(default)s)")
        command.add_argument("-e", "--env", nargs=2, action="append", metavar=("KEY", "VALUE"),
                             help="an init environment variable for the action")
        command.add_argument("--env-file", metavar="FILE",
                             help="init environment variables, a KEY=VALUE per line")
    for command in (init_command, run_command):
        command.add_argument("--url", default="localhost:8080",
                             help="the container (default: %(default)s)")
    for command in (invoke_command, run_command):
        command.add_argument("params", nargs="?", help="the parameters, a JSON object or array")
        command.add_argument("-p", "--param", nargs=2, action="append",
                             metavar=("KEY", "VALUE"), help="one parameter (VALUE: JSON or text)")
        command.add_argument("-P", "--param-file", metavar="FILE",
                             help="the parameters from a JSON file (-: stdin), as wsk's -P")
    invoke_command.add_argument("--loop", action="store_true",
                                help="keep the executable warm (ActionLoop protocol)")
    invoke_command.add_argument("--repeat", default="1", metavar="N",
                                help="run it N times, warm, timing each run (default: "
                                     "%(default)s)")
    invoke_command.add_argument("--activation", action="store_true",
                                help="print the activation record (id, times, status, logs, "
                                     "result; as wsk activation get) instead of the result")
    return parser


def client_args(argv):
    """The parsed command line of a client command, its values checked."""
    for flag, word in zip(argv, argv[1:]):
        if flag in ("-p", "--param") and "=" in word:  # as curl -d or docker -e would have it
            name, _, given = word.partition("=")
            raise ClientError("%s %s: write -p KEY VALUE, e.g. -p %s %s" % (flag, word, name,
                                                                          given))
    args = client_parser().parse_args(argv)
    args.timeout = flag_value("--timeout", args.timeout, action_seconds)
    if args.command == "invoke":
        args.repeat = flag_value("--repeat", args.repeat, positive_int)
    return args


def positive_int(text):
    number = int(text) if text.strip().isdigit() else 0
    if number < 1:
        raise ValueError("not a positive whole number")
    return number


def action_seconds(text):
    """A time limit as OpenWhisk allows one: 100 ms at least."""
    try:
        seconds = parse_seconds(text)
    except ValueError:
        seconds = 0.0
    if seconds < 0.1:
        raise ValueError("not a time limit in seconds (0.1 or more)")
    return seconds


CLIENT_COMMANDS = {"invoke": invoke, "init": client_init, "run": client_run}


# ============================================================================
# 8. CLI
# ============================================================================

_runner = None


class Shutdown(BaseException):
    """Leaves the serving loop (a BaseException, so that socketserver's ``except
    Exception`` lets it through)."""


def setRunner(runner):
    """Serve with ``runner`` (an ActionRunner) instead of the default one."""
    global _runner
    _runner = runner


def serve(settings, runner):
    """Serves until SIGTERM or SIGINT, then lets activations finish; returns the exit status."""
    logs, processes = Logs(), Processes()
    runner.configure(settings, logs, processes)
    if settings.platform == "knative":
        platform = Knative(settings, runner, logs, os.environ)
    else:
        platform = OpenWhisk(settings, runner, logs)
    try:
        server = ProxyServer(settings, platform.routes(), logs, processes)
    except OSError as error:
        raise ConfigError("cannot listen on %s:%s: %s" % (settings.host, settings.port,
                                                          error.strerror or error))
    server.routes.update(health_routes(server))

    def stop(signum, frame):
        """The first signal ends the serving loop; another one cuts the grace short.
        Only flags: an exception raised here could be swallowed by whatever code the
        signal interrupts (a tracer, a finalizer)."""
        server.hurried = server.stopping
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if settings.verbose or sys.stdout.isatty():
        sys.stderr.write("owproxy %s: serving %s on http://%s:%d\n" % (
            __version__, settings.action_dir, settings.host, server.server_address[1]))
    try:
        server.serve_forever(server.poll_interval)
    except Shutdown:
        pass
    if server.in_flight and settings.grace:
        logs.note("stopping: %d activation(s) in flight get up to %g s to finish (a second "
                  "signal stops them now)" % (server.in_flight, settings.grace))
    elif server.in_flight:
        logs.note("stopping: %d activation(s) in flight are stopped now" % server.in_flight)
    finished = server.serve_until_idle(settings.grace)
    runner.close(1.0 if finished else 0.0)
    processes.kill_all()  # overdue activations
    server.hurried = False
    server.serve_until_idle(2.0)  # their answers
    server.server_close()
    return 0


def main(argv=None):
    """Runs the proxy, or one of its commands, and exits with its status, so that a
    runtime's script may end with a bare ``owproxy.main()`` as with upstream's."""
    sys.exit(run_command(sys.argv[1:] if argv is None else argv))


def run_command(argv):
    """The proxy, or the command ``argv`` names; returns the exit status."""
    if argv[:1] == ["function-worker"]:
        return function_worker(*argv[1:])
    if argv[:1] and argv[0] in CLIENT_COMMANDS:
        try:
            args = client_args(argv)
            return CLIENT_COMMANDS[args.command](args)
        except (ClientError, ConfigError, InitError) as error:
            sys.stderr.write("owproxy: %s\n" % error)
            return 2
        except KeyboardInterrupt:
            sys.stderr.write("owproxy: interrupted\n")
            return 130
    if argv[:1] and not argv[0].startswith("-"):
        return unknown_command(argv[0])
    try:
        settings = resolve_settings(argv, os.environ)
        return serve(settings, _runner or ActionRunner())
    except ConfigError as error:
        sys.stderr.write("owproxy: %s\n" % error)
        return 2


def unknown_command(word):
    import difflib
    close = difflib.get_close_matches(word, list(CLIENT_COMMANDS), 1)
    sys.stderr.write("owproxy: %r is not a command; %s (see owproxy.py --help)\n" % (
        word, "did you mean %s?" % close[0] if close else "the commands are invoke, init, run"))
    return 2


if __name__ == "__main__":
    main()
