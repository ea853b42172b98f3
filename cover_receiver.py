#!/usr/bin/env python3
"""cover_receiver: receive the music API's "cover images generated" callback
(sunoapi.org / kie.ai) and save the covers to disk, byte-exact, exactly once.

Usage:
    python3 cover_receiver.py [serve] [OPTIONS]           receive callbacks (default)
    python3 cover_receiver.py fetch TASKID... [OPTIONS]   poll the record-info API instead
    python3 cover_receiver.py status [--dir D] [TASKID]   list tasks, or print one record

Give the API this callBackUrl:
    https://<your host>/suno-cover-callback              (add ?token=<token> if one is set)

serve options (each also read from COVER_RECEIVER_<NAME>, e.g. COVER_RECEIVER_PORT;
the flag wins):
    --host 0.0.0.0            --port 3000             --path /suno-cover-callback
    --dir ./covers            --workers 4             --attempts 5
    --timeout 30              --max-image-bytes 26214400  --max-body-bytes 1048576
    --allow-host HOST         (repeatable; env: comma-separated)
    --user-agent UA           --tls-cert PATH --tls-key PATH
    --on-complete CMD         --drain-seconds 10      --max-connections 64
    --request-timeout 10      --hmac-key-file PATH    --token-file PATH

fetch options: --dir --api-base https://api.sunoapi.org --interval 30 --wait 600,
plus --allow-host --attempts --timeout --max-image-bytes --user-agent --workers.

Secrets are never command-line values:
    COVER_RECEIVER_HMAC_KEY   kie.ai webhook signing key (or --hmac-key-file)
    COVER_RECEIVER_TOKEN      required ?token= on the callback URL (or --token-file)
    SUNO_API_KEY              API key for fetch

Files: <dir>/<taskId>/task.json (the record) and cover_1.png, cover_2.jpg, ...
Exit status: 0 ok; 1 fetch: a task failed; 2 bad usage or cannot start;
3 fetch: a task is still generating when --wait ran out.
"""

__version__ = "1.0.0"

import argparse
import base64
import contextlib
import dataclasses
import datetime
import email.utils
import fcntl
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import logging
import os
import queue
import random
import re
import secrets
import shlex
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

ENV_PREFIX = "COVER_RECEIVER_"
DEFAULT_USER_AGENT = "Mozilla/5.0 (compatible; cover_receiver/%s)" % __version__
TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
MAX_IMAGES = 10
MAX_URL_CHARS = 2048
SIGNATURE_WINDOW = 300          # seconds either way (kie.ai docs)
MAX_REDIRECTS = 5
RETRY_AFTER_CAP = 60.0          # never sleep longer than this on a server's say-so
BACKOFF_CAP = 60.0
HOOK_TIMEOUT = 60.0
CHUNK = 256 * 1024
MAX_API_ANSWER = 1024 * 1024
CLAIM_POLL = 0.2                # seconds between tries for an image held by another process
PENDING_DIR = ".pending"        # <dir>/.pending/<taskId>: index of unfinished tasks
PENDING, DONE, FAILED = "pending", "done", "failed"
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
RETRY_STATUSES = (408, 429)     # plus every 5xx
IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"),
               (b"GIF87a", "gif"), (b"GIF89a", "gif"))
COVER_EXTS = ("png", "jpg", "webp", "gif")
CALLBACK_OUTCOMES = ("received", "duplicate", "bad_request", "unauthorized", "length_required",
                     "too_large", "unsupported_media_type", "unavailable")

# Special-purpose ranges (IANA registries) refused as download targets. Listed
# explicitly because ipaddress.is_global differs across Python versions and
# calls multicast "global".
BLOCKED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
    "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4",
    "::/96", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23",
    "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"))
NAT64_NETWORK = ipaddress.ip_network("64:ff9b::/96")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

