#!/usr/bin/env bash
# The README's systemd claims, checked under a real systemd: build a minimal
# Debian rootfs, boot it with systemd-nspawn, install the receiver by running
# the README's install block and systemd/README.md's socket block, then check
# READY=1, a callback saved under StateDirectory= as the dynamic user, the hook
# in the sandbox, systemctl reload, retry from a root shell handing its work
# to the service, a watchdog restart after SIGSTOP, a token from
# LoadCredential=, the journal's identifier and priorities, exit 2 stopping the
# unit, a draining stop with status 0, and socket activation. Outside CI it
# skips with one line when no container can boot here; in CI (CI=true) that is
# a failure. Everything is removed at exit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /var/tmp/cover-receiver-check.XXXXXX)
rootfs=$work/rootfs
nspawn_pid=""
leader=""

cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true      # nspawn powers the container off
        for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

cannot() {      # this machine cannot run the check
    if [ "${CI:-}" = true ]; then echo "systemd check: FAILED: $1" >&2; exit 1; fi
    echo "systemd check: skipped: $1"
    exit 0
}
fail() {
    echo "systemd check: FAILED: $1" >&2
    [ -z "$leader" ] || { journal > "$work/journal.txt" || true; tail -n 20 "$work/journal.txt" >&2; }
    exit 1
}
ok() { echo "systemd check: ok: $1"; }
inside() { nsenter -t "$leader" -a /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
prop() { inside systemctl show -P "$2" "$1"; }
journal() { inside journalctl -u cover-receiver --no-pager -o cat; }   # read whole: no SIGPIPE
journal_has() { journal > "$work/journal.txt"; grep -q -- "$1" "$work/journal.txt"; }
is_active() { [ "$(prop cover-receiver ActiveState)" = active ]; }
restarted_after() { [ "$(prop cover-receiver NRestarts)" -gt "$1" ]; }
wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...: poll a condition with a deadline
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for $what"
        sleep 0.2
    done
}
readme_block() {  # the first ```sh block after the heading $1 in the file $2, sudo dropped, interactive lines left out
    awk -v heading="$1" '
        $0 == heading { found = 1; next }
        found && /^```sh/ { inblock = 1; next }
        inblock && /^```/ { exit }
        inblock { sub(/^sudo /, ""); gsub(/\| sudo /, "| "); gsub(/&& sudo /, "\\&\\& ");
                  if ($0 !~ /^(systemctl status|journalctl)/) print }' "$2"
}

command -v systemd-nspawn >/dev/null && command -v debootstrap >/dev/null \
    || cannot "systemd-nspawn and debootstrap are not installed"
[ "$(id -u)" = 0 ] || cannot "needs root"

# The mirror this machine's apt already uses (no package host is written here).
mirror=$(bash "$repo/.ci/mirror") || cannot "no Debian mirror in the apt sources"
echo "systemd check: building a Debian rootfs (a few minutes)"
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,curl,ca-certificates \
    bookworm "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 5 "$work/debootstrap.log"; cannot "debootstrap failed"; }
echo "127.0.0.1 localhost" > "$rootfs/etc/hosts"      # minbase has none
echo cover-check > "$rootfs/etc/hostname"
mkdir -p "$rootfs/root/src/systemd" "$rootfs/root/image"
cp "$repo/cover_receiver.py" "$rootfs/root/src/"
cp "$repo"/systemd/cover-receiver.* "$rootfs/root/src/systemd/"
readme_block "## Install as a service" "$repo/README.md" > "$rootfs/root/src/install.sh"
readme_block "## Socket activation" "$repo/systemd/README.md" > "$rootfs/root/src/socket.sh"
[ -s "$rootfs/root/src/install.sh" ] && [ -s "$rootfs/root/src/socket.sh" ] \
    || fail "README.md has no install or socket block"
python3 -c 'import sys; sys.stdout.buffer.write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)' \
    > "$rootfs/root/image/c.png"

systemd-nspawn --boot --private-network --register=no --keep-unit -D "$rootfs" -M cover-check \
    > "$work/boot.log" 2>&1 &
