"""cover_receiver, specified as tests.

Everything here runs against real things on loopback: a fake CDN whose answers
each test scripts, a fake record-info API, the receiver in-process (through its
seams: resolver, client TLS context, clock) or as a subprocess where process
behaviour matters (kill -9, SIGTERM, systemd). No mocked network or filesystem.

After the builders, fakes, fixtures and shared helpers, one section per unit:
CLI, HTTP answers, store, downloads, schedule, hook, polling, service, platform.
"""

import calendar
import contextlib
import dataclasses
import http.client
import http.server
import json
import os
import pathlib
import re
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cover_receiver as cr

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "cover_receiver.py")
SEED_TASK = "21aee3c3c2a01fa5e030b3799fa4dd56"
SEED_IMAGES = ["https://tempfile.aiquickdraw.com/s/1753958521_6c1b3015141849d1a9bf17b738ce9347.png",
               "https://tempfile.aiquickdraw.com/s/1753958524_c153143acc6340908431cf0e90cbce9e.png"]
SEED_BODY = ('{"code": 200, "data": {"images": ["%s", "%s"], "taskId": "%s"}, "msg": "success"}'
             % (SEED_IMAGES[0], SEED_IMAGES[1], SEED_TASK)).encode()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
JPEG = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + os.urandom(3000)
GIF = b"GIF89a" + os.urandom(500)
WEBP = b"RIFF\x00\x10\x00\x00WEBPVP8 " + os.urandom(700)
WAIT = 15          # seconds: the deadline of every wait on a condition
WINDOWS = os.name == "nt"
STOP_SIGNAL = signal.SIGBREAK if WINDOWS else signal.SIGTERM
# On Windows a console event needs a shared console, which a piped child (and
# Wine) lacks: the child raises Ctrl+Break's SIGBREAK itself for each line the
# test writes to its stdin, which runs the receiver's real handler.
WINDOWS_STOPPER = """import signal, sys, threading
sys.path.insert(0, %r)
import cover_receiver
def stopper():
    for _ in sys.stdin:
        signal.raise_signal(signal.SIGBREAK)
threading.Thread(target=stopper, daemon=True).start()
sys.exit(cover_receiver.main(sys.argv[1:]))
"""
posix_only = pytest.mark.skipif(WINDOWS, reason="a POSIX-only feature (systemd, AF_UNIX, sh)")


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------

def payload(task_id="t1", images=("http://127.0.0.1/a.png",), code=200, msg="success"):
    """A callback body as the vendor sends it."""
    return {"code": code, "msg": msg,
            "data": {"taskId": task_id, "images": list(images) if images is not None else None}}


def signed_headers(key, task_id, timestamp=None, signature=None):
    timestamp = str(int(time.time())) if timestamp is None else timestamp
    return {"X-Webhook-Timestamp": timestamp,
            "X-Webhook-Signature": signature or cr.webhook_signature(key, task_id, timestamp)}


def post(url, body, headers=None, content_type="application/json", tls=None):
    """POST raw bytes (or a dict as JSON); returns (status, parsed answer, headers)."""
    parts = cr.urllib.parse.urlsplit(url)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = (http.client.HTTPSConnection(parts.hostname, parts.port, context=tls, timeout=WAIT)
            if parts.scheme == "https" else
            http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT))
    all_headers = {"Content-Type": content_type} if content_type else {}
    all_headers.update(headers or {})
    target = parts.path + ("?" + parts.query if parts.query else "")
    try:
        conn.request("POST", target, body=body, headers=all_headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = raw
    return response.status, answer, response


def get(url, method="GET"):
    parts = cr.urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT)
    try:
        conn.request(method, parts.path)
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def wait_for(predicate, timeout=WAIT, what="condition"):
    """Wait on a condition with a deadline (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


def record(folder, task_id):
    """The task's record, read from the database (what status --json TASKID
    prints), or None."""
    path = os.path.join(folder, cr.DB_NAME)
    if not os.path.exists(path):
        return None
    with contextlib.closing(sqlite3.connect(path, timeout=WAIT)) as db:
        row = db.execute("SELECT record FROM task WHERE task_id = ?", (task_id,)).fetchone()
    return json.loads(row[0]) if row else None


def manifest(folder, task_id):
    """The task.json written into a task's folder when it ended, or None."""
    path = os.path.join(folder, task_id, "task.json")
    if not os.path.exists(path) or os.path.islink(path):    # a test planted a link there
        return None
    with cr.Platform.retry_sharing(open, path) as handle:     # Windows: mid-replace
        return json.load(handle)


def wait_status(folder, task_id, status, timeout=WAIT, written=True):
    """The task's record once it has status; for an ended task (done,
    failed), once its task.json, which a worker writes just after, says so
    too (unless not written: a folder that takes no writes)."""
    ended = written and status in ("done", "failed")
    return wait_for(lambda: (record(folder, task_id) or {}).get("status") == status and (
        not ended or (manifest(folder, task_id) or {}).get("status") == status)
        and record(folder, task_id), timeout, "%s to be %s" % (task_id, status))


STORE_FILES = {cr.DB_NAME, cr.DB_NAME + "-wal", cr.DB_NAME + "-shm", cr.LOCK_NAME}


def visible_entries(folder):
    """The task folders (and anything else) in folder, but the store's files."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and n not in STORE_FILES)


def leftovers(folder):
    """Every entry below folder, hidden ones included, but the store's own
    files (the database, its -wal and -shm, the lock file)."""
    found = []
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/")
            if path not in STORE_FILES:
                found.append(path)
    return sorted(found)


def settled(folder, expected):
    """leftovers(folder) becomes expected: a task's pending mark goes just
    after the record write that ends it."""
    wait_for(lambda: leftovers(folder) == expected,
             what="%s to hold only %s, not %s" % (folder, expected, leftovers(folder)))


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


# ---------------------------------------------------------------------------
# Fakes: a scripted CDN and a scripted record-info API
# ---------------------------------------------------------------------------

class FakeCDN:
    """Loopback HTTP(S) server. route(path, answer, ...) scripts the answers in
    order (the last repeats); hits[path] counts requests; requests keeps headers."""

    def __init__(self, tls=None):
        self.routes, self.hits, self.requests, self.times = {}, {}, [], {}
        self.changed = threading.Condition()
        self.release = threading.Event()       # lets stalled answers go on
        cdn = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                path = self.path.split("?")[0]
                with cdn.changed:
                    count = cdn.hits.get(path, 0)
                    cdn.hits[path] = count + 1
                    cdn.times.setdefault(path, []).append(time.monotonic())
                    cdn.requests.append((path, dict(self.headers)))
                    cdn.changed.notify_all()
                answers = cdn.routes.get(path) or [status(404)]
                answer = answers[min(count, len(answers) - 1)]
                with contextlib.suppress(OSError):
                    answer(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.cdn_release = self.release
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls else "http"
        # A short poll interval: shutdown() waits for it, at every test's teardown.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def route(self, path, *answers):
        self.routes[path] = list(answers)
        return self.url(path)

    def url(self, path, host="127.0.0.1"):
        return "%s://%s:%d%s" % (self.scheme, host, self.port, path)

    def wait_hits(self, path, count):
        with self.changed:
            assert self.changed.wait_for(lambda: self.hits.get(path, 0) >= count, WAIT), \
                "CDN never saw %d requests for %s" % (count, path)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def ok(body, content_type="image/png", length=True):
    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        else:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        if length:
            handler.wfile.write(body)
        else:
            for start in range(0, len(body), 65536):
                piece = body[start:start + 65536]
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            handler.wfile.write(b"0\r\n\r\n")
    return answer


def status(code, **headers):
    def answer(handler):
        handler.send_response(code)
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return answer


def redirect(location, code=302):
    return status(code, Location=location)


def truncated(body, cut):
    """Promise the whole body, send part of it, then hang up."""
    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:cut])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
    return answer


def raw(head, body=b""):
    """Send exactly these bytes: a status line and headers as a hostile host
    might write them (no validation by http.server), then body."""
    def answer(handler):
        handler.wfile.write(head + b"\r\n" + body)
        handler.close_connection = True
    return answer


def stall(body, cut=16):
    """Send headers and part of the body, then wait until cdn.release is set."""
    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:cut])
        handler.wfile.flush()
        handler.server.cdn_release.wait(WAIT * 2)
        handler.wfile.write(body[cut:])
    return answer


class FakeAPI:
    """The vendor API on loopback. record-info: script(taskId, answer, ...)
    where an answer is (http status, body dict or bytes, headers[, seconds to
    stall first]); calls counts them per task, times keeps when each came.
    generate: script("generate:" + music taskId, answer, ...); generated
    keeps each request's body."""

    def __init__(self):
        self.scripts, self.calls, self.auth, self.times, self.generated = {}, {}, [], [], []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                query = cr.urllib.parse.urlsplit(self.path)
                task_id = cr.urllib.parse.parse_qs(query.query).get("taskId", [""])[0]
                self.answer(task_id)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.generated.append(body)
                self.answer("generate:%s" % body.get("taskId"))

            def answer(self, task_id):
                api.auth.append(self.headers.get("Authorization"))
                api.times.append(time.monotonic())
                count = api.calls.get(task_id, 0)
                api.calls[task_id] = count + 1
                answers = api.scripts.get(task_id) or [(404, {"code": 404, "msg": "no"}, {})]
                answer = answers[min(count, len(answers) - 1)]
                if callable(answer):                   # a hostile API scripts its own bytes
                    with contextlib.suppress(OSError):
                        answer(self)
                    return
                code, body, headers, *stall_seconds = answer
                if stall_seconds:
                    time.sleep(stall_seconds[0])       # the client is meant to time out
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def script(self, task_id, *answers):
        self.scripts[task_id] = list(answers)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def api_answer(task_id, flag, images=None, error_message=None):
    return (200, {"code": 200, "msg": "success", "data": {
        "taskId": task_id, "successFlag": flag, "response": {"images": images},
        "errorCode": 200 if flag == 1 else (501 if flag == 3 else None),
        "errorMessage": error_message}}, {})


class ReceiverProcess:
    """cover_receiver.py as a subprocess; collects its stderr lines."""

    def __init__(self, args, env=None, stdin=None, command=None, **popen):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("COVER_RECEIVER_")}
        full_env.update(env or {})
        self.lines, self.changed = [], threading.Condition()
        if WINDOWS and command is None:
            command = [sys.executable, "-c", WINDOWS_STOPPER % HERE] + args
            stdin = subprocess.PIPE
        self.proc = subprocess.Popen(command or [sys.executable, SCRIPT] + args, env=full_env,
                                     stdin=stdin, stderr=subprocess.PIPE, text=True, **popen)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)
            self.changed.notify_all()

    def wait_log(self, pattern, timeout=WAIT):
        regex = re.compile(pattern)
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(line and regex.search(line) for line in self.lines)
                or None in self.lines, timeout)
            match = next((regex.search(x) for x in self.lines if x and regex.search(x)), None)
        assert found and match, "no log line %r in:\n%s" % (pattern, self.text())
        return match

    def text(self):
        with self.changed:
            return "".join(x for x in self.lines if x)

    def exit(self):
        """Wait for the process to end and its stderr to close: (status, lines)."""
        status = self.proc.wait(WAIT)
        with self.changed:
            assert self.changed.wait_for(lambda: None in self.lines, WAIT)
        return status, self.text().strip().splitlines()

    @property
    def url(self):
        return "http://127.0.0.1:%s/suno-cover-callback" % self.wait_log(r'port(?:=|": )(\d+)').group(1)

    def signal(self, sig=STOP_SIGNAL):
        if WINDOWS:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        else:
            self.proc.send_signal(sig)

    def stop(self, sig=STOP_SIGNAL):
        if self.proc.poll() is None:
            self.signal(sig)
        return self.exit()[0]


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture
def cdn():
    server = FakeCDN()
    yield server
    server.close()


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A self-signed certificate made by the openssl command line tool (where
    there is none, as under Wine, CI makes one and names its folder in
    COVER_TEST_CERTS)."""
    if os.environ.get("COVER_TEST_CERTS"):
        made = os.environ["COVER_TEST_CERTS"]
        return os.path.join(made, "cert.pem"), os.path.join(made, "key.pem")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("certs")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,DNS:tempfile.aiquickdraw.com,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_cdn(certs):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certs)
    server = FakeCDN(tls=context)
    yield server
    server.close()


def names_to_loopback(*names):
    """The resolver seam: these names resolve to 127.0.0.1, IP literals to
    themselves, nothing else resolves (no real DNS in tests)."""
    def resolve(host, port):
        if host in names:
            return ["127.0.0.1"]
        try:
            return [str(cr.ipaddress.ip_address(host))]
        except ValueError:
            raise socket.gaierror("no such host in this test: %s" % host) from None
    return resolve


@pytest.fixture
def start(tmp_path):
    """start(*argv, resolver=..., **config overrides) -> a running Receiver."""
    running = []

    def start(*argv, resolver=None, client_tls=None, env=None, clock=cr.Clock, **overrides):
        argv = ["--port", "0", "--host", "127.0.0.1", "--dir", str(tmp_path / "covers")] + list(argv)
        config = cr.build_config(argv, env or {})
        config = dataclasses.replace(config, **dict({"backoff_base": 0.01}, **overrides))
        receiver = cr.Receiver(config, resolver=resolver or names_to_loopback(), env={},
                               clock=clock, client_tls=client_tls)
        receiver.start()
        running.append(receiver)
        receiver.dir = config.dir
        return receiver
    yield start
    for receiver in running:
        if receiver.front.stopping is None:
            receiver.stop()


def allow_loopback():
    return ("--allow-host", "127.0.0.1")


class SteppedClock(cr.Clock):
    """The clock seam with a wall clock that a test steps (NTP, a resumed VM);
    the monotonic clock goes on as it is."""

    def __init__(self, offset=0.0):
        self.offset = offset

    def wall(self):
        return time.time() + self.offset


def wall_clock_at(when):
    clock = SteppedClock()
    clock.wall = lambda: when
    return clock


# ---------------------------------------------------------------------------
# Helpers shared by the sections below
# ---------------------------------------------------------------------------

def take_the_dir_away(receiver):
    """Remove --dir under a running receiver (Windows cannot remove the open database)."""
    if WINDOWS:
        pytest.skip("Windows cannot remove a database that is open")
    shutil.rmtree(receiver.dir)


def download_one(start, cdn, *answers, argv=(), **overrides):
    """Post a one-image callback whose image answers as scripted; return the
    finished record."""
    receiver = start(*(allow_loopback() + tuple(argv)), **overrides)
    post(receiver.url, payload("img", [cdn.route("/img", *answers)]))
    return receiver, wait_for(lambda: (record(receiver.dir, "img") or {}).get("status")
                              in ("done", "failed") and record(receiver.dir, "img"))


def parse_metrics(text):
    values, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.split("{")[0] in typed, "metric without # TYPE: " + line
            values[name] = float(value)
    return values


def hook_script(tmp_path, body):
    """A hook written in Python, so it runs on every platform: returns the
    --on-complete command (single quotes keep Windows backslashes)."""
    script = tmp_path / "hook.py"
    script.write_text("import os, sys, time\nenv = os.environ\n" + body)
    return "'%s' '%s'" % (sys.executable, script)


def run_cli(*argv):
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items()
                                           if not k.startswith("COVER_RECEIVER_")})


def valid_record_bytes(task_id, url="http://127.0.0.1:9/x.png"):
    return cr.encode_record(cr.new_record(cr.Callback(task_id, 200, "success", (url,))))


def wrong_types(task_id):
    stored = json.loads(valid_record_bytes(task_id))
    stored.update(files="cover_1.png", tries=["x"])
    return json.dumps(stored).encode()


# Each shape is planted as <dir>/<taskId>/task.json of a task marked pending.
CORRUPT_SHAPES = {
    "empty object": lambda t: b"{}",
    "wrong types": wrong_types,
    "truncated": lambda t: valid_record_bytes(t)[:40],
    "deep json": lambda t: b"[" * 200000 + b"]" * 200000,
    "not utf-8": lambda t: b"\xff\xfe{}",
    "another task's record": lambda t: valid_record_bytes("someone-else"),
    "a file not named a cover": lambda t: valid_record_bytes(t).replace(
        b'"files": [null]', b'"files": ["../../etc/passwd"]'),
    "larger than the bound": lambda t: b" " * (cr.MAX_RECORD_BYTES + 1) + b"{}",
    "a directory": "dir",
    "a fifo": "fifo",
}


def plant_corrupt(folder, task_id, shape):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / task_id).mkdir()
    target = folder / task_id / "task.json"
    maker = CORRUPT_SHAPES[shape]
    if maker == "dir":
        target.mkdir()
    elif maker == "fifo":
        if WINDOWS:
            pytest.skip("no FIFOs on Windows")
        os.mkfifo(str(target))
    else:
        target.write_bytes(maker(task_id))


def healthz(receiver):
    return json.loads(get(receiver.url.replace("/suno-cover-callback", "/healthz"))[1])


def metrics_of(receiver):
    return parse_metrics(get(receiver.url.replace("/suno-cover-callback", "/metrics"))[1].decode())


def status_lines(folder, *argv):
    """status's lines on a terminal wide enough that no reason wraps."""
    result = subprocess.run([sys.executable, SCRIPT, "status", "--dir", str(folder), *argv],
                            capture_output=True, text=True, timeout=60,
                            env=dict(cli_env(None), COLUMNS="1000"))
    return result.returncode, result.stdout.splitlines(), result.stderr


@contextlib.contextmanager
def unwritable(folder):
    """folder refuses writes for real: a read-only bind mount as root (who
    passes permission checks), mode 0555 for anyone else."""
    if WINDOWS:
        pytest.skip("no read-only folders for this test on Windows")
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot bind-mount here")
        try:
            yield
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def counting_hook(tmp_path, body="sys.exit(0)\n"):
    """A hook that appends 'taskId try status' to runs.log, then runs body."""
    runs = tmp_path / "runs.log"
    script = hook_script(tmp_path, (
        "with open(%r, 'a') as log:\n"
        "    log.write('%%s %%s %%s\\n' %% (env['COVER_TASK_ID'], env['COVER_HOOK_TRY'],\n"
        "                                env['COVER_TASK_STATUS']))\n" % str(runs)) + body)
    return script, runs


def runs_of(runs, task_id):
    if not runs.exists():
        return []
    return [line.split()[1:] for line in runs.read_text().splitlines()
            if line.split()[0] == task_id]


def hook_of(folder, task_id, state):
    return wait_for(lambda: ((record(folder, task_id) or {}).get("hook") or {}).get("status")
                    == state and record(folder, task_id)["hook"], what="hook %s" % state)


def serve_args(folder, *extra):
    return ["--port", "0", "--host", "127.0.0.1", "--dir", str(folder)] + list(extra)


API_KEY = "sk-recovery-test-key"


def cli_env(key=API_KEY):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVER_RECEIVER_", "SUNO_"))}
    if key:
        env["SUNO_API_KEY"] = key
    return env


def expect(folder, *task_ids, parent=None):
    result = run_cli("expect", *task_ids, "--dir", str(folder),
                     *(("--parent", parent) if parent else ()))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# ---------------------------------------------------------------------------
# CLI: options, environment, usage errors, status and retry
# ---------------------------------------------------------------------------

def command_line_for(command):
    """The least argv that runs command (its required arguments)."""
    return {"fetch": ["fetch", "t1"], "expect": ["expect", "t1"],
            "generate": ["generate", "m1", "--callback-url", "https://x.example/cb"]
            }.get(command, [command])


def readme_block(heading):
    """The first ```sh block after a README heading, as a list of lines."""
    text = (pathlib.Path(HERE) / "README.md").read_text(encoding="utf-8")
    return text.split(heading + "\n", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0].splitlines()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(WINDOWS, reason="the block is for sh")
def test_try_it_locally_works_under_sh_with_only_python3(tmp_path):
    shims = tmp_path / "bin"                # python3 here is this interpreter, and no curl
    shims.mkdir()
    (shims / "python3").symlink_to(sys.executable)
    shutil.copy(SCRIPT, tmp_path)
    env = {"PATH": "%s:/bin:/usr/bin" % shims, "HOME": str(tmp_path)}
    image_port, receiver_port = free_port(), free_port()
    lines = [line.replace("8000", str(image_port)).replace("3000", str(receiver_port)).replace(
        "/tmp/img", str(tmp_path / "img")) for line in readme_block("## Try it locally")]
    assert len(lines) == 3 and all(line.startswith(("python3 ", "mkdir ")) for line in lines)
    servers = [subprocess.Popen(["sh", "-c", line], cwd=tmp_path, env=env,
                                start_new_session=True, stderr=subprocess.DEVNULL)
               for line in (lines[0], lines[1] + " --port %d" % receiver_port)]
    try:
        for port in (image_port, receiver_port):
            wait_for(lambda: connectable(port), what="the server on port %d" % port)
        sent = subprocess.run(["sh", "-c", lines[2]], cwd=tmp_path, env=env, timeout=60,
                              capture_output=True, text=True)
        assert sent.stdout.strip() == '{"status": "received", "taskId": "try1"}', sent.stderr
        cover = tmp_path / "covers" / "try1" / "cover_1.png"
        wait_for(lambda: cover.exists(), what="the cover")
        assert read(cover) == b"\x89PNG\r\n\x1a\nhello"
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def connectable(port):
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def test_bare_command_serves_on_3000_into_covers():
    config = cr.build_config([], {})
    assert (config.command, config.port, config.dir, config.path) == \
        ("serve", 3000, "./covers", "/suno-cover-callback")
    assert config.workers == 4 and config.max_image_bytes == 26214400
    # Retries: no count limit, 14 days (the image URLs' lifetime), gaps up to 10 minutes.
    assert (config.attempts, config.retry_for, config.max_backoff) == (0, 14 * 86400, 600)


def test_every_option_reads_its_env_variable_and_the_flag_wins():
    env = {"COVER_RECEIVER_PORT": "4000", "COVER_RECEIVER_MAX_IMAGE_BYTES": "99",
           "COVER_RECEIVER_ALLOW_HOST": "a.example, *.b.example"}
    config = cr.build_config(["--port", "5000"], env)
    assert config.port == 5000
    assert config.max_image_bytes == 99
    assert config.allow_host == ("a.example", "*.b.example")


def test_systemd_credentials_are_the_defaults_of_the_secret_and_key_files(tmp_path):
    creds = tmp_path / "credentials"           # what LoadCredential= makes: one file each
    creds.mkdir()
    for name in ("token", "hmac-key", "api-key", "tls-cert", "tls-key"):
        (creds / name).write_text(name + "-value\n")
    config = cr.build_config([], {"CREDENTIALS_DIRECTORY": str(creds)})
    assert (config.token, config.hmac_key, config.api_key) == \
        ("token-value", b"hmac-key-value", "api-key-value")
    assert (config.tls_cert, config.tls_key) == (str(creds / "tls-cert"), str(creds / "tls-key"))
    other = tmp_path / "other-token"
    other.write_text("flag-value")
    assert cr.build_config(["--token-file", str(other)], {"CREDENTIALS_DIRECTORY": str(
        creds)}).token == "flag-value"                                   # the flag wins
    (creds / "token").unlink()
    assert cr.build_config([], {"CREDENTIALS_DIRECTORY": str(creds)}).token is None