# Not passed on to --on-complete: secrets, and systemd's per-process variables.
HOOK_HIDDEN_ENV = ("COVER_RECEIVER_HMAC_KEY", "COVER_RECEIVER_TOKEN", "SUNO_API_KEY",
                   "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                   "LISTEN_FDNAMES")

LOG = logging.getLogger("cover_receiver")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class ReceiverError(Exception):
    """Root of every error this program raises on purpose."""
    status = 500
    reason = "internal"


class UsageError(ReceiverError):
    """Bad command line, environment or start-up condition: exit status 2."""


class BadCallback(ReceiverError):
    status, reason = 400, "bad_request"


class Unauthorized(ReceiverError):
    status, reason = 401, "unauthorized"


class NotFound(ReceiverError):
    status, reason = 404, "not_found"


class MethodNotAllowed(ReceiverError):
    status, reason = 405, "method_not_allowed"


class LengthRequired(ReceiverError):
    status, reason = 411, "length_required"


class TooLarge(ReceiverError):
    status, reason = 413, "too_large"


class UnsupportedMediaType(ReceiverError):
    status, reason = 415, "unsupported_media_type"


class Unavailable(ReceiverError):
    status, reason = 503, "unavailable"


class DownloadError(ReceiverError):
    """One try at one image did not produce a verified file."""


class Retryable(DownloadError):
    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class Permanent(DownloadError):
    pass


class Aborted(ReceiverError):
    """Shutdown cut a download short; the image stays pending on disk."""


class ApiError(ReceiverError):
    """The record-info API did not give a usable answer."""

    def __init__(self, message, retryable, retry_after=None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def utc_now(timestamp=None):
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-24T23:39:07.929Z."""
    when = datetime.datetime.fromtimestamp(
        time.time() if timestamp is None else timestamp, datetime.timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def escape(value, limit=200):
    """Make attacker-controlled text safe for a one-line log: control and
    non-ASCII characters escaped, length bounded."""
    text = str(value)
    clipped = len(text) > limit
    text = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    text = CONTROL_CHARS.sub(lambda m: "\\x%02x" % ord(m.group()), text)
    return text + ("..." if clipped else "")


def log_event(event, task=None, level=logging.INFO, **fields):
    parts = [event]
    if task is not None:
        parts.append("task=" + escape(task))
    parts.extend("%s=%s" % (key, escape(val)) for key, val in fields.items())
    LOG.log(level, " ".join(parts))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backoff_delay(attempt, base, retry_after=None):
    """Exponential backoff with jitter; a server's Retry-After wins, capped."""
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP)
    return min(BACKOFF_CAP, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def parse_retry_after(value, clock=time.time):
    """RFC 9110 10.2.3: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - clock())


def sniff_image(head):
    """The file extension for PNG/JPEG/GIF/WebP magic bytes, else None."""
    for magic, ext in IMAGE_MAGIC:
        if head.startswith(magic):
            return ext
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def _int_range(low, high=None):
    def parse(text):
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError("must be a whole number, not %r" % text) from None
        if value < low or (high is not None and value > high):
            bound = "from %d to %d" % (low, high) if high is not None else ">= %d" % low
            raise ValueError("must be %s, not %d" % (bound, value))
        return value
    return parse


def _seconds(minimum):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number of seconds, not %r" % text) from None
        if not (minimum <= value < 86400 * 365):
            raise ValueError("must be a number of seconds >= %g, not %r" % (minimum, text))
        return value
    return parse


def _callback_path(text):
    if not text.startswith("/") or any(c in text for c in "?# ") or not text.isprintable():
        raise ValueError("must be a URL path starting with / (no query), not %r" % text)
    return text


def _text(text):
    if not text or not text.isprintable() or not text.isascii():
        raise ValueError("must be printable ASCII text")
    return text


def _folder(text):
    if not text or not text.isprintable():
        raise ValueError("must be a folder path")
    return text


def _host_pattern(text):
    name = text.strip().lower().rstrip(".")
    bare = name[2:] if name.startswith("*.") else name
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", bare):
        try:
            ipaddress.ip_address(bare.strip("[]"))
            return bare.strip("[]")
        except ValueError:
            raise ValueError("must be a host name or *.domain, not %r" % text) from None
    return name


def _command(text):
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise ValueError("cannot be split like a shell command: %s" % exc) from None
    if not argv:
        raise ValueError("must name a command")
    return tuple(argv)


def _api_base(text):
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL, not %r" % text)
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        raise ValueError("must be https (the API key travels with it); http only for localhost")
    return text.rstrip("/")


def _readable_file(text):
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError("%r is not a readable file" % text)
    return text


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: object
    parse: object
    help: str
    commands: tuple = ("serve",)
    repeat: bool = False
    metavar: str = "N"


DOWNLOAD = ("serve", "fetch")
OPTIONS = (
    Option("host", "0.0.0.0", _text, "listen address (IPv6 literal allowed)", metavar="HOST"),
    Option("port", "3000", _int_range(0, 65535), "listen port (0: any free port)",
           metavar="PORT"),
    Option("path", "/suno-cover-callback", _callback_path, "the callback path", metavar="PATH"),
    Option("dir", "./covers", _folder, "where tasks and covers live; created if missing",
           ("serve", "fetch", "status"), metavar="DIR"),
    Option("workers", "4", _int_range(1, 64), "downloads running at once", DOWNLOAD),
    Option("attempts", "5", _int_range(1, 100), "tries per image before it fails for good",
           DOWNLOAD),
    Option("timeout", "30", _seconds(0.1), "seconds for one network step (connect, each read)",
           DOWNLOAD, metavar="SECONDS"),
    Option("max-image-bytes", "26214400", _int_range(1), "larger images are refused", DOWNLOAD),
    Option("max-body-bytes", "1048576", _int_range(1), "larger callbacks get 413"),
    Option("allow-host", None, _host_pattern,
           "download only from HOST (name, or *.domain for subdomains); repeatable; "
           "turns off the public-address check", DOWNLOAD, repeat=True, metavar="HOST"),
    Option("user-agent", DEFAULT_USER_AGENT, _text, "User-Agent sent to image hosts", DOWNLOAD,
           metavar="UA"),
    Option("hmac-key-file", None, _readable_file,
           "file holding the kie.ai signing key (or env COVER_RECEIVER_HMAC_KEY)", metavar="FILE"),
    Option("token-file", None, _readable_file,
           "file holding the ?token= secret (or env COVER_RECEIVER_TOKEN)", metavar="FILE"),
    Option("tls-cert", None, _readable_file, "certificate chain (PEM) to serve HTTPS",
           metavar="FILE"),
    Option("tls-key", None, _readable_file, "private key (PEM) to serve HTTPS", metavar="FILE"),
    Option("on-complete", None, _command,
           "command run when a task ends; its folder is appended as last argument",
           metavar="CMD"),
    Option("drain-seconds", "10", _seconds(0), "on SIGTERM, time running downloads may finish",
           metavar="SECONDS"),
    Option("max-connections", "64", _int_range(1, 10000), "connections served at once"),
    Option("request-timeout", "10", _seconds(0.1), "seconds a client has to send its request",
           metavar="SECONDS"),
    Option("api-base", "https://api.sunoapi.org", _api_base,
           "record-info API base (kie.ai: https://api.kie.ai)", ("fetch",), metavar="URL"),
    Option("interval", "30", _seconds(0.01), "seconds between polls of a task", ("fetch",),
           metavar="SECONDS"),
    Option("wait", "600", _seconds(0), "give up on a still-generating task after this",
           ("fetch",), metavar="SECONDS"),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the program needs, parsed and validated once by build_config()."""
    command: str = "serve"
    # Options (defaults live in OPTIONS; None where the command does not take it):
    host: str = None
    port: int = None
    path: str = None
    dir: str = None
    workers: int = None
    attempts: int = None
    timeout: float = None
    max_image_bytes: int = None
    max_body_bytes: int = None
    allow_host: tuple = ()
    user_agent: str = None
    tls_cert: str = None
    tls_key: str = None
    on_complete: tuple = None
    drain_seconds: float = None
    max_connections: int = None
    request_timeout: float = None
    api_base: str = None
    interval: float = None
    wait: float = None
    # Read from files or the environment, never argv:
    hmac_key: bytes = None
    token: str = None
    api_key: str = None
    task_ids: tuple = ()
    # Not on the command line: seams the tests turn down so they need no sleeps.
    backoff_base: float = 1.0
    hook_timeout: float = HOOK_TIMEOUT

    def __repr__(self):      # keep secrets out of any accidental print
        return "Config(command=%r, dir=%r, port=%r)" % (self.command, self.dir, self.port)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    overview = __doc__.split("serve options")[0].strip()
    epilog = ("Each option also reads COVER_RECEIVER_<NAME> (--max-image-bytes -> "
              "COVER_RECEIVER_MAX_IMAGE_BYTES); the flag wins.\nSecrets come from the "
              "environment or files only: COVER_RECEIVER_HMAC_KEY, COVER_RECEIVER_TOKEN, "
              "SUNO_API_KEY.")
    parser = ArgumentParser(prog="cover_receiver.py", allow_abbrev=False, description=overview,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="cover_receiver " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="{serve,fetch,status}")
    helps = {"serve": overview,
             "fetch": "Poll the record-info API for each TASKID (key in SUNO_API_KEY) and\n"
                      "download its covers as a callback would. Exit 0 all done, 1 any\n"
                      "failed, 2 usage, 3 any still generating after --wait.",
             "status": "List the tasks in --dir, or print one task's record as JSON."}
    for command, text in helps.items():
        sub = commands.add_parser(command, help=text.splitlines()[0], description=text,
                                  epilog=epilog, allow_abbrev=False,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if command == "fetch":
            sub.add_argument("task_ids", nargs="+", metavar="TASKID")
        if command == "status":
            sub.add_argument("task_ids", nargs="?", metavar="TASKID")
        for opt in OPTIONS:
            if command in opt.commands:
                default = "" if opt.default is None else " (default: %s)" % opt.default
                sub.add_argument("--" + opt.name, action="append" if opt.repeat else "store",
                                 help=opt.help + default, metavar=opt.metavar)
    return parser


def _read_secret(path, env, env_name):
    """A secret from a file (one trailing newline stripped) or from env_name."""
    if not path:
        return env.get(env_name, "").encode() or None
    with open(path, "rb") as handle:
        value = handle.read()
    for ending in (b"\r\n", b"\n"):
        if value.endswith(ending):
            return value[:-len(ending)] or None
    return value or None


def build_config(argv, env):
    """Parse argv + env into a Config, or raise UsageError naming the option."""
    argv = list(argv)
    if not argv or argv[0] not in ("serve", "fetch", "status", "--version"):
        argv.insert(0, "serve")          # serve is the default subcommand
    args = build_parser().parse_args(argv)
    values = {"command": args.command}
    for opt in OPTIONS:
        if args.command not in opt.commands:
            continue
        dest = opt.name.replace("-", "_")
        env_name = ENV_PREFIX + dest.upper()
        raw, origin = getattr(args, dest), "--" + opt.name
        if raw is None and env.get(env_name, "") != "":
            raw = env[env_name].split(",") if opt.repeat else env[env_name]
            origin = "%s (from %s)" % (origin, env_name)
        if raw is None:
            raw = opt.default
        if raw is None:
            continue
        try:
            values[dest] = (tuple(opt.parse(item) for item in raw if item.strip())
                            if opt.repeat else opt.parse(raw))
        except ValueError as exc:
            raise UsageError("%s: %s" % (origin, exc)) from None
    if args.command == "serve":
        if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
            raise UsageError("--tls-cert and --tls-key go together")
        values["hmac_key"] = _read_secret(values.pop("hmac_key_file", None), env,
                                          ENV_PREFIX + "HMAC_KEY")
        token = _read_secret(values.pop("token_file", None), env, ENV_PREFIX + "TOKEN")
        values["token"] = token.decode("utf-8", "replace") if token else None
    if args.command in ("fetch", "status"):
        ids = args.task_ids if isinstance(args.task_ids, list) else [args.task_ids]
        for task_id in ids:
            if task_id is not None and not TASK_ID_RE.fullmatch(task_id):
                raise UsageError("TASKID %s: must match %s" % (escape(task_id), TASK_ID_RE.pattern))
        values["task_ids"] = tuple(t for t in ids if t is not None)
    if args.command == "fetch":
        values["api_key"] = env.get("SUNO_API_KEY", "").strip() or None
        if not values["api_key"]:
            raise UsageError("SUNO_API_KEY is not set: fetch needs the API key in it")
    return Config(**values)


# ---------------------------------------------------------------------------
# Callback validation and proof of origin (pure functions)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Callback:
    task_id: str
    code: int
    msg: str
    images: tuple

    @classmethod
    def from_json(cls, obj):
        """Validate a decoded callback body; raise BadCallback saying why."""
        if not isinstance(obj, dict):
            raise BadCallback("body must be a JSON object")
        code, msg, data = obj.get("code"), obj.get("msg", ""), obj.get("data")
        if not isinstance(code, int) or isinstance(code, bool):
            raise BadCallback("code must be an integer")
        if not isinstance(msg, str):
            raise BadCallback("msg must be a string")
        if not isinstance(data, dict):
            raise BadCallback("data must be an object")
        task_id = data.get("taskId")
        if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
            raise BadCallback("data.taskId must match %s" % TASK_ID_RE.pattern)
        if code != 200:
            return cls(task_id, code, msg, ())
        images = data.get("images")
        if not isinstance(images, list) or not 1 <= len(images) <= MAX_IMAGES:
            raise BadCallback("data.images must be a list of 1 to %d URLs" % MAX_IMAGES)
        for number, url in enumerate(images, 1):
            problem = url_problem(url)
            if problem:
                raise BadCallback("data.images[%d] %s" % (number - 1, problem))
        return cls(task_id, code, msg, tuple(images))


def url_problem(url):
    """Why url is not an acceptable image URL, or None."""
    if not isinstance(url, str):
        return "must be a string"
    if len(url) > MAX_URL_CHARS:
        return "is longer than %d characters" % MAX_URL_CHARS
    if not url.isprintable() or " " in url or not url.isascii():
        return "must be printable ASCII without spaces"
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port                  # raises ValueError for a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


def webhook_signature(key, task_id, timestamp):
    """kie.ai: base64(HMAC-SHA256(key, taskId + "." + timestamp))."""
    message = ("%s.%s" % (task_id, timestamp)).encode("utf-8")
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode("ascii")


def verify_signature(key, task_id, timestamp, signature, now):
    """Raise Unauthorized unless the kie.ai headers prove the sender knows key."""
    if not timestamp or not signature:
        raise Unauthorized("missing X-Webhook-Timestamp or X-Webhook-Signature")
    if not re.fullmatch(r"[0-9]{1,12}", timestamp.strip()):
        raise Unauthorized("X-Webhook-Timestamp must be unix seconds")
    if abs(now - int(timestamp)) > SIGNATURE_WINDOW:
        raise Unauthorized("X-Webhook-Timestamp is more than %d s from now" % SIGNATURE_WINDOW)
    try:
        given = base64.b64decode(signature.strip(), validate=True)
    except ValueError:
        raise Unauthorized("X-Webhook-Signature is not base64") from None
    if not isinstance(task_id, str):
        raise Unauthorized("no data.taskId to verify the signature against")
    expected = base64.b64decode(webhook_signature(key, task_id, timestamp.strip()))
    if not hmac.compare_digest(expected, given):
        raise Unauthorized("signature does not match")


def verify_token(token, query):
    given = urllib.parse.parse_qs(query, keep_blank_values=True).get("token", [])
    if len(given) != 1 or not hmac.compare_digest(given[0].encode(), token.encode()):
        raise Unauthorized("missing or wrong ?token=")


# ---------------------------------------------------------------------------
# Store: the only code that touches <dir>
# ---------------------------------------------------------------------------

class TaskStore:
    """Task records and covers under one folder.

    task.json is the idempotency marker, replaced atomically. <dir>/.pending/
    holds an empty file per unfinished task so start-up never reads finished
    records. flock on a task's folder serialises record updates, and flock on
    .cover_<n>.lock claims one image, across threads and processes alike
    (serve and fetch may share a folder); a dead process's locks vanish with it.
    """

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.pending_dir = os.path.join(self.root, PENDING_DIR)

    def prepare(self):
        """Create the folder and prove it is writable (raises OSError)."""
        os.makedirs(self.pending_dir, exist_ok=True)
        self.probe()

    def probe(self):
        path = os.path.join(self.root, ".probe-%s" % secrets.token_hex(4))
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(path)

    def task_dir(self, task_id):
        if not TASK_ID_RE.fullmatch(task_id):       # defence in depth: never leave <dir>
            raise BadCallback("bad taskId")
        return os.path.join(self.root, task_id)

    def read(self, task_id):
        try:
            with open(os.path.join(self.task_dir(task_id), "task.json"), "rb") as handle:
                record = json.load(handle)
        except FileNotFoundError:
            return None
        except ValueError:
            log_event("record-unreadable", task_id, logging.WARNING)
            return None
        return record if isinstance(record, dict) else None

    def pending_count(self):
        try:
            return len(os.listdir(self.pending_dir))
        except OSError:
            return 0

    def records(self):
        for name in sorted(os.listdir(self.root)):
            if TASK_ID_RE.fullmatch(name):
                record = self.read(name)
                if record is not None:
                    yield record

    # -- accepting a callback ------------------------------------------------

    def accept(self, callback):
        """Make callback durable. Returns ("received" | "duplicate", indexes of
        images still to download)."""
        try:
            return self._accept(callback)
        except OSError as exc:
            raise Unavailable("cannot record the task durably: %s" % (exc.strerror or exc)) from exc

    def _accept(self, callback):
        path = self.task_dir(callback.task_id)
        try:
            os.mkdir(path)
            fsync_dir(self.root)
            fresh = True
        except FileExistsError:
            fresh = False
        with self._locked(callback.task_id):
            record = self.read(callback.task_id)
            if record is None:
                if not fresh:
                    self._sweep(path)
                record = new_record(callback)
            elif record["status"] == FAILED and callback.code == 200:
                reopen_record(record, callback)
            else:
                return "duplicate", missing_images(record)
            if record["status"] == PENDING:
                self._mark(callback.task_id)
            self._write(path, record)
            return "received", missing_images(record)

    # -- downloading one image -------------------------------------------------

    @contextlib.contextmanager
    def claim(self, task_id, index, abort):
        """Hold image index of task_id for one downloader. Yields its URL, or
        None when there is nothing left to do for it."""
        path = self.task_dir(task_id)
        lock = os.path.join(path, ".cover_%d.lock" % (index + 1))
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:      # another process has it: wait for it
                    if abort.wait(CLAIM_POLL):
                        raise Aborted("stopping") from None
            record = self.read(task_id)
            if record is None or index not in missing_images(record):
                yield None
                return
            for ext in COVER_EXTS:           # saved just before a crash: adopt, no re-download
                name = "cover_%d.%s" % (index + 1, ext)
                if os.path.exists(os.path.join(path, name)):
                    self.settle(task_id, index, name, None)
                    yield None
                    return
            yield record["images"][index]
        finally:
            os.close(fd)

    def save_cover(self, task_id, index, write):
        """Run write(file) into a hidden temp file, then fsync and rename it to
        cover_<n>.<ext>. write returns the detected extension. Returns (what
        settle returns, bytes saved)."""
        path = self.task_dir(task_id)
        part = os.path.join(path, ".cover_%d.part" % (index + 1))
        try:
            with open(part, "wb") as handle:
                ext = write(handle)
                handle.flush()
                os.fsync(handle.fileno())
                size = handle.tell()
            name = "cover_%d.%s" % (index + 1, ext)
            os.replace(part, os.path.join(path, name))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise
        # No fsync of the folder here: settle() writes task.json into the same
        # folder and fsyncs it, which makes this rename durable too.
        return self.settle(task_id, index, name, None), size

    def settle(self, task_id, index, name, error):
        """Record image index as saved (name) or failed for good (error).
        Returns the task's new status when this ended the task, else None."""
        path = self.task_dir(task_id)
        with self._locked(task_id):
            record = self.read(task_id)
            if record is None or record["status"] != PENDING or index >= len(record["files"]):
                return None
            record["files"][index] = name
            record["errors"][index] = error
            if missing_images(record):
                self._write(path, record)
                return None
            failed = [e for e in record["errors"] if e]
            record["status"] = FAILED if failed else DONE
            record["error"] = "; ".join(failed) if failed else None
            self._write(path, record)
            self._unmark(task_id)
            if record["status"] == DONE:
                for number in range(1, len(record["files"]) + 1):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(path, ".cover_%d.lock" % number))
            return record["status"]

    # -- start-up --------------------------------------------------------------

    def recover(self):
        """Clean temp files of unfinished tasks; return [(taskId, indexes)]."""
        work = []
        for task_id in sorted(os.listdir(self.pending_dir)):
            if not TASK_ID_RE.fullmatch(task_id) or not os.path.isdir(self.task_dir(task_id)):
                self._unmark(task_id)
                continue
            with self._locked(task_id):
                self._sweep(self.task_dir(task_id))
                record = self.read(task_id)
                if record is None or record["status"] != PENDING:
                    self._unmark(task_id)
                    continue
            work.append((task_id, missing_images(record)))
        return work

    # -- internals ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, task_id):
        fd = os.open(self.task_dir(task_id), os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _sweep(self, path):
        """Remove temp files nobody is writing (caller holds the task lock)."""
        for entry in os.scandir(path):
            if entry.name.startswith(".task.json."):
                os.unlink(entry.path)
            elif entry.name.startswith(".cover_") and entry.name.endswith(".part"):
                lock = os.path.join(path, entry.name[:-5] + ".lock")
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(entry.path)
                except BlockingIOError:
                    pass                    # a live downloader owns it
                finally:
                    os.close(fd)

    def _write(self, path, record):
        """Atomic replace: temp file, fsync, rename, fsync of the folder."""
        record["updatedAt"] = utc_now()
        data = (json.dumps(record) + "\n").encode("utf-8")   # compact: C encoder
        tmp = os.path.join(path, ".task.json.%s.tmp" % secrets.token_hex(4))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, os.path.join(path, "task.json"))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path)

    def _mark(self, task_id):
        os.close(os.open(os.path.join(self.pending_dir, task_id), os.O_WRONLY | os.O_CREAT, 0o644))
        fsync_dir(self.pending_dir)

    def _unmark(self, task_id):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.pending_dir, task_id))