nspawn_pid=$!
for _ in $(seq 150); do
    leader=$(pgrep -P "$nspawn_pid" | head -n 1 || true)
    [ -n "$leader" ] && inside systemctl is-system-running >/dev/null 2>&1 && break
    kill -0 "$nspawn_pid" 2>/dev/null || { tail -n 5 "$work/boot.log"; cannot "systemd-nspawn cannot boot a container here"; }
    sleep 0.2
done
state=$(inside systemctl is-system-running --wait || true)
case "$state" in running|degraded) ok "container booted (systemd $(inside systemctl --version | awk 'NR == 1 { print $2 }'), $state)";;
    *) cannot "the container did not boot: $state";; esac

# 1. Install exactly as the README says; Type=notify is active only after READY=1.
inside sh -ec "cd /root/src && . ./install.sh" > "$work/install.log" 2>&1 || { cat "$work/install.log"; fail "the README's install steps"; }
wait_until 20 "the service to be active" is_active
[ "$(prop cover-receiver Type)" = notify ] || fail "Type=notify"
case "$(prop cover-receiver StatusText)" in *pending*) ;; *) fail "no STATUS= from the receiver";; esac
ok "active (running) through READY=1: $(prop cover-receiver StatusText)"
journal > "$work/journal.txt"
grep -m 1 "listening" "$work/journal.txt" | sed 's/^/systemd check:   /'

# 2. A callback saved under the StateDirectory as the dynamic user, and the hook in the sandbox.
inside systemd-run --unit cover-check-cdn -q /usr/bin/python3 -m http.server 8000 --bind 127.0.0.1 --directory /root/image
cat > "$rootfs/opt/cover-receiver/hook" <<'EOF'
#!/bin/sh
echo "$COVER_TASK_ID $COVER_TASK_STATUS $(id -u)" > "$1/hook-ran"
EOF
chmod 755 "$rootfs/opt/cover-receiver/hook"
printf 'COVER_RECEIVER_ALLOW_HOST=127.0.0.1\nCOVER_RECEIVER_ON_COMPLETE=/opt/cover-receiver/hook\n' \
    >> "$rootfs/etc/cover-receiver/env"
inside systemctl restart cover-receiver
token=$(sed -n 's/^COVER_RECEIVER_TOKEN=//p' "$rootfs/etc/cover-receiver/env")
post() {
    inside curl -s --max-time 10 -H 'Content-Type: application/json' --data "$2" \
        "http://127.0.0.1:3000/suno-cover-callback?token=$1"
}
body='{"code": 200, "msg": "success", "data": {"taskId": "check1", "images": ["http://127.0.0.1:8000/c.png"]}}'
wait_until 20 "the cdn" inside curl -sf http://127.0.0.1:8000/c.png -o /dev/null
answer=$(post "$token" "$body")
[ "$answer" = '{"status": "received", "taskId": "check1"}' ] || fail "callback answered: $answer"
saved=$rootfs/var/lib/private/cover-receiver/check1
wait_until 20 "the cover" test -s "$saved/cover_1.png"
cmp -s "$saved/cover_1.png" "$rootfs/root/image/c.png" || fail "the cover is not byte-exact"
owner=$(stat -c %u "$saved/cover_1.png")
[ "$owner" != 0 ] || fail "the cover belongs to root, not to a dynamic user"
ok "callback saved byte-exact in /var/lib/cover-receiver/check1 as dynamic uid $owner"
wait_until 20 "the hook" test -s "$saved/hook-ran"
[ "$(cat "$saved/hook-ran")" = "check1 done $owner" ] || fail "hook wrote: $(cat "$saved/hook-ran")"
ok "the hook ran in the sandbox: $(cat "$saved/hook-ran")"
[ "$(post wrong "$body")" != "" ] || fail "no answer to a wrong token"

