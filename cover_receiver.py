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
           -> TaskStore.accept (task.json durable: then the 200)
           -> DownloadQueue (DueHeap: each image when due) -> Fetcher (DownloadPolicy.vet)
           -> TaskStore.save_cover, end_if_saved (the record written once per task)
           -> HookRunner (--on-complete, at least once)

A passing download failure is tried again after about 1 s, doubling up to
--max-backoff, until --retry-for after the task arrived (the URLs' lifetime).
With an API key, serve asks record-info (Recovery) for an expected task (expect,
generate) that had no callback --recover-after seconds later, and saves what
it answers through the same TaskStore.accept.

Secrets are never command-line values:
    COVER_RECEIVER_HMAC_KEY   kie.ai webhook signing key (or --hmac-key-file)
    COVER_RECEIVER_TOKEN      required ?token= on the callback URL (or --token-file)
    SUNO_API_KEY              API key for fetch, generate and serve's recovery

Files: <dir>/<taskId>/task.json (the record) and cover_1.png, cover_2.jpg, ...
Exit status: 0 ok; 1 fetch/retry: a task did not end done (status: no such
task); 2 bad usage or cannot start; 3 fetch: a task is still generating when
--wait ran out.
"""

__version__ = "1.4.0"

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
import functools
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
import os
import queue
import random
import re
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import zlib

WINDOWS = os.name == "nt"       # the places that ask; see the Platform section
LINUX = sys.platform.startswith("linux")
if WINDOWS:
    import msvcrt
else:
    import fcntl
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
API_BACKOFF_CAP = 60.0          # fetch: longest wait between polls after an API error
HOOK_TIMEOUT = 60.0
CHUNK = 256 * 1024
MAX_API_ANSWER = 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024  # a task.json is a few KB; anything larger is not ours
HOOK_OUTPUT_BYTES = 8192        # a hook's output kept for the log; the rest is read and counted
HOOK_OUTPUT_LINES = 20
HOOK_RUN_ENV = "COVER_HOOK_RUN"  # marks a hook's processes, also those that left its group
PROBE_CACHE_SECONDS = 1.0       # /healthz reuses a disk probe this recent
LOCK_BUCKETS = 64               # lock files per kind in .locks (TaskLocks)
LOCK_KINDS = ("record", "images")   # .locks/record-<n>: record updates; images-<n>: downloads
CLAIM_POLL = 0.2                # seconds between tries for downloads another process holds
REQUEST_POLL = 0.2              # serve looks for work that retry handed it this often
RESCAN_SECONDS = 60.0           # serve picks up work other processes left pending this often
INDEX_DIR = ".index"            # <dir>/.index/<mark>.<taskId>: the tasks that are not done
PENDING_MARK = "pending"        # ... an unfinished task (expected or pending)
HOOK_MARK = "hook"              # ... a task whose hook is pending or failed
FAILED_MARK = "failed"          # ... a failed task
MIGRATED = ".migrated"          # <dir>/.index/.migrated: 1.2's layout was taken over
TEMP_DIR = ".tmp"               # <dir>/.tmp: task folders being built, disk probes
NEW_PREFIX = "new."             # <dir>/.tmp/new.<taskId>.<pid>.<n>: a task folder being built
LEGACY_PREFIXES = {".pending.": PENDING_MARK, ".hook.": HOOK_MARK}   # 1.2's markers in <dir>
LEGACY_TEMP = (".new.", ".probe.")                                   # 1.2's temp entries in <dir>
LOCKS_DIR = ".locks"            # <dir>/.locks/<kind>-<n>: lock files, made once (TaskLocks)
LEGACY_PENDING_DIR = ".pending"  # 1.0's index folder, migrated at start
REQUESTS_DIR = ".requests"      # <dir>/.requests/<kind>.<taskId>: work retry hands to serve
SERVE_LOCK = ".serve"           # <dir>/.locks/.serve: held while a serve runs (no taskId has a dot)
REQUEST_KINDS = ("images", "hook", "expect")   # expect.<taskId> holds the parent taskId
EXPECT_HANDOFF_WAIT = 10.0      # expect/generate: seconds to wait for the running serve to record
HEAD_LIMIT = 65536              # a request's line and header fields together
HEAD_END = re.compile(rb"\r?\n\r?\n")  # the empty line that ends a head (RFC 9112 2.1)
BUFFERED_BODIES = 64 * 1024 * 1024  # request bodies held at once (at least one --max-body-bytes)
LINGER_SECONDS = 2.0            # after an answer, unread request bytes are drained this long
HANDLER_THREADS = 16            # requests answered at once (each whole in memory)
DESCRIPTOR_RESERVE = 128        # descriptors kept from connections: downloads, files, hooks
# RFC 7239 4: the for= parameter of each Forwarded element (a token or a quoted string).
FORWARDED_FOR = re.compile(r'(?:^|[;,])\s*for\s*=\s*("[^"]*"|[^;,\s]*)', re.IGNORECASE)
PROBE_BYTES = 512               # /healthz writes and fsyncs this much: a full disk fails it
PENDING, DONE, FAILED, CORRUPT = "pending", "done", "failed", "corrupt"
EXPECTED = "expected"           # recorded by expect/generate (or --confirm): no images yet
UNFINISHED = (EXPECTED, PENDING)    # a task with a .pending.<taskId> marker
API_GAP = 1.0                   # serve: seconds between two API requests (no burst, ever)
CONFIRM_GRACE = 300.0           # --confirm: how long record-info may lag a success callback
COVER_NAME = re.compile(r"cover_([1-9][0-9]?)\.(png|jpg|webp|gif)")
COVER_EXTS = ("png", "jpg", "webp", "gif")
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


class TooSlow(ReceiverError, OSError):
    """A transfer fell under --min-rate or past its deadline. An OSError, so
    that the code reading a socket treats it as the I/O failure it is."""


class CorruptRecord(ReceiverError):
    """A task's folder or task.json is not what this program writes: a link,
    not a directory or regular file, too large, not JSON, or the wrong shape.
    Never fatal; whole_folder says whether the folder itself is the problem."""

    def __init__(self, message, whole_folder=False):
        super().__init__(message)
        self.whole_folder = whole_folder


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
    if not LOG.isEnabledFor(level):
        return
    parts = [event]
    if task is not None:
        parts.append("task=" + escape(task))
    parts.extend("%s=%s" % (key, escape(val)) for key, val in fields.items())
    # The record made here, not by LOG.log(), which looks up the caller's
    # file and line in the stack for every line: no format here prints them.
    LOG.handle(LOG.makeRecord(LOG.name, level, "", 0, " ".join(parts), None, None))


def log_crash(what, item):
    """A worker's crash, logged with its traceback; the item is dropped from
    the schedule, and its record keeps it for the next rescan."""
    LOG.exception("%s crashed task=%s", what, escape(item.task_id))
    return False


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


class Backoff:
    """The retry schedule: a gap that doubles from base to cap, with jitter
    (0.5 to 1 times the gap) so that many images do not retry in step; a
    server's Retry-After is honoured up to the cap."""

    def __init__(self, base, cap):
        self.base, self.cap = base, cap

    def delay(self, tries, retry_after=None):
        """Seconds to wait after the tries-th failed try."""
        gap = min(self.cap, self.base * 2 ** min(tries - 1, 40)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            gap = max(gap, min(retry_after, self.cap))
        return gap


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
        raise ValueError("%s is not an executable program" % escape(argv[0]))
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

    def default_for(self, command):
        return dict(self.defaults).get(command, self.default)


DOWNLOAD = ("serve", "fetch", "retry")
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
           "image (the wait doubles from 1 s up to this)", DOWNLOAD, metavar="SECONDS"),
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
    Option("hmac-key-file", None, _readable_file,
           "file holding the kie.ai signing key (or env COVER_RECEIVER_HMAC_KEY)", metavar="FILE"),
    Option("token-file", None, _readable_file,
           "file holding the ?token= secret (or env COVER_RECEIVER_TOKEN)", metavar="FILE"),
    Option("tls-cert", None, _readable_file, "certificate chain (PEM) to serve HTTPS",
           metavar="FILE"),
    Option("tls-key", None, _readable_file, "private key (PEM) to serve HTTPS", metavar="FILE"),
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
           "SUNO_API_KEY); turns on serve's recovery of expected tasks", API, metavar="FILE"),
    Option("recover-after", "600", _seconds(0), "seconds after a task became expected, with "
           "no callback, before serve asks record-info", metavar="SECONDS"),
    Option("interval", "30", _seconds(0.01), "seconds between record-info polls of a task "
           "still generating", ("serve", "fetch"), metavar="SECONDS"),
    Option("confirm", "no", _boolean, "with an API key: take a success callback's images "
           "from record-info, never from its body", flag=True, metavar="YES|NO"),
    Option("parent", None, _task_id, "the music taskId the cover tasks belong to",
           ("expect",), metavar="MUSIC_TASK_ID"),
    Option("callback-url", None, _callback_url, "the callBackUrl the API is given (this "
           "receiver's URL, with ?token=... when one is set)", ("generate",), metavar="URL"),
    Option("wait", "600", _seconds(0), "fetch: give up on a still-generating task after "
           "this; retry: wait this long for each task to end", ("fetch", "retry"),
           metavar="SECONDS", defaults=(("retry", "60"),)),
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
    retry_for: float = None
    max_backoff: float = None
    timeout: float = None
    min_rate: int = None
    max_image_bytes: int = None
    max_body_bytes: int = None
    allow_host: tuple = ()
    user_agent: str = None
    tls_cert: str = None
    tls_key: str = None
    on_complete: tuple = None
    hook_retry_for: float = None
    hook: bool = False                  # retry --hook
    all: bool = False                   # status --all
    json: bool = False                  # status --json
    drain_seconds: float = None
    max_connections: int = None
    request_timeout: float = None
    trusted_proxy: tuple = ()
    api_base: str = None
    recover_after: float = None
    interval: float = None
    confirm: bool = False
    parent: str = None
    callback_url: str = None
    wait: float = None
    # Read from files or the environment, never argv:
    hmac_key: bytes = None
    token: str = None
    api_key: str = None
    task_ids: tuple = ()
    # Not on the command line: seams the tests turn down so they need no sleeps.
    api_gap: float = API_GAP
    backoff_base: float = 1.0
    hook_timeout: float = HOOK_TIMEOUT
    rescan_seconds: float = RESCAN_SECONDS

    def __repr__(self):      # keep secrets out of any accidental print
        return "Config(command=%r, dir=%r, port=%r)" % (self.command, self.dir, self.port)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


COMMAND_HELP = {
    "fetch": "Poll the record-info API for each TASKID (key in SUNO_API_KEY) and\n"
             "download its covers as a callback would. Exit 0 all done, 1 any\n"
             "failed, 2 usage, 3 any still generating after --wait.",
    "retry": "Try the failed images of each TASKID (every failed task when none is\n"
             "named) again now; with --hook, run their failed hooks again instead.\n"
             "A serve running on --dir does the work with its own settings and\n"
             "user; with none, retry does it here. Waits up to --wait for each\n"
             "task. Exit 0 when every task (or hook) ends done, else 1.",
    "status": "List the tasks in --dir with why each failed or when it is tried\n"
              "again, or print one task's record as JSON.",
    "expect": "Record each cover TASKID created elsewhere as expected, so that a\n"
              "callback that never comes is noticed (and, with an API key, serve\n"
              "recovers it from record-info). A known task is left as it is.",
    "generate": "Create the cover task of each MUSIC_TASK_ID at the API (key in\n"
                "SUNO_API_KEY) with --callback-url, record it as expected, and\n"
                "print 'MUSIC_TASK_ID COVER_TASK_ID' per line. Exit 0 when every\n"
                "music task has a cover task, 1 when the API refused one."}
# Each command's own arguments, beside the options in OPTIONS.
COMMAND_ARGUMENTS = {
    "fetch": (("task_ids", dict(nargs="+", metavar="TASKID")),),
    "expect": (("task_ids", dict(nargs="+", metavar="TASKID")),),
    "generate": (("task_ids", dict(nargs="+", metavar="MUSIC_TASK_ID")),),
    "status": (("task_ids", dict(nargs="?", metavar="TASKID")),
               ("--all", dict(action="store_true", help="list every task, done ones too")),
               ("--json", dict(action="store_true",
                               help="one JSON object per task per line, for scripts"))),
    "retry": (("task_ids", dict(nargs="*", metavar="TASKID")),
              ("--hook", dict(action="store_true",
                              help="run the failed hooks of these tasks again now, not "
                                   "their images"))),
}


