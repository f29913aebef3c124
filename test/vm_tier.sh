#!/usr/bin/env bash
# VM tier (issue 21 item 2, as a script; not in CI): a real Linux guest (QEMU TCG,
# Debian's cloud kernel, a busybox initramfs) whose virtio-blk disk is `pcache serve`'s
# NBD export, through QEMU's NBD client with reconnect-delay, so the VM keeps running
# while pcache is killed with SIGKILL and restarted under it.
#
# The guest writes VM_RECORDS records of 64 KiB of random data at distinct offsets,
# each with `dd conv=fsync` (virtio-blk FLUSH -> NBD FLUSH), and prints
# `DURABLE <i> <offset> <sha256>` on its serial console only after the fsync returned.
# Meanwhile the host kills pcache VM_KILLS times (after a random share of the records)
# and restarts it on the same medium; QEMU reconnects and reruns what was in flight.
# At the end the guest reads every record back and prints `GUEST-VERIFY ok N` (or the
# bad ones) and powers off; then the host stops pcache, writes everything back offline
# (`pcache flush`) and checks every DURABLE record on the backing file itself.
# Prints `vm kills: K, records durable: N, verified by the guest: N, verified on the
# backing device: N` and exits non-zero on any mismatch.
#
# SKIP line (exit 0) when not root or when qemu-system-x86_64, a /boot/vmlinuz-* with
# virtio modules, busybox (static) or cpio is missing; install them with
#   apt-get install qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio
# The same guest over spdk_tgt's vhost-user-blk is not done here (it needs the SPDK
# module's build; see test/spdk/).
#
# Usage: bash test/vm_tier.sh     Env: VM_RECORDS (300), VM_KILLS (3), VM_SEED,
#        VM_TIMEOUT (900 s), PCACHE_BIN, VM_KEEP=1 keeps the work directory,
#        VM_FAULT=drop-cache (self-test: the medium is deleted at each kill, losing the
#        dirty data; the run must then fail).
set -uo pipefail
cd "$(dirname "$0")/.."

VM_RECORDS="${VM_RECORDS:-300}"
VM_KILLS="${VM_KILLS:-3}"
VM_SEED="${VM_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
VM_TIMEOUT="${VM_TIMEOUT:-900}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
BIN="${PCACHE_BIN:-$target/release/pcache}"

skip() {
  echo "SKIP: vm tier: $*"
  exit 0
}
# shellcheck source=test/vm_guest.sh
. test/vm_guest.sh
vm_guest_prereqs virtio_pci virtio_blk
if [ ! -x "$BIN" ]; then
  cargo build --release --bin pcache >/dev/null || { echo "vm tier: build failed"; exit 1; }
fi

