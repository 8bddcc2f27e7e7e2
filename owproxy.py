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
bad request or a broken action never takes the proxy down.

The file reads top to bottom:

1. Configuration   settings, each a command-line flag and an environment variable
2. Logs            the action's log streams and the end-of-activation sentinels
3. HTTP layer      the server, a thin request handler, JSON bodies and errors
4. Init            installing code: source, zip archives, atomic replacement
5. Execution       ActionRunner (the subclassable runner) and the process pump
6. Platforms       the OpenWhisk routes
7. CLI             ``main()``
"""

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "1.0.0"


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
INTERNAL_ERROR = "Internal error. {}"

MIB = 1024 * 1024


class ConfigError(Exception):
    """A setting has a value the proxy cannot use; reported in one line."""


def parse_port(text):
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("not a port number")
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
    size = int(text[:-1] if scale > 1 else text) * scale
    if size <= 0:
        raise ValueError("not a positive size")
    return size


def parse_seconds(text):
    seconds = float(text)
    if not seconds >= 0:
        raise ValueError("not a number of seconds")
    return seconds


class Setting:
    """One setting: a command-line flag, an environment variable and a default."""

    def __init__(self, name, flag, env, default, parse, help):
        self.name, self.flag, self.env = name, flag, env
        self.default, self.parse, self.help = default, parse, help


SETTINGS = (
    Setting("host", "--host", "OWPROXY_HOST", "0.0.0.0", str,
            "address to listen on"),
    Setting("port", "--port", "FLASK_PROXY_PORT", 8080, parse_port,
            "port to listen on"),
    Setting("action_dir", "--action-dir", "OWPROXY_ACTION_DIR", "/action", str,
            "directory that holds the action; its 'exec' is what runs"),
    Setting("allow_reinit", "--allow-reinit", "PROXY_ALLOW_REINIT", False, parse_flag,
            "accept /init more than once (local development)"),
    Setting("concurrent", "--concurrent", "__OW_ALLOW_CONCURRENT", False, parse_flag,
            "run activations in parallel instead of one at a time"),
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


def settings_parser():
    parser = argparse.ArgumentParser(
        prog="owproxy.py",
        description="Serve an OpenWhisk action (the /init and /run protocol) over HTTP.",
        epilog="Each flag falls back to its environment variable, then to its default.")
    for setting in SETTINGS:
        text = "%s [env %s, default %s]" % (setting.help, setting.env, setting.default)
        if setting.parse is parse_flag:
            parser.add_argument(setting.flag, dest=setting.name, action="store_const",
                                const=True, default=None, help=text)
        else:
            parser.add_argument(setting.flag, dest=setting.name, type=setting.parse,
                                default=None, metavar=setting.name.upper(), help=text)
    return parser


def resolve_settings(argv, environ):
    """Flags win over environment variables, which win over defaults."""
    given = vars(settings_parser().parse_args(argv))
    values = {}
    for setting in SETTINGS:
        if given[setting.name] is not None:
            values[setting.name] = given[setting.name]
        elif setting.env in environ:
            try:
                values[setting.name] = setting.parse(environ[setting.env])
            except ValueError as error:
                raise ConfigError("%s=%r: %s" % (setting.env, environ[setting.env], error))
    settings = Settings(**values)
    check_action_dir(settings.action_dir)
    return settings


def check_action_dir(path):
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
        if not name or "=" in key or "\0" in key or "\0" in text:
            raise ValueError("%r cannot be exported as an environment variable" % name)
        entries[key] = text
    return entries


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
        line = (LOG_SENTINEL + "\n").encode()
        self.out(line)
        self.err(line)


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

class HTTPError(Exception):
    """An answer other than success, raised from anywhere in a request."""

    def __init__(self, status, message, close=False):
        Exception.__init__(self, message)
        self.status, self.message, self.close = status, message, close


class Route:
    """What a path accepts: its methods, its handler, and when it closes an activation."""

    def __init__(self, handle, methods=("POST",), lock=None, sentinels=None):
        self.handle, self.methods = handle, methods
        self.lock = lock or threading.Lock()
        self.sentinels = sentinels or (lambda status: False)


class ProxyServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, routes from the platform."""

    request_queue_size = 128

    def __init__(self, settings, routes, logs):
        self.settings, self.routes, self.logs = settings, routes, logs
        self.stopping = False
        self.in_flight = 0
        self.idle = threading.Condition()
        ThreadingHTTPServer.__init__(self, (settings.host, settings.port), ProxyHandler)

    def handle_error(self, request, client_address):
        """A client that went away is not news; the logs belong to the action."""
        if self.settings.verbose:
            ThreadingHTTPServer.handle_error(self, request, client_address)

    def working(self, delta):
        with self.idle:
            self.in_flight += delta
            self.idle.notify_all()

    def wait_idle(self, timeout):
        with self.idle:
            return self.idle.wait_for(lambda: self.in_flight == 0, timeout)


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
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 120  # seconds a client may stall while sending

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def dispatch(self):
        path = self.path.split("?", 1)[0]
        route = self.server.routes.get(path)
        if route is None:
            self.refuse(404, "There is no %s here." % path)
        elif self.command not in route.methods:
            self.refuse(405, "%s does not accept %s; use %s." % (
                path, self.command, " or ".join(route.methods)),
                {"Allow": ", ".join(route.methods)})
        else:
            self.server.working(+1)
            try:
                self.serve(route)
            finally:
                self.server.working(-1)

    def serve(self, route):
        try:
            message = self.read_json()
        except HTTPError as error:
            message = error
        with route.lock:
            status, payload = self.outcome(route, message)
            if route.sentinels(status):
                self.server.logs.sentinels()
        self.answer(status, payload)

    def outcome(self, route, message):
        try:
            if isinstance(message, HTTPError):
                raise message
            if self.server.stopping:
                raise HTTPError(503, "The proxy is shutting down.", close=True)
            return route.handle(message)
        except HTTPError as error:
            self.close_connection = self.close_connection or error.close
            return error.status, {"error": error.message}
        except Exception as error:
            self.server.logs.note("internal error: %r" % (error,))
            return 500, {"error": INTERNAL_ERROR.format(error)}

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

    def read_chunked(self, limit):
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise HTTPError(400, "The chunked request body is malformed.", close=True)
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

    def read_json(self):
        """The body as a JSON object; an empty body or ``null`` is an empty object."""
        body = self.read_body()
        if not body.strip():
            return {}
        try:
            message = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise HTTPError(400, "The request body is not valid JSON: %s" % error)
        return {} if message is None else message

    # -- answers ---------------------------------------------------------------

    def answer(self, status, payload, headers=None):
        body = json_bytes(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def refuse(self, status, message, headers=None):
        """An answer to a request whose body is left unread, so the connection must close."""
        self.close_connection = True
        self.answer(status, {"error": message}, headers)

    def send_error(self, code, message=None, explain=None):
        """The server's own errors (a garbage request line, ...) as JSON too."""
        self.close_connection = True
        self.answer(code, {"error": message or self.responses.get(code, ("Error",))[0]})

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


def remove_tree(path):
    import shutil
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


class Installation:
    """Moves a staged tree into a directory, so that leaving with an error puts back
    exactly what was there before.  ``exec`` is moved last and restored first, so
    it always names a complete action, the old one or the new one.
    """

    def __init__(self, stage, dest):
        self.stage, self.dest = stage, dest
        self.backup = None
        self.moved = []

    def __enter__(self):
        try:
            names = sorted(os.listdir(self.stage), key=lambda name: name == "exec")
            for name in names:
                target = os.path.join(self.dest, name)
                if os.path.lexists(target):
                    self.backup = self.backup or stage_dir(self.dest)
                    os.replace(target, os.path.join(self.backup, name))
                self.moved.append(name)
                os.replace(os.path.join(self.stage, name), target)
        except OSError as error:
            self.__exit__(OSError, error, None)
            raise InitError("cannot install the action: %s" % error)
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None:
            for name in reversed(self.moved):
                target = os.path.join(self.dest, name)
                remove_tree(target)
                if self.backup and os.path.lexists(os.path.join(self.backup, name)):
                    os.replace(os.path.join(self.backup, name), target)
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
    """Every action process group alive, so that shutdown can stop them all."""

    def __init__(self):
        self.lock = threading.Lock()
        self.alive = set()

    def add(self, process):
        with self.lock:
            self.alive.add(process)

    def discard(self, process):
        with self.lock:
            self.alive.discard(process)

    def kill_all(self):
        with self.lock:
            for process in self.alive:
                kill_group(process)


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


class Outcome:
    """What an action process did: its exit status, result line, and whether it ran out of time."""

    def __init__(self, returncode, result, timed_out):
        self.returncode, self.result, self.timed_out = returncode, result, timed_out

    def exit_note(self):
        """Why the action ended, when that was not a plain exit 0."""
        code = self.returncode
        if code is None or code == 0:
            return None
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown signal"
            return "the action was killed by signal %d (%s)" % (-code, name)
        return "the action exited with status %d" % code


class Pump:
    """Runs one action process to its end: feeds its stdin, streams its stdout and
    stderr to the logs, and stops its process group when the main process exits
    or the deadline passes.  Everything happens in one selector loop on the
    calling thread.
    """

    poll_interval = 0.05  # how often to look for the exit where pidfds are missing

    def __init__(self, process, data, logs, deadline):
        self.process, self.deadline = process, deadline
        self.stdout = ResultForwarder(logs.out)
        self.stderr = LineForwarder(logs.err)
        self.selector = selectors.DefaultSelector()
        self.pending = memoryview(data)
        self.exit_fd = pidfd_for(process.pid)

    def run(self):
        try:
            self.watch()
            timed_out = self.loop()
            kill_group(self.process)
            self.drain()
            returncode = self.process.wait()
        finally:
            self.close()
        return Outcome(returncode, self.stdout.result(), timed_out)

    def watch(self):
        os.set_blocking(self.process.stdin.fileno(), False)
        if self.write_stdin():
            self.process.stdin.close()
        else:
            self.selector.register(self.process.stdin, selectors.EVENT_WRITE, "stdin")
        self.selector.register(self.process.stdout, selectors.EVENT_READ, self.stdout)
        self.selector.register(self.process.stderr, selectors.EVENT_READ, self.stderr)
        if self.exit_fd is not None:
            self.selector.register(self.exit_fd, selectors.EVENT_READ, "exit")

    def loop(self):
        """Serves the pipes until the main process exits; True if the deadline came first."""
        while True:
            timeout = self.timeout()
            if timeout is not None and timeout <= 0:
                return True
            for key, _ in self.selector.select(timeout):
                if key.data == "exit":
                    return False
                if key.data == "stdin":
                    if self.write_stdin():
                        self.selector.unregister(self.process.stdin)
                        self.process.stdin.close()
                else:
                    self.read(key)
            if self.exit_fd is None and self.process.poll() is not None:
                return False
            if self.exit_fd is None and not self.readers():
                return self.wait_for_exit()

    def timeout(self):
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        if self.exit_fd is None and self.readers():
            return self.poll_interval if remaining is None else min(remaining, self.poll_interval)
        return remaining

    def wait_for_exit(self):
        try:
            self.process.wait(None if self.deadline is None
                              else max(0, self.deadline - time.monotonic()))
            return False
        except subprocess.TimeoutExpired:
            return True

    def readers(self):
        return [key for key in self.selector.get_map().values()
                if isinstance(key.data, LineForwarder)]

    def read(self, key):
        """Forwards one chunk of a pipe; False once there is nothing more to read now."""
        try:
            chunk = os.read(key.fd, 65536)
        except BlockingIOError:
            return False
        if chunk:
            key.data.feed(chunk)
            return True
        self.selector.unregister(key.fileobj)
        key.data.close()
        return False

    def write_stdin(self):
        """Writes what the pipe takes of the argument; True once all is written."""
        try:
            while self.pending:
                self.pending = self.pending[os.write(self.process.stdin.fileno(),
                                                     self.pending[:65536]):]
        except BlockingIOError:
            return False
        except OSError:
            self.pending = b""  # the action does not read its stdin: its choice
        return True

    def drain(self):
        """Reads what the pipes already hold, without waiting for writers that are gone."""
        for key in self.readers():
            os.set_blocking(key.fd, False)
            while self.read(key):
                pass
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
    """The action's result from its last line: a JSON object or array, else None."""
    if line is None:
        return None
    try:
        result = json.loads(line.decode("utf-8", "replace"), parse_constant=reject_constant)
    except (ValueError, RecursionError):
        return None
    return result if isinstance(result, (dict, list)) else None


def reject_constant(name):
    raise ValueError("%s is not JSON" % name)


class ActionRunner:
    """Prepares and runs the action.  Subclass it to change one step, keeping the
    upstream dockerskeleton hook names:

    - ``init(message)``      installs ``message['code']``, then calls the three below
    - ``epilogue(message)``  adds to the installed source (default: nothing)
    - ``build(message)``     turns the source into ``self.binary`` (default: nothing)
    - ``verify()``           True when ``self.binary`` can run
    - ``env(message)``       the environment of one activation
    - ``run(args, env)``     runs one activation, returns ``(status, result)``

    ``epilogue`` or ``build`` returning False, or raising, fails the init, and
    the action directory is put back as it was.  Start the proxy with a runner
    of your own with ``setRunner(MyRunner())`` then ``main()``.
    """

    LOG_SENTINEL = LOG_SENTINEL

    def __init__(self, source=None, binary=None, zipdest=None):
        self.source, self.binary, self.zipdest = source, binary, zipdest
        self.settings = Settings()
        self.logs = Logs()
        self.processes = Processes()
        self.init_env = {}

    def configure(self, settings, logs, processes):
        """Called once by the proxy before it serves; paths default into the action dir."""
        self.settings, self.logs, self.processes = settings, logs, processes
        self.binary = self.binary or os.path.join(settings.action_dir, "exec")
        self.source = self.source or self.binary
        self.zipdest = self.zipdest or os.path.dirname(self.source)

    # -- init ------------------------------------------------------------------

    def init(self, message):
        """Installs the code of an /init ``value``; True if the action is ready to run."""
        try:
            env = self.init_environment(message)
            with self.install(message):
                if self.epilogue(message) is False or self.build(message) is False:
                    raise InitError("the action could not be built")
                if not self.verify():
                    raise InitError("%s is not an executable file" % self.binary)
        except InitError as error:
            self.logs.note(str(error))
            return False
        except Exception as error:
            self.logs.note("the action could not be initialized: %s" % error)
            return False
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
        """The code of the message, staged and moved into place (a context manager)."""
        code = message.get("code")
        binary = message.get("binary", False)
        if not isinstance(binary, bool) and binary is not None:
            raise InitError("binary must be true or false, not %s" % json_type(binary))
        if code is None:
            return NoInstallation()
        if not isinstance(code, str):
            raise InitError("code must be a string, not %s" % json_type(code))
        if binary:
            data = decode_base64(code)
            stage = stage_dir(self.zipdest)
            try:
                extract_zip(data, stage, self.settings.max_archive)
                self.prepare_archive(stage)
            except BaseException:
                remove_tree(stage)
                raise
            return Installation(stage, self.zipdest)
        stage = stage_dir(os.path.dirname(self.source))
        path = os.path.join(stage, os.path.basename(self.source))
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as source:
            source.write(code)
        os.chmod(path, 0o755)
        return Installation(stage, os.path.dirname(self.source))

    def prepare_archive(self, stage):
        """The staged archive must hold the executable; it runs whatever its mode bits."""
        staged = os.path.join(stage, os.path.relpath(self.binary, self.zipdest))
        if not os.path.isfile(staged) or os.path.islink(staged):
            raise InitError("the archive has no %s file at its top level"
                            % os.path.relpath(self.binary, self.zipdest))
        os.chmod(staged, 0o755)

    def epilogue(self, message):
        return None

    def build(self, message):
        return None

    def verify(self):
        return os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)

    # -- run -------------------------------------------------------------------

    def env(self, message):
        """The container's environment, the init ``env``, then this activation's
        fields as ``__OW_<KEY>``: a fresh dict, never the proxy's own."""
        env = dict(os.environ)
        env.update(self.init_env)
        try:
            env.update(exported(((key.upper(), value) for key, value in message.items()
                                 if key != "value"), prefix="__OW_"))
        except ValueError as error:
            raise HTTPError(400, "Activation field %s" % error)
        return env

    def run(self, args, env):
        """Runs the executable once with ``args``; returns ``(status, result)``."""
        data = json.dumps(args)
        argv = [self.binary] if len(data) > MAX_ARG_STRLEN else [self.binary, data]
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=os.path.dirname(self.binary), env=env, start_new_session=True)
        except OSError as error:
            self.logs.out(("error: cannot start the action: %s\n" % error).encode())
            return 502, {"error": RUN_BAD_RESULT}
        self.processes.add(process)
        try:
            outcome = Pump(process, data.encode(), self.logs,
                           deadline_of(env)).run()
        finally:
            self.processes.discard(process)
        return self.answer(outcome)

    def answer(self, outcome):
        if outcome.timed_out:
            self.logs.note("the action was stopped at its deadline")
            return 502, {"error": RUN_TIMED_OUT}
        note = outcome.exit_note()
        if note:
            self.logs.note(note)
        result = parse_result(outcome.result)
        if result is None:
            if outcome.result is not None:
                self.logs.out(clean_utf8(outcome.result) + b"\n")
            return 502, {"error": RUN_BAD_RESULT}
        return 200, result


