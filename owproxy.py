#!/usr/bin/env python3
"""owproxy: an Apache OpenWhisk action proxy in one file.

Copy this file into any image that has a ``python3`` (3.8 or newer), start it
with ``python3 owproxy.py``, and the image is an OpenWhisk action container: the
invoker's ``POST /init`` installs an executable, a script or an archive into the
action directory (``/action``), and every ``POST /run`` starts ``/action/exec``
with the activation's parameters, streams its logs and answers with the last
line it printed.  It needs nothing but the Python standard library.

It is a drop-in replacement for the Flask + gevent ``actionproxy.py`` of
OpenWhisk's dockerskeleton image, with the same routes, statuses and messages,
and without its faults: every activation gets its own environment, a deadline
stops a runaway action, background children cannot hold an answer back, and a
bad request or a broken action never takes the proxy down.  It also keeps
actions warm: ActionLoop executables (``--loop``) and Python ``main(args)``
functions, it speaks Knative, and with ``--loop`` it stands in for the Go
ActionLoop proxy of OpenWhisk's runtime images, their compile scripts, launchers
and settings (``OW_COMPILER`` ...) unchanged.

The file reads bottom-up: each definition uses only what stands above it.  It
opens with a check that this Python can run it, stand-ins for the modules the
imports pull in and no request uses (``DEFERRED_MODULES``: each is loaded where
something first uses it), and http.server imported without ssl.  Then, each
title a banner below and each ``--`` line a family under it:

 1. Configuration
    -- Exact strings and limits    what the invoker, its tests and users know
    -- Settings                    each a command-line flag and an environment
                                   variable
 2. Logs                           the action's log streams, the sentinels that
                                   end an activation's, the held-back result line
 3. Requests and answers           what a route is given and gives back; HTTP's
                                   grammar; what parsing a body costs
 4. Processes
    -- Keeping track               every process an action starts, killed and
                                   reaped with its activation; the subreaper
    -- The pump                    an action's stdin, stdout and stderr
    -- Why a process ended         or never started, and what to do about it
 5. Installation
    -- Folders                     the action directory, scratch space, trees
    -- Versions                    an init's code, swapped atomically for runs
    -- Archives                    zip and tar.gz, kept inside the action directory
    -- Compile scripts             a runtime image's, as the Go proxy runs them
    -- An init's code              staged or compiled, checked, and of which
                                   kind: the runner's Installer steps
 6. Runs
    -- The activation's environment   ``__OW_*``, as OpenWhisk exports them
    -- An executable run once      its input, logs and last line
 7. Warm processes
    -- Warm processes and their pool   ActionLoop executables, Python functions
    -- The function worker         a Python function's own process
 8. The runner                     ActionRunner, the subclassable runner: an
                                   init in order, how a run goes
 9. Platforms
    -- OpenWhisk                   POST /init once, POST /run per activation
    -- Knative                     dedicated inits, web requests and results
    -- Health                      /healthz and /readyz
10. HTTP server
    -- Reading requests strictly   RFC 9112's heads, bodies and chunks; a
                                   trickle read in pauses (TRICKLE_*)
    -- Body memory                 what bodies and their parse may take at once
    -- Connections and threads     their limits, and closes that lose nothing
    -- The server and its handler  where it listens; a thin handler
    -- Serving, and the shutdown sequence
11. Client
    -- invoke                      an action on disk, run by a proxy of its own
    -- init, run and healthcheck   talking to a running container
    -- The client's command line
12. CLI                            ``main()``: the proxy, ``--compile``, or a
                                   client command

A ``POST /run`` goes: ProxyServer and ProxyHandler (10) read it within its body
share, the OpenWhisk route (9) checks it, ActionRunner (8) picks the version
(5) and runs it once (6: Processes and the Pump, 4) or in a warm process (7),
the answer is encoded (3) and written by the handler, and the logs end with
their sentinels (2).
"""

import sys

# Every standard module the proxy imports, here or where it needs one; trimmed
# Pythons (Debian's python3-minimal) lack some.
STANDARD_MODULES = (
    "argparse", "ast", "base64", "binascii", "contextlib", "ctypes", "difflib",
    "errno", "fcntl", "functools", "gc", "glob", "http", "importlib", "io", "itertools", "json",
    "os", "re", "resource", "select", "selectors", "shutil", "signal", "site", "socket",
    "socketserver", "stat", "subprocess", "tarfile", "tempfile", "threading", "time",
    "traceback", "urllib", "uuid", "zipfile", "zlib")


def found_spec(name):
    """The spec the import system finds for ``name``, whatever sys.modules holds
    (a stand-in, say); None if there is none."""
    package = name.rpartition(".")[0]
    path = sys.modules[package].__path__ if package else None
    finders = (getattr(finder, "find_spec", None) for finder in sys.meta_path)
    return next((spec for spec in (find(name, path) for find in finders if find) if spec), None)


def module_exists(name):
    try:
        return found_spec(name) is not None
    except ImportError:
        return False


def own_line(text):
    """A message of the proxy's own as each one reaches stderr, in the action's
    logs or from a command: ``owproxy: ...``, one line."""
    return "owproxy: %s\n" % text.rstrip("\n")


def tell(text):
    """A message of the proxy's own on this process's stderr: a command's, the
    function worker's, or one from before the logs exist."""
    sys.stderr.write(own_line(text))


def unusable_python(missing=None):
    """Exits with one line that says what to install: on an old Python, or with
    the name of a module whose import failed, the standard modules it lacks."""
    if missing is None:
        problem = "needs Python 3.8 or newer, not %s" % sys.version.split()[0]
    else:
        lacking = [name for name in STANDARD_MODULES if not module_exists(name)]
        problem = ("needs the standard modules %s, which %s lacks: install the whole Python "
                   "(on Debian and Ubuntu the package python3, not python3-minimal)"
                   % (", ".join(lacking or [missing]), sys.executable or "this Python"))
    tell(problem)
    sys.exit(2)


# What the imports below pull in and no request uses: http.server's, http.client's,
# email's and subprocess's own imports (and, with them, html.entities, bz2, lzma,
# fnmatch).  Each is a stand-in until code first asks it for something.
DEFERRED_MODULES = (
    "calendar", "copy", "datetime", "email.parser", "html", "ipaddress", "locale",
    "mimetypes", "random", "shutil")


class DeferredModule(type(sys)):
    """A module not yet loaded: its first attribute lookup (``from m import x``
    and ``m.x`` both make one) runs the real module's code in this very object,
    which then is that module, so every holder of it sees the same one.

    ``importlib.util.LazyLoader`` would not do: an ``import`` statement asks a
    module for ``__spec__``, which loads a lazy one; a stand-in has its own."""

    loading = None  # one lock for every stand-in: a module's code may load another

    def __getattr__(self, attribute):
        with DeferredModule.loading:
            if type(self) is DeferredModule:
                self.load()
        return getattr(self, attribute)

    def load(self):
        spec = found_spec(self.__name__)
        if spec is None:
            raise ModuleNotFoundError("No module named %r" % self.__name__, name=self.__name__)
        self.__class__ = type(sys)
        try:
            for name, value in (("__spec__", spec), ("__loader__", spec.loader),
                                ("__package__", spec.parent), ("__file__", spec.origin),
                                ("__cached__", spec.cached)):
                setattr(self, name, value)
            if spec.submodule_search_locations is not None:
                self.__path__ = spec.submodule_search_locations
            spec.loader.exec_module(self)
        except BaseException:
            self.__class__ = DeferredModule
            raise


def defer_modules(names):
    """Puts a stand-in in sys.modules for each of ``names`` not loaded yet; a
    submodule's also as its package's attribute, where ``import a.b`` looks."""
    import threading
    DeferredModule.loading = threading.RLock()
    for name in names:
        if name not in sys.modules:
            module = sys.modules[name] = DeferredModule(name)
            module.__spec__ = None
            package, _, child = name.rpartition(".")
            if package:
                setattr(__import__(package), child, module)


if sys.version_info < (3, 8):
    unusable_python()

# Only in the proxy's own process: a library user's or a function's code sees
# modules loaded the ordinary way.
if __name__ == "__main__" and sys.argv[1:2] != ["function-worker"]:
    defer_modules(DEFERRED_MODULES)
try:
    import contextlib
    import functools
    import itertools
    import json
    import os
    import re
    import selectors
    import signal
    import socket
    import socketserver
    import subprocess
    import threading
    import time
except ImportError as error:
    unusable_python(error.name)

__version__ = "1.0.0"
OWPROXY_FILE = os.path.abspath(__file__)


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
import http.client  # noqa: E402


# ============================================================================
# 1. Configuration
# ============================================================================

# -- Exact strings and limits --------------------------------------------------

LOG_SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"

# Linux's MAX_ARG_STRLEN: the longest single argument execve() accepts.
MAX_ARG_STRLEN = 131071

# An archive with more entries than this is refused whatever their size, and a
# tar whose extended header (a pax header, a GNU long name), or whose global pax
# headers together, take more bytes than this: long names take at most PATH_MAX.
MAX_ARCHIVE_ENTRIES = 250000
MAX_EXTENDED_HEADER = 64 * 1024

# The environment variable that marks every process of one activation (or warm
# process), prctl()'s option that makes orphaned descendants the proxy's, and
# fcntl()'s that sets how much a pipe holds (Linux; the fcntl module has it from 3.10).
ACTIVATION_MARKER = "OWPROXY_ACTIVATION"
PR_SET_CHILD_SUBREAPER = 36
F_SETPIPE_SZ = 1031

# What a refused second /init tells the user, in the proxy's log and the client's error.
REINIT_HINT = ("to replace the action, start the proxy with --allow-reinit "
               "(PROXY_ALLOW_REINIT=1), for local development only")

# The exact texts the invoker, the upstream tests and users already know.
INIT_TWICE = "Cannot initialize the action more than once."
INIT_FAILED = "The action failed to generate or locate a binary. See logs for details."

# The Go ActionLoop proxy's own texts, which --loop speaks (the README's table says where).
INIT_NO_CODE = "Missing main/no code to execute."
INIT_START_FAILED = "Cannot start action. Check logs for details."
INIT_START_CAUSE = "cannot start action: {}"
START_EXITED = "Command exited abruptly during initialization."
COMMAND_EXITED = "command exited"
START_BAD_ACK = "The action did not initialize properly."
EXEC_ENV_MISMATCH = "Execution environment version mismatch. See logs for details."
RUN_NO_BINARY = "The action failed to locate a binary. See logs for details."
RUN_NO_ACTION = "no action defined yet"
RUN_BAD_ARGUMENT = "The action did not receive a dictionary or array as an argument."
RUN_BAD_RESULT = "The action did not return a dictionary or array."
RUN_TIMED_OUT = "The action exceeded its time limit and was stopped at its deadline."
RUN_EXITED = "The action exited before it returned a result. See logs for details."
RUN_UNENCODABLE = "The action returned a {} that JSON cannot encode: {}"
RUN_TOO_LARGE = "The action returned a result of {} bytes, larger than the limit of {} bytes."
RUN_TOO_DEEP = "The action's {} is nested too deeply to be encoded as JSON."
RUN_BROKEN_CHANNEL = ("The action wrote on its Python worker's result channel, which is the "
                      "proxy's: {}")
DEDICATED = "Cannot initialize a runtime with a dedicated function."
WEB_BAD_RESULT = ("The action returned a web response with an invalid statusCode, headers "
                  "or image body.")

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
SHUTTING_DOWN = "The proxy is shutting down."
INTERNAL_ERROR = "Internal error. {}"

MIB = 1024 * 1024
# Bytes read from a pipe, /proc or a socket at a time: what a pipe holds by
# default, and small enough that the bytes object read is no mmap of its own.
READ_SIZE = 65536
DEFAULT_MAX_RESULT = 16 * MIB
LINE_HEAD = 1024  # bytes of an overlong line that the logs show
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")


# -- Settings ------------------------------------------------------------------

class ConfigError(Exception):
    """A setting has a value the proxy cannot use; reported in one line."""


def whole_number(text):
    """Digits alone as a number (int() would take "+1", "1_0" or " 1 "), else -1."""
    text = str(text).strip()
    return int(text) if text.isascii() and text.isdigit() else -1


def parse_port(text):
    port = whole_number(text)
    if not 0 <= port <= 65535:
        raise ValueError("not a port number (0-65535)")
    return port


def positive_int(text):
    number = whole_number(text)
    if number < 1:
        raise ValueError("not a positive whole number")
    return number


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


def parse_set(text):
    """An image setting that is on when it has any value at all, as the Go proxy reads it."""
    return text != ""


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


def parse_time_limit(text):
    """Seconds that something is given to happen, which zero would never allow."""
    seconds = parse_seconds(text)
    if not seconds > 0:
        raise ValueError("not a positive number of seconds")
    return seconds