def build_parser():
    overview = __doc__.split("Options:")[0].strip()
    epilog = ("Each option also reads COVER_RECEIVER_<NAME> (--max-image-bytes -> "
              "COVER_RECEIVER_MAX_IMAGE_BYTES); the flag wins.\nSecrets come from the "
              "environment or files only: COVER_RECEIVER_HMAC_KEY, COVER_RECEIVER_TOKEN, "
              "SUNO_API_KEY.")
    parser = ArgumentParser(prog="cover_receiver.py", allow_abbrev=False, description=overview,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="cover_receiver " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="{%s}" % ",".join(COMMANDS))
    for command in COMMANDS:
        text = COMMAND_HELP.get(command, overview)
        sub = commands.add_parser(command, help=text.splitlines()[0], description=text,
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
    if not argv or argv[0] not in COMMANDS + ("--version",):
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
            raw = opt.default_for(args.command)
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


COMMANDS = ("serve", "fetch", "retry", "status", "expect", "generate")
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
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError, ValueError):
                with open("/proc/%s/environ" % pid, "rb") as handle:
                    if needle in b"\0" + handle.read():
                        os.kill(int(pid), signal.SIGKILL)

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
# Store: the only code that touches <dir>
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    """What a claim found for one image: where to get it and its schedule."""
    url: str
    tries: int
    due: float                  # unix time of the next try on disk (0: now)
    saved_as: str = None        # a cover already under its final name: adopt it


