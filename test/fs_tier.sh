#!/usr/bin/env bash
# File-system tier (issue 21 item 1): a kernel file system on `pcache serve`, killed.
#
# Stack: pcache serve (release binary; medium in /dev/shm with --persistence volatile,
# which survives a killed process; a cache of FS_CACHE, default 64M, in front of a
# larger sparse backing file) -> nbdfuse (the NBD export as a file) -> losetup (a block
# device) -> ext4 / xfs. Per file system: mkfs once, then FS_CYCLES cycles of
#   mount; run test/fs_workload.py (creates, appends, renames, unlinks, each fsync'd
#   and logged with its SHA-256 to a manifest outside the file system, plus bulk
#   writes that fill the cache); kill -9 pcache at a moment that rotates between
#   random, "while writeback runs" and "while the cache is full" (a writer waiting
#   for space or paced above the GC watermark), polled from the control socket;
#   restart serve on the same medium; restart nbdfuse (it exits when its server
#   goes away); losetup; mount (journal replay); every fsync'd file present
#   with its checksum, every fsync'd unlink/rename away absent; umount; fsck.ext4 -fn /
#   xfs_repair -n clean.
# Prints `fs cycles: N, fsck clean: N, fsynced files verified: N` (checks summed over
# the cycles: a file fsync'd in an early cycle is checked again after every later
# kill) and exits non-zero
# on any mismatch, unclean fsck or failed step. Prints a `SKIP: fs tier: <reason>`
# line instead when the container cannot run it (not root, no FUSE, no loop devices,
# missing tools). Cleans up mounts, loop devices, FUSE mounts and processes on any
# exit (trap). Stops starting cycles after FS_TIME_BOX seconds (default 170; CI).
#
# Usage: bash test/fs_tier.sh                       # CI: 3 cycles per fs
#        FS_CYCLES=100 FS_TIME_BOX=0 bash test/fs_tier.sh   # soak (0 = no time box)
# Env: FS_TYPES ("ext4 xfs"), FS_CYCLES (3), FS_CACHE (64M), FS_BACKING_MB (512),
#      FS_SEED (random; printed), FS_TIME_BOX (170), PCACHE_BIN (release binary under
#      CARGO_TARGET_DIR or target/, built if missing), FS_KEEP=1 keeps the work dir,
#      FS_FAULT=drop-cache (a self-test of the checks: the medium is deleted after each
#      kill, as a cache that lost its dirty data; the run must then fail).
set -uo pipefail
cd "$(dirname "$0")/.."

FS_TYPES="${FS_TYPES:-ext4 xfs}"
FS_CYCLES="${FS_CYCLES:-3}"
FS_CACHE="${FS_CACHE:-64M}"
FS_BACKING_MB="${FS_BACKING_MB:-512}"
FS_TIME_BOX="${FS_TIME_BOX:-170}"
FS_SEED="${FS_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
BIN="${PCACHE_BIN:-$target/release/pcache}"
HERE="$PWD/test"

skip() {
  echo "SKIP: fs tier: $*"
  exit 0
}

# --- can this container run it? -----------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root (loop devices, mount)"
for t in nbdfuse fusermount3 losetup mount umount python3 sha256sum; do
  command -v "$t" >/dev/null || skip "$t not installed (apt-get install fuse3 libnbd-bin)"
done
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || skip "/dev/fuse missing and modprobe fuse failed"
losetup -f >/dev/null 2>&1 || modprobe loop 2>/dev/null || true
losetup -f >/dev/null 2>&1 || skip "no free loop device (losetup -f failed)"
fs_ok=()
for fs in $FS_TYPES; do
  case $fs in
    ext4) tools="mkfs.ext4 fsck.ext4" ;;
    xfs) tools="mkfs.xfs xfs_repair" ;;
    *) echo "fs tier: unknown file system $fs"; exit 1 ;;
  esac
  miss=""
  for t in $tools; do command -v "$t" >/dev/null || miss="$miss $t"; done
  grep -qw "$fs" /proc/filesystems || modprobe "$fs" 2>/dev/null || true
  if [ -n "$miss" ]; then
    echo "SKIP: fs tier: $fs: missing$miss"
  elif ! grep -qw "$fs" /proc/filesystems; then
    echo "SKIP: fs tier: $fs: not supported by this kernel"
  else
    fs_ok+=("$fs")
  fi