@pytest.mark.parametrize("option", cr.OPTIONS, ids=lambda option: option.name)
def test_every_option_has_an_env_variable_and_a_readme_row(option):
    variable = "COVER_RECEIVER_" + option.name.replace("-", "_").upper()
    argv = command_line_for(option.commands[0])
    if option.name == "callback-url":
        argv = ["generate", "m1"]
    with pytest.raises(cr.UsageError, match=variable):      # read, parsed, and named
        cr.build_config(argv, {variable: "\x01bad", "SUNO_API_KEY": "k"})
    readme = (pathlib.Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^\| [^|\n]*`--%s[ `]" % re.escape(option.name), readme, re.M), option.name


@pytest.mark.parametrize("argv, env, named", [
    (["--port", "x"], {}, "--port"),
    (["--port", "70000"], {}, "--port"),
    ([], {"COVER_RECEIVER_WORKERS": "0"}, "COVER_RECEIVER_WORKERS"),
    (["--timeout", "-1"], {}, "--timeout"),
    (["--path", "no-slash"], {}, "--path"),
    (["--allow-host", "bad host!"], {}, "--allow-host"),
    (["--tls-cert", "/nonexistent.pem"], {}, "--tls-cert"),
    (["--no-such-option"], {}, "--no-such-option"),
    (["status", "../etc"], {}, "TASKID"),
])
def test_bad_value_exits_2_with_one_line_naming_the_option(argv, env, named, capfd, tmp_path):
    assert cr.main(argv + ["--dir", str(tmp_path)], env=env) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err


def test_version_and_help(capfd):
    assert cr.main(["--version"], env={}) == 0
    assert cr.__version__ in capfd.readouterr().out
    assert cr.main(["--help"], env={}) == 0
    text = capfd.readouterr().out
    for word in ("callBackUrl", "--version", "COMMAND --help") + cr.COMMANDS:
        assert word in text


def help_of(command, capfd):
    assert cr.main([command, "--help"], env={}) == 0
    return capfd.readouterr().out


@pytest.mark.parametrize("command", cr.COMMANDS)
def test_each_commands_help_gives_its_own_options_secrets_and_exit_statuses(command, capfd):
    text = help_of(command, capfd)
    own = {"--" + opt.name for opt in cr.OPTIONS if command in opt.commands}
    shown = set(re.findall(r"^  (--[a-z-]+)", text, re.M)) - {"--help", "--all", "--json",
                                                              "--hook"}
    assert shown == own
    secrets = {"serve": {"COVER_RECEIVER_HMAC_KEY", "COVER_RECEIVER_TOKEN", "SUNO_API_KEY"},
               "fetch": {"SUNO_API_KEY"}, "generate": {"SUNO_API_KEY"}}.get(command, set())
    assert set(re.findall(r"COVER_RECEIVER_[A-Z_]+(?= \()|SUNO_API_KEY", text)) == secrets
    assert re.search(r"Exit 0\b.*\b2\b", " ".join(text.split()))
    if "TASKID" in text:
        assert "a cover task's taskId" in text


def test_help_says_a_repeatable_options_variable_is_comma_separated(capfd):
    assert re.search(r"--allow-host HOST.*\(env: comma-separated\)", " ".join(
        help_of("serve", capfd).split()))


def test_status_lists_tasks_and_prints_one_record(start, cdn, capfd):
    receiver = start(*allow_loopback())
    post(receiver.url, payload("done1", [cdn.route("/a.png", ok(PNG))]))
    post(receiver.url, payload("failed1", code=501, images=None, msg="nope"))
    wait_status(receiver.dir, "done1", "done")
    assert cr.main(["status", "--dir", receiver.dir], env={}) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[0] == "1 failed (tasks not done; done ones: status --all)"
    assert re.match(r"failed1\s+failed\s+0/0 .*code 501: nope", lines[2]) and len(lines) == 3
    assert cr.main(["status", "--dir", receiver.dir, "--all"], env={}) == 0
    table = capfd.readouterr().out
    assert re.search(r"done1\s+done\s+1/1", table) and re.search(r"failed1\s+failed\s+0/0", table)
    assert table.splitlines()[-1] == "1 failed, 1 done"
    assert cr.main(["status", "--dir", receiver.dir, "--all", "--json"], env={}) == 0
    objects = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert [o.get("taskId") for o in objects] == ["done1", "failed1", None]
    assert objects[-1]["summary"] == {"done": 1, "failed": 1}
    assert cr.main(["status", "--dir", receiver.dir, "done1"], env={}) == 0
    assert json.loads(capfd.readouterr().out)["files"] == ["cover_1.png"]
    assert cr.main(["status", "--dir", receiver.dir, "unknown"], env={}) == 1
    assert cr.main(["status", "--dir", receiver.dir + "-typo"], env={}) == 2


def test_status_lists_what_is_not_done_newest_first_and_says_when_there_is_nothing(
        start, cdn, tmp_path, capfd):
    folder = tmp_path / "covers"
    first = start()
    assert cr.main(["status", "--dir", str(first.dir)], env={}) == 0
    assert capfd.readouterr().out == "no tasks in %s\n" % folder
    first.stop()
    expect(folder, "first")
    receiver = start(*allow_loopback())
    post(receiver.url, payload("second", code=501, images=None, msg="no"))
    post(receiver.url, payload("third", [cdn.route("/t.png", status(503))]))
    post(receiver.url, payload("fine", [cdn.route("/f.png", ok(PNG))]))
    wait_status(receiver.dir, "fine", "done")
    assert cr.main(["status", "--dir", str(folder)], env={}) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[0] == "1 expected, 1 pending, 1 failed (tasks not done; done ones: status --all)"
    rows = [line.split()[0] for line in lines[2:] if not line.startswith("    ")]
    assert rows == ["third", "second", "first"]


def test_retry_command_downloads_a_fixed_image_once_beside_a_running_serve(start, cdn):
    receiver = start(*allow_loopback())
    good, fixed = cdn.route("/good.png", ok(PNG)), cdn.route("/fixed.png", status(404))
    post(receiver.url, payload("fixme", [good, fixed]))
    assert wait_status(receiver.dir, "fixme", "failed")["files"] == ["cover_1.png", None]
    cdn.route("/fixed.png", ok(JPEG))                   # the host is fixed
    result = run_cli("retry", "--dir", receiver.dir, "--allow-host", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fixme done: 2 covers")
    assert read(os.path.join(receiver.dir, "fixme", "cover_2.jpg")) == JPEG
    assert post(receiver.url, payload("fixme", [good, fixed]))[1]["status"] == "duplicate"
    assert cdn.hits == {"/good.png": 1, "/fixed.png": 2}


def test_retry_command_reports_each_task_and_exits_1_unless_all_are_done(start, cdn):
    receiver = start(*allow_loopback())
    post(receiver.url, payload("still-bad", [cdn.route("/bad.png", status(410))]))
    wait_status(receiver.dir, "still-bad", "failed")
    result = run_cli("retry", "still-bad", "unknown", "--dir", receiver.dir,
                     "--allow-host", "127.0.0.1")
    assert result.returncode == 1
    assert sorted(result.stdout.splitlines()) == [
        "still-bad failed: cover_1: HTTP 410", "unknown error: no task unknown in %s"
        % os.path.abspath(receiver.dir)]


@pytest.mark.parametrize("argv, env, named", [
    (["--on-complete", "/no/such/program --flag"], {}, "/no/such/program does not exist"),
    (["--on-complete", "no-such-program-here"], {}, "no-such-program-here is not found on PATH"),
    (["--on-complete", "'EMPTY'"], {}, "not an executable program" + ("" if WINDOWS else
                                                                     " (chmod +x")),
    ([], {"COVER_RECEIVER_TOKEN": ""}, "COVER_RECEIVER_TOKEN"),
    ([], {"COVER_RECEIVER_HMAC_KEY": ""}, "COVER_RECEIVER_HMAC_KEY"),
    (["--token-file", "EMPTY"], {}, "--token-file"),
    (["--timeout", "1e9"], {}, "from 0.1 to 3600 seconds"),
])
def test_bad_set_ups_are_refused_at_start_and_create_nothing(tmp_path, capfd, argv, env, named):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    folder = tmp_path / "covers"
    argv = [a.replace("EMPTY", str(empty)) for a in argv]
    assert cr.main(argv + ["--port", "0", "--dir", str(folder)], env=env) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not folder.exists()


def test_status_help_does_not_claim_to_create_the_folder(capfd):
    assert cr.main(["status", "--help"], env={}) == 0
    assert "create" not in capfd.readouterr().out.split("--dir")[1].split("--")[0]


def test_retry_of_a_pending_task_says_when_it_is_tried_instead_of_blocking(tmp_path):
    covers = tmp_path / "covers"
    pending_on_disk(covers, "waiting", "http://127.0.0.1:9/x.png", tries=[2],
                    lastError=["HTTP 503"], nextTryAt=[cr.utc_now(time.time() + 3600)])
    result = run_cli("retry", "waiting", "--dir", str(covers))
    assert result.returncode == 1
    assert re.match(r"waiting pending: not failed, .*HTTP 503; next try 20", result.stdout)


def test_retry_hands_the_work_to_a_running_serve_whose_settings_apply(tmp_path, cdn):
    folder = tmp_path / "c"
    serve = ReceiverProcess(serve_args(folder, "--allow-host", "127.0.0.1"))
    try:
        url = cdn.route("/r.png", status(404), ok(PNG))
        post(serve.url, payload("handed", [url]))
        wait_status(str(folder), "handed", "failed")
        # retry names none of serve's options: alone it would refuse http://127.0.0.1.
        result = run_cli("retry", "handed", "--dir", str(folder))
        assert (result.returncode, result.stdout) == (0, "handed done: 1 covers in %s\n"
                                                      % os.path.join(str(folder), "handed"))
        assert read(os.path.join(str(folder), "handed", "cover_1.png")) == PNG
        assert cdn.hits == {"/r.png": 2}
        serve.wait_log(r"requested task=handed status=pending")
    finally:
        assert serve.stop() == 0


def test_retry_does_the_work_itself_once_the_serve_is_gone(tmp_path, cdn):
    folder = tmp_path / "c"
    serve = ReceiverProcess(serve_args(folder, "--allow-host", "127.0.0.1"))
    post(serve.url, payload("orphan", [cdn.route("/o.png", status(404), ok(PNG))]))
    wait_status(str(folder), "orphan", "failed")
    serve.proc.kill()                                  # the OS drops serve's lock with it
    serve.proc.wait(WAIT)
    alone = run_cli("retry", "orphan", "--dir", str(folder))
    assert alone.returncode == 1 and "only https URLs" in alone.stdout   # its own options apply
    result = run_cli("retry", "orphan", "--dir", str(folder), "--allow-host", "127.0.0.1")
    assert result.returncode == 0 and result.stdout.startswith("orphan done")


def test_retry_through_serve_reports_a_task_not_ended_within_wait(start, cdn):
    receiver = start(*allow_loopback())
    post(receiver.url, payload("slow", [cdn.route("/slow.png", status(404), stall(PNG))]))
    wait_status(receiver.dir, "slow", "failed")
    result = run_cli("retry", "slow", "--dir", receiver.dir, "--wait", "0.5")
    assert result.returncode == 1
    assert result.stdout.startswith("slow pending: handed to the running serve; not ended "
                                    "within --wait 0.5 s")
    cdn.release.set()


def test_retry_hook_through_serve_needs_no_on_complete_of_its_own(start, cdn, tmp_path):
    script, runs = counting_hook(tmp_path, "sys.exit(int(open(%r).read()))\n"
                                 % str(tmp_path / "exit"))
    (tmp_path / "exit").write_text("3")
    receiver = start(*allow_loopback(), "--on-complete", script, "--hook-retry-for", "0")
    post(receiver.url, payload("hk", [cdn.route("/hk.png", ok(PNG))]))
    hook_of(receiver.dir, "hk", "failed")
    (tmp_path / "exit").write_text("0")
    result = run_cli("retry", "--hook", "--dir", receiver.dir)
    assert (result.returncode, result.stdout) == (0, "hk hook done: done\n")
    assert runs_of(runs, "hk") == [["1", "done"], ["2", "done"]]


def test_retry_on_a_dir_that_does_not_exist_is_a_usage_error(tmp_path):
    result = run_cli("retry", "--dir", str(tmp_path / "typo"))
    assert result.returncode == 2 and "--dir %s does not exist" % (tmp_path / "typo") in result.stderr
    assert not (tmp_path / "typo").exists()


def test_a_misspelt_variable_is_a_warning_naming_the_closest_option(tmp_path, caplog):
    assert cr.main(["status", "--dir", str(tmp_path)], env={"COVER_RECEIVER_ALLOWHOST": "x",
                                                            "COVER_RECEIVER_TOKEN": "t"}) == 0
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == ["unknown-variable name=COVER_RECEIVER_ALLOWHOST note=\"names no option; "
                     "ignored; did you mean COVER_RECEIVER_ALLOW_HOST?\""]


def test_status_at_80_columns_wraps_the_reason_and_keeps_the_remedy(start, tmp_path):
    receiver = start()
    post(receiver.url, payload("plain", ["http://127.0.0.1:9/x.png"]))
    wait_status(receiver.dir, "plain", "failed")
    result = subprocess.run([sys.executable, SCRIPT, "status", "--dir", receiver.dir],
                            capture_output=True, text=True, timeout=60,
                            env=dict(cli_env(None), COLUMNS="80"))
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert "(--allow-host HOST allows http from HOST)" in " ".join(
        line.strip() for line in lines[3:])


# ---------------------------------------------------------------------------
# HTTP answers: the endpoint, proof of origin, requests and connections
# ---------------------------------------------------------------------------

def raw_request(url, data, read=True, timeout=WAIT):
    parts = cr.urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        if not read:
            return b""
        sock.shutdown(socket.SHUT_WR)               # the request ends here, not at a timeout
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def held(receiver, count):
    """Wait until the front loop holds count connections."""
    wait_for(lambda: len(receiver.front.conns) == count, what="%d connections held" % count)


@pytest.fixture
def shared_receiver(tmp_path_factory):
    """One receiver for every example of the property test, stopped with it
    (a receiver that outlived its test would log into later tests' caplog)."""
    folder = str(tmp_path_factory.mktemp("property") / "covers")
    config = cr.build_config(["--port", "0", "--host", "127.0.0.1", "--dir", folder], {})
    receiver = cr.Receiver(config, resolver=names_to_loopback(), env={})
    receiver.start()
    yield receiver
    receiver.stop()


def idle_clients(receiver, count, tls=None):
    parts = cr.urllib.parse.urlsplit(receiver.url)
    return [socket.create_connection((parts.hostname, parts.port), timeout=WAIT)
            for _ in range(count)]


def test_seed_payload_is_saved_byte_exact(start, tls_cdn, certs):
    """The vendor's own example, over HTTPS to the host named in it."""
    first, second = PNG, JPEG
    tls_cdn.route("/s/1753958521_6c1b3015141849d1a9bf17b738ce9347.png", ok(first))
    tls_cdn.route("/s/1753958524_c153143acc6340908431cf0e90cbce9e.png", ok(second))
    client_tls = ssl.create_default_context(cafile=certs[0])
    receiver = start("--allow-host", "tempfile.aiquickdraw.com",
                     resolver=names_to_loopback("tempfile.aiquickdraw.com"), client_tls=client_tls)
    body = SEED_BODY.replace(b"aiquickdraw.com/", b"aiquickdraw.com:%d/" % tls_cdn.port)
    code, answer, _ = post(receiver.url, body)
    assert (code, answer) == (200, {"status": "received", "taskId": SEED_TASK})
    done = wait_status(receiver.dir, SEED_TASK, "done")
    assert done["files"] == ["cover_1.png", "cover_2.jpg"]
    assert read(os.path.join(receiver.dir, SEED_TASK, "cover_1.png")) == first
    assert read(os.path.join(receiver.dir, SEED_TASK, "cover_2.jpg")) == second
    assert visible_entries(os.path.join(receiver.dir, SEED_TASK)) == \
        ["cover_1.png", "cover_2.jpg", "task.json"]
    for key in ("taskId", "status", "code", "msg", "images", "files", "error", "receivedAt",
                "updatedAt"):
        assert key in done
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", done["receivedAt"])


BAD_CALLBACKS = [
    ("not json", b"{nope"),
    ("not an object", b"[1, 2]"),
    ("no code", {"msg": "x", "data": {"taskId": "t1", "images": ["http://h/a"]}}),
    ("code is a string", payload(code="200")),
    ("code is a bool", {"code": True, "msg": "", "data": {"taskId": "t1", "images": []}}),
    ("msg not a string", {"code": 200, "msg": 5, "data": {"taskId": "t1", "images": ["http://h/a"]}}),
    ("no data", {"code": 200, "msg": "x"}),
    ("no taskId", {"code": 200, "msg": "x", "data": {"images": ["http://h/a"]}}),
    ("dot-dot taskId", payload(task_id="../escape")),
    ("slash taskId", payload(task_id="a/b")),
    ("empty taskId", payload(task_id="")),
    ("long taskId", payload(task_id="a" * 129)),
    ("dash-first taskId", payload(task_id="-rf")),
    ("images null on success", payload(images=None)),
    ("no images", payload(images=[])),
    ("eleven images", payload(images=["http://h/%d" % i for i in range(11)])),
    ("image not a string", payload(images=[5])),
    ("ftp image", payload(images=["ftp://h/a.png"])),
    ("relative image", payload(images=["/a.png"])),
    ("long image URL", payload(images=["http://h/" + "a" * 2048])),
    ("image URL with space", payload(images=["http://h/a b.png"])),
    ("image URL with newline", payload(images=["http://h/a\n.png"])),
]


@pytest.mark.parametrize("why, body", BAD_CALLBACKS, ids=[b[0] for b in BAD_CALLBACKS])
def test_malformed_callback_is_400_with_reason_and_touches_no_file(start, tmp_path, why, body):
    receiver = start()
    code, answer, _ = post(receiver.url, body)
    assert code == 400 and answer["status"] == "error" and answer["error"]
    assert leftovers(receiver.dir) == []
    assert not os.path.exists(tmp_path / "escape")


def test_other_path_is_404_and_other_method_is_405_with_allow(start):
    receiver = start()
    assert get(receiver.url.replace("/suno-cover-callback", "/other"))[0] == 404
    code, _, response = get(receiver.url)
    assert code == 405 and response.getheader("Allow") == "POST"
    assert get(receiver.url, method="PUT")[0] == 405
    assert raw_request(receiver.url, b"BREW /suno-cover-callback HTTP/1.0\r\n\r\n") \
        .startswith(b"HTTP/1.0 501")
    assert get(receiver.url.replace("/suno-cover-callback", "/healthz"), method="HEAD")[0] == 200


def test_missing_content_length_is_411(start):
    receiver = start()
    answer = raw_request(receiver.url, b"POST /suno-cover-callback HTTP/1.0\r\n"
                                       b"Content-Type: application/json\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.0 411")


def test_body_over_max_body_bytes_is_413_before_reading_it(start):
    receiver = start("--max-body-bytes", "100")
    # Announce a huge body and send none of it: the answer must not wait for it.
    answer = raw_request(receiver.url, b"POST /suno-cover-callback HTTP/1.0\r\nContent-Type: "
                                       b"application/json\r\nContent-Length: 999999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 413")
    assert visible_entries(receiver.dir) == []


def test_non_json_content_type_is_415(start):
    receiver = start()
    code, answer, _ = post(receiver.url, payload(), content_type="text/plain")
    assert code == 415 and answer["status"] == "error"
    code, _, _ = post(receiver.url, payload(images=["http://127.0.0.1:9/x"]),
                      content_type="application/json; charset=utf-8")
    assert code == 200


def test_the_request_handler_never_waits_for_a_download(start, cdn):
    receiver = start(*allow_loopback())
    code, answer, _ = post(receiver.url, payload("nowait", [cdn.route("/n.png", stall(PNG))]))
    assert (code, answer["status"]) == (200, "received")
    assert not cdn.release.is_set()            # answered while the image is still stalled
    cdn.release.set()
    wait_status(receiver.dir, "nowait", "done")


def test_signature_known_answer():
    """API-FACTS: key k3y, the seed taskId, timestamp 1753958521."""
    assert cr.webhook_signature(b"k3y", SEED_TASK, "1753958521") == \
        "hU8mWgYP2Ltd4xXF2FJ9U1gGV1fmp8USz89AXhMM1p0="


def test_signed_callback_is_accepted_with_any_header_case(start, cdn):
    receiver = start(*allow_loopback(), env={"COVER_RECEIVER_HMAC_KEY": "k3y"})
    body = payload("signed", [cdn.route("/s.png", ok(PNG))])
    headers = {k.lower(): v for k, v in signed_headers(b"k3y", "signed").items()}
    assert post(receiver.url, body, headers)[:2] == (200, {"status": "received", "taskId": "signed"})
    wait_status(receiver.dir, "signed", "done")


NOW = 1_800_000_000


BAD_SIGNATURES = [
    ("missing both", {}),
    ("missing signature", {"X-Webhook-Timestamp": str(NOW)}),
    ("missing timestamp", {"X-Webhook-Signature": cr.webhook_signature(b"k3y", "t1", str(NOW))}),
    ("timestamp not an integer", signed_headers(b"k3y", "t1", "12.5")),
    ("signature not base64", signed_headers(b"k3y", "t1", str(NOW), "%%%not-base64%%%")),
    ("stale", signed_headers(b"k3y", "t1", str(NOW - 301))),
    ("future", signed_headers(b"k3y", "t1", str(NOW + 301))),
    ("wrong key", signed_headers(b"other", "t1", str(NOW))),
    ("other task", signed_headers(b"k3y", "t2", str(NOW))),
]


@pytest.mark.parametrize("why, headers", BAD_SIGNATURES, ids=[b[0] for b in BAD_SIGNATURES])
def test_bad_signature_is_401_with_no_side_effect(start, cdn, why, headers):
    receiver = start(*allow_loopback(), env={"COVER_RECEIVER_HMAC_KEY": "k3y"}, clock=wall_clock_at(NOW))
    code, answer, _ = post(receiver.url, payload("t1", [cdn.route("/a.png", ok(PNG))]), headers)
    assert code == 401 and answer["status"] == "error" and answer["error"]
    assert visible_entries(receiver.dir) == [] and cdn.hits == {}


def test_signature_window_is_300_seconds_either_way(start, cdn):
    receiver = start(*allow_loopback(), env={"COVER_RECEIVER_HMAC_KEY": "k3y"}, clock=wall_clock_at(NOW))
    for n, skew in enumerate((-300, 300)):
        body = payload("edge%d" % n, ["http://127.0.0.1:9/x"])
        assert post(receiver.url, body, signed_headers(b"k3y", "edge%d" % n, str(NOW + skew)))[0] == 200


def test_token_is_required_on_the_url(start, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-token\n")            # the trailing newline is not part of it
    receiver = start("--token-file", str(token_file))
    for query in ("", "?token=wrong", "?token=s3cr3t-token&token=s3cr3t-token", "?tok=s3cr3t-token"):
        assert post(receiver.url + query, payload())[0] == 401
    assert visible_entries(receiver.dir) == []
    assert post(receiver.url + "?token=s3cr3t-token", payload())[0] == 200


def test_key_and_token_together_are_both_required(start):
    receiver = start(env={"COVER_RECEIVER_HMAC_KEY": "k3y", "COVER_RECEIVER_TOKEN": "tok"})
    body = payload("both", ["http://127.0.0.1:9/x"])
    assert post(receiver.url + "?token=tok", body)[0] == 401
    assert post(receiver.url, body, signed_headers(b"k3y", "both"))[0] == 401
    assert post(receiver.url + "?token=tok", body, signed_headers(b"k3y", "both"))[0] == 200


def test_https_serving_and_a_failed_handshake_does_not_hurt(start, certs, cdn):
    receiver = start(*allow_loopback(), "--tls-cert", certs[0], "--tls-key", certs[1])
    assert receiver.url.startswith("https://")
    # A plaintext client is told in plain HTTP; a client hangs up mid-handshake.
    answer = raw_request(receiver.url, b"POST /suno-cover-callback HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400 ") and b"https://" in answer
    raw_request(receiver.url, b"\x16\x03\x01\x00", read=False)
    client = ssl.create_default_context(cafile=certs[0])
    body = payload("tls", [cdn.route("/t.png", ok(PNG))])
    assert post(receiver.url, body, tls=client)[:2] == (200, {"status": "received", "taskId": "tls"})
    wait_status(receiver.dir, "tls", "done")


def test_a_stalled_client_is_cut_off_while_others_are_served(start):
    receiver = start("--request-timeout", "1")
    parts = cr.urllib.parse.urlsplit(receiver.url)
    with socket.create_connection((parts.hostname, parts.port)) as slow:
        slow.sendall(b"POST /suno-cover-callback HTTP/1.0\r\n")
        assert post(receiver.url, payload("busy", ["http://127.0.0.1:9/x"]))[0] == 200
        # Drip a header line every 0.3 s (each read is quick): only a deadline on
        # the whole request can end this.
        deadline, closed = time.monotonic() + WAIT, False
        while not closed and time.monotonic() < deadline:
            try:
                slow.sendall(b"X-Drip: 1\r\n")
                if select.select([slow], [], [], 0.3)[0]:
                    closed = slow.recv(1024) == b""
            except OSError:
                closed = True
        assert closed, "the dripping client was never cut off"
    assert visible_entries(receiver.dir) == ["busy"]


def test_garbage_request_line_is_400_and_oversized_headers_are_refused(start):
    receiver = start()
    assert raw_request(receiver.url, b"\x00\x01garbage\r\n\r\n").startswith(b"HTTP/1.0 400")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    answer = raw_request(receiver.url, b"POST /suno-cover-callback HTTP/1.0\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.0 431")


def test_task_id_is_accepted_as_kie_ai_sends_it(start, cdn):
    receiver = start(*allow_loopback(), env={"COVER_RECEIVER_HMAC_KEY": "k3y"})
    body = {"code": 200, "msg": "success",
            "data": {"task_id": "snake", "images": [cdn.route("/s.png", ok(PNG))]}}
    assert post(receiver.url, body, signed_headers(b"k3y", "snake"))[:2] == \
        (200, {"status": "received", "taskId": "snake"})
    wait_status(receiver.dir, "snake", "done")


BAD_REQUESTS = [
    ("content-length not ascii digits", b"Content-Length: \xb2\r\n\r\n{}"),
    ("content-length with a control character", b"Content-Length: 2\x1c\r\n\r\n{}"),
    ("two content-length values", b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
    ("transfer-encoding and content-length",
     b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}"),
    ("whitespace before a colon", b"Content-Length : 2\r\n\r\n{}"),
    ("NUL in a header value", b"X-Note: a\x00b\r\nContent-Length: 2\r\n\r\n{}"),
    ("control character in a header value", b"X-Note: a\x07b\r\nContent-Length: 2\r\n\r\n{}"),
    ("json nested 100,000 deep", b"Content-Length: 200000\r\n\r\n" + b"[" * 100000 + b"]" * 100000),
    ("two content-types", b"Content-Type: application/json\r\nContent-Type: text/plain\r\n"
                          b"Content-Length: 2\r\n\r\n{}"),
]


@pytest.mark.parametrize("why, rest", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_400_json_answer_and_touch_nothing(start, why, rest):
    receiver = start()
    answer = raw_request(receiver.url, b"POST /suno-cover-callback HTTP/1.0\r\n" + rest)
    assert answer.startswith(b"HTTP/1.0 400 "), answer[:80]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == "error"
    assert leftovers(receiver.dir) == []


def test_a_timestamp_with_a_control_character_is_refused(start):
    receiver = start(env={"COVER_RECEIVER_HMAC_KEY": "k3y"})
    stamp = str(int(time.time()))
    body = json.dumps(payload("t1")).encode()
    head = ("POST /suno-cover-callback HTTP/1.0\r\nContent-Length: %d\r\nX-Webhook-Timestamp: %s\x1c"
            "\r\nX-Webhook-Signature: %s\r\n\r\n" % (len(body), stamp,
                                                   cr.webhook_signature(b"k3y", "t1", stamp)))
    answer = raw_request(receiver.url, head.encode("latin-1") + body)
    assert re.match(rb"HTTP/1.0 40[01] ", answer) and leftovers(receiver.dir) == []


HEADER_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=255,
                                    blacklist_characters="\r\n"), max_size=16)


JSON_BODIES = st.fixed_dictionaries({
    "code": st.one_of(st.sampled_from([200, 501]), st.integers(), st.text(max_size=3)),
    "msg": st.one_of(st.text(max_size=8), st.none()),
    "data": st.one_of(st.none(), st.fixed_dictionaries({
        "taskId": st.one_of(st.sampled_from(["p1", "../x", "", "a" * 129]), st.text(max_size=9)),
        "images": st.one_of(st.none(), st.lists(st.one_of(
            st.just("http://public.test/a.png"), st.text(max_size=12)), max_size=11))}))
}).map(lambda d: json.dumps(d).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["POST", "GET", "PUT"]),
       path=st.sampled_from(["/suno-cover-callback", "/suno-cover-callback?token=x", "/healthz",
                             "/other"]),
       headers=st.lists(st.tuples(st.one_of(st.sampled_from([
           "Content-Type", "Transfer-Encoding", "Content-Length", "X-Webhook-Timestamp",
           "Expect"]), HEADER_TEXT), HEADER_TEXT), max_size=4),
       body=st.one_of(JSON_BODIES, st.binary(max_size=64)),
       with_length=st.booleans())
def test_property_every_request_gets_an_answer_and_a_4xx_writes_nothing(
        shared_receiver, caplog, method, path, headers, body, with_length):
    receiver = shared_receiver
    # An earlier example's task may still be ending (its folder and task.json
    # come after its 200): wait for every end to be written first.
    scheduler = receiver.pipeline.scheduler
    wait_for(lambda: not any(key[0] == "end" for key in list(scheduler.queued)
                             + list(scheduler.running)), what="earlier tasks' ends")
    before = visible_entries(receiver.config.dir)
    lines = ["%s %s HTTP/1.0" % (method, path)] + ["%s: %s" % pair for pair in headers]
    if with_length:
        lines.append("Content-Length: %d" % len(body))
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    parts = cr.urllib.parse.urlsplit(receiver.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)               # a short body ends here, not at a timeout
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert match, "no HTTP answer: %r" % answer[:60]
    code = int(match.group(1))
    assert 200 <= code < 300 or 400 <= code < 500 or code in (501, 503)
    if 400 <= code < 500:
        assert visible_entries(receiver.config.dir) == before
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]