class TaskStore:
    """Task records and covers under one folder.

    A new task is built in <dir>/.tmp, its task.json fsynced, renamed into
    place and made durable by one fsync of <dir>; the rename fails when the
    task exists, which is the duplicate signal. The TaskIndex in <dir>/.index
    lists the tasks not done, so start-up, the rescan, the counts and status
    never list the years of finished tasks in <dir>; a crash leaves at most a
    stale mark, which the record it points to corrects. Locks
    on the files in <dir>/.locks (TaskLocks) serialise a task's record
    updates and keep its downloads in one process: serve, fetch and retry
    may share a folder. A task's record is written once for all its
    covers (end_if_saved), as a cover under its final name is adopted.

    Nothing on disk is trusted: every record is read through read(), which
    follows no link and checks type, size and shape; a corrupt one is noted
    (logged once, counted) and never stops the caller.
    """

    def __init__(self, root, hooks=False):
        self.root, self.hooks = os.path.abspath(root), hooks
        self.locks = os.path.join(self.root, LOCKS_DIR)
        self.index = TaskIndex(os.path.join(self.root, INDEX_DIR))
        self.tmp = os.path.join(self.root, TEMP_DIR)
        self._sync_root = SharedSync(self.root)
        self._pid = os.getpid()
        self._serial = itertools.count()        # unique temp names without getrandom()
        self._corrupt = {}                      # taskId -> why, for tasks found corrupt
        self._corrupt_lock = threading.Lock()
        self._record_locks = TaskLocks(self.locks, LOCK_KINDS[0])
        self._image_locks = TaskLocks(self.locks, LOCK_KINDS[1])

    def prepare(self):
        """Create the folder and prove it is writable (raises OSError)."""
        os.makedirs(self.root, exist_ok=True)
        for folder in (self.locks, self.index.path, self.tmp):
            own_folder(folder)
        self.probe()

    def probe(self):
        """A real small durable write: an empty file needs no data blocks, so
        it would succeed on a full disk."""
        path = self._temp_name(self.tmp, "probe")
        try:
            write_durably(path, b"\0" * PROBE_BYTES)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def task_dir(self, task_id):
        if not TASK_ID_RE.fullmatch(task_id):       # defence in depth: never leave <dir>
            raise BadCallback("bad taskId")
        return os.path.join(self.root, task_id)

    def read(self, task_id):
        """The task's record (1.0 records upgraded), or None when there is no
        such task or its folder holds no record yet. Raises CorruptRecord."""
        folder = self._checked_dir(task_id)
        return None if folder is None else self._read_in(folder, task_id)

    @staticmethod
    def _read_in(folder, task_id):
        try:
            data = read_regular_file(folder + os.sep + "task.json", MAX_RECORD_BYTES)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise CorruptRecord("task.json is not JSON") from None
        problem = record_problem(record, task_id)
        if problem:
            raise CorruptRecord("task.json " + problem)
        return record

    def note_corrupt(self, task_id, exc):
        """Remember a corrupt task for /healthz and log it, once per task."""
        with self._corrupt_lock:
            known = self._corrupt.get(task_id) == str(exc)
            self._corrupt[task_id] = str(exc)
        if not known:
            log_event("record-corrupt", task_id, logging.ERROR, reason=exc,
                      note="left as it is; a new delivery of the task repairs it")

    def corrupt_count(self):
        with self._corrupt_lock:
            return len(self._corrupt)

    def _forget_corrupt(self, task_id):
        with self._corrupt_lock:
            self._corrupt.pop(task_id, None)

    def has_tasks(self):
        """Whether <dir> holds any task: the listing stops at the first one."""
        with os.scandir(self.root) as entries:
            return any(TASK_ID_RE.fullmatch(entry.name) for entry in entries)

    def pending_count(self):
        return self.index.count(PENDING_MARK)

    def records(self):
        """Every task's record; a corrupt one as {taskId, status: corrupt, error}.
        The listing's file types spare an lstat per task (a link or a file
        goes through read(), which says what is wrong)."""
        with os.scandir(self.root) as entries:
            found = sorted((entry.name, entry.is_dir(follow_symlinks=False))
                           for entry in entries if TASK_ID_RE.fullmatch(entry.name))
        for name, is_folder in found:
            record = self._record_or_corrupt(name, is_folder)
            if record is not None:
                yield record

    def not_done(self):
        """The records of every task that is not done (expected, pending,
        failed, corrupt, or a hook not done), from the index alone: its cost
        does not grow with the done tasks. Before the index exists (a folder
        1.2 wrote, not yet started by serve) it falls back to records()."""
        if not self.index.migrated():
            return [r for r in self.records() if r["status"] != DONE
                    or hook_state(r) in (PENDING, FAILED)]
        found = []
        for task_id in sorted(set(self.index.marked()) | set(self.index.marked(FAILED_MARK))
                              | set(self.index.marked(HOOK_MARK))):
            record = self._record_or_corrupt(task_id)
            if record is not None and (record["status"] != DONE
                                       or hook_state(record) in (PENDING, FAILED)):
                found.append(record)                # a stale mark is skipped
        return found

    def _record_or_corrupt(self, task_id, is_folder=False):
        try:
            if is_folder:
                return self._read_in(self.root + os.sep + task_id, task_id)
            return self.read(task_id)
        except CorruptRecord as exc:
            return {"taskId": task_id, "status": CORRUPT, "error": str(exc)}

    # -- accepting a callback ------------------------------------------------

    def accept(self, callback, confirm=False):
        """Make callback durable. Returns ("received" | "duplicate", record).
        With confirm, a success callback's task is held as expected for
        record-info to confirm (_held); else it is delivered (_delivered).
        No answer may leave before what it reports is durable, on any path."""
        try:
            known = self._done(callback.task_id)
            if known:
                return "duplicate", known
            fresh = functools.partial(
                self._held if confirm and callback.code == 200 else self._delivered, callback)
            record = fresh(None)
            if self._create(callback.task_id, record):
                return "received", record
            return self._accept_again(callback.task_id, fresh)
        except OSError as exc:
            raise Unavailable("cannot record the task durably: %s" % os_reason(exc)) from exc

    def _delivered(self, callback, record):
        """The record a delivery makes of record (None: no task yet), or None
        when it brings nothing new (a duplicate)."""
        if record is None:
            return new_record(callback, self.hooks)
        if record["status"] == EXPECTED:
            return new_record(callback, self.hooks, expected=record)
        if record["status"] == FAILED and callback.code == 200:
            reopen_record(record, callback)
            return record
        return None

    @staticmethod
    def _held(callback, record):
        """--confirm: a success callback makes its task expected, due at
        record-info now; the body's image list is never kept."""
        now = time.time()
        if record is None or record["status"] == FAILED:
            held = new_expected_record(callback.task_id, (record or {}).get("parentTaskId"), now)
            held["poll"] = new_poll(now)
            return held
        if record["status"] == EXPECTED and not record["poll"].get("confirmSince"):
            record["poll"] = new_poll(now)
            return record
        return None

    def expect(self, task_id, parent=None):
        """Record a task created elsewhere as expected. Returns (created,
        record); a known task is left as it is. Raises CorruptRecord."""
        try:
            record = self.read(task_id)
            if record is None:
                record = new_expected_record(task_id, parent)
                if self._create(task_id, record):
                    return True, record
                record = self.read(task_id)
            return False, record
        except OSError as exc:
            raise Unavailable("cannot record the task durably: %s" % os_reason(exc)) from exc

    def note_poll(self, task_id, **fields):
        """Keep an expected task's record-info schedule in its task.json."""
        with self._record_locks.held(task_id):
            record = self.read_or_none(task_id)
            if record is None or record["status"] != EXPECTED:
                return False
            record["poll"].update(fields)
            self._write(task_id, record)
            return True

    def end_expected(self, task_id, reason):
        """An expected task that will get no images: failed, with its hand-off."""
        with self._record_locks.held(task_id):
            record = self.read_or_none(task_id)
            if record is None or record["status"] != EXPECTED:
                return None
            record.update(status=FAILED, error=reason, hook=new_hook() if self.hooks else None)
            self._write_marked(task_id, record)
            return record

    def _create(self, task_id, record):
        """Two fsyncs: task.json in a hidden folder, then <dir> after the
        folder is renamed into place. False when the task exists already."""
        building, path = self._temp_name(self.tmp, NEW_PREFIX + task_id), self.task_dir(task_id)
        os.mkdir(building)
        try:
            write_durably(os.path.join(building, "task.json"), encode_record(record))
            os.rename(building, path)
        except OSError:
            shutil.rmtree(building, ignore_errors=True)
            if os.path.lexists(path):
                return False
            raise
        if self.index.mark_for(task_id, record):
            self.index.sync()
        self._sync_root.sync()
        return True

    def _done(self, task_id):
        """The record of a done task, read without a lock: done is final, so
        its duplicate needs no write and no fsync, and is answered also by a
        <dir> remounted read-only. (Seen before its writer's fsync returned,
        a crash could only take it back to pending, which start-up finishes
        by adopting the saved covers.)"""
        try:
            record = self.read(task_id)
        except CorruptRecord:
            return None
        return record if record is not None and record["status"] == DONE else None

    def _accept_again(self, task_id, fresh):
        """A delivery for a task whose folder exists: fresh(record) is what
        to write, or None for a duplicate."""
        with self._record_locks.held(task_id):
            record = self._read_or_set_aside(task_id)
            if record is None:                  # a folder without a record: start it anew
                self._sweep(task_id)
            changed = fresh(record)
            if changed is None:
                # Another delivery may still be inside its fsync, or its fsync
                # failed: make what we are about to report durable ourselves.
                self.index.mark_for(task_id, record)         # a crash before they were made
                Platform.fsync_dir(self.task_dir(task_id))
                self.index.sync()
                self._sync_root.sync()
                return "duplicate", record
            self._write_marked(task_id, changed)
            return "received", changed

    def _read_or_set_aside(self, task_id):
        """read(), but a corrupt folder or record is moved aside (kept for the
        operator as <name>.corrupt-<ns>) and None returned: the delivery in
        hand carries all a new record needs, and covers already saved under
        their final names are adopted, not fetched again."""
        try:
            return self.read(task_id)
        except CorruptRecord as exc:
            folder = self.task_dir(task_id)
            bad = folder if exc.whole_folder else os.path.join(folder, "task.json")
            kept = "%s.corrupt-%d" % (bad, time.time_ns())
            os.rename(bad, kept)
            if exc.whole_folder:
                os.mkdir(folder)
            self._forget_corrupt(task_id)
            log_event("record-repaired", task_id, logging.ERROR, reason=exc,
                      kept=os.path.relpath(kept, self.root), note="started anew from this delivery")
            return None

    def reopen_failed(self, task_id):
        """retry: make a failed task's failed images pending again. Returns
        (reopened, record); record None when there is no such task. Raises
        CorruptRecord."""
        with self._record_locks.held(task_id):
            record = self.read(task_id)
            if record is None or record["status"] != FAILED or not record["images"]:
                return False, record
            reopen_record(record, None)
            self._write_marked(task_id, record)
            return True, record

    # -- downloading one image -------------------------------------------------

    @contextlib.contextmanager
    def claim(self, task_id, index, abort):
        """Hold image index of task_id for one downloader. Yields a Job, or
        None when there is nothing left to do for it."""
        while not self._image_locks.acquire(task_id, shared=True, wait=False):
            if abort.wait(CLAIM_POLL):          # another process has it: wait for it
                raise Aborted("stopping")
        try:
            record = self.read_or_none(task_id)
            if record is None or index not in missing_images(record):
                yield None
                return
            yield Job(record["images"][index], record["tries"][index],
                      parse_utc(record["nextTryAt"][index]) or 0.0,
                      saved_covers(self.task_dir(task_id)).get(index))
        finally:
            self._image_locks.release(task_id)

    def save_cover(self, task_id, index, write):
        """Run write(file) into a hidden temp file, then fsync and rename it to
        cover_<n>.<ext>. write returns the detected extension. Returns (what
        settle returns, bytes saved). A local failure (a full disk, a folder
        it may not write) is a Retryable saying so."""
        path = self._checked_dir(task_id, must_exist=True)
        part = os.path.join(path, ".cover_%d.part" % (index + 1))
        try:
            out = FileOut(Platform.open_here(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            try:
                ext = write(out)
                os.fsync(out.fd)
            finally:
                os.close(out.fd)
            name = "cover_%d.%s" % (index + 1, ext)
            final = os.path.join(path, name)
            try:
                Platform.retry_sharing(os.replace, part, final)
            except IsADirectoryError:   # a folder planted there: a rename cannot replace it
                remove_entry(final)
                os.replace(part, final)
        except OSError as exc:
            self._remove_part(part)
            raise Retryable("cannot save cover_%d: %s" % (index + 1, os_reason(exc))) from None
        except BaseException:
            self._remove_part(part)
            raise
        # No fsync of the folder here: the record write that ends the task
        # fsyncs it, which makes this rename durable too.
        return self.end_if_saved(task_id), out.size

    def end_if_saved(self, task_id):
        """After a cover's rename: end the task if every image it still misses
        is saved. So task.json is written once per task (two fsyncs, which
        make each cover's rename durable too), not once per image: until then
        it need not list a saved cover, as one under its final name is
        adopted after a crash, not fetched again. Each saver renames before it
        looks, and a failure writes before it looks (settle), so the last one
        to finish always sees every other's work. Returns what settle() does."""
        record = self.read_or_none(task_id)
        missing = missing_images(record) if record else []
        saved = saved_covers(self.task_dir(task_id)) if missing else {}
        if not missing or not set(missing) <= set(saved):
            return None
        return self.settle(task_id, missing[0], name=saved[missing[0]], saved=saved)

    def settle(self, task_id, index, name=None, error=None, tries=None, saved=None):
        """Record image index as saved (name) or failed for good (error, after
        tries). saved: saved_covers() just now (covers are only ever added
        while a task is pending). Returns the task's new status when this
        ended the task, else None."""
        def change(record):
            record["files"][index], record["errors"][index] = name, error
            record["nextTryAt"][index] = None
            record["tries"][index] = record["tries"][index] if tries is None else tries
            if missing_images(record):
                return None
            failed = [e for e in record["errors"] if e]
            record["status"] = FAILED if failed else DONE
            record["error"] = "; ".join(failed) if failed else None
            record["hook"] = new_hook() if self.hooks else None
            return record["status"]
        ended = self._update(task_id, index, change, saved)
        if error is not None and ended is None:     # a cover saved meanwhile left it to us
            ended = self.end_if_saved(task_id)
        return ended

    def postpone(self, task_id, index, reason, tries, due):
        """Image index failed a try for a passing reason: try again at due."""
        def change(record):
            record["tries"][index], record["lastError"][index] = tries, reason
            record["nextTryAt"][index] = utc_now(due)
        self._update(task_id, index, change)

    # -- the hand-off ------------------------------------------------------------

    def update_hook(self, task_id, **fields):
        """Record one hook run (or a retry --hook) in the task's record. Returns
        the new hook, or None when the task has no hook to run any more."""
        with self._record_locks.held(task_id):
            record = self.read_or_none(task_id)
            if record is None or not record.get("hook"):
                return None
            record["hook"].update(fields)
            self._write(task_id, record)
            if record["hook"]["status"] == DONE:
                self.index.unmark(task_id, HOOK_MARK)
            return record["hook"]

    def hook_work(self, known=()):
        """(hooks to run as [(taskId, due, endedAt, tries)] in unix times,
        taskIds whose hook failed), from the hook markers."""
        work, failed = [], set()
        for task_id in self.index.marked(HOOK_MARK):
            record = None if task_id in known else self.read_or_none(task_id)
            state = hook_state(record) if record else None
            if state == PENDING:
                hook = record["hook"]
                work.append((task_id, parse_utc(hook["nextTryAt"]) or 0.0,
                             parse_utc(hook["endedAt"]) or 0.0, hook["tries"]))
            elif state == FAILED:
                failed.add(task_id)
            elif record is not None:            # done, or reopened since
                self.index.unmark(task_id, HOOK_MARK)
        return work, failed

    # -- start-up --------------------------------------------------------------

    def recover(self, expected=None):
        """Start-up sweep: remove what dead writers left (temp folders and
        files, 1.3's lock files), take over an older layout once, and return the
        pending work as pending_jobs() gives it. It lists .tmp, .locks and
        .index, never <dir> itself (but for the one take-over)."""
        for name in os.listdir(self.tmp):
            self._never_fatal(name, remove_entry, os.path.join(self.tmp, name))
        for name in os.listdir(self.locks):
            self._never_fatal(name, self._remove_stale_lock, name)
        if not self.index.migrated():
            self._migrate()
        for task_id in self.index.marked():
            self._never_fatal(task_id, self._sweep_locked, task_id)
        return self.pending_work(expected=expected)

    def _remove_stale_lock(self, name):
        """A lock file of 1.3 or older (one per task, present while held)
        that no process holds."""
        if name == SERVE_LOCK or TaskLocks.owns(name):
            return
        lock = LockFile(os.path.join(self.locks, name))
        if lock.acquire(wait=False):
            lock.release()
            remove_entry(lock.path)

    def _sweep_locked(self, task_id):
        with self._record_locks.held(task_id):
            with contextlib.suppress(CorruptRecord):    # pending_work() notes it
                self._sweep(task_id)

    @staticmethod
    def _never_fatal(name, action, *args):
        """Start-up goes on past one entry it cannot clean (a root-owned folder)."""
        try:
            action(*args)
        except OSError as exc:
            log_event("sweep-failed", level=logging.ERROR, entry=name, reason=os_reason(exc))

    def pending_work(self, known=(), expected=None):
        """pending_jobs() of the pending tasks not in known, and the records
        of expected ones appended to expected; markers of tasks that ended
        are removed, those of corrupt tasks kept."""
        work = []
        for task_id in self.index.marked():
            if task_id in known:
                continue
            try:
                record = self.read(task_id)
            except CorruptRecord as exc:
                self.note_corrupt(task_id, exc)
                continue
            if record is None or record["status"] not in UNFINISHED:
                self.index.unmark(task_id, PENDING_MARK)
                self._forget_corrupt(task_id)
            elif record["status"] == EXPECTED and expected is not None:
                expected.append(record)
            work += pending_jobs(record)
        return work

    # -- internals ---------------------------------------------------------------

    def _checked_dir(self, task_id, must_exist=False):
        """The task's folder if it is a real folder; None when absent (or
        FileNotFoundError with must_exist). Raises CorruptRecord for anything
        else there: a link is never followed out of <dir>."""
        path = self.task_dir(task_id)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            if must_exist:
                raise
            return None
        if stat.S_ISLNK(info.st_mode):
            raise CorruptRecord("the task folder is a link", whole_folder=True)
        if not stat.S_ISDIR(info.st_mode):
            raise CorruptRecord("the task folder is not a folder", whole_folder=True)
        return path

    def read_or_none(self, task_id):
        """read(), a corrupt record noted and taken as none."""
        try:
            return self.read(task_id)
        except CorruptRecord as exc:
            self.note_corrupt(task_id, exc)
            return None

    def _update(self, task_id, index, change, saved=None):
        with self._record_locks.held(task_id):
            record = self.read_or_none(task_id)
            if record is None or record["status"] != PENDING or index >= len(record["files"]):
                return None
            if saved is None:
                saved = saved_covers(self.task_dir(task_id))
            for adopted, name in saved.items():
                if adopted in missing_images(record):   # renamed since the last write
                    record["files"][adopted] = name
            ended = change(record)
            marked = ended and self.index.mark_for(task_id, record)   # before the write
            self._write(task_id, record)
            if ended:
                if marked:
                    self.index.sync()         # durable before the pending mark goes
                self.index.unmark(task_id, PENDING_MARK)
            return ended

    def _write_marked(self, task_id, record):
        """_write() a record that a callback, retry or recovery changed. The
        pending mark comes first, so a crash mid-write leaves a task that
        start-up sweeps; the marks the new record does not need go after."""
        self.index.mark(task_id, PENDING_MARK)
        self.index.mark_for(task_id, record)
        self._write(task_id, record)
        if record["status"] not in UNFINISHED:
            self.index.unmark(task_id, PENDING_MARK)
        if record["status"] != FAILED:
            self.index.unmark(task_id, FAILED_MARK)
        if hook_state(record) is None:          # reopened: its old hand-off is moot
            self.index.unmark(task_id, HOOK_MARK)
        self.index.sync()

    def _temp_name(self, folder, prefix):
        return os.path.join(folder, "%s.%d.%d" % (prefix, self._pid, next(self._serial)))

    def _sweep(self, task_id):
        """Remove temp files nobody is writing (caller holds the task lock)."""
        path = self._checked_dir(task_id)
        if path is None:
            return
        parts = []
        for entry in os.scandir(path):
            if entry.name.startswith(".task.json."):
                remove_entry(entry.path)
            elif entry.name.startswith(".cover_") and entry.name.endswith(".part"):
                parts.append(entry.path)
        if parts and self._image_locks.acquire(task_id, wait=False):   # else a live
            for part in parts:                                          # downloader owns them
                self._remove_part(part)
            self._image_locks.release(task_id)

    @staticmethod
    def _remove_part(part):
        with contextlib.suppress(OSError):
            remove_entry(part)

    def _write(self, task_id, record):
        """Atomic replace: temp file, fsync, rename, fsync of the folder."""
        path = self._checked_dir(task_id, must_exist=True)
        record["updatedAt"] = utc_now()
        tmp = self._temp_name(path, ".task.json")
        try:
            write_durably(tmp, encode_record(record))
            Platform.retry_sharing(os.replace, tmp, os.path.join(path, "task.json"))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        Platform.fsync_dir(path)

    def _migrate(self):
        """Once: take over 1.2's markers in <dir> (and 1.0's .pending/ folder),
        remove its temp entries, and mark every failed task by reading each
        record. The one time <dir> itself is listed; .migrated ends it."""
        names = os.listdir(self.root)
        tasks = sum(1 for name in names if TASK_ID_RE.fullmatch(name))
        if tasks:
            log_event("index-migrating", tasks=tasks, note="once: reads every task.json")
        legacy = os.path.join(self.root, LEGACY_PENDING_DIR)
        if os.path.isdir(legacy) and not os.path.islink(legacy):
            names += [".pending." + n for n in os.listdir(legacy)]
        for name in names:
            prefix = next((p for p in LEGACY_PREFIXES if name.startswith(p)), None)
            if prefix and TASK_ID_RE.fullmatch(name[len(prefix):]):
                self.index.mark(name[len(prefix):], LEGACY_PREFIXES[prefix])
            elif TASK_ID_RE.fullmatch(name):
                record = self.read_or_none(name)
                if record is not None:
                    self.index.mark_for(name, record)
        self.index.sync()
        for name in names:
            if name.startswith(tuple(LEGACY_PREFIXES) + LEGACY_TEMP):
                self._never_fatal(name, remove_entry, os.path.join(self.root, name))
        shutil.rmtree(legacy, ignore_errors=True)
        write_durably(os.path.join(self.index.path, MIGRATED), b"")
        self.index.sync()


class TaskIndex:
    """<dir>/.index: an empty file per task that is not done, named
    <mark>.<taskId> (pending, failed, hook), so that what is unfinished is
    listed without listing the years of finished tasks in <dir>. The record
    is the truth and a mark a hint: a mark is made before the record write
    that needs it (then sync()) and removed after the one that ends it."""

    def __init__(self, path):
        self.path = path
        self._sync = SharedSync(path)

    def marked(self, mark=PENDING_MARK):
        """The taskIds with that mark (a listing of .index only)."""
        prefix = mark + "."
        return sorted(n[len(prefix):] for n in os.listdir(self.path) if n.startswith(prefix)
                      and TASK_ID_RE.fullmatch(n[len(prefix):]))

    def count(self, mark):
        try:
            return len(self.marked(mark))
        except OSError:
            return 0

    def migrated(self):
        """Whether the index holds every task not done (1.2's layout taken over)."""
        return os.path.exists(os.path.join(self.path, MIGRATED))

    def mark(self, task_id, mark):
        """The caller syncs, which makes the mark durable."""
        os.close(Platform.open_here(self._entry(task_id, mark), os.O_WRONLY | os.O_CREAT))

    def unmark(self, task_id, mark):
        with contextlib.suppress(FileNotFoundError):
            remove_entry(self._entry(task_id, mark))

    def mark_for(self, task_id, record):
        """Make the marks record needs (the caller syncs); True when it needs any."""
        marks = [mark for mark, needed in (
            (PENDING_MARK, record["status"] in UNFINISHED), (FAILED_MARK, record["status"] == FAILED),
            (HOOK_MARK, hook_state(record) in (PENDING, FAILED))) if needed]
        for mark in marks:
            self.mark(task_id, mark)
        return bool(marks)

    def sync(self):
        self._sync.sync()

    def _entry(self, task_id, mark):
        return os.path.join(self.path, "%s.%s" % (mark, task_id))


class SharedSync:
    """fsync of one folder, shared by the threads that need it at once (group
    commit). A caller needs an fsync that began after its own change. It
    starts one at once unless two are running (so one slow fsync never holds
    back the next caller), else it waits, and the next fsync then serves
    every caller that came meanwhile: eight callbacks arriving together cost
    about three fsyncs, not eight. A failed fsync serves nobody: those who
    waited on it need a newer one."""

    MAX_RUNNING = 2

    def __init__(self, path):
        self.path = path
        self._cond = threading.Condition()
        self._started = self._synced = self._failed = 0     # generations: begun, newest ok, newest failed
        self._running = 0

    def sync(self):
        with self._cond:
            needed = self._started + 1          # one that begins after this change
            while self._synced < needed:
                if self._failed >= needed:
                    needed = self._started + 1  # what served us failed: a newer one
                if self._started >= needed or self._running >= self.MAX_RUNNING:
                    self._cond.wait()
                    continue
                self._started += 1
                self._run(self._started)

    def _run(self, generation):
        """Called and returning with the condition held."""
        self._running += 1
        self._cond.release()
        ok = False
        try:
            Platform.fsync_dir(self.path)
            ok = True
        finally:
            self._cond.acquire()
            self._running -= 1
            if ok:
                self._synced = max(self._synced, generation)
            else:
                self._failed = max(self._failed, generation)
            self._cond.notify_all()


class LockFile:
    """An exclusive lock shared by threads and processes, on a file that
    stays. flock and msvcrt.locking locks belong to one open file, so two
    threads exclude each other as two processes do, and the OS drops the
    lock with its process, also on kill -9."""

    def __init__(self, path):
        self.path, self.fd = path, None

    def acquire(self, wait=True):
        fd = Platform.open_here(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            locked = Platform.lock(fd, wait)
        except BaseException:
            os.close(fd)
            raise
        if locked:
            self.fd = fd
        else:
            os.close(fd)
        return locked

    def release(self):
        fd, self.fd = self.fd, None
        Platform.unlock(fd)


class LockBucket:
    """One of TaskLocks' lock files, locked while any thread of this process
    holds a task that hashes to it."""

    def __init__(self, path):
        self.file, self.holders = LockFile(path), 0
        self.turn = threading.Lock()    # one thread at a time locks the file

    def join(self, wait):
        with self.turn:
            if not self.holders and not self.file.acquire(wait):
                return False
            self.holders += 1
            return True

    def leave(self):
        with self.turn:
            self.holders -= 1
            if not self.holders:
                self.file.release()


class TaskLocks:
    """Locks by taskId for the processes sharing a <dir> (serve, fetch,
    retry), on a fixed set of lock files made once and never deleted:
    .locks/<kind>-<n>, n = crc32(taskId) mod LOCK_BUCKETS (hash() differs
    between processes). A lock file made and deleted per task cost a
    catch-up a tenth of its pace (bench/README.md). In this process each
    taskId is held on its own, exclusively or shared, so threads on two
    tasks never wait for each other; across processes a task's bucket is
    what they take turns on. No thread waits for one of these locks while it
    holds another of the same kind, so a shared bucket cannot deadlock."""

    def __init__(self, folder, kind):
        self._buckets = [LockBucket(os.path.join(folder, "%s-%d" % (kind, n)))
                         for n in range(LOCK_BUCKETS)]
        self._holders = {}              # taskId -> threads holding it here (-1: exclusive)
        self._changed = threading.Condition()

    @staticmethod
    def owns(name):
        """Whether name in .locks is one of the lock files of some TaskLocks."""
        kind, _, n = name.partition("-")
        return kind in LOCK_KINDS and n.isdigit() and int(n) < LOCK_BUCKETS

    @contextlib.contextmanager
    def held(self, task_id):
        self.acquire(task_id)
        try:
            yield
        finally:
            self.release(task_id)

    def acquire(self, task_id, shared=False, wait=True):
        """Hold task_id; False when wait is False and it is held elsewhere."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._free(task_id, shared),
                                          None if wait else 0):
                return False
            self._holders[task_id] = self._holders.get(task_id, 0) + 1 if shared else -1
        joined = False
        try:
            joined = self._bucket(task_id).join(wait)
        finally:
            if not joined:
                self._let_go(task_id)
        return joined

    def release(self, task_id):
        self._bucket(task_id).leave()
        self._let_go(task_id)

    def _free(self, task_id, shared):
        holders = self._holders.get(task_id, 0)
        return holders == 0 or (shared and holders > 0)

    def _bucket(self, task_id):
        return self._buckets[zlib.crc32(task_id.encode()) % LOCK_BUCKETS]

    def _let_go(self, task_id):
        with self._changed:
            holders = self._holders.pop(task_id)
            if holders > 1:
                self._holders[task_id] = holders - 1
            self._changed.notify_all()


def open_store(config):
    """The store for --dir, created and proven writable, or a UsageError."""
    store = TaskStore(config.dir, hooks=bool(config.on_complete))
    try:
        store.prepare()
    except OSError as exc:
        raise UsageError("--dir %s is not writable: %s"
                         % (config.dir, exc.strerror or exc)) from None
    return store


def own_folder(path):
    """Make the store's own folder at path; whatever else stands there (a
    link, never followed; a file) is removed first and logged."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            log_event("store-entry-removed", level=logging.ERROR, path=path,
                      reason="not a folder (a link?)")
            remove_entry(path)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)