class Setting:
    """One setting: a command-line flag, an environment variable (and others that
    stand in for it when it is unset, in order) and a default."""

    def __init__(self, name, flag, env, default, parse, help, fallback_envs=()):
        self.name, self.flag, self.env = name, flag, env
        self.envs = (env,) + fallback_envs
        self.default, self.parse, self.help = default, parse, help

    def shown(self):
        """The default as a user would write it."""
        if self.parse is parse_size:
            return "%dM" % (self.default // MIB) if self.default >= MIB else "%dK" % (
                self.default // 1024)
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return str(self.default) or "none"


SETTINGS = (
    Setting("host", "--host", "OWPROXY_HOST", "::", str,
            "address or name to listen on; '::' is every address, IPv6 and IPv4 "
            "(0.0.0.0 where the host has no IPv6)"),
    Setting("port", "--port", "FLASK_PROXY_PORT", 8080, parse_port,
            "port to listen on", fallback_envs=("PORT",)),
    Setting("action_dir", "--action-dir", "OWPROXY_ACTION_DIR", "/action", str,
            "directory that holds the action; its 'exec' is what runs"),
    Setting("allow_reinit", "--allow-reinit", "PROXY_ALLOW_REINIT", False, parse_flag,
            "accept /init more than once (local development)"),
    Setting("reinit_wait", "--reinit-wait", "OWPROXY_REINIT_WAIT", 300.0, parse_time_limit,
            "seconds a re-init in the action directory waits for the runs in flight"),
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
    Setting("body_memory", "--body-memory", "OWPROXY_BODY_MEMORY", 1024 * MIB, parse_size,
            "memory that request bodies and their parsing take at once; past it the "
            "next body waits, unread"),
    Setting("body_timeout", "--body-timeout", "OWPROXY_BODY_TIMEOUT", 60.0, parse_time_limit,
            "seconds a client has to send a whole request body; then 408"),
    Setting("idle_timeout", "--idle-timeout", "OWPROXY_IDLE_TIMEOUT", 120.0, parse_time_limit,
            "seconds a kept-alive connection may rest between requests"),
    Setting("max_header", "--max-header", "OWPROXY_MAX_HEADER", 64 * 1024, parse_size,
            "largest request head: request line and header fields (or trailers)"),
    Setting("header_timeout", "--header-timeout", "OWPROXY_HEADER_TIMEOUT", 10.0, parse_time_limit,
            "seconds a client has to send a request's head"),
    Setting("max_connections", "--max-connections", "OWPROXY_MAX_CONNECTIONS", 1024,
            positive_int, "connections served at once; past it, 503 at once"),
    Setting("max_archive", "--max-archive", "OWPROXY_MAX_ARCHIVE", 1024 * MIB, parse_size,
            "largest total size a zip or tar.gz may expand to"),
    Setting("compiler", "--compiler", "OW_COMPILER", "", str,
            "compile script of a runtime image, run as COMPILER MAIN SRC BIN at /init"),
    Setting("save_jar", "--save-jar", "OW_SAVE_JAR", "", str,
            "a zip holding META-INF/MANIFEST.MF (a jar) is saved under this name, not unpacked"),
    Setting("compile_timeout", "--compile-timeout", "OWPROXY_COMPILE_TIMEOUT", 600.0,
            parse_time_limit, "seconds a compile may take before the init fails"),
    Setting("execution_env", "--execution-env", "OW_EXECUTION_ENV", "", str,
            "the value the compiled action's exec.env must hold"),
    Setting("log_init_error", "--log-init-error", "OW_LOG_INIT_ERROR", False, parse_set,
            "with --loop: a failed init answers the generic text, its cause in the logs"),
    Setting("max_result", "--max-result", "OWPROXY_MAX_RESULT", DEFAULT_MAX_RESULT,
            parse_size, "longest result line, and longest log line before it is split"),
    Setting("grace", "--grace", "OWPROXY_GRACE", 8.0, parse_seconds,
            "seconds in-flight activations get to finish on SIGTERM"),
    Setting("verbose", "--verbose", "OWPROXY_VERBOSE", False, parse_flag,
            "print a start-up banner and an access log on stderr; with --loop, the proxy's "
            "notes about runs"),
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
  owproxy.py healthcheck [--pid PID]  GET /healthz from the proxy, on its port (Docker's HEALTHCHECK)
  owproxy.py --compile [MAIN]         compile the code on stdin as /init would; a zip on stdout

Each flag falls back to its environment variable, then to its default."""


def argument_parser(hints=(), **options):
    """An argparse parser whose errors are one line, ``owproxy: ...``, exit status 2;
    ``hints`` are (flag, advice) pairs added to an error about that flag."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            if message.startswith("argument "):
                message = message[len("argument "):]
            message += "".join(advice for flag, advice in hints if message.startswith(flag))
            self.exit(2, own_line("%s (see %s --help)" % (message, self.prog)))

    return Parser(formatter_class=argparse.RawDescriptionHelpFormatter, **options)


def settings_parser():
    parser = argument_parser(
        prog="owproxy.py",
        description="Serve an OpenWhisk action (the /init and /run protocol) over HTTP.",
        allow_abbrev=False,  # --compile must not read as a shortening of --compiler
        epilog=COMMANDS_HELP)
    parser.add_argument("--version", action="version", version="owproxy " + __version__)
    for setting in SETTINGS:
        text = "%s [env %s, default %s]" % (setting.help, " else ".join(setting.envs),
                                             setting.shown())
        if setting.parse in (parse_flag, parse_set):
            parser.add_argument(setting.flag, dest=setting.name, action="store_const",
                                const="true", default=None, help=text)
        else:
            parser.add_argument(setting.flag, dest=setting.name, default=None,
                                metavar=setting.name.upper(), help=text)
    return parser


def flag_value(flag, text, parse):
    """``parse(text)``; a value it refuses is a one-line error naming the flag."""
    try:
        return parse(text)
    except ValueError as error:
        raise ConfigError("%s %s: %s" % (flag, text, error))


def given_settings(argv, environ):
    """Flags win over environment variables, which win over defaults."""
    # No arguments, a container's usual start: argparse need not even be imported.
    given = vars(settings_parser().parse_args(argv)) if argv else {}
    values = {}
    for setting in SETTINGS:
        # An empty variable is an unset one, as a shell's VAR= leaves it.
        env = next((env for env in setting.envs if environ.get(env)), None)
        if given.get(setting.name) is not None:
            values[setting.name] = flag_value(setting.flag, given[setting.name], setting.parse)
        elif env:
            try:
                values[setting.name] = setting.parse(environ[env])
            except ValueError as error:
                raise ConfigError("%s=%r: %s" % (env, environ[env], error))
    return Settings(**values)


def check_action_dir(path):
    """It must exist; it need not be writable (an image's own action, read-only
    roots): only an /init that brings code writes there."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("the action directory %s is not a directory" % path)
    if not os.path.isdir(path):
        raise ConfigError("the action directory %s does not exist: serve one with "
                          "--action-dir DIR, try the demo with `make run`, or run an action "
                          "once with `python3 owproxy.py invoke FILE`" % path)


def resolve_settings(argv, environ):
    """The settings to serve with, the action directory checked."""
    settings = given_settings(argv, environ)
    settings.action_dir = os.path.abspath(settings.action_dir)  # the action's cwd is there
    check_action_dir(settings.action_dir)
    return settings


# ============================================================================
# 2. Logs
# ============================================================================

def flush_python_streams():
    """What Python code in the proxy (a runner's hooks) printed goes out before
    the sentinels, which bypass sys.stdout, close the activation's logs."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass  # no stream, or one closed: nothing of it can be lost


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
        self.err(own_line(text).encode("utf-8", "replace"))

    def sentinels(self):
        flush_python_streams()
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


class Overlong:
    """A line longer than the limit, kept as its first bytes and its size."""

    def __init__(self, head, size):
        self.head, self.size = head, size

    def log(self, logs, limit):
        logs.out(clean_utf8(self.head) + b"\n")
        logs.note("that line had %d bytes, more than the limit of %d: only its first %d "
                  "are shown" % (self.size, limit, len(self.head)))


class LineForwarder:
    """Forwards a child's output to a log stream, whole lines at a time; a line
    longer than ``max_line`` goes in pieces of that size, so that no line is
    ever held whole in memory however long it grows."""

    def __init__(self, write, max_line=DEFAULT_MAX_RESULT):
        self.write, self.max_line = write, max_line
        self.partial = []
        self.partial_size = 0
        self.cut = None  # [head, size] of an overlong line skipped to its end

    def feed(self, chunk):
        if self.cut is not None:
            skipped, newline, chunk = chunk.partition(b"\n")
            self.cut[1] += len(skipped)
            if not newline:
                return
            self.end_cut()
        head, newline, tail = chunk.rpartition(b"\n")
        if newline:
            data = b"".join(self.partial + [head, newline])  # one copy of a long line
            self.partial, self.partial_size = [], 0
            if len(data) > self.max_line:
                self.forward_long(data)
            else:
                self.forward(data)
            chunk = tail
        if chunk:
            self.partial.append(chunk)
            self.partial_size += len(chunk)
            if self.partial_size > self.max_line:
                data = b"".join(self.partial)
                self.partial, self.partial_size = [], 0
                self.overflow(data)

    def forward_long(self, data):
        """Complete lines of which some may be longer than ``max_line``."""
        lines = data.split(b"\n")[:-1]
        short = []
        for line in lines:
            if len(line) <= self.max_line:
                short.append(line + b"\n")
                continue
            if short:
                self.forward(b"".join(short))
                short = []
            self.overflow(line)
            if self.cut is not None:
                self.end_cut()
        if short:
            self.forward(b"".join(short))

    def overflow(self, data):
        """A line grew beyond ``max_line``: a log line goes out in pieces of that
        size.  A subclass may ``skip`` the rest of it instead."""
        for start in range(0, len(data), self.max_line):
            self.forward(data[start:start + self.max_line] + b"\n")

    def skip(self, data):
        """Keeps the head and the size of the overlong line ``data`` begins, dropping the rest."""
        self.cut = [data[:LINE_HEAD], len(data)]

    def end_cut(self):
        head, size = self.cut
        self.cut = None
        self.overlong(Overlong(head, size))

    def close(self):
        if self.cut is not None:
            self.end_cut()
        if self.partial:
            self.forward(b"".join(self.partial) + b"\n")
            self.partial, self.partial_size = [], 0

    def forward(self, data):
        """Takes complete lines."""
        self.write(clean_utf8(data))


# A line that could be a result, and one that is not blank, found without a copy of it.
RESULT_START = re.compile(rb"\s*[{[]")
NOT_BLANK = re.compile(rb"\S")


def could_be_result(line, start=0, end=None):
    """True for a line (``line[start:end]``) whose first non-blank character opens
    a JSON object or array."""
    return RESULT_START.match(line, start, len(line) if end is None else end) is not None


class ResultForwarder(LineForwarder):
    """Forwards stdout as it comes, but holds back the latest line that could be
    the action's result (see ``could_be_result``) until a later non-blank line
    shows it was a log: any other line is a log whatever follows, and goes out at
    once.  Such a line longer than the limit is kept as its head and its size."""

    def __init__(self, logs, max_line=DEFAULT_MAX_RESULT):
        LineForwarder.__init__(self, logs.out, max_line)
        self.logs = logs
        self.held = []  # the latest line that could be the result, then blank lines
        self.held_overlong = None  # or such a line that was too long to hold

    def forward(self, data):
        end = len(data) - 1
        while True:
            start = data.rfind(b"\n", 0, end) + 1
            if NOT_BLANK.search(data, start, end):
                break
            if start == 0:  # blank lines only: they go with what they follow
                if self.held or self.held_overlong:
                    self.held.append(data)
                else:
                    LineForwarder.forward(self, data)
                return
            end = start - 1
        self.release()
        if could_be_result(data, start, end):
            data, self.held = data[:start], [data[start:]]
        if data:
            LineForwarder.forward(self, data)

    def overflow(self, data):
        if not could_be_result(data):
            return LineForwarder.overflow(self, data)
        self.release()
        self.skip(data)

    def overlong(self, line):
        self.held_overlong = line

    def release(self):
        """The held line turned out to be a log: it goes out, before what follows."""
        if self.held_overlong is not None:
            self.held_overlong.log(self.logs, self.max_line)
            self.held_overlong = None
        if self.held:
            LineForwarder.forward(self, b"".join(self.held))
            self.held = []

    def result(self):
        """Once the stream is closed, the result line (an Overlong if it was too
        long), or None when the last non-blank line was a log; blank lines after
        it are logs."""
        line, self.held_overlong = self.held_overlong, None
        held, self.held = b"".join(self.held), []
        if line is None:
            line, _, held = held.partition(b"\n")
            line = line if line.strip() else None
        if held:
            LineForwarder.forward(self, held)
        return line


# ============================================================================
# 3. Requests and answers
# ============================================================================

MAX_HEADER_FIELDS = 100  # per request head, and per trailer section
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])\Z")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]*\Z")
PLAIN_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,8})\r\n")  # a chunk's head without extension
FIELDS_END = re.compile(rb"\r?\n|.*?\n\r?\n", re.DOTALL)  # header fields through their blank line
REQUEST_LINE_GAP = re.compile(r"[ \t]+")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")
CHUNKED = None  # a RequestHead's length when its body comes in chunks
# A request that keeps arriving in tiny pieces (a client sending a byte at a
# time, as fast as it can) would cost a wake-up, a read and the GIL per piece,
# taken from every other request: once TRICKLE_WAITS of a head's or body's waits
# for bytes have each brought fewer than TRICKLE_PIECE, a wait after another such
# one pauses TRICKLE_PAUSE seconds first, so that its pieces gather (never past
# its deadline: with less time left, it does not pause).
TRICKLE_WAITS = 16
TRICKLE_PIECE = 512
TRICKLE_PAUSE = 0.01

# What parsing a body takes, per byte and per JSON token, with a margin over what
# VmHWM shows on Python 3.8 and 3.13 (a /run of one long string: 4.5 bytes per
# byte; of ``[{},{},...]``: some 36 bytes per token on top): every byte is held
# as the body, as its text, as the parsed values and as the action's input; each
# container or member (``,:[{``) is a Python object, and each control character
# or backslash grows when it is encoded again.
EXPANDING = b",:[{\\" + bytes(range(32))
PARSE_COST_PER_TOKEN = 48
PARSE_COST = {"init": 6, "run": 12}  # per body byte: an init decodes, a run re-encodes


class HTTPError(Exception):
    """An answer other than success, for what is wrong with the request.

    Which layer sets a status: what is wrong with a request (its head, its body,
    its JSON, its fields) is an HTTPError raised where it is found, and so is a
    result too deep to encode; what the action did (its result, its exit, its
    deadline, its init) is a ``(status, payload)`` returned by the code that ran
    it, with the exact message the invoker knows, never raised.  Installation
    raises InitError, which the runner turns into its answer.  The handler turns
    an HTTPError into its answer, and anything else a route raises into a 500."""

    def __init__(self, status, message, close=False):
        Exception.__init__(self, message)
        self.status, self.message, self.close = status, message, close


class Route:
    """What a path accepts: its methods, its handler (a Request in, ``(status,
    payload)`` out), the lock it runs under, and after which answers (status and
    request) the log sentinels close an activation.  A quiet route stays out of
    the access log.
    ``headers`` go with every answer that does not set them itself; with
    ``preflight``, an OPTIONS request gets them at once, without the handler.
    ``parse_cost``: the bytes of memory the handler takes per body byte (PARSE_COST)."""

    def __init__(self, handle, methods=("POST",), lock=None, sentinels=None, quiet=False,
                 headers=(), preflight=False, parse_cost=0):
        self.handle, self.methods, self.parse_cost = handle, methods, parse_cost
        self.lock = lock or threading.Lock()
        self.sentinels = sentinels or (lambda status, request: False)
        self.quiet = quiet
        self.headers, self.preflight = list(headers), preflight


def reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def finite_float(text):
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError("%s is too large a number" % text)
    return number


def strict_json(text):
    """JSON as every action's parser takes it: NaN, Infinity and numbers too large
    for a float, which Python's json would accept, are refused (ValueError)."""
    return json.loads(text, parse_constant=reject_constant, parse_float=finite_float)


def json_type(value):
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


class Request:
    """What a handler sees of a request.  ``init_only``: the handler installed code
    and ran nothing (a Knative request with an init and no activation)."""

    def __init__(self, method, query, headers, body):
        self.method, self.query, self.headers, self.body = method, query, headers, body
        self.init_only = False

    def json(self):
        """The body as JSON; an empty body or ``null`` is an empty object.  NaN,
        Infinity and numbers too large for a float are no JSON: no action's parser
        would take them back."""
        if not self.body.strip():
            return {}
        try:
            message = strict_json(self.body)
        except (ValueError, RecursionError) as error:
            raise HTTPError(400, "The request body is not valid JSON: %s" % error)
        return {} if message is None else message


class WebResponse:
    """A payload sent as it is, with its own headers (name, value pairs, so
    that one may repeat), instead of as JSON."""

    def __init__(self, body, headers):
        self.body, self.headers = body, headers


class ResultLine:
    """A result line that holds a JSON object or array: its ``value``, and, when
    the line is UTF-8, its ``data``, the bytes the answer sends as they came
    (decoding and encoding a large result again would cost more than running it)."""

    def __init__(self, value, data=None):
        self.value, self.data = value, data


def json_bytes(payload):
    """UTF-8 JSON; escaped to ASCII only when it holds lone surrogates."""
    try:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload).encode("ascii")


def encode_answer(status, payload):
    """``(status, body, headers)`` for a handler's answer: a WebResponse as it is,
    a ResultLine as the action wrote it, anything else as JSON.  Raises TypeError
    for what cannot be sent."""
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise TypeError("the status %r is not an HTTP status" % (status,))
    if isinstance(payload, WebResponse):
        return status, payload.body, payload.headers
    if isinstance(payload, ResultLine):
        payload = payload.data or payload.value
        if isinstance(payload, bytes):
            return status, payload, [("Content-Type", "application/json")]
    try:
        return status, json_bytes(payload), [("Content-Type", "application/json")]
    except RecursionError:
        raise HTTPError(502, RUN_TOO_DEEP.format("result"))


# ============================================================================
# 4. Processes
# ============================================================================

# -- Keeping track -------------------------------------------------------------

def become_subreaper(logs):
    """Makes orphans of the proxy's descendants its children (Linux 3.4); True if it
    could.  As PID 1 the kernel gives it every orphan already, without ctypes."""
    if os.getpid() == 1:
        return True
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        reason = os.strerror(ctypes.get_errno())
    except (ImportError, OSError, AttributeError) as error:
        reason = str(error)
    logs.note("cannot become a child subreaper (%s): what an action moves out of its "
              "process group may outlive its activation" % reason)
    return False


def proc_file(path):
    """A /proc file's text, read with four system calls, where a Python file object
    makes nine: an activation's cleanup reads a few."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, READ_SIZE)]
        while chunks[-1]:
            chunks.append(os.read(fd, READ_SIZE))
    finally:
        os.close(fd)
    return b"".join(chunks)


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name: state, parent, ..."""
    try:
        return proc_file("/proc/%d/stat" % pid).rpartition(b")")[2].split() or [None, None]
    except OSError:
        return [None, None]


def parent_of(pid):
    parent = stat_fields(pid)[1]
    return None if parent is None else int(parent)


def children_of(pid, tasks=None):
    """The pids of ``pid``'s children (those of each of its threads, or of ``tasks``)."""
    found = []
    try:
        for task in tasks or os.listdir("/proc/%d/task" % pid):
            found.extend(map(int, proc_file("/proc/%d/task/%s/children" % (pid, task)).split()))
    except FileNotFoundError:
        if os.path.isdir("/proc/%d/task" % pid):  # a kernel without these lists
            return [child for child in map(int, filter(str.isdigit, os.listdir("/proc")))
                    if parent_of(child) == pid]
    except OSError:
        pass  # it is gone, or a thread of it is
    return found


def orphans():
    """The children of the proxy's main thread: every orphan it inherits, as a
    subreaper or as PID 1, and the processes the main thread itself spawned (those
    of other threads are their own)."""
    return children_of(os.getpid(), [os.getpid()])


def descendants(pid):
    found, parents = [], [pid]
    while parents:
        children = children_of(parents.pop())
        found.extend(children)
        parents.extend(children)
    return found


def environ_of(pid):
    """The environment ``pid`` started with, each entry between NULs; empty if unknown."""
    try:
        return b"\0" + proc_file("/proc/%d/environ" % pid)
    except OSError:
        return b""


def marker_of(environ):
    """The activation marker in an environ_of() text, None if it has none."""
    start = environ.find(b"\0%s=" % ACTIVATION_MARKER.encode())
    if start < 0:
        return None
    start += len(ACTIVATION_MARKER) + 2
    end = environ.find(b"\0", start)
    return environ[start:end if end >= 0 else len(environ)].decode("latin-1")


def process_state(pid):
    return stat_fields(pid)[0]


def running(pid):
    """Not gone, nor a zombie: it may still do something."""
    return process_state(pid) not in (None, b"Z", b"X")


def session_of(pid):
    """The id of ``pid``'s session: the pid of the process that made it, which no
    other process can join, nor take while a member lives; None if it is gone."""
    fields = stat_fields(pid)
    return int(fields[3]) if len(fields) > 3 else None