def open_store(config):
    """The store for --dir, created and proven writable, or a UsageError."""
    store = TaskStore(config.dir)
    try:
        store.prepare()
    except OSError as exc:
        raise UsageError("--dir %s is not writable: %s"
                         % (config.dir, exc.strerror or exc)) from None
    return store


def new_record(callback):
    now = utc_now()
    ok = callback.code == 200
    return {
        "taskId": callback.task_id,
        "status": PENDING if ok else FAILED,
        "code": callback.code,
        "msg": callback.msg,
        "images": list(callback.images),
        "files": [None] * len(callback.images),
        "errors": [None] * len(callback.images),
        "error": None if ok else "generation failed: code %d: %s" % (callback.code, callback.msg),
        "receivedAt": now,
        "updatedAt": now,
    }


def reopen_record(record, callback):
    """A success callback for a failed task: retry what is missing, using the
    callback's (possibly fresher) URL for each missing image."""
    if not any(record["files"]):
        record["images"] = list(callback.images)
        record["files"] = [None] * len(callback.images)
    for index, name in enumerate(record["files"]):
        if name is None and index < len(callback.images):
            record["images"][index] = callback.images[index]
    record["errors"] = [None] * len(record["files"])
    record.update(status=PENDING, code=callback.code, msg=callback.msg, error=None)