def existing_store(config):
    """The store for --dir of a command that only acts on tasks already there:
    a misspelt --dir is a usage error, never a new empty folder."""
    if not os.path.isdir(config.dir):
        raise UsageError("--dir %s does not exist" % config.dir)
    return open_store(config)


class RequestBox:
    """How retry hands work to a serve running on the same <dir>, on every
    platform. serve holds <dir>/.locks/.serve locked while it runs (the OS
    drops the lock with the process, also on kill -9), which is how retry
    knows it is alive. retry then leaves one empty file per task in
    <dir>/.requests, named <kind>.<taskId>; serve lists that folder, almost
    always empty, five times a second (and at once on SIGHUP), does the work
    with its own settings and as its own user, and removes the file. So
    only serve writes task files, and they keep the service's owner."""

    def __init__(self, store):
        self.folder = os.path.join(store.root, REQUESTS_DIR)
        self._lock = LockFile(os.path.join(store.locks, SERVE_LOCK))

    def open(self):
        """serve: make the folder and hold the lock (a second serve on the
        same <dir> takes requests too, without the lock)."""
        own_folder(self.folder)
        if not self._lock.acquire(wait=False):
            log_event("second-serve", level=logging.WARNING, dir=os.path.dirname(self.folder),
                      note="another serve runs on this folder; both take its work")

    def close(self):
        if self._lock.fd is not None:
            self._lock.release()

    def serve_running(self):
        """True when a serve holds the lock and has made the folder."""
        probe = LockFile(self._lock.path)
        if probe.acquire(wait=False):
            probe.release()
            return False
        return os.path.isdir(self.folder)

    def post(self, kind, task_id, content=b""):
        fd = Platform.open_here(self._path(kind, task_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                0o644)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)

    def content(self, kind, task_id):
        """What a request holds (expect: the parent taskId), b"" when unreadable."""
        try:
            return read_regular_file(self._path(kind, task_id), 200)
        except (OSError, CorruptRecord):
            return b""

    def waiting(self, kind, task_id):
        return os.path.lexists(self._path(kind, task_id))

    def take(self):
        """serve: the requests left, as (kind, taskId, done) where done()
        removes the request once its work is in hand."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        taken = []
        for name in names:
            kind, _, task_id = name.partition(".")
            done = functools.partial(self._remove, os.path.join(self.folder, name))
            if kind in REQUEST_KINDS and TASK_ID_RE.fullmatch(task_id):
                taken.append((kind, task_id, done))
            else:
                done()                  # not ours: never acted on
        return taken

    def _path(self, kind, task_id):
        if not TASK_ID_RE.fullmatch(task_id):
            raise BadCallback("bad taskId")
        return os.path.join(self.folder, "%s.%s" % (kind, task_id))

    @staticmethod
    def _remove(path):
        with contextlib.suppress(OSError):
            remove_entry(path)


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


def write_durably(path, data):
    """Create path holding data and fsync it."""
    out = FileOut(Platform.open_here(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    try:
        out.write(data)
        os.fsync(out.fd)
    finally:
        os.close(out.fd)


# ---------------------------------------------------------------------------
# Records: task.json built, checked and read out
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
# The checks below compare sets and tuples of types (map and set run in C):
# status --all checks every record, and a loop per value would double its cost.
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


def saved_covers(folder):
    """{index: name} of the covers saved under their final names in folder:
    regular files only (a link is not followed), the first extension in
    COVER_EXTS order when there are two."""
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            match = COVER_NAME.fullmatch(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                found.setdefault(int(match.group(1)) - 1, []).append(match.group(2))
    return {index: "cover_%d.%s" % (index + 1, min(exts, key=COVER_EXTS.index))
            for index, exts in found.items()}


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


def pending_jobs(record):
    """The record's images still to download, as DownloadQueue jobs
    (taskId, index, due, tries, received): due is the unix time of its
    scheduled next try, received the task's."""
    received = parse_utc(record["receivedAt"]) or 0.0
    return [(record["taskId"], i, parse_utc(record["nextTryAt"][i]) or 0.0,
             record["tries"][i], received) for i in missing_images(record)]


def task_result(store, task_id):
    """(word, detail) for a task's record: done, failed, pending or corrupt."""
    try:
        record = store.read(task_id)
    except CorruptRecord as exc:
        return CORRUPT, str(exc)
    if record is None:
        return "error", "no task %s in %s" % (task_id, store.root)
    if record["status"] == DONE:
        return "done", "%d covers in %s" % (len(record["files"]), store.task_dir(task_id))
    if record["status"] == FAILED:
        return "failed", record.get("error") or "failed"
    if record["status"] == EXPECTED:
        return EXPECTED, task_reason(record)
    return "pending", task_reason(record) or "downloads unfinished"


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
# Workers: the due-time schedule, the download queue, the hook runner
# ---------------------------------------------------------------------------