def exited(pid):
    """True when the child ``pid`` has exited and no one has waited for it yet: one
    system call, where its /proc state takes four."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass  # the group is already gone


class ActionProcess(subprocess.Popen):
    """An action's process, in a session (and process group) of its own, its pipes
    to the proxy, and its ``marker`` in its environment, which all it starts inherit."""

    def __init__(self, argv, marker, env, **options):
        self.marker = marker
        subprocess.Popen.__init__(self, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True,
                                  env=dict(env, **{ACTIVATION_MARKER: marker}), **options)


class Processes:
    """Every action process, and everything it starts, until it is killed and reaped.

    Each process the proxy spawns carries a marker in its environment, unique to
    it (so to its activation, or to its warm process), which whatever it starts
    inherits.  The proxy is a child subreaper: what an action leaves orphaned,
    even in a session or process group of its own, becomes the proxy's child
    rather than init's, so that at the end of its activation the proxy finds it
    among its descendants by that marker, kills it and reaps it.  Where that is
    not available, killing the action's process group is what is left.

    It reaps every zombie child that no ``subprocess.Popen`` waits for: orphans
    a subreaper inherits, and, when the proxy is PID 1 (a container's CMD), those
    the kernel hands it from anywhere in the container.
    """

    reap_interval = 0.5  # seconds between two looks for zombie children
    kill_rounds = 200  # scans for processes forked, or still exiting, as theirs are killed

    def __init__(self, logs=None):
        self.logs = logs or Logs()
        self.lock = threading.Lock()
        self.alive = set()
        self.spawned = 0
        self.starting = 0  # starts under way, which run side by side
        self.starts_done = threading.Condition(self.lock)
        self.subreaper = None  # decided at the first spawn
        self.reaped_at = 0.0

    def spawn(self, argv, env, cwd, **options):
        """Starts an ActionProcess with a marker of its own."""
        with self.lock:
            if self.subreaper is None:
                self.subreaper = become_subreaper(self.logs)
            self.spawned += 1
            marker = "%d-%d" % (os.getpid(), self.spawned)
        return self.start(lambda: ActionProcess(argv, marker, env, cwd=cwd, **options),
                          action=True)

    def start(self, popen, action=False):
        """``popen()``, a new child of the proxy's, with no periodic reap meanwhile:
        until the Popen has its child's pid, the child cannot be told from an
        orphan, and one that exits at once would be reaped under it (its exit
        status lost).  Starts run side by side, not one after the other (each
        waits for its exec).  An ``action`` process is killed at shutdown."""
        with self.lock:
            self.starting += 1
        process = None
        try:
            process = popen()
        finally:
            with self.lock:
                self.starting -= 1
                if action and process is not None:
                    self.alive.add(process)
                self.starts_done.notify_all()
        return process

    def end(self, process):
        """Kills the process's group and every process that carries its marker or
        is in its session (whatever marker it copied: no other can be there)."""
        kill_group(process)
        if not self.none_escaped(process):
            self.kill_marked(process.marker, killed={process.pid}, session=process.pid)

    def none_escaped(self, process):
        """True when nothing ``process`` started can be alive, known without a scan of
        the descendants: it has exited, so all it left are orphans and their
        children, orphans go to the proxy's main thread, and that thread has no
        children but the action processes the proxy knows."""
        if not self.subreaper or not exited(process.pid):
            return False
        return self.own_pids().issuperset(orphans())

    def discard(self, process):
        with self.lock:
            self.alive.discard(process)
        self.reap_orphans(force=True)

    def kill_all(self):
        """At shutdown: every action process, whatever its activation, those being
        spawned too."""
        with self.lock:
            self.starts_done.wait_for(lambda: not self.starting)
            for process in self.alive:
                kill_group(process)
        self.kill_marked(None)
        self.reap_orphans(force=True)

    def kill_marked(self, marker, killed=(), session=None):
        """Kills the descendants whose marker is ``marker`` (every descendant when
        None) or who are in ``session``, and the stray orphans, again while some
        are found (one may fork meanwhile) or one that was killed still exits:
        until it has, its children are not yet the proxy's."""
        if not self.subreaper:
            return
        wanted = ("\0%s=%s\0" % (ACTIVATION_MARKER, marker)).encode() if marker else b""
        killed, clean = set(killed), 0
        for _ in range(self.kill_rounds):
            # Those dead before the scan begins have handed their children over.
            exiting = [pid for pid in killed if running(pid)]
            found = [pid for pid in descendants(os.getpid())
                     if wanted in environ_of(pid) or session and session_of(pid) == session]
            found += self.stray_orphans()
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass  # gone already
            killed.update(found)
            # Two clean scans in a row: a list of children read while another
            # process exits may miss one.
            clean = 0 if found or exiting else clean + 1
            if clean == 2:
                return
            if exiting and not found:
                time.sleep(0.002)

    def own_pids(self):
        with self.lock:
            return {process.pid for process in self.alive}

    def stray_orphans(self):
        """Live orphans whose marker is no running activation's (or warm
        process's): one that cleared its environment (``env -i``), or set a marker
        of its own, empty or made up, or kept that of an activation that ended.
        Whose it was no one can tell; an orphan is no longer the process an
        activation waits for, so the next cleanup ends it."""
        with self.lock:
            own = {process.pid for process in self.alive}
            live = {process.marker for process in self.alive}
        return [pid for pid in orphans() if pid not in own
                and running(pid)
                and marker_of(environ_of(pid)) not in live]

    def reap_orphans(self, force=False):
        """Collects the exit status of zombie children no Popen object waits for: at
        the end of an activation (``force``) its orphans, which are the main
        thread's, and every ``reap_interval`` those of any thread."""
        if not (self.subreaper or os.getpid() == 1):
            return
        if force:
            self.reap(orphans(), self.own_pids())
        elif time.monotonic() - self.reaped_at >= self.reap_interval:
            with self.lock:  # and no start begins meanwhile
                if self.starting:
                    return  # its child may have no Popen pid yet: the next look reaps
                self.reaped_at = time.monotonic()
                self.reap(children_of(os.getpid()), {process.pid for process in self.alive})

    @staticmethod
    def reap(children, own):
        """Waits for the zombies among ``children`` that are not ``own`` (their
        threads wait for them) nor any Popen's."""
        zombies = [pid for pid in children if pid not in own and process_state(pid) == b"Z"]
        if zombies:
            import gc
            waited = {process.pid for process in gc.get_objects()
                      if isinstance(process, subprocess.Popen) and process.returncode is None}
            for pid in set(zombies) - waited:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass  # a Popen that was just polled took it


def asleep(pid):
    """True when ``pid`` and every descendant are sleeping (waiting for input, a
    child, a timer), none running, exiting or gone."""
    return all(process_state(each) == b"S" for each in [pid] + descendants(pid))


# -- The pump ------------------------------------------------------------------

class LineReader(LineForwarder):
    """Collects the lines a warm action writes on its result descriptor (fd 3); a
    line longer than ``max_line`` is collected as an Overlong."""

    def __init__(self, max_line=DEFAULT_MAX_RESULT):
        LineForwarder.__init__(self, None, max_line)
        self.lines = []

    def forward(self, data):
        self.lines.extend(data.split(b"\n")[:-1])

    overflow = LineForwarder.skip

    def overlong(self, line):
        self.lines.append(line)

    def close(self):
        self.partial, self.cut = [], None

    def take_stale(self):
        """Drops the lines no activation asked for; says how many there were."""
        count = len(self.lines) + bool(self.partial or self.cut)
        self.lines, self.partial, self.partial_size, self.cut = [], [], 0, None
        return count


def pidfd_for(pid):
    """A descriptor that becomes readable when ``pid`` exits (Linux 5.3, Python 3.9)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class Pump:
    """Moves bytes between the proxy and one action process, on the calling thread:
    writes its stdin without ever blocking, forwards its stdout and stderr to the
    logs line by line, collects its result lines, and notices when it exits or
    the deadline passes.  A warm process keeps its pump from one activation to
    the next.
    """

    poll_interval = 0.05  # how often to look for the exit where pidfds are missing
    longest_wait = 3600.0  # selectors overflow on far-future deadlines
    chunk = READ_SIZE  # bytes moved at a time, more once a pipe is made larger
    widest = MIB  # what an unprivileged process may make a pipe hold (pipe-max-size)

    def __init__(self, process, stdout, stderr, results=None, result_pipe=None):
        self.process = process
        self.stdout, self.stderr, self.results = stdout, stderr, results
        # poll, not epoll: no descriptor to make, no system call per (un)registration
        self.selector = selectors.PollSelector()
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
        if len(data) > self.chunk:
            self.widen(len(data))
        if self.write_stdin():
            self.stdin_written()
        else:
            self.selector.register(self.process.stdin, selectors.EVENT_WRITE, "stdin")

    def widen(self, size):
        """Pipes that hold ``size`` bytes (up to ``widest``) for a large input, and
        likely output: a few wake-ups move it rather than one per 64 KiB."""
        import fcntl
        size = min(size, self.widest)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                self.chunk = max(self.chunk, fcntl.fcntl(stream, F_SETPIPE_SZ, size))
            except OSError:
                return  # beyond what this user's pipes may hold: the default it is

    def stdin_written(self):
        if self.close_stdin:
            self.process.stdin.close()

    def until(self, deadline, finished=lambda: False):
        """Pumps the pipes until ``finished()``; returns "finished", "exited" or "deadline".
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
        chunk = os.read(key.fd, self.chunk)
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
                                                     self.pending[:self.chunk]):]
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


# -- Why a process ended -------------------------------------------------------

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


def not_runnable(path):
    """Why ``path``, which the action needs, cannot run, and what to do."""
    if not os.path.isfile(path):
        return ("%s is missing: POST /init with the action's code first, or put an "
                "executable exec in the image" % path)
    return "%s is not an executable file: chmod +x it, or POST /init with the code" % path


def start_failure(path, error):
    """What keeps the system from starting ``path`` (``error`` is exec's OSError),
    and what to do about it, in one line; None when there is nothing to add."""
    import errno
    import re
    try:
        with open(path, "rb") as program:
            head = program.read(4096)
    except OSError:
        head = b""
    first = head.split(b"\n", 1)[0]
    if error.errno == errno.ENOEXEC:
        if head.startswith(b"\x7fELF"):
            return "%s is an ELF binary for another machine: build it for this one" % path
        if re.search(rb"^\s*#\s*include\s*[<\"]|\bint\s+main\s*\(", head, re.MULTILINE):
            return ("%s is C source, not a program: compile it (cc -o exec main.c) and deploy "
                    "the binary" % path)
        if b"\0" not in head:
            return ("%s is text without a #! line, and not an ELF binary: make its first line "
                    "name its interpreter, e.g. #!/bin/sh" % path)
        return "%s is neither a script with a #! line nor an ELF binary" % path
    if first.startswith(b"#!") and first.endswith(b"\r"):
        return ("the #! line of %s ends with a carriage return (Windows line endings): "
                "convert the file to Unix line endings, e.g. with dos2unix" % path)
    if error.errno == errno.ENOENT and first.startswith(b"#!"):
        return ("%s names %s as its interpreter in its #! line, which is not in this image"
                % (path, first[2:].strip().split(b" ")[0].decode("utf-8", "replace")))
    if error.errno == errno.EACCES:
        return "%s is not executable: chmod +x it, on a file system that allows programs" % path
    return None


# ============================================================================
# 5. Installation
# ============================================================================

# -- Folders -------------------------------------------------------------------

class InitError(Exception):
    """Why an /init failed; written to stderr for the user to read."""


class StartError(InitError):
    """The code was installed, but the action would not start (or not in this image)."""


class InitCancelled(InitError):
    """The proxy is shutting down: the init stopped where it was, nothing installed."""

    def __init__(self):
        InitError.__init__(self, SHUTTING_DOWN)


def check_cancelled(cancelled):
    if cancelled is not None and cancelled.is_set():
        raise InitCancelled()


def writable(folder):
    return os.access(folder, os.W_OK | os.X_OK)


def scratch_dir(near):
    """A fresh private directory for the proxy's own work on the directory ``near``
    (staging, unpacking): in ``near``'s parent when that is writable, else under
    ``TMPDIR`` (``/tmp``).  Never in ``near`` itself, which may be read-only."""
    import tempfile
    parent = os.path.dirname(near)
    return tempfile.mkdtemp(prefix=".owproxy-", dir=parent if writable(parent) else None)


def is_directory(path):
    return os.path.isdir(path) and not os.path.islink(path)


FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def emptied(folder):
    """Removes what the open ``folder`` holds but folders; returns their names."""
    inner = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                inner.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=folder)
    return inner


def remove_tree(path):
    """Removes a file, or a folder with all it holds, never through a link, as far
    as it can.  Without recursion (shutil.rmtree recurses up to Python 3.12, and an
    archive may nest folders deeper than the stack) and with one folder open at a
    time, each listed once: linear in what it removes, whatever the depth."""
    if not is_directory(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with contextlib.suppress(OSError):
        folder = os.open(path, FOLDER_FLAGS)
        try:
            below = [(None, emptied(folder))]  # from ``path`` down: (name, subfolders left)
            while len(below) > 1 or below[0][1]:
                name, left = below[-1]
                if left:
                    inner = left.pop()
                    opened = os.open(inner, FOLDER_FLAGS, dir_fd=folder)
                    os.close(folder)
                    folder = opened
                    below.append((inner, emptied(folder)))
                else:
                    below.pop()
                    opened = os.open(os.pardir, FOLDER_FLAGS, dir_fd=folder)
                    os.close(folder)
                    folder = opened
                    os.rmdir(name, dir_fd=folder)
        finally:
            os.close(folder)
        os.rmdir(path)


def stage_dir(dest):
    """A fresh directory to build what then moves into ``dest``: a scratch directory
    when a rename from there into ``dest`` works (the same mount, so that moving is
    atomic), else a hidden one inside ``dest``."""
    import tempfile
    stage = scratch_dir(dest)
    probe = os.path.join(dest, os.path.basename(stage))
    try:
        os.rename(stage, probe)
        os.rename(probe, stage)
        return stage
    except OSError:  # another mount (a volume on the action directory): EXDEV
        remove_tree(probe)
        remove_tree(stage)
        return tempfile.mkdtemp(prefix=".owproxy-", dir=dest)


def check_writable(folder):
    """An /init with code needs to write; a directory it cannot write to serves only
    what it holds.  Which of the two causes it is tells the user what to change: the
    mount (a read-only root) or the owner (a --user the image was not built for)."""
    if writable(folder):
        return
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        cause = "is read-only"
    else:
        cause = "is not writable by uid %d" % os.geteuid()
    raise InitError("the action directory %s %s, so /init cannot install code there: bake "
                    "the action into the image, or point --action-dir (OWPROXY_ACTION_DIR) "
                    "at a writable directory" % (folder, cause))


def is_executable(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def make_folders(path):
    """``os.makedirs(path, exist_ok=True)`` without its recursion, one level per
    missing folder, which an archive's deep folders would take past the stack."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise


def put(path, target):
    """Moves ``path`` to ``target``, replacing it: in one step (rename(2)) unless a
    directory is involved, so that a file such as ``exec`` never goes missing."""
    if is_directory(path) or is_directory(target):
        remove_tree(target)
    os.replace(path, target)


# -- Versions ------------------------------------------------------------------

class Version:
    """One init's action: ``binary``, in the folder of its own it was installed in
    (``folder``; None for the action directory, which an exec-mode init replaces in
    place, its top-level ``names``) and never moves from.  A run holds the version
    current at its start until it ends; a replaced one keeps its folder, and its
    warm processes, until the last run that holds it lets go."""

    def __init__(self, binary, folder=None, names=()):
        self.binary, self.folder, self.names = binary, folder, names
        self.kind = self.function = None  # decided at its init (else at the first run)
        self.pool = None
        self.lock = threading.Lock()
        self.users = 0
        self.replaced = False

    def hold(self):
        with self.lock:
            self.users += 1
        return self

    def release(self):
        with self.lock:
            self.users -= 1
            unused = self.replaced and not self.users
        if unused:
            self.discard()

    def replace(self):
        """Another version is current: this one goes once no run holds it."""
        with self.lock:
            self.replaced = True
            unused = not self.users
        if self.pool is not None:
            self.pool.retire()
        if unused:
            self.discard()

    def discard(self):
        if self.pool is not None:
            self.pool.close(0.0)
        if self.folder is not None:
            remove_tree(self.folder)


class Installation:
    """Moves a staged tree into a directory, and the ``displaced`` names out of it,
    so that leaving with an error puts back exactly what was there before.  A file
    is replaced in one step, its old version kept as a hard link, so ``exec``
    always names a complete action, the old one or the new one, even for a run
    that starts meanwhile; ``exec`` is moved last.
    """

    def __init__(self, stage, dest, displaced=(), binary=None):
        self.stage, self.dest, self.displaced = stage, dest, displaced
        self.backup = None
        self.moved = []  # (name, where its old version is kept, or None)
        self.version = Version(binary, names=os.listdir(stage))

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
        return self.version

    def keep(self, target, name, link):
        """Keeps ``target`` in the backup as ``name``: as a hard link, leaving it in
        place, where ``link`` asks and the file system allows, else moved there."""
        self.backup = self.backup or stage_dir(self.dest)
        kept = os.path.join(self.backup, name)
        make_folders(os.path.dirname(kept))
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


class Gate:
    """Runs of an action directory's version pass through it together; an init that
    replaces the action directory's files does so alone: it waits (at most its
    ``wait``) for the runs in flight, and the runs that come meanwhile wait for it."""

    def __init__(self):
        self.changed = threading.Condition()
        self.runs = 0
        self.replacing = False

    @contextlib.contextmanager
    def run(self):
        with self.changed:
            self.changed.wait_for(lambda: not self.replacing)
            self.runs += 1
        try:
            yield
        finally:
            with self.changed:
                self.runs -= 1
                self.changed.notify_all()

    @contextlib.contextmanager
    def alone(self, wait):
        with self.changed:
            self.replacing = True
            try:
                if not self.changed.wait_for(lambda: not self.runs, wait):
                    raise InitError("the %d run(s) in flight did not end within %g seconds, "
                                    "so the action stays as it was (see --reinit-wait)"
                                    % (self.runs, wait))
            except BaseException:
                self.replacing = False
                self.changed.notify_all()
                raise
        try:
            yield
        finally:
            with self.changed:
                self.replacing = False
                self.changed.notify_all()


class CompiledVersion:
    """A version in a folder of its own, ``N/src`` and ``N/bin`` as the Go proxy lays
    them out, the action ``N/bin/<exec>``: the folder goes if the init fails."""

    def __init__(self, folder, bin, name):
        self.stage = bin
        self.version = Version(os.path.join(bin, name), folder)

    def __enter__(self):
        return self.version

    def __exit__(self, kind, error, trace):
        if kind is not None:
            self.version.discard()
        return False


# -- Archives ------------------------------------------------------------------

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


ZIP_MAGIC, TAR_GZ_MAGIC = b"PK", b"\x1f\x8b\x08"


def write_member(path, source, mode):
    """Writes a file afresh (never through a link) from ``source``, in bounded chunks."""
    import shutil
    make_folders(os.path.dirname(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    permissions = (mode & 0o777 | 0o600) if mode & 0o777 else 0o644
    with os.fdopen(os.open(path, flags, permissions), "wb") as target:
        shutil.copyfileobj(source, target, MIB)


@functools.lru_cache(maxsize=None)
def path_max():
    """The longest path the system takes (PATH_MAX), so the longest link target made."""
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def link_target(name, target):
    """A link's target from its bytes (read up to one past PATH_MAX, never more)."""
    if len(target) > path_max():
        raise InitError("the symbolic link %r has a target longer than PATH_MAX (%d bytes)"
                        % (name, path_max()))
    try:
        return target.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InitError("the symbolic link %r has a target that is not UTF-8 (%s)"
                        % (name, error))


def extract_member(archive, member, path):
    """Writes one file or directory; a symbolic link's target is returned, to be made last."""
    import stat
    mode = member.external_attr >> 16
    try:
        if stat.S_ISLNK(mode):
            with archive.open(member) as source:
                return link_target(member.filename, source.read(path_max() + 1))
        if member.is_dir():
            make_folders(path)
            return None
        with archive.open(member) as source:
            write_member(path, source, mode)
        return None
    except InitError:
        raise
    except Exception as error:
        raise InitError("cannot extract %r from the archive: %s" % (member.filename, error))


def entries_below_links(names, links):
    """An entry below a link, and that link, if there is one: the names go into a
    tree of their folders, so the check is one step per name part (comparing each
    name's prefixes with the links is quadratic in the depth)."""
    LINK = object()  # the mark of a link in the tree
    tree = {}
    for parts in links:
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = {LINK: parts}
    for parts in names:
        node = tree
        for part in parts[:-1]:
            node = node.get(part)
            if node is None:
                break
            if LINK in node:
                return parts, node[LINK]
    return None


def make_links(dest, names, links):
    """Creates an archive's symbolic links, last, once no other entry lies below one."""
    below_link = entries_below_links(names, [parts for parts, _ in links])
    if below_link:
        raise InitError("the archive entry %r lies below the symbolic link %r"
                        % tuple("/".join(parts) for parts in below_link))
    for parts, target in links:
        path = os.path.join(dest, *parts)
        try:
            make_folders(os.path.dirname(path))
            os.symlink(target, path)
        except OSError as error:
            raise InitError("cannot create the link %r: %s" % ("/".join(parts), error))


def extract_entries(entries, dest, extract, cancelled=None):
    """Extracts (name, entry) pairs into ``dest`` with ``extract(entry, path)``, which
    returns a link's target instead of making the link: links come last."""
    names, links = [], []
    for name, entry in entries:
        check_cancelled(cancelled)
        parts = archive_path(name)
        if not parts:
            continue  # the archive's own folder, "./"
        names.append(parts)
        target = extract(entry, os.path.join(dest, *parts))
        if target is not None:
            links.append((parts, target))
    make_links(dest, names, links)


def extract_zip(data, dest, max_total, cancelled=None):
    """Extracts a zip archive into the empty directory ``dest``.

    Nothing is written outside ``dest``: absolute and ``..`` names are refused,
    symbolic links are created last and no other entry may lie below one, and
    every file is created afresh (O_EXCL, O_NOFOLLOW).  The sizes the archive
    declares are checked before anything is written; zipfile never inflates an
    entry past its declared size, and every entry, a link's target included, is
    read in bounded chunks.
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
        extract_entries(((member.filename, member) for member in members), dest,
                        functools.partial(extract_member, archive), cancelled)


def counted(archive, max_total):
    """The (name, member) pairs of a tar archive, stopped at the limits as they pass."""
    total = 0
    for count in itertools.count(1):
        member = archive.next()
        if member is None:
            return
        archive.members.clear()  # a stream needs no index of the entries gone by
        total += member.size
        if count > MAX_ARCHIVE_ENTRIES:
            raise InitError("the archive has more entries than the limit of %d"
                            % MAX_ARCHIVE_ENTRIES)
        if total > max_total:
            raise InitError("the archive expands to more than the limit of %d bytes"
                            % max_total)
        yield member.name, member


def extract_tar_member(archive, member, path):
    """``extract_member`` for a tar entry; only files, folders and links are taken."""
    if member.issym():
        return link_target(member.name, os.fsencode(member.linkname))
    try:
        if member.isdir():
            make_folders(path)
        elif member.isfile():
            write_member(path, archive.extractfile(member), member.mode)
        else:
            raise InitError("the archive entry %r is not a file, folder or symbolic link"
                            % member.name)
    except OSError as error:
        raise InitError("cannot extract %r from the archive: %s" % (member.name, error))
    return None


def extract_tar(data, dest, max_total, cancelled=None):
    """Extracts a tar.gz archive into the empty directory ``dest`` under the rules
    of ``extract_zip``.  gzip declares no sizes, so they are counted as the
    archive streams by, and extended headers (long names) are bounded too."""
    import io
    import tarfile
    import zlib

    class Header(tarfile.TarInfo):
        """tarfile reads an extended header whole, and keeps every global one for
        the rest of the archive: both are bounded, before anything is read."""

        def _proc_member(self, tarfile_):
            if self.type in EXTENDED_HEADERS:
                size = self.size + (tarfile_.global_sizes if self.type == tarfile.XGLTYPE
                                    else 0)
                if size > MAX_EXTENDED_HEADER:
                    raise InitError("the archive has an extended header of %d bytes, more "
                                    "than the limit of %d" % (size, MAX_EXTENDED_HEADER))
                if self.type == tarfile.XGLTYPE:
                    tarfile_.global_sizes = size
            return tarfile.TarInfo._proc_member(self, tarfile_)

    EXTENDED_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                        tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|gz", tarinfo=Header) as archive:
            archive.global_sizes = 0  # of the global headers so far, which tarfile keeps
            extract_entries(counted(archive, max_total), dest,
                            functools.partial(extract_tar_member, archive), cancelled)
    except (tarfile.TarError, EOFError, OSError, zlib.error, TypeError, ValueError) as error:
        raise InitError("the code is not a tar.gz archive (%s)" % error)


def unpack(data, dest, max_total, name, cancelled=None):
    """Installs ``binary`` code into the empty directory ``dest``: a zip, a tar.gz,
    or anything else as the executable ``name`` itself (a script or a binary).
    An archive stops at its next entry once ``cancelled`` is set."""
    import io
    if data.startswith(ZIP_MAGIC):
        extract_zip(data, dest, max_total, cancelled)
    elif data.startswith(TAR_GZ_MAGIC):
        extract_tar(data, dest, max_total, cancelled)
    elif name.startswith(os.pardir):  # a runner whose binary lies outside its archive's folder
        raise InitError("the code is neither a zip nor a tar.gz archive")
    else:
        write_member(os.path.join(dest, name), io.BytesIO(data), 0o755)


def is_jar(data):
    """A zip that holds a jar's manifest."""
    import io
    import zipfile
    if not data.startswith(ZIP_MAGIC):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return "META-INF/MANIFEST.MF" in archive.namelist()
    except (zipfile.BadZipFile, ValueError):
        return False


def zip_folder(out, folder=None, keep_links=True, executables=()):
    """Writes a zip to the file ``out``, in bounded chunks: what is in ``folder``
    (its files with their modes, its folders, and its links as links, which
    ``extract_zip`` makes again, or, without ``keep_links``, as what they point
    to), then each ``(name, bytes)`` of ``executables``."""
    import stat
    import zipfile
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for root, folders, files in os.walk(folder) if folder else ():
            folders.sort()
            for name in sorted(folders + files):
                path = os.path.join(root, name)
                entry = os.path.relpath(path, folder)
                if keep_links and os.path.islink(path):
                    info = zipfile.ZipInfo(entry)
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    archive.writestr(info, os.readlink(path))
                else:
                    archive.write(path, entry)
        for name, data in executables:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o755) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)