def missing_images(record):
    if record.get("status") != PENDING:
        return []
    return [i for i, (name, error) in enumerate(zip(record["files"], record["errors"]))
            if name is None and error is None]


# ---------------------------------------------------------------------------
# Downloads: policy, vetted connections, streaming, retries
# ---------------------------------------------------------------------------

def system_resolver(host, port):
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def is_public_address(text):
    """True only for globally routable unicast addresses, also looking inside
    IPv4-mapped, 6to4, Teredo and NAT64 forms."""
    ip = ipaddress.ip_address(text.split("%")[0])
    if ip.version == 6:
        if ip.ipv4_mapped:
            return is_public_address(str(ip.ipv4_mapped))
        inner = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and ip in NAT64_NETWORK:
            inner = ipaddress.ip_address(int(ip) & 0xFFFFFFFF)
        if inner is not None and not is_public_address(str(inner)):
            return False
    return ip.is_global and not ip.is_multicast and not any(ip in net for net in BLOCKED_NETWORKS)


@dataclasses.dataclass(frozen=True)
class Target:
    """A URL that passed the policy, with the addresses to connect to."""
    scheme: str
    host: str
    port: int
    request_path: str
    addresses: tuple


class DownloadPolicy:
    """Contract, Download policy: which URLs may be fetched, from where."""

    def __init__(self, allow_hosts, resolver=system_resolver):
        self.allow_hosts = tuple(allow_hosts or ())
        self.resolver = resolver

    def host_allowed(self, host):
        return any(host == p or (p.startswith("*.") and host.endswith(p[1:]))
                   for p in self.allow_hosts)

    def vet(self, url):
        parts = urllib.parse.urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
            host.encode("ascii")
        except (ValueError, UnicodeError):
            raise Permanent("refused: malformed URL") from None
        if self.allow_hosts:
            if scheme not in ("http", "https") or not self.host_allowed(host):
                raise Permanent("refused: host %s is not in --allow-host" % host)
        elif scheme != "https":
            raise Permanent("refused: only https URLs are fetched")
        try:
            addresses = tuple(dict.fromkeys(self.resolver(host, port)))
        except (OSError, UnicodeError) as exc:
            raise Retryable("cannot resolve %s: %s" % (host, exc)) from None
        if not addresses:
            raise Retryable("cannot resolve %s" % host)
        if not self.allow_hosts:
            for address in addresses:
                if not is_public_address(address):
                    raise Permanent("refused: %s resolves to non-public %s" % (host, address))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Target(scheme, host, port, path, addresses)