class DueHeap:
    """Work due at monotonic times, taken in time order by worker threads:
    the schedule that the download queue and the hook runner share. An item
    (with .key and .due) is queued once; take() moves it to running, and
    finish() puts it back when it is due again. One condition wakes takers
    (new work, stopping) and waiters (work finished)."""

    def __init__(self, clock):
        self.clock = clock
        self.lock = threading.Condition()
        self.queued, self.running = {}, {}          # key -> item
        self._heap, self._serial, self.stopping = [], itertools.count(), False

    def from_wall(self, when, cap=None):
        """A unix time read from disk as a monotonic one; with cap, never
        further ahead than cap seconds (the wall clock may have stepped)."""
        ahead = when - self.clock.wall()
        return self.clock.mono() + (ahead if cap is None else min(max(0.0, ahead), cap))

    def add(self, item, sooner=False):
        """Queue item unless its key is queued or running (or stopping); with
        sooner, a queued item of that key due later is replaced by it."""
        with self.lock:
            queued = self.queued.get(item.key)
            if sooner and queued is not None and item.due < queued.due:
                queued = None           # its heap entry is skipped when it comes up
            if queued is not None or item.key in self.running or self.stopping:
                return False
            self._push(item)
            return True

    def take(self):
        """The next due item, waiting for it; None once stopping."""
        with self.lock:
            while not self.stopping:
                now = self.clock.mono()
                if self._heap and self._heap[0][0] <= now:
                    item = heapq.heappop(self._heap)[2]
                    if self.queued.get(item.key) is not item:
                        continue                # replaced by a sooner one
                    del self.queued[item.key]
                    self.running[item.key] = item
                    return item
                self.lock.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def finish(self, item, again):
        with self.lock:
            del self.running[item.key]
            if again and not self.stopping:
                self._push(item)
            self.lock.notify_all()

    def keys(self):
        with self.lock:
            return set(self.queued) | set(self.running)

    def work(self, handle, crashed):
        """A worker thread's loop until stop(): handle(item) each due item,
        True to queue it again at item.due. The thread's boundary: an
        exception goes to crashed(item), which logs it and says the same
        (log_crash: log it, and leave the item to the next rescan)."""
        while True:
            item = self.take()
            if item is None:
                return
            again = False
            try:
                again = handle(item)
            except Exception:
                again = crashed(item)
            finally:
                self.finish(item, again)

    def wait(self, predicate, timeout=None):
        with self.lock:
            return self.lock.wait_for(predicate, timeout)

    def stop(self):
        with self.lock:
            self.stopping = True
            self.lock.notify_all()

    def _push(self, item):
        self.queued[item.key] = item
        heapq.heappush(self._heap, (item.due, next(self._serial), item))
        self.lock.notify_all()


@dataclasses.dataclass
class QueuedImage:
    """One image in the DownloadQueue; its times are monotonic."""
    task_id: str
    index: int
    due: float              # its next try
    deadline: float         # --retry-for after the task was received
    tries: int              # failed tries on disk when queued or last tried here; a
                            # different count there means another process tried it

    @property
    def key(self):
        return self.task_id, self.index


class DownloadQueue:
    """Worker threads fed images from a heap ordered by due time, so an image
    waiting for its next try holds no thread. An image is never queued twice;
    after a passing failure it goes back in, due at its next try
    (retry_later), until the --retry-for deadline or --attempts. Waits and
    deadlines run on the monotonic clock; a next try read from disk is never
    further ahead than --max-backoff, whatever the wall clock did since."""

    def __init__(self, config, store, fetcher, metrics, on_task_end, retry_later=True,
                 clock=Clock):
        self.config, self.store, self.fetcher, self.metrics = config, store, fetcher, metrics
        self.on_task_end, self.retry_later, self.clock = on_task_end, retry_later, clock
        self.backoff = Backoff(config.backoff_base, config.max_backoff)
        self.abort = AbortSignal()
        self.due = DueHeap(clock)
        self._stuck = set()           # ended, but task.json could not say so: left pending
        self._threads = [threading.Thread(target=self._work, name="download-%d" % n, daemon=True)
                         for n in range(config.workers)]

    def start(self):
        for thread in self._threads:
            thread.start()

    def put(self, jobs):
        """Queue pending_jobs(); an image already queued or running stays as it is."""
        cap, retry_for = self.config.max_backoff, self.config.retry_for
        for task_id, index, due, tries, received in jobs:
            if self.due.add(QueuedImage(task_id, index, self.due.from_wall(due, cap),
                                        self.due.from_wall(received + retry_for), tries)):
                with self.due.lock:
                    self._stuck.discard((task_id, index))

    @property
    def in_flight(self):
        return len(self.due.running)

    def oldest_received(self):
        """The unix time the oldest task with an image queued here was received."""
        with self.due.lock:
            items = list(self.due.queued.values()) + list(self.due.running.values())
        if not items:
            return None
        return self.clock.wall() - (self.clock.mono() - min(i.deadline for i in items)
                                    + self.config.retry_for)

    def waiting(self):
        """Images waiting for a later try."""
        now = self.clock.mono()
        with self.due.lock:
            return sum(1 for item in self.due.queued.values() if item.due > now)

    def tasks(self):
        """Tasks this queue holds or gave up recording: a rescan leaves them be."""
        with self.due.lock:
            return {key[0] for key in self.due.keys() | self._stuck}

    def alive(self):
        return all(thread.is_alive() for thread in self._threads)

    def wait_task(self, task_id, timeout=None):
        """Block until no image of task_id is queued or running."""
        return self.due.wait(lambda: all(key[0] != task_id for key in self.due.keys()), timeout)

    def stop(self, drain_seconds):
        """Take no new jobs, give running ones drain_seconds, abort the rest;
        what is left stays pending on disk."""
        self.due.stop()
        self.due.wait(lambda: not self.due.running, drain_seconds)
        self.abort.fire()
        deadline = time.monotonic() + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self):
        self.due.work(self._handle, self._crashed)

    def _handle(self, item):
        try:
            return self._download(item) and self.retry_later
        except Aborted:
            log_event("download-aborted", item.task_id, image=item.index + 1, note="left pending")
            return False

    def _crashed(self, item):
        """Log, keep the worker, never lose the job."""
        LOG.exception("download crashed task=%s image=%d", escape(item.task_id), item.index + 1)
        item.due = self.clock.mono() + self.backoff.delay(5)
        return self.retry_later

    def _download(self, item):
        """One try at one image. True: queue it again, at item.due."""
        try:
            return self._try(item)
        except OSError as exc:      # the store could not be read or written: keep the schedule
            self._record_failed(item, exc)
            return self._retry(item, Retryable("cannot update task.json: %s" % os_reason(exc)),
                               record=False)

    def _try(self, item):
        with self.store.claim(item.task_id, item.index, self.abort) as job:
            if job is None:
                return False
            if job.saved_as:                # renamed into place before a crash: adopt it
                self.end_task(item.task_id, self.store.end_if_saved(item.task_id))
                return False
            if job.tries != item.tries:     # another process tried it since: keep its schedule
                item.tries = job.tries
                item.due = self.due.from_wall(job.due, self.config.max_backoff)
                return True
            started = time.monotonic()
            try:
                ended, size = self.store.save_cover(
                    item.task_id, item.index,
                    lambda out: self.fetcher.fetch(job.url, out, self.abort))
            except Retryable as exc:
                return self._retry(item, exc)
            except Permanent as exc:
                return self._fail(item, str(exc))
            self.metrics.inc("downloads_total", "saved")
            self.metrics.inc("downloaded_bytes_total", amount=size)
            log_event("downloaded", item.task_id, image=item.index + 1, bytes=size,
                      ms=int((time.monotonic() - started) * 1000))
            self.end_task(item.task_id, ended)
            return False

    def _retry(self, item, exc, record=True):
        tries = item.tries + 1
        delay = self.backoff.delay(tries, exc.retry_after)
        if self.config.attempts and tries >= self.config.attempts:
            return self._fail(item, "%s (after %d tries)" % (exc, tries), tries)
        if self.clock.mono() + delay > item.deadline:
            return self._fail(item, "%s (after %d tries; --retry-for ran out)" % (exc, tries),
                              tries)
        item.tries, item.due = tries, self.clock.mono() + delay
        next_try = self.clock.wall() + delay
        if record:
            try:
                self.store.postpone(item.task_id, item.index, str(exc), tries, next_try)
            except OSError as failure:
                self._record_failed(item, failure)
        self.metrics.inc("download_retries_total")
        log_event("retry", item.task_id, image=item.index + 1, tries=tries, reason=exc,
                  next=utc_now(next_try))
        return True

    def _fail(self, item, reason, tries=None):
        self.metrics.inc("downloads_total", "failed")
        log_event("download-failed", item.task_id, logging.WARNING, image=item.index + 1,
                  reason=reason)
        try:
            ended = self.store.settle(item.task_id, item.index,
                                      error="cover_%d: %s" % (item.index + 1, reason), tries=tries)
        except OSError as exc:
            self._record_failed(item, exc, "the image stays pending on disk until a restart "
                                           "or a new delivery")
            with self.due.lock:
                self._stuck.add(item.key)
            return False
        self.end_task(item.task_id, ended)
        return False

    @staticmethod
    def _record_failed(item, exc, note="the schedule goes on in memory"):
        log_event("record-failed", item.task_id, logging.ERROR, image=item.index + 1,
                  reason=os_reason(exc), note=note)

    def end_task(self, task_id, status):
        """The one end of a task, whoever ended it (a download, a failure
        callback, recovery): logged, then handed to on_task_end (the hook)."""
        if status:
            log_event("task-" + status, task_id,
                      level=logging.INFO if status == DONE else logging.WARNING)
            self.on_task_end(task_id, status)


@dataclasses.dataclass
class QueuedHook:
    """One task's hand-off in the HookRunner; its times are monotonic."""
    task_id: str
    due: float
    deadline: float         # --hook-retry-for after the task ended
    tries: int

    @property
    def key(self):
        return self.task_id


class HookRunner:
    """Hands each ended task to --on-complete at least once: runs are due on
    a heap (the download schedule's curve), one process at a time, never
    through a shell, and each outcome is written to task.json, so a restart
    (also after kill -9) runs every pending hook at its time. A failing hook
    goes back in at its next try and never holds back others that are due.
    Its output goes to the log as hook-output lines (HookOutput), never raw."""

    def __init__(self, config, store, clock=Clock, retry_later=True):
        self.argv, self.store, self.clock = config.on_complete, store, clock
        self.timeout, self.retry_for = config.hook_timeout, config.hook_retry_for
        self.backoff = Backoff(config.backoff_base, config.max_backoff)
        self.retry_later = retry_later
        self.failed = set()               # taskIds whose hook failed for good
        self.due = DueHeap(clock)
        self._current = None
        self._thread = threading.Thread(target=self._work, name="hook", daemon=True)
        # Every hook process carries HOOK_RUN_ENV=<this receiver>.<run>, which
        # its descendants inherit even when they leave its process group.
        self._marker = "%s=%d.%s." % (HOOK_RUN_ENV, os.getpid(), os.urandom(4).hex())
        self._runs = itertools.count(1)

    def start(self):
        if self.argv:
            self._thread.start()

    def submit(self, task_id, status=None):
        """A task just ended: its hook is due now."""
        self.put([(task_id, 0.0, self.clock.wall(), 0)])

    def put(self, jobs):
        """Queue (taskId, due, endedAt, tries) hand-offs, times in unix seconds."""
        if not self.argv:
            return
        for task_id, due, ended, tries in jobs:
            if self.due.add(QueuedHook(task_id, self.due.from_wall(due, self.backoff.cap),
                                       self.due.from_wall(ended + self.retry_for), tries)):
                self.failed.discard(task_id)

    def pending(self):
        return len(self.due.keys())

    def tasks(self):
        return self.due.keys()

    def wait_task(self, task_id, timeout=None):
        return self.due.wait(lambda: task_id not in self.due.keys(), timeout)

    def stop(self, seconds):
        if not self.argv:
            return
        self.due.stop()
        self._thread.join(seconds)
        process = self._current
        if process is not None and process.poll() is None:
            Platform.kill_group(process)
        Platform.kill_marked(self._marker)      # daemons that hooks left behind
        self._thread.join(5)

    def _work(self):
        self.due.work(lambda item: self._hand_off(item) and self.retry_later,
                      functools.partial(log_crash, "hook"))

    def _hand_off(self, item):
        """One run of the hook for one task. True: run it again at item.due."""
        record = self.store.read_or_none(item.task_id)
        if record is None or hook_state(record) != PENDING:
            return False
        item.tries += 1
        code, reason = self._run(item.task_id, record, item.tries)
        if code == 0:
            self.store.update_hook(item.task_id, status=DONE, tries=item.tries, lastExit=0,
                                   lastError=None, nextTryAt=None)
            return False
        delay = self.backoff.delay(item.tries)
        if self.clock.mono() + delay > item.deadline:
            self.store.update_hook(item.task_id, status=FAILED, tries=item.tries, lastExit=code,
                                   lastError="%s (after %d tries; --hook-retry-for ran out)"
                                   % (reason, item.tries), nextTryAt=None)
            with self.due.lock:
                self.failed.add(item.task_id)
            log_event("hook-gave-up", item.task_id, logging.ERROR, tries=item.tries, reason=reason)
            return False
        item.due = self.clock.mono() + delay
        self.store.update_hook(item.task_id, tries=item.tries, lastExit=code, lastError=reason,
                               nextTryAt=utc_now(self.clock.wall() + delay))
        return True

    def _run(self, task_id, record, tries):
        """Run the hook once: (exit status or None, why it failed or None)."""
        env = {k: v for k, v in os.environ.items() if k not in HOOK_HIDDEN_ENV}
        run = "%s%d" % (self._marker, next(self._runs))
        env.update(COVER_TASK_ID=task_id, COVER_TASK_STATUS=record["status"],
                   COVER_PARENT_TASK_ID=str(record.get("parentTaskId") or ""),
                   COVER_HOOK_TRY=str(tries))
        env[HOOK_RUN_ENV] = run.split("=", 1)[1]
        started = time.monotonic()
        try:
            self._current = subprocess.Popen(
                list(self.argv) + [self.store.task_dir(task_id)], env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                **Platform.new_process_group())
        except OSError as exc:
            log_event("hook-failed", task_id, logging.WARNING, reason=exc, attempt=tries)
            return None, "cannot start: %s" % os_reason(exc)
        output = HookOutput(self._current.stdout)
        try:
            code = self._current.wait(self.timeout)
        except subprocess.TimeoutExpired:
            Platform.kill_group(self._current)
            Platform.kill_marked(run + "\0")
            self._current.wait()
            code = None
        finally:
            self._current = None
        output.log(task_id)
        if code is None:
            log_event("hook-timeout", task_id, logging.WARNING, seconds=self.timeout,
                      note="killed", attempt=tries)
            return None, "timed out after %g s" % self.timeout
        log_event("hook-exit", task_id, logging.INFO if code == 0 else logging.WARNING,
                  status=code, ms=int((time.monotonic() - started) * 1000), attempt=tries)
        return code, None if code == 0 else "exit status %d" % code


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
# Polling: the vendor API, serve's recovery, fetch's poller
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