# -- Compile scripts -----------------------------------------------------------

def runnable(path):
    """Code that runs as it is, not compiled: a script (``#!``) or an ELF binary."""
    try:
        with open(path, "rb") as file:
            return file.read(4).startswith((b"#!", b"\x7fELF"))
    except OSError:
        return False


COMPILE_POLL = 0.05  # seconds between two looks, during a compile, for a shutdown


def compile_action(compiler, main, src, bin, env, timeout, processes, cancelled=None):
    """Runs a runtime image's compile script as the Go proxy does, ``COMPILER MAIN SRC
    BIN``: whatever it prints, even with exit status 0, is why it failed.  It is
    killed, with its process group, at the timeout or once ``cancelled`` is set."""
    try:
        process = processes.start(lambda: subprocess.Popen(
            [compiler, main, src, bin], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
    except OSError as error:
        raise InitError("cannot run the compiler %s: %s" % (compiler, error.strerror))
    end = time.monotonic() + timeout
    try:
        while True:
            try:
                output = process.communicate(timeout=min(COMPILE_POLL, timeout))[0]
                break
            except subprocess.TimeoutExpired:
                check_cancelled(cancelled)
                if time.monotonic() > end:
                    raise InitError("the compiler did not finish within %g seconds" % timeout)
    finally:
        kill_group(process)  # and whatever it left running
        process.stdout.close()
        process.wait()
    if output:
        raise InitError(output.decode("utf-8", "replace"))
    if process.returncode:
        raise InitError("exit status %d" % process.returncode)


# -- An init's code ------------------------------------------------------------

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


class Installer:
    """What an init decides, and does with its code: ActionRunner's steps of an
    init that stage or compile the code, check it and tell its kind.  A part of
    the runner, kept here with the rest of installation: it uses what
    ActionRunner sets up (settings, logs, processes, paths, lock, the current
    version and kind, the versions folder, ``cancel_installs``,
    ``init_environment``); subclasses of ActionRunner may override any of its
    methods.
    """

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
            return contextlib.nullcontext(Version(self.binary))  # what the action directory holds
        if not isinstance(code, str):
            raise InitError("code must be a string, not %s" % json_type(code))
        if not code and not is_executable(self.binary):  # the dockerskeleton without its stub
            raise InitError("the code is empty and there is no executable %s to keep"
                            % self.binary)
        data = decode_base64(code) if binary else None
        folder = self.zipdest if binary else os.path.dirname(self.source)
        check_writable(folder)
        if self.settings.compiler:
            return self.install_compiled(message, code, data, folder, main)
        stage = stage_dir(folder)
        try:
            self.unpack_code(code, data, stage, folder)
            self.check_execution_env(stage, folder)
            self.decide_kind(stage, main)
            if binary:
                self.prepare_archive(stage)
        except BaseException:
            remove_tree(stage)
            raise
        return Installation(stage, folder, self.displaced(stage, folder), self.binary)

    def unpack_code(self, code, data, folder, dest):
        """The code written into ``folder``: the archive (``data``) or the source; a
        jar, with OW_SAVE_JAR, as the file it names (the Go proxy's UnzipOrSaveJar)."""
        import io
        if data is None:
            self.write_source(folder, code)
        elif self.settings.save_jar and is_jar(data):
            write_member(os.path.join(folder, self.settings.save_jar), io.BytesIO(data), 0o644)
        else:
            unpack(data, folder, self.settings.max_archive,
                   os.path.relpath(self.binary, dest), self.cancel_installs)

    def install_compiled(self, message, code, data, dest, main):
        """With OW_COMPILER, as the Go proxy does: the code unpacked into a new
        version's ``src`` and compiled into its ``bin`` (or, when it runs as it is,
        ``src`` becomes ``bin``), where both stay while the version is used."""
        folder = self.version_folder()
        src, bin = os.path.join(folder, "src"), os.path.join(folder, "bin")
        name = os.path.relpath(self.binary, dest)
        try:
            os.mkdir(src)
            self.unpack_code(code, data, src, dest)
            if runnable(os.path.join(src, name)):
                os.rename(src, bin)
            else:
                self.compile(message, src, bin, name, main)
            self.check_execution_env(bin, dest)
            self.decide_kind(bin, main)
            if data is not None:
                self.prepare_archive(bin)
        except BaseException:
            remove_tree(folder)
            raise
        return CompiledVersion(folder, bin, name)

    def version_folder(self):
        """A new version's folder, numbered, in a folder of the proxy's own beside the
        action directory (or in TMPDIR): the action directory stays as the image made it."""
        with self.lock:
            if self.versions is None:
                self.versions = scratch_dir(self.settings.action_dir)
            self.installs += 1
            folder = os.path.join(self.versions, str(self.installs))
        os.mkdir(folder)
        return folder

    def compile(self, message, src, bin, name, main):
        """``src`` compiled by the image's OW_COMPILER into ``bin``, whose ``name`` is the action."""
        os.mkdir(bin)
        compile_action(self.settings.compiler, main, src, bin, self.compiler_env(message),
                       self.settings.compile_timeout, self.processes, self.cancel_installs)
        if not os.path.isfile(os.path.join(bin, name)):
            raise InitError("cannot compile")
        os.chmod(os.path.join(bin, name), 0o755)

    def compiler_env(self, message):
        """The compiler's environment, as the Go proxy gives it: PATH, the container's
        ``__OW_*`` variables, the execution environment and the init ``env``."""
        env = {key: value for key, value in os.environ.items() if key.startswith("__OW_")}
        env["PATH"] = os.environ.get("PATH", os.defpath)
        env.update(self.init_environment(message))
        return env

    def check_execution_env(self, stage, folder):
        """With OW_EXECUTION_ENV, the action's ``exec.env`` (its compile script wrote it)
        must hold the same value: else it was built for another image."""
        expected = self.settings.execution_env
        if not expected:
            return
        try:
            with open(os.path.join(stage, os.path.relpath(self.binary, folder)) + ".env",
                      "rb") as file:
                actual = file.read(MIB).decode("utf-8", "replace")
        except OSError as error:
            raise StartError("cannot read exec.env: %s" % error.strerror)
        if actual.strip() != expected:
            self.logs.out(("Expected exec.env should start with %s\nActual value: %s\n"
                           % (expected, actual)).encode("utf-8"))
            raise StartError(EXEC_ENV_MISMATCH)

    def displaced(self, stage, folder):
        """What the last init installed and the new code does not hold goes, and so
        does the old executable when the new code does not replace it (a Python
        function's source, an archive without one, a source to build), so that a
        failed init puts it back, and a build that fails leaves no half-new one."""
        gone = [name for name in self.version.names
                if not os.path.lexists(os.path.join(stage, name))]
        name = os.path.relpath(self.binary, folder)
        if (name.startswith(os.pardir) or os.path.lexists(os.path.join(stage, name))
                or name in gone):
            return gone
        return gone + [name]

    def write_source(self, stage, code):
        """The source as the source file, or as ``__main__.py`` if it is a Python function."""
        python = (not self.settings.compiler and self.source == self.binary
                  and looks_like_python(code))
        path = os.path.join(stage, "__main__.py" if python else os.path.basename(self.source))
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as source:
            source.write(code)
        os.chmod(path, 0o644 if python else 0o755)

    def decide_kind(self, folder, main="main"):
        """An ``exec`` runs as a process ("exec", or "loop" with --loop); without
        one, and without OW_COMPILER (the image decides then), a ``__main__.py``
        is a Python function."""
        self.kind, self.function = self.kind_of(folder, main)

    def kind_of(self, folder, main="main"):
        """The kind of the action ``folder`` holds, and its function if it has one."""
        script = os.path.join(folder, "__main__.py")
        binary = os.path.join(folder, os.path.basename(self.binary))
        if not (self.settings.compiler or os.path.lexists(binary)) and os.path.isfile(script):
            return "function", (os.path.join(os.path.dirname(self.binary), "__main__.py"), main)
        return "loop" if self.settings.loop else "exec", None

    def prepare_archive(self, stage):
        """The archive's executable runs whatever its mode bits (one a build makes
        later, or one outside the archive's directory, is the build's business)."""
        name = os.path.relpath(self.binary, self.zipdest)
        staged = os.path.join(stage, name)
        if (self.kind != "function" and not name.startswith(os.pardir)
                and os.path.isfile(staged) and not os.path.islink(staged)):
            os.chmod(staged, 0o755)


# ============================================================================
# 6. Runs
# ============================================================================

# -- The activation's environment ----------------------------------------------

def env_string(value):
    """How OpenWhisk exports a JSON value as an environment variable."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def exportable(key, text):
    try:
        os.fsencode(key + text)
    except UnicodeEncodeError:  # a lone surrogate has no bytes
        return False
    return "=" not in key and "\0" not in key + text


def exported(names_and_values, prefix=""):
    """The environment entries for a JSON object, refusing what execve cannot carry."""
    entries = {}
    for name, value in names_and_values:
        key, text = prefix + name, env_string(value)
        if not name or not exportable(key, text):
            raise ValueError("%r cannot be exported as an environment variable" % name)
        entries[key] = text
    return entries


def activation_fields(message):
    """A /run body's fields but ``value``, as the environment has them: ``__OW_<KEY>``."""
    return exported(((key.upper(), value) for key, value in message.items()
                     if key != "value"), prefix="__OW_")


class ActivationEnv(dict):
    """An activation's environment, which knows the activation's own fields among
    its entries: a warm process gets those (and only those) on its input line."""

    def __init__(self, base, fields):
        dict.__init__(self, base)
        self.fields = fields


# -- An executable run once ----------------------------------------------------

def result_value(result):
    """A result as Python values, whether or not it still holds its line."""
    return result.value if isinstance(result, ResultLine) else result


def parse_result(line):
    """The action's result line as a ResultLine, or None if it is no JSON object or array."""
    if not isinstance(line, bytes):
        return None
    try:
        text, data = line.decode("utf-8"), line.strip()
    except UnicodeDecodeError:
        text, data = line.decode("utf-8", "replace"), None
    try:
        result = strict_json(text)
    except ValueError:
        return None
    return ResultLine(result, data) if isinstance(result, (dict, list)) else None


def log_line(line, logs, limit):
    """A line held back as a possible result that turned out to be a log."""
    if isinstance(line, Overlong):
        line.log(logs, limit)
    elif line is not None:
        logs.out(clean_utf8(line) + b"\n")


def result_answer(line, logs, limit, echo=True):
    """200 with the result, or the exact 502 with the offending line in the logs
    (unless not ``echo``)."""
    if isinstance(line, Overlong):
        line.log(logs, limit)
        return 502, {"error": RUN_TOO_LARGE.format(line.size, limit)}
    try:
        result = parse_result(line)
    except RecursionError:
        return 502, {"error": RUN_TOO_DEEP.format("result")}
    if result is None:
        if echo:
            log_line(line, logs, limit)
        return 502, {"error": RUN_BAD_RESULT}
    return 200, result


class ErrorForwarder(LineForwarder):
    """Forwards an action's stderr, noticing "Bad file descriptor": the error of an
    ActionLoop program, which answers on fd 3, run once per activation."""

    bad_descriptor = False

    def forward(self, data):
        self.bad_descriptor = self.bad_descriptor or b"Bad file descriptor" in data
        LineForwarder.forward(self, data)


def run_once(argv, data, env, cwd, logs, processes, limit):
    """Runs an executable for one activation: ``data`` on stdin, the result its last
    line, at most ``limit`` bytes long."""
    try:
        process = processes.spawn(argv, env, cwd)
    except OSError as error:
        logs.out(("error: cannot start the action: %s\n" % error).encode())
        logs.note(start_failure(argv[0], error) or "the action never ran")
        return 502, {"error": RUN_BAD_RESULT}
    stdout, stderr = ResultForwarder(logs, limit), ErrorForwarder(logs.err, limit)
    pump = Pump(process, stdout, stderr)
    try:
        pump.send(data, close=True)
        ending = pump.until(deadline_of(env))
        processes.end(process)
        pump.drain()
        returncode = process.wait()
    finally:
        pump.close()
        processes.discard(process)
    line = stdout.result()
    if ending == "deadline":
        log_line(line, logs, limit)
        logs.note("the action was stopped at its deadline")
        return 502, {"error": RUN_TIMED_OUT}
    note = exit_note(returncode)
    if note:
        logs.note(note)
    status, payload = result_answer(line, logs, limit)
    if status == 502 and stderr.bad_descriptor:
        logs.note("the action met a closed file descriptor: if it is an ActionLoop program, "
                  "which answers on fd 3, start the proxy with --loop")
    return status, payload


# ============================================================================
# 7. Warm processes
# ============================================================================

# -- Warm processes and their pool ---------------------------------------------

def request_line(message):
    """An ActionLoop request line, its text as the request had it: non-ASCII as
    UTF-8, not escaped (a launcher that reads with ``read line`` would lose the
    backslash of an escape), and no newline but the last (JSON escapes those
    inside strings)."""
    return json_bytes(message) + b"\n"


class WarmProcess:
    """One long-lived action process that serves activations one at a time over
    the ActionLoop protocol: a JSON line in on stdin, a result line out on fd 3.
    """

    # Without an ack, a start is over once the process (and all it started) sleeps,
    # as one waiting for its first request does, or once it has exited; at most
    # this many seconds, for a process busy at its start.
    start_window = 0.05
    start_look_interval = 0.001

    def __init__(self, argv, env, cwd, logs, processes, limit, explain):
        self.logs, self.processes, self.limit, self.explain = logs, processes, limit, explain
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
        self.results = LineReader(limit)
        self.pump = Pump(self.process, LineForwarder(logs.out, limit),
                         LineForwarder(logs.err, limit), self.results, self.result_pipe)

    def start(self, wait_for_ack):
        """Waits for the ack line, ``{"ok": true}``, or, without one, until the
        process is up and waiting (``settled``)."""
        if wait_for_ack:
            ending = self.pump.until(None, lambda: self.results.lines)
            ack = parse_result(self.results.lines.pop(0)) if ending == "finished" else None
            ack = ack and ack.value
            if ending == "finished" and not (isinstance(ack, dict) and ack.get("ok") is True):
                self.stop()
                raise StartError(START_BAD_ACK + " It acknowledged with something other "
                                 "than {\"ok\": true}.")
        else:
            ending = self.settled()
        self.pump.drain()
        if ending == "exited":
            raise self.start_failed(wait_for_ack)
        return self

    def settled(self):
        """Serves the pipes until the process sleeps, tree and all, or exits, or the
        start window ends; returns "exited" or "deadline"."""
        end = time.monotonic() + self.start_window
        while True:
            ending = self.pump.until(min(end, time.monotonic() + self.start_look_interval))
            if ending == "exited" or time.monotonic() >= end or asleep(self.process.pid):
                return ending

    def start_failed(self, waited_for_ack):
        """Why the process is gone at start: the Go proxy's words, the cause noted."""
        self.logs.note(self.exited_at_start())
        return StartError(START_EXITED if waited_for_ack else COMMAND_EXITED)

    def exited_at_start(self):
        return ("%s at start: maybe it is not an ActionLoop program, which reads one "
                "request per line on stdin and answers each on fd 3; a program that runs "
                "once per activation needs no --loop" % self.stop())

    def alive(self):
        return self.process.poll() is None

    def request(self, message, deadline):
        """Serves one activation; returns ``(status, payload)``."""
        self.pump.drain()  # what the process wrote since the last activation
        stale = self.results.take_stale()
        if stale:
            self.explain("dropped %d result line(s) the action wrote outside an activation"
                         % stale)
        self.pump.send(self.frame(message))
        ending = self.pump.until(deadline, lambda: self.results.lines)
        self.pump.drain()
        if ending == "finished":
            return self.answer_of(self.results.lines.pop(0))
        if ending == "deadline":
            self.stop()
            self.explain("the action was stopped at its deadline")
            return 502, {"error": RUN_TIMED_OUT}
        self.explain(self.stop())
        return self.exited()

    def frame(self, message):
        """The line that asks for one activation."""
        return request_line(message)

    def answer_of(self, line):
        """The Go proxy's answer: a result line that is no JSON object or array stays
        out of the logs."""
        return result_answer(line, self.logs, self.limit, echo=False)

    def exited(self):
        """The answer when the process died during an activation (the Go proxy's)."""
        return 400, {"error": COMMAND_EXITED}

    def stop(self):
        """Kills the process and all it started; says how the process ended."""
        self.processes.end(self.process)
        returncode = self.process.wait()
        if not self.result_pipe.closed:
            self.pump.drain()
            self.pump.close()
            self.result_pipe.close()
        self.processes.discard(self.process)
        return exit_note(returncode) or "the action exited"


class FunctionProcess(WarmProcess):
    """A warm interpreter serving a Python ``main(args)`` (see ``function_worker``):
    each request carries a fresh token that its reply, ``TOKEN [status, payload]``,
    must repeat.  Anything else on its result channel was written there by the
    action's code: that activation gets a 502 and the next a fresh interpreter."""

    token = b""

    def exited_at_start(self):
        return "the Python function could not be loaded (%s)" % self.stop()

    def start_failed(self, waited_for_ack):
        return StartError(self.exited_at_start())  # owproxy's own mode: its own words

    def frame(self, message):
        self.token = os.urandom(8).hex().encode()
        return self.token + b" " + WarmProcess.frame(self, message)

    def answer_of(self, line):
        reply = self.reply_of(line)
        if reply is None:
            head = line.head if isinstance(line, Overlong) else line[:80]
            self.explain("the action wrote %r on its worker's result channel: a fresh "
                         "interpreter serves the next activation" % head)
            self.stop()
            return 502, {"error": RUN_BROKEN_CHANNEL.format(repr(head[:80]))}
        return reply

    def reply_of(self, line):
        """``(status, payload)`` from the worker's reply, or None if it is not one."""
        token, _, reply = line.partition(b" ") if isinstance(line, bytes) else (b"", 0, b"")
        if token != self.token:
            return None
        try:
            status, payload = json.loads(reply)
        except RecursionError:
            return 502, {"error": RUN_TOO_DEEP.format("result")}
        except (ValueError, TypeError):
            return None
        if status not in (200, 502) or type(status) is not int:
            return None
        head = b"[%d, " % status  # the worker's own spelling: the payload's text follows
        if isinstance(payload, (dict, list)) and reply.startswith(head) and reply.endswith(b"]"):
            payload = ResultLine(payload, reply[len(head):-1])
        return status, payload

    def exited(self):
        return 502, {"error": RUN_EXITED}


class LoopFunctionProcess(FunctionProcess):
    """A Python function under --loop, which answers as the Python runtime image's
    launcher does under the Go proxy: an interpreter that ends during a run is 400
    ``command exited``, one that ends at start the Go proxy's text."""

    exited = WarmProcess.exited
    start_failed = WarmProcess.start_failed


class WarmPool:
    """The warm processes of an action: one per activation in flight, reused;
    ``start(env)`` makes a new one."""

    def __init__(self, start, env):
        self.start, self.env = start, env
        self.lock = threading.Lock()
        self.idle = []
        self.busy = set()
        self.retired = False

    def acquire(self, explain):
        """An idle live process, else a new one (InitError if it will not start);
        ``explain`` takes the proxy's note about one that ended."""
        with self.lock:
            while self.idle:
                process = self.idle.pop()
                if process.alive():
                    self.busy.add(process)
                    return process
                explain("a fresh process replaces one that ended between activations (%s)"
                        % process.stop())
        process = self.start(self.env)
        with self.lock:
            self.busy.add(process)
        return process

    def release(self, process):
        with self.lock:
            self.busy.discard(process)
            if process.alive() and not self.retired:
                self.idle.append(process)
                return
        process.stop()

    def retire(self):
        """Its version is replaced: the idle processes end, busy ones once released."""
        with self.lock:
            self.retired = True
            idle, self.idle = self.idle, []
        for process in idle:
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


# -- The function worker -------------------------------------------------------

class WorkerChannel:
    """The function worker's two protocol descriptors, moved out of the action's way."""

    def __init__(self, request_fd, result_fd):
        import fcntl
        import resource
        files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        room = max(1, min(files, 1024) - 128)  # select() takes descriptors below 1024
        lowest = 10 + int.from_bytes(os.urandom(2), "big") % room
        self.request_fd = fcntl.fcntl(request_fd, fcntl.F_DUPFD_CLOEXEC, lowest)
        self.result_fd = fcntl.fcntl(result_fd, fcntl.F_DUPFD_CLOEXEC, self.request_fd + 1)
        os.set_blocking(self.request_fd, False)

    def __iter__(self):
        """Each request, ``TOKEN JSON``, as ``(token, json)``, until the proxy closes the channel."""
        import select
        pending = bytearray()
        while True:
            select.select([self.request_fd], [], [])
            try:
                chunk = os.read(self.request_fd, READ_SIZE)
            except BlockingIOError:
                continue  # the action's code read it first, or nothing came yet
            if not chunk:
                return
            pending += chunk
            if b"\n" not in chunk:
                continue
            *lines, rest = pending.split(b"\n")
            pending = bytearray(rest)
            for line in lines:
                token, _, message = line.decode("utf-8", "surrogateescape").partition(" ")
                yield token, message

    def reply(self, line):
        """Writes a line of the protocol after the logs that came before it."""
        flush_python_streams()
        data = memoryview(line.encode("ascii") + b"\n")
        while data:
            data = data[os.write(self.result_fd, data):]


def describe(error):
    """An exception as its type and message, as the last line of a traceback says it."""
    import traceback
    return "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()[-1]


# Where a frame of a user's traceback is the proxy's own: this file (under the name
# it was compiled from, the source's even when started from a .pyc), json, imports.
PROXY_FRAMES = (unusable_python.__code__.co_filename, os.path.dirname(json.__file__) + os.sep,
                "<frozen")


def print_user_traceback(error):
    """The traceback of the action's own code, its files named from the action's
    folder: the frames of the proxy and of the json module are noise there."""
    import traceback
    frames, kept = error.__traceback__, []
    while frames:
        if not frames.tb_frame.f_code.co_filename.startswith(PROXY_FRAMES):
            kept.append(frames)
        frames = frames.tb_next
    for older, newer in zip(kept, kept[1:] + [None]):
        older.tb_next = newer
    text = "".join(traceback.format_exception(type(error), error, kept[0] if kept else None))
    sys.stderr.write(text.replace(os.getcwd() + os.sep, ""))


def load_function(path, name):
    """The function ``name`` of the Python file ``path``, its folder and its
    ``virtualenv/`` on the import path.  Exits saying why when it cannot."""
    import glob
    import importlib.util
    import site
    folder = os.path.dirname(path)
    shown = os.path.relpath(path, folder)
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
        tell("%s failed to load: %s" % (shown, describe(error)))
        sys.exit(1)
    function = getattr(module, name, None)
    if not callable(function):
        tell("%s defines no function %r" % (shown, name))
        sys.exit(1)
    return function


def refused(error, shown, explain, why):
    """The 502 for a result the worker will not send; if ``explain``, the logs show
    it (or its head) and why."""
    if explain:
        print(shown)
        tell(why)
    return 502, json.dumps({"error": error})


def call_function(main, message, limit, explain):
    """Calls ``main`` for one activation; returns ``(status, payload as JSON text)``.
    A result refused is shown in the logs, with why, if ``explain``."""
    fields = activation_fields(message)
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
    except Exception as error:  # a TypeError, or whatever the result's own methods raise
        print_user_traceback(error)
        message = RUN_UNENCODABLE.format(type(result).__name__, describe(error))
        return 502, json.dumps({"error": message})
    if not isinstance(result, (dict, list)):
        return refused(RUN_BAD_RESULT, text, explain, "%s returned %s, not a dictionary or an "
                       "array" % (main.__name__, "None" if result is None
                                  else "a " + type(result).__name__))
    if len(text) > limit:
        return refused(RUN_TOO_LARGE.format(len(text), limit), text[:LINE_HEAD], explain,
                       "that result had %d bytes, more than the limit of %d: only its first "
                       "%d are shown" % (len(text), limit, LINE_HEAD))
    return 200, text


def function_worker(path, name, limit, notes):
    """The warm interpreter of a Python action (started with ``python3 -u``, so its
    logs stream): imports ``path`` once and acks, then for each request calls
    ``name(value)`` with that activation's ``__OW_*`` variables and replies.
    ``notes`` is "explain" when a result it refuses goes to the logs with why,
    "quiet" when the logs hold only what the action wrote.

    The protocol is the proxy's alone: its two descriptors move to numbers no one
    expects, closed in any child, the request one non-blocking (the action's
    stdin and fd 3 become /dev/null); each request carries a fresh token that
    its reply, ``TOKEN [status, payload]`` on one line, must repeat."""
    channel = WorkerChannel(0, 3)
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    os.dup2(0, 3)
    sys.stdin = open(os.devnull)
    main = load_function(path, name)
    channel.reply('{"ok": true}')
    for token, line in channel:
        try:
            status, payload = call_function(main, json.loads(line), int(limit),
                                            notes == "explain")
        except OSError:  # the action closed the worker's own streams: a fresh one next
            sys.exit(1)
        except Exception as error:  # the request itself: a value nested too deeply
            status, payload = 502, json.dumps({"error": "The action could not receive its "
                                                        "argument: %s" % describe(error)})
        channel.reply("%s [%d, %s]" % (token, status, payload))


# ============================================================================
# 8. The runner
# ============================================================================

class ActionRunner(Installer):
    """Prepares and runs the action.  Subclass it to change one step, keeping the
    upstream dockerskeleton hook names:

    - ``init(message)``      installs ``message['code']``, then calls the three below
    - ``epilogue(message)``  adds to the installed source (default: nothing)
    - ``build(message)``     turns the source into ``self.binary`` (default: nothing)
    - ``verify()``           True when the action can run
    - ``env(message)``       the environment of one activation
    - ``run(args, env)``     runs one activation, returns ``(status, result)``

    ``epilogue`` or ``build`` returning False, or raising, fails the init, and
    the action directory is put back as it was.  How ``init`` installs the code
    is the Installer's (section 5), whose steps may be overridden too.  Start
    the proxy with a runner of your own with ``setRunner(MyRunner())`` then
    ``main()``.

    An action is one of three kinds: "exec" (a process per activation), "loop"
    (an ActionLoop executable kept warm, with ``--loop``) or "function" (a
    Python ``main(args)`` in a warm interpreter).
    """

    LOG_SENTINEL = LOG_SENTINEL

    def __init__(self, source=None, binary=None, zipdest=None):
        self.source, self.binary, self.zipdest = source, binary, zipdest
        self.settings = Settings()
        self.logs = Logs()
        self.processes = Processes(self.logs)
        self.init_env = {}
        self.base_env = {}  # the container's environment and the init env: each run's start
        self.failure = None  # why the last init failed
        self.kind = None  # of the action being installed, or else the current one
        self.function = None  # (file, function name) of a Python action
        self.version = None  # the current action, its kind, its warm processes
        self.staged = None  # the version an init is installing
        self.versions = None  # the folder of the versions compiled in folders of their own
        self.installs = 0
        self.cancel_installs = threading.Event()  # set at shutdown: an init stops where it is
        self.gate = Gate()  # between runs and inits of the action directory's versions
        self.lock = threading.Lock()

    def configure(self, settings, logs, processes):
        """Called once by the proxy before it serves; paths default into the action dir."""
        self.settings, self.logs, self.processes = settings, logs, processes
        self.binary = self.binary or os.path.join(settings.action_dir, "exec")
        self.source = self.source or self.binary
        self.zipdest = self.zipdest or os.path.dirname(self.source)
        self.version = Version(self.binary)  # what the image holds
        self.base_env = self.environment(self.init_env)
        try:  # as upstream: the hooks may use paths relative to the source
            os.chdir(os.path.dirname(self.source) or ".")
        except OSError as error:
            raise ConfigError("cannot work in the folder of %s: %s" % (self.source,
                                                                        error.strerror))

    # -- init ------------------------------------------------------------------

    def init(self, message):
        """Installs the code of an /init ``value``; True if the action is ready to run."""
        previous = self.kind, self.function
        self.failure = None
        try:
            env = self.init_environment(message)
            with self.replacing(self.install(message)) as version:
                self.staged = version
                if message.get("code") is not None and (
                        self.epilogue(message) is False or self.build(message) is False):
                    raise InitError("the action could not be built")
                if not self.verify():
                    raise InitError(self.unverified(message))
                version.kind, version.function = self.kind, self.function
                version.pool = self.warm_up(version, env)
        except Exception as error:
            if not isinstance(error, InitCancelled):
                self.logs.note(str(error).rstrip("\n") if isinstance(error, InitError)
                               else "the action could not be initialized: %s" % error)
            self.kind, self.function = previous
            self.failure = error
            return False
        finally:
            self.staged = None
        base_env = self.environment(env)
        with self.lock:
            replaced, self.version, self.init_env, self.base_env = (self.version, version,
                                                                    env, base_env)
        replaced.replace()
        return True

    @contextlib.contextmanager
    def replacing(self, installation):
        """The installed version: an init that replaces the action directory's files
        waits for the runs in flight (the runs that come meanwhile wait for the init),
        so that no run sees a mix of two versions.  One in a folder of its own waits
        for none."""
        with contextlib.ExitStack() as stack:
            if isinstance(installation, Installation):
                stack.callback(remove_tree, installation.stage)  # when the wait fails
                stack.enter_context(self.gate.alone(self.settings.reinit_wait))
            yield stack.enter_context(installation)

    def init_failure(self):
        """The ``error`` of a failed /init: the dockerskeleton's text, or with --loop
        the Go proxy's, which OW_LOG_INIT_ERROR chooses (see the README)."""
        error = self.failure
        if not self.settings.loop or error is None:
            return INIT_FAILED
        started = isinstance(error, StartError)
        if self.settings.log_init_error:
            return INIT_START_FAILED if started else INIT_FAILED
        return INIT_START_CAUSE.format(error) if started else str(error)

    def init_environment(self, message):
        """The init ``env``, after the image's execution environment."""
        env = message.get("env")
        if env is not None and not isinstance(env, dict):
            raise InitError("env must be a JSON object, not %s" % json_type(env))
        entries = {}
        if self.settings.execution_env:
            entries["__OW_EXECUTION_ENV"] = self.settings.execution_env
        try:
            entries.update(exported((env or {}).items()))
        except ValueError as error:
            raise InitError("env: %s" % error)
        return entries

    def unverified(self, message):
        """Why ``verify()`` failed, as the user should read it."""
        if message.get("binary") and message.get("code") is not None:
            return "the archive has no %s file (or __main__.py) at its top level" % (
                os.path.relpath(self.binary, self.zipdest))
        return not_runnable(self.current().binary)

    def epilogue(self, message):
        return None

    def build(self, message):
        return None

    def verify(self):
        if self.current_kind() == "function":
            return os.path.isfile(self.function[0])
        return is_executable(self.current().binary)

    def current(self):
        """The version being installed, else the one runs use."""
        return self.staged or self.version

    def current_kind(self):
        """The kind decided by the last init, else by what the action directory holds."""
        if self.kind is None:
            self.decide_kind(os.path.dirname(self.binary))
        return self.kind

    def warm_up(self, version, init_env):
        """The pool of a warm action, its first process started to prove it can."""
        if version.kind == "exec":
            return None
        pool = self.warm_pool(version, init_env)
        pool.release(pool.acquire(self.explain))
        return pool

    def warm_pool(self, version, init_env):
        """The pool, empty, with the environment its processes start with; an
        ActionLoop executable learns that it must ack as openwhisk-runtime-go says."""
        env = self.environment(init_env)
        if env.get("OW_WAIT_FOR_ACK"):
            env["__OW_WAIT_FOR_ACK"] = "1"
        return WarmPool(functools.partial(self.start_warm, version), env)

    def start_warm(self, version, env):
        """A new warm process for ``version`` (StartError when it does not come up)."""
        cwd = os.path.dirname(version.binary)
        try:
            if version.kind == "function":
                kind = LoopFunctionProcess if self.settings.loop else FunctionProcess
                process = kind(
                    [sys.executable, "-u", OWPROXY_FILE, "function-worker"]
                    + list(version.function) + [str(self.settings.max_result),
                                                "explain" if self.explains() else "quiet"],
                    env, cwd, self.logs, self.processes, self.settings.max_result + 64,
                    self.explain)
            else:
                process = WarmProcess([version.binary], env, cwd, self.logs, self.processes,
                                      self.settings.max_result, self.explain)
        except OSError as error:  # not an executable, say; the Go proxy's text, and why
            self.logs.note("cannot start the action: %s" % (
                start_failure(version.binary, error) or error))
            raise StartError(COMMAND_EXITED)
        return process.start(version.kind == "function" or "__OW_WAIT_FOR_ACK" in env)

    def explains(self):
        """Whether the proxy adds notes of its own to a run's logs: in exec mode, as
        the dockerskeleton's diagnostics; with --loop, whose logs are the Go proxy's
        (what the action wrote, nothing else), only with --verbose."""
        return self.settings.verbose or not self.settings.loop

    def explain(self, text):
        """A note of the proxy's own about a run, where ``explains()``."""
        if self.explains():
            self.logs.note(text)

    def close(self, grace):
        """At shutdown: the warm processes end, if any, and the versions' folders go."""
        if self.version.pool is not None:
            self.version.pool.close(grace)
        if self.versions is not None:
            remove_tree(self.versions)

    def stop_installing(self):
        """At shutdown: an init under way stops at once, its compile killed."""
        self.cancel_installs.set()

    # -- run -------------------------------------------------------------------

    def environment(self, init_env):
        """The container's environment with the init ``env`` over it, where the
        action's processes start.  An init takes it once for all its runs: os.environ
        decodes each variable at every read, and no request changes it."""
        env = dict(os.environ)
        env.update(init_env)
        return env

    def env(self, message):
        """The container's environment, the init ``env``, then this activation's
        fields as ``__OW_<KEY>``: a fresh dict, never the proxy's own."""
        try:
            fields = activation_fields(message)
        except ValueError as error:
            raise HTTPError(400, "Activation field %s" % error)
        env = ActivationEnv(self.base_env, fields)
        env.update(fields)
        return env

    def run(self, args, env):
        """Runs one activation with ``args``; returns ``(status, result)``."""
        status, result = self.execute(args, env)
        return status, result_value(result)

    def answer(self, args, env):
        """What the proxy answers for an activation: ``run()``'s answer, its result
        sent as the action wrote it unless a subclass's ``run()`` stands between."""
        if type(self).run is ActionRunner.run:
            return self.execute(args, env)
        return self.run(args, env)

    def execute(self, args, env):
        """``run()``, its result a ResultLine when the action wrote one, from the
        version current at its start, whole, whatever an init does meanwhile."""
        with self.gate.run():
            with self.lock:
                version = self.version.hold()
                if version.kind is None:  # what the image holds, as the first run finds it
                    version.kind, version.function = self.kind_of(
                        os.path.dirname(version.binary))
                if version.kind != "exec" and version.pool is None:
                    version.pool = self.warm_pool(version, self.init_env)
            try:
                return self.execute_version(version, args, env)
            finally:
                version.release()

    def execute_version(self, version, args, env):
        if version.kind == "exec":
            try:
                data = json.dumps(args).encode()  # ASCII; one copy held while it runs
            except RecursionError:
                return 502, {"error": RUN_TOO_DEEP.format("argument")}
            argv = [version.binary] if len(data) > MAX_ARG_STRLEN else [version.binary, data]
            return run_once(argv, data, env, os.path.dirname(version.binary),
                            self.logs, self.processes, self.settings.max_result)
        pool = version.pool
        try:
            process = pool.acquire(self.explain)
        except InitError as error:
            self.explain(str(error))
            return 502, {"error": RUN_EXITED}
        fields = getattr(env, "fields", env)  # a runner's own env() may give a plain dict
        message = {key[len("__OW_"):].lower(): value for key, value in fields.items()
                   if key.startswith("__OW_")}
        message["value"] = args
        try:
            return process.request(message, deadline_of(env))
        except RecursionError:  # encoding its line
            return 502, {"error": RUN_TOO_DEEP.format("argument")}
        finally:
            pool.release(process)


# ============================================================================
# 9. Platforms
# ============================================================================

# -- OpenWhisk -----------------------------------------------------------------

# The fields of a /run body besides "value", as the invoker sends them.
ACTIVATION_FIELDS = frozenset(("namespace", "action_name", "action_version", "activation_id",
                               "transaction_id", "deadline", "api_key"))


class OpenWhisk:
    """The OpenWhisk routes: POST /init once, then POST /run per activation."""

    def __init__(self, settings, runner, logs):
        self.settings, self.runner, self.logs = settings, runner, logs
        self.initialized = False
        self.serial = contextlib.nullcontext() if settings.concurrent else threading.Lock()

    def routes(self):
        return {
            "/init": Route(self.init, parse_cost=PARSE_COST["init"],
                           sentinels=lambda status, request: self.ends_logs("/init", status)),
            "/run": Route(self.run, lock=self.serial, parse_cost=PARSE_COST["run"],
                          sentinels=lambda status, request: self.ends_logs("/run", status)),
        }

    @staticmethod
    def ends_logs(path, status):
        """Whether the answer ends the logs with sentinels, which the invoker reads
        up to: after every /run, and after an /init that tried and failed (not a
        refused second one, nor one turned away at shutdown)."""
        return path == "/run" or status not in (200, 403, 503)

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
        self.logs.note("hint: " + REINIT_HINT)
        return 403, {"error": INIT_TWICE}

    def initialize(self, value):
        if self.settings.loop and not value.get("code"):
            if not self.runner.verify():
                return 403, {"error": INIT_NO_CODE}  # as the Go proxy
            value = dict(value, code=None)  # what the image holds, as in exec mode
        try:
            ready = self.runner.init(value)
        except Exception as error:  # a runner whose own init raises
            self.logs.note("the action could not be initialized: %s" % error)
            return 502, {"error": INIT_FAILED}
        if isinstance(self.runner.failure, InitCancelled):
            return 503, {"error": SHUTTING_DOWN}  # as every request that comes now
        if not ready:
            return 502, {"error": self.runner.init_failure()}
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
        if not self.runner.verify():  # the Go proxy's answer, or the dockerskeleton's
            self.runner.explain(not_runnable(self.runner.current().binary))
            if self.settings.loop:
                return 500, {"error": RUN_NO_ACTION}
            return 502, {"error": RUN_NO_BINARY}
        return self.runner.answer(value, self.runner.env(message))


# -- Knative -------------------------------------------------------------------

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


def valid_header(name, value):
    """A header http.server can write as it is, by the rules the proxy reads
    requests with (TOKEN, FIELD_VALUE), so that no action can split the response."""
    try:
        return bool(TOKEN.match(name.encode("ascii"))
                    and FIELD_VALUE.match(value.encode("latin-1")))
    except UnicodeEncodeError:
        return False


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
        self.initializing = threading.Lock()
        self.raw = False
        self.name = ""

    def routes(self):
        methods = tuple(dict.fromkeys(self.settings.http_methods + ("OPTIONS",)))
        return {"/": Route(self.handle, methods=methods, lock=self.serial,
                           parse_cost=PARSE_COST["run"],
                           sentinels=self.sentinels, headers=CORS.items(),
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
                request.init_only = status == 200
                return status, payload
        return self.web_activate(request, envelope, plain)

    @staticmethod
    def sentinels(status, request):
        """After every answer that ran the action or failed to initialise it, as
        /run and /init: not after a 403, nor after a request that only initialised."""
        return status != 403 and not getattr(request, "init_only", False)  # or an HTTPError

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
        with self.initializing:  # concurrent first requests: one init, the others see it
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
        value = result_value(result)
        if status == 200 and isinstance(value, dict) and set(value) & {
                "statusCode", "headers", "body"}:
            return web_response(value)
        return status, result


# -- Health --------------------------------------------------------------------

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
# 10. HTTP server
# ============================================================================

# -- Reading requests strictly -------------------------------------------------

class RequestHead:
    """A request line and its header fields, read and checked: ``length`` is the
    body's (CHUNKED when it comes in chunks), ``keep_alive`` whether another
    request may follow on the connection."""

    def __init__(self, requestline, method, target, version, headers, length, keep_alive):
        self.requestline, self.method, self.target, self.version = (
            requestline, method, target, version)
        self.headers, self.length, self.keep_alive = headers, length, keep_alive


def check_room(buffer, size, limit):
    """A chunked body is refused as soon as it would pass the limit."""
    if len(buffer) + size > limit:
        raise HTTPError(413, "The request body is more than the limit of %d bytes." % limit,
                        close=True)


def parse_request_line(requestline):
    """``(method, target, version)``, with http.server's own messages for what it
    would refuse too.  Two words are an HTTP/0.9 GET.  Only SP (and, leniently,
    HTAB) separates them: str.split() would also split on NBSP, NEL or 0x1F, which
    a proxy before this one would take as part of the target."""
    words = REQUEST_LINE_GAP.split(requestline.strip(" \t"))
    if any(CONTROL_CHARACTER.search(word) for word in words):
        raise HTTPError(400, "Bad request syntax (%r)" % requestline, True)
    if len(words) == 3:
        version = HTTP_VERSION.match(words[2])
        if not version:
            raise HTTPError(400, "Bad request version (%r)" % words[2], True)
        if version.group(1) != "1":
            raise HTTPError(505, "Invalid HTTP version (%s)" % words[2][5:], True)
    elif len(words) == 2 and words[0] == "GET":
        words.append("HTTP/0.9")
    elif len(words) == 2:
        raise HTTPError(400, "Bad HTTP/0.9 request type (%r)" % words[0], True)
    else:
        raise HTTPError(400, "Bad request syntax (%r)" % requestline, True)
    if not TOKEN.match(words[0].encode("latin-1")):
        raise HTTPError(400, "Bad request method (%r)" % words[0], True)
    return tuple(words)


def origin_form(target):
    """The path (and query) of a target in absolute form (``http://host/run``), which
    RFC 9112 says a server must accept; any other target as it is."""
    absolute = ABSOLUTE_FORM.match(target)
    if not absolute:
        return target
    rest = target[absolute.end():]
    return rest if rest.startswith("/") else "/" + rest


def check_host(version, fields):
    """RFC 9112 section 3.2: an HTTP/1.1 request names one Host, no request two."""
    hosts = [name for name, _ in fields if name.lower() == "host"]
    if len(hosts) > 1 or (version == "HTTP/1.1" and not hosts):
        raise HTTPError(400, "An HTTP/1.1 request must have exactly one Host header; "
                             "this one has %d." % len(hosts), True)


def parse_field(line):
    """A header field line as (name, value): a token, a colon, a value of visible
    characters, spaces and tabs.  A line folded onto the previous one is refused."""
    name, colon, value = line.partition(b":")
    if line[:1] in (b" ", b"\t"):
        raise HTTPError(400, "A header field is folded over two lines.", True)
    if not colon or not TOKEN.match(name):
        raise HTTPError(400, "The header line %r is not a name, a colon and a value."
                        % line[:100].decode("latin-1"), True)
    value = value.strip(b" \t")
    if not FIELD_VALUE.match(value):
        raise HTTPError(400, "The header field %s holds a control character."
                        % name.decode("latin-1"), True)
    return name.decode("latin-1"), value.decode("latin-1")


def field_list(fields, wanted):
    """The comma-separated elements of every field named ``wanted``."""
    return [element.strip() for name, value in fields if name.lower() == wanted
            for element in value.split(",")]


def body_length(version, fields):
    """The body's length from Content-Length, or CHUNKED: anything else that a
    server and a proxy before it could read differently is refused."""
    codings = field_list(fields, "transfer-encoding")
    lengths = set(field_list(fields, "content-length"))
    if codings and lengths:
        raise HTTPError(400, "The request has both a Content-Length and a "
                             "Transfer-Encoding.", True)
    if codings and version != "HTTP/1.1":
        raise HTTPError(400, "Transfer-Encoding is not allowed in %s." % version, True)
    if codings:
        if [coding.lower() for coding in codings] != ["chunked"]:
            raise HTTPError(501, "The Transfer-Encoding %s is not supported; send chunked or "
                                 "a Content-Length." % ", ".join(codings), True)
        return CHUNKED
    if len(lengths) > 1:
        raise HTTPError(400, "The request has differing Content-Length values.", True)
    length = lengths.pop() if lengths else "0"
    if not (length.isascii() and length.isdigit()):
        raise HTTPError(400, "The Content-Length header is not a length.", True)
    length = length.lstrip("0") or "0"
    return int(length) if len(length) <= 18 else 10 ** 18  # more than any limit


def keeps_alive(version, fields):
    """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only if asked."""
    options = {option.lower() for option in field_list(fields, "connection")}
    if "close" in options:
        return False
    return version == "HTTP/1.1" or version == "HTTP/1.0" and "keep-alive" in options


def without_cr(line):
    """A line, its LF taken, without the CR of its CRLF; any other CR is refused."""
    line = line[:-1] if line.endswith(b"\r") else line
    if b"\r" in line:
        raise HTTPError(400, "A line of the request holds a bare CR.", True)
    return line


class RequestReader:
    """Reads the requests of one connection as RFC 9112 says, and as nginx, Go's
    net/http and h11 do: nothing but a whole head (ended by its blank line, within
    ``max_head`` bytes, ``MAX_HEADER_FIELDS`` fields and ``timeout`` seconds) is a
    request, and a head whose framing is ambiguous is refused, so that no byte a
    client sent as a body is ever read as a request.  Errors are HTTPErrors that
    close the connection; socket.timeout ends it without an answer."""

    def __init__(self, rfile, sock, max_head, timeout):
        self.rfile, self.sock = rfile, sock
        self.max_head, self.timeout = max_head, timeout
        self.deadline = None  # while a head or a body is read: when it must be complete
        self.room = 0  # bytes the head being read may still take
        self.ahead = 0  # bytes the reader's buffer is known to hold: reads without a wait
        self.timed = False  # the socket's timeout is the deadline's, not its own
        self.small_waits = 0  # this head's or body's waits that brought under TRICKLE_PIECE
        self.last_small = False  # and whether the last one did

    @contextlib.contextmanager
    def within(self, deadline):
        """Reads within ``deadline``; the socket's own timeout is put back after."""
        own = self.sock.gettimeout()
        self.deadline, self.timed = deadline, False
        self.small_waits, self.last_small = 0, False
        try:
            yield
        finally:
            self.deadline = None
            if self.timed:
                self.sock.settimeout(own)

    def head(self):
        """The next request's head, or None when the client sends no more (also a
        head cut short by end-of-file: that is no request).  The clock starts now:
        on a kept-alive connection, once the request's first byte came."""
        self.room = self.max_head
        with self.within(time.monotonic() + self.timeout):
            line = b""
            while not line:  # empty lines before a request line are allowed
                line = self.line(HTTPError(414, "The request line is longer than the "
                                                "limit of %d bytes." % self.max_head, True))
                if line is None:
                    return None
            requestline = line.decode("latin-1")
            method, target, version = parse_request_line(requestline)
            # HTTP/0.9 has no header fields: waiting for them would answer it only
            # when the header timeout ends it.
            fields = [] if version == "HTTP/0.9" else self.fields()
        if fields is None:
            return None
        check_host(version, fields)
        headers = http.client.HTTPMessage()
        for name, value in fields:
            headers.set_raw(name, value)
        return RequestHead(requestline, method, origin_form(target), version, headers,
                           body_length(version, fields), keeps_alive(version, fields))

    def fields(self):
        """The header (or trailer) fields up to their blank line, as (name, value)
        pairs; None at end-of-file."""
        fields = []
        for line in self.field_lines():
            if not line:
                return fields if line == b"" else None
            if len(fields) == MAX_HEADER_FIELDS:
                raise HTTPError(431, "The request has more than %d header fields."
                                % MAX_HEADER_FIELDS, True)
            fields.append(parse_field(line))

    def field_lines(self):
        """The lines of the fields through their blank line (None at end-of-file):
        all at once when the reader's buffer holds them, as it does for a request
        sent in one piece, else one by one as they come."""
        whole = FIELDS_END.match(self.peek(), 0, self.room)
        if whole:
            self.room -= whole.end()
            yield from map(without_cr, self.read(whole.end()).split(b"\n")[:-1])
        too_large = HTTPError(431, "The request's header fields are larger than the limit "
                                   "of %d bytes." % self.max_head, True)
        while True:
            yield self.line(too_large)

    def line(self, too_long):
        """The next line without its end (CRLF, or a bare LF as RFC 9112 allows);
        None at end-of-file; ``too_long`` is raised past ``room`` bytes."""
        parts = []
        while True:
            data = self.peek()
            if not data:
                return None
            end = data.find(b"\n", 0, self.room)
            if end < 0 and len(data) >= self.room:
                raise too_long
            taken = self.read(len(data) if end < 0 else end + 1)
            self.room -= len(taken)
            parts.append(taken)
            if end >= 0:
                return without_cr(b"".join(parts)[:-1])

    def peek(self):
        """What has arrived, waiting for more only until the deadline, if any."""
        if self.ahead:
            return self.rfile.peek(1)
        self.may_wait()
        data = self.rfile.peek(1)
        self.ahead = len(data)
        self.last_small = len(data) < TRICKLE_PIECE
        self.small_waits += self.last_small
        return data

    def read(self, size):
        """``size`` bytes, waiting for what the buffer lacks only until the deadline."""
        if size > self.ahead:
            self.may_wait()
        data = self.rfile.read(size)
        self.ahead = max(0, self.ahead - len(data))
        return data

    def may_wait(self):
        """Before a read that may wait for the client: the socket times out at the
        deadline.  Only then, since each setting of it is a system call, which a
        request whose bytes have all arrived does without.  A trickling request
        pauses first (see TRICKLE_WAITS)."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if (left > TRICKLE_PAUSE and self.last_small
                    and self.small_waits >= TRICKLE_WAITS):
                time.sleep(TRICKLE_PAUSE)
                # What came meanwhile is read, even if the pause overslept.
                left = max(self.deadline - time.monotonic(), 0.001)
            if left <= 0:
                raise socket.timeout("the request took too long")
            self.sock.settimeout(left)
            self.timed = True

    # -- bodies --------------------------------------------------------------------

    def body(self, length, limit, share, timeout):
        """The body of a head whose length is within ``limit`` (checked before; a
        chunked body is checked as it comes), whole within ``timeout`` seconds (else
        408), in one buffer that grows, with its ``share`` of the body memory, as
        bytes arrive: whatever the chunk sizes, no object is kept per piece."""
        share.deadline = time.monotonic() + timeout
        buffer = bytearray()
        try:
            with self.within(share.deadline):
                if length is CHUNKED:
                    self.chunked(buffer, limit, share)
                else:
                    self.take(buffer, length, share)
        except socket.timeout:
            raise HTTPError(408, "The request body did not arrive within %g seconds."
                            % timeout, close=True)
        return buffer

    def take(self, buffer, size, share):
        """``size`` more bytes into ``buffer``, reserved as they arrive, at most a
        read buffer ahead of the reservation."""
        while size:
            arrived = min(size, len(self.peek()))  # what the reader's buffer holds
            if not arrived:
                raise HTTPError(400, "The request body ended early.", close=True)
            share.arrived(arrived)  # before the bytes leave the socket's
            buffer += self.read(arrived)
            size -= arrived

    def chunked(self, buffer, limit, share):
        while True:
            if self.whole_chunks(buffer, limit, share):
                continue
            size = self.chunk_size()
            if size == 0:
                break
            check_room(buffer, size, limit)
            try:
                self.take(buffer, size, share)
            except HTTPError as error:
                if error.status != 400:
                    raise
                raise HTTPError(400, "The chunked request body is malformed.", close=True)
            if self.read(2) != b"\r\n":
                raise HTTPError(400, "The chunked request body is malformed.", close=True)
        self.room = self.max_head  # trailers: as many bytes and fields as a head
        if self.fields() is None:
            raise HTTPError(400, "The chunked request body is malformed.", close=True)

    def whole_chunks(self, buffer, limit, share):
        """The plain chunks (a size, CRLF, the data, CRLF) that the reader's buffer
        holds whole, taken at once: a body in 1-byte chunks costs one reservation
        and one read per buffer, not per chunk.  False if there was none: the next
        chunk (not yet whole, the last one, with an extension, a fault) is then
        chunk_size()'s and take()'s."""
        data, start, pieces = self.peek(), 0, []
        while True:
            head = PLAIN_CHUNK.match(data, start)
            end = head and head.end() + int(head.group(1), 16)
            if not head or end == head.end() or data[end:end + 2] != b"\r\n":
                break  # a slice past the buffer's end is short too
            pieces.append(data[head.end():end])
            start = end + 2
        if not start:
            return False
        body = b"".join(pieces)
        check_room(buffer, len(body), limit)
        share.arrived(len(body))  # before the bytes leave the reader's buffer
        self.read(start)
        buffer += body
        return True

    def chunk_size(self):
        """The size on a chunk's first line: leading zeros, however many, are
        skipped as they come; an extension is ignored; a size too large for any
        body is a 413 without reading more."""
        zeros = self.skip_zeros()
        self.room = self.max_head
        line = self.line(HTTPError(400, "The chunked request body is malformed.", True))
        digits = (line or b"").partition(b";")[0].rstrip(b" \t")
        if line is None or not (digits or zeros) or not CHUNK_SIZE.match(digits):
            raise HTTPError(400, "The chunked request body is malformed.", close=True)
        if len(digits) > 15:
            raise HTTPError(413, "A chunk of the request body is larger than any body "
                                 "the proxy accepts.", close=True)
        return int(digits or b"0", 16)

    def skip_zeros(self):
        skipped = 0
        while True:
            data = self.peek()
            zeros = len(data) - len(data.lstrip(b"0"))
            if zeros:
                skipped += len(self.read(zeros))
            if zeros < len(data) or not data:
                return skipped


# -- Body memory ---------------------------------------------------------------

def expanding_bytes(body):
    """How many of ``body``'s bytes are EXPANDING: one pass a read's worth at a
    time (translate deletes them), not one per byte value, nor a copy of it all."""
    return sum(len(piece) - len(piece.translate(None, EXPANDING))
               for piece in (body[start:start + READ_SIZE]
                             for start in range(0, len(body), READ_SIZE)))


class BodyShare:
    """One body's part of the BodyBudget: each byte that arrives counts with what
    parsing it will take (``per_byte``, PARSE_COST), so that a body that will not
    fit waits before it is read rather than after."""

    def __init__(self, budget, per_byte):
        self.budget, self.per_byte, self.held = budget, per_byte, 0
        self.deadline = None  # the body's --body-timeout, its waits for room included

    def check_fits(self, length):
        """A 413 at once for a declared length that could never fit."""
        self.budget.check_fits(length * (1 + self.per_byte))

    def arrived(self, size):
        self.budget.grow(self, size * (1 + self.per_byte))

    def parsing(self, body):
        """Reserves what the JSON tokens of the whole ``body`` take on top."""
        self.budget.grow(self, PARSE_COST_PER_TOKEN * expanding_bytes(body))


class BodyBudget:
    """How many bytes of memory request bodies, and what parsing them makes, may
    take at once.  Each body has a share that grows as its bytes arrive (nothing is
    reserved for bytes a client has only announced, so a sender that does not send
    holds nothing) and by what its parse is expected to take.  A share that would
    pass the budget waits, its body unread in its socket (TCP holds its sender
    back), until earlier bodies are answered; the oldest body never waits, so no
    two bodies wait for each other.  A body whose share alone would pass the budget
    is refused (413): it could never fit."""

    def __init__(self, size):
        self.size, self.held = size, 0
        self.shares = []  # of the bodies being read or served, oldest first
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def share(self, per_byte):
        share = BodyShare(self, per_byte)
        with self.changed:
            self.shares.append(share)
        try:
            yield share
        finally:
            with self.changed:
                self.held -= share.held
                self.shares.remove(share)
                self.changed.notify_all()

    def check_fits(self, size):
        if size > self.size:
            raise HTTPError(413, "The request body would take %d bytes of memory once parsed, "
                                 "more than the proxy's --body-memory of %d bytes."
                            % (size, self.size), close=True)

    def grow(self, share, size):
        """Adds ``size`` bytes to ``share``, waiting for room until the share's
        deadline: a body that waits is not answered later than one that stalls."""
        if not size:
            return
        self.check_fits(share.held + size)
        with self.changed:
            while share is not self.shares[0] and self.held + size > self.size:
                left = share.deadline - time.monotonic()
                if left <= 0:
                    raise HTTPError(408, "The request body found no room in the proxy's "
                                         "--body-memory within its --body-timeout.", close=True)
                self.changed.wait(left)
            self.held += size
            share.held += size


# -- Connections and threads ---------------------------------------------------

def http_date(seconds):
    """RFC 9110's date, in English whatever the locale; email.utils.formatdate's
    would load datetime for it."""
    moment = time.gmtime(seconds)
    return "%s, %02d %s %d %02d:%02d:%02d GMT" % (
        BaseHTTPRequestHandler.weekdayname[moment.tm_wday], moment.tm_mday,
        BaseHTTPRequestHandler.monthname[moment.tm_mon], moment.tm_year,
        moment.tm_hour, moment.tm_min, moment.tm_sec)


def linger(sock, seconds):
    """Ends a connection whose client may still be sending what the proxy will not
    read (a refused body, a request after ``Connection: close``): a close with
    unread data would reset the connection, and the client could lose the answer.
    Says it is done, then reads and drops the rest until the client closes too,
    for at most ``seconds``."""
    end = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        while time.monotonic() < end:
            sock.settimeout(max(end - time.monotonic(), 0.001))
            if not sock.recv(READ_SIZE):
                return
    except OSError:
        pass


class HandlerThreads:
    """The threads that serve connections.  A thread is kept after its connection
    for the next one (up to ``keep`` of them wait idle) instead of being started
    anew for each: handing a connection over costs a fraction of a thread start."""

    def __init__(self, handle, keep):
        self.handle, self.keep = handle, keep
        self.idle = []  # the (wake-up lock, job list) of each thread waiting
        self.lock = threading.Lock()

    def start(self, *job):
        with self.lock:
            waiting = self.idle.pop() if self.idle else None
        if waiting is None:
            threading.Thread(target=self.work, args=job, daemon=True).start()
        else:
            waiting[1].append(job)
            waiting[0].release()

    def work(self, *job):
        wake, jobs = threading.Lock(), []
        wake.acquire()
        while True:
            self.handle(*job)
            with self.lock:
                if len(self.idle) >= self.keep:
                    return
                self.idle.append((wake, jobs))
            wake.acquire()
            job = jobs.pop()


def connection_limit(wanted):
    """``wanted``, or fewer where the process may not open as many descriptors
    (each connection takes one; 64 are kept for actions and the proxy itself):
    past that, accept() would fail and the serving loop spin instead of answering."""
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - 64))


# -- The server and its handler ------------------------------------------------

class Shutdown(BaseException):
    """Leaves the serving loop (a BaseException, so that socketserver's ``except
    Exception`` lets it through)."""


class ProxyHandler(BaseHTTPRequestHandler):
    """Reads one request at a time (RequestReader), finds its route, and writes
    one answer."""

    protocol_version = "HTTP/1.1"
    server_version = "owproxy/" + __version__
    disable_nagle_algorithm = True
    wbufsize = 65536  # so that head and body leave in one write
    timeout = 120  # seconds a client may take to read an answer (reading has own limits)
    linger_seconds = 2.0  # how long a client may go on sending once the proxy closes
    route = None
    client_ended = False  # the client's end of file came where a request could begin

    def date_time_string(self, timestamp=None):
        return http_date(timestamp)

    def setup(self):
        BaseHTTPRequestHandler.setup(self)
        settings = self.server.settings
        self.reader = RequestReader(self.rfile, self.connection, settings.max_header,
                                    settings.header_timeout)
        self.served = 0

    def handle_one_request(self):
        try:
            if self.parse_request():
                self.dispatch()
        except socket.timeout:  # a client too slow with its head, or silent too long
            self.close_connection = True

    def parse_request(self):
        """Reads the next request's head; False when there is none to serve (the
        connection then closes), after an answer if it was refused."""
        self.close_connection, self.route = True, None
        self.command, self.requestline = "", ""
        self.request_version = self.protocol_version  # what a refusal is answered in
        if self.served and not self.next_request_begins():
            return False
        try:
            head = self.reader.head()
        except HTTPError as error:
            self.refuse(error.status, error.message)
            return False
        if head is None:
            return False
        self.served += 1
        self.requestline, self.command, self.path = head.requestline, head.method, head.target
        self.request_version, self.headers, self.head = head.version, head.headers, head
        self.close_connection = not head.keep_alive
        return True

    def next_request_begins(self):
        """Waits, resting, for the first byte of a kept-alive connection's next
        request; False if the client closes instead, rests past --idle-timeout, or
        the connection is closed to admit another at the cap."""
        self.connection.settimeout(self.server.settings.idle_timeout)
        try:
            with self.server.resting(self.connection):
                self.client_ended = not self.reader.peek()
                return not self.client_ended
        except OSError:
            return False
        finally:
            self.connection.settimeout(self.timeout)

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
        elif self.shutting_down(route):  # at once: no waiting for the route's lock
            self.refuse(503, SHUTTING_DOWN)
        else:
            self.server.working(+1)
            try:
                with self.server.bodies.share(route.parse_cost) as share:
                    self.respond(route, query, share)
            finally:
                self.server.working(-1)

    def shutting_down(self, route):
        return self.server.stopping and not route.quiet

    def respond(self, route, query, share):
        """Reads the body, then runs the handler under the route's lock: a slow
        upload holds up nobody.  What parsing the body will take is reserved first."""
        try:
            body = self.read_body(share)
            share.parsing(body)
            request = Request(self.command, query, self.headers, body)
        except HTTPError as error:
            request = error
        with route.lock:
            late = self.shutting_down(route)  # it began while this request waited
            if not late:
                status, body, headers = self.route_answer(route, request)
                if route.sentinels(status, request):
                    self.server.logs.sentinels()
        if late:
            return self.refuse(503, SHUTTING_DOWN)
        if route.headers:
            given = {name.lower() for name, _ in headers}
            headers = headers + [(name, value) for name, value in route.headers
                                 if name.lower() not in given]
        self.send_answer(status, body, headers)

    def preflight(self, route):
        """A CORS preflight, answered with the route's headers at once.  Its body,
        which means nothing, is never read into memory: the connection closes, and
        what the client still sends is dropped as it comes."""
        self.close_connection = True
        self.send_answer(200, b"", route.headers)

    def route_answer(self, route, request):
        """The encoded answer to a request: whatever goes wrong on the way, even in
        a runner's hooks, is an error answer, so sentinels and answer always follow."""
        try:
            if isinstance(request, HTTPError):
                raise request
            status, payload = route.handle(request)
            return encode_answer(status, payload)
        except HTTPError as error:
            self.close_connection = self.close_connection or error.close
            return encode_answer(error.status, {"error": error.message})
        except BaseException as error:  # a hook's sys.exit() too: this thread answers
            self.server.logs.note("internal error: %r" % (error,))
            return encode_answer(500, {"error": INTERNAL_ERROR.format(error)})

    # -- request bodies --------------------------------------------------------

    def read_body(self, share):
        limit, length = self.server.settings.max_body, self.head.length
        if length is not CHUNKED and length > limit:
            raise HTTPError(413, "The request body has %d bytes, more than the limit of %d."
                            % (length, limit), close=True)
        if length is not CHUNKED:
            share.check_fits(length)
        if (self.headers.get("Expect", "").lower() == "100-continue"
                and self.request_version == "HTTP/1.1"):  # HTTP/1.0 knows no 100
            self.send_response_only(100)
            self.end_headers()
            self.wfile.flush()
        return self.reader.body(length, limit, share, self.server.settings.body_timeout)

    # -- answers ---------------------------------------------------------------

    def send_answer(self, status, body, headers):
        if self.request_version == "HTTP/0.9":  # http.server would send the body alone
            self.request_version = self.protocol_version
        if status in (204, 304):
            body = b""  # these statuses carry none
        self.log_request(status)
        self.send_response_only(status)
        given = {name.lower() for name, _ in headers}  # a web result's replace the proxy's
        if "server" not in given:
            self.send_header("Server", self.version_string())
        if "date" not in given:
            self.send_header("Date", self.date_time_string())
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
        self.send_answer(status, body, json_headers + list(headers))

    def finish(self):
        BaseHTTPRequestHandler.finish(self)
        if not self.client_ended:  # after its end of file a client can send nothing more
            linger(self.connection, self.linger_seconds)

    def version_string(self):
        return self.server_version

    def log_request(self, code="-", size="-"):
        if self.server.settings.verbose and not getattr(self.route, "quiet", False):
            BaseHTTPRequestHandler.log_request(self, code, size)

    def log_message(self, format, *args):
        if self.server.settings.verbose:
            BaseHTTPRequestHandler.log_message(self, format, *args)
            sys.stderr.flush()  # Python 3.8 buffers a stderr that is no terminal


def error_bytes(status, message):
    """A whole answer that closes the connection, for a socket no handler serves."""
    status, body, headers = encode_answer(status, {"error": message})
    lines = ["HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase),
             "Server: " + ProxyHandler.server_version,
             "Date: " + http_date(time.time()),
             "Content-Length: %d" % len(body)]
    lines += ["%s: %s" % pair for pair in headers] + ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def has_ipv6():
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
        return True
    except (AttributeError, OSError):  # a Python built without IPv6, or a kernel
        return False


def listening_address(host, port):
    """``(family, socket address)`` for ``--host``: ``::`` is every address of both
    families, or of IPv4 alone where the host has no IPv6; an IPv4 or IPv6 address
    (in brackets or not) or a name gives its own family.  Raises OSError."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "::" and not has_ipv6():
        host = "0.0.0.0"
    if host.isascii():  # a str host would load the idna codec, for nothing
        host = host.encode("ascii")
    family, _, _, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0,
                                                  socket.AI_PASSIVE)[0]
    return family, address


class ProxyServer(ThreadingHTTPServer):
    """The HTTP server: a thread per connection, routes from the platform."""

    request_queue_size = 128
    poll_interval = 0.05  # seconds serve_forever() waits for a connection at most

    def __init__(self, settings, routes, logs, processes):
        self.settings, self.routes, self.logs, self.processes = settings, routes, logs, processes
        self.stopping = self.hurried = False
        # Requests being answered; connections, and those of them resting (kept
        # alive, waiting for their next request), oldest first: the others are busy.
        self.in_flight = self.connections = 0
        self.resting_connections = {}
        self.counting = threading.Lock()
        self.bodies = BodyBudget(settings.body_memory)
        self.threads = HandlerThreads(self.process_request_thread, keep=16)
        self.max_connections = connection_limit(settings.max_connections)
        self.address_family, address = listening_address(settings.host, settings.port)
        ThreadingHTTPServer.__init__(self, address, ProxyHandler)

    def handle_error(self, request, client_address):
        """A client that went away is not news; the logs belong to the action."""
        if self.settings.verbose:
            ThreadingHTTPServer.handle_error(self, request, client_address)

    def server_bind(self):
        """HTTPServer's, without its reverse DNS lookup of the address (for a
        server_name nothing here uses), which can stall a start where DNS is slow."""
        if self.address_family == socket.AF_INET6:  # '::' takes IPv4 clients too
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        """A connection, its client's address as people write it: an IPv4 client
        of a dual-stack socket is 1.2.3.4 rather than ::ffff:1.2.3.4."""
        connection, address = self.socket.accept()
        if address[0].startswith("::ffff:") and "." in address[0]:
            address = (address[0][len("::ffff:"):], address[1])
        return connection, address

    def service_actions(self):
        """Called by serve_forever() between requests, at least every poll_interval:
        where the serving loop ends once a signal has asked it to."""
        if self.stopping:
            raise Shutdown()
        self.processes.reap_orphans()

    def working(self, delta):
        with self.counting:
            self.in_flight += delta

    @contextlib.contextmanager
    def resting(self, sock):
        """While a kept-alive connection waits for its next request."""
        with self.counting:
            self.resting_connections[sock] = None
        try:
            yield
        finally:
            with self.counting:
                self.resting_connections.pop(sock, None)

    def close_longest_resting(self):
        """At the cap, makes room by ending the connection that has rested longest
        (its thread sees the end at once and stops counting it); False if none is
        resting.  Called with ``counting`` held."""
        if not self.resting_connections:
            return False
        sock = next(iter(self.resting_connections))
        del self.resting_connections[sock]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True

    def process_request(self, request, client_address):
        """A thread for the connection, up to ``max_connections`` of them; past
        that, a 503 from the serving thread itself, so that a flood of connections
        costs no threads."""
        with self.counting:
            admitted = (self.connections < self.max_connections
                        or self.close_longest_resting())
            self.connections += admitted
        if not admitted:
            return self.turn_away(request, "The proxy is serving its limit of %d "
                                           "connections." % self.max_connections)
        try:
            self.threads.start(request, client_address)
        except BaseException:
            self.connection_ended()
            raise

    def process_request_thread(self, request, client_address):
        try:
            ThreadingHTTPServer.process_request_thread(self, request, client_address)
        finally:
            self.connection_ended()

    def connection_ended(self):
        with self.counting:
            self.connections -= 1

    def turn_away(self, sock, message, seconds=0.0):
        """503 and close, without a thread: what the client sent so far is read
        first, and for ``seconds`` what it still sends, so that closing does not
        reset the connection."""
        try:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.recv(READ_SIZE)
            sock.send(error_bytes(503, message))
        except OSError:
            pass
        linger(sock, seconds)
        sock.close()

    def turn_away_waiting(self, seconds):
        """At the end: a 503 to every connection still waiting to be accepted,
        which closing the socket would reset; ``seconds`` for all of them to go."""
        self.socket.setblocking(False)
        end = time.monotonic() + seconds
        while True:
            try:
                sock, _ = self.socket.accept()
            except OSError:
                return
            self.turn_away(sock, SHUTTING_DOWN, max(0.0, end - time.monotonic()))

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

    def finish_connections(self, timeout):
        """Accepting no more, waits at most ``timeout`` seconds for the busy
        connections to be answered (a 503 now): a close with a request unread
        would reset them."""
        end = time.monotonic() + timeout
        while self.connections - len(self.resting_connections) and time.monotonic() < end:
            time.sleep(0.01)


def url_host(host):
    """A host as a URL names it: an IPv6 address in brackets."""
    return "[%s]" % host if ":" in host and not host.startswith("[") else host


# -- Serving, and the shutdown sequence ----------------------------------------

def serve(settings, runner):
    """Serves until SIGTERM or SIGINT, then lets activations finish; returns the exit status."""
    logs = Logs()
    processes = Processes(logs)
    runner.configure(settings, logs, processes)
    if settings.platform == "knative":
        platform = Knative(settings, runner, logs, os.environ)
    else:
        platform = OpenWhisk(settings, runner, logs)
    try:
        server = ProxyServer(settings, platform.routes(), logs, processes)
    except OSError as error:
        raise ConfigError("cannot listen on %s:%s: %s" % (
            url_host(settings.host), settings.port, error.strerror or error))
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
            __version__, settings.action_dir, url_host(server.server_address[0]),
            server.server_port))
    try:
        server.serve_forever(server.poll_interval)
    except Shutdown:
        pass
    runner.stop_installing()
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
    server.finish_connections(2.0)
    server.turn_away_waiting(1.0)
    server.server_close()
    return 0


# ============================================================================
# 11. Client
# ============================================================================

# -- invoke --------------------------------------------------------------------

class ClientError(Exception):
    """A client command cannot go on; reported in one line, exit status 2."""


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


def action_init(path, main):
    """The /init value for an action on disk: an executable, a source file, a zip,
    a C source file (compiled here), or a directory (zipped here, with its ``exec``
    or ``__main__.py``, or an ``action.c`` to compile into ``exec``)."""
    import base64
    import io
    import zipfile
    zipped = io.BytesIO()
    if os.path.isdir(path):
        entry = next((name for name in ("exec", "__main__.py")
                      if os.path.isfile(os.path.join(path, name))), None)
        if entry is None and os.path.isfile(os.path.join(path, "action.c")):
            entry = ("exec", compile_c(os.path.join(path, "action.c")))
        if entry is None:
            raise ClientError("the directory %s has no exec or __main__.py" % path)
        try:  # links as what they point to, as zip -r writes them
            zip_folder(zipped, path, keep_links=False,
                       executables=[entry] if isinstance(entry, tuple) else [])
        except OSError as error:
            raise ClientError("cannot read %s: %s" % (error.filename, error.strerror))
        return {"code": base64.b64encode(zipped.getvalue()).decode(), "binary": True,
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
        zip_folder(zipped, executables=[("exec", data)])
        return {"code": base64.b64encode(zipped.getvalue()).decode(), "binary": True,
                "main": main}


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


def init_env_of(args):
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
    env = init_env_of(args)
    if env:
        value["env"] = env
    return value


def activation(name, timeout):
    """The activation fields the invoker would send for one run."""
    import uuid
    return {"namespace": "guest", "action_name": "/guest/" + name, "action_version": "0.0.1",
            "activation_id": uuid.uuid4().hex, "transaction_id": uuid.uuid4().hex,
            "deadline": str(int((time.time() + timeout) * 1000))}


def post_json(url, path, payload, timeout):
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


def exit_status(what, status, payload):
    """Says on stderr what went wrong; returns the exit status: 0 success, 1
    application error, 2 developer error (also an activation's statusCode)."""
    if status != 200:
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        hint = " (%s)" % REINIT_HINT if (what, status) == ("/init", 403) else ""
        tell("%s answered %d: %s%s" % (what, status, error, hint))
        return 2
    if isinstance(payload, dict) and "error" in payload:
        tell("%s answered an application error: %s"
                         % (what, payload["error"]))
        return 1
    return 0


def show(payload):
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


ACTIVATION_STATUS = {0: "success", 1: "application error", 2: "action developer error"}


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


class LogRelay:
    """Copies the local proxy's stdout and stderr to this stderr as their lines come,
    in the order they come, without the sentinels; on a terminal each line is marked
    with its stream.  Keeps each line, as ``wsk`` shows it, for the activation record."""

    marks = {"stdout": "\033[2mout|\033[0m ", "stderr": "\033[31merr|\033[0m "}

    def __init__(self, stdout, stderr, marked, renames=()):
        self.pipes = {stdout: "stdout", stderr: "stderr"}
        self.marked, self.renames = marked, renames
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
                chunk = os.read(key.fd, READ_SIZE)
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
            for installed, given in self.renames:  # the user's names, not the copy's
                line = line.replace(installed, given)
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


def user_names(action, action_dir):
    """``(the name the local proxy's logs give, the user's)`` for the parts of the
    action it installed into ``action_dir``, in the order to replace them."""
    import zipfile
    if os.path.isdir(action):
        return [(action_dir + os.sep, os.path.join(action, ""))]
    if zipfile.is_zipfile(action):
        return [(action_dir + os.sep, action + ":")]
    names = [(os.path.join(action_dir, "exec"), action),
             (os.path.join(action_dir, "__main__.py"), action)]
    if action.endswith(".py"):  # a Python function's traceback names its file alone
        names.append(("__main__.py", action))
    return names


def reserved_port():
    """A socket bound to a free loopback port and not listening: while it is open
    no other program is given that port, yet the proxy may bind it too (both
    with SO_REUSEADDR) and listen on it."""
    import socket
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.bind(("127.0.0.1", 0))
    return probe


class LocalProxy:
    """A proxy of invoke's own on a free loopback port, its logs relayed live.  It
    has no grace period, so that an interrupted ``invoke`` stops at once."""

    def __init__(self, loop, action):
        import tempfile
        self.folder = tempfile.mkdtemp(prefix="owproxy-invoke-")
        action_dir = os.path.join(self.folder, "action")
        os.mkdir(action_dir)
        # The local proxy is an OpenWhisk one whatever this shell's proxy settings say.
        env = {key: value for key, value in os.environ.items()
               if key not in {env for setting in SETTINGS for env in setting.envs}}
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
        self.relay = LogRelay(self.process.stdout, self.process.stderr, sys.stderr.isatty(),
                              user_names(action, action_dir))
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
        status, answer = post_json(self.url, path, payload, timeout)
        if OpenWhisk.ends_logs(path, status):
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


def invoke(args):
    """Runs an action the way the invoker would, on a proxy of its own."""
    name = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.action)))[0]
    init = init_value(args, name)
    value = parameters(args)
    proxy = LocalProxy(args.loop, args.action)
    try:
        status, payload = proxy.post("/init", {"value": init}, args.timeout + 5)
        if status != 200:
            return exit_status("/init", status, payload)
        worst = 0
        for number in range(1, args.repeat + 1):
            message = dict(activation(name, args.timeout), value=value)
            started = time.time()
            status, payload = proxy.post("/run", message, args.timeout + 5)
            times = started, time.time()
            tell("run%s took %.1f ms" % (
                " %d" % number if args.repeat > 1 else "", (times[1] - times[0]) * 1000))
            code = exit_status("/run", status, payload)
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
        tell("interrupted; stopping the action")
        return 130
    finally:
        proxy.close()