W=$(mktemp -d /var/tmp/pcache-vm.XXXXXX)
PMEM="/dev/shm/pcache-vm-$$.pmem"
SOCK="$W/nbd.sock"
SERVE_PID="" QEMU_PID=""
cleanup() {
  [ -n "$QEMU_PID" ] && kill -9 "$QEMU_PID" 2>/dev/null
  if [ -n "$SERVE_PID" ]; then kill -9 "$SERVE_PID" 2>/dev/null; fi
  wait 2>/dev/null
  if [ "${VM_KEEP:-0}" = 1 ]; then echo "vm tier: kept $W"; else rm -rf "$W" "$PMEM" "$PMEM.ctl"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() {
  echo "vm tier: FAILED: $*"
  echo "--- console tail"; tail -20 "$W/console.log" 2>/dev/null
  echo "--- serve log tail"; tail -10 "$W/serve.log" 2>/dev/null
  exit 1
}

# --- the guest: busybox, the virtio modules, and an init that writes and verifies --
vm_guest_root "$W/root"
cat >"$W/root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $VM_MOD_ORDER; do insmod \$m; done
n=\$(sed -n 's/.*vm_records=\([0-9]*\).*/\1/p' /proc/cmdline)
seed=\$(sed -n 's/.*vm_seed=\([0-9]*\).*/\1/p' /proc/cmdline)
for _ in \$(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo GUEST-NO-DISK; poweroff -f; }
echo GUEST-START
i=0
while [ \$i -lt \$n ]; do
  off=\$(( (i * 37 + seed) % 2000 ))
  dd if=/dev/urandom of=/rec bs=65536 count=1 2>/dev/null
  if dd if=/rec of=/dev/vda bs=65536 seek=\$off conv=fsync,notrunc 2>/dev/null; then
    echo "DURABLE \$i \$off \$(sha256sum /rec | cut -d' ' -f1)" | tee -a /records
  else
    echo "GUEST-WRITE-ERROR \$i"
  fi
  i=\$((i + 1))
done
echo 3 > /proc/sys/vm/drop_caches
ok=0 bad=0
while read -r _ i off sha; do
  got=\$(dd if=/dev/vda bs=65536 skip=\$off count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ "\$got" = "\$sha" ]; then ok=\$((ok + 1)); else bad=\$((bad + 1)); echo "GUEST-BAD \$i \$off"; fi
done < /records
echo "GUEST-VERIFY ok \$ok bad \$bad"
echo GUEST-DONE
poweroff -f
EOF
vm_guest_initrd "$W/root" "$W/initrd.gz" || fail "initramfs"

# --- pcache and the VM ---------------------------------------------------------------
truncate -s 256M "$W/backing"
start_serve() {
  local tries=0
  while :; do
    rm -f "$SOCK"
    "$BIN" serve --pmem "$PMEM" --backing "$W/backing" --persistence volatile \
      --pmem-size 64M --nbd-socket "$SOCK" --cores 1 >>"$W/serve.log" 2>&1 &
    SERVE_PID=$!
    for _ in $(seq 300); do
      [ -S "$SOCK" ] && break
      kill -0 "$SERVE_PID" 2>/dev/null || break
      sleep 0.1
    done
    [ -S "$SOCK" ] && kill -0 "$SERVE_PID" 2>/dev/null && return 0
    wait "$SERVE_PID" 2>/dev/null
    SERVE_PID=""
    tries=$((tries + 1))
    tail -5 "$W/serve.log" | grep -q "flock held" && [ $tries -lt 100 ] && { sleep 0.05; continue; }
    fail "pcache serve did not start"
  done
}
start_serve
echo "vm tier: $KERNEL, $VM_RECORDS records, $VM_KILLS kills, seed $VM_SEED"
qemu-system-x86_64 -machine q35 -accel tcg -m 256 -smp 1 -display none -monitor none \
  -no-reboot -kernel "$KERNEL" -initrd "$W/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 vm_records=$VM_RECORDS vm_seed=$VM_SEED" \
  -blockdev "driver=nbd,node-name=disk0,server.type=unix,server.path=$SOCK,reconnect-delay=120" \
  -device virtio-blk-pci,drive=disk0 -serial "file:$W/console.log" >"$W/qemu.log" 2>&1 &
QEMU_PID=$!
durable() { awk '/^DURABLE / { n++ } END { print n + 0 }' "$W/console.log" 2>/dev/null || echo 0; }
start=$SECONDS
kills=0
for k in $(seq "$VM_KILLS"); do
  # Kill after a random share of the records within this kill's slice.
  at=$(python3 -c "import random; r = random.Random($VM_SEED + $k); print(1 + int($VM_RECORDS * ($k - 1 + r.random()) / ($VM_KILLS + 1)))")
  while [ "$(durable)" -lt "$at" ]; do
    kill -0 "$QEMU_PID" 2>/dev/null || fail "the VM exited early"
    [ $((SECONDS - start)) -lt "$VM_TIMEOUT" ] || fail "timeout waiting for record $at"
    sleep 0.2
  done
  kill -9 "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null; SERVE_PID=""
  kills=$((kills + 1))
  echo "vm tier: kill $k of pcache (SIGKILL) after $(durable) durable records"
  sleep 0.$((RANDOM % 10))
  [ "${VM_FAULT:-}" = drop-cache ] && rm -f "$PMEM"
  start_serve
done
while kill -0 "$QEMU_PID" 2>/dev/null; do
  [ $((SECONDS - start)) -lt "$VM_TIMEOUT" ] || fail "timeout waiting for the guest"
  sleep 0.5
done
wait "$QEMU_PID" 2>/dev/null; QEMU_PID=""
grep -q GUEST-DONE "$W/console.log" || fail "the guest did not finish"
grep -q GUEST-WRITE-ERROR "$W/console.log" && fail "the guest saw a write error"
# The serial console ends lines with CR LF.
gv=$(grep -m1 "^GUEST-VERIFY" "$W/console.log" | tr -d '\r')
gok=$(echo "$gv" | awk '{ print $3 }') gbad=$(echo "$gv" | awk '{ print $5 }')

# --- the host's check: write everything back offline, read the backing file ---------
kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null; SERVE_PID=""
"$BIN" flush --pmem "$PMEM" --backing "$W/backing" --persistence volatile >"$W/flush.log" 2>&1 ||
  fail "offline flush: $(tail -3 "$W/flush.log")"
host=$(python3 - "$W/console.log" "$W/backing" <<'EOF'
import hashlib, sys
recs = [l.split() for l in open(sys.argv[1], errors="replace") if l.startswith("DURABLE ")]
ok = bad = 0
with open(sys.argv[2], "rb") as f:
    for _, i, off, sha in (r for r in recs if len(r) == 4):
        f.seek(int(off) * 65536)
        if hashlib.sha256(f.read(65536)).hexdigest() == sha:
            ok += 1
        else:
            bad += 1
            print(f"HOST-BAD record {i} at 64K block {off}", file=sys.stderr)
print(ok, bad)
EOF
)
hok=${host% *} hbad=${host#* }
n=$(durable)
echo "vm kills: $kills, records durable: $n, verified by the guest: $gok, verified on the backing device: $hok ($((SECONDS - start)) s)"
[ "$gbad" = 0 ] && [ "$hbad" = 0 ] && [ "$gok" = "$n" ] && [ "$hok" = "$n" ] && [ "$n" = "$VM_RECORDS" ] ||
  fail "mismatch: guest bad $gbad, backing bad $hbad"
