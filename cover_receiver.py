#!/usr/bin/env python3
"""cover_receiver: receive the music API's "cover images generated" callback
(sunoapi.org / kie.ai) and save the covers to disk, byte-exact, exactly once.

Usage:
    python3 cover_receiver.py [serve] [OPTIONS]           receive callbacks (default)
    python3 cover_receiver.py fetch TASKID... [OPTIONS]   poll the record-info API instead
    python3 cover_receiver.py retry [TASKID...] [OPTIONS] try failed images again now
    python3 cover_receiver.py retry --hook [TASKID...]    run failed hooks again now
        (both through the serve running on --dir, when there is one)
    python3 cover_receiver.py status [--dir D] [--all] [--json] [TASKID]
                                                          tasks not done and why, or one record
    python3 cover_receiver.py expect TASKID... [--parent MUSIC_TASK_ID]
                                                          record cover tasks to expect
    python3 cover_receiver.py generate MUSIC_TASK_ID... --callback-url URL
                                                          create cover tasks, and expect them
    python3 cover_receiver.py --version | --help | COMMAND --help

Give the API this callBackUrl:
    https://<your host>/suno-cover-callback              (add ?token=<token> if one is set)

Options: `cover_receiver.py [COMMAND] --help` lists each command's, with its
default (they live once, in OPTIONS); each is also read from
COVER_RECEIVER_<NAME> (--max-image-bytes -> COVER_RECEIVER_MAX_IMAGE_BYTES),
and the flag wins.

The route of a callback through the code:

    socket -> Front (one selectors loop: TLS handshake, the whole request read)
           -> CallbackHandler.dispatch (a handler thread: path, token, size, JSON)
           -> Receiver.handle_callback (signature, Callback.from_json)
           -> Pipeline.deliver -> accept (one sqlite3 commit, shared: then the 200)
           -> Scheduler (one due-time queue) -> Pipeline.image -> Fetcher (DownloadPolicy.vet)
           -> TaskFolder.write (fsync, rename, fsync), the row updated in one commit
           -> Pipeline.end: task.json, then HookRunner (--on-complete, at least once)

Every retry follows one rule: about 1 s, doubling up to --max-backoff, until
--retry-for after the task arrived (the URLs' lifetime); the schedule is kept
in the row. With an API key, serve asks record-info (Recovery) for an expected
task (expect, generate) that had no callback --recover-after seconds later,
and saves what it answers through the same Pipeline.deliver. Beside a running
serve, the other commands write their intent to the database; serve acts on it.

Secrets are never command-line values:
    COVER_RECEIVER_HMAC_KEY   kie.ai webhook signing key (or --hmac-key-file)
    COVER_RECEIVER_TOKEN      required ?token= on the callback URL (or --token-file)
    SUNO_API_KEY              API key for fetch, generate and serve's recovery
    (or, under systemd's LoadCredential=, files in $CREDENTIALS_DIRECTORY named
    token, hmac-key, api-key, tls-cert and tls-key)

Files: <dir>/cover_receiver.db (the records), <dir>/<taskId>/cover_1.png, ...
and task.json (the record, written when the task ends).
Exit status: 0 ok; 1 fetch/retry: a task did not end done (status: no such
task); 2 bad usage or cannot start; 3 fetch: a task is still generating when
--wait ran out.
"""

__version__ = "2.0.0"

import argparse
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import difflib
import email.utils
import errno
import hashlib
import hmac
import heapq
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pathlib
import random
import re
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse

WINDOWS = os.name == "nt"       # the places that ask; see the Platform section
LINUX = sys.platform.startswith("linux")
if WINDOWS:
    import msvcrt
else:
    import fcntl
    import pwd
    import resource

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
HOOK_TIMEOUT = 60.0
CHUNK = 256 * 1024
MAX_API_ANSWER = 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024  # a 1.x task.json is a few KB; anything larger is not ours
HOOK_OUTPUT_BYTES = 8192        # a hook's output kept for the log; the rest is read and counted
HOOK_OUTPUT_LINES = 20
HOOK_RUN_ENV = "COVER_HOOK_RUN"  # marks a hook's processes, also those that left its group
PROBE_CACHE_SECONDS = 1.0       # /healthz reuses a disk probe this recent
REQUEST_POLL = 0.2              # serve looks for work commands left in the database this often
DB_NAME = "cover_receiver.db"   # <dir>/cover_receiver.db (and its -wal, -shm): the records
LOCK_NAME = "cover_receiver.lock"   # <dir>/cover_receiver.lock: held by the owner of <dir>
BUSY_SECONDS = 10               # a connection waits this long for another's write to end
SCHEMA_VERSION = 1              # PRAGMA user_version
SCHEMA = (
    # One row per task: its record as JSON (the contract's field names), and the
    # columns the queries need. open: not finished (status lists it, start-up
    # resumes it); wake: a command changed it for serve; manifest: task.json due.
    "CREATE TABLE task (task_id TEXT PRIMARY KEY, status TEXT NOT NULL, hook TEXT, "
    "open INTEGER NOT NULL, wake INTEGER NOT NULL, manifest INTEGER NOT NULL, "
    "updated TEXT NOT NULL, record TEXT NOT NULL)",
    "CREATE INDEX task_open ON task (updated) WHERE open",     # O(tasks not finished)
    "CREATE INDEX task_wake ON task (task_id) WHERE wake",
    "CREATE TABLE note (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
LEGACY_ENTRIES = (".index", ".locks", ".tmp", ".requests")   # 1.4's, removed once imported
HEAD_LIMIT = 65536              # a request's line and header fields together
HEAD_END = re.compile(rb"\r?\n\r?\n")  # the empty line that ends a head (RFC 9112 2.1)
BUFFERED_BODIES = 64 * 1024 * 1024  # request bodies held at once (at least one --max-body-bytes)
LINGER_SECONDS = 2.0            # after an answer, unread request bytes are drained this long
HANDLER_THREADS = 16            # requests answered at once (each whole in memory)
DESCRIPTOR_RESERVE = 128        # descriptors kept from connections: downloads, files, hooks
# RFC 7239 4: the for= parameter of each Forwarded element (a token or a quoted string).
FORWARDED_FOR = re.compile(r'(?:^|[;,])\s*for\s*=\s*("[^"]*"|[^;,\s]*)', re.IGNORECASE)
PENDING, DONE, FAILED, CORRUPT = "pending", "done", "failed", "corrupt"
EXPECTED = "expected"           # recorded by expect/generate (or --confirm): no images yet
UNFINISHED = (EXPECTED, PENDING)    # not ended yet: retry leaves these to their schedule
API_GAP = 1.0                   # serve: seconds between two API requests (no burst, ever)
CONFIRM_GRACE = 300.0           # --confirm: how long record-info may lag a success callback
COVER_EXTS = ("png", "jpg", "webp", "gif")
PROBE_BYTES = 512               # /healthz writes and fsyncs this much: a full disk fails it
COVER_NAMES = frozenset("cover_%d.%s" % (n, ext) for n in range(1, 100) for ext in COVER_EXTS)
FILE_ENTRIES = COVER_NAMES | {None}      # what task.json's files list may hold
# A DNS name as a resolver can take it (RFC 1035 2.3.4: labels of at most 63,
# a name of at most 253 characters); "_" appears in real host names.
HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
RETRY_STATUSES = (408, 429)     # plus every 5xx
IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"),
               (b"GIF87a", "gif"), (b"GIF89a", "gif"))
CALLBACK_OUTCOMES = ("received", "duplicate", "bad_request", "unauthorized", "length_required",
                     "too_large", "unsupported_media_type", "unavailable")

# Special-purpose ranges refused as download targets, from the IANA IPv4 and
# IPv6 Special-Purpose Address Registries (RFC 6890) plus multicast, class E,
# IPv4-translated ::ffff:0:0:0/96 (RFC 2765), documentation 3fff::/20 (RFC 9637)
# and SRv6 SIDs 5f00::/16 (RFC 9602). Listed explicitly because
# ipaddress.is_global differs across Python versions and calls multicast "global".
BLOCKED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
    "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4",
    "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23",
    "2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10",
    "ff00::/8"))
NAT64_NETWORK = ipaddress.ip_network("64:ff9b::/96")
# IANA allocates only 2000::/3 as global unicast: the rest of the IPv6 space is
# refused as a whole, not listed (4000::1, fe00::1, ::1:0:0:1 are not public).
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
DIGITS = re.compile(r"[0-9]{1,18}")                    # ASCII only, unlike str.isdigit()
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")   # RFC 9110 5.1 token
HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9110 5.5: CTLs but HTAB

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


class HttpError(ReceiverError):
    """A request the handler refuses with status (its reason names the
    metrics' outcome)."""
    REASONS = {404: "not_found", 405: "method_not_allowed", 411: "length_required",
               413: "too_large", 415: "unsupported_media_type"}

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.reason = status, self.REASONS[status]


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


class TooSlow(ReceiverError, OSError):
    """A transfer fell under --min-rate or past its deadline. An OSError, so
    that the code reading a socket treats it as the I/O failure it is."""


class CorruptRecord(ReceiverError):
    """A 1.x task.json that is not what this program wrote: a link, not a
    regular file, too large, not JSON, or the wrong shape. Never fatal."""


class ApiError(ReceiverError):
    """The vendor API did not give a usable answer. kind says what it asks
    for: "passing" (try again later), "person" (a key, credits: someone must
    act), "unknown" (no such task) or "refused" (any other answer)."""

    def __init__(self, message, kind, retry_after=None, answer=None):
        super().__init__(message)
        self.kind, self.retry_after, self.answer = kind, retry_after, answer

    @property
    def retryable(self):
        return self.kind == "passing"


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
    try:
        text = str(value)
    except ValueError:                  # an int past sys.get_int_max_str_digits()
        text = "<a %d-bit number>" % value.bit_length()
    clipped = len(text) > limit
    text = text[:limit]
    if not (text.isascii() and text.isprintable()):
        text = text.encode("ascii", "backslashreplace").decode("ascii")
        text = CONTROL_CHARS.sub(lambda m: "\\x%02x" % ord(m.group()), text)
    return text + ("..." if clipped else "")


def log_event(event, task=None, level=logging.INFO, **fields):
    """One log line: `event task=ID key=value...`, each value escape()d and
    in double quotes when it holds a space (a quote in it is \\x22), so the
    line splits on spaces. LogFormat writes it as text or as JSON."""
    if not LOG.isEnabledFor(level):
        return
    parts = [event] + ([] if task is None else [("task", task)]) + list(fields.items())
    text = " ".join(part if isinstance(part, str) else "%s=%s" % (part[0], quote(part[1]))
                    for part in parts)
    # The record made here, not by LOG.log(), which looks up the caller's
    # file and line in the stack for every line: no format here prints them.
    record = LOG.makeRecord(LOG.name, level, "", 0, text, None, None)
    record.event, record.task, record.fields = event, task, fields
    LOG.handle(record)


def quote(value):
    text = escape(value)
    return text if text and " " not in text and '"' not in text else \
        '"%s"' % text.replace('"', "\\x22")


class LogFormat(logging.Formatter):
    """A log line as text (UTC time, level, message) or as one JSON object
    (--log-format json: ts, level, event, taskId, the event's fields). When
    stderr is the journal, each line starts with its syslog priority, "<4>"
    for a warning (sd-daemon(3)), so `journalctl -p warning` finds it."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def __init__(self, as_json=False, journal=False):
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self.converter = time.gmtime                # UTC, like task.json's times
        self.as_json, self.journal = as_json, journal

    def format(self, record):
        text = self.json_line(record) if self.as_json else super().format(record)
        if not self.journal:
            return text
        prefix = "<%d>" % self.PRIORITY.get(record.levelno, 6)
        return "\n".join(prefix + line for line in text.split("\n"))

    def json_line(self, record):
        event, fields = getattr(record, "event", None), getattr(record, "fields", None)
        if fields is None:          # a line not from log_event: a crash's, with its traceback
            event, _, message = record.getMessage().partition(" ")
            fields = {"message": message}
            if record.exc_info:
                fields["traceback"] = self.formatException(record.exc_info)
        line = {"ts": utc_now(record.created), "level": record.levelname, "event": event}
        if getattr(record, "task", None) is not None:
            line["taskId"] = escape(record.task)
        for key, value in fields.items():
            plain = type(value) is bool or type(value) in (int, float) and abs(value) < 2 ** 53
            line[key] = value if plain or value is None else escape(value, 4000)
        return json.dumps(line)


def stderr_is_journal(env):
    """systemd.exec(5): $JOURNAL_STREAM is "DEVICE:INODE" of the stream that
    goes to the journal; it is stderr's when they match."""
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return env.get("JOURNAL_STREAM") == "%d:%d" % (stat.st_dev, stat.st_ino)