def test_idle_connections_yield_to_a_new_callback_over_tls(start, certs):
    receiver = start("--max-connections", "4", "--request-timeout", "30",
                     "--tls-cert", certs[0], "--tls-key", certs[1])
    idle = idle_clients(receiver, 16)
    try:
        client = ssl.create_default_context(cafile=certs[0])
        code, answer, _ = post(receiver.url, payload("probe", ["http://127.0.0.1:9/x"]), tls=client)
        assert (code, answer["status"]) == (200, "received")
    finally:
        for sock in idle:
            sock.close()


REQUEST_SHAPES = [
    ("an empty line before the request line (RFC 9112 2.2)",
     b"\r\nGET /nowhere HTTP/1.0\r\n\r\n", b"404"),
    ("two empty lines", b"\r\n\r\n", b"400"),
    ("absolute form urlsplit rejects",
     b"POST http://[x]/suno-cover-callback HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", b"400"),
    ("HTTP/0.9 request line", b"GET /healthz HTTP/0.9\r\n\r\n", b"505"),
    ("HTTP/0.5 request line", b"POST /suno-cover-callback HTTP/0.5\r\n\r\n", b"505"),
    ("HTTP/2.0 request line", b"POST /suno-cover-callback HTTP/2.0\r\n\r\n", b"505"),
    ("four words ending HTTP/0.9 (1.4: a bare body)", b"GET / x HTTP/0.9\r\n\r\n", b"400"),
    ("a request line of control bytes str.split() takes for spaces (1.4: silence)",
     b"\x1c\x1d\x1e\r\n\r\n", b"400"),
    ("a head cut short by the client's half-close", b"POST /suno-cover-callback HTTP/1.0\r\n"
     b"Content-Length: 5\r\n", b"400"),
    ("a request line over the head limit", b"GET /" + b"a" * 70000, b"414"),
    ("a head over the head limit", b"GET / HTTP/1.0\r\n" + b"X: y\r\n" * 20000, b"431"),
]


@pytest.mark.parametrize("why, request_bytes, code", REQUEST_SHAPES,
                         ids=[shape[0] for shape in REQUEST_SHAPES])
def test_every_request_shape_gets_a_status_line_and_a_json_answer(start, why, request_bytes, code):
    receiver = start()
    answer = raw_request(receiver.url, request_bytes)
    assert answer.startswith(b"HTTP/1.0 " + code + b" "), answer[:60]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == "error"


REQUEST_LINE_PARTS = st.lists(st.one_of(
    st.sampled_from([b"GET", b"POST", b"/suno-cover-callback", b"/healthz", b"HTTP/1.0",
                     b"HTTP/1.1", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1", b"HTTP/x.y", b"http/1.0",
                     b"HTTP/1.0.0", b"HTTP/\xd9\xa1.0", b"*", b"http://[x]/", b" ", b"\t",
                     b"\x0b", b"\x1c", b"\x85", b"\xa0", b"\x00", b"\r", b"%"]),
    st.binary(max_size=6)), max_size=6)
HEADER_LINES = st.lists(st.one_of(
    st.sampled_from([b"Content-Length: 2", b"Content-Length: 99999999999999999999",
                     b"Content-Length: -1", b"Content-Length: 2, 2", b"Transfer-Encoding: chunked",
                     b"Content-Type: application/json", b" folded", b"\tfolded", b"No-Colon",
                     b"Space : before", b": empty name", b"X: \x00", b"X-Forwarded-For: 1.2.3.4",
                     b"Expect: 100-continue", b"Host: a", b"Host: b"]),
    st.binary(max_size=12)), max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=REQUEST_LINE_PARTS, separator=st.sampled_from([b" ", b"  ", b"\t", b""]),
       headers=HEADER_LINES, newline=st.sampled_from([b"\r\n", b"\n", b"\r"]),
       body=st.binary(max_size=8))
def test_property_every_malformed_request_gets_a_status_line_or_an_orderly_close(
        shared_receiver, line, separator, headers, newline, body):
    """A generated corpus of request lines and header blocks: the answer is
    always a status line and a JSON reason, never a bare body or silence."""
    request = newline.join([separator.join(line)] + headers) + newline + newline + body
    answer = raw_request(shared_receiver.url, request)
    if not request.strip(b"\r\n"):
        return                          # no request line at all: a close is the answer
    match = re.match(rb"HTTP/1\.0 (\d{3}) [^\r\n]*\r\n", answer)
    assert match, "no status line for %r: %r" % (request[:80], answer[:80])
    code = int(match.group(1))
    head, _, reply = answer.partition(b"\r\n\r\n")
    if code >= 400:
        assert json.loads(reply)["status"] == "error"
    if code == 505:
        assert re.search(rb"HTTP/(0\.|[2-9])", request)


def test_at_the_cap_the_oldest_unfinished_request_makes_room(start):
    receiver = start("--max-connections", "4", "--request-timeout", "30")
    idle = idle_clients(receiver, 4)
    held(receiver, 4)
    more = idle_clients(receiver, 12)                   # a flood that keeps reconnecting
    try:
        code, answer, _ = post(receiver.url, payload("probe", ["http://127.0.0.1:9/x"]))
        assert (code, answer["status"]) == (200, "received")
        cut = idle[0].recv(4096)                        # the oldest idle one made room
        assert cut.startswith(b"HTTP/1.0 503 ") and b"Retry-After: 1" in cut
        assert metrics_of(receiver)["cover_receiver_connections_cut_total"] >= 13
    finally:
        for sock in idle + more:
            sock.close()


def test_handshakes_begun_and_never_finished_yield_to_a_tls_client(start, certs):
    receiver = start("--max-connections", "2", "--request-timeout", "30",
                     "--tls-cert", certs[0], "--tls-key", certs[1])
    busy = idle_clients(receiver, 2)
    for sock in busy:
        sock.sendall(b"\x16\x03\x01")                   # a handshake begun, never finished
    held(receiver, 2)
    try:
        client = ssl.create_default_context(cafile=certs[0])
        code, answer, _ = post(receiver.url, payload("x", ["http://127.0.0.1:9/x"]), tls=client)
        assert (code, answer["status"]) == (200, "received")
        assert busy[0].recv(4096) == b""                # closed: no answer without TLS
    finally:
        for sock in busy:
            sock.close()