# -- init, run and healthcheck -------------------------------------------------

def remote(args, path, body):
    """POSTs ``body`` to a running container; the exit status of its answer."""
    status, payload = post_json(args.url, path, body, args.timeout + 5)
    if status == 200:
        show(payload)
    return exit_status(path, status, payload)


def client_init(args):
    return remote(args, "/init", {"value": init_value(args, args.name)})


def client_run(args):
    return remote(args, "/run", dict(activation(args.name, args.timeout), value=parameters(args)))


def words_of(pid):
    """The command line ``pid`` was started with; empty if unknown."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
            return cmdline.read().decode("utf-8", "replace").split("\0")[:-1]
    except OSError:
        return []


def proxy_process(pid):
    """``(pid, the proxy's arguments)`` of the first Python process at ``pid`` or
    under it; None if there is none."""
    for candidate in [pid] + descendants(pid):
        words = words_of(candidate)
        if candidate != os.getpid() and words and os.path.basename(words[0]).startswith("python"):
            script = next((at for at, word in enumerate(words) if at and
                           not word.startswith("-")), len(words))
            return candidate, words[script + 1:]
    return None


def proxy_address(pid):
    """``(host to connect to, port, where they came from)``: the proxy's own command
    line and environment, else this process's (those a container's exec shares)."""
    found = proxy_process(pid)
    if found is None:
        argv, environ = [], os.environ
        source = "from this environment; no Python process at PID %d or under it" % pid
    else:
        found_pid, argv = found
        entries = environ_of(found_pid).split(b"\0")
        environ = dict(entry.decode("utf-8", "replace").partition("=")[::2]
                       for entry in entries if b"=" in entry) or os.environ
        source = "from PID %d: %s" % (found_pid, " ".join(words_of(found_pid)))
    settings = given_settings(argv, environ)
    host = settings.host.strip("[]")
    return (None if host in ("::", "0.0.0.0") else host), settings.port, source


def healthcheck(args):
    """Docker's HEALTHCHECK: GET /healthz from the proxy running as ``args.pid`` (or
    under it, below an init such as tini), on the port that process listens on,
    however it was given (``--port`` in an image's CMD, FLASK_PROXY_PORT, PORT).
    Exit status 0 healthy, 1 not (Docker reserves 2); a failure is one line."""
    import socket
    try:
        host, port, source = proxy_address(args.pid)
    except ConfigError as error:
        tell("healthcheck: %s" % error)
        return 1
    where = "%s:%d" % (url_host(host or "localhost"), port)
    try:
        with socket.create_connection((host, port), args.timeout) as connection:
            connection.settimeout(args.timeout)
            connection.sendall(b"GET %s HTTP/1.0\r\n\r\n" % LIVENESS_PATH.encode())
            status = connection.makefile("rb").readline().split(b" ")[1:2]
    except OSError as error:
        status, reason = None, error.strerror or str(error) or type(error).__name__
    if status == [b"200"]:
        return 0
    if status is not None:
        reason = "answered %s" % (status[0].decode("ascii", "replace") if status else "nothing")
    tell("healthcheck: GET %s on %s (the port %s): %s"
                     % (LIVENESS_PATH, where, source, reason))
    return 1


# -- The client's command line -------------------------------------------------

# What -p takes, for an error about -p (a KEY=VALUE, as curl -d or docker -e take it).
PARAM_HINT = "write -p KEY VALUE, e.g. -p {} {}"


def client_parser():
    parser = argument_parser(hints=[("-p/--param", ": " + PARAM_HINT.format("name", "Ada"))],
                             prog="owproxy.py", description=(
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
    health_command = commands.add_parser(
        "healthcheck", help="GET /healthz from the proxy of this container (Docker's "
                            "HEALTHCHECK), on the port it listens on")
    health_command.add_argument("--pid", type=int, default=1,
                                help="the proxy's process, or one it runs under "
                                     "(default: %(default)s)")
    health_command.add_argument("--timeout", type=str, default="2",
                                help="seconds to wait for the answer (default: %(default)s)")
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


def action_seconds(text):
    """A time limit as OpenWhisk allows one: 100 ms at least."""
    try:
        seconds = parse_seconds(text)
    except ValueError:
        seconds = 0.0
    if seconds < 0.1:
        raise ValueError("not a time limit in seconds (0.1 or more)")
    return seconds


def client_args(argv):
    """The parsed command line of a client command, its values checked."""
    for flag, word in zip(argv, argv[1:]):
        if flag in ("-p", "--param") and "=" in word:
            raise ClientError("%s %s: %s" % (flag, word, PARAM_HINT.format(*word.split("=", 1))))
    args = client_parser().parse_args(argv)
    args.timeout = flag_value("--timeout", args.timeout, parse_seconds
                              if args.command == "healthcheck" else action_seconds)
    if args.command == "invoke":
        args.repeat = flag_value("--repeat", args.repeat, positive_int)
    return args


CLIENT_COMMANDS = {"invoke": invoke, "init": client_init, "run": client_run,
                   "healthcheck": healthcheck}


# ============================================================================
# 12. CLI
# ============================================================================

COMPILE_HELP = """
Unpacks the code on stdin (source, a zip or a tar.gz) and compiles it with the
image's OW_COMPILER, as /init would, then writes a zip of the result to stdout
(exit 0; 1 with the cause on stderr).  MAIN is the entry point (default main).
Deploy the zip: its exec runs as it is, with no compile at the cold start.
"""


def compile_command(args, flags=()):
    """``--compile MAIN`` (the Go proxy's ``-compile MAIN``), at an image's build
    time: the code on stdin unpacked and compiled as /init would, a zip of the
    result on stdout, exit status 0; or the cause on stderr, 1.  An /init of that
    zip compiles nothing again: its ``exec`` runs as it is.  ``flags``, those given
    before it, are the proxy's settings (an image's ENTRYPOINT may hold some)."""
    import base64
    import tempfile
    usage = "usage: owproxy.py --compile [MAIN] <CODE >ZIP\n"
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(usage + COMPILE_HELP)
        return 0
    if len(args) > 1 or args[:1] and args[0].startswith("-"):
        tell(usage)
        return 2
    main = args[0] if args else "main"
    data = sys.stdin.buffer.read()
    message = {"code": base64.b64encode(data).decode(), "binary": True, "main": main}
    if not data.startswith((ZIP_MAGIC, TAR_GZ_MAGIC)):
        with contextlib.suppress(UnicodeDecodeError):
            message = {"code": data.decode("utf-8"), "main": main}  # source, as /init takes it
    # The action directory in a folder of its own, so that the staging beside it goes too.
    folder = tempfile.mkdtemp(prefix="owproxy-compile-")
    try:
        action = os.path.join(folder, "action")
        os.mkdir(action)
        runner = ActionRunner()
        runner.configure(resolve_settings(list(flags) + ["--action-dir", action], os.environ),
                         Logs(out_fd=2), Processes())  # stdout is the zip's
        zip_folder(sys.stdout.buffer, runner.install(message).stage)
        return 0
    except (InitError, ConfigError, OSError) as error:
        tell(str(error))
        return 1
    finally:
        remove_tree(folder)


_runner = None


def setRunner(runner):
    """Serve with ``runner`` (an ActionRunner) instead of the default one."""
    global _runner
    _runner = runner


def unknown_command(word):
    import difflib
    close = difflib.get_close_matches(word, list(CLIENT_COMMANDS), 1)
    tell("%r is not a command; %s (see owproxy.py --help)" % (
        word, "did you mean %s?" % close[0] if close else "the commands are invoke, init, run"))
    return 2


def run_command(argv):
    """The proxy, or the command ``argv`` names; returns the exit status."""
    if argv[:1] == ["function-worker"] and len(argv) == 5:  # the proxy's own, with fd 3
        return function_worker(*argv[1:])
    for spelling in ("--compile", "-compile"):  # after the proxy's flags too (an ENTRYPOINT's)
        if spelling in argv:
            at = argv.index(spelling)
            return compile_command(argv[at + 1:], argv[:at])
    if argv[:1] and argv[0] in CLIENT_COMMANDS:
        try:
            args = client_args(argv)
            return CLIENT_COMMANDS[args.command](args)
        except (ClientError, ConfigError, InitError) as error:
            tell(str(error))
            return 2
        except KeyboardInterrupt:
            tell("interrupted")
            return 130
    if argv[:1] and not argv[0].startswith("-"):
        return unknown_command(argv[0])
    try:
        settings = resolve_settings(argv, os.environ)
        return serve(settings, _runner or ActionRunner())
    except ConfigError as error:
        tell(str(error))
        return 2


def main(argv=None):
    """Runs the proxy, or one of its commands, and exits with its status, so that a
    runtime's script may end with a bare ``owproxy.main()`` as with upstream's."""
    sys.exit(run_command(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