done
[ ${#fs_ok[@]} -gt 0 ] || skip "no usable file system among: $FS_TYPES"
if [ ! -x "$BIN" ]; then
  echo "fs tier: building the release binary"
  cargo build --release --bin pcache >/dev/null || { echo "fs tier: build failed"; exit 1; }
fi

# --- state and cleanup ----------------------------------------------------------------
W=$(mktemp -d /var/tmp/pcache-fs.XXXXXX)
PMEM="/dev/shm/pcache-fs-$$.pmem"
SOCK="$W/nbd.sock"
MNT="$W/mnt"
FUSE="$W/fuse"
mkdir -p "$MNT" "$FUSE"
SERVE_PID="" FUSE_PID="" WL_PID="" LOOP=""

# Whether `dir` is a mount point, from /proc/mounts: `mountpoint` stats the directory,
# which fails on a FUSE mount whose daemon is gone (ENOTCONN), the case that matters.
mounted() {
  awk -v d="$1" '$2 == d { found = 1 } END { exit !found }' /proc/mounts
}

teardown_stack() {
  # Everything above pcache, top down; tolerant of a dead server (lazy unmounts).
  if [ -n "$WL_PID" ]; then kill -9 "$WL_PID" 2>/dev/null; wait "$WL_PID" 2>/dev/null; WL_PID=""; fi
  if mounted "$MNT"; then umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null; LOOP=""; fi
  if mounted "$FUSE"; then fusermount3 -u "$FUSE" 2>/dev/null || fusermount3 -uz "$FUSE" 2>/dev/null; fi
  if [ -n "$FUSE_PID" ]; then
    for _ in $(seq 50); do kill -0 "$FUSE_PID" 2>/dev/null || break; sleep 0.1; done
    # nbdfuse aborts (SIGABRT) when its server dies: expected, and not worth the
    # shell's "Aborted" notice, hence the braces.
    kill -9 "$FUSE_PID" 2>/dev/null
    { wait "$FUSE_PID"; } 2>/dev/null
    FUSE_PID=""
  fi
}

cleanup() {
  teardown_stack
  if [ -n "$SERVE_PID" ]; then
    kill "$SERVE_PID" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVE_PID" 2>/dev/null; wait "$SERVE_PID" 2>/dev/null
  fi
  if [ "${FS_KEEP:-0}" = 1 ]; then
    echo "fs tier: kept $W and $PMEM"
  else
    rm -rf "$W" "$PMEM" "$PMEM.ctl"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
  echo "fs tier: FAILED: $*"
  echo "--- serve log tail"; tail -20 "$W/serve.log" 2>/dev/null
  echo "--- shell stderr tail"; tail -10 "$W/shell.log" 2>/dev/null
  echo "--- kernel log tail"; dmesg 2>/dev/null | tail -15
  exit 1
}

# --- the stack -----------------------------------------------------------------------
start_serve() {
  local tries=0
  while :; do
    rm -f "$SOCK"
    "$BIN" serve --pmem "$PMEM" --backing "$W/backing" --persistence volatile \
      --pmem-size "$FS_CACHE" --nbd-socket "$SOCK" --cores 1 >>"$W/serve.log" 2>&1 &
    SERVE_PID=$!
    for _ in $(seq 300); do
      [ -S "$SOCK" ] && break
      kill -0 "$SERVE_PID" 2>/dev/null || break
      sleep 0.1
    done
    if [ -S "$SOCK" ] && kill -0 "$SERVE_PID" 2>/dev/null; then return 0; fi
    wait "$SERVE_PID" 2>/dev/null
    SERVE_PID=""
    tries=$((tries + 1))
    # The killed instance's flock on the backing file can outlive it for a few ms
    # (test/embedded.rs restart_right_after_kill9_is_not_refused): retry that only.
    if tail -5 "$W/serve.log" | grep -q "flock held" && [ $tries -lt 100 ]; then
      sleep 0.05
      continue
    fi
    fail "pcache serve did not start"
  done
}

start_block() {
  nbdfuse "$FUSE/disk" --unix "$SOCK" >>"$W/nbdfuse.log" 2>&1 &
  FUSE_PID=$!
  for _ in $(seq 100); do [ -e "$FUSE/disk" ] && break; sleep 0.1; done
  [ -e "$FUSE/disk" ] || fail "nbdfuse did not expose $FUSE/disk"
  LOOP=$(losetup -f --show --direct-io=on "$FUSE/disk" 2>/dev/null || losetup -f --show "$FUSE/disk") ||
    fail "losetup on the nbdfuse file failed"
}

mount_fs() {
  local opts=""
  # The previous incarnation may still be lazily unmounted with the same UUID.
  [ "$1" = xfs ] && opts="-o nouuid"
  # shellcheck disable=SC2086
  mount -t "$1" $opts "$LOOP" "$MNT" 2>>"$W/mount.log" || fail "mount -t $1 $LOOP (journal replay) failed: $(tail -3 "$W/mount.log")"
}

fsck_clean() {
  local out rc
  if [ "$1" = ext4 ]; then
    out=$(fsck.ext4 -fn "$LOOP" 2>&1); rc=$?
  else
    out=$(xfs_repair -n "$LOOP" 2>&1); rc=$?
  fi
  if [ $rc != 0 ]; then
    echo "$out" | tail -30
    return 1
  fi
}

ctl_status() {
  # One field of the running serve's status, through its control socket.
  python3 - "$PMEM.ctl" "$1" <<'EOF' 2>/dev/null || echo -1
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
s.sendall(b'{"cmd":"status"}\n')
buf = b""
while not buf.endswith(b"\n"):
    c = s.recv(65536)
    if not c:
        break
    buf += c
print(json.loads(buf)[sys.argv[2]])
EOF
}

# Waits for the kill moment of `kind`: random, writeback (writeback_ksets grows) or
# full (cache_full_events grows or requests wait for space). Prints what it saw.
wait_kill_moment() {
  local kind=$1 deadline=$((SECONDS + 25)) wb0 full0
  case $kind in
    random)
      sleep "$(python3 -c "import random; print(random.Random($2).uniform(1.0, 7.0))")"
      echo "at a random moment" ;;
    writeback)
      sleep 1
      wb0=$(ctl_status writeback_ksets)
      while [ $SECONDS -lt $deadline ]; do
        [ "$(ctl_status writeback_ksets)" -gt "$wb0" ] && { echo "during writeback (writeback_ksets $wb0 -> more)"; return; }
        sleep 0.05
      done
      echo "at the deadline (writeback not seen)" ;;
    full)
      # Held writers count: a request waiting for space, or paced at writeback's
      # speed above the GC watermark, is a writer the full cache stopped.
      full0=$(ctl_status cache_full_events)
      paced0=$(ctl_status paced_writes)
      while [ $SECONDS -lt $deadline ]; do
        f=$(ctl_status cache_full_events) p=$(ctl_status paced_writes) q=$(ctl_status waiting_requests)
        if [ "$f" -gt "$full0" ] || [ "$p" -gt "$paced0" ] || [ "$q" -gt 0 ]; then
          echo "with writers held for space (cache_full_events $full0 -> $f, paced_writes $paced0 -> $p, waiting $q)"
          return
        fi
        sleep 0.05
      done
      echo "at the deadline (cache full not seen)" ;;
  esac
}