@pytest.mark.skipif(not cr.LINUX, reason="a second loopback source address (127.0.0.2) is Linux's")
def test_the_client_holding_the_most_connections_gives_way_first(start):
    receiver = start("--max-connections", "4", "--request-timeout", "30")
    other = socket.create_connection(("127.0.0.1", receiver.listen_address[1]), timeout=WAIT,
                                     source_address=("127.0.0.2", 0))
    flood = idle_clients(receiver, 3)
    for sock in flood:
        sock.sendall(b"P")                              # each begins a request, then stalls
    held(receiver, 4)
    wait_for(lambda: sum(bool(conn.data) for conn in list(receiver.front.conns)) == 3,
             what="the loop to read each flooder's first byte")
    try:
        newcomer = idle_clients(receiver, 1)            # the flooder's own newcomer ...
        assert flood[0].recv(4096) == b""               # ... costs the flooder its oldest
        body = json.dumps(payload("other", ["http://127.0.0.1:9/x"])).encode()
        other.sendall(b"POST /suno-cover-callback HTTP/1.0\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b"".join(iter(lambda: other.recv(65536), b""))
        assert answer.startswith(b"HTTP/1.0 200 ") and b'"received"' in answer
    finally:
        for sock in flood + newcomer + [other]:
            sock.close()


def test_past_request_timeout_a_plain_request_gets_408_and_a_handshake_a_close(start, certs,
                                                                              tmp_path):
    plain = start("--request-timeout", "0.3")
    silent, half = idle_clients(plain, 2)
    half.sendall(b"POST /suno-cover-callback HTTP/1.0\r\nContent-Len")
    for sock in (silent, half):
        assert sock.recv(4096).startswith(b"HTTP/1.0 408 ")
        sock.close()
    tls = start("--dir", str(tmp_path / "tls"), "--request-timeout", "0.3",
                "--tls-cert", certs[0], "--tls-key", certs[1])
    with idle_clients(tls, 1)[0] as handshake:
        handshake.sendall(b"\x16\x03\x01")
        assert handshake.recv(4096) == b""


def test_request_bodies_buffered_at_once_have_a_cap_and_the_rest_get_503(start):
    receiver = start("--request-timeout", "30")
    length = receiver.config.max_body_bytes
    declared = idle_clients(receiver, cr.BUFFERED_BODIES // length)
    for sock in declared:                               # bodies declared, never sent
        sock.sendall(b"POST /suno-cover-callback HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % length)
    held(receiver, len(declared))
    try:
        code, answer, response = post(receiver.url, {"x": "y" * 100})
        assert code == 503 and response.getheader("Retry-After") == "1"
        assert "buffered" in answer["error"]
        declared.pop().close()                          # one gives its share back
        wait_for(lambda: post(receiver.url, payload("fits", ["http://127.0.0.1:9/x"]))[0] == 200,
                 what="a body accepted again")
    finally:
        for sock in declared:
            sock.close()


def test_starting_raises_the_soft_descriptor_limit_to_the_hard_one(start):
    if WINDOWS:
        pytest.skip("Windows has no descriptor limit to raise (select() holds 512 sockets)")
    import resource
    receiver = start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY
    assert receiver.front.capacity == min(1000, soft - cr.DESCRIPTOR_RESERVE)


def flood(url, count, tls):
    """count connections that never complete a request, in a mix: silent,
    half-sent, and (over TLS) a ClientHello begun or a handshake done."""
    parts = cr.urllib.parse.urlsplit(url)
    socks, kinds = [], ("silent", "half", "hello") if tls else ("silent", "half")
    for n in range(count):
        sock = socket.create_connection((parts.hostname, parts.port), timeout=WAIT)
        kind = kinds[n % len(kinds)]
        if kind == "half":
            sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
            sock.sendall(b"POST /suno-cover-callback HTTP/1.0\r\nContent-Length: 9\r\n\r\n{")
        elif kind == "hello":
            sock.sendall(b"\x16\x03\x01\x02")
        socks.append(sock)
    return socks


@pytest.mark.skipif(WINDOWS, reason="Windows' select() holds at most 512 sockets")
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_flood_of_1000_unfinished_connections_denies_no_callback(start, certs, scheme):
    tls = ssl.create_default_context(cafile=certs[0]) if scheme == "https" else None
    receiver = start("--request-timeout", "60", *(("--tls-cert", certs[0], "--tls-key", certs[1])
                                                  if tls else ()))
    held_open = flood(receiver.url, 1000, tls)
    try:
        held(receiver, 1000)
        for n in range(10):
            code, answer, _ = post(receiver.url, payload("f%d" % n, ["http://127.0.0.1:9/x"]),
                                   tls=tls)
            assert (code, answer["status"]) == (200, "received")
        assert receiver.metrics.get("connections_cut_total") >= 1     # one made room
    finally:
        for sock in held_open:
            sock.close()


@pytest.mark.skipif(not cr.LINUX, reason="a second loopback source address (127.0.0.2) is Linux's")
def test_a_tls_handshake_flood_at_the_cap_beside_an_https_client_crashes_nothing(tmp_path, certs):
    """1.4 died (SIGSEGV, double free) when 12 to 70 clients dripped a
    ClientHello at a full cap beside an HTTPS client: two threads used one
    TLS object. Here 70 drippers reconnect for 300 callbacks."""
    proc = ReceiverProcess(serve_args(tmp_path / "c", "--max-connections", "8",
                                      "--request-timeout", "2", "--tls-cert", certs[0],
                                      "--tls-key", certs[1]))
    port = int(proc.wait_log(r"port=(\d+)").group(1))
    stop, hello = threading.Event(), b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + os.urandom(32)

    def drip():
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=WAIT) as sock:
                for byte in hello:
                    sock.sendall(bytes([byte]))
                    if select.select([sock], [], [], 0.01)[0] or stop.is_set():
                        break           # cut to make room, or timed out
    drippers = [threading.Thread(target=drip, daemon=True) for _ in range(70)]
    for thread in drippers:
        thread.start()
    client = ssl.create_default_context(cafile=certs[0])
    try:
        for n in range(300):
            body = json.dumps(payload("h%d" % n, ["http://127.0.0.1:9/x"])).encode()
            with client.wrap_socket(socket.create_connection(
                    ("127.0.0.1", port), timeout=WAIT, source_address=("127.0.0.2", 0)),
                    server_hostname="localhost") as sock:
                sock.sendall(b"POST /suno-cover-callback HTTP/1.0\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                answer = b"".join(iter(lambda: sock.recv(65536), b""))
            assert answer.startswith(b"HTTP/1.0 200 "), answer[:80]
        assert proc.proc.poll() is None
    finally:
        stop.set()
        for thread in drippers:
            thread.join(WAIT)
        assert proc.stop() == 0
    assert "Traceback" not in proc.text()


TRUSTED = (cr.ipaddress.ip_network("127.0.0.0/8"), cr.ipaddress.ip_network("10.0.0.0/8"))
FORWARDED_CASES = [
    ("the rightmost entry the trusted proxy added", [("X-Forwarded-For", "6.6.6.6, 203.0.113.9")],
     "203.0.113.9"),
    ("trusted hops on the right are skipped", [("X-Forwarded-For", "203.0.113.9, 10.1.1.1"),
                                               ("X-Forwarded-For", "127.0.0.1")], "203.0.113.9"),
    ("RFC 7239 Forwarded, quoted IPv6 with a port",
     [("Forwarded", 'for=6.6.6.6, for="[2001:db8::17]:4711";proto=https')], "2001:db8::17"),
    ("X-Forwarded-For before Forwarded", [("Forwarded", "for=6.6.6.6"),
                                          ("X-Forwarded-For", "198.51.100.2")], "198.51.100.2"),
    ("an address with a port", [("X-Forwarded-For", "198.51.100.2:5000")], "198.51.100.2"),
    ("every hop trusted: the peer", [("X-Forwarded-For", "10.0.0.1, 127.0.0.1")], None),
    ("no header: the peer", [], None),
]


@pytest.mark.parametrize("why, headers, client", FORWARDED_CASES,
                         ids=[case[0] for case in FORWARDED_CASES])
def test_a_trusted_proxy_names_the_client_by_the_rightmost_untrusted_hop(why, headers, client):
    message = http.client.parse_headers(cr.io.BytesIO(
        "".join("%s: %s\r\n" % pair for pair in headers).encode() + b"\r\n"))
    assert cr.forwarded_client(message, TRUSTED) == client


@pytest.mark.parametrize("trusted, client", [((), "127.0.0.1"),
                                              (("--trusted-proxy", "127.0.0.0/8"), "203.0.113.9")])
def test_the_client_logged_is_the_proxys_word_only_for_a_trusted_proxy(start, caplog, trusted,
                                                                        client):
    receiver = start(*trusted, env={"COVER_RECEIVER_TOKEN": "s3cret"})
    code, _, _ = post(receiver.url, payload(), headers={
        "X-Forwarded-For": "6.6.6.6, 203.0.113.9"})
    assert code == 401
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected"))
    assert "client=%s " % client in line


def test_trusted_proxy_takes_cidrs_and_the_env_form_is_comma_separated(tmp_path):
    config = cr.build_config(["--dir", str(tmp_path)], {
        "COVER_RECEIVER_TRUSTED_PROXY": "10.0.0.0/8, ::1"})
    assert [str(n) for n in config.trusted_proxy] == ["10.0.0.0/8", "::1/128"]
    with pytest.raises(cr.UsageError, match="--trusted-proxy: nginx is not an address"):
        cr.build_config(["--trusted-proxy", "nginx"], {})


def served_certificate(receiver):
    parts = cr.urllib.parse.urlsplit(receiver.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT) as raw:
        unchecked = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unchecked.check_hostname, unchecked.verify_mode = False, ssl.CERT_NONE
        with unchecked.wrap_socket(raw) as sock:
            return sock.getpeercert(binary_form=True)


def test_reload_serves_a_renewed_certificate_and_keeps_it_when_a_pair_does_not_load(
        start, certs, tmp_path, caplog):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a second certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    shutil.copy(certs[0], cert)
    shutil.copy(certs[1], key)
    receiver = start("--tls-cert", cert, "--tls-key", key)
    first = served_certificate(receiver)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=renewed"], check=True, capture_output=True)
    renewed = ssl.PEM_cert_to_DER_cert(read(cert).decode())
    receiver.wake()                                     # what SIGHUP does
    assert served_certificate(receiver) == renewed != first
    with open(key, "w") as broken:
        broken.write("not a key")
    receiver.wake()
    assert served_certificate(receiver) == renewed      # the bad pair is kept out
    line = next(r for r in caplog.records if r.getMessage().startswith("tls-reload-failed"))
    assert line.levelname == "ERROR" and "kept" in line.getMessage()


def test_a_post_to_another_path_is_a_warning_naming_the_callback_path(start, caplog):
    receiver = start()
    code, answer, _ = post(receiver.url.replace("/suno-cover-callback", "/callback"), payload())
    assert code == 404 and "suno-cover-callback" not in json.dumps(answer)
    line = next(r for r in caplog.records if r.getMessage().startswith("rejected status=404"))
    assert line.levelname == "WARNING"
    assert "POST to /callback, but the callback path is /suno-cover-callback" in line.getMessage()


# ---------------------------------------------------------------------------
# Store: durable before the 200, exactly once, nothing on disk trusted
# ---------------------------------------------------------------------------

@pytest.fixture
def commit_faults(monkeypatch):
    """The seam for a slow or failing commit: faults is a list of actions for
    the next commits ("fail", or an Event to wait on first); events records
    each commit that returned (with the taskIds its changes named), and
    whatever a test appends (answers), in order."""
    faults, events, real = [], [], cr.Store._commit

    def commit(store, batch):
        action = faults.pop(0) if faults else None
        if action == "fail":
            events.append(("commit failed",))
            for entry in batch:
                entry["error"] = sqlite3.OperationalError("disk I/O error (injected)")
            return
        if action is not None:
            events.append(("commit slow",))
            action.wait(WAIT)
        real(store, batch)
        events.append(("commit", len(batch)))
    monkeypatch.setattr(cr.Store, "_commit", commit)
    return faults, events


def answered_after_a_commit(events, answer):
    return any(event[0] == "commit" for event in events[:events.index(answer)])


def pending_on_disk(folder, task_id, url, **fields):
    """A task as 1.4 left it: <dir>/<taskId>/task.json, marked in .index."""
    stored = cr.new_record(cr.Callback(task_id, 200, "success", (url,)))
    stored.update(fields)
    (folder / task_id).mkdir(parents=True)
    (folder / task_id / "task.json").write_text(json.dumps(stored))
    (folder / ".index").mkdir(exist_ok=True)
    (folder / ".index" / ".migrated").touch()
    (folder / ".index" / ("pending.%s" % task_id)).touch()
    return stored


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs root to mount; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if getattr(os, "geteuid", lambda: 1)() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder):
    """Write until the disk is full; returns the filler to delete."""
    path = os.path.join(str(folder), "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    return path


def test_the_database_is_one_sqlite_file_in_wal_mode_with_full_sync_and_a_schema_version(start):
    receiver = start()
    post(receiver.url, payload("row", code=501, images=None))
    with contextlib.closing(sqlite3.connect(os.path.join(receiver.dir, cr.DB_NAME))) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == cr.SCHEMA_VERSION
        assert [row[0] for row in db.execute("SELECT task_id FROM task")] == ["row"]
    assert receiver.store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL
    wait_for(lambda: manifest(receiver.dir, "row"), what="row's task.json")   # a worker writes it
    assert sorted(os.listdir(receiver.dir)) == sorted(STORE_FILES | {"row"})


def test_503_when_the_commit_fails_and_the_senders_retry_lands(start, cdn, commit_faults):
    faults, _ = commit_faults
    receiver = start(*allow_loopback())
    body = payload("eio", [cdn.route("/e.png", ok(PNG))])
    faults.append("fail")
    code, answer, _ = post(receiver.url, body)
    assert code == 503 and "durabl" in answer["error"] and record(receiver.dir, "eio") is None
    assert post(receiver.url, body)[1]["status"] == "received"
    assert wait_status(receiver.dir, "eio", "done")


def test_a_racing_delivery_answers_only_after_the_commit_that_holds_its_task(start,
                                                                             commit_faults):
    faults, events = commit_faults
    receiver, slow = start(), threading.Event()
    faults.append(slow)                               # the first delivery's commit hangs

    def send(n):
        events.append(("answer", n, post(receiver.url, payload("race"))[1]["status"]))
    first = threading.Thread(target=send, args=(1,))
    first.start()
    wait_for(lambda: ("commit slow",) in events, what="the first commit to start")
    second = threading.Thread(target=send, args=(2,))
    second.start()
    second.join(0.3)
    assert second.is_alive()                          # it waits for the commit in flight
    slow.set()
    first.join(WAIT)
    second.join(WAIT)
    answers = sorted(event for event in events if event[0] == "answer")
    assert [a[2] for a in answers] == ["received", "duplicate"] or \
        [a[2] for a in answers] == ["duplicate", "received"]
    assert all(answered_after_a_commit(events, answer) for answer in answers)


def test_concurrent_callbacks_share_commits(start, commit_faults):
    faults, events = commit_faults
    receiver, gate = start(), threading.Event()
    receiver.pipeline.schedule = lambda *_, **__: None    # no downloads: only the callbacks commit
    del events[:]
    faults.append(gate)                               # the first commit takes a while ...
    answers = []
    threads = [threading.Thread(target=lambda n=n: answers.append(
        post(receiver.url, payload("g%d" % n))[0])) for n in range(12)]
    for thread in threads:
        thread.start()
    wait_for(lambda: ("commit slow",) in events, what="the first commit to start")
    wait_for(lambda: len(receiver.store._queue) == 11, what="the others to queue")
    gate.set()                                        # ... so the other 11 share the next
    for thread in threads:
        thread.join(WAIT)
    assert answers == [200] * 12
    assert [e for e in events if e[0] == "commit"] == [("commit", 1), ("commit", 11)]


@pytest.mark.skipif(WINDOWS, reason="Windows cannot remove a database that is open")
def test_a_database_removed_under_serve_gives_503_never_a_200_into_a_lost_file(start):
    receiver = start()
    shutil.rmtree(receiver.dir)
    code, answer, _ = post(receiver.url, payload())
    assert code == 503 and "durabl" in answer["error"]
    assert get(receiver.url.replace("/suno-cover-callback", "/healthz"))[0] == 503


def test_kill_9_after_200_loses_nothing_and_restart_finishes(tmp_path, cdn):
    folder = str(tmp_path / "covers")
    args = ["--port", "0", "--host", "127.0.0.1", "--dir", folder, "--allow-host", "127.0.0.1"]
    first = ReceiverProcess(args)
    url = cdn.route("/k.png", stall(PNG, cut=1000), ok(PNG))
    code, answer, _ = post(first.url, payload("k9", [url]))
    assert (code, answer["status"]) == (200, "received")
    cdn.wait_hits("/k.png", 1)                     # the download is mid-body now
    first.proc.kill()
    first.proc.wait(WAIT)
    pending = record(folder, "k9")
    assert pending["status"] == "pending" and pending["images"] == [url]
    assert not os.path.exists(os.path.join(folder, "k9", "cover_1.png"))
    second = ReceiverProcess(args)
    try:
        second.wait_log(r"resume task=k9")
        wait_status(folder, "k9", "done")
        assert read(os.path.join(folder, "k9", "cover_1.png")) == PNG
        settled(os.path.join(folder, "k9"), ["cover_1.png", "task.json"])
    finally:
        assert second.stop() == 0


def test_a_kill_9_between_two_covers_keeps_the_saved_one(tmp_path, cdn):
    folder = str(tmp_path / "covers")
    args = ["--port", "0", "--host", "127.0.0.1", "--dir", folder, "--allow-host", "127.0.0.1",
            "--workers", "1"]
    first = ReceiverProcess(args)
    urls = [cdn.route("/first.png", ok(PNG)), cdn.route("/second.png", stall(GIF), ok(GIF))]
    assert post(first.url, payload("half", urls))[1]["status"] == "received"
    cdn.wait_hits("/second.png", 1)                # cover 1 is saved, cover 2 mid-body
    first.proc.kill()
    first.proc.wait(WAIT)
    assert record(folder, "half")["files"] == ["cover_1.png", None]
    second = ReceiverProcess(args)
    try:
        assert wait_status(folder, "half", "done")["files"] == ["cover_1.png", "cover_2.gif"]
    finally:
        assert second.stop() == 0
    assert cdn.hits == {"/first.png": 1, "/second.png": 2}
    assert read(os.path.join(folder, "half", "cover_1.png")) == PNG


def test_20_concurrent_duplicates_give_one_received_and_one_download_per_image(start, cdn):
    receiver = start(*allow_loopback())
    body = payload("dup", [cdn.route("/1.png", ok(PNG)), cdn.route("/2.png", ok(GIF))])
    answers, barrier = [], threading.Barrier(20)

    def send():
        barrier.wait()
        answers.append(post(receiver.url, body)[1]["status"])
    threads = [threading.Thread(target=send) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert sorted(answers) == ["duplicate"] * 19 + ["received"]
    wait_status(receiver.dir, "dup", "done")
    assert cdn.hits == {"/1.png": 1, "/2.png": 1}


def test_done_task_is_final(start, cdn):
    receiver = start(*allow_loopback())
    post(receiver.url, payload("fin", [cdn.route("/f.png", ok(PNG))]))
    wait_status(receiver.dir, "fin", "done")
    for body in (payload("fin", [cdn.route("/other.png", ok(GIF))]),
                 payload("fin", code=501, images=None)):
        assert post(receiver.url, body)[1]["status"] == "duplicate"
    assert record(receiver.dir, "fin")["status"] == "done"
    assert cdn.hits == {"/f.png": 1}


def test_repeated_success_callback_retries_only_the_missing_images(start, cdn):
    receiver = start(*allow_loopback())
    good, bad = cdn.route("/good.png", ok(PNG)), cdn.route("/bad.png", status(404), ok(JPEG))
    post(receiver.url, payload("retry", [good, bad]))
    failed = wait_status(receiver.dir, "retry", "failed")
    assert failed["files"] == ["cover_1.png", None] and "HTTP 404" in failed["error"]
    assert post(receiver.url, payload("retry", [good, bad]))[1]["status"] == "received"
    done = wait_status(receiver.dir, "retry", "done")
    assert done["files"] == ["cover_1.png", "cover_2.jpg"] and done["error"] is None
    assert cdn.hits == {"/good.png": 1, "/bad.png": 2}


def test_covers_saved_while_another_image_fails_all_end_their_tasks(start, cdn):
    receiver = start(*allow_loopback(), "--workers", "4")
    for n in range(30):                 # the save and the failure race, 30 times
        post(receiver.url, payload("race%d" % n, [cdn.route("/fine%d.png" % n, ok(PNG)),
                                                  cdn.route("/gone%d.png" % n, status(404))]))
    for n in range(30):
        failed = wait_status(receiver.dir, "race%d" % n, "failed")
        assert failed["files"] == ["cover_1.png", None] and "HTTP 404" in failed["error"]


def test_failure_callback_is_recorded_failed_without_download(start, cdn):
    receiver = start(*allow_loopback())
    code, answer, _ = post(receiver.url, payload("gen-failed", code=531, images=None,
                                                 msg="credits refunded"))
    assert (code, answer["status"]) == (200, "received")
    failed = record(receiver.dir, "gen-failed")
    assert (failed["status"], failed["code"], failed["msg"]) == ("failed", 531, "credits refunded")
    assert failed["images"] == [] and "531" in failed["error"]
    settled(receiver.dir, ["gen-failed", "gen-failed/task.json"])
    assert manifest(receiver.dir, "gen-failed")["status"] == "failed" and cdn.hits == {}


def test_success_after_failure_callback_downloads(start, cdn):
    receiver = start(*allow_loopback())
    post(receiver.url, payload("late", code=500, images=None))
    assert post(receiver.url, payload("late", [cdn.route("/l.png", ok(PNG))]))[1]["status"] \
        == "received"
    assert wait_status(receiver.dir, "late", "done")["code"] == 200


def test_a_task_that_ends_again_while_its_first_end_runs_gets_a_second_end(start, cdn, tmp_path):
    # The failed task's hook is still running when a success callback
    # reopens the task and its image is saved: the done task still gets its
    # own task.json and hook run, and the first run's outcome does not
    # stand for the second.
    release = tmp_path / "release"
    script, runs = counting_hook(tmp_path, (
        "deadline = time.monotonic() + 30\n"
        "while env['COVER_TASK_STATUS'] == 'failed' and not os.path.exists(%r) \\\n"
        "        and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n" % str(release)))
    receiver = start(*allow_loopback(), "--on-complete", script)
    post(receiver.url, payload("twice", code=500, images=None))
    wait_for(lambda: runs_of(runs, "twice") == [["1", "failed"]], what="the first hook run")
    post(receiver.url, payload("twice", [cdn.route("/t.png", ok(PNG))]))
    wait_status(receiver.dir, "twice", "done", written=False)
    release.touch()
    wait_for(lambda: runs_of(runs, "twice") == [["1", "failed"], ["1", "done"]],
             what="the done task's hook run")
    assert hook_of(receiver.dir, "twice", "done")["tries"] == 1
    assert wait_status(receiver.dir, "twice", "done")["files"] == ["cover_1.png"]


def open_flags(folder, task_id):
    with contextlib.closing(sqlite3.connect(os.path.join(folder, cr.DB_NAME))) as db:
        return db.execute("SELECT open, manifest FROM task WHERE task_id = ?",
                          (task_id,)).fetchone()


def test_a_task_that_ends_gets_its_manifest_the_record_status_json_prints(start, cdn, capfd,
                                                                          caplog):
    receiver = start(*allow_loopback())
    post(receiver.url, payload("man", [cdn.route("/m.png", ok(PNG))]))
    wait_for(lambda: manifest(receiver.dir, "man"), what="task.json")
    wait_for(lambda: open_flags(receiver.dir, "man") == (0, 0), what="the task closed")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert cr.main(["status", "--dir", receiver.dir, "man"], env={}) == 0
    printed = json.loads(capfd.readouterr().out)
    assert manifest(receiver.dir, "man") == printed
    assert set(printed) >= {"taskId", "status", "code", "msg", "images", "files", "errors",
                            "tries", "lastError", "nextTryAt", "error", "receivedAt",
                            "updatedAt", "hook", "source", "expectedAt", "parentTaskId"}


def test_a_1_4_folder_is_imported_once_and_its_work_goes_on(start, cdn, tmp_path, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    folder = tmp_path / "covers"
    pending_on_disk(folder, "old", cdn.route("/old.png", ok(PNG)), tries=[3],
                    lastError=["HTTP 503"])
    (folder / "old" / ".cover_1.part").write_bytes(b"half")         # what a kill left
    (folder / "old" / ".task.json.4242.7").write_text("{")
    pending_on_disk(folder, "gone", "http://127.0.0.1:9/x.png", status="failed",
                    errors=["cover_1: HTTP 404"], error="cover_1: HTTP 404")
    for name in (".locks/images-3", ".locks/.serve", ".tmp/probe.1.2", ".requests/images.gone"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).touch()
    receiver = start(*allow_loopback())
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("imported")] \
        == ['imported tasks=2 corrupt=0 note="1.x task.json records"']
    done = wait_status(receiver.dir, "old", "done")
    assert done["files"] == ["cover_1.png"] and done["tries"] == [3]
    assert record(receiver.dir, "gone")["status"] == "failed"
    settled(folder, ["gone", "gone/task.json", "old", "old/cover_1.png", "old/task.json"])
    receiver.stop()
    caplog.clear()
    start(*allow_loopback())                         # the second start imports nothing
    assert not [r for r in caplog.records if r.getMessage().startswith("imported")]


def test_an_import_cut_short_imports_it_all_at_the_next_start(tmp_path, monkeypatch):
    folder = tmp_path / "covers"
    for task_id in ("a", "b", "c"):
        pending_on_disk(folder, task_id, "http://127.0.0.1:9/%s.png" % task_id)
    config = cr.build_config(["--dir", str(folder)], {})
    real, seen = cr.read_record, []

    def kill_midway(path, task_id):
        seen.append(task_id)
        if len(seen) == 2:
            raise KeyboardInterrupt             # a kill after two records were read
        return real(path, task_id)
    monkeypatch.setattr(cr, "read_record", kill_midway)
    with pytest.raises(KeyboardInterrupt):
        cr.open_store(config)
    assert record(folder, "a") is None            # one transaction: nothing was kept
    monkeypatch.setattr(cr, "read_record", real)
    os.unlink(folder / cr.DB_NAME)                # the killed start left an empty database
    store = cr.open_store(config)
    assert sorted(r["taskId"] for r in store.all_records()) == ["a", "b", "c"]
    assert not (folder / ".index").exists()


def test_a_cover_renamed_just_before_a_crash_is_adopted_not_downloaded_again(start, cdn, tmp_path):
    folder = tmp_path / "covers"
    pending_on_disk(folder, "crash", cdn.route("/c.png", ok(PNG)))
    (folder / "crash" / "cover_1.png").write_bytes(PNG)       # final name: it was complete
    receiver = start(*allow_loopback())
    assert wait_status(receiver.dir, "crash", "done")["files"] == ["cover_1.png"]
    assert cdn.hits == {}


def test_a_cover_is_fsynced_renamed_and_its_folder_fsynced_before_it_is_recorded(
        start, cdn, monkeypatch, commit_faults):
    _, events = commit_faults
    real = cr.Platform.fsync_dir
    monkeypatch.setattr(cr.Platform, "fsync_dir", staticmethod(
        lambda path: (real(path), events.append(("fsync", os.path.basename(path))))))
    receiver = start(*allow_loopback())
    post(receiver.url, payload("order", [cdn.route("/o.png", ok(PNG))]))
    wait_status(receiver.dir, "order", "done")
    fsynced = events.index(("fsync", "order"))
    assert any(event[0] == "commit" for event in events[fsynced:])


def test_an_error_while_recording_a_saved_cover_is_retried_not_stranded(start, cdn,
                                                                        commit_faults):
    faults, events = commit_faults
    receiver = start(*allow_loopback())
    gate = threading.Event()
    post(receiver.url, payload("eio3", [cdn.route("/e3.png", stall(PNG), ok(PNG))]))
    cdn.wait_hits("/e3.png", 1)
    faults.append("fail")              # the commit that records the saved cover fails
    cdn.release.set()
    assert wait_status(receiver.dir, "eio3", "done")["files"] == ["cover_1.png"]
    assert ("commit failed",) in events and not gate.is_set()
    assert cdn.hits == {"/e3.png": 1}  # the saved cover was adopted, not fetched again
    assert read(os.path.join(receiver.dir, "eio3", "cover_1.png")) == PNG


def test_a_full_disk_gives_503_to_callbacks_and_healthz_and_leaves_nothing(small_disk, start):
    receiver = start("--dir", str(small_disk / "covers"))
    healthz_url = receiver.url.replace("/suno-cover-callback", "/healthz")
    filler = fill(small_disk)
    fill(small_disk / "covers")         # what the database's -wal had still free, too
    code, answer, _ = post(receiver.url, payload("full"))
    assert code == 503 and "durabl" in answer["error"]
    assert get(healthz_url)[0] == 503
    assert record(receiver.dir, "full") is None
    os.unlink(filler)
    os.unlink(small_disk / "covers" / "filler")
    assert post(receiver.url, payload("full"))[0] == 200 and get(healthz_url)[0] == 200


def test_a_full_disk_while_saving_is_retried_until_it_lands(small_disk, start, cdn):
    receiver = start(*allow_loopback(), "--dir", str(small_disk / "covers"))
    post(receiver.url, payload("nospace", [cdn.route("/n.png", stall(PNG, cut=16), ok(PNG))]))
    cdn.wait_hits("/n.png", 1)
    filler = fill(small_disk)
    cdn.release.set()
    cdn.wait_hits("/n.png", 3)                   # tried again while the disk is full
    os.unlink(filler)
    wait_status(receiver.dir, "nospace", "done")
    assert read(os.path.join(receiver.dir, "nospace", "cover_1.png")) == PNG


@pytest.mark.parametrize("change, problem", [
    ({}, None),
    ({"code": True}, "has no int code"),
    ({"receivedAt": None}, "has no str receivedAt"),
    ({"taskId": "other"}, "names another task (other)"),
    ({"status": "lost"}, "has an unknown status lost"),
    ({"error": 5}, "has an error that is not text"),
    ({"hook": {"status": "pending"}}, "has a malformed hook"),
    ({"images": ["u", 1], "files": [None, None]}, "has a wrong images or files list"),
    ({"files": ["cover_1.exe"]}, "names a file that is not a cover"),
    ({"files": [["cover_1.png"]]}, "names a file that is not a cover"),
    ({"tries": [True]}, "has a wrong tries list"),
    ({"lastError": [3]}, "has a wrong lastError list"),
    ({"nextTryAt": None}, None),                # 1.0 wrote no retry fields: upgraded
], ids=repr)
def test_a_1x_record_is_checked_field_by_field_and_named_in_the_reason(change, problem):
    stored = json.loads(valid_record_bytes("t1"))
    stored.update(change)
    assert cr.record_problem(stored, "t1") == problem
    if problem is None:
        assert stored["nextTryAt"] == [None]


@pytest.mark.parametrize("shape", CORRUPT_SHAPES)
def test_a_corrupt_1x_record_is_kept_aside_reported_and_never_stops_serving(
        start, cdn, tmp_path, caplog, shape):
    plant_corrupt(tmp_path / "covers", "bad", shape)
    receiver = start(*allow_loopback())
    assert healthz(receiver)["corrupt"] == 1
    assert metrics_of(receiver)["cover_receiver_tasks_corrupt"] == 1
    assert [r for r in caplog.records if r.levelname == "ERROR"
            and r.getMessage().startswith("record-corrupt task=bad")]
    assert [n for n in os.listdir(os.path.join(receiver.dir, "bad"))
            if n.startswith("task.json.corrupt-")]
    post(receiver.url, payload("good", [cdn.route("/g.png", ok(PNG))]))
    assert wait_status(receiver.dir, "good", "done")
    code, lines, _ = status_lines(receiver.dir)
    row = next(line for line in lines if line.startswith("bad "))
    assert code == 0 and " corrupt " in row and "task.json" in row


@pytest.mark.parametrize("shape", ["truncated", "a fifo"])
def test_a_new_delivery_repairs_a_corrupt_task(start, cdn, tmp_path, shape):
    plant_corrupt(tmp_path / "covers", "bad", shape)
    receiver = start(*allow_loopback())
    code, answer, _ = post(receiver.url, payload("bad", [cdn.route("/b.png", ok(PNG))]))
    assert (code, answer["status"]) == (200, "received")
    assert wait_status(receiver.dir, "bad", "done")["files"] == ["cover_1.png"]
    assert read(os.path.join(receiver.dir, "bad", "cover_1.png")) == PNG
    assert healthz(receiver)["corrupt"] == 0


def test_the_issue_reproduction_starts_listens_and_logs_an_error(tmp_path):
    folder = tmp_path / "d"
    plant_corrupt(folder, "X", "empty object")
    proc = ReceiverProcess(["--port", "0", "--host", "127.0.0.1", "--dir", str(folder)])
    try:
        proc.wait_log('ERROR record-corrupt task=X reason="task.json has no str taskId"')
        proc.wait_log("listening")
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in proc.text()


def damage(path):
    """Scribble over a database's pages past the first (its header stays)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.seek(4096)
        handle.write(os.urandom(size - 4096))


@pytest.mark.parametrize("how", ["pages", "not a database"])
def test_a_damaged_database_is_set_aside_and_never_a_crash_loop(tmp_path, cdn, how):
    folder = tmp_path / "covers"
    first = ReceiverProcess(serve_args(folder))
    for n in range(40):
        post(first.url, payload("old%d" % n, code=501, images=None))
    assert first.stop() == 0
    db = folder / cr.DB_NAME
    if how == "pages":
        damage(str(db))
    else:
        db.write_bytes(b"this is not a database" * 500)
    for _ in range(2):                                  # and again: no crash loop
        proc = ReceiverProcess(serve_args(folder, "--allow-host", "127.0.0.1"))
        proc.wait_log(r"ERROR database-damaged")
        url = proc.url
        health = json.loads(get(url.replace("/suno-cover-callback", "/healthz"))[1])
        assert "kept as cover_receiver.db.damaged-" in health["database"]
        post(url, payload("new", [cdn.route("/n.png", ok(PNG))]))
        wait_status(folder, "new", "done")
        assert proc.stop() == 0
        assert "Traceback" not in proc.text()
    kept = [n for n in os.listdir(folder) if n.startswith(cr.DB_NAME + ".damaged-")]
    assert kept and len([n for n in kept if not n.endswith(("-wal", "-shm"))]) == 1
    code, lines, _ = status_lines(folder, "--all")
    assert code == 0 and any("damaged" in line for line in lines)


def test_a_second_serve_on_the_same_dir_exits_2_naming_the_first(tmp_path):
    first = ReceiverProcess(serve_args(tmp_path / "c"))
    try:
        first.wait_log("listening")
        second = ReceiverProcess(serve_args(tmp_path / "c"))
        status, lines = second.exit()
        assert status == 2 and lines == [
            "cover_receiver: error: another serve (pid %d) runs on --dir %s; stop it, or give this "
            "one another --dir" % (first.proc.pid, tmp_path / "c")]
    finally:
        assert first.stop() == 0


def test_a_full_disk_at_the_covers_close_is_a_classified_retry(small_disk, start, cdn, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    receiver = start(*allow_loopback(), "--dir", str(small_disk / "covers"))
    post(receiver.url, payload("close", [cdn.route("/c.gif", stall(GIF, cut=16), ok(GIF))]))
    cdn.wait_hits("/c.gif", 1)
    filler = fill(small_disk)
    cdn.release.set()                                    # the small GIF is written at close
    wait_for(lambda: any(r.getMessage().startswith("retry task=close") for r in caplog.records),
             what="a retry line")
    os.unlink(filler)
    wait_status(receiver.dir, "close", "done")
    lines = [r.getMessage() for r in caplog.records]
    assert any("No space left on device (ENOSPC)" in line for line in lines
               if line.startswith("retry task=close"))
    assert not [line for line in lines if "crashed" in line]


# ---------------------------------------------------------------------------
# Downloads: one try at one image, and the download policy
# ---------------------------------------------------------------------------

def vet(url, resolver, allow=()):
    return cr.DownloadPolicy(allow, resolver).vet(url)


def drip(length, every=0.1, head_first=True):
    """A host that promises length bytes and sends one every `every` seconds
    (always well inside --timeout); with head_first False it drips the
    status line and headers too."""
    def answer(handler):
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length
        if head_first:
            handler.wfile.write(head + PNG[:8])
            handler.wfile.flush()
        stream = PNG[8:] if head_first else head + PNG
        for byte in stream:
            if handler.server.cdn_release.wait(every):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
    return answer


def test_5xx_is_retried_until_it_works(start, cdn):
    receiver, done = download_one(start, cdn, status(500), status(503), ok(PNG))
    assert done["status"] == "done" and cdn.hits["/img"] == 3
    assert read(os.path.join(receiver.dir, "img", "cover_1.png")) == PNG
    assert receiver.metrics.get("download_retries_total") == 2


@pytest.mark.parametrize("answer", [status(403), status(404), status(410)])
def test_other_4xx_is_not_retried(start, cdn, answer):
    _, failed = download_one(start, cdn, answer, ok(PNG))
    assert failed["status"] == "failed" and cdn.hits["/img"] == 1


def test_html_with_200_is_refused_and_never_kept(start, cdn):
    receiver, failed = download_one(start, cdn, ok(b"<html>login</html>" * 10, "text/html"))
    assert failed["status"] == "failed" and "not an image" in failed["error"]
    assert cdn.hits["/img"] == 1
    assert visible_entries(os.path.join(receiver.dir, "img")) == ["task.json"]


def test_truncated_body_is_retried_and_never_saved_partial(start, cdn):
    receiver, done = download_one(start, cdn, truncated(PNG, 100), ok(PNG))
    assert done["status"] == "done" and cdn.hits["/img"] == 2
    assert read(os.path.join(receiver.dir, "img", "cover_1.png")) == PNG


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
def test_oversized_image_is_refused_and_not_retried(start, cdn, length):
    receiver, failed = download_one(start, cdn, ok(PNG + b"x" * 5000, length=length),
                                    argv=("--max-image-bytes", "4096"))
    assert failed["status"] == "failed" and "max-image-bytes" in failed["error"]
    assert cdn.hits["/img"] == 1
    settled(os.path.join(receiver.dir, "img"), ["task.json"])


def test_stalled_download_times_out_and_is_retried(start, cdn):
    receiver, done = download_one(start, cdn, stall(PNG), ok(PNG), argv=("--timeout", "0.3"))
    assert done["status"] == "done" and cdn.hits["/img"] == 2
    assert read(os.path.join(receiver.dir, "img", "cover_1.png")) == PNG


@pytest.mark.parametrize("body, name", [(PNG, "cover_1.png"), (JPEG, "cover_1.jpg"),
                                        (GIF, "cover_1.gif"), (WEBP, "cover_1.webp")])
def test_file_extension_follows_the_detected_type(start, cdn, body, name):
    receiver, done = download_one(start, cdn, ok(body, "application/octet-stream"))
    assert done["files"] == [name]
    assert read(os.path.join(receiver.dir, "img", name)) == body


def test_user_agent_is_browser_like_and_no_credentials_go_to_the_image_host(start, cdn):
    download_one(start, cdn, ok(PNG))
    (_, headers), = cdn.requests
    assert headers["User-Agent"].startswith("Mozilla/5.0") and "cover_receiver" in \
        headers["User-Agent"] and "Python-urllib" not in headers["User-Agent"]
    assert not {"Authorization", "Cookie"} & set(headers)


def test_redirects_are_followed_up_to_five(start, cdn):
    cdn.route("/r1", redirect("/r2"))
    cdn.route("/r2", redirect(cdn.url("/final"), 307))
    cdn.route("/final", ok(PNG))
    receiver = start(*allow_loopback())
    post(receiver.url, payload("redir", [cdn.url("/r1")]))
    assert wait_status(receiver.dir, "redir", "done")
    for n in range(7):
        cdn.route("/loop%d" % n, redirect("/loop%d" % (n + 1)))
    post(receiver.url, payload("loop", [cdn.url("/loop0")]))
    assert "more than 5 redirects" in wait_status(receiver.dir, "loop", "failed")["error"]
    assert "/loop6" not in cdn.hits


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "192.0.2.1", "198.18.0.1", "::", "::1", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12::1",
    "4000::1", "fe00::1", "::1:0:0:1", "8000::1", "1000::1",     # outside 2000::/3
    "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
    "2002:7f00:1::1", "64:ff9b::a9fe:a9fe", "2001:db8::1",
    "::ffff:0:127.0.0.1", "::ffff:0:8.8.8.8", "3fff::1", "3fff:fff::1", "5f00::1"])
def test_non_public_addresses_are_refused(address):
    assert not cr.is_public_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "8.8.8.8",
                                     "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"])
def test_public_addresses_are_allowed(address):
    assert cr.is_public_address(address)


def test_default_policy_is_https_only():
    with pytest.raises(cr.Permanent, match="only https"):
        vet("http://93.184.216.34/a.png", names_to_loopback())


def test_default_policy_refuses_a_name_if_any_address_is_not_public():
    rebinding = lambda host, port: ["93.184.216.34", "127.0.0.1"]  # noqa: E731
    with pytest.raises(cr.Permanent, match="non-public 127.0.0.1"):
        vet("https://cdn.example/a.png", rebinding)


def test_default_policy_keeps_the_checked_addresses_for_the_connection():
    target = vet("https://cdn.example:8443/a.png?x=1", lambda h, p: ["93.184.216.34"])
    assert (target.host, target.port, target.addresses, target.request_path) == \
        ("cdn.example", 8443, ("93.184.216.34",), "/a.png?x=1")


@pytest.mark.parametrize("url", ["https://127.0.0.1/x.png", "https://169.254.169.254/latest",
                                 "https://[::ffff:127.0.0.1]/x.png", "https://10.1.2.3/x.png",
                                 "https://[::1]/x.png", "https://localhost/x.png"])
def test_default_policy_refuses_internal_url_literals(url):
    with pytest.raises(cr.Permanent, match="refused"):
        vet(url, names_to_loopback("localhost"))


def test_default_policy_end_to_end_never_connects_to_loopback(start, tls_cdn):
    """A public-looking name pointed at 127.0.0.1 through the resolver seam."""
    tls_cdn.route("/secret.png", ok(PNG))
    receiver = start(resolver=names_to_loopback("cdn.example"))
    post(receiver.url, payload("ssrf", [tls_cdn.url("/secret.png", host="cdn.example"),
                                        tls_cdn.url("/secret.png")]))
    failed = wait_status(receiver.dir, "ssrf", "failed")
    assert failed["errors"][0].startswith("cover_1: refused") and "non-public" in failed["errors"][0]
    assert "refused" in failed["errors"][1]
    assert tls_cdn.hits == {}


def test_allow_host_limits_downloads_to_those_hosts(start, cdn):
    receiver = start("--allow-host", "*.cdn.test", "--allow-host", "exact.test",
                     resolver=names_to_loopback("a.cdn.test", "exact.test", "cdn.test", "x.test"))
    cdn.route("/p.png", ok(PNG))
    post(receiver.url, payload("allowed", [cdn.url("/p.png", "a.cdn.test"),
                                           cdn.url("/p.png", "exact.test")]))
    assert wait_status(receiver.dir, "allowed", "done")
    post(receiver.url, payload("denied", [cdn.url("/p.png", "cdn.test"),
                                          cdn.url("/p.png", "x.test")]))
    failed = wait_status(receiver.dir, "denied", "failed")
    assert all("not in --allow-host" in e for e in failed["errors"])
    assert cdn.hits == {"/p.png": 2}


def test_connection_goes_to_the_resolved_address_without_a_second_lookup(start, cdn):
    lookups = []

    def resolver(host, port):
        lookups.append(host)
        return ["127.0.0.1"]
    receiver = start("--allow-host", "only-in-this-test.invalid", resolver=resolver)
    cdn.route("/p.png", ok(PNG))
    post(receiver.url, payload("pinned", [cdn.url("/p.png", "only-in-this-test.invalid")]))
    assert wait_status(receiver.dir, "pinned", "done")    # real DNS knows no such name
    assert lookups == ["only-in-this-test.invalid"]
    assert cdn.requests[0][1]["Host"] == "only-in-this-test.invalid:%d" % cdn.port


def test_tls_still_verifies_the_host_name_on_a_pinned_connection(start, tls_cdn, certs):
    tls_cdn.route("/x.png", ok(PNG))
    receiver = start("--allow-host", "wrong-name.test", resolver=names_to_loopback("wrong-name.test"),
                     client_tls=ssl.create_default_context(cafile=certs[0]))
    post(receiver.url, payload("mitm", [tls_cdn.url("/x.png", "wrong-name.test")]))
    assert "certificate" in wait_status(receiver.dir, "mitm", "failed")["error"]
    assert tls_cdn.hits == {}


def test_every_redirect_hop_is_checked_again(start, cdn):
    cdn.route("/hop", redirect(cdn.url("/internal", "127.0.0.1")))
    cdn.route("/internal", ok(PNG))
    receiver = start("--allow-host", "cdn.test", resolver=names_to_loopback("cdn.test"))
    post(receiver.url, payload("hop", [cdn.url("/hop", "cdn.test")]))
    assert "not in --allow-host" in wait_status(receiver.dir, "hop", "failed")["error"]
    assert cdn.hits == {"/hop": 1}
    with pytest.raises(cr.Permanent):        # the same check in the default policy
        vet(cr.urllib.parse.urljoin("https://cdn.example/a", "http://127.0.0.1/internal"),
            names_to_loopback())


HOSTILE_HOSTS = [
    ("content-length not ascii digits", [raw(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n", PNG)],
     "failed", "malformed Content-Length"),
    ("retry-after not ascii digits",
     [raw(b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n"), ok(PNG)], "done", ""),
    ("redirect to a broken ipv6 literal",
     [raw(b"HTTP/1.1 302 Found\r\nLocation: https://[::1/\r\nContent-Length: 0\r\n")],
     "failed", "refused|malformed answer"),
    ("redirect to a bracketed name",
     [raw(b"HTTP/1.1 302 Found\r\nLocation: https://[host]/\r\nContent-Length: 0\r\n")],
     "failed", "refused|malformed answer"),
    ("redirect to a non-ascii path",
     [raw(b"HTTP/1.1 302 Found\r\nLocation: /caf\xe9.png?q=\xff\r\nContent-Length: 0\r\n")],
     "failed", "refused: URL must be printable ASCII"),
    ("redirect to a host with a control character",
     [raw(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1\x01x/\r\nContent-Length: 0\r\n")],
     "failed", "refused"),
    ("garbage status line", [raw(b"HTTP/1.1 2xx Whatever\r\n"), ok(PNG)], "done", ""),
]


@pytest.mark.parametrize("why, answers, final, reason", HOSTILE_HOSTS,
                         ids=[h[0] for h in HOSTILE_HOSTS])
def test_whatever_an_image_host_sends_ends_as_a_classified_error(start, cdn, caplog, why,
                                                                  answers, final, reason):
    caplog.set_level("INFO", logger="cover_receiver")
    _, finished = download_one(start, cdn, *answers)
    assert finished["status"] == final and re.search(reason, finished["error"] or "")
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]


def test_a_plain_http_url_is_refused_naming_allow_host(start, cdn):
    receiver = start()
    post(receiver.url, payload("plain", [cdn.route("/p.png", ok(PNG))]))
    error = wait_status(receiver.dir, "plain", "failed")["error"]
    assert "only https" in error and "--allow-host" in error and cdn.hits == {}


@pytest.mark.parametrize("head_first", [True, False], ids=["dripping body", "dripping head"])
def test_drip_hosts_are_cut_by_min_rate_and_never_hold_every_worker(start, cdn, head_first):
    receiver = start(*allow_loopback(), "--workers", "2", "--timeout", "0.5",
                     "--min-rate", "1024", "--retry-for", "60")
    drips = [cdn.route("/drip%d.png" % n, drip(10 ** 6, head_first=head_first)) for n in (1, 2)]
    post(receiver.url, payload("drip", drips))
    cdn.wait_hits("/drip1.png", 1)
    cdn.wait_hits("/drip2.png", 1)
    post(receiver.url, payload("fast", [cdn.route("/fast.png", ok(PNG))]))
    assert wait_status(receiver.dir, "fast", "done")
    stored = wait_for(lambda: all(record(receiver.dir, "drip")["lastError"])
                      and record(receiver.dir, "drip"), what="both drips cut")
    assert all("slower than --min-rate 1024" in e for e in stored["lastError"])


@pytest.mark.parametrize("url", ["http://%s.example/x.png" % ("a" * 64),
                                 "https://%31%32%37.0.0.1/x.png", "https://a..b/x.png"])
def test_a_host_that_can_never_resolve_is_refused_not_retried(start, url):
    receiver = start()
    code, answer, _ = post(receiver.url, payload("nx", [url]))
    assert code == 400 and "neither an IP address nor a DNS name" in answer["error"]
    assert isinstance(pytest.raises(cr.Permanent, cr.DownloadPolicy(()).vet, url).value,
                      cr.Permanent)


def test_a_non_public_https_image_names_allow_host(start):
    receiver = start()
    post(receiver.url, payload("local", ["https://127.0.0.1/x.png"]))
    failed = wait_status(receiver.dir, "local", "failed")
    assert "non-public 127.0.0.1 (--allow-host 127.0.0.1 allows it)" in failed["error"]


# ---------------------------------------------------------------------------
# Schedule: retries across outages, restarts, deadlines and clock steps
# ---------------------------------------------------------------------------

def statuses_seen_until_done(folder, task_id):
    """Watch a record until it is done; every status it showed on the way."""
    seen = set()

    def done():
        seen.add((record(folder, task_id) or {}).get("status"))
        return "done" in seen
    wait_for(done, what="%s to be done" % task_id)
    return seen


def test_gives_up_after_attempts(start, cdn):
    _, failed = download_one(start, cdn, status(500), argv=("--attempts", "3"))
    assert failed["status"] == "failed" and cdn.hits["/img"] == 3
    assert "after 3 tries" in failed["error"]


def test_429_retry_after_is_honoured(start, cdn):
    _, done = download_one(start, cdn, status(429, Retry_After="1"), ok(PNG))
    assert done["status"] == "done"
    first, second = cdn.times["/img"]
    assert second - first >= 0.9              # waited as told, not the 10 ms test backoff


def test_an_outage_longer_than_five_tries_ends_with_both_covers_saved(start, cdn):
    receiver = start(*allow_loopback())
    outage = [status(503)] * 8
    urls = [cdn.route("/o1.png", *outage, ok(PNG)), cdn.route("/o2.png", *outage, ok(JPEG))]
    post(receiver.url, payload("outage", urls))
    assert statuses_seen_until_done(receiver.dir, "outage") <= {"pending", "done"}
    assert cdn.hits == {"/o1.png": 9, "/o2.png": 9}
    assert read(os.path.join(receiver.dir, "outage", "cover_1.png")) == PNG
    assert read(os.path.join(receiver.dir, "outage", "cover_2.jpg")) == JPEG
    assert record(receiver.dir, "outage")["tries"] == [8, 8]


def test_a_retrying_image_records_its_last_error_and_next_try(start, cdn, capfd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")           # status cuts its rows to the terminal
    receiver = start(*allow_loopback(), backoff_base=30)
    post(receiver.url, payload("later", [cdn.route("/l.png", status(503), ok(PNG))]))
    waiting = wait_for(lambda: (record(receiver.dir, "later") or {}).get("tries") == [1]
                       and record(receiver.dir, "later"), what="the first failed try")
    assert waiting["status"] == "pending" and waiting["lastError"] == ["HTTP 503"]
    next_try = cr.parse_utc(waiting["nextTryAt"][0]) - time.time()
    assert 10 < next_try <= 30                  # base 30 s with jitter (0.5 to 1)
    assert cr.main(["status", "--dir", receiver.dir], env={}) == 0
    row = [line for line in capfd.readouterr().out.splitlines() if line.startswith("later")][0]
    assert re.search(r"pending .* retrying 1 image\(s\): HTTP 503; next try %s"
                     % re.escape(waiting["nextTryAt"][0]), row)
    healthz = json.loads(get(receiver.url.replace("/suno-cover-callback", "/healthz"))[1])
    assert healthz["pending"] == 1 and healthz["retrying"] == 1
    metrics = parse_metrics(get(receiver.url.replace("/suno-cover-callback", "/metrics"))[1]
                            .decode())
    assert metrics["cover_receiver_images_retrying"] == 1


def test_a_waiting_image_holds_no_worker(start, cdn):
    receiver = start(*allow_loopback(), "--workers", "1", backoff_base=30)
    post(receiver.url, payload("waits", [cdn.route("/w.png", status(503), ok(PNG))]))
    cdn.wait_hits("/w.png", 1)
    post(receiver.url, payload("goes", [cdn.route("/g.png", ok(GIF))]))
    wait_status(receiver.dir, "goes", "done")          # the only worker was free for it
    assert record(receiver.dir, "waits")["status"] == "pending"


def test_the_retry_for_deadline_fails_the_image_with_its_last_error(start, cdn):
    _, failed = download_one(start, cdn, status(502), argv=("--retry-for", "0.5"))
    assert failed["status"] == "failed"
    assert failed["errors"] == ["cover_1: HTTP 502 (after %d tries; --retry-for ran out)"
                                % failed["tries"][0]]
    assert failed["tries"][0] >= 3 and failed["lastError"] == ["HTTP 502"]


def test_kill_9_during_an_outage_keeps_the_schedule_and_the_covers_land(tmp_path, cdn):
    folder = str(tmp_path / "covers")
    args = ["--port", "0", "--host", "127.0.0.1", "--dir", folder, "--allow-host", "127.0.0.1",
            "--max-backoff", "2"]
    outage = [status(503, Retry_After="2")] * 2
    urls = [cdn.route("/k1.png", *outage, ok(PNG)), cdn.route("/k2.png", *outage, ok(GIF))]
    first = ReceiverProcess(args)
    post(first.url, payload("killed", urls))
    waiting = wait_for(lambda: (record(folder, "killed") or {}).get("tries") == [1, 1]
                       and record(folder, "killed"), what="one failed try of each image")
    first.proc.kill()
    first.proc.wait(WAIT)
    second = ReceiverProcess(args)
    try:
        second.wait_log(r"resume task=killed images=2")
        assert statuses_seen_until_done(folder, "killed") <= {"pending", "done"}
        for n, path in enumerate(("/k1.png", "/k2.png")):
            # No burst after the restart: the second try came at the recorded time.
            assert cdn.hits[path] == 3
            due = cr.parse_utc(waiting["nextTryAt"][n])
            assert time.time() - time.monotonic() + cdn.times[path][1] >= due - 0.05
        assert read(os.path.join(folder, "killed", "cover_1.png")) == PNG
        assert read(os.path.join(folder, "killed", "cover_2.gif")) == GIF
    finally:
        assert second.stop() == 0


def test_a_backward_clock_step_does_not_stall_a_retry(start, cdn):
    clock = SteppedClock()
    receiver = start(*allow_loopback(), clock=clock)
    url = cdn.route("/back.png", status(503), status(503), ok(PNG))
    post(receiver.url, payload("back", [url]))
    cdn.wait_hits("/back.png", 1)
    clock.offset = -30 * 86400                           # NTP steps the wall clock 30 days back
    assert wait_status(receiver.dir, "back", "done")


def test_a_forward_clock_step_does_not_end_the_retries(start, cdn):
    clock = SteppedClock()
    receiver = start(*allow_loopback(), "--retry-for", "30", clock=clock)
    url = cdn.route("/fwd.png", status(503), status(503), status(503), ok(PNG))
    post(receiver.url, payload("fwd", [url]))
    cdn.wait_hits("/fwd.png", 1)
    clock.offset = 15 * 86400                            # past --retry-for by the wall clock
    assert wait_status(receiver.dir, "fwd", "done")


def test_a_next_try_stored_far_ahead_waits_no_longer_than_max_backoff(start, cdn, tmp_path):
    url = cdn.route("/ahead.png", ok(PNG))
    pending_on_disk(tmp_path / "covers", "ahead", url, tries=[3],   # as written before
                    nextTryAt=[cr.utc_now(time.time() + 30 * 86400)])  # a backward step
    receiver = start(*allow_loopback(), "--max-backoff", "0.2")
    assert wait_status(receiver.dir, "ahead", "done")


def test_a_folder_it_cannot_write_is_a_scheduled_visible_error_until_retry_for(
        start, cdn, tmp_path, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    url = cdn.route("/ro.png", ok(PNG))
    pending_on_disk(tmp_path / "covers", "ro", url)
    with unwritable(tmp_path / "covers" / "ro"):
        receiver = start(*allow_loopback(), "--retry-for", "1")
        failed = wait_status(receiver.dir, "ro", "failed", written=False)
        assert "cannot save cover_1: " in failed["error"] and "--retry-for ran out" in failed["error"]
        retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retry ")]
        assert retries and all("cannot save cover_1: " in line for line in retries)
        assert receiver.pipeline.scheduler.counts() == (0, 0)
        assert not [r for r in caplog.records if "crashed" in r.getMessage()]
    assert cdn.hits.get("/ro.png", 0) == 0


# ---------------------------------------------------------------------------
# Hook: the hand-off, delivered at least once
# ---------------------------------------------------------------------------

def test_hook_runs_with_task_folder_and_environment(start, cdn, tmp_path):
    out = tmp_path / "hook.out"
    script = hook_script(tmp_path, "open(%r, 'a').write('|'.join(sys.argv[1:] + [\n"
                                   "    env['COVER_TASK_ID'], env['COVER_TASK_STATUS'],\n"
                                   "    env.get('COVER_RECEIVER_TOKEN', 'none')]) + '\\n')\n"
                         % str(out))
    receiver = start(*allow_loopback(), "--on-complete", script + " 'first arg'",
                     env={"COVER_RECEIVER_TOKEN": "tok"})
    os.environ["COVER_RECEIVER_TOKEN"] = "tok"          # also in the process environment
    try:
        post(receiver.url + "?token=tok", payload("hooked", [cdn.route("/h.png", ok(PNG))]))
        wait_status(receiver.dir, "hooked", "done")
        wait_for(lambda: out.exists() and out.read_text())
    finally:
        del os.environ["COVER_RECEIVER_TOKEN"]
    assert out.read_text() == "first arg|%s|hooked|done|none\n" % os.path.join(receiver.dir, "hooked")


def test_failing_and_slow_hooks_are_logged_and_never_change_the_task(start, cdn, tmp_path, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    script = hook_script(tmp_path, "if env['COVER_TASK_ID'] == 'slow':\n    time.sleep(30)\n"
                                   "sys.exit(3)\n")
    receiver = start(*allow_loopback(), "--on-complete", script, hook_timeout=0.5)
    post(receiver.url, payload("fails", [cdn.route("/a.png", ok(PNG))]))
    post(receiver.url, payload("slow", [cdn.route("/b.png", status(404))]))
    # Hooks run one at a time in the order tasks end, which is either order here.
    for line in ("hook-timeout task=slow", "hook-exit task=fails status=3"):
        wait_for(lambda: any(line in r.getMessage() for r in caplog.records), what=line)
    assert record(receiver.dir, "fails")["status"] == "done"
    assert record(receiver.dir, "slow")["status"] == "failed"


def test_a_failure_callback_ends_its_task_and_runs_the_hook(start, tmp_path, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    out = tmp_path / "hook.out"
    script = hook_script(tmp_path, "open(%r, 'a').write(env['COVER_TASK_ID'] + ' ' + "
                                   "env['COVER_TASK_STATUS'] + '\\n')\n" % str(out))
    receiver = start("--on-complete", script)
    post(receiver.url, payload("gen-501", code=501, images=None, msg="cover failed"))
    wait_for(lambda: out.exists() and out.read_text() == "gen-501 failed\n", what="the hook")
    assert any(r.getMessage().startswith("task-failed task=gen-501") for r in caplog.records)


def test_hook_output_is_logged_bounded_and_escaped_never_raw(tmp_path, cdn):
    hook = hook_script(tmp_path, (
        "sys.stdout.write('fine\\n2026-12-01 00:00:00,000 INFO task-done task=FORGED\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stdout.buffer.write(bytes(range(256)) * 16000)\n"))
    proc = ReceiverProcess(["--port", "0", "--host", "127.0.0.1", "--dir", str(tmp_path / "c"),
                            "--allow-host", "127.0.0.1", "--on-complete", hook])
    try:
        post(proc.url, payload("h", [cdn.route("/h.png", ok(PNG))]))
        proc.wait_log("hook-exit task=h status=0")
        proc.wait_log(r'hook-output task=h note="\d+ more bytes not shown"')
    finally:
        assert proc.stop() == 0
    lines = proc.text().splitlines()
    assert not [line for line in lines if line.startswith("2026-12-01 00:00:00,000")]
    assert any('hook-output task=h line="2026-12-01 00:00:00,000 INFO task-done task=FORGED"' in line
               for line in lines)
    assert len(lines) < 60 and len(proc.text()) < 20000


def daemon_hook(tmp_path):
    """A hook that starts a daemon (setsid) and waits: (command, the daemon's pid file)."""
    pidfile = tmp_path / "daemon.pid"
    return hook_script(tmp_path, (
        "import subprocess\n"
        "daemon = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],\n"
        "                          start_new_session=True)\n"
        "open(%r, 'w').write(str(daemon.pid))\n"
        "time.sleep(300)\n" % str(pidfile))), pidfile


def gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().split(") ")[1].startswith("Z")   # a zombie is dead
    except FileNotFoundError:
        return True


LINUX_ONLY = pytest.mark.skipif(not cr.LINUX, reason="a hook's setsid descendants are found "
                                                    "on Linux only (/proc)")


@LINUX_ONLY
def test_a_daemon_a_hook_starts_with_setsid_dies_at_the_time_limit(start, cdn, tmp_path):
    hook, pidfile = daemon_hook(tmp_path)
    receiver = start(*allow_loopback(), "--on-complete", hook, hook_timeout=1.0)
    post(receiver.url, payload("d", [cdn.route("/d.png", ok(PNG))]))
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the daemon"))
    wait_for(lambda: gone(pid), what="the setsid daemon to be killed")


@LINUX_ONLY
def test_stop_ends_a_running_hook_and_what_it_started_and_its_run_stays_pending(tmp_path):
    hook, pidfile = daemon_hook(tmp_path)
    proc = ReceiverProcess(serve_args(tmp_path / "c", "--on-complete", hook,
                                      "--drain-seconds", "30"))
    post(proc.url, payload("stopped", code=501, images=None))
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the daemon"))
    assert proc.stop() == 0                             # well before the drain's 30 s
    wait_for(lambda: gone(pid), what="the setsid daemon to be killed")
    assert record(tmp_path / "c", "stopped")["hook"]["status"] == "pending"


@LINUX_ONLY
def test_stop_kills_the_daemon_of_a_third_run_after_two_were_killed_at_the_time_limit(
        start, tmp_path):
    """Issue 30's run: two runs killed at their time limit, SIGTERM during the third."""
    pids = tmp_path / "daemons"
    hook = hook_script(tmp_path, (
        "import subprocess\n"
        "daemon = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],\n"
        "                          start_new_session=True)\n"
        "open(%r, 'a').write('%%d\\n' %% daemon.pid)\n"
        "time.sleep(300)\n" % str(pids)))
    receiver = start("--on-complete", hook, hook_timeout=0.5)
    post(receiver.url, payload("third", code=501, images=None))
    daemons = wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 3 and
                       [int(pid) for pid in pids.read_text().split()], what="a third run")
    wait_for(lambda: gone(daemons[0]) and gone(daemons[1]), what="the first two killed")
    receiver.stop()
    wait_for(lambda: gone(daemons[2]), what="the third run's daemon to be killed at stop")
    assert record(receiver.dir, "third")["hook"]["status"] == "pending"


def test_a_stop_that_comes_while_the_hook_is_being_started_still_kills_it(tmp_path, monkeypatch):
    hook, pidfile = daemon_hook(tmp_path)
    runner = cr.HookRunner(cr.Config(on_complete=cr._command(hook), hook_timeout=60), str(tmp_path))
    started, real_popen = [], subprocess.Popen

    def popen_then_stop(*args, **kwargs):       # stop() lands before Popen has returned
        started.append(real_popen(*args, **kwargs))
        runner.stop()
        return started[0]
    monkeypatch.setattr(cr.subprocess, "Popen", popen_then_stop)
    item = cr.WorkItem("end", "raced", 0, 0.0, 0.0, 0)
    began = time.monotonic()
    assert runner.run(item, {"status": "done"}) is None          # cut short: stays pending
    assert started[0].poll() is not None and time.monotonic() - began < 30
    assert not pidfile.exists() or gone(int(pidfile.read_text()))


def test_a_failing_hook_is_retried_until_it_succeeds(start, cdn, tmp_path):
    script, runs = counting_hook(tmp_path, "sys.exit(0 if env['COVER_HOOK_TRY'] == '3' else 1)\n")
    receiver = start(*allow_loopback(), "--on-complete", script)
    post(receiver.url, payload("h3", [cdn.route("/h3.png", ok(PNG))]))
    hook = hook_of(receiver.dir, "h3", "done")
    assert runs_of(runs, "h3") == [["1", "done"], ["2", "done"], ["3", "done"]]
    assert (hook["tries"], hook["lastExit"]) == (3, 0)
    assert healthz(receiver)["hooksPending"] == 0


def test_a_failure_callback_hands_off_its_failed_task_too(start, tmp_path):
    script, runs = counting_hook(tmp_path)
    receiver = start("--on-complete", script)
    post(receiver.url, payload("gen-failed", None, code=501, msg="no"))
    hook_of(receiver.dir, "gen-failed", "done")
    assert runs_of(runs, "gen-failed") == [["1", "failed"]]


def test_a_hook_that_keeps_failing_ends_failed_after_hook_retry_for(start, cdn, tmp_path):
    script, runs = counting_hook(tmp_path, "sys.exit(7)\n")
    receiver = start(*allow_loopback(), "--on-complete", script, "--hook-retry-for", "0.5")
    post(receiver.url, payload("hx", [cdn.route("/hx.png", ok(PNG))]))
    hook = hook_of(receiver.dir, "hx", "failed")
    assert hook["lastExit"] == 7 and "--hook-retry-for ran out" in hook["lastError"]
    assert healthz(receiver)["hooksFailed"] == 1
    assert metrics_of(receiver)["cover_receiver_hooks_failed"] == 1
    code, lines, _ = status_lines(receiver.dir)
    assert any(line.startswith("hx ") and "hook failed: exit status 7" in line for line in lines)
    # Once the database is back: retry --hook runs it again now.
    (tmp_path / "hook.py").write_text((tmp_path / "hook.py").read_text().replace(
        "sys.exit(7)", "sys.exit(0)"))
    result = run_cli("retry", "--hook", "hx", "--dir", receiver.dir, "--on-complete", script)
    assert result.returncode == 0 and result.stdout.startswith("hx hook done")
    assert record(receiver.dir, "hx")["hook"]["status"] == "done"


def test_a_kill_9_while_a_hook_runs_never_loses_the_hand_off(tmp_path, cdn):
    folder = tmp_path / "c"
    script, runs = counting_hook(tmp_path, (            # the first run hangs until killed
        "if not os.path.exists(%r):\n"
        "    open(%r, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n" % (str(tmp_path / "hook.pid"), str(tmp_path / "hook.pid"))))
    args = ["--port", "0", "--host", "127.0.0.1", "--dir", str(folder), "--allow-host", "127.0.0.1",
            "--on-complete", script]
    first = ReceiverProcess(args)
    post(first.url, payload("k9", [cdn.route("/k9.png", ok(PNG))]))
    hook_pid = int(wait_for(lambda: (tmp_path / "hook.pid").exists()
                            and (tmp_path / "hook.pid").read_text(), what="the hook to run"))
    first.proc.kill()
    first.exit()
    with contextlib.suppress(OSError):
        os.kill(hook_pid, signal.SIGKILL if not WINDOWS else signal.SIGTERM)
    second = ReceiverProcess(args)
    try:
        hook_of(str(folder), "k9", "done")
    finally:
        assert second.stop() == 0
    # The killed run was never recorded: it runs again, as the same try.
    assert runs_of(runs, "k9") == [["1", "done"], ["1", "done"]]


def test_one_slow_failing_hook_does_not_hold_back_another_tasks_hook(start, cdn, tmp_path):
    script, runs = counting_hook(tmp_path, (
        "if env['COVER_TASK_ID'] == 'stuck':\n    time.sleep(30)\nsys.exit(0)\n"))
    receiver = start(*allow_loopback(), "--on-complete", script, hook_timeout=0.5)
    post(receiver.url, payload("stuck", [cdn.route("/s.png", ok(PNG))]))
    wait_for(lambda: runs_of(runs, "stuck"), what="the stuck hook to start")
    post(receiver.url, payload("fine", [cdn.route("/f.png", ok(PNG))]))
    hook_of(receiver.dir, "fine", "done")
    assert record(receiver.dir, "stuck")["hook"]["status"] == "pending"
    assert len(runs_of(runs, "fine")) == 1


# ---------------------------------------------------------------------------
# Polling: fetch, generate, expect and serve's recovery
# ---------------------------------------------------------------------------

@pytest.fixture
def api():
    server = FakeAPI()
    yield server
    server.close()


def run_fetch(api, folder, *task_ids, extra=(), key="sk-test-key"):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVER_RECEIVER_", "SUNO_"))}
    if key:
        env["SUNO_API_KEY"] = key
    return subprocess.run([sys.executable, SCRIPT, "fetch", *task_ids, "--dir", folder,
                           "--api-base", api.base, "--interval", "0.05", "--wait", "5",
                           "--allow-host", "127.0.0.1", *extra],
                          env=env, capture_output=True, text=True, timeout=60)


def run_api_cli(*argv, key=API_KEY):
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                          timeout=60, env=cli_env(key))


def recovering(start, api, *argv, **overrides):
    """A serve with the API key that asks record-info as soon as a task is overdue."""
    return start(*allow_loopback(), "--api-base", api.base, "--recover-after", "0",
                 "--interval", "0.05", *argv, env={"SUNO_API_KEY": API_KEY},
                 **dict({"api_gap": 0.01}, **overrides))


def test_fetch_polls_until_success_and_saves_like_a_callback(api, cdn, tmp_path, start):
    urls = [cdn.route("/p1.png", ok(PNG)), cdn.route("/p2.png", ok(GIF))]
    api.script("polled", api_answer("polled", 0), api_answer("polled", 2),
               api_answer("polled", 1, urls))
    folder = str(tmp_path / "fetched")                 # not the receiver's folder below
    result = run_fetch(api, folder, "polled")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("polled done: 2 covers")
    assert api.calls["polled"] == 3 and set(api.auth) == {"Bearer sk-test-key"}
    assert all("Authorization" not in headers for _, headers in cdn.requests)
    assert "sk-test-key" not in result.stdout + result.stderr
    polled = record(folder, "polled")
    # The same record a callback produces.
    receiver = start(*allow_loopback())
    post(receiver.url, payload("polled", urls))
    called = wait_status(receiver.dir, "polled", "done")
    strip = lambda r: {k: v for k, v in r.items()  # noqa: E731
                       if not k.endswith("At") and k != "source"}
    assert strip(polled) == strip(called)
    assert (polled["source"], called["source"]) == ("record-info", "callback")
    assert read(os.path.join(folder, "polled", "cover_2.gif")) == GIF


def test_fetch_records_a_failed_generation(api, tmp_path):
    api.script("gen-fail", api_answer("gen-fail", 3, error_message="content policy"))
    folder = str(tmp_path / "covers")
    result = run_fetch(api, folder, "gen-fail")
    assert result.returncode == 1 and "gen-fail failed" in result.stdout
    failed = record(folder, "gen-fail")
    assert failed["status"] == "failed" and failed["msg"] == "content policy"


def test_fetch_gives_up_on_a_task_still_generating_with_exit_3(api, tmp_path):
    api.script("forever", api_answer("forever", 2))
    result = run_fetch(api, str(tmp_path), "forever", extra=("--wait", "1"))
    assert result.returncode == 3 and "forever pending" in result.stdout


def test_a_poll_cut_by_the_end_of_wait_leaves_a_generating_task_pending(api, tmp_path):
    stalled = api_answer("slowpoll", 2) + (3,)          # answers after --wait has run out
    api.script("slowpoll", api_answer("slowpoll", 2), stalled)
    result = run_fetch(api, str(tmp_path), "slowpoll", extra=("--wait", "1"))
    assert result.returncode == 3 and "slowpoll pending: still generating" in result.stdout, \
        result.stdout


@pytest.mark.parametrize("first", [
    (429, {"code": 429, "msg": "slow down"}, {"Retry-After": "0"}),
    (200, {"code": 429, "msg": "slow down"}, {}),
    (500, b"<html>oops</html>", {"Retry-After": "0"}),
    (200, b"not json at all", {}),
], ids=["429", "code-429", "500", "non-json"])
def test_fetch_retries_transient_api_errors(api, cdn, tmp_path, first):
    api.script("flaky", first, api_answer("flaky", 1, [cdn.route("/f.png", ok(PNG))]))
    result = run_fetch(api, str(tmp_path), "flaky")
    assert result.returncode == 0, result.stdout + result.stderr
    assert api.calls["flaky"] == 2


def test_fetch_waits_between_api_errors_by_the_one_retry_rule(api, cdn, tmp_path):
    # The scheduler's rule, capped by --max-backoff: four errors in a row
    # from 1 s doubling would outlast --wait 5 s; capped at 0.1 s they do not.
    error = (500, b"oops", {})
    api.script("capped", error, error, error, error,
               api_answer("capped", 1, [cdn.route("/c.png", ok(PNG))]))
    result = run_fetch(api, str(tmp_path), "capped", extra=("--max-backoff", "0.1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert api.calls["capped"] == 5 and result.stderr.count("api-retry task=capped") == 4


def test_fetch_retries_an_api_timeout(api, cdn, tmp_path):
    api.script("stalled", (200, b"", {}, 2.0), api_answer("stalled", 1, [cdn.route("/t.png", ok(PNG))]))
    result = run_fetch(api, str(tmp_path), "stalled", extra=("--timeout", "0.3"))
    assert result.returncode == 0 and "timed out" in result.stderr


def test_fetch_does_not_download_a_done_task_again(api, cdn, tmp_path):
    api.script("twice", api_answer("twice", 1, [cdn.route("/2.png", ok(PNG))]))
    assert run_fetch(api, str(tmp_path), "twice").returncode == 0
    again = run_fetch(api, str(tmp_path), "twice")
    assert again.returncode == 0 and again.stdout.startswith("twice done")
    assert cdn.hits == {"/2.png": 1}


def test_fetch_reports_a_rejected_key_without_showing_it(api, tmp_path):
    api.script("anything", (401, {"code": 401, "msg": "invalid key"}, {}))
    result = run_fetch(api, str(tmp_path), "anything", key="sk-very-secret")
    assert result.returncode == 1 and "API key rejected" in result.stdout
    assert "sk-very-secret" not in result.stdout + result.stderr
    assert api.calls["anything"] == 1


def test_fetch_polls_several_tasks_and_reports_each(api, cdn, tmp_path):
    api.script("one", api_answer("one", 1, [cdn.route("/1.png", ok(PNG))]))
    api.script("two", api_answer("two", 3, error_message="nope"))
    result = run_fetch(api, str(tmp_path), "one", "two", "three")
    lines = sorted(result.stdout.splitlines())
    assert [line.split(":")[0] for line in lines] == ["one done", "three error", "two failed"]
    assert "unknown task" in lines[1] and result.returncode == 1


@pytest.mark.parametrize("task_ids, key, named", [(["ok1"], None, "SUNO_API_KEY"),
                                                  (["../bad"], "k", "TASKID")])
def test_fetch_usage_errors_exit_2(api, tmp_path, task_ids, key, named):
    result = run_fetch(api, str(tmp_path), *task_ids, key=key)
    assert result.returncode == 2 and named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and api.calls == {}


def test_fetch_and_serve_on_one_dir_download_each_image_once(api, cdn, tmp_path):
    folder = str(tmp_path / "covers")
    urls = [cdn.route("/s1.png", stall(PNG)), cdn.route("/s2.png", ok(JPEG))]
    serve = ReceiverProcess(["--port", "0", "--host", "127.0.0.1", "--dir", folder,
                             "--allow-host", "127.0.0.1"])
    try:
        assert post(serve.url, payload("shared", urls))[1]["status"] == "received"
        cdn.wait_hits("/s1.png", 1)               # serve holds image 1 mid-download
        api.script("shared", api_answer("shared", 1, urls))
        fetch = subprocess.Popen([sys.executable, SCRIPT, "fetch", "shared", "--dir", folder,
                                  "--api-base", api.base, "--allow-host", "127.0.0.1"],
                                 env=dict(os.environ, SUNO_API_KEY="k"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        wait_for(lambda: api.calls.get("shared"), what="fetch to poll")
        cdn.release.set()
        out, err = fetch.communicate(timeout=WAIT)
        assert fetch.returncode == 0 and out.startswith("shared done"), err
    finally:
        assert serve.stop() == 0
    assert cdn.hits == {"/s1.png": 1, "/s2.png": 1}
    assert read(os.path.join(folder, "shared", "cover_1.png")) == PNG


@pytest.mark.parametrize("running, final, word", [
    ("PENDING", "SUCCESS", "done"), ("PENDING", "GENERATE_COVER_FAILED", "failed"),
    ("PENDING", "CREATE_TASK_FAILED", "failed")])
def test_fetch_reads_kie_ai_status_words(api, cdn, tmp_path, running, final, word):
    url = cdn.route("/k.png", ok(PNG))

    def answer(state):
        return (200, {"code": 200, "msg": "success", "data": {
            "taskId": "kie", "status": state, "response": {"images": [url]},
            "errorMessage": None if state == "SUCCESS" else "no luck"}}, {})
    api.script("kie", answer(running), answer(final))
    result = run_fetch(api, str(tmp_path), "kie")
    assert result.stdout.startswith("kie %s" % word), result.stdout + result.stderr
    assert "generating task=kie state=PENDING next_poll=0.05s" in result.stderr
    assert result.returncode == (0 if word == "done" else 1)


def test_fetch_against_a_dripping_api_ends_within_its_wait(api, tmp_path):
    def dripping(handler):
        handler.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n{")
        for _ in range(1000):
            time.sleep(0.2)
            handler.wfile.write(b" ")
            handler.wfile.flush()
    api.script("slowapi", dripping)
    started = time.monotonic()
    result = run_fetch(api, str(tmp_path / "c"), "slowapi", extra=("--wait", "2", "--timeout", "1"))
    assert result.returncode == 1 and "slowapi error:" in result.stdout
    assert time.monotonic() - started < 12, "fetch ran far past --wait"
    assert "Traceback" not in result.stderr


API_SHAPES = [
    ("json nested 200,000 deep", (200, b"[" * 200000 + b"]" * 200000, {})),
    ("response is a string", (200, {"code": 200, "data": {"successFlag": 1, "response": "oops"}}, {})),
    ("a 5,000-digit successFlag", (200, b'{"code": 200, "data": {"successFlag": ' + b"9" * 5000
                                   + b"}}", {})),
    ("a 5,000-digit successFlag string", (200, {"code": 200, "data": {"successFlag": "9" * 5000}},
                                          {})),
    ("a 5,000-digit errorCode", (200, b'{"code": 200, "data": {"successFlag": 3, "errorCode": '
                                 + b"9" * 5000 + b"}}", {})),
    ("data is a list", (200, {"code": 200, "data": [1, 2]}, {})),
    ("successFlag is true", (200, {"code": 200, "data": {"successFlag": True}}, {})),
    ("images is not a list", (200, {"code": 200, "data": {"successFlag": 1,
                                                          "response": {"images": "x"}}}, {})),
    ("code is a string", (200, {"code": "200", "data": {}}, {})),
    ("msg is an object", (401, {"code": 401, "msg": {"a": 1}}, {})),
    ("a chunk size that is not hex", lambda handler: handler.wfile.write(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")),
]


@pytest.mark.parametrize("why, answer", API_SHAPES, ids=[shape[0] for shape in API_SHAPES])
def test_every_api_answer_shape_ends_as_a_classified_line(api, tmp_path, why, answer):
    api.script("shape", answer)
    result = run_fetch(api, str(tmp_path / "c"), "shape", extra=("--wait", "1"))
    assert result.returncode in (1, 3), result
    assert re.search(r"^shape (error|failed|pending): ", result.stdout, re.M), result.stdout
    assert "internal error" not in result.stdout and "Traceback" not in result.stderr


def test_generate_records_the_cover_task_as_expected_with_its_parent(api, tmp_path):
    api.script("generate:music1", (200, {"code": 200, "msg": "success",
                                         "data": {"taskId": "cover1"}}, {}))
    result = run_api_cli("generate", "music1", "--dir", str(tmp_path / "c"), "--api-base",
                         api.base, "--callback-url", "https://me.example/suno-cover-callback")
    assert (result.returncode, result.stdout) == (0, "music1 cover1\n")
    assert api.generated == [{"taskId": "music1",
                              "callBackUrl": "https://me.example/suno-cover-callback"}]
    assert api.auth == ["Bearer " + API_KEY]
    stored = record(tmp_path / "c", "cover1")
    assert (stored["status"], stored["parentTaskId"], stored["images"]) == ("expected", "music1", [])
    assert API_KEY not in result.stdout + result.stderr + json.dumps(stored)


def test_a_repeated_generate_records_the_cover_task_that_exists(api, tmp_path):
    api.script("generate:music2", (200, {"code": 400, "msg": "cover already generated",
                                         "data": {"taskId": "cover2"}}, {}))
    result = run_api_cli("generate", "music2", "--dir", str(tmp_path / "c"), "--api-base",
                         api.base, "--callback-url", "https://me.example/cb")
    assert (result.returncode, result.stdout) == (
        0, "music2 cover2 (the cover task existed already)\n")
    assert record(tmp_path / "c", "cover2")["parentTaskId"] == "music2"


@pytest.mark.parametrize("code, msg, remedy", [
    (401, "invalid key", "check SUNO_API_KEY"), (402, "no credits", "add credits"),
    (429, "insufficient credits", "try again later"), (430, "too frequent", "try again in a minute"),
    (455, "maintenance", "maintenance"), (500, "oops", "try again later")])
def test_an_api_refusal_of_generate_exits_1_with_its_code_msg_and_remedy(api, tmp_path, code,
                                                                        msg, remedy):
    api.script("generate:music3", (200, {"code": code, "msg": msg, "data": None}, {}))
    result = run_api_cli("generate", "music3", "--dir", str(tmp_path / "c"), "--api-base",
                         api.base, "--callback-url", "https://me.example/cb")
    assert result.returncode == 1
    line = result.stdout.strip()
    assert line.startswith("music3 refused: ") and str(code) in line and msg in line \
        and remedy in line, line
    assert visible_entries(tmp_path / "c") == []


@pytest.mark.parametrize("argv, key, named", [
    (("generate", "m"), API_KEY, "--callback-url"),
    (("generate", "m", "--callback-url", "https://x.example/"), None, "SUNO_API_KEY"),
    (("generate", "m", "--callback-url", "ftp://x.example/"), API_KEY, "--callback-url"),
    (("expect", "../x"), None, "TASKID"),
    (("serve", "--confirm"), None, "--confirm"),
    (("bogus",), None, "the commands are serve, fetch, retry, status, expect, generate")])
def test_generate_and_expect_usage_errors_exit_2(tmp_path, capfd, argv, key, named):
    env = {"SUNO_API_KEY": key} if key else {}
    assert cr.main(list(argv) + ["--dir", str(tmp_path / "c")], env=env) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "c").exists()


def test_expect_beside_a_running_serve_is_recorded_by_it_at_once(start, tmp_path, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    receiver = start()
    assert expect(receiver.dir, "handed", parent="music7") == ["handed expected"]
    wait_for(lambda: healthz(receiver)["expected"] == 1, 1 + 1, "serve to take it")
    assert record(receiver.dir, "handed")["parentTaskId"] == "music7"
    assert any(r.getMessage().startswith("requested task=handed status=expected")
               for r in caplog.records)


def test_expect_leaves_a_known_task_as_it_is(start, cdn, tmp_path):
    receiver = start(*allow_loopback())
    post(receiver.url, payload("known", [cdn.route("/k.png", ok(PNG))]))
    before = wait_status(receiver.dir, "known", "done")
    assert expect(receiver.dir, "known", "fresh") == [
        "known known: done, left as it is", "fresh expected"]
    assert record(receiver.dir, "known") == before


def test_an_expected_task_whose_callback_comes_in_time_asks_the_api_nothing(start, api, cdn,
                                                                            tmp_path):
    expect(tmp_path / "covers", "ontime", parent="music4")
    receiver = recovering(start, api, "--recover-after", "60")
    assert healthz(receiver)["expected"] == 1
    answer = post(receiver.url, payload("ontime", [cdn.route("/t.png", ok(PNG))]))[1]
    assert answer == {"status": "received", "taskId": "ontime"}
    done = wait_status(receiver.dir, "ontime", "done")
    assert (done["source"], done["parentTaskId"]) == ("callback", "music4")
    assert done["expectedAt"] and api.calls == {}
    assert healthz(receiver)["expected"] == 0


def test_an_expected_task_with_no_callback_is_recovered_byte_exact_and_handed_off(
        start, api, cdn, tmp_path):
    expect(tmp_path / "covers", "lost1", parent="music5")
    api.script("lost1", api_answer("lost1", 2),
               api_answer("lost1", 1, [cdn.route("/l1.png", ok(PNG)), cdn.route("/l2.png", ok(GIF))]))
    script, runs = counting_hook(tmp_path)
    receiver = recovering(start, api, "--on-complete", script)
    done = wait_status(receiver.dir, "lost1", "done")
    assert done["source"] == "record-info" and done["parentTaskId"] == "music5"
    assert read(os.path.join(receiver.dir, "lost1", "cover_1.png")) == PNG
    assert read(os.path.join(receiver.dir, "lost1", "cover_2.gif")) == GIF
    assert api.calls == {"lost1": 2} and set(api.auth) == {"Bearer " + API_KEY}
    assert all("Authorization" not in headers for _, headers in cdn.requests)
    hook_of(receiver.dir, "lost1", "done")
    assert runs_of(runs, "lost1") == [["1", "done"]]
    assert metrics_of(receiver)["cover_receiver_tasks_recovered_total"] == 1
    # A late callback now is a duplicate: one download per image.
    assert post(receiver.url, payload("lost1", ["http://127.0.0.1:9/x.png"]))[1]["status"] \
        == "duplicate"
    assert cdn.hits == {"/l1.png": 1, "/l2.png": 1}


def test_a_kill_9_while_waiting_for_record_info_keeps_the_schedule(api, cdn, tmp_path):
    folder = tmp_path / "c"
    expect(folder, "k9r")
    url = cdn.route("/k9r.png", ok(PNG))
    api.script("k9r", api_answer("k9r", 2))            # generating, until the kill
    args = serve_args(folder, "--allow-host", "127.0.0.1", "--api-base", api.base,
                      "--recover-after", "0", "--interval", "0.2")
    first = ReceiverProcess(args, env={"SUNO_API_KEY": API_KEY})
    wait_for(lambda: (record(folder, "k9r")["poll"] or {}).get("tries", 0) >= 2,
             what="two polls on disk")
    first.proc.kill()
    first.proc.wait(WAIT)
    polled = record(folder, "k9r")
    assert polled["status"] == "expected" and polled["poll"]["nextPollAt"]
    api.script("k9r", api_answer("k9r", 1, [url]))
    second = ReceiverProcess(args, env={"SUNO_API_KEY": API_KEY})
    try:
        done = wait_status(str(folder), "k9r", "done")
        assert read(os.path.join(str(folder), "k9r", "cover_1.png")) == PNG
        assert done["source"] == "record-info"
    finally:
        assert second.stop() == 0
    # The key is in no file under --dir and in no log line.
    for parent, _, files in os.walk(str(folder)):
        for name in files:
            assert API_KEY.encode() not in read(os.path.join(parent, name))
    assert API_KEY not in first.text() + second.text()


def test_an_expected_task_still_generating_at_retry_for_fails_with_the_reason(start, api,
                                                                             tmp_path):
    expect(tmp_path / "covers", "never")
    api.script("never", api_answer("never", 2))
    script, runs = counting_hook(tmp_path)
    receiver = recovering(start, api, "--retry-for", "0.5", "--on-complete", script)
    failed = wait_status(receiver.dir, "never", "failed")
    assert failed["error"].startswith("no callback came; record-info last said: still generating")
    hook_of(receiver.dir, "never", "done")
    assert runs_of(runs, "never") == [["1", "failed"]]
    _, lines, _ = status_lines(receiver.dir)
    assert any(line.startswith("never ") and "no callback came" in line for line in lines)


def test_an_unknown_task_at_record_info_fails_at_once(start, api, tmp_path):
    expect(tmp_path / "covers", "typo")                # FakeAPI answers 404 for it
    receiver = recovering(start, api)
    failed = wait_status(receiver.dir, "typo", "failed")
    assert "unknown task: 404" in failed["error"] and api.calls == {"typo": 1}


def test_passing_api_errors_back_off_and_honour_retry_after(start, api, cdn, tmp_path):
    expect(tmp_path / "covers", "busy")
    api.script("busy", (200, {"code": 430, "msg": "too frequent"}, {}),
               (503, b"", {"Retry-After": "1"}),
               api_answer("busy", 1, [cdn.route("/b.png", ok(PNG))]))
    receiver = recovering(start, api)
    wait_status(receiver.dir, "busy", "done")
    assert api.calls == {"busy": 3}
    assert api.times[2] - api.times[1] >= 0.9           # Retry-After: 1
    counts = metrics_of(receiver)
    assert counts['cover_receiver_api_requests_total{outcome="passing"}'] == 2
    assert counts['cover_receiver_api_requests_total{outcome="ok"}'] == 1


def test_overdue_without_a_key_is_a_warning_healthz_metrics_and_status(start, tmp_path, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    expect(tmp_path / "covers", "silent")
    receiver = start("--recover-after", "0")
    wait_for(lambda: any(r.getMessage().startswith("overdue task=silent") for r in caplog.records),
             what="the overdue warning")
    line = next(r for r in caplog.records if r.getMessage().startswith("overdue task=silent"))
    assert line.levelname == "WARNING"
    assert "SUNO_API_KEY" in line.getMessage() and "fetch silent" in line.getMessage()
    assert (healthz(receiver)["overdue"], healthz(receiver)["expected"]) == (1, 1)
    counts = metrics_of(receiver)
    assert counts["cover_receiver_tasks_overdue"] == 1
    assert counts["cover_receiver_oldest_pending_age_seconds"] >= 0
    assert sum(r.getMessage().startswith("overdue task=silent") for r in caplog.records) == 1
    _, lines, _ = status_lines(receiver.dir)
    assert any(re.match(r"silent +expected .*waiting for its callback for \d+s", line)
               for line in lines)


def test_confirm_takes_the_images_from_record_info_never_from_the_body(start, api, cdn, tmp_path):
    real = cdn.route("/real.png", ok(PNG))
    api.script("conf", api_answer("conf", 1, [real]))
    receiver = recovering(start, api, "--confirm")
    forged = payload("conf", [cdn.route("/forged.png", ok(JPEG))])
    assert post(receiver.url, forged)[1] == {"status": "received", "taskId": "conf"}
    done = wait_status(receiver.dir, "conf", "done")
    assert done["images"] == [real] and done["source"] == "record-info"
    assert read(os.path.join(receiver.dir, "conf", "cover_1.png")) == PNG
    assert "/forged.png" not in cdn.hits


def test_confirm_fails_a_task_record_info_does_not_know_and_fetches_nothing(start, api, cdn):
    receiver = recovering(start, api, "--confirm")
    post(receiver.url, payload("forged", [cdn.route("/f.png", ok(PNG))]))
    failed = wait_status(receiver.dir, "forged", "failed")
    assert failed["error"].startswith("--confirm: record-info did not confirm the callback: "
                                      "unknown task: 404")
    assert cdn.hits == {}


def test_fifty_overdue_tasks_at_start_up_reach_the_api_without_a_burst(start, api, tmp_path):
    tasks = ["burst%02d" % n for n in range(50)]
    expect(tmp_path / "covers", *tasks)
    for task_id in tasks:
        api.script(task_id, api_answer(task_id, 3, error_message="gone"))
    receiver = recovering(start, api, api_gap=0.02)
    for task_id in tasks:
        wait_status(receiver.dir, task_id, "failed")
    # Seen at the API, a request may arrive a little late and the next on time:
    # no two closer than a quarter gap, and all 50 spread over 49 gaps.
    gaps = [later - earlier for earlier, later in zip(api.times, api.times[1:])]
    assert len(api.times) == 50 and min(gaps) >= 0.005, min(gaps)
    assert api.times[-1] - api.times[0] >= 0.95 * 49 * 0.02


def test_fetch_of_an_expected_task_delivers_it_the_same_way(api, cdn, tmp_path):
    folder = tmp_path / "c"
    expect(folder, "byhand", parent="music6")
    api.script("byhand", api_answer("byhand", 1, [cdn.route("/h.png", ok(PNG))]))
    result = run_fetch(api, str(folder), "byhand")
    assert result.returncode == 0 and result.stdout.startswith("byhand done")
    done = record(folder, "byhand")
    assert (done["source"], done["parentTaskId"]) == ("record-info", "music6")


# ---------------------------------------------------------------------------
# Service: start, stop, signals, systemd, logs, health and metrics
# ---------------------------------------------------------------------------

@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
    else:
        address = "@cover-receiver-test-%d" % os.getpid()
        sock.bind("\0" + address[1:])
    sock.settimeout(WAIT)
    yield sock, address
    sock.close()


def receive_until(sock, word):
    seen = []
    while not any(word in message for message in seen):
        seen.append(sock.recv(4096).decode())
    return seen


def socket_activated(listener, folder):
    """The receiver started as systemd would, serving listener on fd 3."""
    command = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@" 3<&0 0</dev/null',
               sys.executable, SCRIPT, "--dir", str(folder)]
    proc = ReceiverProcess([], command=command, stdin=listener.fileno())
    listener.close()
    return proc


def test_healthz_reports_pending_and_last_download(start, cdn):
    receiver = start(*allow_loopback())
    healthz = receiver.url.replace("/suno-cover-callback", "/healthz")
    code, body, _ = get(healthz)
    assert code == 200 and json.loads(body)["status"] == "ok"
    assert json.loads(body)["lastDownloadAt"] is None
    post(receiver.url, payload("slow", [cdn.route("/s.png", stall(PNG))]))
    cdn.wait_hits("/s.png", 1)
    assert json.loads(get(healthz)[1])["pending"] == 1
    cdn.release.set()
    wait_status(receiver.dir, "slow", "done")
    health = wait_for(lambda: json.loads(get(healthz)[1])["lastDownloadAt"] and
                      json.loads(get(healthz)[1]))
    assert health["pending"] == 0 and health["lastDownloadAt"].endswith("Z")


def test_refuses_to_start_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = ReceiverProcess(["--host", "127.0.0.1", "--port", str(taken.getsockname()[1]),
                                "--dir", str(tmp_path)])
        status_code, lines = proc.exit()
    assert status_code == 2 and len(lines) == 1 and "cannot listen" in lines[0]
    assert "choose another with --port" in lines[0]


def test_refuses_to_start_when_the_dir_is_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = ReceiverProcess(["--port", "0", "--dir", str(blocker / "covers")])
    status_code, lines = proc.exit()
    assert status_code == 2 and len(lines) == 1 and "not writable" in lines[0]
    if not WINDOWS:             # who runs, and who owns what is in the way
        assert "; this runs as %s, and %s belongs to %s" % (
            cr.user_name(os.getuid()), blocker, cr.user_name(blocker.stat().st_uid)) in lines[0]


def test_sigterm_exits_0_and_leaves_unfinished_downloads_pending(tmp_path, cdn):
    folder = str(tmp_path / "covers")
    args = ["--port", "0", "--host", "127.0.0.1", "--dir", folder, "--allow-host", "127.0.0.1",
            "--drain-seconds", "0.5"]
    proc = ReceiverProcess(args)
    post(proc.url, payload("term", [cdn.route("/t.png", stall(PNG), ok(PNG))]))
    cdn.wait_hits("/t.png", 1)
    assert proc.stop() == 0
    assert record(folder, "term")["status"] == "pending"
    # Under Wine a recv blocked in a worker does not wake when its socket is
    # closed (Windows itself aborts it): exit and record hold, the line is late.
    assert WINDOWS or "download-aborted task=term" in proc.text()
    again = ReceiverProcess(args)
    wait_status(folder, "term", "done")
    assert again.stop(STOP_SIGNAL if WINDOWS else signal.SIGINT) == 0


def test_drain_lets_a_running_download_finish(tmp_path, cdn):
    folder = str(tmp_path / "covers")
    proc = ReceiverProcess(["--port", "0", "--host", "127.0.0.1", "--dir", folder,
                            "--allow-host", "127.0.0.1", "--drain-seconds", "10"])
    post(proc.url, payload("drain", [cdn.route("/d.png", stall(PNG))]))
    cdn.wait_hits("/d.png", 1)
    proc.signal()
    proc.wait_log("stopping")
    cdn.release.set()
    assert proc.proc.wait(WAIT) == 0
    assert record(folder, "drain")["status"] == "done"


def test_log_lines_name_the_task_and_escape_attacker_text(start, cdn, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    receiver = start(*allow_loopback())
    post(receiver.url, payload("logged", code=501, images=None, msg="bad\nFORGED line\x1b[31m"))
    post(receiver.url, payload("logged2", [cdn.route("/x", status(500), ok(PNG))]))
    wait_status(receiver.dir, "logged2", "done")
    # The record turns done a moment before the downloaded line is written.
    wait_for(lambda: any(r.getMessage().startswith("downloaded task=logged2")
                         for r in caplog.records), what="the downloaded line")
    messages = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m and "\x1b" not in m for m in messages)
    assert any(m.startswith("received task=logged ") and "bad\\x0aFORGED" in m for m in messages)
    assert any(m.startswith("retry task=logged2 image=1") and "HTTP 500" in m for m in messages)
    assert any(re.match(r"downloaded task=logged2 image=1 bytes=%d ms=\d+" % len(PNG), m)
               for m in messages)


def test_a_value_with_spaces_is_quoted_so_a_text_line_splits_on_spaces(caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    cr.log_event("rejected", "t1", reason='missing or "wrong" ?token=', status=401, empty="")
    assert caplog.records[-1].getMessage() == \
        'rejected task=t1 reason="missing or \\x22wrong\\x22 ?token=" status=401 empty=""'
    assert shlex.split(caplog.records[-1].getMessage())[2] == 'reason=missing or \\x22wrong\\x22 ?token='


def test_log_format_json_writes_one_object_per_line_with_the_events_fields(tmp_path, cdn):
    proc = ReceiverProcess(serve_args(tmp_path / "c", "--log-format", "json",
                                      "--allow-host", "127.0.0.1"))
    try:
        post(proc.url, payload("js1", [cdn.route("/j.png", ok(PNG))], msg="a b\nc"))
        proc.wait_log(r'"event": "task-done"')
    finally:
        assert proc.stop() == 0
    lines = [json.loads(line) for line in proc.text().splitlines()]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
               and line["level"] in ("INFO", "WARNING") for line in lines)
    received = next(line for line in lines if line["event"] == "received")
    assert received["taskId"] == "js1" and received["code"] == 200
    assert received["msg"] == "a b\\x0ac"                  # escaped, as in a text line
    listening = next(line for line in lines if line["event"] == "listening")
    assert listening["port"] == int(proc.url.split(":")[2].split("/")[0])
    assert "taskId" not in listening


def warning_line(tmp_path, journal_stream=None):
    """What status prints for an unknown COVER_RECEIVER_ variable (a WARNING),
    its stderr a file; JOURNAL_STREAM set to that file's device:inode, or to
    journal_stream."""
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        stat = os.fstat(err.fileno())
        stream = journal_stream or "%d:%d" % (stat.st_dev, stat.st_ino)
        env = dict(os.environ, COVER_RECEIVER_BOGUS="1", JOURNAL_STREAM=stream)
        subprocess.run([sys.executable, SCRIPT, "status", "--dir", str(tmp_path)], env=env,
                       stdout=subprocess.DEVNULL, stderr=err, timeout=60, check=True)
    return err_path.read_text().strip()


@pytest.mark.skipif(WINDOWS, reason="no journal on Windows")
def test_lines_to_the_journal_carry_their_syslog_priority(tmp_path):
    assert re.match(r"<4>\S+ \S+ WARNING unknown-variable name=COVER_RECEIVER_BOGUS",
                    warning_line(tmp_path))
    assert warning_line(tmp_path, journal_stream="1:1").startswith("20")   # not the journal


def test_escape_bounds_and_neutralises_text():
    assert cr.escape("a\r\nb\x00\u2028") == "a\\x0d\\x0ab\\x00\\u2028"
    assert cr.escape("x" * 500).endswith("...") and len(cr.escape("x" * 500)) == 203


def test_log_lines_are_stamped_in_utc_whatever_the_local_zone(tmp_path):
    proc = ReceiverProcess(["--port", "0", "--host", "127.0.0.1", "--dir", str(tmp_path)],
                           env={"TZ": "XYZ-05:30"})        # POSIX TZ: 5.5 h east of UTC
    try:
        stamp = proc.wait_log(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d{3} INFO listening").group(1)
    finally:
        assert proc.stop() == 0
    assert abs(calendar.timegm(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) - time.time()) < 60


def test_secrets_never_reach_logs_answers_or_healthz(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(b"hmac-secret-value\n")
    proc = ReceiverProcess(["--port", "0", "--host", "127.0.0.1", "--dir", str(tmp_path / "c"),
                            "--hmac-key-file", str(key_file)],
                           env={"COVER_RECEIVER_TOKEN": "url-token-value"})
    try:
        base = proc.url
        headers = signed_headers(b"hmac-secret-value", "sec")
        answers = [post(base + "?token=url-token-value", payload("sec", ["http://127.0.0.1:9/x"]),
                        headers),
                   post(base + "?token=wrong-token-guess", payload("sec2"),
                        signed_headers(b"hmac-secret-value", "sec2"))]
        answers.append(get(base.replace("/suno-cover-callback", "/healthz")))
        assert [a[0] for a in answers] == [200, 401, 200]
    finally:
        assert proc.stop() == 0
    seen = proc.text() + repr([a[1] for a in answers])
    for secret in ("hmac-secret-value", "url-token-value", "wrong-token-guess",
                   headers["X-Webhook-Signature"]):
        assert secret not in seen
    assert "received task=sec client=127.0.0.1" in proc.text()
    # The rejection is logged with its reason, and the query (the token) is not.
    assert 'WARNING rejected status=401 client=127.0.0.1 reason="missing or wrong ?token="' \
        in proc.text()


@posix_only
def test_sd_notify_ready_watchdog_and_stopping(notify_socket, tmp_path):
    sock, address = notify_socket
    proc = ReceiverProcess(["--port", "0", "--host", "127.0.0.1", "--dir", str(tmp_path / "c")],
                           env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    ready = receive_until(sock, "READY=1")
    assert "STATUS=0 pending" in ready[-1]
    assert any("WATCHDOG=1" in m for m in receive_until(sock, "WATCHDOG=1"))
    proc.proc.send_signal(signal.SIGTERM)
    receive_until(sock, "STOPPING=1")
    assert proc.proc.wait(WAIT) == 0


@posix_only
def test_a_notify_socket_nobody_reads_never_stalls_the_receiver(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)                                  # its queue fills: never read
        proc = ReceiverProcess(serve_args(tmp_path / "c"), env={
            "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})      # a tick every 10 ms
        try:
            url = proc.url.replace("/suno-cover-callback", "/healthz")
            proc.wait_log("WARNING notify-failed")       # a datagram dropped, not waited for
            assert get(url)[0] == 200 and proc.text().count("notify-failed") == 1
        finally:
            assert proc.stop() == 0


def test_no_notification_without_notify_socket():
    notifier = cr.SystemdNotifier({})
    assert notifier.address == "" and notifier.watchdog is None
    notifier.send("READY=1")              # a no-op: no socket is even created


@posix_only
def test_socket_activation_serves_on_fd_3(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    proc = socket_activated(listener, tmp_path / "c")       # its --port is ignored
    try:
        proc.wait_log("listening")
        status_code, answer, _ = post("http://127.0.0.1:%d/suno-cover-callback" % port,
                                      payload("sa", ["http://127.0.0.1:9/x"]))
        assert status_code == 200 and answer["status"] == "received"
    finally:
        assert proc.stop() == 0


def test_metrics_counters_move_as_callbacks_arrive(start, cdn):
    receiver = start(*allow_loopback())
    metrics_url = receiver.url.replace("/suno-cover-callback", "/metrics")
    code, text, response = get(metrics_url)
    assert code == 200 and response.getheader("Content-Type").startswith("text/plain")
    before = parse_metrics(text.decode())
    assert before['cover_receiver_callbacks_total{outcome="received"}'] == 0
    post(receiver.url, payload("m", [cdn.route("/m.png", status(500), ok(PNG))]))
    post(receiver.url, payload("m", [cdn.url("/m.png")]))
    post(receiver.url, b"nope")
    wait_status(receiver.dir, "m", "done")
    after = wait_for(lambda: (lambda m: m['cover_receiver_downloads_total{outcome="saved"}'] == 1
                              and m)(parse_metrics(get(metrics_url)[1].decode())))
    assert after['cover_receiver_callbacks_total{outcome="received"}'] == 1
    assert after['cover_receiver_callbacks_total{outcome="duplicate"}'] == 1
    assert after['cover_receiver_callbacks_total{outcome="bad_request"}'] == 1
    assert after['cover_receiver_downloads_total{outcome="saved"}'] == 1
    assert after["cover_receiver_download_retries_total"] == 1
    assert after["cover_receiver_downloaded_bytes_total"] == len(PNG)
    assert after["cover_receiver_tasks_pending"] == 0
    assert after["cover_receiver_downloads_in_flight"] == 0
    assert after["cover_receiver_process_start_time_seconds"] <= time.time()


def hand_over(folder, task_id, url):
    """What fetch does beside a running serve once record-info answered: the
    task recorded in the database, marked for serve (wake)."""
    store = cr.Store(str(folder))
    try:
        cr.accept(store, cr.Callback(task_id, 200, "success", (url,)), wake=True)
    finally:
        store.close()


def test_a_running_serve_takes_the_work_a_command_recorded_within_a_second(start, cdn):
    receiver = start(*allow_loopback())
    hand_over(receiver.dir, "left", cdn.route("/left.png", ok(PNG)))
    assert wait_status(receiver.dir, "left", "done", timeout=1 + 2)["files"] == ["cover_1.png"]
    assert cdn.hits == {"/left.png": 1}


def test_start_up_line_names_the_folder_and_the_download_policy(tmp_path):
    folder = str(tmp_path / "covers")
    proc = ReceiverProcess(["--port", "0", "--host", "127.0.0.1", "--dir", folder,
                            "--allow-host", "127.0.0.1", "--allow-host", "*.cdn.test"])
    try:
        line = proc.wait_log(r"listening .*").group()
        assert "dir=%s " % os.path.abspath(folder) in line
        assert 'downloads="only 127.0.0.1,*.cdn.test" ' in line
        assert "unprotected" not in proc.text()          # loopback only
    finally:
        assert proc.stop() == 0


def test_an_open_unprotected_listener_warns_how_to_set_a_token(tmp_path):
    proc = ReceiverProcess(["--port", "0", "--host", "0.0.0.0", "--dir", str(tmp_path / "c")])
    try:
        assert "downloads=public-https" in proc.wait_log(r"listening .*").group()
        warning = proc.wait_log(r"WARNING unprotected .*").group()
        assert "COVER_RECEIVER_TOKEN" in warning and "?token=" in warning
    finally:
        assert proc.stop() == 0


def test_a_flood_of_rejections_is_logged_a_few_lines_then_counted(start, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    receiver = start()
    for _ in range(30):
        assert post(receiver.url, b"{not json")[0] == 400

    def tally():
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected")]
        detailed = [m for m in lines if m.startswith("rejected status=400")]
        counted = sum(int(re.search(r"count=(\d+)", m).group(1))
                      for m in lines if m.startswith("rejected-more"))
        return detailed, counted
    wait_for(lambda: sum(map(len, [tally()[0]])) + tally()[1] == 30, what="30 rejections told")
    detailed, counted = tally()
    assert 'reason="body is not JSON' in detailed[0] and "client=127.0.0.1" in detailed[0]
    assert counted > 0 and len(detailed) < 30         # a flood is counted, not logged line by line
    assert all(r.levelname == "WARNING" for r in caplog.records
               if r.getMessage().startswith("rejected"))


def test_a_503_for_an_unwritable_dir_is_an_error_line(start, caplog):
    caplog.set_level("INFO", logger="cover_receiver")
    receiver = start()
    take_the_dir_away(receiver)
    with open(receiver.dir, "w") as handle:
        handle.write("x")
    assert post(receiver.url, payload())[0] == 503
    assert any(r.levelname == "ERROR" and r.getMessage().startswith("rejected status=503")
               for r in caplog.records)


def test_a_start_that_cannot_listen_creates_no_folder(tmp_path):
    folder = tmp_path / "covers"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = ReceiverProcess(["--host", "127.0.0.1", "--port", str(taken.getsockname()[1]),
                                "--dir", str(folder)])
        assert proc.exit()[0] == 2
    assert not folder.exists()


def test_a_second_stop_signal_while_draining_exits_at_once(tmp_path, cdn):
    folder = str(tmp_path / "covers")
    proc = ReceiverProcess(["--port", "0", "--host", "127.0.0.1", "--dir", folder,
                            "--allow-host", "127.0.0.1", "--drain-seconds", "600"])
    post(proc.url, payload("impatient", [cdn.route("/i.png", stall(PNG), ok(PNG))]))
    cdn.wait_hits("/i.png", 1)
    proc.signal()
    proc.wait_log("stopping")
    proc.signal(signal.SIGINT)                        # the operator does not want to wait
    assert proc.exit()[0] == 0                        # well within WAIT, not 600 s
    assert record(folder, "impatient")["status"] == "pending"


@pytest.mark.skipif(not cr.LINUX, reason="tgkill, which signals one thread, is Linux's")
def test_a_second_stop_signal_that_lands_on_another_thread_still_exits_at_once(tmp_path, cdn):
    """The kernel may hand a process's signal to any thread; Python runs the
    handler in the main thread only, which must not sit in a long wait."""
    import ctypes
    proc = ReceiverProcess(serve_args(tmp_path / "c", "--allow-host", "127.0.0.1",
                                      "--drain-seconds", "600"))
    post(proc.url, payload("drained", [cdn.route("/d.png", stall(PNG), ok(PNG))]))
    cdn.wait_hits("/d.png", 1)
    proc.signal()
    proc.wait_log("stopping")
    pid = proc.proc.pid
    # The main thread drains: every thread has ended but it and the stalled download's.
    threads = wait_for(lambda: len(os.listdir("/proc/%d/task" % pid)) == 2 and os.listdir(
        "/proc/%d/task" % pid), what="the drain, with only the download's thread left")
    other = next(int(tid) for tid in threads if int(tid) != pid)
    assert ctypes.CDLL(None, use_errno=True).tgkill(pid, other, signal.SIGINT) == 0
    assert proc.exit()[0] == 0                        # within WAIT, not the drain's 600 s
    assert record(tmp_path / "c", "drained")["status"] == "pending"


@pytest.mark.skipif(not cr.LINUX, reason="F_SETPIPE_SZ, which makes a small pipe, is Linux's")
def test_two_stop_signals_exit_at_once_while_stderr_is_stuck(tmp_path):
    """A full pipe (or a stalled journal) blocks every log line; the second
    signal's handler must still end the process, so it writes nothing."""
    import fcntl
    import termios
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)                # F_SETPIPE_SZ: one page
    proc = subprocess.Popen([sys.executable, SCRIPT, "--port", "0", "--host", "127.0.0.1",
                             "--dir", str(tmp_path / "c"), "--drain-seconds", "600"],
                            stderr=write_end, stdin=subprocess.DEVNULL)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb", buffering=0) as stderr:
            seen = b""
            while b"port=" not in seen or not seen.endswith(b"\n"):
                seen += stderr.read(1) or pytest.fail("no listening line: %r" % seen)
            url = "http://127.0.0.1:%s/" % re.search(rb"port=(\d+)", seen).group(1).decode()

            def pipe_full():
                """A 404 logs a line of ~90 bytes before it answers: no answer
                and a nearly full pipe mean the log is stuck."""
                try:
                    raw_request(url, b"GET /nothing HTTP/1.0\r\n\r\n", timeout=0.5)
                    return False
                except socket.timeout:
                    waiting = fcntl.ioctl(stderr, termios.FIONREAD, b"\0\0\0\0")
                    return int.from_bytes(waiting, sys.byteorder) > 4096 - 300
            wait_for(pipe_full, what="a full stderr pipe")
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(WAIT) == 0
    finally:
        proc.kill()
        proc.wait()


@posix_only
@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_socket_activation_on_a_unix_socket_answers(tmp_path, kind):
    if kind == "abstract" and not cr.LINUX:
        pytest.skip("abstract Unix sockets are Linux's")
    address = str(tmp_path / "cover.sock") if kind == "path" else "\0cover-test-%d" % os.getpid()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen()
    proc = socket_activated(listener, tmp_path / "c")
    try:
        proc.wait_log("listening host=%s" % ("/" if kind == "path" else "@cover-test"))
        body = json.dumps(payload("ux", ["http://127.0.0.1:9/x"])).encode()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(address)
            sock.sendall(b"POST /suno-cover-callback HTTP/1.0\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        assert answer.startswith(b"HTTP/1.0 200 ") and b'"received"' in answer
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in proc.text()


def test_a_flood_of_healthz_costs_about_one_disk_probe_a_second(start, monkeypatch):
    receiver = start()
    probes, real = [], receiver.lock.probe

    def counted():
        probes.append(time.monotonic())
        real()
    monkeypatch.setattr(receiver.lock, "probe", counted)
    started = time.monotonic()
    for _ in range(30):
        assert healthz(receiver)["status"] == "ok"
    assert len(probes) <= int(time.monotonic() - started) + 1


@posix_only
def test_sighup_looks_at_the_folder_now_and_never_stops_serve(tmp_path, cdn):
    folder = tmp_path / "c"
    serve = ReceiverProcess(serve_args(folder, "--allow-host", "127.0.0.1"))
    try:
        serve.wait_log(r"listening")
        hand_over(folder, "hup", cdn.route("/hup.png", ok(PNG)))
        serve.signal(signal.SIGHUP)
        serve.wait_log(r"reload ")
        wait_status(str(folder), "hup", "done", timeout=5)
        serve.signal(signal.SIGHUP)
        wait_for(lambda: serve.text().count(" INFO reload ") == 2, what="the second reload")
        assert serve.proc.poll() is None
        assert post(serve.url, payload("hup"))[1]["status"] == "duplicate"
    finally:
        assert serve.stop() == 0


# ---------------------------------------------------------------------------
# Platform: links, FIFOs, read-only folders and file owners
# ---------------------------------------------------------------------------

def snapshot(folder):
    """Every entry below folder with its bytes: what must not change."""
    found = {}
    for parent, dirs, files in os.walk(str(folder)):
        for name in dirs + files:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, str(folder))] = None if os.path.isdir(path) else read(path)
    return found


# Each plant puts a link where the receiver would follow it: before start-up,
# or while it runs (a start-up sweep would remove some links first).
def link_the_task_folder(covers, outside, url, phase):
    if phase == "before start":
        covers.mkdir(parents=True)
        os.symlink(str(outside), str(covers / "T1"))


def link_the_database(covers, outside, url, phase):
    if phase == "before start":        # SQLite would follow it: it is moved aside
        covers.mkdir(parents=True)
        for name in sorted(STORE_FILES):
            os.symlink(str(outside / "victim"), str(covers / name))


def link_the_part_file(covers, outside, url, phase):
    if phase == "between tries":
        part = covers / "T1" / ".cover_1.part"
        wait_for(lambda: not os.path.lexists(str(part)), what="the failed try's part file to go")
        os.symlink(str(outside / "victim"), str(part))


def link_the_record(covers, outside, url, phase):
    if phase == "before start":          # a done record that, if followed, stops the download
        (covers / "T1").mkdir(parents=True)
        done = json.loads(valid_record_bytes("T1", url))
        done.update(status="done", files=["cover_1.png"])
        (outside / "record").write_text(json.dumps(done))
        os.symlink(str(outside / "record"), str(covers / "T1" / "task.json"))


def link_a_cover(covers, outside, url, phase):
    if phase == "before start":
        pending_on_disk(covers, "T1", url)
        os.symlink(str(outside / "victim"), str(covers / "T1" / "cover_1.png"))


def link_the_manifest(covers, outside, url, phase):
    if phase == "between tries":       # the task.json written when it ends replaces the link
        os.symlink(str(outside / "victim"), str(covers / "T1" / "task.json"))


def plant_entry(path, kind, outside):
    if kind == "a folder":
        os.makedirs(str(path / "inside"))
    elif kind == "a fifo":
        os.mkfifo(str(path))
    else:
        os.symlink(str(outside), str(path))


def python_for(uid):
    """An interpreter that uid can run (the one running the tests may sit
    under /root, 0700, as a venv or pyenv does), or a skip."""
    for python in (os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                   "/usr/bin/python3", "/usr/local/bin/python3"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([python, "-c", "pass"], user=uid, timeout=WAIT).returncode == 0:
                return python
    pytest.skip("no Python here that uid %d may run" % uid)


@posix_only
def test_status_reads_no_fifo_and_shows_one_corrupt_record_by_id(tmp_path):
    plant_corrupt(tmp_path / "covers", "pipe", "a fifo")
    code, lines, _ = status_lines(tmp_path / "covers")       # run_cli times out if it blocks
    assert code == 0 and any(line.startswith("pipe ") and "corrupt" in line for line in lines)
    code, _, err = status_lines(tmp_path / "covers", "pipe")
    assert code == 1 and "corrupt: task.json is not a regular file" in err


LINK_PLANTS = [link_the_task_folder, link_the_database, link_the_part_file, link_the_record,
               link_a_cover, link_the_manifest]


@posix_only
@pytest.mark.parametrize("plant", LINK_PLANTS, ids=[p.__name__ for p in LINK_PLANTS])
def test_no_link_inside_dir_leads_a_write_or_delete_outside_it(start, cdn, tmp_path, plant):
    outside, covers = tmp_path / "elsewhere", tmp_path / "covers"
    outside.mkdir()
    (outside / "victim").write_bytes(PNG[:100] + b"not to be touched")
    (outside / "T1.lock-like").write_bytes(b"keep")
    # The first try is put off by a second: time to plant a link between two tries.
    url = cdn.route("/l.png", status(503, Retry_After="1"), ok(PNG))
    plant(covers, outside, url, "before start")
    before = snapshot(outside)
    receiver = start(*allow_loopback())
    plant(covers, outside, url, "running")
    post(receiver.url, payload("T1", [url]))
    cdn.wait_hits("/l.png", 1)
    plant(covers, outside, url, "between tries")
    assert wait_status(receiver.dir, "T1", "done")
    assert read(os.path.join(receiver.dir, "T1", "cover_1.png")) == PNG
    assert not os.path.islink(os.path.join(receiver.dir, "T1", "cover_1.png"))
    assert snapshot(outside) == before


def test_a_duplicate_of_a_done_task_is_answered_from_a_read_only_dir(start, cdn, tmp_path):
    receiver = start(*allow_loopback())
    body = payload("ro-done", [cdn.route("/rd.png", ok(PNG))])
    post(receiver.url, body)
    wait_status(receiver.dir, "ro-done", "done")
    with unwritable(tmp_path / "covers"):          # ext4 remounts read-only after I/O errors
        code, answer, _ = post(receiver.url, body)
        assert (code, answer["status"]) == (200, "duplicate")
        assert post(receiver.url, payload("new-one"))[0] == 503


# Where the store keeps files of its own, something else may have been put.
PLANT_PLACES = {cr.DB_NAME: "before start", cr.DB_NAME + "-wal": "before start",
                cr.DB_NAME + "-shm": "before start", cr.LOCK_NAME: "before start",
                "X/.cover_1.part": "before start", "X/cover_1.png": "before start",
                "X/.task.json.part": "before start"}


@posix_only
@pytest.mark.parametrize("kind", ["a folder", "a fifo", "a link"])
@pytest.mark.parametrize("place", PLANT_PLACES)
def test_whatever_stands_where_the_store_keeps_a_file_never_wedges_it(
        start, cdn, tmp_path, caplog, place, kind):
    covers, outside = tmp_path / "covers", tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    url = cdn.route("/p.png", ok(PNG))
    covers.mkdir()
    if PLANT_PLACES[place] == "before start":
        pending_on_disk(covers, "X", url)
        plant_entry(covers / place, kind, outside)
    receiver = start(*allow_loopback())
    if PLANT_PLACES[place] == "running":
        plant_entry(covers / place, kind, outside)
    code, _, _ = post(receiver.url, payload("X", [url]))
    assert code == 200
    assert wait_status(receiver.dir, "X", "done")
    assert read(os.path.join(receiver.dir, "X", "cover_1.png")) == PNG
    assert snapshot(outside) == {"keep": b"keep"}
    assert not [r for r in caplog.records if "crashed" in r.getMessage()
                or r.exc_info is not None]


@pytest.mark.skipif(WINDOWS or os.geteuid() != 0, reason="switching users needs root on POSIX")
def test_retry_from_a_root_shell_leaves_files_owned_by_the_service_user(cdn):
    nobody = 65534
    top = tempfile.mkdtemp(prefix="cover-owner-")     # pytest's tmp_path is root-only (0700)
    try:
        os.chmod(top, 0o755)
        script = os.path.join(top, "cover_receiver.py")
        shutil.copy(SCRIPT, script)
        folder = os.path.join(top, "c")
        os.mkdir(folder)
        os.chown(folder, nobody, nobody)
        args = serve_args(folder, "--allow-host", "127.0.0.1")
        serve = ReceiverProcess(args, command=[python_for(nobody), script] + args,
                                user=nobody, group=nobody, extra_groups=[])
        try:
            post(serve.url, payload("owned", [cdn.route("/w.png", status(404), ok(PNG))]))
            wait_status(folder, "owned", "failed")
            result = run_cli("retry", "owned", "--dir", folder)      # as root
            assert result.returncode == 0, result.stdout + result.stderr
            wait_for(lambda: os.path.exists(os.path.join(folder, "owned", "task.json")),
                     what="the manifest")
            for name in ("cover_1.png", "task.json"):
                assert os.stat(os.path.join(folder, "owned", name)).st_uid == nobody
            assert run_cli("expect", "later", "--dir", folder).returncode == 0     # as root
        finally:
            assert serve.stop() == 0
        # With no serve running, a root command opens the database itself: as its owner.
        assert run_cli("expect", "after", "--dir", folder).returncode == 0
        assert run_cli("status", "--dir", folder).returncode == 0
        for name in os.listdir(folder):
            assert os.stat(os.path.join(folder, name)).st_uid == nobody, name
    finally:
        shutil.rmtree(top)