@dataclasses.dataclass
class QueuedPoll:
    """One expected task on the Recovery schedule; its times are monotonic."""
    task_id: str
    due: float
    deadline: float         # --retry-for after expectedAt; CONFIRM_GRACE after a --confirm callback
    tries: int
    confirm: bool

    @property
    def key(self):
        return self.task_id


class Recovery:
    """serve's answer to a callback that never comes. Every expected task
    (expect, generate, a --confirm callback) is on a due-time heap; when one
    is overdue (--recover-after past expectedAt with no callback) it asks
    record-info, one request at a time and at most one per api_gap, then
    again every --interval while the API says generating, backing off on
    API errors (Retry-After honoured), until a final answer, which goes the
    way of a callback (deliver), or the deadline, which fails the task. The
    schedule is kept in task.json ("poll"), so restarts keep it. Without an
    API key nothing is asked: an overdue task gets one WARNING and is counted."""

    def __init__(self, config, client, deliver, ended, metrics, store, clock=Clock):
        self.config, self.client, self.deliver, self.ended = config, client, deliver, ended
        self.metrics, self.store, self.clock = metrics, store, clock
        self.backoff = Backoff(config.backoff_base, API_BACKOFF_CAP)
        self.due = DueHeap(clock)
        self.expected = {}                  # taskId -> expectedAt (unix), every expected task
        self._warned = set()
        self._last_request = -API_GAP * 2
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._work, name="recovery", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stopped.set()
        self.due.stop()
        self._thread.join(5)

    def put(self, records):
        """Expected records onto the schedule (start-up, rescan, --confirm)."""
        cap = max(self.config.recover_after, self.config.interval, API_BACKOFF_CAP)
        for record in records:
            expected_at = parse_utc(record["expectedAt"]) or self.clock.wall()
            poll = record["poll"]
            confirmed_from = parse_utc(poll.get("confirmSince"))
            first = (parse_utc(poll.get("nextPollAt")) or confirmed_from
                     or expected_at + self.config.recover_after)
            end = (confirmed_from + CONFIRM_GRACE if confirmed_from
                   else expected_at + self.config.retry_for)
            with self.due.lock:
                self.expected[record["taskId"]] = expected_at
            self.due.add(QueuedPoll(record["taskId"], self.due.from_wall(first, cap),
                                    self.due.from_wall(end), poll.get("tries") or 0,
                                    bool(confirmed_from)), sooner=bool(confirmed_from))

    def forget(self, task_id):
        """The task is no longer expected: a callback (or the API) answered."""
        with self.due.lock:
            self.expected.pop(task_id, None)

    def tasks(self):
        return self.due.keys()

    def counts(self):
        """(expected, overdue, oldest expectedAt or None)."""
        now = self.clock.wall() - self.config.recover_after
        with self.due.lock:
            times = list(self.expected.values())
        return len(times), sum(1 for at in times if at <= now), min(times, default=None)

    def _work(self):
        self.due.work(self._poll, functools.partial(log_crash, "recovery"))

    def _poll(self, item):
        """One look at an overdue task. True: look again at item.due."""
        record = self.store.read_or_none(item.task_id)
        if record is None or record["status"] != EXPECTED:
            self.forget(item.task_id)
            return False
        if self.client is None:
            self._warn_overdue(item.task_id, record)
            return False
        if self._stopped.wait(max(0.0, self._last_request + self.config.api_gap
                                  - self.clock.mono())):
            return False
        self._last_request = self.clock.mono()
        item.tries += 1
        try:
            data = self.client.record_info(item.task_id)
        except ApiError as exc:
            self.metrics.inc("api_requests_total", exc.kind)
            return self._after_error(item, exc)
        self.metrics.inc("api_requests_total", "ok")
        state = record_state(data)
        if state in ("success", "failed"):
            return self._resolve(item, data, state == "success")
        said = ("still generating" if state == "running" else "an unknown task state %s"
                % escape(data.get("successFlag", data.get("status")), 30))
        return self._again(item, self.config.interval, said)

    def _after_error(self, item, exc):
        if exc.kind == "unknown":
            return self._end(item, str(exc))
        delay = self.backoff.delay(item.tries, exc.retry_after)
        if exc.kind in ("person", "refused"):   # a key or credits: no use asking often
            delay = max(delay, self.config.max_backoff)
            log_event("api-refused", item.task_id, logging.ERROR, reason=exc,
                      next_poll="%gs" % delay)
        return self._again(item, delay, str(exc))

    def _resolve(self, item, data, success):
        try:
            outcome, record = self.deliver(record_callback(item.task_id, data, success))
        except BadCallback as exc:
            return self._again(item, self.backoff.delay(item.tries),
                               "an answer it cannot use: %s" % exc)
        except Unavailable as exc:
            return self._again(item, self.backoff.delay(item.tries), str(exc))
        self.forget(item.task_id)
        if outcome == "received":
            self.metrics.inc("tasks_recovered_total")
            log_event("recovered", item.task_id, source="record-info", status=record["status"],
                      images=len(record["images"]), confirm="yes" if item.confirm else "no")
        return False

    def _again(self, item, delay, said):
        """Poll again after delay, or fail the task when that is past its deadline."""
        if self.clock.mono() + delay > item.deadline:
            return self._end(item, said)
        item.due = self.clock.mono() + delay
        self.store.note_poll(item.task_id, tries=item.tries, lastAnswer=said,
                             nextPollAt=utc_now(self.clock.wall() + delay))
        log_event("recovery-poll", item.task_id, said=said, next_poll="%gs" % delay)
        return True

    def _end(self, item, said):
        if item.confirm:
            reason = "--confirm: record-info did not confirm the callback: %s" % said
        else:
            reason = ("no callback came; record-info last said: %s (after %d tries)"
                      % (said, item.tries))
        if self.store.end_expected(item.task_id, reason) is not None:
            log_event("recovery-failed", item.task_id, logging.ERROR, reason=reason)
            self.ended(item.task_id, FAILED)
        self.forget(item.task_id)
        return False

    def _warn_overdue(self, task_id, record):
        if task_id in self._warned:
            return
        self._warned.add(task_id)
        waited = self.clock.wall() - (parse_utc(record["expectedAt"]) or self.clock.wall())
        log_event("overdue", task_id, logging.WARNING, waited="%ds" % waited,
                  note="no callback came; set SUNO_API_KEY (or --api-key-file) for serve to "
                       "ask record-info, or run: cover_receiver.py fetch %s" % task_id)


class Poller:
    """fetch: poll record-info for each task and feed the download pipeline."""

    def __init__(self, config, client, store, downloads, stop, clock=time.monotonic):
        self.config, self.client, self.store, self.downloads = config, client, store, downloads
        self.stop, self.clock = stop, clock
        self.backoff = Backoff(config.backoff_base, API_BACKOFF_CAP)

    def run(self, task_id):
        """Returns (word, detail), word one of done, failed, pending, error."""
        deadline = self.clock() + self.config.wait
        tries, generating = 0, False
        while True:
            try:
                data = self.client.record_info(task_id, deadline)
            except ApiError as exc:
                tries += 1
                ended = self._after_error(task_id, exc, tries, deadline, generating)
                if ended:
                    return ended
                continue
            tries, generating = 0, True
            state = record_state(data)
            if state in ("success", "failed"):
                return self._finish(task_id, data, state == "success",
                                    max(0.0, deadline - self.clock()))
            if state is None:
                return "error", "unexpected task state %s" % escape(
                    data.get("successFlag", data.get("status")), 30)
            interval = self.config.interval
            if self.clock() + interval > deadline or self.stop.wait(0):
                return "pending", "still generating after %g s" % self.config.wait
            log_event("generating", task_id, state=data.get("successFlag", data.get("status")),
                      next_poll="%gs" % interval)
            if self.stop.wait(interval):
                return "pending", "stopped"

    def _after_error(self, task_id, exc, tries, deadline, generating):
        """Wait to poll again after an API error; (word, detail) when fetch gives up."""
        if not exc.retryable:
            return "error", str(exc)
        delay = self.backoff.delay(tries, exc.retry_after)
        log_event("api-retry", task_id, reason=exc, wait="%.2fs" % delay)
        if self.clock() + delay <= deadline and not self.stop.wait(delay):
            return None
        # A passing error as --wait runs out says nothing new: a task last
        # seen generating is still pending (exit 3), not an error.
        if generating:
            return "pending", "still generating after %g s (the last poll: %s)" % (
                self.config.wait, exc)
        return "error", "%s (gave up)" % exc

    def _finish(self, task_id, data, success, wait):
        try:
            outcome, record = self.store.accept(record_callback(task_id, data, success))
        except BadCallback as exc:
            return "error", "API answer unusable: %s" % exc
        except Unavailable as exc:
            return "error", str(exc)
        log_event(outcome, task_id, source="record-info")
        self.downloads.put(pending_jobs(record))
        self.downloads.wait_task(task_id, wait)
        return task_result(self.store, task_id)


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