class PinnedConnection(http.client.HTTPSConnection):
    """HTTP(S) connection to an address that was already checked: no second
    DNS lookup, while Host, SNI and certificate checks use the name."""

    def __init__(self, target, timeout, context, abort):
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._target, self._tls, self._abort = target, context, abort
        self.watched = None         # the socket shutdown() may cut short
        self.default_port = 443 if target.scheme == "https" else 80     # for the Host header

    def connect(self):
        error = None
        for address in self._target.addresses:
            try:
                sock = socket.create_connection((address, self.port), self.timeout)
                break
            except OSError as exc:
                error = exc
        else:
            raise error
        self.watched = sock
        self._abort.watch(sock)
        if self._target.scheme == "https":
            sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


class AbortSignal:
    """Lets the owner of running downloads cut them short at once."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sockets = set()

    def is_set(self):
        return self._event.is_set()

    def wait(self, seconds):
        return self._event.wait(seconds)

    def watch(self, sock):
        with self._lock:
            self._sockets.add(sock)
            if self._event.is_set():
                sock.shutdown(socket.SHUT_RDWR)

    def forget(self, sock):
        with self._lock:
            self._sockets.discard(sock)

    def fire(self):
        with self._lock:
            self._event.set()
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Fetcher:
    """One try at one image URL: policy, redirects, streaming, verification."""

    def __init__(self, config, resolver=system_resolver, tls=None):
        self.policy = DownloadPolicy(config.allow_host, resolver)
        self.timeout = config.timeout
        self.max_bytes = config.max_image_bytes
        self.user_agent = config.user_agent
        if tls is None:
            tls = ssl.create_default_context()
            tls.minimum_version = ssl.TLSVersion.TLSv1_2    # 3.9's default allows 1.0
        self.tls = tls

    def fetch(self, url, out, abort):
        """Write the image at url to out; return its extension."""
        for _hop in range(MAX_REDIRECTS + 1):
            target = self.policy.vet(url)
            conn = PinnedConnection(target, self.timeout, self.tls, abort)
            try:
                # Never an Authorization header: the image host gets nothing secret.
                conn.request("GET", target.request_path, headers={
                    "User-Agent": self.user_agent, "Accept": "image/*",
                    "Accept-Encoding": "identity"})
                response = conn.getresponse()
                if response.status in REDIRECT_STATUSES and response.getheader("Location"):
                    url = urllib.parse.urljoin(url, response.getheader("Location").strip())
                    continue
                if response.status == 200:
                    return self._stream(response, out, abort)
                raise _status_error(response)
            except ssl.SSLCertVerificationError as exc:
                raise Permanent("TLS certificate rejected: %s" % exc.verify_message) from None
            except (OSError, http.client.HTTPException) as exc:
                if abort.is_set():
                    raise Aborted("stopping") from None
                raise Retryable(_network_reason(exc)) from None
            finally:
                abort.forget(conn.watched)
                conn.close()
        raise Permanent("more than %d redirects" % MAX_REDIRECTS)

    def _stream(self, response, out, abort):
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise Permanent("larger than --max-image-bytes (%s bytes)" % declared)
        head, total, ext = b"", 0, None
        buffer = memoryview(bytearray(CHUNK))     # one buffer per image: memory stays flat
        while True:
            size = response.readinto(buffer)
            if abort.is_set():
                raise Aborted("stopping")
            if not size:
                break
            total += size
            if total > self.max_bytes:
                raise Permanent("larger than --max-image-bytes")
            if ext is None:
                head += buffer[:size]
                if len(head) >= 12:
                    ext = sniff_image(head)
                    if ext is None:
                        raise Permanent("not an image (starts %r)" % head[:12])
            out.write(buffer[:size])
        # readinto() returns 0 at a premature EOF instead of raising IncompleteRead.
        if declared and declared.isdigit() and total != int(declared):
            raise Retryable("connection closed after %d of %s bytes" % (total, declared))
        ext = ext or sniff_image(head)
        if ext is None:
            raise Permanent("not an image (%d bytes)" % total)
        return ext


def _status_error(response):
    status = response.status
    text = "HTTP %d" % status
    if status in RETRY_STATUSES or 500 <= status <= 599:
        return Retryable(text, parse_retry_after(response.getheader("Retry-After")))
    return Permanent(text)


def _network_reason(exc):
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed after %d bytes" % len(exc.partial)
    return "%s: %s" % (type(exc).__name__, exc)


# ---------------------------------------------------------------------------
# Service: workers, metrics, hooks, systemd
# ---------------------------------------------------------------------------

class Metrics:
    """Counters for /metrics and /healthz (Prometheus text format 0.0.4)."""

    HELP = {
        "callbacks_total": ("counter", "Callbacks answered, by outcome.", CALLBACK_OUTCOMES),
        "downloads_total": ("counter", "Images finished, by outcome.", ("saved", "failed")),
        "download_retries_total": ("counter", "Image download tries that will be retried.", ()),
        "downloaded_bytes_total": ("counter", "Bytes of covers saved.", ()),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}
        self.started = time.time()
        self.last_saved = None

    def inc(self, name, outcome=None, amount=1):
        with self._lock:
            key = (name, outcome)
            self._counts[key] = self._counts.get(key, 0) + amount
            if name == "downloads_total" and outcome == "saved":
                self.last_saved = time.time()

    def get(self, name, outcome=None):
        with self._lock:
            return self._counts.get((name, outcome), 0)

    def render(self, gauges):
        lines = []
        for name, (kind, text, outcomes) in self.HELP.items():
            lines += ["# HELP cover_receiver_%s %s" % (name, text),
                      "# TYPE cover_receiver_%s %s" % (name, kind)]
            for outcome in outcomes or (None,):
                label = '{outcome="%s"}' % outcome if outcome else ""
                lines.append("cover_receiver_%s%s %d" % (name, label, self.get(name, outcome)))
        gauges = dict(gauges, process_start_time_seconds=("Start time, unix seconds.",
                                                          self.started))
        for name, (text, value) in gauges.items():
            lines += ["# HELP cover_receiver_%s %s" % (name, text),
                      "# TYPE cover_receiver_%s gauge" % name,
                      "cover_receiver_%s %s" % (name, repr(float(value)) if isinstance(value, float)
                                                else value)]
        return "\n".join(lines) + "\n"


class DownloadQueue:
    """A bounded pool of worker threads fed (taskId, image index) jobs."""

    def __init__(self, config, store, fetcher, metrics, on_task_end):
        self.config, self.store, self.fetcher, self.metrics = config, store, fetcher, metrics
        self.on_task_end = on_task_end
        self.abort = AbortSignal()
        self._jobs = queue.Queue()
        self._changed = threading.Condition()
        self._queued = set()          # (taskId, index) queued or running: never twice
        self._running = 0
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name="download-%d" % n, daemon=True)
                         for n in range(config.workers)]

    def start(self):
        for thread in self._threads:
            thread.start()

    def put(self, task_id, indexes):
        with self._changed:
            for index in indexes:
                if (task_id, index) not in self._queued and not self._stopping:
                    self._queued.add((task_id, index))
                    self._jobs.put((task_id, index))

    @property
    def in_flight(self):
        return self._running

    def alive(self):
        return all(thread.is_alive() for thread in self._threads)

    def wait_task(self, task_id, timeout=None):
        """Block until no job of task_id is queued or running."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not any(key[0] == task_id for key in self._queued), timeout)

    def stop(self, drain_seconds):
        """Take no new jobs, give running ones drain_seconds, abort the rest."""
        with self._changed:
            self._stopping = True
            self._changed.wait_for(lambda: self._running == 0, drain_seconds)
        self.abort.fire()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._changed:
                if self._stopping:       # left pending on disk; resumed at next start
                    self._queued.discard(job)
                    self._changed.notify_all()
                    continue
                self._running += 1
            try:
                self._download(*job)
            except Aborted:
                log_event("download-aborted", job[0], image=job[1] + 1, note="left pending")
            except Exception:          # thread boundary: log, keep the worker alive
                LOG.exception("download crashed task=%s image=%d", escape(job[0]), job[1] + 1)
            finally:
                with self._changed:
                    self._queued.discard(job)
                    self._running -= 1
                    self._changed.notify_all()

    def _download(self, task_id, index):
        with self.store.claim(task_id, index, self.abort) as url:
            if url is None:
                return
            def write(out):
                return self.fetcher.fetch(url, out, self.abort)
            for attempt in range(1, self.config.attempts + 1):
                started = time.monotonic()
                try:
                    ended, size = self.store.save_cover(task_id, index, write)
                except Retryable as exc:
                    if attempt == self.config.attempts:
                        return self._fail(task_id, index, "%s (after %d tries)" % (exc, attempt))
                    delay = backoff_delay(attempt, self.config.backoff_base, exc.retry_after)
                    self.metrics.inc("download_retries_total")
                    log_event("retry", task_id, image=index + 1, attempt=attempt, reason=exc,
                              wait="%.2fs" % delay)
                    if self.abort.wait(delay):
                        raise Aborted("stopping") from None
                    continue
                except Permanent as exc:
                    return self._fail(task_id, index, str(exc))
                self.metrics.inc("downloads_total", "saved")
                self.metrics.inc("downloaded_bytes_total", amount=size)
                log_event("downloaded", task_id, image=index + 1, bytes=size,
                          ms=int((time.monotonic() - started) * 1000))
                return self._ended(task_id, ended)

    def _fail(self, task_id, index, reason):
        self.metrics.inc("downloads_total", "failed")
        log_event("download-failed", task_id, logging.WARNING, image=index + 1, reason=reason)
        self._ended(task_id, self.store.settle(task_id, index, None,
                                               "cover_%d: %s" % (index + 1, reason)))

    def _ended(self, task_id, status):
        if status:
            log_event("task-" + status, task_id)
            self.on_task_end(task_id, status)