class NoInstallation:
    """An /init without code keeps what the action directory holds."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        return False


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

    def routes(self):
        serial = DummyLock() if self.settings.concurrent else threading.Lock()
        return {
            "/init": Route(self.init, sentinels=lambda status: status not in (200, 403)),
            "/run": Route(self.run, lock=serial, sentinels=lambda status: True),
        }

    def init(self, message):
        if self.initialized and not self.settings.allow_reinit:
            self.logs.err((INIT_TWICE + "\n").encode())
            return 403, {"error": INIT_TWICE}
        value = message.get("value", {}) if isinstance(message, dict) else None
        if not isinstance(value, dict):
            raise HTTPError(400, "The init body must be a JSON object whose value is an object.")
        if not self.runner.init(value):
            return 502, {"error": INIT_FAILED}
        self.initialized = True
        return 200, {"ok": True}

    def run(self, message):
        if not isinstance(message, dict):
            return 404, {"error": RUN_BAD_ARGUMENT}
        value = message.get("value", {})
        if not isinstance(value, (dict, list)):
            return 404, {"error": RUN_BAD_ARGUMENT}
        if not self.runner.verify():
            self.logs.note("%s is missing or not executable" % self.runner.binary)
            return 502, {"error": RUN_NO_BINARY}
        return self.runner.run(value, self.runner.env(message))


class DummyLock:
    """Stands in for a lock where activations may run side by side."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        return False