# 3. systemctl reload (SIGHUP) looks at the folder and keeps the process.
pid=$(prop cover-receiver MainPID)
inside systemctl reload cover-receiver
wait_until 10 "the reload in the journal" journal_has "reload note="
is_active && [ "$(prop cover-receiver MainPID)" = "$pid" ] || fail "reload stopped the service"
ok "systemctl reload: rescan logged, same process (pid $pid)"

# 4. retry from a root shell, with none of the unit's settings: the service does the
#    work (its --allow-host), and the files belong to its dynamic user, not to root.
post "$token" '{"code": 200, "msg": "success", "data": {"taskId": "check3", "images": ["http://127.0.0.1:8000/later.png"]}}' > /dev/null
wait_until 20 "check3 to fail (404)" grep -q '"status": "failed"' "$rootfs/var/lib/private/cover-receiver/check3/task.json"
cp "$rootfs/root/image/c.png" "$rootfs/root/image/later.png"          # the host is fixed
answer=$(inside python3 /opt/cover-receiver/cover_receiver.py retry --dir /var/lib/cover-receiver check3) \
    || fail "retry from a root shell: $answer"
case "$answer" in "check3 done: 1 covers"*) ;; *) fail "retry answered: $answer";; esac
retried=$rootfs/var/lib/private/cover-receiver/check3
cmp -s "$retried/cover_1.png" "$rootfs/root/image/c.png" || fail "the retried cover is not byte-exact"
[ "$(stat -c %u "$retried/cover_1.png")" = "$owner" ] && [ "$(stat -c %u "$retried/task.json")" = "$owner" ] \
    || fail "retry left files owned by uid $(stat -c %u "$retried/cover_1.png"), not $owner"
journal_has "requested task=check3" || fail "the service did not take the retry"
ok "retry from a root shell: done by the service, files owned by dynamic uid $owner"

# 5. A wedged process (SIGSTOP) is restarted by the watchdog.
mkdir -p "$rootfs/etc/systemd/system/cover-receiver.service.d"
printf '[Service]\nWatchdogSec=3\n' > "$rootfs/etc/systemd/system/cover-receiver.service.d/check.conf"
inside systemctl daemon-reload
inside systemctl restart cover-receiver
wait_until 20 "the service to be active" is_active
before=$(prop cover-receiver MainPID)
restarts=$(prop cover-receiver NRestarts)
inside systemctl kill --kill-who=main -s SIGSTOP cover-receiver
wait_until 40 "a watchdog restart" restarted_after "$restarts"
wait_until 20 "the restarted service" is_active
[ "$(prop cover-receiver MainPID)" != "$before" ] || fail "the same process still runs"
inside journalctl -u cover-receiver --no-pager > "$work/journal.txt"
grep -q "Watchdog timeout" "$work/journal.txt" || fail "no watchdog timeout in the journal"
ok "SIGSTOP: watchdog timeout, restarted (pid $before -> $(prop cover-receiver MainPID))"
rm -r "$rootfs/etc/systemd/system/cover-receiver.service.d"
inside systemctl daemon-reload

# 6. A token root alone can read, through LoadCredential=: it wins over the env file's.
dropin=$rootfs/etc/systemd/system/cover-receiver.service.d
mkdir -p "$dropin"
printf 'credential-token-%s\n' "$RANDOM$RANDOM" > "$rootfs/etc/cover-receiver/token"
chmod 600 "$rootfs/etc/cover-receiver/token"
printf '[Service]\nLoadCredential=token:/etc/cover-receiver/token\n' > "$dropin/check.conf"
inside systemctl daemon-reload
inside systemctl restart cover-receiver
wait_until 20 "the service to be active" is_active
cred=$(head -n 1 "$rootfs/etc/cover-receiver/token")
answer=$(post "$cred" '{"code": 501, "msg": "x", "data": {"taskId": "check4", "images": null}}')
[ "$answer" = '{"status": "received", "taskId": "check4"}' ] || fail "the credential's token: $answer"
case "$(post "$token" '{"code": 501, "msg": "x", "data": {"taskId": "check5", "images": null}}')" in
    *401*|*token*) ;; *) fail "the env file's token still works beside the credential";; esac