class HookRunner:
    """Runs --on-complete, one process at a time, never through a shell."""

    def __init__(self, argv, store, timeout):
        self.argv, self.store, self.timeout = argv, store, timeout
        self._jobs = queue.Queue()
        self._current = None
        self._thread = threading.Thread(target=self._work, name="hook", daemon=True)

    def start(self):
        if self.argv:
            self._thread.start()

    def submit(self, task_id, status):
        if self.argv:
            self._jobs.put((task_id, status))

    def stop(self, seconds):
        if not self.argv:
            return
        self._jobs.put(None)
        self._thread.join(seconds)
        process = self._current
        if process is not None and process.poll() is None:
            _kill_group(process)
        self._thread.join(5)

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run(*job)
            except Exception:            # thread boundary
                LOG.exception("hook crashed task=%s", escape(job[0]))

    def _run(self, task_id, status):
        env = {k: v for k, v in os.environ.items() if k not in HOOK_HIDDEN_ENV}
        env.update(COVER_TASK_ID=task_id, COVER_TASK_STATUS=status)
        started = time.monotonic()
        try:
            self._current = subprocess.Popen(
                list(self.argv) + [self.store.task_dir(task_id)], env=env,
                stdin=subprocess.DEVNULL, stdout=2, start_new_session=True)
        except OSError as exc:
            return log_event("hook-failed", task_id, logging.WARNING, reason=exc)
        try:
            code = self._current.wait(self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self._current)
            self._current.wait()
            return log_event("hook-timeout", task_id, logging.WARNING,
                             seconds=self.timeout, note="killed")
        finally:
            self._current = None
        log_event("hook-exit", task_id, logging.INFO if code == 0 else logging.WARNING,
                  status=code, ms=int((time.monotonic() - started) * 1000))


def _kill_group(process):
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)


class SystemdNotifier:
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET."""

    def __init__(self, env):
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid_ok = env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        self.watchdog = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and pid_ok else None
        self._stop = threading.Event()
        self._thread = None

    def send(self, *lines):
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log_event("notify-failed", level=logging.WARNING, reason=exc)

    def start(self, healthy, status):
        """Tick every half watchdog period (or 5 s): STATUS=, and WATCHDOG=1
        only while healthy() says the server loop and workers are alive."""
        if not self.address:
            return
        interval = self.watchdog or 5.0

        def tick():
            while not self._stop.wait(interval):
                lines = ["STATUS=" + status()]
                if self.watchdog and healthy(interval * 2):
                    lines.append("WATCHDOG=1")
                self.send(*lines)
        self._thread = threading.Thread(target=tick, name="sd-notify", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class CallbackHandler(http.server.BaseHTTPRequestHandler):
    """Parse, bound and verify one request; errors become answers in reply_error."""

    server_version = "cover_receiver/" + __version__
    sys_version = ""
    protocol_version = "HTTP/1.0"       # one request per connection: no idle keep-alive
    default_request_version = "HTTP/1.0"  # never answer HTTP/0.9-style (no status line)

    def dispatch(self):
        receiver = self.server.receiver
        target = urllib.parse.urlsplit(self.path)
        try:
            if target.path == receiver.config.path:
                if self.command != "POST":
                    raise MethodNotAllowed("use POST")
                return self.reply(200, receiver.handle_callback(
                    self.client_address[0], target.query, self.headers, self.read_body))
            if self.command in ("GET", "HEAD") and target.path == "/healthz":
                return self.reply(*receiver.health())
            if self.command in ("GET", "HEAD") and target.path == "/metrics":
                return self.reply(200, receiver.metrics_text(),
                                  content_type="text/plain; version=0.0.4")
            raise NotFound("no such path")
        except ReceiverError as exc:
            if target.path == receiver.config.path and exc.reason in CALLBACK_OUTCOMES:
                receiver.metrics.inc("callbacks_total", exc.reason)
            self.reply(exc.status, {"status": "error", "error": str(exc)},
                       allow="POST" if isinstance(exc, MethodNotAllowed) else None)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = dispatch

    def read_body(self):
        config = self.server.receiver.config
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise LengthRequired("Content-Length is required (no chunked bodies)")
        length = self.headers.get("Content-Length")
        if length is None:
            raise LengthRequired("Content-Length is required")
        if not length.strip().isdigit():
            raise BadCallback("Content-Length is not a number")
        if int(length) > config.max_body_bytes:
            raise TooLarge("body is larger than %d bytes" % config.max_body_bytes)
        media = (self.headers.get("Content-Type") or "application/json").split(";")[0]
        if media.strip().lower() != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json")
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            raise BadCallback("body is shorter than Content-Length")
        return body

    def reply(self, status, payload, content_type="application/json", allow=None):
        body = payload if isinstance(payload, str) else json.dumps(payload)
        body = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """stdlib parse errors (400, 414, 431, 501...) as JSON too."""
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        try:
            self.reply(code, {"status": "error", "error": text})
        except OSError:
            pass

    def log_request(self, code="-", size="-"):
        # The query may carry the token: log the path only.
        path = urllib.parse.urlsplit(getattr(self, "path", "")).path or "-"
        if int(code) == 200 and path == self.server.receiver.config.path:
            return                      # its received/duplicate line already said it
        log_event("http", client=self.client_address[0], method=self.command or "-",
                  path=path, status=int(code))

    def log_message(self, format, *args):
        log_event("http-error", client=self.client_address[0], detail=format % args)


class CallbackServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Threaded HTTP(S) server: a thread per connection up to --max-connections
    (over the cap: 503), and a whole-request deadline enforced by one reaper
    thread, so a client dripping bytes (slowloris) cannot hold a thread."""

    daemon_threads = True
    block_on_close = True           # server_close() waits for requests in flight
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, config, receiver, listen_socket=None):
        self.receiver = receiver
        self.request_timeout = config.request_timeout
        self.slots = threading.BoundedSemaphore(config.max_connections)
        self.deadlines = {}                       # socket -> monotonic deadline
        self.deadlines_lock = threading.Lock()
        self.refusals = queue.Queue(maxsize=64)
        self.stopped = threading.Event()
        self.helpers = []              # server_close() runs even when binding fails
        self.tls = None
        if config.tls_cert:
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2     # 3.9's default allows 1.0
            self.tls.load_cert_chain(config.tls_cert, config.tls_key)
        if listen_socket is not None:
            self.address_family = listen_socket.family
            super().__init__(listen_socket.getsockname()[:2], CallbackHandler,
                             bind_and_activate=False)
            self.socket.close()
            self.socket, self.server_address = listen_socket, listen_socket.getsockname()
        else:
            info = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)[0]
            self.address_family = info[0]
            super().__init__(info[4], CallbackHandler)
        self.helpers = [threading.Thread(target=self._reap, name="http-deadlines", daemon=True),
                        threading.Thread(target=self._refuse, name="http-refusals", daemon=True)]
        for thread in self.helpers:
            thread.start()

    def server_bind(self):
        # HTTPServer.server_bind would call getfqdn(): a DNS query that can hang
        # start-up on a host without DNS.
        socketserver.TCPServer.server_bind(self)

    def process_request(self, request, client_address):
        if self.slots.acquire(blocking=False):
            try:
                return super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise
        self.receiver.metrics.inc("callbacks_total", "unavailable")
        log_event("http-refused", client=client_address[0], reason="max-connections")
        try:
            self.refusals.put_nowait(request)
        except queue.Full:
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request, client_address):
        conn = request
        try:
            request.settimeout(self.request_timeout)
            if self.tls is not None:
                conn = self.tls.wrap_socket(request, server_side=True,
                                            do_handshake_on_connect=False)
            with self.deadlines_lock:
                self.deadlines[conn] = time.monotonic() + self.request_timeout
            if self.tls is not None:
                conn.do_handshake()
            self.RequestHandlerClass(conn, client_address, self)
        except OSError as exc:          # TLS handshake failure, client gone or cut off
            log_event("http-connection", client=client_address[0], reason=exc)
        finally:
            with self.deadlines_lock:   # before close: the fd must not be reused while listed
                self.deadlines.pop(conn, None)
            if conn is not request:
                conn.close()

    def _reap(self):
        while not self.stopped.wait(0.1):
            now = time.monotonic()
            with self.deadlines_lock:
                for sock, deadline in self.deadlines.items():
                    if deadline < now:
                        with contextlib.suppress(OSError):   # the plain socket call, also for TLS
                            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _refuse(self):
        """Answer connections over the cap with 503, one at a time, briefly."""
        body = b'{"status": "error", "error": "too many connections"}'
        answer = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        while True:
            request = self.refusals.get()
            if request is None:
                return
            with contextlib.suppress(OSError):
                request.settimeout(0.5)
                if self.tls is None:      # a TLS client would need a handshake first: just close
                    seen = b""
                    while b"\r\n\r\n" not in seen and len(seen) < 65536:
                        chunk = request.recv(65536)
                        seen += chunk
                        if not chunk:
                            break
                    request.sendall(answer)
                request.shutdown(socket.SHUT_WR)
                while request.recv(65536):       # lingering close: no RST over the answer
                    pass
            request.close()

    def service_actions(self):
        self.receiver.heartbeat = time.monotonic()

    def server_close(self):
        super().server_close()          # closes the listener, joins request threads
        self.stopped.set()
        self.refusals.put(None)
        for thread in self.helpers:
            thread.join(5)