# --- the cycles ----------------------------------------------------------------------
# From here the shell's own stderr goes to a log: bash reports every nbdfuse that
# aborted on its server's death ("Aborted"), which is expected; fail() shows the log.
exec 2>>"$W/shell.log"
echo "fs tier: $BIN, cache $FS_CACHE in /dev/shm, backing ${FS_BACKING_MB} MiB, seed $FS_SEED, file systems: ${fs_ok[*]}, $FS_CYCLES cycles each"
cycles=0 clean=0 verified=0 boxed=0
declare -A moments=()
start=$SECONDS
kinds=(random writeback full)
for fs in "${fs_ok[@]}"; do
  rm -f "$PMEM" "$PMEM.ctl" "$W/backing" "$W/manifest.$fs"
  truncate -s "${FS_BACKING_MB}M" "$W/backing"
  start_serve
  start_block
  if [ "$fs" = ext4 ]; then
    mkfs.ext4 -q -F "$LOOP" >"$W/mkfs.log" 2>&1 || fail "mkfs.ext4: $(tail -3 "$W/mkfs.log")"
  else
    mkfs.xfs -q -f "$LOOP" >"$W/mkfs.log" 2>&1 || fail "mkfs.xfs: $(tail -3 "$W/mkfs.log")"
  fi
  mount_fs "$fs"
  for c in $(seq "$FS_CYCLES"); do
    if [ "$FS_TIME_BOX" -gt 0 ] && [ $((SECONDS - start)) -ge "$FS_TIME_BOX" ]; then
      boxed=1
      echo "fs tier: time box of ${FS_TIME_BOX}s reached; no more cycles"
      break
    fi
    seed=$((FS_SEED + cycles))
    kind=${kinds[$((cycles % 3))]}
    t0=$SECONDS
    python3 "$HERE/fs_workload.py" run "$MNT" "$W/manifest.$fs" "c$c" "$seed" 2>>"$W/workload.log" &
    WL_PID=$!
    moment=$(wait_kill_moment "$kind" "$seed")
    kill -0 "$WL_PID" 2>/dev/null || fail "the workload died before the kill: $(tail -5 "$W/workload.log")"
    kill -9 "$SERVE_PID"
    wait "$SERVE_PID" 2>/dev/null
    SERVE_PID=""
    teardown_stack
    [ "${FS_FAULT:-}" = drop-cache ] && rm -f "$PMEM"
    start_serve
    start_block
    mount_fs "$fs"
    out=$(python3 "$HERE/fs_workload.py" verify "$MNT" "$W/manifest.$fs") || {
      echo "$out" | head -20
      fail "$fs cycle $c: fsync'd files differ after replay"
    }
    n=$(echo "$out" | awk '/^verified/ { print $2 }')
    umount "$MNT" || fail "umount after replay"
    cycles=$((cycles + 1))
    if fsck_clean "$fs"; then
      clean=$((clean + 1))
      verdict="fsck clean"
    else
      verdict="FSCK NOT CLEAN"
    fi
    verified=$((verified + n))
    case $moment in
      *deadline*) moments[missed]=$((${moments[missed]:-0} + 1)) ;;
      *) moments[$kind]=$((${moments[$kind]:-0} + 1)) ;;
    esac
    echo "fs $fs cycle $c: killed pcache $moment after $((SECONDS - t0)) s; replayed; $out; $verdict"
    [ "$verdict" = "fsck clean" ] || fail "$fs cycle $c: fsck not clean"
    mount_fs "$fs"
  done
  teardown_stack
  kill "$SERVE_PID" && wait "$SERVE_PID" 2>/dev/null
  SERVE_PID=""
  [ $boxed = 1 ] && break
done
echo "fs tier: kill moments: random ${moments[random]:-0}, during writeback ${moments[writeback]:-0}, cache full or pacing writers ${moments[full]:-0}, condition not seen (killed at the deadline) ${moments[missed]:-0}; $((SECONDS - start)) s"
echo "fs cycles: $cycles, fsck clean: $clean, fsynced files verified: $verified"
[ "$cycles" -gt 0 ] && [ "$clean" = "$cycles" ] && [ "$verified" -gt 0 ]