class Front:
    """The one thread that touches the server's sockets (selectors): it
    accepts, does the TLS handshake, reads each request whole (a head within
    HEAD_LIMIT, a body within --max-body-bytes), hands the bytes to a handler
    thread, and sends back the answer the handler made. So a socket and its
    TLS object are only ever used by this thread, and a slow client costs a
    descriptor and a bounded buffer, never a thread."""

    def __init__(self, config, receiver, listen_socket=None):
        self.config, self.receiver = config, receiver
        self.tls = self.load_tls() if config.tls_cert else None
        if listen_socket is None:
            family, _, _, _, address = socket.getaddrinfo(
                config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            listen_socket = socket.create_server(address, family=family, backlog=128,
                                                 dualstack_ipv6=family == socket.AF_INET6
                                                 and socket.has_dualstack_ipv6())
        self.listener = listen_socket
        self.listener.setblocking(False)
        self.address = listen_socket.getsockname()
        self.capacity = min(config.max_connections, Platform.socket_budget())
        self.body_cap = max(BUFFERED_BODIES, config.max_body_bytes)
        self.buffered = self.in_flight = 0
        self.conns, self.waiting = {}, {}   # every connection; those not yet whole, per client
        self.answers = collections.deque()  # (connection, answer) from the handler threads
        self.wake_in, self.wake_out = socket.socketpair()
        self.wake_in.setblocking(False)
        self.wake_out.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_in, selectors.EVENT_READ, "wake")
        self.handlers = concurrent.futures.ThreadPoolExecutor(HANDLER_THREADS, "http-handler")
        self.thread = threading.Thread(target=self.serve, name="http", daemon=True)
        self.stopping = None            # monotonic deadline for answers in flight, once stopping

    def load_tls(self):
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2    # 3.9's default allows 1.0
        tls.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return tls

    def reload_tls(self):
        """SIGHUP: new connections get the renewed certificate; a pair that
        does not load leaves the one in use."""
        try:
            self.tls = self.load_tls()
            log_event("tls-reloaded", cert=self.config.tls_cert)
        except (OSError, ssl.SSLError) as exc:
            log_event("tls-reload-failed", level=logging.ERROR, cert=self.config.tls_cert,
                      reason=exc, note="the certificate in use is kept")

    def close(self, wait):
        """Stop accepting; send the answers of requests already whole (for up
        to wait seconds); close the rest."""
        self.stopping = time.monotonic() + wait
        self.wake()
        if self.thread.is_alive():
            self.thread.join()
        else:
            self._close_all()
        self.handlers.shutdown(wait=self.in_flight == 0)

    def wake(self):
        with contextlib.suppress(OSError):      # full: a wake-up is pending anyway
            self.wake_out.send(b"\0")

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
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.1
                self._sweep(now)
        self._close_all()

    def _answers_pending(self):
        if self.listener.fileno() != -1:            # the first pass after close()
            self.selector.unregister(self.listener)
            self.listener.close()
            for conn in list(self.waiting_conns()):
                self._drop(conn)
        self._take_answers()
        busy = self.in_flight or any(c.step == "send" for c in self.conns)
        return busy and time.monotonic() < self.stopping

    def waiting_conns(self):
        return (conn for conns in self.waiting.values() for conn in conns)

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
            self.waiting.setdefault(peer, {})[conn] = None
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _make_room(self):
        """At the cap, the client holding the most connections whose request
        is not whole gives up its oldest one: no flood of idle, half-sent or
        dripping connections denies another client."""
        if not self.waiting:
            return False
        client = max(self.waiting, key=lambda c: len(self.waiting[c]))
        victim = next(iter(self.waiting[client]))
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
            self._rekey(conn, forwarded_client(headers, self.config.trusted_proxy) or conn.peer)
        if self.buffered + body > self.body_cap:
            self.receiver.rejections.note(503, conn.client, "request buffers full")
            self._reply(conn, BUFFERS_FULL)
            return False
        self.buffered += body
        conn.reserved, conn.length, conn.step = body, end.end() + body, "body"
        return True

    def _rekey(self, conn, client):
        self._unwait(conn)
        conn.client = escape(client, 64)
        self.waiting.setdefault(conn.client, {})[conn] = None

    def _hand_off(self, conn):
        self._unwait(conn)
        self.selector.unregister(conn.sock)
        conn.step = "handler"
        self.in_flight += 1
        request = bytes(conn.data[:conn.length])
        conn.data = None
        self.handlers.submit(self._handle, conn, request)

    def _handle(self, conn, request):
        """In a handler thread: the answer, made from memory; the loop sends it."""
        try:
            answer = CallbackHandler.answer(request, conn.client, self)
        except Exception:               # thread boundary: the client still gets an answer
            LOG.exception("request crashed client=%s", conn.client)
            answer = canned_answer(b"500 Internal Server Error", "internal error")
        self.answers.append((conn, answer))
        self.wake()

    def _take_answers(self):
        with contextlib.suppress(OSError):
            while self.wake_in.recv(4096):
                pass
        while self.answers:
            conn, answer = self.answers.popleft()
            self.in_flight -= 1
            self.buffered -= conn.reserved
            conn.reserved = 0
            self.selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            self._reply(conn, answer)

    def _reply(self, conn, answer):
        self._unwait(conn)
        conn.answer, conn.step, conn.data = answer, "send", None
        conn.deadline = time.monotonic() + self.config.request_timeout
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._advance(conn, selectors.EVENT_WRITE)

    def _send(self, conn):
        sent = conn.sock.send(conn.answer)
        conn.answer = conn.answer[sent:]
        if not conn.answer:
            # A lingering close (RFC 9112 9.6): closing with unread request bytes
            # would reset the connection over the answer; drain them for 2 s.
            socket.socket.shutdown(conn.sock, socket.SHUT_WR)
            conn.step, conn.deadline = "linger", time.monotonic() + LINGER_SECONDS
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _unwait(self, conn):
        """The connection's request is whole (or answered): it is not evicted."""
        conns = self.waiting.get(conn.client)
        if conns and conn in conns:
            del conns[conn]
            if not conns:
                del self.waiting[conn.client]

    def _drop(self, conn):
        self._unwait(conn)
        self.conns.pop(conn, None)
        self.buffered -= conn.reserved
        conn.reserved = 0
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def _close_all(self):
        for conn in list(self.conns):
            self._drop(conn)
        for sock in (self.listener, self.wake_in, self.wake_out):
            sock.close()
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
                    raise MethodNotAllowed("use POST")
                self.reply(200, receiver.handle_callback(
                    self.client_address[0], target.query, self.headers, self.read_body))
            elif self.command in ("GET", "HEAD") and target.path == "/healthz":
                self.reply(*receiver.health())
            elif self.command in ("GET", "HEAD") and target.path == "/metrics":
                self.reply(200, receiver.metrics_text(), content_type="text/plain; version=0.0.4")
            else:
                raise NotFound("no such path")
        except ReceiverError as exc:
            if target and target.path == receiver.config.path and exc.reason in CALLBACK_OUTCOMES:
                receiver.metrics.inc("callbacks_total", exc.reason)
                receiver.rejections.note(exc.status, self.client_address[0], exc,
                                         logging.ERROR if exc.status == 503 else logging.WARNING)
            elif isinstance(exc, NotFound) and self.command == "POST" and target:
                # A callback sent to the wrong path (a callBackUrl typo) is lost without
                # this line; the 404 itself does not name the configured path.
                receiver.rejections.note(404, self.client_address[0], "POST to %s, but the "
                                         "callback path is %s (--path)" % (
                                             escape(target.path, 100), receiver.config.path))
            self.reply(exc.status, {"status": "error", "error": str(exc)},
                       allow="POST" if isinstance(exc, MethodNotAllowed) else None)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = dispatch

    def read_body(self):
        config = self.server.receiver.config
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") is not None:      # RFC 9112 6.3
            if lengths:
                raise BadCallback("Transfer-Encoding and Content-Length together")
            raise LengthRequired("Content-Length is required (no chunked bodies)")
        if not lengths:
            raise LengthRequired("Content-Length is required")
        values = {parse_digits(value) for value in lengths}
        if None in values or len(values) > 1:
            raise BadCallback("Content-Length must be one number")
        length = values.pop()
        if length > config.max_body_bytes:
            raise TooLarge("body is larger than %d bytes" % config.max_body_bytes)
        types = self.headers.get_all("Content-Type") or ["application/json"]
        if len(types) > 1:                                         # RFC 9110 8.3: one value
            raise BadCallback("more than one Content-Type")
        if types[0].split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json")
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
    """The running service: owns the store, queue, hook runner, server and
    notifier, and starts and stops them in order."""

    def __init__(self, config, resolver=system_resolver, env=None, clock=Clock,
                 client_tls=None):
        env = os.environ if env is None else env
        self.config, self.clock = config, clock
        self.metrics = Metrics()
        self.rejections = RejectionLog()
        self.heartbeat = self.next_rescan = self.next_look = time.monotonic()
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
            self.store = open_store(config)
        except UsageError:
            self.front.close(0)
            raise
        self.hooks = HookRunner(config, self.store, clock)
        self.requests = RequestBox(self.store)
        self.queue = DownloadQueue(config, self.store, Fetcher(config, resolver, client_tls),
                                   self.metrics, self.hooks.submit, clock=clock)
        self.recovery = Recovery(config, ApiClient(config) if config.api_key else None,
                                 self._deliver, self.queue.end_task, self.metrics, self.store,
                                 clock)
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
        expected = []
        work = self.store.recover(expected)
        self.requests.open()
        self.queue.start()
        self.hooks.start()
        self.recovery.start()
        self.recovery.put(expected)
        for task_id, images in collections.Counter(job[0] for job in work).items():
            log_event("resume", task_id, images=images)
        self.queue.put(work)
        self._take_hooks()
        self.next_rescan = time.monotonic() + self.config.rescan_seconds  # recover() was the first
        self.front.thread.start()
        self._log_listening(len(work))
        self.notifier.send("READY=1", "STATUS=" + self.status_line())
        self.notifier.start(self.healthy, self.status_line)

    def _log_listening(self, resumed):
        config, (host, port) = self.config, self.listen_address
        policy = ("only " + ",".join(config.allow_host) if config.allow_host
                  else "public-https")
        log_event("listening", host=host, port=port, path=config.path, dir=self.store.root,
                  downloads=policy, tls="on" if self.front.tls else "off", resumed=resumed,
                  signature="on" if config.hmac_key else "off",
                  token="on" if config.token else "off")
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
        self.front.close(self.config.request_timeout)     # answers what is whole
        self.recovery.stop()
        self.queue.stop(max(0.0, deadline - time.monotonic()))
        self.hooks.stop(max(0.0, deadline - time.monotonic()))
        self.notifier.stop()
        self.requests.close()
        log_event("stopped", pending=self.store.pending_count())

    def tick(self):
        """From the server loop: a heartbeat for the watchdog, a look for work
        that retry handed over, and now and then (or at once after wake()) a
        rescan for work that fetch or retry left pending on disk."""
        self.heartbeat = now = time.monotonic()
        if now < self.next_look:
            return
        self.next_look = now + REQUEST_POLL
        try:
            self._take_requests()
            if now >= self.next_rescan:
                self.next_rescan = now + self.config.rescan_seconds
                expected = []
                self.queue.put(self.store.pending_work(
                    known=self.queue.tasks() | self.recovery.tasks(), expected=expected))
                self.recovery.put(expected)
                self._take_hooks()
        except OSError as exc:
            log_event("rescan-failed", level=logging.ERROR, reason=os_reason(exc))
        except Exception:       # the HTTP thread's boundary: it must go on serving
            LOG.exception("rescan crashed")

    def wake(self):
        """SIGHUP (systemctl reload): reload the TLS certificate, and rescan
        <dir> now; nothing is dropped."""
        log_event("reload", note="looking at the folder for due work now")
        if self.front.tls:
            self.front.reload_tls()
        self.next_rescan = self.next_look = 0.0

    def _take_requests(self):
        """Do what retry handed over, as this service: its settings, its user."""
        for kind, task_id, done in self.requests.take():
            log_event("expect-requested" if kind == "expect" else "retry-requested", task_id,
                      kind=kind)
            try:
                if kind == "images":
                    self.queue.put(retry_images_of(self.store, task_id))
                elif kind == "expect":
                    parent = self.requests.content(kind, task_id).decode("ascii", "replace")
                    created, record = self.store.expect(
                        task_id, parent if TASK_ID_RE.fullmatch(parent) else None)
                    self.recovery.put([record] if created else [])
                elif self.config.on_complete:
                    self.hooks.put(retry_hook_of(self.store, task_id))
                else:
                    log_event("retry-ignored", task_id, logging.WARNING,
                              reason="this serve has no --on-complete to run")
            except CorruptRecord as exc:
                self.store.note_corrupt(task_id, exc)
            except Unavailable as exc:
                log_event("request-failed", task_id, logging.ERROR, reason=exc)
            except OSError as exc:
                log_event("request-failed", task_id, logging.ERROR, reason=os_reason(exc))
            finally:
                done()

    def _take_hooks(self):
        """Queue the hand-offs on disk that no hook run of ours holds."""
        if self.config.on_complete:
            work, failed = self.store.hook_work(known=self.hooks.tasks())
            self.hooks.put(work)
            self.hooks.failed = failed

    def healthy(self, within):
        return time.monotonic() - self.heartbeat < within and self.queue.alive()

    def status_line(self):
        return "%d pending, %d downloading, %d waiting to retry, %d saved" % (
            self.store.pending_count(), self.queue.in_flight, self.queue.waiting(),
            self.metrics.get("downloads_total", "saved"))

    # -- the endpoint ------------------------------------------------------------

    def handle_callback(self, client, query, headers, read_body):
        """One POST to the callback path: the token, the body (read_body checks
        its length and type), JSON, the signature, then _deliver(). Returns the
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
        outcome, record = self._deliver(callback, confirm=config.confirm)
        self.metrics.inc("callbacks_total", outcome)
        log_event(outcome, callback.task_id, client=client, code=callback.code,
                  images=len(callback.images), msg=callback.msg,
                  **({"confirm": "record-info"} if record["status"] == EXPECTED else {}))
        return {"status": outcome, "taskId": callback.task_id}

    def _deliver(self, callback, confirm=False):
        """The one way into the pipeline, for a callback and for a record-info
        answer alike: durable record, downloads queued, an ended task handed off."""
        outcome, record = self.store.accept(callback, confirm)
        self.queue.put(pending_jobs(record))
        if record["status"] == EXPECTED:
            self.recovery.put([record])         # --confirm: record-info is asked now
        else:
            self.recovery.forget(callback.task_id)
        if outcome == "received" and record["status"] == FAILED:
            self.queue.end_task(callback.task_id, FAILED)  # a failure callback ends its task
        return outcome, record

    def health(self):
        error = self._probe_dir()
        if error:
            return 503, {"status": "error", "error": "dir not writable: %s" % error}
        last = self.metrics.last_saved
        expected, overdue, _ = self.recovery.counts()
        return 200, {"status": "ok", "version": __version__,
                     "pending": self.store.pending_count(), "inFlight": self.queue.in_flight,
                     "expected": expected, "overdue": overdue,
                     "retrying": self.queue.waiting(), "corrupt": self.store.corrupt_count(),
                     "hooksPending": self.hooks.pending(), "hooksFailed": len(self.hooks.failed),
                     "lastDownloadAt": utc_now(last) if last else None}

    def _probe_dir(self):
        """Why <dir> cannot take a durable write, or None. A probe is an fsync:
        a success serves every /healthz for a second, so a flood of them cannot
        slow the callbacks' own fsyncs; a failure is probed again each time,
        so a freed disk reports ok at once."""
        with self._probe_lock:
            if time.monotonic() - self._probed_ok < PROBE_CACHE_SECONDS:
                return None
            try:
                self.store.probe()
            except OSError as exc:
                return os_reason(exc)
            self._probed_ok = time.monotonic()
            return None

    def metrics_text(self):
        expected, overdue, oldest = self.recovery.counts()
        return self.metrics.render({
            "tasks_expected": ("Tasks expected (expect, generate) with no callback yet.",
                               expected),
            "tasks_overdue": ("Expected tasks past --recover-after with no callback.", overdue),
            "oldest_pending_age_seconds": ("Age of the oldest unfinished task (0: none).",
                                           self._oldest_age(oldest)),
            "tasks_corrupt": ("Tasks whose record cannot be read (see the log).",
                              self.store.corrupt_count()),
            "hooks_pending": ("Hand-offs (--on-complete) not yet done.", self.hooks.pending()),
            "hooks_failed": ("Hand-offs that failed for good (retry --hook).",
                             len(self.hooks.failed)),
            "tasks_pending": ("Tasks not yet done or failed.", self.store.pending_count()),
            "downloads_in_flight": ("Images downloading now.", self.queue.in_flight),
            "images_retrying": ("Images waiting for their next try.", self.queue.waiting())})

    def _oldest_age(self, oldest_expected):
        """Seconds since the oldest unfinished task was expected or received."""
        received = self.queue.oldest_received()
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
    store = open_store(config)
    downloads = DownloadQueue(config, store, Fetcher(config), Metrics(), lambda *_: None)
    downloads.start()
    stop = threading.Event()
    poller = Poller(config, ApiClient(config), store, downloads, stop)
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
    return 1 if words & {"failed", "error", CORRUPT} else 3 if "pending" in words else 0


def run_expect(config, env):
    """expect: record each TASKID as expected; a known task is left as it is."""
    store, failed = open_store(config), False
    box = RequestBox(store)
    for task_id in dict.fromkeys(config.task_ids):
        try:
            created, record = expect_task(store, box, task_id, config.parent)
        except (CorruptRecord, Unavailable) as exc:
            print("%s not recorded: %s" % (task_id, exc), flush=True)
            failed = True
            continue
        print("%s %s" % (task_id, "expected" if created else "known: %s, left as it is"
                         % (record or {}).get("status", "being written")), flush=True)
    return 1 if failed else 0


def expect_task(store, box, task_id, parent):
    """store.expect(), done by the serve running on <dir> when there is one,
    so the task's folder belongs to the service's user (as retry does)."""
    if not box.serve_running():
        return store.expect(task_id, parent)
    known = store.read(task_id)
    if known is not None:
        return False, known
    box.post("expect", task_id, (parent or "").encode())
    deadline = time.monotonic() + EXPECT_HANDOFF_WAIT
    while box.waiting("expect", task_id):
        if time.monotonic() >= deadline:
            raise Unavailable("handed to the running serve, which has not recorded it within "
                              "%g s; it will when it can" % EXPECT_HANDOFF_WAIT)
        time.sleep(REQUEST_POLL / 2)
    record = store.read(task_id)
    return record is not None and record["status"] == EXPECTED, record


def run_generate(config, env):
    """generate: create each music task's cover task at the API, record it as
    expected (with its parent), print 'MUSIC COVER' per line."""
    store = open_store(config)
    box, client, refused = RequestBox(store), ApiClient(config), False
    for music_task_id in dict.fromkeys(config.task_ids):
        try:
            cover, existed = client.generate(music_task_id, config.callback_url)
        except ApiError as exc:
            refused = True
            print("%s refused: %s" % (music_task_id, exc), flush=True)
            continue
        try:
            expect_task(store, box, cover, music_task_id)
        except (CorruptRecord, Unavailable) as exc:
            refused = True
            print("%s %s not recorded: %s; run: cover_receiver.py expect %s --parent %s"
                  % (music_task_id, cover, exc, cover, music_task_id), flush=True)
            continue
        print("%s %s%s" % (music_task_id, cover, " (the cover task existed already)"
                           if existed else ""), flush=True)
        log_event("generated", cover, parent=music_task_id, existed="yes" if existed else "no")
    return 1 if refused else 0


def run_retry(config, env):
    """retry: the failed images (or, with --hook, failed hooks) of the named
    tasks, or of every failed task, tried once more now: by the serve running
    on <dir> when there is one (RequestBox), else here. A passing failure
    leaves an image pending with its next try on disk, where serve picks it up."""
    store = existing_store(config)
    box = RequestBox(store)
    through_serve = box.serve_running()
    if config.hook and not (through_serve or config.on_complete):
        raise UsageError("retry --hook with no serve running on --dir needs --on-complete "
                         "(or COVER_RECEIVER_ON_COMPLETE)")
    task_ids = config.task_ids or failed_tasks(store, config.hook)
    if not task_ids:
        print("no failed %s in %s" % ("hooks" if config.hook else "tasks", store.root))
        return 0
    settled = hook_settled if config.hook else images_settled
    left = (hand_to_serve(box, config, store, task_ids, settled) if through_serve
            else retry_here(config, store, task_ids))
    if config.hook:
        words = [print_hook_line(store, task_id) for task_id in task_ids]
    else:
        words = [print_task_line(store, task_id, left.get(task_id)) for task_id in task_ids]
    return 0 if set(words) == {DONE} else 1


def failed_tasks(store, hooks):
    if hooks:
        return tuple(sorted(store.hook_work()[1]))
    return tuple(r["taskId"] for r in store.not_done() if r.get("status") == FAILED)


def images_settled(record):
    """retry's wait for a task's images is over: nothing of it is pending."""
    return record is None or record.get("status") != PENDING


def hook_settled(record):
    return record is None or hook_state(record) != PENDING


def left_to_schedule(store, task_id):
    """Why retry leaves a task as it is (pending, not failed: its schedule
    goes on), or None. Raises CorruptRecord."""
    record = store.read(task_id)
    if record is not None and record["status"] in UNFINISHED:
        return record["status"], "not failed, so left to its schedule: %s" % (
            task_reason(record) or "its next try is due now")
    return None


def hand_to_serve(box, config, store, task_ids, settled):
    """Post a request per task to the running serve and wait up to --wait
    for each to settle. Returns {taskId: (word, detail)} for those it did not."""
    kind = "hook" if config.hook else "images"
    left = {}
    for task_id in task_ids:
        try:
            why = None if config.hook else left_to_schedule(store, task_id)
        except CorruptRecord as exc:
            why = (CORRUPT, str(exc))
        if why:
            left[task_id] = why
        else:
            box.post(kind, task_id)
    deadline = time.monotonic() + config.wait
    for task_id in task_ids:
        while task_id not in left and not (not box.waiting(kind, task_id)
                                           and settled(store.read_or_none(task_id))):
            if time.monotonic() >= deadline:
                left[task_id] = (PENDING, "handed to the running serve; not ended within "
                                 "--wait %g s (status %s shows how it goes)" % (config.wait, task_id))
                break
            time.sleep(REQUEST_POLL / 2)
    return left


def retry_here(config, store, task_ids):
    """No serve runs: do the work in this process, with its own options."""
    runner = (HookRunner(config, store, retry_later=False) if config.hook else
              DownloadQueue(config, store, Fetcher(config), Metrics(), lambda *_: None,
                            retry_later=False))
    runner.start()
    left, deadline = {}, time.monotonic() + config.wait
    try:
        for task_id in task_ids:
            try:
                left[task_id] = None if config.hook else left_to_schedule(store, task_id)
                if left[task_id] is None:
                    runner.put(retry_hook_of(store, task_id) if config.hook
                               else retry_images_of(store, task_id))
            except CorruptRecord as exc:
                left[task_id] = (CORRUPT, str(exc))
        for task_id in task_ids:
            runner.wait_task(task_id, max(0.0, deadline - time.monotonic()))
    finally:
        runner.stop(0)
    return {task_id: why for task_id, why in left.items() if why}


def retry_images_of(store, task_id):
    """retry's work on one task: its failed images made pending again, as
    download jobs; [] when it is not failed. Raises CorruptRecord."""
    reopened, record = store.reopen_failed(task_id)
    return pending_jobs(record) if reopened else []


def retry_hook_of(store, task_id):
    """retry --hook's work on one task: a failed hook made due now, as a
    HookRunner job; [] when its hook has not failed."""
    record = store.read_or_none(task_id)
    if record is None or hook_state(record) != FAILED:
        return []
    hook = store.update_hook(task_id, status=PENDING, nextTryAt=None)
    return [(task_id, 0.0, parse_utc(hook["endedAt"]) or 0.0, hook["tries"])]


def print_task_line(store, task_id, why=None):
    word, detail = why or task_result(store, task_id)
    print("%s %s: %s" % (task_id, word, detail), flush=True)
    return word


def print_hook_line(store, task_id):
    record = store.read_or_none(task_id)
    state = hook_state(record) if record else None
    detail = hook_reason(record) if state else "no hand-off recorded for this task"
    print("%s hook %s: %s" % (task_id, state or "none", detail), flush=True)
    return state


def run_status(config, env):
    """status: a summary line and every task that is not done, newest first
    (--all: every task, the summary last); --json: one object per line."""
    store = TaskStore(config.dir)
    if not os.path.isdir(store.root):
        raise UsageError("--dir %s does not exist" % config.dir)
    if config.task_ids:
        return print_record(store, config.task_ids[0])
    records = store.records() if config.all else sorted(
        store.not_done(), key=lambda r: r.get("updatedAt") or "", reverse=True)
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
    try:
        record = store.read(task_id)
    except CorruptRecord as exc:
        print("task %s is corrupt: %s" % (task_id, exc), file=sys.stderr)
        return 1
    if record is None:
        print("no task %s in %s" % (task_id, store.root), file=sys.stderr)
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
        """Before the rows (records given: counted first), or after them."""
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


def main(argv=None, env=None):
    """Run the program; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ) if env is None else env
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.formatter.converter = time.gmtime       # UTC, like task.json's times
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # The format names no process or thread: skip gathering them for every
    # record (logging HOWTO, "Optimization"; logProcesses costs a getpid()).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        config = build_config(argv, env)
        warn_unknown_variables(env)
        commands = {"serve": run_serve, "fetch": run_fetch, "retry": run_retry,
                    "status": run_status, "expect": run_expect, "generate": run_generate}
        return commands[config.command](config, env)
    except UsageError as exc:
        print("cover_receiver: error: %s" % exc, file=sys.stderr)
        return 2
    except SystemExit as exc:            # argparse --help / --version
        return exc.code or 0


if __name__ == "__main__":
    sys.exit(main())