class Receiver:
    """The running service: owns the store, queue, hook runner, server and
    notifier, and starts and stops them in order."""

    def __init__(self, config, resolver=system_resolver, env=None, clock=time.time,
                 client_tls=None):
        env = os.environ if env is None else env
        self.config, self.clock = config, clock
        self.store = open_store(config)
        self.metrics = Metrics()
        self.hooks = HookRunner(config.on_complete, self.store, config.hook_timeout)
        self.queue = DownloadQueue(config, self.store, Fetcher(config, resolver, client_tls),
                                   self.metrics, self._task_ended)
        self.notifier = SystemdNotifier(env)
        self.heartbeat = time.monotonic()
        try:
            self.server = CallbackServer(config, self, inherited_socket(env))
        except ssl.SSLError as exc:
            raise UsageError("--tls-cert/--tls-key cannot be loaded: %s" % exc) from None
        except OSError as exc:
            raise UsageError("cannot listen on %s port %d: %s"
                             % (config.host, config.port, exc.strerror or exc)) from None
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={
            "poll_interval": 0.2}, name="http", daemon=True)

    @property
    def url(self):
        """The callback URL on this machine (for tests and the start-up log)."""
        host, port = self.server.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return "%s://%s:%d%s" % ("https" if self.server.tls else "http",
                                 "[%s]" % host if ":" in host else host, port, self.config.path)

    def start(self):
        work = self.store.recover()
        self.queue.start()
        self.hooks.start()
        for task_id, indexes in work:
            log_event("resume", task_id, images=len(indexes))
            self.queue.put(task_id, indexes)
        self._thread.start()
        host, port = self.server.server_address[:2]
        log_event("listening", host=host, port=port, path=self.config.path,
                  tls="on" if self.server.tls else "off", resumed=len(work),
                  signature="on" if self.config.hmac_key else "off",
                  token="on" if self.config.token else "off")
        self.notifier.send("READY=1", "STATUS=" + self.status_line())
        self.notifier.start(self.healthy, self.status_line)

    def stop(self):
        """Stop accepting, answer requests in flight, drain downloads."""
        deadline = time.monotonic() + self.config.drain_seconds
        log_event("stopping", drain_seconds=self.config.drain_seconds)
        self.notifier.send("STOPPING=1")
        self.server.shutdown()
        self.server.server_close()
        self.queue.stop(max(0.0, deadline - time.monotonic()))
        self.hooks.stop(max(0.0, deadline - time.monotonic()))
        self.notifier.stop()
        log_event("stopped", pending=self.store.pending_count())

    def healthy(self, within):
        return time.monotonic() - self.heartbeat < within and self.queue.alive()

    def status_line(self):
        return "%d pending, %d downloading, %d saved" % (
            self.store.pending_count(), self.queue.in_flight,
            self.metrics.get("downloads_total", "saved"))

    # -- the endpoint ------------------------------------------------------------

    def handle_callback(self, client, query, headers, read_body):
        config = self.config
        if config.token:
            verify_token(config.token, query)
        body = read_body()
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise BadCallback("body is not JSON") from None
        if config.hmac_key:
            data = obj.get("data") if isinstance(obj, dict) else None
            task_id = data.get("taskId") if isinstance(data, dict) else None
            verify_signature(config.hmac_key, task_id, headers.get("X-Webhook-Timestamp"),
                             headers.get("X-Webhook-Signature"), self.clock())
        callback = Callback.from_json(obj)
        outcome, indexes = self.store.accept(callback)
        self.queue.put(callback.task_id, indexes)
        self.metrics.inc("callbacks_total", outcome)
        log_event(outcome, callback.task_id, client=client, code=callback.code,
                  images=len(callback.images), msg=callback.msg)
        return {"status": outcome, "taskId": callback.task_id}

    def health(self):
        try:
            self.store.probe()
        except OSError as exc:
            return 503, {"status": "error", "error": "dir not writable: %s" % exc.strerror}
        last = self.metrics.last_saved
        return 200, {"status": "ok", "version": __version__,
                     "pending": self.store.pending_count(), "inFlight": self.queue.in_flight,
                     "lastDownloadAt": utc_now(last) if last else None}

    def metrics_text(self):
        return self.metrics.render({
            "tasks_pending": ("Tasks not yet done or failed.", self.store.pending_count()),
            "downloads_in_flight": ("Images downloading now.", self.queue.in_flight)})

    def _task_ended(self, task_id, status):
        self.hooks.submit(task_id, status)