def in_slices(wait, seconds, step=0.2):
    """Call wait(timeout) in slices of at most step seconds until it returns
    true or seconds have passed, and return what it last returned. The main
    thread waits this way: Python runs a signal's handler in the main thread
    only, and a stop signal the kernel gave another thread waits until the
    main thread runs Python code again (signal module docs), so a long wait
    there would hold the second Ctrl+C or SIGTERM back for all of it."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        done = wait(max(0.0, min(step, left)))
        if done or left <= step:
            return done


def joined(thread, timeout):
    thread.join(timeout)
    return not thread.is_alive()


def parse_utc(text):
    """The unix time of an ISO 8601 UTC string written by utc_now(), or None."""
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (AttributeError, TypeError, ValueError):
        return None


def parse_digits(text):
    """The one parser for numbers from the network (Content-Length, Retry-After,
    timestamps, systemd's variables): ASCII digits only, at most 18 of them,
    optional spaces or tabs around (RFC 9110 5.5 OWS). None when it is not one."""
    if text is None:
        return None
    text = text.strip(" \t")
    return int(text) if DIGITS.fullmatch(text) else None


def parse_retry_after(value, clock=time.time):
    """RFC 9110 10.2.3: delay-seconds or an HTTP-date; None when unusable."""
    if not value:
        return None
    seconds = parse_digits(value)
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
        return max(0.0, when.timestamp() - clock())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Clock:
    """The two clocks, as one seam. Wall time is for what is stored or signed
    (task.json times, the signature window); every wait and deadline inside
    the process runs on the monotonic clock, so a step of the wall clock
    (NTP, a VM resumed) neither stalls a retry nor ends one early."""

    @staticmethod
    def wall():
        return time.time()

    @staticmethod
    def mono():
        return time.monotonic()


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


def _seconds(minimum, maximum=86400 * 365):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number of seconds, not %r" % text) from None
        if not (minimum <= value <= maximum):
            raise ValueError("must be from %g to %g seconds, not %r" % (minimum, maximum, text))
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
        argv = shlex.split(text)       # POSIX rules everywhere: quote Windows paths in '...'
    except ValueError as exc:
        raise ValueError("cannot be split like a shell command: %s" % exc) from None
    if not argv:
        raise ValueError("must name a command")
    if shutil.which(argv[0]) is None:
        program = escape(argv[0])
        if os.path.basename(argv[0]) == argv[0]:
            raise ValueError("%s is not found on PATH: give its path" % program)
        if not os.path.exists(argv[0]):
            raise ValueError("%s does not exist" % program)
        raise ValueError("%s is not an executable program%s" % (program, "" if WINDOWS or
                         os.path.isdir(argv[0]) else " (chmod +x %s)" % shlex.quote(argv[0])))
    return tuple(argv)


def _api_base(text):
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL, not %r" % text)
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        raise ValueError("must be https (the API key travels with it); http only for localhost")
    return text.rstrip("/")


def _network(text):
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError("%s is not an address or CIDR network" % escape(text, 60)) from None


def _boolean(text):
    word = text.strip().lower()
    if word in ("1", "yes", "true", "on"):
        return True
    if word in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be yes or no (1/0, true/false, on/off), not %s" % escape(text, 20))


def _task_id(text):
    if not TASK_ID_RE.fullmatch(text):
        raise ValueError("must match %s" % TASK_ID_RE.pattern)
    return text


def _callback_url(text):
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be the http:// or https:// URL the API will POST the callback to")
    return text


def _log_format(text):
    if text not in ("text", "json"):
        raise ValueError("must be text or json, not %s" % escape(text, 40))
    return text


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
    defaults: tuple = ()        # (command, default) pairs where a command differs
    flag: bool = False          # takes no value on the command line (env: yes/no)
    credential: str = None      # its default file under systemd's $CREDENTIALS_DIRECTORY

    def default_for(self, command, env=None):
        """The default; for a file option, the systemd credential of its name
        when the unit loads one (systemd.exec(5), LoadCredential=)."""
        folder = (env or {}).get("CREDENTIALS_DIRECTORY")
        if self.credential and folder and os.path.isfile(os.path.join(folder, self.credential)):
            return os.path.join(folder, self.credential)
        return dict(self.defaults).get(command, self.default)


DOWNLOAD = ("serve", "fetch", "retry")
COMMANDS = ("serve", "fetch", "retry", "status", "expect", "generate")
API = ("serve", "fetch", "generate")
OPTIONS = (
    Option("host", "0.0.0.0", _text, "listen address (IPv6 literal allowed)", metavar="HOST"),
    Option("port", "3000", _int_range(0, 65535), "listen port (0: any free port)",
           metavar="PORT"),
    Option("path", "/suno-cover-callback", _callback_path, "the callback path", metavar="PATH"),
    Option("dir", "./covers", _folder, "where tasks and covers live (serve, fetch, expect and "
           "generate create it)", ("serve", "fetch", "retry", "status", "expect", "generate"),
           metavar="DIR"),
    Option("workers", "4", _int_range(1, 64), "downloads running at once", DOWNLOAD),
    Option("attempts", "0", _int_range(0, 100000), "tries per image before it fails for good "
           "(0: no limit but --retry-for)", DOWNLOAD),
    Option("retry-for", "1209600", _seconds(0), "keep trying an image this long after its "
           "task was received (image URLs live 14 days)", DOWNLOAD, metavar="SECONDS"),
    Option("max-backoff", "600", _seconds(0.01, 86400), "longest wait between tries of one "
           "image or API poll (the wait doubles from 1 s up to this)", DOWNLOAD,
           metavar="SECONDS"),
    Option("timeout", "30", _seconds(0.1, 3600), "seconds for one network step (connect, each read)",
           DOWNLOAD + ("generate",), metavar="SECONDS"),
    Option("min-rate", "1024", _int_range(0), "bytes/s: a download (or an API answer) "
           "averaging less over any --timeout window is cut and tried again later (0: off)",
           DOWNLOAD + ("generate",)),
    Option("max-image-bytes", "26214400", _int_range(1), "larger images are refused", DOWNLOAD),
    Option("max-body-bytes", "1048576", _int_range(1), "larger callbacks get 413"),
    Option("allow-host", None, _host_pattern,
           "download only from HOST (name, or *.domain for subdomains); repeatable; "
           "turns off the public-address check", DOWNLOAD, repeat=True, metavar="HOST"),
    Option("user-agent", DEFAULT_USER_AGENT, _text, "User-Agent sent to image hosts and the API",
           DOWNLOAD + ("generate",), metavar="UA"),
    Option("hmac-key-file", None, _readable_file, "file holding the kie.ai signing key (or "
           "env COVER_RECEIVER_HMAC_KEY)", metavar="FILE", credential="hmac-key"),
    Option("token-file", None, _readable_file, "file holding the ?token= secret (or env "
           "COVER_RECEIVER_TOKEN)", metavar="FILE", credential="token"),
    Option("tls-cert", None, _readable_file, "certificate chain (PEM) to serve HTTPS",
           metavar="FILE", credential="tls-cert"),
    Option("tls-key", None, _readable_file, "private key (PEM) to serve HTTPS", metavar="FILE",
           credential="tls-key"),
    Option("on-complete", None, _command,
           "command run when a task ends; its folder is appended as last argument",
           ("serve", "retry"), metavar="CMD"),
    Option("hook-retry-for", "86400", _seconds(0), "keep running a failing hook this long "
           "after its task ended", ("serve", "retry"), metavar="SECONDS"),
    Option("drain-seconds", "10", _seconds(0), "on SIGTERM, time running downloads may finish",
           metavar="SECONDS"),
    Option("max-connections", "1000", _int_range(1, 100000), "connections held at once, "
           "bounded by the descriptor limit; at the cap the client holding the most gives up "
           "its oldest whose request is not whole"),
    Option("request-timeout", "10", _seconds(0.1, 3600), "seconds from a connection's first "
           "byte (or its accept) to its whole request; then 408", metavar="SECONDS"),
    Option("trusted-proxy", None, _network, "a reverse proxy (address or CIDR) whose "
           "X-Forwarded-For or Forwarded names the client; repeatable", repeat=True,
           metavar="ADDR"),
    Option("api-base", "https://api.sunoapi.org", _api_base,
           "the vendor API (kie.ai: https://api.kie.ai); serve uses it only with an API key",
           API, metavar="URL"),
    Option("api-key-file", None, _readable_file, "file holding the API key (or env "
           "SUNO_API_KEY); turns on serve's recovery of expected tasks", API, metavar="FILE",
           credential="api-key"),
    Option("recover-after", "600", _seconds(0), "seconds after a task became expected, with "
           "no callback, before serve asks record-info", metavar="SECONDS"),
    Option("interval", "30", _seconds(0.01), "seconds between record-info polls of a task "
           "still generating", ("serve", "fetch"), metavar="SECONDS"),
    Option("confirm", "no", _boolean, "with an API key: take a success callback's images "
           "from record-info, never from its body", flag=True, metavar="YES|NO"),
    Option("log-format", "text", _log_format, "log lines as text, or as one JSON object "
           "each (ts, level, event, taskId, fields)", COMMANDS, metavar="text|json"),
    Option("parent", None, _task_id, "the music taskId the cover tasks belong to",
           ("expect",), metavar="MUSIC_TASK_ID"),
    Option("callback-url", None, _callback_url, "the callBackUrl the API is given (this "
           "receiver's URL, with ?token=... when one is set)", ("generate",), metavar="URL"),
    Option("wait", "600", _seconds(0), "fetch: give up on a still-generating task after "
           "this; retry: wait this long for each task to end", ("fetch", "retry"),
           metavar="SECONDS", defaults=(("retry", "60"),)),
)


def config_field(opt):
    """Config's field for an option: its name with - as _, and a --*-file
    option's field holding the secret read from it (--token-file: token)."""
    name = opt.name.replace("-", "_")
    return name[:-len("_file")] if name.endswith("_file") else name


# Everything the program needs, parsed and validated once by build_config(): a
# field per option of OPTIONS (None where the command does not take it), the
# commands' own arguments and flags, and seams the tests turn down so they need
# no sleeps. Its repr keeps secrets out of any accidental print.
Config = dataclasses.make_dataclass("Config", [
    (config_field(opt), object, dataclasses.field(default=() if opt.repeat else None))
    for opt in OPTIONS] + [
    ("command", str, "serve"), ("task_ids", tuple, ()), ("hook", bool, False),
    ("all", bool, False), ("json", bool, False), ("api_gap", float, API_GAP),
    ("backoff_base", float, 1.0), ("hook_timeout", float, HOOK_TIMEOUT)],
    frozen=True, namespace={"__repr__": lambda self: "Config(command=%r, dir=%r, port=%r)" % (
        self.command, self.dir, self.port)})


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


COMMAND_HELP = {
    "serve": "Receive callbacks at --path on --host:--port and save their covers in\n"
             "--dir (the default command). Exit 0 after a stop signal (SIGTERM,\n"
             "SIGINT: it drains first; a second one exits at once), 2 when it\n"
             "cannot start (one line says why).",
    "fetch": "Poll the record-info API for each TASKID and download its covers as\n"
             "a callback would. Exit 0 all done, 1 any failed, 2 usage, 3 any\n"
             "still generating after --wait.",
    "retry": "Try the failed images of each TASKID (every failed task when none is\n"
             "named) again now; with --hook, run their failed hooks again instead.\n"
             "A serve running on --dir does the work with its own settings and\n"
             "user; with none, retry does it here. Waits up to --wait for each\n"
             "task. Exit 0 when every task (or hook) ends done, 1 when one does\n"
             "not, 2 usage.",
    "status": "List the tasks in --dir with why each failed or when it is tried\n"
              "again, or print one task's record as JSON. Exit 0; 1 no such\n"
              "TASKID; 2 usage.",
    "expect": "Record each cover TASKID created elsewhere as expected, so that a\n"
              "callback that never comes is noticed (and, with an API key, serve\n"
              "recovers it from record-info). A known task is left as it is.\n"
              "Exit 0; 2 usage.",
    "generate": "Create the cover task of each MUSIC_TASK_ID at the API with\n"
                "--callback-url, record it as expected, and print 'MUSIC_TASK_ID\n"
                "COVER_TASK_ID' per line. Exit 0 when every music task has a cover\n"
                "task, 1 when the API refused one, 2 usage."}
# The secrets each command reads (never from argv: ps shows argv).
COMMAND_SECRETS = {
    "serve": "COVER_RECEIVER_HMAC_KEY (kie.ai signature), COVER_RECEIVER_TOKEN (?token=),\n"
             "SUNO_API_KEY (recovery of expected tasks); each optional",
    "fetch": "SUNO_API_KEY (required)", "generate": "SUNO_API_KEY (required)"}
TASK_ID_HELP = ("a cover task's taskId, as the API gives it (a letter or digit, then up to "
                "127 letters, digits, - or _)")
# Each command's own arguments, beside the options in OPTIONS.
COMMAND_ARGUMENTS = {
    "fetch": (("task_ids", dict(nargs="+", metavar="TASKID", help=TASK_ID_HELP)),),
    "expect": (("task_ids", dict(nargs="+", metavar="TASKID", help=TASK_ID_HELP)),),
    "generate": (("task_ids", dict(nargs="+", metavar="MUSIC_TASK_ID",
                                   help="the music task whose cover is made")),),
    "status": (("task_ids", dict(nargs="?", metavar="TASKID", help=TASK_ID_HELP)),
               ("--all", dict(action="store_true", help="list every task, done ones too")),
               ("--json", dict(action="store_true",
                               help="one JSON object per task per line, for scripts"))),
    "retry": (("task_ids", dict(nargs="*", metavar="TASKID", help=TASK_ID_HELP)),
              ("--hook", dict(action="store_true",
                              help="run the failed hooks of these tasks again now, not "
                                   "their images"))),
}


def build_parser():
    overview = __doc__.split("Options:")[0].strip()
    parser = ArgumentParser(prog="cover_receiver.py", allow_abbrev=False, description=overview,
                            epilog="`cover_receiver.py COMMAND --help` gives a command's "
                                   "options and the secrets it reads.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="cover_receiver " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="{%s}" % ",".join(COMMANDS))
    for command in COMMANDS:
        text = COMMAND_HELP[command]
        epilog = ("Each option also reads COVER_RECEIVER_<NAME> (--max-image-bytes -> "
                  "COVER_RECEIVER_MAX_IMAGE_BYTES); the flag wins.\nSecrets, from the "
                  "environment or files only: %s." % COMMAND_SECRETS.get(command, "none"))
        sub = commands.add_parser(command, help=" ".join(text.split()).split(". ")[0],
                                  description=text,
                                  epilog=epilog, allow_abbrev=False,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        for name, settings in COMMAND_ARGUMENTS.get(command, ()):
            sub.add_argument(name, **settings)
        for opt in OPTIONS:
            if command in opt.commands:
                add_option(sub, opt, opt.default_for(command))
    return parser


def add_option(parser, opt, default):
    """--name for one of OPTIONS, its default shown in the help."""
    text = opt.help + ("" if default is None else " (default: %s)" % default)
    if opt.credential:
        text += " (default: $CREDENTIALS_DIRECTORY/%s, when it exists)" % opt.credential
    if opt.repeat:
        text += " (env: comma-separated)"
    if opt.flag:
        parser.add_argument("--" + opt.name, action="store_const", const="yes", help=text)
    else:
        parser.add_argument("--" + opt.name, action="append" if opt.repeat else "store",
                            help=text, metavar=opt.metavar)


def warn_unknown_variables(env):
    """One WARNING per COVER_RECEIVER_* variable that names no option (a
    misspelt one would silently leave its option at the default)."""
    known = {ENV_PREFIX + opt.name.replace("-", "_").upper() for opt in OPTIONS}
    known |= {ENV_PREFIX + "HMAC_KEY", ENV_PREFIX + "TOKEN"}
    for name in sorted(set(env) - known):
        if name.startswith(ENV_PREFIX):
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            log_event("unknown-variable", level=logging.WARNING, name=name,
                      note="names no option; ignored" + (
                          "; did you mean %s?" % close[0] if close else ""))


def _read_secret(path, env, env_name, option):
    """A secret from a file (one trailing newline stripped) or from env_name;
    None when neither is given. Set but empty is an error: it would silently
    turn protection off."""
    if not path:
        if env_name not in env:
            return None
        if not env[env_name]:
            raise UsageError("%s is set but empty: give it the secret or unset it" % env_name)
        return env[env_name].encode()
    with open(path, "rb") as handle:
        value = handle.read()
    for ending in (b"\r\n", b"\n"):
        if value.endswith(ending):
            value = value[:-len(ending)]
            break
    if not value:
        raise UsageError("%s %s: the file is empty" % (option, path))
    return value


def build_config(argv, env):
    """Parse argv + env into a Config, or raise UsageError naming the option."""
    argv = list(argv)
    if not argv or argv[0] not in COMMANDS + ("--version", "--help", "-h"):
        if argv and not argv[0].startswith("-"):
            raise UsageError("unknown command %s: the commands are %s"
                             % (escape(argv[0], 40), ", ".join(COMMANDS)))
        argv.insert(0, "serve")          # serve is the default subcommand
    args = build_parser().parse_args(argv)
    values = dict(option_values(args, env), command=args.command)
    for name, _ in COMMAND_ARGUMENTS.get(args.command, ()):
        if name.startswith("--"):                   # the command's own flags: --all, --hook
            values[name[2:]] = getattr(args, name[2:])
    for extra in COMMAND_EXTRAS.get(args.command, ()):
        extra(args, values, env)
    return Config(**values)


def option_values(args, env):
    """Each option of the command from its flag, else COVER_RECEIVER_<NAME>,
    else its default, parsed."""
    values = {}
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
            raw = opt.default_for(args.command, env)
        if raw is None:
            continue
        try:
            values[dest] = (tuple(opt.parse(item) for item in raw if item.strip())
                            if opt.repeat else opt.parse(raw))
        except ValueError as exc:
            raise UsageError("%s: %s" % (origin, exc)) from None
    return values


def _serve_secrets(args, values, env):
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        raise UsageError("--tls-cert and --tls-key go together")
    values["hmac_key"] = _read_secret(values.pop("hmac_key_file", None), env,
                                      ENV_PREFIX + "HMAC_KEY", "--hmac-key-file")
    token = _read_secret(values.pop("token_file", None), env, ENV_PREFIX + "TOKEN",
                         "--token-file")
    values["token"] = token.decode("utf-8", "replace") if token else None


def _api_key(args, values, env):
    key = _read_secret(values.pop("api_key_file", None), env, "SUNO_API_KEY", "--api-key-file")
    values["api_key"] = key.decode("utf-8", "replace").strip() if key else None
    if not values["api_key"] and args.command in ("fetch", "generate"):
        raise UsageError("SUNO_API_KEY is not set: %s needs the API key in it (or "
                         "--api-key-file)" % args.command)
    if values.get("confirm") and not values["api_key"]:
        raise UsageError("--confirm needs the API key: set SUNO_API_KEY or --api-key-file")


def _task_ids(args, values, env):
    ids = args.task_ids if isinstance(args.task_ids, list) else [args.task_ids]
    for task_id in ids:
        if task_id is not None and not TASK_ID_RE.fullmatch(task_id):
            raise UsageError("TASKID %s: must match %s" % (escape(task_id), TASK_ID_RE.pattern))
    values["task_ids"] = tuple(t for t in ids if t is not None)


def _needs_callback_url(args, values, env):
    if not values.get("callback_url"):
        raise UsageError("generate needs --callback-url URL: where the API posts the callback")


COMMAND_EXTRAS = {"serve": (_serve_secrets, _api_key), "fetch": (_api_key, _task_ids),
                  "retry": (_task_ids,), "status": (_task_ids,),
                  "expect": (_task_ids,),
                  "generate": (_api_key, _task_ids, _needs_callback_url)}


# ---------------------------------------------------------------------------
# Callback validation and proof of origin (pure functions)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Callback:
    task_id: str
    code: int
    msg: str
    images: tuple
    source: str = "callback"        # or "record-info": where the image list came from

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
        task_id = callback_task_id(obj)
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


def callback_task_id(obj):
    """data.taskId, or data.task_id as kie.ai's verification sample reads it."""
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, dict):
        return None
    return data["taskId"] if "taskId" in data else data.get("task_id")


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
    if not host_can_resolve(parts.hostname):
        return "has a host that is neither an IP address nor a DNS name"
    return None


def host_can_resolve(host):
    """True for an IP literal or a syntactically valid DNS name; a name no
    resolver can take (a label over 63 characters, %-escapes) is refused for
    good, not retried as a DNS failure for 14 days."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host.split("%")[0] if ":" in host else host)
        return True
    name = host[:-1] if host.endswith(".") else host
    return len(name) <= 253 and all(HOST_LABEL.fullmatch(label) for label in name.split("."))


def webhook_signature(key, task_id, timestamp):
    """kie.ai: base64(HMAC-SHA256(key, taskId + "." + timestamp))."""
    message = ("%s.%s" % (task_id, timestamp)).encode("utf-8")
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode("ascii")


def verify_signature(key, task_id, timestamp, signature, now):
    """Raise Unauthorized unless the kie.ai headers prove the sender knows key."""
    if not timestamp or not signature:
        raise Unauthorized("missing X-Webhook-Timestamp or X-Webhook-Signature")
    seconds = parse_digits(timestamp)
    if seconds is None:
        raise Unauthorized("X-Webhook-Timestamp must be unix seconds")
    if abs(now - seconds) > SIGNATURE_WINDOW:
        raise Unauthorized("X-Webhook-Timestamp is more than %d s from now" % SIGNATURE_WINDOW)
    try:
        given = base64.b64decode(signature.strip(), validate=True)
    except ValueError:
        raise Unauthorized("X-Webhook-Signature is not base64") from None
    if not isinstance(task_id, str):
        raise Unauthorized("no data.taskId to verify the signature against")
    expected = base64.b64decode(webhook_signature(key, task_id, timestamp.strip(" \t")))
    if not hmac.compare_digest(expected, given):
        raise Unauthorized("signature does not match")


def verify_token(token, query):
    given = urllib.parse.parse_qs(query, keep_blank_values=True).get("token", [])
    if len(given) != 1 or not hmac.compare_digest(given[0].encode(), token.encode()):
        raise Unauthorized("missing or wrong ?token=")


# ---------------------------------------------------------------------------
# Platform: every step that differs between POSIX and Windows
# ---------------------------------------------------------------------------

class Platform:
    """The few OS differences, in one place; the rest of the module never asks."""

    STOP_SIGNALS = ((signal.SIGINT, signal.SIGBREAK) if WINDOWS     # Ctrl+C, Ctrl+Break
                    else (signal.SIGTERM, signal.SIGINT))
    RELOAD_SIGNAL = getattr(signal, "SIGHUP", None)     # systemctl reload; none on Windows
    # A lock held elsewhere: EAGAIN from flock, EACCES or EDEADLOCK from
    # msvcrt.locking on Windows, and errno 0 from it under Wine.
    BUSY_ERRNOS = (errno.EACCES, errno.EAGAIN, errno.EDEADLK) + ((0,) if WINDOWS else ())
    # Never follow a link at the last step of a path inside <dir>; ELOOP is what
    # O_NOFOLLOW gives on Linux and macOS, EMLINK on FreeBSD. Windows has no
    # O_NOFOLLOW (links there need a privilege: README) and wants O_BINARY.
    NO_LINK = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    # No open waits on a FIFO planted where a file should be (a FIFO opened to
    # write with no reader fails with ENXIO instead of blocking).
    NO_WAIT = getattr(os, "O_NONBLOCK", 0)
    READ_FLAGS = os.O_RDONLY | NO_LINK | NO_WAIT
    # What an open meets where something else was planted: a link (ELOOP, or
    # EMLINK on FreeBSD), a folder, a FIFO or socket, or a stale file (O_EXCL).
    PLANTED_ERRNOS = (errno.ELOOP, errno.EMLINK, errno.EISDIR, errno.ENXIO, errno.EEXIST)

    @classmethod
    def lock(cls, fd, wait):
        """Lock fd's file exclusively; False if it is held and wait is False.
        flock and msvcrt.locking locks belong to one open file, so two threads
        exclude each other as two processes do, and die with their process."""
        while True:
            try:
                if WINDOWS:
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                else:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                return True
            except OSError as exc:
                if exc.errno not in cls.BUSY_ERRNOS:
                    raise
            if not wait:
                return False
            time.sleep(0.005)           # Windows only: LK_LOCK would give up after 10 s

    @staticmethod
    def unlock(fd):
        """Release a lock file (closing it is enough but on Windows, which
        wants the region unlocked first)."""
        if WINDOWS:
            with contextlib.suppress(OSError):
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.close(fd)

    @staticmethod
    def fsync_dir(path):
        """Make renames and new names in path durable. Windows has no directory
        fsync: there the file's fsync plus the rename is all there is (README)."""
        if WINDOWS:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def retry_sharing(action, *args):
        """action(*args). On Windows a file that another process holds open, or
        that is being replaced or deleted, refuses opens and replaces for a
        moment (PermissionError): try again briefly before giving up."""
        for _ in range(400 if WINDOWS else 0):
            try:
                return action(*args)
            except PermissionError:
                time.sleep(0.005)
        return action(*args)

    @staticmethod
    def become_owner(path):
        """A command run as root that does the work on a <dir> another user
        owns goes on as that user, so every file it makes (covers, the
        database's -wal and -shm) is theirs to open. False when that user
        cannot reach <dir> (a DynamicUser= state directory, under a root-only
        /var/lib/private): only the service can work there."""
        if WINDOWS or os.geteuid() != 0:
            return True
        info = os.stat(path)
        if info.st_uid == 0:
            return True
        if not reachable(path, info.st_uid, info.st_gid):
            return False
        os.setgroups([])
        os.setgid(info.st_gid)
        os.setuid(info.st_uid)
        log_event("running-as", uid=info.st_uid, gid=info.st_gid, note="the owner of --dir")
        return True

    @staticmethod
    def give_to_owner(fd, folder):
        """root made a file in a folder another user owns: make it theirs."""
        if not WINDOWS and os.geteuid() == 0:
            info = os.stat(folder)
            if info.st_uid != 0 and os.fstat(fd).st_uid == 0:
                os.fchown(fd, info.st_uid, info.st_gid)

    @staticmethod
    def socket_budget():
        """How many connections one selector may hold. POSIX: the soft
        descriptor limit, raised to the hard one first (a flood of idle
        connections must find descriptors), less DESCRIPTOR_RESERVE. Windows:
        select() takes at most 512 sockets (FD_SETSIZE)."""
        if WINDOWS:
            return 500
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        for want in (hard, 10240):      # macOS refuses an unlimited soft limit
            if soft != resource.RLIM_INFINITY and (soft < want or want == hard):
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                    soft = want
                    break
                except (OSError, ValueError):
                    continue
        return max(1, min(soft, 1 << 20) - DESCRIPTOR_RESERVE)

    @staticmethod
    def interrupt(sock):
        """Wake a thread blocked on sock. Windows needs the socket closed too."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
            if WINDOWS:
                sock.close()

    @staticmethod
    def new_process_group():
        """Popen arguments that let kill_group() end a hook and its children."""
        if WINDOWS:
            return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        return {"start_new_session": True}

    @staticmethod
    def kill_group(process):
        with contextlib.suppress(OSError):
            if WINDOWS:
                process.kill()              # TerminateProcess: no POSIX process groups
            else:
                os.killpg(process.pid, signal.SIGKILL)

    @staticmethod
    def kill_marked(marker):
        """Linux: kill every process whose environment holds marker (NAME=VALUE
        or a prefix of it): a hook's descendants, also those that left its
        process group with setsid. Elsewhere there is no portable way (README)."""
        if not LINUX:
            return
        needle = b"\0" + marker.encode()
        for _ in range(10):         # again while a pass finds one: it may have forked meanwhile
            killed = False
            for pid in filter(str.isdigit, os.listdir("/proc")):
                with contextlib.suppress(OSError, ValueError):
                    with open("/proc/%s/environ" % pid, "rb") as handle:
                        if needle in b"\0" + handle.read():
                            os.kill(int(pid), signal.SIGKILL)
                            killed = True
            if not killed:
                return

    @classmethod
    def open_here(cls, path, flags, mode=0o644):
        """os.open for a regular file of the store's own. Whatever else stands
        at path (a link, never followed; a folder, a FIFO; a stale file where
        flags say O_EXCL) is removed, and the open tried once more."""
        for last in (False, True):
            try:
                fd = cls.retry_sharing(os.open, path, flags | cls.NO_LINK | cls.NO_WAIT, mode)
            except OSError as exc:
                if last or exc.errno not in cls.PLANTED_ERRNOS:
                    raise
                remove_entry(path)
                continue
            if flags & os.O_EXCL or stat.S_ISREG(os.fstat(fd).st_mode):
                return fd               # O_CREAT|O_EXCL made a new regular file
            os.close(fd)                # a FIFO that had a reader, a device
            if last:
                raise OSError(errno.EEXIST, "not a regular file", path)
            remove_entry(path)


def reachable(path, uid, gid):
    """Whether uid (in gid) may search every folder above path."""
    parent = os.path.dirname(os.path.realpath(path))
    while True:
        info = os.stat(parent)
        mode = info.st_mode
        if not (mode & stat.S_IXOTH or (info.st_uid == uid and mode & stat.S_IXUSR)
                or (info.st_gid == gid and mode & stat.S_IXGRP)):
            return False
        if parent == os.path.dirname(parent):
            return True
        parent = os.path.dirname(parent)


def remove_entry(path):
    """Remove what is at path: a file, a link (never what it points to) or a
    folder with its content (shutil.rmtree follows no link)."""
    try:
        os.unlink(path)
    except (IsADirectoryError, PermissionError):    # a folder: EISDIR, or EPERM on macOS
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise
        shutil.rmtree(path)


def read_regular_file(path, limit):
    """The bytes of path, which must be a regular file of at most limit bytes
    (no link followed, no FIFO waited on). FileNotFoundError when absent,
    CorruptRecord saying why when it is there but not that."""
    try:
        fd = Platform.retry_sharing(os.open, path, Platform.READ_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(path) from None
    except OSError as exc:
        raise unreadable(path, "cannot be opened: " + os_reason(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise unreadable(path, "is not a regular file")
        if info.st_size > limit:
            raise unreadable(path, "is larger than %d bytes" % limit)
        # Read what fstat says is there (plus one byte, to see it grew past
        # limit): a read of limit bytes would allocate a 1 MiB buffer each time.
        data = os.read(fd, info.st_size + 1)
        if info.st_size < len(data) <= limit:       # it grew since: read up to the bound
            data += os.read(fd, limit + 1 - len(data))
        if len(data) > limit:
            raise unreadable(path, "is larger than %d bytes" % limit)
    except OSError as exc:
        raise unreadable(path, "cannot be read: " + os_reason(exc)) from None
    finally:
        os.close(fd)
    return data


def unreadable(path, why):
    """The CorruptRecord for the file at path (named by its last part)."""
    return CorruptRecord("%s %s" % (os.path.basename(path), why))


def os_reason(exc):
    """An OSError as a short line: 'Permission denied (EACCES)'."""
    code = errno.errorcode.get(exc.errno)
    text = exc.strerror or str(exc)
    return "%s (%s)" % (text, code) if code else text


# ---------------------------------------------------------------------------
# Store: one sqlite3 database in <dir>, the owner lock, the task folders
# ---------------------------------------------------------------------------

def task_row(record, wake=False, manifest=None):
    """The task table's row (Store.COLUMNS) for a record."""
    hook = hook_state(record)
    return (record["taskId"], record["status"], hook, is_open(record["status"], hook, manifest),
            int(wake), manifest, record.get("updatedAt") or "", json.dumps(record))


def is_open(status, hook, manifest):
    """A task is open (in the index that start-up, status and /healthz read)
    until it is done with its hook run and its task.json written."""
    return status != DONE or hook in (PENDING, FAILED) or bool(manifest)


class Store:
    """The records: one row per task in <dir>/cover_receiver.db, and the only
    code that writes SQL. The database is in WAL mode with synchronous=FULL:
    a commit that returned is on disk. write() runs a change in a
    transaction that it shares with the changes other threads queued
    meanwhile (group commit: one fsync for many callbacks); each thread
    reads through a connection of its own."""

    COLUMNS = "task_id, status, hook, open, wake, manifest, updated, record"

    def __init__(self, root, check=False):
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, DB_NAME)
        self.damaged = None             # the note left when a damaged database was set aside
        self._queue, self._leading = [], False
        self._queued = threading.Condition()
        self._readers, self._local = [], threading.local()     # a read connection per thread
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
            set_aside_planted(os.path.join(self.root, name))
        self.fresh = not os.path.exists(self.path)     # made now (or anew): 1.x import due
        try:
            self._open(check)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise
            self._replace_damaged(exc)
            self.fresh = True
        self.damaged = self._note("damaged")

    def _connect(self, target):
        conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_SECONDS, uri=target.startswith("file:"))
        conn.execute("PRAGMA busy_timeout = %d" % (BUSY_SECONDS * 1000))
        return conn

    def _open(self, check=False):
        """Open (or create) the database, check it (serve's start: O(its
        size), PRAGMA quick_check), bring its schema to SCHEMA_VERSION. A
        damaged file raises sqlite3.DatabaseError."""
        self._writer = self._connect(self.path)
        self._writer.execute("PRAGMA journal_mode = WAL")
        self._writer.execute("PRAGMA synchronous = FULL")
        found = self._writer.execute("PRAGMA quick_check").fetchone()[0] if check else "ok"
        if found != "ok":
            raise sqlite3.DatabaseError("quick_check: %s" % found)
        version = self._writer.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UsageError("%s was written by a newer cover_receiver (schema %d)"
                             % (self.path, version))
        if version == 0:
            self._writer.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                self._writer.execute(statement)
            self._writer.execute("PRAGMA user_version = %d" % SCHEMA_VERSION)
            self._writer.execute("COMMIT")
        self._inode = os.stat(self.path).st_ino

    def _replace_damaged(self, exc):
        """Set a damaged database aside (kept, with its -wal), start a fresh
        one, and copy into it every row that can still be read."""
        self.close()
        self._readers, self._local = [], threading.local()
        kept = "%s.damaged-%d" % (DB_NAME, time.time_ns())
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path + suffix, os.path.join(self.root, kept + suffix))
        self._open()
        rows = list(readable_rows(os.path.join(self.root, kept)))
        note = "%s was damaged (%s) and is kept as %s; %d rows were read back" % (
            DB_NAME, escape(exc, 80), kept, len(rows))
        self.write(lambda: (self._insert_rows(rows), self._set_note("damaged", note)))
        log_event("database-damaged", level=logging.ERROR, reason=exc, kept=kept,
                  rows=len(rows), note="a fresh database took its place")

    # -- writing -----------------------------------------------------------------

    def write(self, change):
        """change() inside a transaction, returned once it has committed. The
        first caller to find no transaction running commits every change
        queued by then (its own included); the others wait for it."""
        entry = {"change": change}
        with self._queued:
            self._queue.append(entry)
            while "done" not in entry:
                if self._leading:
                    self._queued.wait()
                    continue
                self._leading, batch, self._queue = True, self._queue, []
                self._queued.release()
                try:
                    self._commit(batch)
                finally:
                    self._queued.acquire()
                    self._leading = False
                    for done in batch:
                        done["done"] = True
                    self._queued.notify_all()
        if "error" in entry:
            raise entry["error"]
        return entry.get("result")

    def _commit(self, batch):
        conn = self._writer
        try:
            self.check_file()
            conn.execute("BEGIN IMMEDIATE")
            for entry in batch:
                conn.execute("SAVEPOINT change")
                try:
                    entry["result"] = entry["change"]()
                except Exception as exc:        # this change only: the others go on
                    entry["error"] = exc
                    conn.execute("ROLLBACK TO change")
                conn.execute("RELEASE change")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:            # a full disk, EIO, a read-only <dir>
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for entry in batch:
                entry["error"] = exc

    def check_file(self):
        """The database is still the file in <dir> (one removed or replaced
        under a running serve would take every later commit with it), and
        <dir> takes writes (a descriptor opened before a read-only remount
        would not say so)."""
        try:
            same = os.stat(self.path).st_ino == self._inode
        except OSError:
            same = False
        if not same:
            raise sqlite3.OperationalError("%s is gone from %s (removed or replaced)"
                                           % (DB_NAME, self.root))
        if not os.access(self.root, os.W_OK):
            raise sqlite3.OperationalError("%s is read-only" % self.root)

    def get(self, task_id):
        """The task's record as this transaction sees it (inside write())."""
        row = self._writer.execute("SELECT record FROM task WHERE task_id = ?",
                                   (task_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, record, wake=False, manifest=None):
        """Store a record (inside write()). wake: a command asks serve to
        schedule the task; manifest: True when the task just ended (its
        task.json is due), False once written, None to leave as it is."""
        record["updatedAt"] = utc_now()
        self._writer.execute(
            "INSERT INTO task (%s) VALUES (?, ?, ?, ?, ?, coalesce(?, 0), ?, ?) "
            "ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, hook = "
            "excluded.hook, open = excluded.open OR coalesce(?, manifest), wake = "
            "max(wake, excluded.wake), manifest = coalesce(?, manifest), updated = "
            "excluded.updated, record = excluded.record" % self.COLUMNS,
            task_row(record, wake, manifest) + (manifest, manifest))

    def _insert_rows(self, rows):
        self._writer.executemany("INSERT OR IGNORE INTO task (%s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                                 % self.COLUMNS, rows)

    def change(self, task_id, edit, **put):
        """write() of edit(record) -> the record to store, or None to leave it."""
        def run():
            record = edit(self.get(task_id))
            if record is not None:
                self.put(record, **put)
            return record
        return self.write(run)

    def manifest_written(self, record):
        """The record's task.json is written (inside write()); the record is as it was."""
        self._writer.execute("UPDATE task SET manifest = 0, open = ? WHERE task_id = ?", (
            is_open(record["status"], hook_state(record), False), record["taskId"]))

    def take_wakes(self):
        """The tasks commands changed, with their manifest flags, marked taken."""
        def run():
            rows = self._writer.execute(
                "SELECT record, manifest FROM task WHERE wake").fetchall()
            self._writer.execute("UPDATE task SET wake = 0 WHERE wake")
            return [(json.loads(record), manifest) for record, manifest in rows]
        return self.write(run)

    def _set_note(self, key, value):
        self._writer.execute("INSERT OR REPLACE INTO note VALUES (?, ?)", (key, value))

    # -- reading -----------------------------------------------------------------

    def _reader(self):
        """This thread's read connection: in WAL mode readers never wait for
        the writer or for each other."""
        conn = getattr(self._local, "conn", None)
        if conn is None:        # mode=rw: a database removed meanwhile is not made anew
            conn = self._local.conn = self._connect(db_uri(self.path, "rw"))
            self._readers.append(conn)
        return conn

    def _read(self, sql, args=()):
        return self._reader().execute(sql, args).fetchall()

    def read(self, task_id):
        rows = self._read("SELECT record FROM task WHERE task_id = ?", (task_id,))
        return json.loads(rows[0][0]) if rows else None

    def open_rows(self):
        """(record, manifest) of every task not finished, newest first: O(those)."""
        return [(json.loads(record), manifest) for record, manifest in self._read(
            "SELECT record, manifest FROM task WHERE open ORDER BY updated DESC")]

    def all_records(self):
        """Every record, by taskId, streamed (status --all)."""
        cursor = self._reader().execute("SELECT record FROM task ORDER BY task_id")
        for (record,) in iter(cursor.fetchone, None):
            yield json.loads(record)

    def counts(self):
        """{status or "hook-" + hook state: tasks} over the tasks not finished."""
        found = collections.Counter()
        for status, hook, count in self._read(
                "SELECT status, hook, count(*) FROM task WHERE open GROUP BY status, hook"):
            found[status] += count
            found["hook-%s" % hook] += count
        return found

    def has_tasks(self):
        return bool(self._read("SELECT 1 FROM task LIMIT 1"))

    def wakes_waiting(self):
        """Whether a command left work for serve (a look at an index that is
        empty but for a moment)."""
        return bool(self._read("SELECT 1 FROM task WHERE wake LIMIT 1"))

    def _note(self, key):
        rows = self._read("SELECT value FROM note WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def close(self):
        for conn in [getattr(self, "_writer", None)] + self._readers:
            if conn is not None:
                conn.close()


def db_uri(path, mode):
    """An SQLite URI (https://sqlite.org/uri.html) for path, opened in mode."""
    return "%s?mode=%s" % (pathlib.Path(path).as_uri(), mode)


def readable_rows(path):
    """The rows of a damaged database that can still be read, as Store
    rows; reading stops at the first error."""
    try:
        conn = sqlite3.connect(db_uri(path, "ro"), uri=True)
    except sqlite3.Error:
        return
    try:
        for (text,) in conn.execute("SELECT record FROM task"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(text)
                if isinstance(record, dict) and TASK_ID_RE.fullmatch(str(record["taskId"])):
                    yield task_row(record, manifest=record.get("status") in (DONE, FAILED))
    except sqlite3.Error:
        return
    finally:
        conn.close()


def set_aside_planted(path):
    """Whatever stands where the store keeps a file of its own and is not a
    regular file (a link, a folder, a FIFO) is renamed aside, never followed."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        kept = "%s.planted-%d" % (path, time.time_ns())
        os.rename(path, kept)
        log_event("store-entry-moved", level=logging.ERROR, path=path, kept=kept,
                  reason="not a regular file (a link?)")


class OwnerLock:
    """<dir>/cover_receiver.lock, locked by the process doing <dir>'s work:
    serve for its life, a command with no serve running for its run (the OS
    drops it with the process, also on kill -9). Never a POSIX lock on the
    database file: closing any other descriptor of that file would drop
    SQLite's own locks (SQLite, "How To Corrupt An SQLite Database File")."""

    REGION = 128                # the locked byte; Windows cannot read a locked one

    def __init__(self, root):
        self.path = os.path.join(root, LOCK_NAME)
        self.fd = None

    def take(self, who, wait=False):
        """Hold the lock as who ("serve", or a command); False when held."""
        set_aside_planted(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | Platform.NO_LINK | Platform.NO_WAIT,
                     0o644)
        try:
            Platform.give_to_owner(fd, os.path.dirname(self.path))
            os.lseek(fd, self.REGION, os.SEEK_SET)
            if not Platform.lock(fd, wait):
                os.close(fd)
                return False
        except BaseException:
            os.close(fd)
            raise
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, ("%s %d\n" % (who, os.getpid())).ljust(self.REGION - 1).encode())
        self.fd = fd
        return True

    def held(self):
        """Whether a process holds the lock now (the lock file is not made)."""
        try:
            fd = os.open(self.path, os.O_RDWR | Platform.NO_LINK | Platform.NO_WAIT)
        except OSError:
            return False
        try:
            os.lseek(fd, self.REGION, os.SEEK_SET)
            free = Platform.lock(fd, False)
        finally:
            Platform.unlock(fd)
        return not free

    def holder(self):
        """What the lock file says holds it: "serve 1234", or ""."""
        try:
            fd = os.open(self.path, Platform.READ_FLAGS)
        except OSError:
            return ""
        try:
            data = os.read(fd, self.REGION - 1)
        except OSError:
            return ""
        finally:
            os.close(fd)
        return data.decode("ascii", "replace").strip()

    def probe(self):
        """A real durable write in <dir> (/healthz): 512 bytes on new blocks
        of the lock file, so a full disk fails it, then fsync."""
        os.ftruncate(self.fd, self.REGION)
        os.lseek(self.fd, 4096, os.SEEK_SET)
        os.write(self.fd, b"\0" * PROBE_BYTES)
        os.fsync(self.fd)

    def release(self):
        if self.fd is not None:
            Platform.unlock(self.fd)
            self.fd = None


class TaskFolder:
    """<dir>/<taskId>: its covers and, once it ended, its task.json. Each
    file is written under a temp name, fsynced, renamed, and the folder
    fsynced. No link is followed: not the folder (a link there is moved
    aside) and not a file in it (O_NOFOLLOW; what stands in a temp name's
    way is removed)."""

    def __init__(self, root, task_id):
        if not TASK_ID_RE.fullmatch(task_id):       # defence in depth: never leave <dir>
            raise BadCallback("bad taskId")
        self.path = os.path.join(root, task_id)

    def make(self):
        for _ in range(2):
            try:
                os.mkdir(self.path)
            except FileExistsError:
                if stat.S_ISDIR(os.lstat(self.path).st_mode):
                    break
                set_aside_planted(self.path)       # a link or a file: never followed
            else:
                break
        return self

    def saved_cover(self, index):
        """The name of cover index saved under its final name, or None: a
        cover renamed into place just before a crash is adopted."""
        for ext in COVER_EXTS:
            name = "cover_%d.%s" % (index + 1, ext)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(os.path.join(self.path, name)).st_mode):
                    return name
        return None

    def write(self, name, produce):
        """produce(out) writes the file's bytes and returns its final name
        (None: name); then fsync, rename, fsync of the folder."""
        part = os.path.join(self.make().path, "." + name + ".part")
        try:
            out = FileOut(Platform.open_here(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            try:
                name = produce(out) or name
                os.fsync(out.fd)
            finally:
                os.close(out.fd)
            final = os.path.join(self.path, name)
            try:
                Platform.retry_sharing(os.replace, part, final)
            except IsADirectoryError:   # a folder planted there: a rename cannot replace it
                remove_entry(final)
                os.replace(part, final)
            Platform.fsync_dir(self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                remove_entry(part)
            raise
        return name, out.size

    def sweep(self):
        """Remove the temp files a crash left (the task has ended: none is
        live), 1.x's included: every hidden entry."""
        with contextlib.suppress(OSError), os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    remove_entry(entry.path)


class FileOut:
    """The unbuffered end of a file the store writes: os.write on a
    descriptor (a file object costs four more system calls per cover)."""

    def __init__(self, fd):
        self.fd, self.size = fd, 0

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += len(data)


def open_store(config, check=False):
    """The store for --dir (created, and a 1.x folder imported), or a UsageError."""
    try:
        os.makedirs(config.dir, exist_ok=True)
        store = Store(config.dir, check)
        try:
            if store.fresh:
                import_1x(store)
        except BaseException:
            store.close()
            raise
        return store
    except (OSError, sqlite3.OperationalError) as exc:
        raise not_writable(config.dir, exc) from None


def not_writable(folder, exc):
    """The UsageError for a --dir that takes no writes, naming who this runs
    as and who owns the folder (or its nearest existing parent)."""
    text = "--dir %s is not writable: %s" % (
        folder, os_reason(exc) if isinstance(exc, OSError) else exc)
    if hasattr(os, "getuid"):
        existing = os.path.abspath(folder)
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        with contextlib.suppress(OSError):
            text += "; this runs as %s, and %s belongs to %s" % (
                user_name(os.getuid()), existing, user_name(os.stat(existing).st_uid))
    return UsageError(text)


def user_name(uid):
    """POSIX: the user's name and uid (a DynamicUser= uid may have no name)."""
    try:
        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except KeyError:
        return "uid %d" % uid


def import_1x(store):
    """First start on a folder of 1.x: every <taskId>/task.json becomes a row
    (schedule, hook and poll state included), in one transaction, so a kill
    midway imports it all again; then 1.4's .index, .locks, .tmp and
    .requests go. A record that fails its checks is kept aside as
    task.json.corrupt-<ns> and its task listed as corrupt."""
    rows, corrupt = [], 0
    with os.scandir(store.root) as entries:
        folders = [e.name for e in entries if TASK_ID_RE.fullmatch(e.name)
                   and e.is_dir(follow_symlinks=False)]
    for task_id in folders:
        try:
            record = read_record(os.path.join(store.root, task_id, "task.json"), task_id)
        except FileNotFoundError:
            continue
        except CorruptRecord as exc:
            corrupt += 1
            record = {"taskId": task_id, "status": CORRUPT, "error": str(exc), "files": []}
            log_event("record-corrupt", task_id, logging.ERROR, reason=exc,
                      note="kept aside; a new delivery of the task starts it anew")
            with contextlib.suppress(OSError):
                path = os.path.join(store.root, task_id, "task.json")
                os.rename(path, "%s.corrupt-%d" % (path, time.time_ns()))
        rows.append(task_row(record, manifest=False))
    if rows:
        store.write(lambda: store._insert_rows(rows))
        log_event("imported", tasks=len(rows), corrupt=corrupt, note="1.x task.json records")
    for name in LEGACY_ENTRIES:
        with contextlib.suppress(FileNotFoundError):
            remove_entry(os.path.join(store.root, name))


def read_record(path, task_id):
    """A 1.x task.json, checked as untrusted input (CorruptRecord says why)."""
    data = read_regular_file(path, MAX_RECORD_BYTES)
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptRecord("task.json is not JSON") from None
    problem = record_problem(record, task_id)
    if problem:
        raise CorruptRecord("task.json " + problem)
    return record


# ---------------------------------------------------------------------------
# Records: built, checked, changed and read out
# ---------------------------------------------------------------------------

def encode_record(record):
    return (json.dumps(record) + "\n").encode("utf-8")     # compact: json's C encoder


def new_record(callback, hooks=False, expected=None):
    """The record of a first delivery (for an expected task, its expectedAt
    and parentTaskId kept); a failure callback ends its task, so with hooks
    its hand-off is pending in the same write."""
    now = utc_now()
    ok = callback.code == 200
    count = len(callback.images)
    return {
        "taskId": callback.task_id,
        "status": PENDING if ok else FAILED,
        "code": callback.code,
        "msg": callback.msg,
        "images": list(callback.images),
        "files": [None] * count,
        "errors": [None] * count,           # per image: why it failed for good
        "tries": [0] * count,               # per image: failed tries so far
        "lastError": [None] * count,        # per image: why the last try failed
        "nextTryAt": [None] * count,        # per image: when it is tried again
        "error": None if ok else "generation failed: code %d: %s" % (callback.code, callback.msg),
        "receivedAt": now,
        "updatedAt": now,
        "hook": new_hook() if hooks and not ok else None,
        "source": callback.source,
        "expectedAt": (expected or {}).get("expectedAt"),
        "parentTaskId": (expected or {}).get("parentTaskId"),
    }


def new_expected_record(task_id, parent=None, now=None):
    """A task created elsewhere (expect, generate): no callback, no images yet."""
    now = utc_now(now)
    return {"taskId": task_id, "status": EXPECTED, "code": 0, "msg": "", "images": [],
            "files": [], "error": None, "receivedAt": None, "updatedAt": now,
            "expectedAt": now, "parentTaskId": parent, "source": None, "hook": None,
            "poll": new_poll()}


def new_poll(confirm_from=None):
    """serve's record-info schedule for an expected task; with confirm_from
    (the unix time a --confirm success callback came), due at once."""
    return {"tries": 0, "nextPollAt": utc_now(confirm_from) if confirm_from else None,
            "lastAnswer": None, "confirmSince": utc_now(confirm_from) if confirm_from else None}


def new_hook():
    """The hand-off of a task that just ended, due now."""
    return {"status": PENDING, "tries": 0, "lastExit": None, "lastError": None,
            "nextTryAt": None, "endedAt": utc_now()}


def hook_state(record):
    hook = record.get("hook")
    return hook.get("status") if isinstance(hook, dict) else None


RECORD_FIELDS = {"taskId": str, "status": str, "code": int, "msg": str, "images": list,
                 "files": list, "receivedAt": str, "updatedAt": str}
RECORD_TYPES = tuple(RECORD_FIELDS.values())
# The checks below compare sets and tuples of types (map and set run in C): the
# 1.4 import checks every task.json it reads, a million of them on a large folder.
TEXT_OR_NONE, TEXT = frozenset((str, type(None))), frozenset((str,))
PER_IMAGE_FIELDS = (("errors", None, TEXT_OR_NONE), ("tries", 0, frozenset((int,))),
                    ("lastError", None, TEXT_OR_NONE), ("nextTryAt", None, TEXT_OR_NONE))


def record_problem(record, task_id):
    """What is wrong with a decoded task.json, or None. Upgrades a record
    written by 1.0, which lacks the retry fields, in place."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    return record_fields_problem(record, task_id) or image_lists_problem(record)


def record_fields_problem(record, task_id):
    if tuple(map(type, map(record.get, RECORD_FIELDS))) != RECORD_TYPES:
        problem = field_type_problem(record)
        if problem:
            return problem
    if record["taskId"] != task_id:
        return "names another task (%s)" % escape(record["taskId"], 40)
    if record["status"] not in (PENDING, DONE, FAILED, EXPECTED):
        return "has an unknown status %s" % escape(record["status"], 20)
    if record["status"] == EXPECTED and not (isinstance(record.get("expectedAt"), str)
                                             and isinstance(record.get("poll"), dict)):
        return "is expected but has no expectedAt or poll"
    if not isinstance(record.get("error"), (str, type(None))):
        return "has an error that is not text"
    hook = record.get("hook")
    if hook is not None and not (isinstance(hook, dict) and hook.get("status") in (
            PENDING, DONE, FAILED) and isinstance(hook.get("tries"), int)
            and isinstance(hook.get("endedAt"), str)):
        return "has a malformed hook"
    return None


def field_type_problem(record):
    """Which field has the wrong type (exact: a bool is no code), or None."""
    for key, kind in RECORD_FIELDS.items():
        if key == "receivedAt" and record.get(key) is None \
                and isinstance(record.get("expectedAt"), str):
            continue                    # expected, and no callback (yet, or ever)
        if type(record.get(key)) is not kind:
            return "has no %s %s" % (kind.__name__, key)
    return None


def image_lists_problem(record):
    images, files, count = record["images"], record["files"], len(record["images"])
    if count > MAX_IMAGES or len(files) != count or not TEXT.issuperset(map(type, images)):
        return "has a wrong images or files list"
    if not TEXT_OR_NONE.issuperset(map(type, files)) or not FILE_ENTRIES.issuperset(files):
        return "names a file that is not a cover"
    for key, empty, allowed in PER_IMAGE_FIELDS:
        values = record.get(key)
        if type(values) is not list or len(values) != count:
            record[key] = values = [empty] * count      # 1.0 wrote no retry fields
        if not allowed.issuperset(map(type, values)):
            return "has a wrong %s list" % key
    return None


def reopen_record(record, callback):
    """Make a failed task pending again for its missing images: a success
    callback brings (possibly fresher) URLs; retry (callback None) keeps them."""
    if callback is not None:
        if not any(record["files"]):
            record.update(images=list(callback.images), files=[None] * len(callback.images))
        for index, name in enumerate(record["files"]):
            if name is None and index < len(callback.images):
                record["images"][index] = callback.images[index]
        record.update(code=callback.code, msg=callback.msg)
    count = len(record["files"])
    record.update(status=PENDING, error=None, errors=[None] * count, tries=[0] * count,
                  lastError=[None] * count, nextTryAt=[None] * count, hook=None)


def missing_images(record):
    if record.get("status") != PENDING:
        return []
    return [i for i, (name, error) in enumerate(zip(record["files"], record["errors"]))
            if name is None and error is None]


def task_reason(record):
    """Why a task failed, or the last error and next try of a retrying one;
    then how its hand-off stands, when it is not done."""
    reason = image_reason(record)
    if hook_state(record) in (PENDING, FAILED):
        hook = "hook %s: %s" % (hook_state(record), hook_reason(record))
        reason = "%s; %s" % (reason, hook) if reason else hook
    return reason


def image_reason(record):
    if record.get("status") == DONE:
        return ""
    if record.get("status") in (FAILED, CORRUPT):
        return record.get("error") or ""
    if record.get("status") == EXPECTED:
        return expected_reason(record)
    retrying = sorted((record["nextTryAt"][i], record["lastError"][i])
                      for i in missing_images(record) if record["lastError"][i])
    if not retrying:
        return ""
    when, error = retrying[0]
    return "retrying %d image(s): %s; next try %s" % (len(retrying), error, when)


def expected_reason(record, now=None):
    """How long an expected task has waited for its callback, and what
    record-info last said."""
    since = parse_utc(record.get("expectedAt"))
    waited = max(0, int((time.time() if now is None else now) - since)) if since else 0
    poll = record.get("poll") if isinstance(record.get("poll"), dict) else {}
    text = "waiting for its callback for %ds" % waited
    if poll.get("confirmSince"):
        text = "--confirm: waiting for record-info to confirm its callback"
    if poll.get("lastAnswer"):
        text += "; record-info said: %s; next poll %s" % (poll["lastAnswer"], poll.get("nextPollAt"))
    return text


def hook_reason(record):
    hook = record.get("hook") if record else None
    if not isinstance(hook, dict) or hook.get("status") == DONE:
        return "done" if hook else ""
    when = "; next try %s" % hook["nextTryAt"] if hook.get("nextTryAt") else ""
    return "%s after %d tries%s" % (hook.get("lastError") or "not run yet", hook["tries"], when)


def accept(store, callback, confirm=False, hooks=False, wake=False):
    """Make a delivery durable: ("received" | "duplicate", record), decided
    and written in one transaction, which has committed before this returns.
    A done task is final: when the transaction cannot run (a <dir> remounted
    read-only, a full disk), its duplicate is still answered from a read."""
    def decide():
        record = store.get(callback.task_id)
        if record is not None and record["status"] == CORRUPT:
            record = None                   # a corrupt import: this delivery starts it anew
        fresh = (held if confirm and callback.code == 200 else delivered)(callback, record, hooks)
        if fresh is None:
            return "duplicate", record
        store.put(fresh, wake=wake, manifest=fresh["status"] in (DONE, FAILED))
        return "received", fresh
    try:
        return store.write(decide)
    except sqlite3.Error as exc:
        failure = exc
    with contextlib.suppress(sqlite3.Error):
        known = store.read(callback.task_id)
        if known is not None and known["status"] == DONE:
            return "duplicate", known
    raise Unavailable("cannot record the task durably: %s" % db_reason(failure))


def delivered(callback, record, hooks):
    """The record a delivery makes of record (None: no task yet), or None
    when it brings nothing new (a duplicate)."""
    if record is None:
        return new_record(callback, hooks)
    if record["status"] == EXPECTED:
        return new_record(callback, hooks, expected=record)
    if record["status"] == FAILED and callback.code == 200:
        reopen_record(record, callback)
        return record
    return None


def held(callback, record, hooks):
    """--confirm: a success callback makes its task expected, due at
    record-info now; the body's image list is never kept."""
    now = time.time()
    if record is None or record["status"] == FAILED:
        kept = new_expected_record(callback.task_id, (record or {}).get("parentTaskId"), now)
        kept["poll"] = new_poll(now)
        return kept
    if record["status"] == EXPECTED and not record["poll"].get("confirmSince"):
        record["poll"] = new_poll(now)
        return record
    return None


def expect(store, task_id, parent=None):
    """Record a task created elsewhere as expected: (created, record); a
    known task is left as it is. serve schedules its polls (wake)."""
    def run():
        record = store.get(task_id)
        if record is not None and record["status"] != CORRUPT:
            return False, record
        record = new_expected_record(task_id, parent)
        store.put(record, wake=True)
        return True, record
    return store.write(run)


def reopen_failed(store, task_id):
    """retry: a failed task's failed images pending again, for serve (wake)."""
    def reopen(record):
        if record is None or record["status"] != FAILED or not record["images"]:
            return None
        reopen_record(record, None)
        return record
    return store.change(task_id, reopen, wake=True, manifest=False)


def rerun_hook(store, task_id):
    """retry --hook: a failed hook due again now, for serve (wake)."""
    def rerun(record):
        if record is None or hook_state(record) != FAILED:
            return None
        record["hook"].update(status=PENDING, nextTryAt=None)
        return record
    return store.change(task_id, rerun, wake=True)


def task_result(store, task_id):
    """(word, detail) for a task's record: done, failed, pending or corrupt."""
    record = store.read(task_id)
    if record is None:
        return "error", "no task %s in %s" % (task_id, store.root)
    if record["status"] == DONE:
        return "done", "%d covers in %s" % (len(record["files"]),
                                            os.path.join(store.root, task_id))
    if record["status"] in (FAILED, CORRUPT):
        return record["status"], record.get("error") or "failed"
    if record["status"] == EXPECTED:
        return EXPECTED, task_reason(record)
    return "pending", task_reason(record) or "downloads unfinished"


def db_reason(exc):
    """An OSError or sqlite3.Error as a short line."""
    return os_reason(exc) if isinstance(exc, OSError) else "%s: %s" % (
        type(exc).__name__, escape(exc, 120))

# ---------------------------------------------------------------------------
# Downloads: policy, vetted connections, streaming
# ---------------------------------------------------------------------------

def system_resolver(host, port):
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def is_public_address(text):
    """True only for globally routable unicast addresses, also looking inside
    IPv4-mapped, 6to4, Teredo and NAT64 forms."""
    ip = ipaddress.ip_address(text.split("%")[0])
    if ip.version == 6:
        if ip not in GLOBAL_UNICAST_V6 and not ip.ipv4_mapped and ip not in NAT64_NETWORK:
            return False
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
    """The download policy (README, Downloads): which URLs may be fetched, from where."""

    def __init__(self, allow_hosts, resolver=system_resolver):
        self.allow_hosts = tuple(allow_hosts or ())
        self.resolver = resolver

    def host_allowed(self, host):
        return any(host == p or (p.startswith("*.") and host.endswith(p[1:]))
                   for p in self.allow_hosts)

    def vet(self, url):
        """The Target to fetch url from: its scheme, host, port, path and the
        addresses it resolved to, each checked against the policy (https and
        public addresses, or only the --allow-host hosts). Raises Permanent
        for a refused URL (with the remedy), Retryable when it cannot resolve."""
        problem = url_problem(url)          # the same rules as a callback's URLs
        if problem:
            raise Permanent("refused: URL %s" % problem)
        parts = urllib.parse.urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname.rstrip(".")
        port = parts.port or (443 if scheme == "https" else 80)
        if self.allow_hosts and not self.host_allowed(host):
            raise Permanent("refused: host %s is not in --allow-host" % host)
        if not self.allow_hosts and scheme != "https":
            raise Permanent("refused: only https URLs are fetched (--allow-host HOST "
                            "allows http from HOST)")
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        return Target(scheme, host, port, path, self._addresses(host, port))

    def _addresses(self, host, port):
        """What host resolves to; each public unless --allow-host is in use."""
        try:
            addresses = tuple(dict.fromkeys(self.resolver(host, port)))
        except (OSError, UnicodeError) as exc:
            raise Retryable("cannot resolve %s: %s" % (host, exc)) from None
        if not addresses:
            raise Retryable("cannot resolve %s" % host)
        for address in () if self.allow_hosts else addresses:
            if not is_public_address(address):
                raise Permanent("refused: %s resolves to non-public %s (--allow-host %s "
                                "allows it)" % (host, address, host))
        return addresses


class Meter:
    """curl's --speed-limit with --speed-time, for one transfer: it is cut
    (TooSlow) when it averages under min_rate bytes/s over any window of
    `window` seconds, or when the deadline (monotonic) passes. A host that
    drips a byte just inside --timeout thus cannot hold a worker."""

    def __init__(self, min_rate, window, deadline=None, clock=time.monotonic):
        self.min_rate, self.window, self.deadline, self.clock = min_rate, window, deadline, clock
        self.total = 0
        self._marks = collections.deque([(clock(), 0)])     # (time, total) a few per window
        self._next_look = self._marks[0][0]

    def count(self, size):
        self.total += size
        now = self.clock()
        if now < self._next_look:       # looked less than window/8 ago: a read costs no more
            return
        self._next_look = now + self.window / 8
        if self.deadline is not None:
            self._next_look = min(self._next_look, self.deadline)
        marks = self._marks
        if self.deadline is not None and now > self.deadline:
            raise TooSlow("ran out of time (--wait)")
        while len(marks) > 1 and marks[1][0] <= now - self.window:
            marks.popleft()             # keep the newest mark at least a window old
        since, then = marks[0]
        if self.min_rate and now - since >= self.window \
                and self.total - then < self.min_rate * (now - since):
            raise TooSlow("slower than --min-rate %d bytes/s over %g s"
                          % (self.min_rate, self.window))
        marks.append((now, self.total))

    def timeout(self, step):
        """The timeout for one network step: step, or less near the deadline."""
        if self.deadline is None:
            return step
        return max(0.001, min(step, self.deadline - self.clock()))


class MeteredSocket:
    """A connected socket as http.client uses it (sendall, makefile, close),
    with every read counted by a Meter: the status line and headers too."""

    def __init__(self, sock, meter):
        self.sock, self.meter = sock, meter

    def sendall(self, data):
        self.sock.sendall(data)

    def makefile(self, mode):
        # The socket's own reader keeps it open until the response is read,
        # also after http.client has closed the connection (will_close).
        return io.BufferedReader(MeteredReader(self.sock.makefile(mode, buffering=0), self.meter))

    def close(self):
        self.sock.close()


class MeteredReader(io.RawIOBase):
    def __init__(self, raw, meter):
        super().__init__()
        self.raw, self.meter = raw, meter

    def readable(self):
        return True

    def readinto(self, buffer):
        size = self.raw.readinto(buffer)
        self.meter.count(size or 0)
        return size

    def close(self):
        self.raw.close()
        super().close()


class PinnedConnection(http.client.HTTPSConnection):
    """HTTP(S) connection to an address that was already checked: no second
    DNS lookup, while Host, SNI and certificate checks use the name."""

    def __init__(self, target, timeout, context, abort, meter):
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._target, self._tls, self._abort, self._meter = target, context, abort, meter
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
            # wrap_socket takes the descriptor over: watch the TLS socket instead.
            self._abort.forget(sock)
            self.watched = sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            self._abort.watch(sock)
        self.sock = MeteredSocket(sock, self._meter)


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
                Platform.interrupt(sock)

    def forget(self, sock):
        with self._lock:
            self._sockets.discard(sock)

    def fire(self):
        with self._lock:
            self._event.set()
            for sock in self._sockets:
                Platform.interrupt(sock)


class Fetcher:
    """One try at one image URL: policy, redirects, streaming, verification."""

    def __init__(self, config, resolver=system_resolver, tls=None):
        self.policy = DownloadPolicy(config.allow_host, resolver)
        self.timeout, self.min_rate = config.timeout, config.min_rate
        self.max_bytes = config.max_image_bytes
        self.user_agent = config.user_agent
        if tls is None:
            tls = ssl.create_default_context()
            tls.minimum_version = ssl.TLSVersion.TLSv1_2    # 3.9's default allows 1.0
        self.tls = tls

    def fetch(self, url, out, abort):
        """Write the image at url to out; return its extension."""
        meter = Meter(self.min_rate, self.timeout)     # one floor over all hops
        for _hop in range(MAX_REDIRECTS + 1):
            target = self.policy.vet(url)
            with remote_errors(abort):
                ext, location = self._get(target, out, abort, meter)
                if ext is not None:
                    return ext
                url = urllib.parse.urljoin(url, location)  # vetted as the next hop
        raise Permanent("more than %d redirects" % MAX_REDIRECTS)

    def _get(self, target, out, abort, meter):
        """One request: (extension, None) for the image, (None, Location) for a redirect."""
        conn = PinnedConnection(target, self.timeout, self.tls, abort, meter)
        try:
            # Never an Authorization header: the image host gets nothing secret.
            conn.request("GET", target.request_path, headers={
                "User-Agent": self.user_agent, "Accept": "image/*",
                "Accept-Encoding": "identity"})
            response = conn.getresponse()
            location = response.getheader("Location")
            if response.status in REDIRECT_STATUSES and location:
                return None, location.strip()
            if response.status == 200:
                return self._stream(response, out, abort), None
            raise _status_error(response)
        finally:
            abort.forget(conn.watched)
            conn.close()

    def _declared_length(self, response):
        """The Content-Length, or None when there is none (Permanent when bad)."""
        header = response.getheader("Content-Length")
        declared = parse_digits(header)
        if header is not None and declared is None:
            raise Permanent("malformed Content-Length %s" % escape(header, 30))
        if declared is not None and declared > self.max_bytes:
            raise Permanent("larger than --max-image-bytes (%d bytes)" % declared)
        return declared

    def _stream(self, response, out, abort):
        declared = self._declared_length(response)
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
                head += bytes(buffer[:min(size, 12 - len(head))])
                ext = sniff_head(head)
            write_cover(out, buffer[:size])
        # readinto() returns 0 at a premature EOF instead of raising IncompleteRead.
        if declared is not None and total != declared:
            raise Retryable("connection closed after %d of %d bytes" % (total, declared))
        ext = ext or sniff_image(head)
        if ext is None:
            raise Permanent("not an image (%d bytes)" % total)
        return ext


def sniff_head(head):
    """The image type of a file's first 12 bytes; None while fewer came.
    Permanent when they are no image's."""
    if len(head) < 12:
        return None
    ext = sniff_image(head)
    if ext is None:
        raise Permanent("not an image (starts %r)" % head)
    return ext


def write_cover(out, data):
    try:
        out.write(data)
    except OSError as exc:          # local, not the host's fault: say so
        raise Retryable("cannot write the cover: %s" % os_reason(exc)) from None


@contextlib.contextmanager
def remote_errors(abort):
    """Whatever a remote server sends ends as Retryable or Permanent (Aborted
    when stop cut it short)."""
    try:
        yield
    except ssl.SSLCertVerificationError as exc:
        raise Permanent("TLS certificate rejected: %s" % exc.verify_message) from None
    except http.client.InvalidURL as exc:
        raise Permanent("refused: %s" % exc) from None
    except (OSError, http.client.HTTPException) as exc:
        if abort.is_set():
            raise Aborted("stopping") from None
        raise Retryable(_network_reason(exc)) from None
    except ValueError as exc:           # a malformed Location, header or URL
        if abort.is_set():              # or a TLS socket cut short by stop
            raise Aborted("stopping") from None
        raise Permanent("malformed answer: %s" % exc) from None


def _status_error(response):
    status = response.status
    text = "HTTP %d" % status
    if status in RETRY_STATUSES or 500 <= status <= 599:
        return Retryable(text, parse_retry_after(response.getheader("Retry-After")))
    return Permanent(text)


def _network_reason(exc):
    if isinstance(exc, TooSlow):
        return str(exc)
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed after %d bytes" % len(exc.partial)
    return "%s: %s" % (type(exc).__name__, exc)


# ---------------------------------------------------------------------------
# Scheduler: every kind of due work on one queue, one retry rule
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class WorkItem:
    """Work due for a task at a time: an image's next try ("image", with its
    index), the task's end (its task.json, then its hook: "end"), or a
    record-info poll of an expected task ("poll"). Times are monotonic; the
    record keeps them as wall-clock times, so a restart resumes them."""
    kind: str
    task_id: str
    index: int
    due: float
    deadline: float             # --retry-for (--hook-retry-for) after it began
    tries: int

    @property
    def key(self):
        return self.kind, self.task_id, self.index


class Scheduler:
    """One due-time queue for every kind of work (a heap per kind, so a
    kind at its limit never holds back another), worked by one pool of
    threads: at most `limits[kind]` items of a kind at once. A handler
    returns None when its item is finished, else the seconds until its next
    try; retry() gives that delay after a failure, for every kind: about 1 s
    doubling to --max-backoff, times 0.5 to 1, Retry-After honoured, None
    past the item's deadline. A waiting item holds no thread."""

    def __init__(self, config, handlers, limits, clock=Clock, keep_retries=True):
        self.handlers, self.limits, self.clock = handlers, limits, clock
        self.keep_retries = keep_retries        # False: one try each (retry with no serve)
        self.base, self.cap = config.backoff_base, config.max_backoff
        self.cond = threading.Condition()
        self.heaps = {kind: [] for kind in limits}
        self.queued, self.running = {}, {}      # key -> item
        self.follow = {}                        # key -> the item that follows its run
        self.busy = collections.Counter()
        self.stopping = False
        self._serial = itertools.count()
        self.threads = [threading.Thread(target=self._work, name="worker", daemon=True)
                        for _ in range(sum(limits.values()))]

    def from_wall(self, when, cap=None):
        """A stored wall-clock time as a monotonic one; with cap, never further
        ahead than cap seconds (the wall clock may have stepped since)."""
        ahead = (when or self.clock.wall()) - self.clock.wall()
        return self.clock.mono() + (ahead if cap is None else min(max(0.0, ahead), cap))

    def add(self, item, sooner=False):
        """Queue item unless its key is queued; with sooner, it replaces a
        queued one of its key that is due later. An item whose key is
        running follows that run: the record changed while it ran (a task
        that ended again while its first end ran needs an end of its own)."""
        with self.cond:
            queued = self.queued.get(item.key)
            if sooner and queued is not None and item.due < queued.due:
                queued = None           # its heap entry is skipped when it comes up
            if queued is not None or self.stopping:
                return False
            if item.key in self.running:
                self.follow[item.key] = item
                return True
            self._push(item)
            self.cond.notify_all()
            return True

    def _push(self, item):
        """Queue item by its due time (with the lock held)."""
        self.queued[item.key] = item
        heapq.heappush(self.heaps[item.kind], (item.due, next(self._serial), item))

    def retry(self, item, retry_after=None, floor=0.0):
        """The one retry rule: the delay before item's next try after a
        failure (its tries counted), or None when that is past its deadline."""
        item.tries += 1
        delay = max(floor, self.delay(item.tries, retry_after))
        return None if self.clock.mono() + delay > item.deadline else delay

    def retry_local(self, item):
        """The delay after a failure of this machine's (the store, the disk),
        which no deadline ends: the work is kept, at most --max-backoff apart."""
        return self.retry(item) or self.cap

    def delay(self, tries, retry_after=None):
        """A gap that doubles from base to cap, with jitter (0.5 to 1 times
        it) so that many items do not retry in step; a server's Retry-After
        is honoured up to the cap."""
        gap = min(self.cap, self.base * 2 ** min(tries - 1, 40)) * random.uniform(0.5, 1.0)
        return gap if retry_after is None else max(gap, min(retry_after, self.cap))

    def _take(self):
        with self.cond:
            while not self.stopping:
                now, first = self.clock.mono(), None
                for kind, heap in self.heaps.items():
                    while heap and self.queued.get(heap[0][2].key) is not heap[0][2]:
                        heapq.heappop(heap)         # replaced by a sooner one
                    if heap and self.busy[kind] < self.limits[kind] and (
                            first is None or heap[0][0] < first[0]):
                        first = (heap[0][0], kind)
                if first is not None and first[0] <= now:
                    item = heapq.heappop(self.heaps[first[1]])[2]
                    del self.queued[item.key]
                    self.running[item.key] = item
                    self.busy[item.kind] += 1
                    return item
                self.cond.wait(None if first is None else first[0] - now)
            return None

    def _work(self):
        while True:
            item = self._take()
            if item is None:
                return
            again = None
            try:
                again = self.handlers[item.kind](item)
            except Exception:           # the thread's boundary: log, keep the item
                LOG.exception("%s crashed task=%s", item.kind, escape(item.task_id))
                again = self.delay(5)
            with self.cond:
                del self.running[item.key]
                self.busy[item.kind] -= 1
                follow = self.follow.pop(item.key, None)    # added while it ran: due first
                if follow is None and again is not None and self.keep_retries:
                    item.due, follow = self.clock.mono() + again, item
                if follow is not None and not self.stopping:
                    self._push(follow)
                self.cond.notify_all()

    def start(self):
        for thread in self.threads:
            thread.start()

    def counts(self):
        """(images downloading, images waiting for a later try)."""
        now = self.clock.mono()
        with self.cond:
            return self.busy["image"], sum(1 for (kind, _, _), item in self.queued.items()
                                           if kind == "image" and item.due > now)

    def oldest(self, kind):
        """The soonest deadline among the items of kind, or None."""
        with self.cond:
            return min((i.deadline for i in itertools.chain(self.queued.values(),
                                                            self.running.values())
                        if i.kind == kind), default=None)

    def alive(self):
        return all(thread.is_alive() for thread in self.threads)

    def wait_for(self, matches, timeout=None):
        """Block until no item whose key matches(key) is queued or running."""
        with self.cond:
            return self.cond.wait_for(lambda: not any(
                map(matches, itertools.chain(self.queued, self.running))), timeout)

    def stop(self, drain_seconds, abort):
        """Take nothing new; give running items drain_seconds, then abort()
        cuts the rest short. Their records keep their schedule."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            in_slices(lambda t: self.cond.wait_for(lambda: not self.running, t), drain_seconds)
        abort()
        deadline = time.monotonic() + 5
        for thread in self.threads:
            in_slices(lambda t, thread=thread: joined(thread, t), deadline - time.monotonic())


# ---------------------------------------------------------------------------
# Pipeline: what happens to a task after its 200
# ---------------------------------------------------------------------------

class Pipeline:
    """A task's way from its record to its end: each image downloaded
    (Fetcher) into its folder and recorded, the task ended (task.json, then
    the hook, at least once), an expected task polled at record-info. Each
    step is a WorkItem on the Scheduler, and each outcome is committed to
    the Store with the item's next time, so a restart (also after kill -9)
    resumes every item at its time."""

    def __init__(self, config, store, metrics, clock=Clock, resolver=system_resolver,
                 client_tls=None, keep_retries=True, fetch=None):
        self.config, self.store, self.metrics, self.clock = config, store, metrics, clock
        self.fetcher = Fetcher(config, resolver, client_tls)
        self.abort = AbortSignal()
        self.hooks = HookRunner(config, store.root)
        self.recovery = Recovery(config, self)
        handlers = {"image": self.image, "end": self.end, "poll": self.recovery.poll}
        limits = {"image": config.workers, "end": 1, "poll": 1}
        if fetch is not None:           # the fetch command's polls (Fetch.poll)
            handlers["fetch"], limits["fetch"] = fetch, config.workers
        self.scheduler = Scheduler(config, handlers, limits, clock, keep_retries)

    def start(self, rows=()):
        self.scheduler.start()
        for record, manifest in rows:
            self.schedule(record, manifest, resumed=True)

    def stop(self, drain_seconds):
        self.hooks.stop()           # a hook and whatever it started: its run is pending
        self.scheduler.stop(drain_seconds, self.abort.fire)

    def schedule(self, record, manifest=False, resumed=False):
        """Queue the work a record holds: its missing images, its end, or a
        poll while it is expected."""
        config, task_id, add = self.config, record["taskId"], self.scheduler.add
        cap, from_wall = config.max_backoff, self.scheduler.from_wall
        received = parse_utc(record.get("receivedAt")) or self.clock.wall()
        missing = missing_images(record)
        for index in missing:
            add(WorkItem("image", task_id, index, from_wall(parse_utc(
                record["nextTryAt"][index]), cap), from_wall(received + config.retry_for),
                record["tries"][index]))
        if resumed and missing:
            log_event("resume", task_id, images=len(missing))
        hook = record.get("hook") if hook_state(record) == PENDING else None
        if record["status"] in (DONE, FAILED) and (manifest or hook):
            ended = parse_utc((hook or {}).get("endedAt")) or self.clock.wall()
            add(WorkItem("end", task_id, 0, from_wall(parse_utc((hook or {}).get(
                "nextTryAt")), cap), from_wall(ended + (config.hook_retry_for or 0.0)),
                (hook or {}).get("tries", 0)))
        if record["status"] == EXPECTED:
            self.recovery.schedule(record)

    def deliver(self, callback, confirm=False):
        """The one way into the pipeline, for a callback and a record-info
        answer alike: the record committed (then a 200 may leave), its work
        queued. Returns (received | duplicate, record)."""
        outcome, record = accept(self.store, callback, confirm, bool(self.config.on_complete))
        if record["status"] != EXPECTED:
            self.recovery.forget(callback.task_id)
        if outcome == "received" and record["status"] == FAILED:     # a failure callback
            self.ended(record)
        elif outcome == "received":
            self.schedule(record)
        return outcome, record

    # -- an image ----------------------------------------------------------------

    def image(self, item):
        """One try at one image; its outcome recorded. Returns the delay
        before the next try, or None."""
        try:
            return self._try_image(item)
        except (OSError, sqlite3.Error) as exc:     # the store: keep the schedule in memory
            log_event("record-failed", item.task_id, logging.ERROR, image=item.index + 1,
                      reason=db_reason(exc), note="tried again")
            return self.scheduler.retry_local(item)

    def _try_image(self, item):
        record = self.store.read(item.task_id)
        if record is None or item.index not in missing_images(record):
            return None
        folder = TaskFolder(self.store.root, item.task_id)
        try:
            name = folder.saved_cover(item.index)   # renamed into place before a crash
            if name is None:
                name = self._download(item, folder, record["images"][item.index])
            return self._settle(item, name=name)
        except Retryable as exc:
            return self._retry(item, exc)
        except Permanent as exc:
            return self._fail(item, str(exc))
        except Aborted:
            log_event("download-aborted", item.task_id, image=item.index + 1, note="left pending")
        return None

    def _download(self, item, folder, url):
        started = time.monotonic()
        try:
            name, size = folder.write("cover_%d" % (item.index + 1), lambda out: "cover_%d.%s" % (
                item.index + 1, self.fetcher.fetch(url, out, self.abort)))
        except OSError as exc:          # local, not the host's fault: a full disk, a folder
            raise Retryable("cannot save cover_%d: %s" % (item.index + 1, os_reason(exc))) \
                from None
        self.metrics.inc("downloads_total", "saved")
        self.metrics.inc("downloaded_bytes_total", amount=size)
        log_event("downloaded", item.task_id, image=item.index + 1, bytes=size,
                  ms=int((time.monotonic() - started) * 1000))
        return name

    def _retry(self, item, exc):
        delay = self.scheduler.retry(item, exc.retry_after)
        attempts = self.config.attempts
        if attempts and item.tries >= attempts:
            return self._fail(item, "%s (after %d tries)" % (exc, item.tries))
        if delay is None:
            return self._fail(item, "%s (after %d tries; --retry-for ran out)" % (exc, item.tries))
        next_try = self.clock.wall() + delay
        self.metrics.inc("download_retries_total")
        log_event("retry", item.task_id, image=item.index + 1, tries=item.tries, reason=exc,
                  next=utc_now(next_try))

        def postpone(record):
            if record is None or item.index not in missing_images(record):
                return None
            record["tries"][item.index], record["lastError"][item.index] = item.tries, str(exc)
            record["nextTryAt"][item.index] = utc_now(next_try)
            return record
        try:
            self.store.change(item.task_id, postpone)
        except sqlite3.Error as failure:
            log_event("record-failed", item.task_id, logging.ERROR, image=item.index + 1,
                      reason=db_reason(failure), note="the schedule goes on in memory")
        return delay

    def _fail(self, item, reason):
        self.metrics.inc("downloads_total", "failed")
        log_event("download-failed", item.task_id, logging.WARNING, image=item.index + 1,
                  reason=reason)
        return self._settle(item, error="cover_%d: %s" % (item.index + 1, reason))

    def _settle(self, item, name=None, error=None):
        """Record image index saved (name) or failed for good (error); the
        last one ends the task, with its task.json and hook due."""
        hooks = bool(self.config.on_complete)

        def settle(record):
            if record is None or item.index not in missing_images(record):
                return None
            index = item.index
            record["files"][index], record["errors"][index] = name, error
            record["nextTryAt"][index], record["tries"][index] = None, item.tries
            if not missing_images(record):
                failed = [e for e in record["errors"] if e]
                record.update(status=FAILED if failed else DONE,
                              error="; ".join(failed) if failed else None,
                              hook=new_hook() if hooks else None)
            return record
        record = self.store.write(lambda: self._put_ended(settle(self.store.get(item.task_id))))
        if record is not None and record["status"] in (DONE, FAILED):
            self.ended(record)
        return None

    def _put_ended(self, record):
        if record is not None:
            self.store.put(record, manifest=True if record["status"] in (DONE, FAILED) else None)
        return record

    def ended(self, record):
        """A task whose end was just committed: its end (task.json, then the
        hook) queued, and its line logged."""
        self.schedule(record, manifest=True)
        log_event("task-" + record["status"], record["taskId"],
                  level=logging.INFO if record["status"] == DONE else logging.WARNING)

    # -- the end of a task -------------------------------------------------------

    def end(self, item):
        """A task that ended: its task.json (the manifest the hook reads,
        what status --json prints), then its hook. At least once: both are
        done again after a crash before their outcome was committed."""
        record = self.store.read(item.task_id)
        if record is None or record["status"] not in (DONE, FAILED):
            return None
        folder = TaskFolder(self.store.root, item.task_id)
        try:
            folder.write("task.json", lambda out: out.write(encode_record(record)))
            folder.sweep()
        except OSError as exc:
            log_event("manifest-failed", item.task_id, logging.ERROR, reason=os_reason(exc))
            return self.scheduler.retry_local(item)
        run = hook_state(record) == PENDING and self.hooks.argv
        outcome = self.hooks.run(item, record) if run else None
        try:
            return self.store.write(lambda: self._hook_outcome(item, outcome, record))
        except sqlite3.Error as exc:
            log_event("record-failed", item.task_id, logging.ERROR, reason=db_reason(exc))
            return self.scheduler.retry_local(item)

    def _hook_outcome(self, item, outcome, ended):
        """Commit a hook run (with the manifest written) of the record ended:
        the delay before its next run, or None. A record changed meanwhile
        (reopened, ended again) is left as it is: its change queued its own
        end (Scheduler.add), which writes its manifest and runs its hook."""
        record = self.store.get(item.task_id)
        if record != ended:
            return None
        if outcome is None or hook_state(record) != PENDING:
            self.store.manifest_written(record)
            return None
        code, reason = outcome
        hook = record["hook"]
        hook.update(tries=item.tries + 1, lastExit=code, lastError=reason)
        delay = None if code == 0 else self.scheduler.retry(item)
        if code == 0:
            hook.update(status=DONE, nextTryAt=None)
        elif delay is None:
            hook.update(status=FAILED, nextTryAt=None, lastError="%s (after %d tries; "
                        "--hook-retry-for ran out)" % (reason, item.tries))
            log_event("hook-gave-up", item.task_id, logging.ERROR, tries=item.tries,
                      reason=reason)
        else:
            hook["nextTryAt"] = utc_now(self.clock.wall() + delay)
        self.store.put(record, manifest=False)
        return delay


class HookRunner:
    """Runs --on-complete for a task that ended: never through a shell, with
    the task's folder appended and COVER_* in its environment, at most
    hook_timeout seconds. Its output goes to the log escaped (HookOutput).
    Every hook process carries HOOK_RUN_ENV=<this receiver>.<run>, which its
    descendants inherit also when they leave its process group (setsid):
    the time limit and stop() kill them all."""

    def __init__(self, config, root):
        self.argv, self.root, self.timeout = config.on_complete, root, config.hook_timeout
        self.current, self.stopped = None, False
        self._marker = "%s=%d.%s." % (HOOK_RUN_ENV, os.getpid(), os.urandom(4).hex())
        self._runs = itertools.count(1)

    def run(self, item, record):
        """Run the hook once: (exit status or None, why it failed or None);
        None when stop() cut it short (it stays pending, for the next start)."""
        task_id, tries = item.task_id, item.tries + 1
        if self.stopped:
            return None
        env = {k: v for k, v in os.environ.items() if k not in HOOK_HIDDEN_ENV}
        run = "%s%d" % (self._marker, next(self._runs))
        env.update(COVER_TASK_ID=task_id, COVER_TASK_STATUS=record["status"],
                   COVER_PARENT_TASK_ID=str(record.get("parentTaskId") or ""),
                   COVER_HOOK_TRY=str(tries))
        env[HOOK_RUN_ENV] = run.split("=", 1)[1]
        started = time.monotonic()
        try:
            self.current = subprocess.Popen(
                list(self.argv) + [os.path.join(self.root, task_id)], env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                **Platform.new_process_group())
        except OSError as exc:
            log_event("hook-failed", task_id, logging.WARNING, reason=exc, attempt=tries)
            return None, "cannot start: %s" % os_reason(exc)
        output = HookOutput(self.current.stdout)
        if self.stopped:        # stop() came while Popen ran, and found no hook to kill
            self._kill(self.current, self._marker)
        try:
            code = self.current.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self._kill(self.current, run + "\0")
            code = None
        self.current = None
        output.log(task_id)
        if self.stopped:
            return None
        if code is None:
            log_event("hook-timeout", task_id, logging.WARNING, seconds=self.timeout,
                      note="killed", attempt=tries)
            return None, "timed out after %g s" % self.timeout
        log_event("hook-exit", task_id, logging.INFO if code == 0 else logging.WARNING,
                  status=code, ms=int((time.monotonic() - started) * 1000), attempt=tries)
        return code, None if code == 0 else "exit status %d" % code

    def stop(self):
        """Kill the running hook and all it started, at once: its run stays
        pending and is done again at the next start."""
        self.stopped = True
        process = self.current
        if process is not None:
            self._kill(process, self._marker)

    @staticmethod
    def _kill(process, marker):
        Platform.kill_group(process)
        Platform.kill_marked(marker)        # what left the group (setsid)
        with contextlib.suppress(OSError):
            process.wait()


class HookOutput:
    """A hook's stdout and stderr (one pipe), read to its end by a thread of
    its own so the hook never blocks on a full pipe. The first
    HOOK_OUTPUT_BYTES are kept for the log, the rest only counted."""

    def __init__(self, pipe):
        self.pipe, self.kept, self.total = pipe, bytearray(), 0
        self._thread = threading.Thread(target=self._read, name="hook-output", daemon=True)
        self._thread.start()

    def _read(self):
        with self.pipe, contextlib.suppress(OSError, ValueError):
            for chunk in iter(lambda: self.pipe.read1(65536), b""):
                self.total += len(chunk)
                self.kept += chunk[:max(0, HOOK_OUTPUT_BYTES - len(self.kept))]

    def log(self, task_id, grace=1.0):
        """Log what came, escaped, a line each (at most HOOK_OUTPUT_LINES).
        The pipe may stay open after the hook ended, held by a process it
        started: then only what came within grace is logged."""
        self._thread.join(grace)
        lines = bytes(self.kept).splitlines()[:HOOK_OUTPUT_LINES]
        for line in lines:
            log_event("hook-output", task_id, line=line.decode("utf-8", "replace"))
        hidden = self.total - sum(len(line) + 1 for line in lines)
        if hidden > 0:
            log_event("hook-output", task_id, note="%d more bytes not shown" % hidden)


# ---------------------------------------------------------------------------
# Polling: the vendor API, serve's recovery, fetch's polls
# ---------------------------------------------------------------------------

class ApiClient:
    """The vendor API at --api-base, with the API key: record-info (GET) and
    cover generate (POST). No redirect is followed, so the key never reaches
    another host, and it appears in no error, log line or record."""

    def __init__(self, config):
        parts = urllib.parse.urlsplit(config.api_base)
        self.https = parts.scheme == "https"
        self.host, self.port, self.prefix = parts.hostname, parts.port, parts.path.rstrip("/")
        self.key, self.timeout, self.user_agent = config.api_key, config.timeout, config.user_agent
        self.min_rate = config.min_rate

    def record_info(self, task_id, deadline=None):
        """The answer's data object for task_id, or ApiError. The whole
        exchange ends by deadline (monotonic) and keeps to --min-rate."""
        status, answer, retry_after = self._exchange(
            "GET", "/api/v1/suno/cover/record-info?taskId=" + task_id, None, deadline)
        if status == 200 and isinstance(answer.get("data"), dict):
            return answer["data"]
        if status == 200:
            raise ApiError("API answer has no data object", "passing")
        raise self._error(status, retry_after, answer)

    def generate(self, music_task_id, callback_url, deadline=None):
        """Create the cover task of a music task: (cover taskId, True when
        the API says it existed already), or ApiError."""
        status, answer, retry_after = self._exchange(
            "POST", "/api/v1/suno/cover/generate",
            {"taskId": music_task_id, "callBackUrl": callback_url}, deadline)
        cover = existing_cover_id(answer)
        if status == 200 and cover:
            return cover, False
        if status in (400, 409) and cover and cover != music_task_id:   # one cover per music task
            return cover, True
        raise self._error(status, retry_after, answer)

    def _exchange(self, method, target, body, deadline):
        """(status, answer object, Retry-After): the status is the body's code
        when the HTTP status is 200, as the API reports errors both ways."""
        meter = Meter(self.min_rate, self.timeout, deadline)
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=meter.timeout(self.timeout))
        headers = {"Authorization": "Bearer " + self.key, "Accept": "application/json",
                   "User-Agent": self.user_agent}
        if body is not None:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.connect()
            conn.sock = MeteredSocket(conn.sock, meter)
            conn.request(method, self.prefix + target, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_API_ANSWER)
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError("API unreachable: %s" % _network_reason(exc), "passing") from None
        except ValueError as exc:       # http.client's own, e.g. a chunk size that is not hex
            raise ApiError("API answer malformed: %s" % escape(exc, 80), "passing") from None
        finally:
            conn.close()
        retry_after = parse_retry_after(response.getheader("Retry-After"))
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict):
            if response.status == 200:      # e.g. a proxy's error page: try again
                raise ApiError("API answer is not JSON", "passing")
            raise self._error(response.status, retry_after, None)
        code = answer.get("code")
        status = code if response.status == 200 and isinstance(code, int) else response.status
        return status, answer, retry_after

    @staticmethod
    def _error(status, retry_after, answer):
        """The ApiError for an API status other than 200, which may come as the
        body's code under HTTP 200 (as kie.ai's 422 for an unknown task does)."""
        msg = answer.get("msg") if isinstance(answer, dict) else None
        detail = " (%s)" % escape(msg, 100) if isinstance(msg, str) and msg else ""
        for statuses, kind, text in API_ERRORS:
            if status in statuses or (statuses == () and 500 <= status <= 599):
                return ApiError(text % (status, detail), kind, retry_after, answer)
        return ApiError("API error: %d%s" % (status, detail), "refused", None, answer)


# What each API status asks for ("%d%s": the status, then the API's msg).
# 429 is a rate limit on kie.ai and "insufficient credits" on some sunoapi.org
# endpoints: passing, since waiting harms neither.
API_ERRORS = (
    ((401, 403), "person", "API key rejected: %d%s; check SUNO_API_KEY"),
    ((402,), "person", "insufficient credits: %d%s; add credits to the account"),
    ((404, 422), "unknown", "unknown task: %d%s"),
    ((429,), "passing", "rate limited or out of credits: %d%s; try again later"),
    ((405, 430), "passing", "calls too frequent: %d%s; try again in a minute"),
    ((455,), "passing", "API under maintenance: %d%s; try again later"),
    ((408,), "passing", "API timeout: %d%s; try again later"),
    ((), "passing", "API error: %d%s; try again later"),        # every 5xx
)


def existing_cover_id(answer):
    """The cover taskId an API answer names: data.taskId, or one named in
    msg (a repeated generate answers 400 naming the existing cover task)."""
    data = answer.get("data") if isinstance(answer, dict) else None
    task_id = data.get("taskId") if isinstance(data, dict) else None
    if isinstance(task_id, str) and TASK_ID_RE.fullmatch(task_id):
        return task_id
    msg = answer.get("msg") if isinstance(answer, dict) else None
    found = re.search(r"\b[0-9a-f]{32}\b", msg) if isinstance(msg, str) else None
    return found.group(0) if found else None


# record-info's task states: successFlag (number or digit string), or the
# status words kie.ai's OpenAPI text for record-info lists.
RECORD_STATES = {0: "running", 1: "success", 2: "running", 3: "failed",
                 "PENDING": "running", "GENERATING": "running", "SUCCESS": "success",
                 "CREATE_TASK_FAILED": "failed", "GENERATE_COVER_FAILED": "failed"}


def record_state(data):
    """success, failed or running; None for an answer we cannot read."""
    for field in ("successFlag", "status"):
        value = data.get(field)
        if isinstance(value, str) and len(value) <= 40:
            value = int(value) if value.isascii() and value.isdigit() else value.upper()
        if isinstance(value, (int, str)) and not isinstance(value, bool) \
                and value in RECORD_STATES:
            return RECORD_STATES[value]
    return None


def record_callback(task_id, data, success):
    """The Callback that a final record-info answer stands for; BadCallback
    when its shape is unusable."""
    if success:
        response = data.get("response")
        images = response.get("images") if isinstance(response, dict) else None
        found = Callback.from_json({"code": 200, "msg": "success",
                                    "data": {"taskId": task_id, "images": images}})
    else:
        code, message = data.get("errorCode"), data.get("errorMessage")
        usable = isinstance(code, int) and not isinstance(code, bool) and 200 < code < 1000
        found = Callback.from_json({
            "code": code if usable else 501,
            "msg": message[:1000] if isinstance(message, str) and message
            else "cover generation failed", "data": {"taskId": task_id, "images": None}})
    return dataclasses.replace(found, source="record-info")


class Recovery:
    """serve's answer to a callback that never comes. Every expected task
    (expect, generate, a --confirm callback) has a poll item; once overdue
    (--recover-after past expectedAt with no callback) it asks record-info,
    at most one request per api_gap, again every --interval while the API
    says generating, backing off on API errors, until a final answer, which
    goes the way of a callback (Pipeline.deliver), or its deadline, which
    fails the task. Without an API key an overdue task gets one WARNING."""

    def __init__(self, config, pipeline):
        self.config, self.pipeline = config, pipeline
        self.client = ApiClient(config) if config.api_key else None
        self.lock = threading.Lock()
        self.expected = {}                  # taskId -> expectedAt (unix), every expected task
        self._warned = set()
        self._last_request = -API_GAP * 2

    def schedule(self, record):
        config, scheduler = self.config, self.pipeline.scheduler
        expected_at = parse_utc(record.get("expectedAt")) or scheduler.clock.wall()
        poll = record.get("poll") or {}
        confirmed = parse_utc(poll.get("confirmSince"))
        first = (parse_utc(poll.get("nextPollAt")) or confirmed
                 or expected_at + config.recover_after)
        end = confirmed + CONFIRM_GRACE if confirmed else expected_at + config.retry_for
        with self.lock:
            self.expected[record["taskId"]] = expected_at
        cap = max(config.recover_after, config.interval, config.max_backoff)
        scheduler.add(WorkItem("poll", record["taskId"], 0, scheduler.from_wall(first, cap),
                               scheduler.from_wall(end), poll.get("tries") or 0),
                      sooner=bool(confirmed))

    def forget(self, task_id):
        with self.lock:
            self.expected.pop(task_id, None)

    def counts(self):
        """(expected, overdue, oldest expectedAt or None)."""
        due = self.pipeline.clock.wall() - self.config.recover_after
        with self.lock:
            times = list(self.expected.values())
        return len(times), sum(1 for at in times if at <= due), min(times, default=None)

    def poll(self, item):
        """One look at an overdue task: the delay before the next, or None."""
        record = self.pipeline.store.read(item.task_id)
        if record is None or record["status"] != EXPECTED:
            self.forget(item.task_id)
            return None
        if self.client is None:
            self._warn_overdue(item.task_id, record)
            return None
        clock, metrics = self.pipeline.clock, self.pipeline.metrics
        if self.pipeline.abort.wait(max(0.0, self._last_request + self.config.api_gap
                                        - clock.mono())):
            return None
        self._last_request = clock.mono()
        try:
            data = self.client.record_info(item.task_id)
        except ApiError as exc:
            metrics.inc("api_requests_total", exc.kind)
            return self._after_error(item, exc)
        metrics.inc("api_requests_total", "ok")
        state = record_state(data)
        if state in ("success", "failed"):
            return self._resolve(item, data, state == "success")
        item.tries += 1
        said = ("still generating" if state == "running" else "an unknown task state %s"
                % escape(data.get("successFlag", data.get("status")), 30))
        return self._again(item, self.config.interval, said)

    def _after_error(self, item, exc):
        if exc.kind == "unknown":
            return self._end(item, str(exc))
        floor = self.config.max_backoff if exc.kind in ("person", "refused") else 0.0
        delay = self.pipeline.scheduler.retry(item, exc.retry_after, floor)
        if floor:                       # a key or credits: no use asking often
            log_event("api-refused", item.task_id, logging.ERROR, reason=exc,
                      next_poll="%gs" % (delay or 0))
        return self._again(item, delay, str(exc))

    def _resolve(self, item, data, success):
        item.tries += 1
        try:
            outcome, record = self.pipeline.deliver(record_callback(item.task_id, data, success))
        except (BadCallback, Unavailable) as exc:
            return self._again(item, self.pipeline.scheduler.retry(item),
                               "an answer it cannot use: %s" % exc)
        self.forget(item.task_id)
        if outcome == "received":
            self.pipeline.metrics.inc("tasks_recovered_total")
            log_event("recovered", item.task_id, source="record-info", status=record["status"],
                      images=len(record["images"]), confirm="yes" if record.get("poll") else "no")
        return None

    def _again(self, item, delay, said):
        """Poll again after delay, or fail the task when that is past its deadline."""
        clock = self.pipeline.clock
        if delay is None or clock.mono() + delay > item.deadline:
            return self._end(item, said)
        next_poll = utc_now(clock.wall() + delay)

        def note(record):
            if record is None or record["status"] != EXPECTED:
                return None
            record["poll"].update(tries=item.tries, lastAnswer=said, nextPollAt=next_poll)
            return record
        self.pipeline.store.change(item.task_id, note)
        log_event("recovery-poll", item.task_id, said=said, next_poll="%gs" % delay)
        return delay

    def _end(self, item, said):
        if parse_utc((self.pipeline.store.read(item.task_id) or {}).get("poll", {}).get(
                "confirmSince")):
            reason = "--confirm: record-info did not confirm the callback: %s" % said
        else:
            reason = ("no callback came; record-info last said: %s (after %d tries)"
                      % (said, item.tries))
        hooks = bool(self.config.on_complete)

        def fail(record):
            if record is None or record["status"] != EXPECTED:
                return None
            record.update(status=FAILED, error=reason, hook=new_hook() if hooks else None)
            return record
        record = self.pipeline.store.change(item.task_id, fail, manifest=True)
        if record is not None:
            log_event("recovery-failed", item.task_id, logging.ERROR, reason=reason)
            self.pipeline.ended(record)
        self.forget(item.task_id)
        return None

    def _warn_overdue(self, task_id, record):
        if task_id in self._warned:
            return
        self._warned.add(task_id)
        waited = self.pipeline.clock.wall() - (parse_utc(record["expectedAt"])
                                               or self.pipeline.clock.wall())
        log_event("overdue", task_id, logging.WARNING, waited="%ds" % waited,
                  note="no callback came; set SUNO_API_KEY (or --api-key-file) for serve to "
                       "ask record-info, or run: cover_receiver.py fetch %s" % task_id)


class Fetch:
    """fetch: a record-info poll of each task, a "fetch" item on the
    pipeline's scheduler (one retry rule), asked every --interval while the
    task is generating, until a final answer or --wait. The answer goes the
    way of a callback: into this process's pipeline when fetch owns <dir>,
    else into the database, for the serve running on it."""

    def __init__(self, config, store, owner):
        self.config, self.store, self.client = config, store, ApiClient(config)
        if owner:
            self.pipeline = Pipeline(config, store, Metrics(), fetch=self.poll)
            self.scheduler = self.pipeline.scheduler
        else:
            self.pipeline = None
            self.scheduler = Scheduler(config, {"fetch": self.poll}, {"fetch": config.workers})
        self.results, self.generating = {}, set()      # taskId -> (word, detail)
        self.deadline = time.monotonic() + config.wait

    def start(self, task_ids):
        (self.pipeline or self.scheduler).start()
        for task_id in task_ids:
            self.scheduler.add(WorkItem("fetch", task_id, 0, 0.0, self.deadline, 0))

    def result(self, task_id):
        """(word, detail), once the task's poll and downloads are over (or --wait is).
        A poll ends by the deadline (record_info keeps to it), or a commit's
        wait for another writer (BUSY_SECONDS) later."""
        key, left = ("fetch", task_id, 0), self.deadline - time.monotonic()
        in_slices(lambda t: self.scheduler.wait_for(lambda k: k == key, t), left + BUSY_SECONDS)
        if task_id in self.results:
            return self.results[task_id]
        wait_task(self.store, self.pipeline, task_id, images_settled,
                  self.deadline - time.monotonic())
        return task_result(self.store, task_id)

    def poll(self, item):
        """One record-info request: the delay before the next, or None."""
        try:
            data = self.client.record_info(item.task_id, item.deadline)
        except ApiError as exc:
            return self._after_error(item, exc)
        self.generating.add(item.task_id)
        item.tries = 0                  # an error after this waits from 1 s again
        state = record_state(data)
        if state in ("success", "failed"):
            return self._deliver(item, data, state == "success")
        said = data.get("successFlag", data.get("status"))
        if state is None:
            return self._end(item, "error", "unexpected task state %s" % escape(said, 30))
        if time.monotonic() + self.config.interval > item.deadline:
            return self._end(item, "pending", "still generating after %g s" % self.config.wait)
        log_event("generating", item.task_id, state=said, next_poll="%gs" % self.config.interval)
        return self.config.interval

    def _after_error(self, item, exc):
        delay = self.scheduler.retry(item, exc.retry_after) if exc.retryable else None
        if delay is not None:
            log_event("api-retry", item.task_id, reason=exc, wait="%.2fs" % delay)
            return delay
        # A passing error as --wait runs out says nothing new: a task last
        # seen generating is still pending (exit 3), not an error.
        if exc.retryable and item.task_id in self.generating:
            return self._end(item, "pending", "still generating after %g s (the last poll: %s)"
                             % (self.config.wait, exc))
        return self._end(item, "error", str(exc) + (" (gave up)" if exc.retryable else ""))

    def _end(self, item, word, detail):
        self.results[item.task_id] = (word, detail)
        return None

    def _deliver(self, item, data, success):
        """The final answer, delivered; its result is read from the record
        once its downloads are over (result())."""
        try:
            callback = record_callback(item.task_id, data, success)
            if self.pipeline is not None:
                outcome, _ = self.pipeline.deliver(callback)
            else:
                outcome, _ = accept(self.store, callback, wake=True)
        except BadCallback as exc:
            return self._end(item, "error", "API answer unusable: %s" % exc)
        except Unavailable as exc:
            return self._end(item, "error", str(exc))
        log_event(outcome, item.task_id, source="record-info")
        return None

    def stop(self):
        if self.pipeline is not None:
            self.pipeline.stop(0)
        else:
            self.scheduler.stop(0, lambda: None)


# ---------------------------------------------------------------------------
# Front: one loop owns every connection until its request is whole
# ---------------------------------------------------------------------------

class Connection:
    """A client's connection, held by the front loop. Its steps: first (TLS:
    the first byte tells a handshake from plain HTTP), handshake, head, body,
    then handed to a handler thread, then send and linger."""

    def __init__(self, sock, peer, now, timeout, step):
        self.sock, self.peer, self.client, self.step = sock, peer, peer, step
        self.data = bytearray()
        self.since = now                # accepted: eviction's age
        self.deadline = now + timeout   # then its first byte + timeout (--request-timeout)
        self.scanned = 0                # bytes searched for the end of the head
        self.length = None              # the whole request's length, once its head is in
        self.reserved = 0               # body bytes counted against the front's buffer cap
        self.answer = b""
        self.linger = True              # request bytes may still come: drain before closing


class Unfinished:
    """The connections whose request is not whole yet, per client, oldest
    first: at --max-connections the client holding the most gives up its
    oldest, so no flood of idle, half-sent or dripping connections from one
    client denies another."""

    def __init__(self):
        self.by_client = {}             # client -> {connection: None}, in accept order

    def __iter__(self):
        return iter([conn for conns in self.by_client.values() for conn in conns])

    def add(self, conn):
        self.by_client.setdefault(conn.client, {})[conn] = None

    def remove(self, conn):
        conns = self.by_client.get(conn.client)
        if conns and conn in conns:
            del conns[conn]
            if not conns:
                del self.by_client[conn.client]

    def rekey(self, conn, client):
        """The connection's client is another than its peer (--trusted-proxy)."""
        self.remove(conn)
        conn.client = escape(client, 64)
        self.add(conn)

    def victim(self):
        if not self.by_client:
            return None
        return next(iter(max(self.by_client.values(), key=len)))


class Handlers:
    """The threads that answer whole requests, from memory. An answer goes
    back to the front loop through a queue, and a byte on a socket pair
    wakes the loop's select() for it."""

    def __init__(self, front):
        self.front = front
        self.answers = collections.deque()  # (connection, answer)
        self.wake_in, self.wake_out = socket.socketpair()
        for sock in (self.wake_in, self.wake_out):
            sock.setblocking(False)
        self.pool = concurrent.futures.ThreadPoolExecutor(HANDLER_THREADS, "http-handler")

    def submit(self, conn, request):
        self.pool.submit(self._handle, conn, request)

    def _handle(self, conn, request):
        try:
            answer = CallbackHandler.answer(request, conn.client, self.front)
        except Exception:               # thread boundary: the client still gets an answer
            LOG.exception("request crashed client=%s", conn.client)
            answer = canned_answer(b"500 Internal Server Error", "internal error")
        self.answers.append((conn, answer))
        self.wake()

    def wake(self):
        with contextlib.suppress(OSError):      # full: a wake-up is pending anyway
            self.wake_out.send(b"\0")

    def take(self):
        """The answers made since the last call (in the loop's thread)."""
        with contextlib.suppress(OSError):
            while self.wake_in.recv(4096):
                pass
        taken = []
        while self.answers:
            taken.append(self.answers.popleft())
        return taken

    def close(self, wait):
        self.pool.shutdown(wait=wait)
        self.wake_in.close()
        self.wake_out.close()


def listener(config):
    """The listening socket of --host and --port (:: takes IPv4 too)."""
    family, _, _, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return socket.create_server(address, family=family, backlog=128, dualstack_ipv6=(
        family == socket.AF_INET6 and socket.has_dualstack_ipv6()))


def server_tls(config):
    """The TLS context of --tls-cert and --tls-key (TLS 1.2 or later)."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2        # 3.9's default allows 1.0
    tls.load_cert_chain(config.tls_cert, config.tls_key)
    return tls


class Front:
    """The one thread that touches the server's sockets (selectors): it accepts,
    does the TLS handshake, reads each request whole (head, then body by its
    Content-Length), hands it to Handlers and sends the answer back. A socket
    and its TLS object are used by this thread alone; a slow client costs a
    descriptor and a bounded buffer, never a thread."""

    def __init__(self, config, receiver, listen_socket=None):
        self.config, self.receiver = config, receiver
        self.tls = server_tls(config) if config.tls_cert else None
        self.listener = listen_socket or listener(config)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.capacity = min(config.max_connections, Platform.socket_budget())
        self.body_cap = max(BUFFERED_BODIES, config.max_body_bytes)
        self.buffered = self.in_flight = 0
        self.conns, self.waiting = {}, Unfinished()     # every connection; those not yet whole
        self.handlers = Handlers(self)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.handlers.wake_in, selectors.EVENT_READ, "wake")
        self.thread = threading.Thread(target=self.serve, name="http", daemon=True)
        self.stopping = None            # once stopping: the deadline for answers in flight

    def close(self, wait):
        """Stop accepting; send the answers of requests already whole (for up
        to wait seconds); close the rest."""
        self.stopping = time.monotonic() + wait
        self.handlers.wake()
        if self.thread.is_alive():
            in_slices(lambda t: joined(self.thread, t), math.inf)
        else:
            self._close_all()
        self.handlers.close(wait=self.in_flight == 0)

    def serve(self):
        next_sweep = 0.0
        while self.stopping is None or self._answers_pending():
            for key, events in self.selector.select(0.1):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._take_answers()
                else:
                    self._advance(key.data, events)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + 0.1
                self._sweep(time.monotonic())
        self._close_all()

    def _answers_pending(self):
        if self.listener.fileno() != -1:            # the first pass after close()
            self.selector.unregister(self.listener)
            self.listener.close()
            for conn in self.waiting:
                self._drop(conn)
        self._take_answers()
        busy = self.in_flight or any(c.step == "send" for c in self.conns)
        return busy and time.monotonic() < self.stopping

    def _sweep(self, now):
        """Deadlines (--request-timeout; a lingering close's 2 s), the log's
        rate limit, and the receiver's heartbeat."""
        for conn in [c for c in self.conns if c.deadline <= now and c.step != "handler"]:
            if conn.step in ("head", "body"):
                self._reply(conn, canned_answer(b"408 Request Timeout", "the whole request "
                                                "did not arrive within --request-timeout"))
            else:                       # no TLS yet, an answer not taken, a lingering close
                self._drop(conn)
        self.receiver.rejections.flush()
        if self.stopping is None:
            self.receiver.tick()

    def _accept(self):
        for _ in range(64):             # a burst per wake-up; the rest on the next
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # EMFILE and the like: a full descriptor table
                self.receiver.rejections.note(503, "-", "cannot accept: %s" % os_reason(exc))
                if not self._make_room():
                    return
                continue
            if len(self.conns) >= self.capacity and not self._make_room():
                sock.close()            # every connection's request is being handled
                continue
            sock.setblocking(False)
            # A Unix socket (socket activation on a path) gives no client address.
            peer = address[0] if isinstance(address, tuple) else "local"
            conn = Connection(sock, peer, time.monotonic(), self.config.request_timeout,
                              "first" if self.tls else "head")
            self.conns[conn] = None
            self.waiting.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _make_room(self):
        """At the cap, a connection whose request is not whole gives way (Unfinished)."""
        victim = self.waiting.victim()
        if victim is None:
            return False
        if victim.step == "head" and not victim.data and not isinstance(victim.sock, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                victim.sock.send(TOO_MANY)
        self.receiver.metrics.inc("connections_cut_total")
        self._drop(victim)
        return True

    def _advance(self, conn, events):
        try:
            if conn.step == "first":
                self._first_byte(conn)
            elif conn.step == "handshake":
                self._handshake(conn)
            elif conn.step in ("head", "body"):
                self._read(conn)
            elif conn.step == "send":
                self._send(conn)
            elif conn.step == "linger" and not socket.socket.recv(conn.sock, 65536):
                self._drop(conn)        # raw: a lingering close only drains
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            pass
        except OSError:                 # reset, a failed handshake (ssl.SSLError)
            self._drop(conn)

    def _first_byte(self, conn):
        """HTTPS port: a TLS handshake record (RFC 8446 5.1) starts the
        handshake; plain HTTP is told to use https://."""
        first = conn.sock.recv(1, socket.MSG_PEEK)
        if not first:
            self._drop(conn)
            return
        conn.deadline = time.monotonic() + self.config.request_timeout
        if first != b"\x16":
            self._reply(conn, PLAIN_ON_TLS)
            return
        self.selector.unregister(conn.sock)
        conn.sock = self.tls.wrap_socket(conn.sock, server_side=True,
                                         do_handshake_on_connect=False)
        conn.step = "handshake"
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        self._handshake(conn)

    def _handshake(self, conn):
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantWriteError:
            self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return
        except ssl.SSLWantReadError:
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
            return
        self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
        conn.step = "head"
        self._read(conn)

    def _read(self, conn):
        while True:
            chunk = conn.sock.recv(65536)
            if not chunk:               # the client half-closed: what came is the request
                (self._hand_off if conn.data else self._drop)(conn)
                return
            if not conn.data and not isinstance(conn.sock, ssl.SSLSocket):
                conn.deadline = time.monotonic() + self.config.request_timeout
            conn.data += chunk
            if conn.length is None and not self._head(conn):
                return
            if len(conn.data) >= conn.length:
                self._hand_off(conn)
                return
            if not (isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending()):
                return

    def _head(self, conn):
        """Once the head is in: the request's whole length, and its client.
        False while the head is still coming (or answered here)."""
        end = HEAD_END.search(conn.data, max(0, conn.scanned - 3))
        conn.scanned = len(conn.data)
        if end is None:
            if conn.scanned > HEAD_LIMIT:
                self._reply(conn, HEAD_TOO_LONG if b"\n" in conn.data else LINE_TOO_LONG)
            return False
        head = bytes(conn.data[:end.end()])
        headers = request_headers(head)
        body = body_length(headers, self.config.max_body_bytes)
        if headers is not None and ipaddress_in(conn.peer, self.config.trusted_proxy):
            self.waiting.rekey(conn, forwarded_client(headers, self.config.trusted_proxy)
                               or conn.peer)
        if self.buffered + body > self.body_cap:
            self.receiver.rejections.note(503, conn.client, "request buffers full")
            self._reply(conn, BUFFERS_FULL)
            return False
        self.buffered += body
        conn.reserved, conn.length, conn.step = body, end.end() + body, "body"
        # A body declared and not read (too large, chunked) is still coming.
        conn.linger = not body and (headers is None or "Content-Length" in headers
                                    or "Transfer-Encoding" in headers)
        return True

    def _hand_off(self, conn):
        self.waiting.remove(conn)
        self.selector.unregister(conn.sock)
        conn.step = "handler"
        self.in_flight += 1
        conn.linger = conn.linger or len(conn.data) > (conn.length or 0)
        request = bytes(conn.data[:conn.length])
        conn.data = None
        self.handlers.submit(conn, request)

    def _take_answers(self):
        for conn, answer in self.handlers.take():
            self.in_flight -= 1
            self.buffered -= conn.reserved
            conn.reserved = 0
            self.selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            self._reply(conn, answer)

    def _reply(self, conn, answer):
        self.waiting.remove(conn)
        conn.answer, conn.step, conn.data = answer, "send", None
        conn.deadline = time.monotonic() + self.config.request_timeout
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._advance(conn, selectors.EVENT_WRITE)

    def _send(self, conn):
        sent = conn.sock.send(conn.answer)
        conn.answer = conn.answer[sent:]
        if not conn.answer and not conn.linger:
            self._drop(conn)            # the request was read whole: a close sends FIN
        elif not conn.answer:
            # A lingering close (RFC 9112 9.6): closing with unread request bytes
            # would reset the connection over the answer; drain them for 2 s.
            socket.socket.shutdown(conn.sock, socket.SHUT_WR)
            conn.step, conn.deadline = "linger", time.monotonic() + LINGER_SECONDS
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn):
        self.waiting.remove(conn)
        self.conns.pop(conn, None)
        self.buffered -= conn.reserved
        conn.reserved = 0
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def _close_all(self):
        for conn in list(self.conns):
            self._drop(conn)
        self.listener.close()
        self.selector.close()


def canned_answer(status_line, error, extra=b""):
    """A whole HTTP/1.0 answer that the front loop sends itself."""
    body = json.dumps({"status": "error", "error": error}).encode()
    return (b"HTTP/1.0 %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n"
            % (status_line, extra, len(body))) + body


TOO_MANY = canned_answer(b"503 Service Unavailable", "too many connections", b"Retry-After: 1\r\n")
BUFFERS_FULL = canned_answer(b"503 Service Unavailable", "too many request bytes buffered; "
                             "try again", b"Retry-After: 1\r\n")
PLAIN_ON_TLS = canned_answer(b"400 Bad Request", "this port speaks HTTPS: use an https:// URL")
HEAD_TOO_LONG = canned_answer(b"431 Request Header Fields Too Large",
                              "request head over %d bytes" % HEAD_LIMIT)
LINE_TOO_LONG = canned_answer(b"414 URI Too Long", "request line over %d bytes" % HEAD_LIMIT)


def request_headers(head):
    """The header fields of a request head, or None where they do not parse
    (the handler then answers as http.server does)."""
    with contextlib.suppress(http.client.HTTPException, ValueError):
        lines = head.lstrip(b"\r\n").split(b"\n", 1)
        return http.client.parse_headers(io.BytesIO(lines[1] if len(lines) > 1 else b""))
    return None


def body_length(headers, limit):
    """The body bytes to read before the handler runs: Content-Length when it
    is one number within limit, else 0 (the handler answers 400, 411 or 413
    without reading a body)."""
    if headers is None or headers.get("Transfer-Encoding") is not None:
        return 0
    values = {parse_digits(value) for value in headers.get_all("Content-Length") or ()}
    length = values.pop() if len(values) == 1 else None
    return length if length is not None and length <= limit else 0


def ipaddress_in(text, networks):
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(address in network for network in networks)


def forwarded_client(headers, trusted):
    """The client a trusted proxy names: the rightmost X-Forwarded-For entry
    that is not itself a trusted proxy, else the rightmost such RFC 7239
    Forwarded for= (the entries left of it are the client's to forge)."""
    hops = ",".join(headers.get_all("X-Forwarded-For") or ()).split(",")
    if not "".join(hops).strip():
        hops = FORWARDED_FOR.findall(",".join(headers.get_all("Forwarded") or ()))
    for hop in reversed([forwarded_node(h) for h in hops if h.strip()]):
        if not ipaddress_in(hop, trusted):
            return hop
    return None


def forwarded_node(text):
    """An address without its quotes, brackets and port: "[2001:db8::1]:4711",
    192.0.2.1:80 and 192.0.2.1 as the address alone (RFC 7239 6)."""
    text = text.strip().strip('"')
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.split(":", 1)[0] if text.count(":") == 1 else text


# ---------------------------------------------------------------------------
# Handler: one whole request, from memory
# ---------------------------------------------------------------------------

class CallbackHandler(http.server.BaseHTTPRequestHandler):
    """Parse, bound and verify one request, whole in memory (the front loop
    read it); every ReceiverError becomes its answer in dispatch(), the one
    place that maps errors to statuses."""

    server_version = "cover_receiver/" + __version__
    sys_version = ""
    protocol_version = "HTTP/1.0"       # one request per connection: no idle keep-alive
    default_request_version = "HTTP/1.0"  # never answer HTTP/0.9-style (no status line)

    @classmethod
    def answer(cls, request, client, front):
        """The whole answer to one whole request, as bytes."""
        return cls(request, (client, 0), front).wfile.getvalue()

    def setup(self):
        self.rfile, self.wfile = io.BytesIO(self.request), io.BytesIO()

    def finish(self):
        """Nothing to flush or close: the front loop sends wfile's bytes."""

    def parse_request(self):
        """The stdlib's parser, but one empty line before the request line is
        skipped (RFC 9112 2.2), and HTTP/0.x is refused: http.server would
        answer the first with silence and the second with no status line."""
        if self.raw_requestline in (b"\r\n", b"\n"):
            self.raw_requestline = self.rfile.readline(65537)
        # http.server splits on str whitespace (\x1c-\x1f too), and says
        # nothing to a request line with no word in it.
        if not str(self.raw_requestline, "iso-8859-1").split():
            self.command, self.request_version = None, self.default_request_version
            self.send_error(400, "no request line")
            return False
        if not super().parse_request():
            return False
        if self.request_version.startswith("HTTP/0."):
            self.request_version = "HTTP/1.0"
            self.send_error(505, "HTTP/1.0 or later is required")
            return False
        return True

    def dispatch(self):
        """Answer one request: the callback, /healthz or /metrics."""
        receiver, target = self.server.receiver, None
        try:
            target = request_target(self.path)
            check_headers(self.headers)
            if target.path == receiver.config.path:
                if self.command != "POST":
                    raise HttpError(405, "use POST")
                self.reply(200, receiver.handle_callback(
                    self.client_address[0], target.query, self.headers, self.read_body))
            elif self.command in ("GET", "HEAD") and target.path == "/healthz":
                self.reply(*receiver.health())
            elif self.command in ("GET", "HEAD") and target.path == "/metrics":
                self.reply(200, receiver.metrics_text(), content_type="text/plain; version=0.0.4")
            else:
                raise HttpError(404, "no such path")
        except ReceiverError as exc:
            if target and target.path == receiver.config.path and exc.reason in CALLBACK_OUTCOMES:
                receiver.metrics.inc("callbacks_total", exc.reason)
                receiver.rejections.note(exc.status, self.client_address[0], exc,
                                         logging.ERROR if exc.status == 503 else logging.WARNING)
            elif exc.status == 404 and self.command == "POST" and target:
                # A callback sent to the wrong path (a callBackUrl typo) is lost without
                # this line; the 404 itself does not name the configured path.
                receiver.rejections.note(404, self.client_address[0], "POST to %s, but the "
                                         "callback path is %s (--path)" % (
                                             escape(target.path, 100), receiver.config.path))
            self.reply(exc.status, {"status": "error", "error": str(exc)},
                       allow="POST" if exc.status == 405 else None)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = dispatch

    def read_body(self):
        config = self.server.receiver.config
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") is not None:      # RFC 9112 6.3
            if lengths:
                raise BadCallback("Transfer-Encoding and Content-Length together")
            raise HttpError(411, "Content-Length is required (no chunked bodies)")
        if not lengths:
            raise HttpError(411, "Content-Length is required")
        values = {parse_digits(value) for value in lengths}
        if None in values or len(values) > 1:
            raise BadCallback("Content-Length must be one number")
        length = values.pop()
        if length > config.max_body_bytes:
            raise HttpError(413, "body is larger than %d bytes" % config.max_body_bytes)
        types = self.headers.get_all("Content-Type") or ["application/json"]
        if len(types) > 1:                                         # RFC 9110 8.3: one value
            raise BadCallback("more than one Content-Type")
        if types[0].split(";")[0].strip().lower() != "application/json":
            raise HttpError(415, "Content-Type must be application/json")
        body = self.rfile.read(length)
        if len(body) != length:
            raise BadCallback("body is shorter than Content-Length")
        return body

    def reply(self, status, payload, content_type="application/json", allow=None):
        body = payload if isinstance(payload, str) else json.dumps(payload)
        body = body.encode("utf-8")
        # http.server writes no status line for "HTTP/0.9", which a request
        # line of four words can leave set: every answer here is HTTP/1.0.
        self.request_version = "HTTP/1.0"
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
        try:
            path = urllib.parse.urlsplit(getattr(self, "path", "")).path or "-"
        except ValueError:
            path = "-"
        if path == self.server.receiver.config.path and self.command == "POST":
            return                      # its received/duplicate/rejected line says it
        log_event("http", client=self.client_address[0], method=self.command or "-",
                  path=path, status=int(code))

    def log_message(self, format, *args):
        log_event("http-error", client=self.client_address[0], detail=format % args)


def request_target(text):
    """The request target split (origin or absolute form, RFC 9112 3.2)."""
    try:
        return urllib.parse.urlsplit(text)
    except ValueError:
        raise BadCallback("malformed request target") from None


def check_headers(headers):
    """RFC 9112 and 9110 strictness: a request whose header section does not
    parse cleanly is refused, so no two parsers can read it differently."""
    if headers.defects or headers.get_payload():     # e.g. whitespace before a colon
        raise BadCallback("malformed header section")
    for name, value in headers.raw_items():         # as received, no policy parsing
        if not HEADER_NAME.fullmatch(name):
            raise BadCallback("malformed header name %s" % escape(name, 40))
        if HEADER_VALUE_BAD.search(value):
            raise BadCallback("control character in header %s" % escape(name, 40))


class RejectionLog:
    """One line per rejected callback with its reason and client, at most
    PER_SECOND a second; the rest are counted into one summary line."""

    PER_SECOND = 5

    def __init__(self):
        self._lock = threading.Lock()
        self._second, self._logged, self._suppressed = 0, 0, 0

    def note(self, status, client, reason, level=logging.WARNING):
        with self._lock:
            self._roll()
            self._logged += 1
            if self._logged > self.PER_SECOND:
                self._suppressed += 1
                return
        log_event("rejected", level=level, status=status, client=client, reason=reason)

    def flush(self):
        with self._lock:
            self._roll()

    def _roll(self):
        second = int(time.monotonic())
        if second != self._second:
            if self._suppressed:
                log_event("rejected-more", level=logging.WARNING, count=self._suppressed,
                          note="lines suppressed in the last second")
            self._second, self._logged, self._suppressed = second, 0, 0


# ---------------------------------------------------------------------------
# Service: the running receiver, its metrics and systemd
# ---------------------------------------------------------------------------

class Receiver:
    """The running service: owns the front loop, the store (and the owner
    lock on <dir>), the pipeline and the notifier; starts and stops them in
    order."""

    def __init__(self, config, resolver=system_resolver, env=None, clock=Clock,
                 client_tls=None):
        env = os.environ if env is None else env
        self.config, self.clock = config, clock
        self.metrics = Metrics()
        self.rejections = RejectionLog()
        self.heartbeat = self.next_look = time.monotonic()
        self.requests_failing = False
        self._probe_lock = threading.Lock()
        self._probed_ok = -PROBE_CACHE_SECONDS          # monotonic time of the last good probe
        try:                            # listen first: a refused start creates nothing
            self.front = Front(config, self, inherited_socket(env))
        except ssl.SSLError as exc:
            raise UsageError("--tls-cert/--tls-key cannot be loaded: %s" % exc) from None
        except OSError as exc:
            raise UsageError("cannot listen on %s port %d: %s; choose another with --port "
                             "(or COVER_RECEIVER_PORT)"
                             % (config.host, config.port, exc.strerror or exc)) from None
        try:
            self.lock = owner_lock(config, "serve")
            self.store = open_store(config, check=True)
        except BaseException:
            self.front.close(0)
            raise
        self.pipeline = Pipeline(config, self.store, self.metrics, clock, resolver, client_tls)
        self.notifier = SystemdNotifier(env)

    @property
    def listen_address(self):
        """(host, port); (socket path, None) for a Unix socket."""
        address = self.front.address
        if isinstance(address, (str, bytes)):           # a path, or b"\0name" (abstract)
            return os.fsdecode(address).replace("\0", "@") or "unix", None
        return address[:2]

    @property
    def url(self):
        """The callback URL on this machine (for tests and the start-up log)."""
        host, port = self.listen_address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return "%s://%s:%s%s" % ("https" if self.front.tls else "http",
                                 "[%s]" % host if ":" in host else host, port, self.config.path)

    def start(self):
        if self.store.wakes_waiting():          # what commands left: in open_rows() too
            self.store.take_wakes()
        rows = self.store.open_rows()
        self.pipeline.start(rows)
        self.front.thread.start()
        self._log_listening(sum(len(missing_images(record)) for record, _ in rows))
        self.notifier.send("READY=1", "STATUS=" + self.status_line())

    def _log_listening(self, resumed):
        config, (host, port) = self.config, self.listen_address
        policy = ("only " + ",".join(config.allow_host) if config.allow_host
                  else "public-https")
        log_event("listening", host=host, port=port, path=config.path, dir=self.store.root,
                  downloads=policy, tls="on" if self.front.tls else "off", resumed=resumed,
                  signature="on" if config.hmac_key else "off",
                  token="on" if config.token else "off", connections=self.front.capacity)
        if self.store.damaged:
            log_event("database-damaged", level=logging.ERROR, note=self.store.damaged)
        if not (config.token or config.hmac_key) and port is not None and not is_loopback(host):
            log_event("unprotected", level=logging.WARNING,
                      note="anyone who finds the URL can post callbacks; set "
                           "COVER_RECEIVER_TOKEN and add ?token=<it> to your callBackUrl")

    def stop(self):
        """Stop accepting, answer requests in flight, drain downloads."""
        deadline = time.monotonic() + self.config.drain_seconds
        log_event("stopping", drain_seconds=self.config.drain_seconds,
                  note="a second stop signal exits at once")
        self.notifier.send("STOPPING=1")
        self.pipeline.hooks.stop()
        self.front.close(self.config.request_timeout)     # answers what is whole
        self.pipeline.stop(max(0.0, deadline - time.monotonic()))
        log_event("stopped", pending=self.store.counts()[PENDING])
        self.lock.release()
        self.store.close()

    def tick(self):
        """From the front loop, every 0.1 s: a heartbeat for the watchdog, the
        systemd status, and what commands left in the database for serve."""
        self.heartbeat = now = time.monotonic()
        self.notifier.tick(now, self.healthy, self.status_line)
        if now < self.next_look:
            return
        self.next_look = now + REQUEST_POLL
        try:
            if self.store.wakes_waiting():
                for record, manifest in self.store.take_wakes():
                    log_event("requested", record["taskId"], status=record["status"],
                              hook=hook_state(record) or "-")
                    self.pipeline.schedule(record, manifest)
            self.requests_failing = False
        except sqlite3.Error as exc:
            if not self.requests_failing:   # once until the database answers again
                log_event("requests-failed", level=logging.ERROR, reason=db_reason(exc))
            self.requests_failing = True

    def wake(self):
        """SIGHUP (systemctl reload): reload the TLS certificate, and look for
        what commands left now; nothing is dropped."""
        log_event("reload", note="looking for requested work now")
        self.next_look = 0.0
        if self.front.tls:              # new connections get a renewed certificate
            try:
                self.front.tls = server_tls(self.config)
                log_event("tls-reloaded", cert=self.config.tls_cert)
            except (OSError, ssl.SSLError) as exc:
                log_event("tls-reload-failed", level=logging.ERROR, cert=self.config.tls_cert,
                          reason=exc, note="the certificate in use is kept")

    def healthy(self, within):
        return time.monotonic() - self.heartbeat < within and self.pipeline.scheduler.alive()

    def status_line(self):
        downloading, retrying = self.pipeline.scheduler.counts()
        return "%d pending, %d downloading, %d waiting to retry, %d saved" % (
            self.store.counts()[PENDING], downloading, retrying,
            self.metrics.get("downloads_total", "saved"))

    # -- the endpoint ------------------------------------------------------------

    def handle_callback(self, client, query, headers, read_body):
        """One POST to the callback path: the token, the body (read_body checks
        its length and type), JSON, the signature, then deliver(). Returns the
        answer of a 200; raises a ReceiverError that dispatch maps to its status."""
        config = self.config
        if config.token:
            verify_token(config.token, query)
        body = read_body()
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadCallback("body is not JSON (or nested too deeply)") from None
        if config.hmac_key:
            verify_signature(config.hmac_key, callback_task_id(obj),
                             headers.get("X-Webhook-Timestamp"),
                             headers.get("X-Webhook-Signature"), self.clock.wall())
        callback = Callback.from_json(obj)
        outcome, record = self.pipeline.deliver(callback, confirm=config.confirm)
        self.metrics.inc("callbacks_total", outcome)
        log_event(outcome, callback.task_id, client=client, code=callback.code,
                  images=len(callback.images), msg=callback.msg,
                  **({"confirm": "record-info"} if record["status"] == EXPECTED else {}))
        return {"status": outcome, "taskId": callback.task_id}

    def health(self):
        error = self._probe_dir()
        if error:
            return 503, {"status": "error", "error": "dir not writable: %s" % error}
        counts = self.store.counts()
        downloading, retrying = self.pipeline.scheduler.counts()
        expected, overdue, _ = self.pipeline.recovery.counts()
        last = self.metrics.last_saved
        return 200, dict({"status": "ok", "version": __version__, "pending": counts[PENDING],
                          "inFlight": downloading, "expected": expected, "overdue": overdue,
                          "retrying": retrying, "corrupt": counts[CORRUPT],
                          "hooksPending": counts["hook-pending"],
                          "hooksFailed": counts["hook-failed"],
                          "lastDownloadAt": utc_now(last) if last else None},
                         **({"database": self.store.damaged} if self.store.damaged else {}))

    def _probe_dir(self):
        """Why <dir> cannot take a durable write, or None. A probe is an fsync:
        a success serves every /healthz for a second, so a flood of them cannot
        slow the callbacks' own fsyncs; a failure is probed again each time,
        so a freed disk reports ok at once."""
        with self._probe_lock:
            if time.monotonic() - self._probed_ok < PROBE_CACHE_SECONDS:
                return None
            try:
                self.store.check_file()
                self.lock.probe()
            except (OSError, sqlite3.Error) as exc:
                return db_reason(exc)
            self._probed_ok = time.monotonic()
            return None

    def metrics_text(self):
        expected, overdue, oldest = self.pipeline.recovery.counts()
        counts = self.store.counts()
        downloading, retrying = self.pipeline.scheduler.counts()
        return self.metrics.render({
            "tasks_expected": ("Tasks expected (expect, generate) with no callback yet.",
                               expected),
            "tasks_overdue": ("Expected tasks past --recover-after with no callback.", overdue),
            "oldest_pending_age_seconds": ("Age of the oldest unfinished task (0: none).",
                                           self._oldest_age(oldest)),
            "tasks_corrupt": ("Tasks whose 1.x record could not be imported (see the log).",
                              counts[CORRUPT]),
            "hooks_pending": ("Hand-offs (--on-complete) not yet done.", counts["hook-pending"]),
            "hooks_failed": ("Hand-offs that failed for good (retry --hook).",
                             counts["hook-failed"]),
            "tasks_pending": ("Tasks not yet done or failed.", counts[PENDING]),
            "downloads_in_flight": ("Images downloading now.", downloading),
            "images_retrying": ("Images waiting for their next try.", retrying)})

    def _oldest_age(self, oldest_expected):
        """Seconds since the oldest unfinished task was expected or received."""
        deadline = self.pipeline.scheduler.oldest("image")
        received = None if deadline is None else self.clock.wall() - (
            self.clock.mono() - deadline + self.config.retry_for)
        times = [t for t in (oldest_expected, received) if t is not None]
        return max(0.0, self.clock.wall() - min(times)) if times else 0.0


class Metrics:
    """Counters for /metrics and /healthz (Prometheus text format 0.0.4)."""

    HELP = {
        "callbacks_total": ("counter", "Callbacks answered, by outcome.", CALLBACK_OUTCOMES),
        "downloads_total": ("counter", "Images finished, by outcome.", ("saved", "failed")),
        "download_retries_total": ("counter", "Image download tries that will be retried.", ()),
        "downloaded_bytes_total": ("counter", "Bytes of covers saved.", ()),
        "connections_cut_total": ("counter", "Connections whose request was not whole, "
                                  "closed to make room at --max-connections.", ()),
        "api_requests_total": ("counter", "serve's record-info requests, by outcome (ok, or "
                               "the error's kind).", ("ok", "passing", "person", "unknown",
                                                      "refused")),
        "tasks_recovered_total": ("counter", "Expected tasks whose result came from "
                                  "record-info, no callback needed.", ()),
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
        """The Prometheus text exposition (version 0.0.4) of the counters
        and the gauges given, each with its HELP and TYPE lines."""
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


class SystemdNotifier:
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET."""

    def __init__(self, env):
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = parse_digits(env.get("WATCHDOG_USEC"))
        pid_ok = parse_digits(env.get("WATCHDOG_PID", str(os.getpid()))) == os.getpid()
        self.watchdog = usec / 2e6 if usec and pid_ok else None
        self.next_tick = time.monotonic() + (self.watchdog or 5.0)
        self.failing = False

    def send(self, *lines):
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)     # the front loop sends: never wait on a full queue
                sock.sendto("\n".join(lines).encode(), self.address)
            self.failing = False
        except OSError as exc:
            if not self.failing:            # once until a datagram gets through again
                log_event("notify-failed", level=logging.WARNING, reason=exc)
            self.failing = True

    def tick(self, now, healthy, status):
        """From the front loop: every half watchdog period (or 5 s) STATUS=,
        and WATCHDOG=1 only while healthy() says the loop and the workers
        are alive (a wedged process is restarted by systemd)."""
        if not self.address or now < self.next_tick:
            return
        interval = self.watchdog or 5.0
        self.next_tick = now + interval
        lines = ["STATUS=" + status()]
        if self.watchdog and healthy(interval * 2):
            lines.append("WATCHDOG=1")
        self.send(*lines)


def is_loopback(host):
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def inherited_socket(env):
    """systemd socket activation (sd_listen_fds(3)): fd 3 when it is for us."""
    if parse_digits(env.get("LISTEN_PID")) != os.getpid():
        return None
    if (parse_digits(env.get("LISTEN_FDS")) or 0) < 1:
        return None
    sock = socket.socket(fileno=3)
    sock.setblocking(True)
    return sock


# ---------------------------------------------------------------------------
# CLI: one run_* per command, and main
# ---------------------------------------------------------------------------

def owner_lock(config, who):
    """The lock on <dir> for who. serve: exit 2 when another serve holds it.
    A command: None when a serve holds it (the command hands its work over
    through the database). Either waits for a command working alone."""
    lock = OwnerLock(os.path.abspath(config.dir))
    try:
        os.makedirs(config.dir, exist_ok=True)
        if lock.take(who):
            return lock
        holder = lock.holder()
        if holder.startswith("serve "):
            if who == "serve":
                raise UsageError("another serve (pid %s) runs on --dir %s; stop it, or give "
                                 "this one another --dir" % (holder.split()[1], config.dir))
            return None
        log_event("waiting", holder=holder or "?", dir=config.dir,
                  note="another command works on this folder alone; going on when it ends")
        lock.take(who, wait=True)
        return lock
    except OSError as exc:
        raise not_writable(config.dir, exc) from None


def command_session(config, who, must_exist=False):
    """(store, lock) for a command: lock None when serve runs on <dir>."""
    if must_exist and not os.path.isdir(config.dir):
        raise UsageError("--dir %s does not exist" % config.dir)
    lock = owner_lock(config, who)
    if lock is not None and not Platform.become_owner(config.dir):
        raise UsageError("no serve runs on --dir %s, and its owner (uid %d) cannot reach it "
                         "from here (a DynamicUser= state directory): start the service, which "
                         "does the work" % (config.dir, os.stat(config.dir).st_uid))
    return open_store(config), lock


def run_serve(config, env):
    """Serve until SIGTERM or Ctrl+C; a second one while draining exits at
    once, leaving the unfinished work pending on disk as a kill would."""
    receiver = Receiver(config, env=env)
    # The handler writes nothing and takes no lock: the interrupted main thread
    # may hold a lock itself (a threading.Event's, deadlocking a SIGTERM) or be
    # inside a write to stderr, which a second write from the handler breaks
    # ("reentrant call") or which a stalled journal or full pipe never ends.
    signals = []

    def on_signal(*_):
        if signals:
            os._exit(0)         # the rest stays pending on disk, as after a kill
        signals.append(True)
    for signum in Platform.STOP_SIGNALS:
        signal.signal(signum, on_signal)
    reloads = []
    if Platform.RELOAD_SIGNAL is not None:
        signal.signal(Platform.RELOAD_SIGNAL, lambda *_: reloads.append(True))
    receiver.start()
    while not signals:
        time.sleep(0.2)             # a sleep lets Ctrl+C through on Windows
        if reloads:
            del reloads[:]
            receiver.wake()
    receiver.stop()
    return 0


def run_fetch(config, env):
    store, lock = command_session(config, "fetch")
    fetch = Fetch(config, store, owner=lock is not None)
    task_ids = tuple(dict.fromkeys(config.task_ids))
    words = set()
    try:
        fetch.start(task_ids)
        for task_id in task_ids:
            word, detail = fetch.result(task_id)
            print("%s %s: %s" % (task_id, word, detail), flush=True)
            words.add(word)
    except KeyboardInterrupt:
        return 130
    finally:
        fetch.stop()
        end_session(lock)
    return 1 if words & {"failed", "error", CORRUPT} else 3 if "pending" in words else 0


def end_session(lock):
    """A command's end: the lock on <dir> released, when it held it."""
    if lock is not None:
        lock.release()


def run_expect(config, env):
    """expect: record each TASKID as expected; a known task is left as it is."""
    store, lock = command_session(config, "expect")
    failed = False
    try:
        for task_id in dict.fromkeys(config.task_ids):
            try:
                created, record = expect(store, task_id, config.parent)
            except sqlite3.Error as exc:
                print("%s not recorded: %s" % (task_id, db_reason(exc)), flush=True)
                failed = True
                continue
            print("%s %s" % (task_id, "expected" if created else "known: %s, left as it is"
                             % record["status"]), flush=True)
    finally:
        end_session(lock)
    return 1 if failed else 0


def run_generate(config, env):
    """generate: create each music task's cover task at the API, record it as
    expected (with its parent), print 'MUSIC COVER' per line."""
    store, lock = command_session(config, "generate")
    client, refused = ApiClient(config), False
    try:
        for music_task_id in dict.fromkeys(config.task_ids):
            try:
                cover, existed = client.generate(music_task_id, config.callback_url)
            except ApiError as exc:
                refused = True
                print("%s refused: %s" % (music_task_id, exc), flush=True)
                continue
            try:
                expect(store, cover, music_task_id)
            except sqlite3.Error as exc:
                refused = True
                print("%s %s not recorded: %s; run: cover_receiver.py expect %s --parent %s"
                      % (music_task_id, cover, db_reason(exc), cover, music_task_id), flush=True)
                continue
            print("%s %s%s" % (music_task_id, cover, " (the cover task existed already)"
                               if existed else ""), flush=True)
            log_event("generated", cover, parent=music_task_id, existed="yes" if existed else "no")
    finally:
        end_session(lock)
    return 1 if refused else 0


def run_retry(config, env):
    """retry: the failed images (or, with --hook, failed hooks) of the named
    tasks, or of every failed task, tried once more now: by the serve running
    on <dir> when there is one (through the database), else here, once: a
    passing failure leaves an image pending with its next try recorded."""
    store, lock = command_session(config, "retry", must_exist=True)
    try:
        if config.hook and not (lock is None or config.on_complete):
            raise UsageError("retry --hook with no serve running on --dir needs --on-complete "
                             "(or COVER_RECEIVER_ON_COMPLETE)")
        task_ids = config.task_ids or tuple(
            r["taskId"] for r, _ in store.open_rows()
            if (hook_state(r) if config.hook else r["status"]) == FAILED)
        if not task_ids:
            print("no failed %s in %s" % ("hooks" if config.hook else "tasks", store.root))
            return 0
        left = {}
        for task_id in task_ids:
            why = None if config.hook else left_to_schedule(store, task_id)
            if why:
                left[task_id] = why
            else:
                (rerun_hook if config.hook else reopen_failed)(store, task_id)
        settled = hook_settled if config.hook else images_settled
        wait_for_tasks(config, store, lock, [t for t in task_ids if t not in left], settled, left)
    finally:
        end_session(lock)
    if config.hook:
        words = [print_hook_line(store, task_id) for task_id in task_ids]
    else:
        words = [print_task_line(store, task_id, left.get(task_id)) for task_id in task_ids]
    return 0 if set(words) == {DONE} else 1


def wait_for_tasks(config, store, lock, task_ids, settled, left):
    """Up to --wait for each task to settle: worked here, once each, with
    this command's options when it holds the lock; else by serve."""
    deadline, pipeline = time.monotonic() + config.wait, None
    if lock is not None:
        pipeline = Pipeline(config, store, Metrics(), keep_retries=False)
        pipeline.start()
        for task_id in task_ids:
            pipeline.schedule(store.read(task_id), manifest=True)
    for task_id in task_ids:
        if not wait_task(store, pipeline, task_id, settled, deadline - time.monotonic()) \
                and pipeline is None:
            left[task_id] = (PENDING, "handed to the running serve; not ended within "
                             "--wait %g s (status %s shows how it goes)" % (config.wait, task_id))
    if pipeline is not None:
        pipeline.stop(0)


def wait_task(store, pipeline, task_id, settled, seconds):
    """Whether the task's work is over within seconds: its items on this
    process's pipeline, when the command owns <dir>; else serve's, whose
    commits are read back until settled(record)."""
    seconds = max(0.0, seconds)
    if pipeline is not None:
        return in_slices(lambda t: pipeline.scheduler.wait_for(
            lambda key: key[1] == task_id, t), seconds)
    deadline = time.monotonic() + seconds
    while not settled(store.read(task_id)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(REQUEST_POLL / 2)
    return True


def images_settled(record):
    """retry's wait for a task's images is over: nothing of it is pending."""
    return record is None or record.get("status") != PENDING


def hook_settled(record):
    return record is None or hook_state(record) != PENDING


def left_to_schedule(store, task_id):
    """Why retry leaves a task as it is (pending, not failed: its schedule
    goes on), or None."""
    record = store.read(task_id)
    if record is not None and record["status"] in UNFINISHED:
        return record["status"], "not failed, so left to its schedule: %s" % (
            task_reason(record) or "its next try is due now")
    return None


def print_task_line(store, task_id, why=None):
    word, detail = why or task_result(store, task_id)
    print("%s %s: %s" % (task_id, word, detail), flush=True)
    return word


def print_hook_line(store, task_id):
    record = store.read(task_id)
    state = hook_state(record) if record else None
    detail = hook_reason(record) if state else "no hand-off recorded for this task"
    print("%s hook %s: %s" % (task_id, state or "none", detail), flush=True)
    return state


def run_status(config, env):
    """status: a summary line and every task that is not done, newest first
    (--all: every task, the summary last); --json: one object per line."""
    if not os.path.isdir(config.dir):
        raise UsageError("--dir %s does not exist" % config.dir)
    if not OwnerLock(config.dir).held():
        Platform.become_owner(config.dir)   # else root reads beside serve: its files exist
    store = open_store(config)
    if config.task_ids:
        return print_record(store, config.task_ids[0])
    records = store.all_records() if config.all else [
        r for r, _ in store.open_rows() if r["status"] != DONE or hook_state(r) in (PENDING, FAILED)]
    table = StatusTable(shutil.get_terminal_size((120, 24)).columns, config.json)
    if not config.all:
        table.summary(records, store)
    for record in records:
        table.row(record)
    if config.all:
        table.summary(None, store)
    table.flush()
    return 0


def print_record(store, task_id):
    record = store.read(task_id)
    if record is None:
        print("no task %s in %s" % (task_id, store.root), file=sys.stderr)
        return 1
    if record["status"] == CORRUPT:
        print("task %s is corrupt: %s" % (task_id, record["error"]), file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


class StatusTable:
    """status's output: rows fitted to the terminal (a long reason wrapped), or one
    JSON object per task; a summary line of tasks by status."""

    ROW = "%-32s %-8s %-6s %-24s %s"       # 80 columns with the header's REASON
    BATCH = 1000                            # lines per write to stdout

    def __init__(self, width, as_json):
        self.width, self.as_json = width, as_json
        self.counts = collections.Counter()
        self._header = not as_json
        self._lines = []

    def row(self, record):
        self.counts[record.get("status")] += 1
        if self.as_json:
            self._print(json.dumps(record))
            return
        if self._header:
            self._header = False
            self._print(self.ROW % ("TASK", "STATUS", "COVERS", "UPDATED", "REASON"))
        files = record.get("files") or []
        head = self.ROW % (record.get("taskId"), record.get("status"),
                           "%d/%d" % (len(files) - files.count(None), len(files)),
                           record.get("updatedAt") or "-", "")
        reason = task_reason(record)
        reason = escape(reason, 1000) if reason else ""
        if len(head) + len(reason) <= self.width:
            self._print(head + reason)
            return
        self._print(head.rstrip())      # the reason (and its remedy) on lines of its own
        for part in textwrap.wrap(reason, max(self.width - 4, 40)):
            self._print("    " + part)

    def _print(self, line):
        """Lines go out in batches: under PYTHONUNBUFFERED (systemd units and
        containers often set it) one print per line is one write(2) per line."""
        self._lines.append(line)
        if len(self._lines) >= self.BATCH:
            self.flush()

    def flush(self):
        if self._lines:
            sys.stdout.write("\n".join(self._lines) + "\n")
            self._lines.clear()
        sys.stdout.flush()

    def summary(self, records, store):
        """Before the rows (records given: counted first), or after them;
        then a damaged database's note, when one was set aside."""
        counts = collections.Counter(r.get("status") for r in records) if records is not None \
            else self.counts
        if not sum(counts.values()):
            text = ("every task in %s is done (status --all lists them)" % store.root
                    if store.has_tasks() else "no tasks in %s" % store.root)
        else:
            text = ", ".join("%d %s" % (counts[k], k) for k in
                             (EXPECTED, PENDING, FAILED, CORRUPT, DONE) if counts[k])
            text += "" if records is None else " (tasks not done; done ones: status --all)"
        self._print(json.dumps({"summary": dict(counts), "dir": store.root}) if self.as_json
                    else text)
        if store.damaged:
            self._print(json.dumps({"database": store.damaged}) if self.as_json
                        else "database: " + store.damaged)


def main(argv=None, env=None):
    """Run the program; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ) if env is None else env
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormat(journal=stderr_is_journal(env)))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # The format names no process or thread: skip gathering them for every
    # record (logging HOWTO, "Optimization"; logProcesses costs a getpid()).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        config = build_config(argv, env)
        handler.setFormatter(LogFormat(config.log_format == "json", stderr_is_journal(env)))
        warn_unknown_variables(env)
        commands = {"serve": run_serve, "fetch": run_fetch, "retry": run_retry,
                    "status": run_status, "expect": run_expect, "generate": run_generate}
        return commands[config.command](config, env)
    except UsageError as exc:
        print("cover_receiver: error: %s" % exc, file=sys.stderr)
        return 2
    except sqlite3.Error as exc:         # a command's database (serve checks it at start)
        print("cover_receiver: error: the database in --dir cannot be used: %s (a damaged one "
              "is set aside when serve starts)" % db_reason(exc), file=sys.stderr)
        return 1
    except SystemExit as exc:            # argparse --help / --version
        return exc.code or 0


if __name__ == "__main__":
    sys.exit(main())