ok "LoadCredential=token: read by the dynamic user from a root-only file (600), and it wins"

# 7. The journal: lines named cover-receiver, warnings at priority 4. With no token the
#    receiver warns "unprotected"; journalctl -p warning must show it.
grep -v '^COVER_RECEIVER_TOKEN=' "$rootfs/etc/cover-receiver/env" > "$work/env.open"
cp "$rootfs/etc/cover-receiver/env" "$work/env.saved"
cp "$work/env.open" "$rootfs/etc/cover-receiver/env"
rm "$dropin/check.conf"
inside systemctl daemon-reload
inside systemctl restart cover-receiver
wait_until 20 "the service to be active" is_active
warnings() { inside journalctl -u cover-receiver -p warning --no-pager -o cat > "$work/warnings.txt"; grep -q "WARNING unprotected" "$work/warnings.txt"; }
wait_until 10 "the unprotected warning at priority warning" warnings
grep -q "INFO listening" "$work/warnings.txt" && fail "journalctl -p warning shows INFO lines"
inside journalctl -t cover-receiver --no-pager -o cat > "$work/named.txt"
grep -q "INFO listening" "$work/named.txt" || fail "no line named cover-receiver (SyslogIdentifier=)"
ok "journal: identifier cover-receiver; journalctl -p warning shows unprotected, not INFO lines"
cp "$work/env.saved" "$rootfs/etc/cover-receiver/env"

# 8. A bad setting (exit 2) stops the unit at once: no restart loop, its reason last.
printf '[Service]\nEnvironment=COVER_RECEIVER_PORT=not-a-port\n' > "$dropin/check.conf"
inside systemctl daemon-reload
restarts=$(prop cover-receiver NRestarts)
inside systemctl restart cover-receiver 2>/dev/null || true   # it fails: that is the point
failed() { [ "$(prop cover-receiver ActiveState)" = failed ]; }
wait_until 20 "the unit to fail" failed
[ "$(prop cover-receiver ExecMainStatus)" = 2 ] && [ "$(prop cover-receiver NRestarts)" = "$restarts" ] \
    || fail "exit 2: status $(prop cover-receiver ExecMainStatus), restarts $(prop cover-receiver NRestarts)"
last=$(inside journalctl -t cover-receiver -n 1 --no-pager -o cat)
case "$last" in *"error: --port"*) ;; *) fail "the last line is not the reason: $last";; esac
ok "exit 2 stops the unit, no restart; last line: $last"
rm -r "$dropin"
inside systemctl daemon-reload
inside systemctl reset-failed cover-receiver
inside systemctl start cover-receiver
wait_until 20 "the service to be active" is_active

# 9. systemctl stop drains and exits 0.
inside systemctl stop cover-receiver
[ "$(prop cover-receiver Result)" = success ] && [ "$(prop cover-receiver ExecMainStatus)" = 0 ] \
    || fail "stop: Result=$(prop cover-receiver Result) status=$(prop cover-receiver ExecMainStatus)"
journal_has "stopped pending=0" || fail "no drained stop in the journal"
ok "systemctl stop: drained, exit status 0"

# 10. Socket activation, by systemd/README.md's socket block: the first POST starts the service.
inside systemctl start cover-receiver
inside sh -ec "cd /root/src && . ./socket.sh" > "$work/socket.log" 2>&1 || { cat "$work/socket.log"; fail "the README's socket steps"; }
[ "$(prop cover-receiver.socket ActiveState)" = active ] || fail "the socket is not listening"
[ "$(prop cover-receiver ActiveState)" = inactive ] || fail "the service runs before any connection"
answer=$(post "$token" '{"code": 501, "msg": "x", "data": {"taskId": "check2", "images": null}}')
[ "$answer" = '{"status": "received", "taskId": "check2"}' ] || fail "socket-activated answer: $answer"
[ "$(prop cover-receiver ActiveState)" = active ] || fail "the first POST did not start the service"
ok "socket activation: socket alone, then the first POST started the service and got 200"
echo "systemd check: passed"