def inherited_socket(env):
    """systemd socket activation (sd_listen_fds(3)): fd 3 when it is for us."""
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS", "").isdigit():
        return None
    if int(env["LISTEN_FDS"]) < 1:
        return None
    sock = socket.socket(fileno=3)
    sock.setblocking(True)
    return sock


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def run_serve(config, env):
    receiver = Receiver(config, env=env)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    receiver.start()
    stop.wait()
    receiver.stop()
    return 0


class RecordInfoClient:
    """GET <api-base>/api/v1/suno/cover/record-info?taskId=T with the API key.
    No redirects are followed, so the key never reaches another host."""

    def __init__(self, config):
        parts = urllib.parse.urlsplit(config.api_base)
        self.https = parts.scheme == "https"
        self.host, self.port, self.prefix = parts.hostname, parts.port, parts.path.rstrip("/")
        self.key, self.timeout, self.user_agent = config.api_key, config.timeout, config.user_agent

    def get(self, task_id):
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", "%s/api/v1/suno/cover/record-info?taskId=%s"
                         % (self.prefix, task_id), headers={
                             "Authorization": "Bearer " + self.key,
                             "Accept": "application/json", "User-Agent": self.user_agent})
            response = conn.getresponse()
            body = response.read(MAX_API_ANSWER)
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError("API unreachable: %s" % _network_reason(exc), True) from None
        finally:
            conn.close()
        retry_after = parse_retry_after(response.getheader("Retry-After"))
        try:
            answer = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            answer = None
        if not isinstance(answer, dict):
            if response.status == 200:      # e.g. a proxy's error page: try again
                raise ApiError("API answer is not JSON", True)
            return self._error(response.status, retry_after, None)
        code = answer.get("code")
        # The API reports errors in the body's code as well as in the HTTP status.
        status = code if response.status == 200 and isinstance(code, int) else response.status
        if status == 200 and isinstance(answer.get("data"), dict):
            return answer["data"]
        if status == 200:
            raise ApiError("API answer has no data object", True)
        return self._error(status, retry_after, answer)

    @staticmethod
    def _error(status, retry_after, answer):
        msg = answer.get("msg") if isinstance(answer, dict) else None
        detail = " (%s)" % escape(msg, 100) if isinstance(msg, str) and msg else ""
        if status in (401, 403):
            raise ApiError("API key rejected: %d%s" % (status, detail), False)
        if status == 404:
            raise ApiError("unknown task: 404%s" % detail, False)
        if status == 429:
            raise ApiError("rate limited: 429%s" % detail, True, retry_after)
        if status in RETRY_STATUSES or 500 <= status <= 599:
            raise ApiError("API error: %d%s" % (status, detail), True, retry_after)
        raise ApiError("API error: %d%s" % (status, detail), False)


class Poller:
    """fetch: poll record-info for each task and feed the download pipeline."""

    def __init__(self, config, client, store, downloads, stop, clock=time.monotonic):
        self.config, self.client, self.store, self.downloads = config, client, store, downloads
        self.stop, self.clock = stop, clock

    def run(self, task_id):
        """Returns (word, detail), word one of done, failed, pending, error."""
        deadline = self.clock() + self.config.wait
        tries = 0
        while True:
            try:
                data = self.client.get(task_id)
            except ApiError as exc:
                tries += 1
                if not exc.retryable:
                    return "error", str(exc)
                delay = backoff_delay(tries, self.config.backoff_base, exc.retry_after)
                log_event("api-retry", task_id, reason=exc, wait="%.2fs" % delay)
                if self.clock() + delay > deadline or self.stop.wait(delay):
                    return "error", "%s (gave up)" % exc
                continue
            tries = 0
            flag = data.get("successFlag")
            if flag in (1, "1", 3, "3"):
                return self._finish(task_id, data, int(flag) == 1)
            if flag not in (0, 2, "0", "2"):
                return "error", "unexpected successFlag %s" % escape(flag, 20)
            interval = self.config.interval
            if self.clock() + interval > deadline or self.stop.wait(interval):
                return "pending", "still generating after %g s" % self.config.wait

    def _finish(self, task_id, data, success):
        if success:
            images = (data.get("response") or {}).get("images")
            body = {"code": 200, "msg": "success", "data": {"taskId": task_id, "images": images}}
        else:
            code = data.get("errorCode")
            body = {"code": code if isinstance(code, int) and code != 200 else 501,
                    "msg": str(data.get("errorMessage") or "cover generation failed"),
                    "data": {"taskId": task_id, "images": None}}
        try:
            outcome, indexes = self.store.accept(Callback.from_json(body))
        except BadCallback as exc:
            return "error", "API answer unusable: %s" % exc
        log_event(outcome, task_id, source="record-info")
        self.downloads.put(task_id, indexes)
        self.downloads.wait_task(task_id)
        record = self.store.read(task_id) or {}
        saved = sum(1 for name in record.get("files", []) if name)
        if record.get("status") == DONE:
            return "done", "%d covers in %s" % (saved, self.store.task_dir(task_id))
        if record.get("status") == FAILED:
            return "failed", record.get("error") or "failed"
        return "pending", "downloads unfinished"


def run_fetch(config, env):
    store = open_store(config)
    downloads = DownloadQueue(config, store, Fetcher(config), Metrics(), lambda *_: None)
    downloads.start()
    stop = threading.Event()
    poller = Poller(config, RecordInfoClient(config), store, downloads, stop)
    results = {}

    def poll(task_id):
        try:
            results[task_id] = poller.run(task_id)
        except Exception as exc:        # thread boundary
            LOG.exception("fetch crashed task=%s", escape(task_id))
            results[task_id] = ("error", "internal error: %s" % type(exc).__name__)
        word, detail = results[task_id]
        print("%s %s: %s" % (task_id, word, detail), flush=True)
    threads = [threading.Thread(target=poll, args=(t,), name="poll-" + t)
               for t in dict.fromkeys(config.task_ids)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        downloads.stop(0)
        return 130
    downloads.stop(0)
    words = {word for word, _ in results.values()}
    return 1 if words & {"failed", "error"} else 3 if "pending" in words else 0


def run_status(config, env):
    store = TaskStore(config.dir)
    if not os.path.isdir(store.root):
        raise UsageError("--dir %s does not exist" % config.dir)
    if config.task_ids:
        record = store.read(config.task_ids[0])
        if record is None:
            print("no task %s in %s" % (config.task_ids[0], config.dir), file=sys.stderr)
            return 1
        print(json.dumps(record, indent=2))
        return 0
    print("%-34s %-8s %-7s %s" % ("TASK", "STATUS", "COVERS", "UPDATED"))
    for record in store.records():
        files = record.get("files") or []
        print("%-34s %-8s %-7s %s" % (record.get("taskId"), record.get("status"),
                                      "%d/%d" % (sum(1 for f in files if f), len(files)),
                                      record.get("updatedAt")))
    return 0


def main(argv=None, env=None):
    """Run the program; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ) if env is None else env
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.Formatter.converter = time.gmtime
    try:
        config = build_config(argv, env)
        return {"serve": run_serve, "fetch": run_fetch, "status": run_status}[config.command](
            config, env)
    except UsageError as exc:
        print("cover_receiver: error: %s" % exc, file=sys.stderr)
        return 2
    except SystemExit as exc:            # argparse --help / --version
        return exc.code or 0


if __name__ == "__main__":
    sys.exit(main())