# ============================================================================
# 7. CLI
# ============================================================================

_runner = None


class Shutdown(Exception):
    """Raised by the SIGTERM and SIGINT handlers to leave the serving loop at once."""


def setRunner(runner):
    """Serve with ``runner`` (an ActionRunner) instead of the default one."""
    global _runner
    _runner = runner


def serve(settings, runner):
    """Serves until SIGTERM or SIGINT, then lets activations finish; returns the exit status."""
    logs, processes = Logs(), Processes()
    runner.configure(settings, logs, processes)
    platform = OpenWhisk(settings, runner, logs)
    try:
        server = ProxyServer(settings, platform.routes(), logs)
    except OSError as error:
        raise ConfigError("cannot listen on %s:%s: %s" % (settings.host, settings.port,
                                                          error.strerror or error))

    def stop(signum, frame):
        server.stopping = True
        raise Shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if settings.verbose or sys.stdout.isatty():
        sys.stderr.write("owproxy %s: serving %s on http://%s:%d\n" % (
            __version__, settings.action_dir, settings.host, server.server_address[1]))
    try:
        server.serve_forever()
    except Shutdown:
        pass
    server.server_close()
    if not server.wait_idle(settings.grace):
        processes.kill_all()
        server.wait_idle(2.0)
    return 0


def main(argv=None):
    try:
        settings = resolve_settings(argv, os.environ)
        return serve(settings, _runner or ActionRunner())
    except ConfigError as error:
        sys.stderr.write("owproxy: %s\n" % error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
