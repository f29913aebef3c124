#!/usr/bin/env bash
# VM tier over SPDK (issue 21 item 2; a script, not in CI): a real Linux guest (QEMU TCG,
# Debian's cloud kernel, a busybox initramfs) whose disk is bdev_pcache in a stock
# spdk_tgt, exported as a vhost-user-blk controller, guest memory in a shared
# memory-backend-file. The base is a bdev_aio on a file on disk behind a bdev_delay that
# makes every base write take VM_BASE_WRITE_US (1 s), with a fixed UUID, so the restarted
# target re-attaches the same cache and writeback lags the guest: the kill leaves dirty
# data that only pcache's replay brings back.
#
# Boot 1 (vm_mode=write): the guest writes VM_RECORDS records of mixed sizes (4 KiB,
# 12 KiB, 64 KiB, 1 MiB) of random data, each with `dd conv=fsync` (virtio-blk FLUSH),
# printing `DURABLE <i> <offset> <size> <sha256>` only after the fsync returned; reads them
# all back with O_DIRECT (`GUEST-VERIFY`), stores its record list on the disk's last
# MiB (fsync'd too). As soon as that list is stored the host kills spdk_tgt with SIGKILL
# (dirty data in the cache, nothing shut down; the guest goes with it) and starts it
# again from the same config, which
# attaches the same medium (replay). Boot 2 (vm_mode=verify) reads the record list back
# from the disk and checks every record. Prints `vm vhost boots: 2, spdk_tgt kills: 1,
# records durable: N, verified before the kill: N, verified after the restart: N` and
# exits non-zero on any mismatch.
#
# The same two boots then run over NVMe-oF/TCP (VM_TRANSPORTS="vhost nvmf"): the guest's
# own nvme-tcp initiator connects through QEMU's user networking to the target's
# listener on the host's loopback, without leaving the machine.
#
# SKIP line (exit 0) when not root, when QEMU, a guest kernel with virtio modules, a
# static busybox or cpio is missing (apt-get install qemu-system-x86
# linux-image-cloud-amd64 busybox-static cpio), or when there is no SPDK (SPDK_DIR, else
# scripts/build-spdk.sh's cache, built from ../shared/spdk when missing).
#
# Usage: bash test/vm_vhost.sh   Env: VM_RECORDS (120), VM_SEED, VM_TIMEOUT (900 s),
#        VM_BASE_WRITE_US (1000000), VM_KEEP=1 keeps the work directory, VM_FAULT=drop-cache (self-test: the medium
#        is deleted with the kill, losing the dirty data; the run must then fail).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VM_RECORDS="${VM_RECORDS:-120}"
VM_SEED="${VM_SEED:-$(((RANDOM << 15) | RANDOM))}"
VM_TIMEOUT="${VM_TIMEOUT:-900}"
# Which exports to run the guest over, in turn: vhost-user-blk and/or NVMe-oF/TCP (the
# guest's kernel initiator reaching the target on the host's loopback through QEMU's
# user networking, 10.0.2.2).
VM_TRANSPORTS="${VM_TRANSPORTS:-vhost nvmf}"
VM_NVMF_PORT="${VM_NVMF_PORT:-$((4500 + $$ % 400))}"
# Latency of every base write (a bdev_delay over the aio file): writeback then lags the
# guest, so the kill finds dirty data that only the cache's replay can bring back.
VM_BASE_WRITE_US="${VM_BASE_WRITE_US:-1000000}"

skip() {
  echo "SKIP: vm vhost tier: $*"
  exit 0
}
# shellcheck source=test/vm_guest.sh
. test/vm_guest.sh
vm_guest_prereqs virtio_pci virtio_blk virtio_net nvme_tcp
if [ -z "${SPDK_DIR:-}" ]; then
  SPDK_DIR=$(bash scripts/build-spdk.sh)
  case $? in
    0) ;;
    3) skip "no SPDK (set SPDK_DIR, or put the pinned source in ../shared/spdk)" ;;
    *) echo "vm vhost tier: building SPDK failed"; exit 1 ;;
  esac
fi
export SPDK_DIR
TGT=$SPDK_DIR/build/bin/spdk_tgt
[ -x "$TGT" ] || TGT=$SPDK_DIR/bin/spdk_tgt
[ -x "$TGT" ] || skip "no spdk_tgt in $SPDK_DIR"
# The app's own shared libraries (a built tree or an install prefix; ISA-L of a tree).
for d in "$SPDK_DIR/isa-l/.libs" "$SPDK_DIR/lib" "$SPDK_DIR/build/lib"; do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done

W=$(mktemp -d /var/tmp/pcache-vmv.XXXXXX)
PMEM=/dev/shm/pcache-vmv-$$.pmem
MEM=/dev/shm/pcache-vmv-$$.guestmem
TGT_PID="" QEMU_PID=""
cleanup() {
  [ -n "$QEMU_PID" ] && kill -9 "$QEMU_PID" 2> /dev/null
  [ -n "$TGT_PID" ] && kill -9 "$TGT_PID" 2> /dev/null
  wait 2> /dev/null
  if [ "${VM_KEEP:-0}" = 1 ]; then echo "vm vhost tier: kept $W"; else rm -rf "$W" "$PMEM" "$MEM"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() {
  echo "vm vhost tier: FAILED: $*"
  for f in console1 console2 tgt1 tgt2; do
    f=$f-${TRANSPORT:-}
    [ -f "$W/$f.log" ] && { echo "--- $f tail"; tail -15 "$W/$f.log"; }
  done
  exit 1
}

echo "vm vhost tier: installing the module (scripts/install-spdk-module.sh $W/prefix)"
scripts/install-spdk-module.sh "$W/prefix" > "$W/install.log" 2>&1 || fail "install: $(tail -5 "$W/install.log")"
MOD=$W/prefix/lib/libspdk_bdev_pcache.so

# --- the guest -------------------------------------------------------------------------
vm_guest_root "$W/root"
cat > "$W/root/init" << EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $VM_MOD_ORDER; do insmod \$m; done
arg() { sed -n "s/.*\$1=\([0-9a-z]*\).*/\1/p" /proc/cmdline; }
n=\$(arg vm_records) mode=\$(arg vm_mode) dev=\$(arg vm_dev) port=\$(arg vm_port)
if [ "\$dev" = nvme ]; then
  ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
  echo "transport=tcp,traddr=10.0.2.2,trsvcid=\$port,nqn=nqn.2016-06.io.spdk:pcachevm" > /dev/nvme-fabrics || echo GUEST-NO-CONNECT
  disk=/dev/nvme0n1
else
  disk=/dev/vda
fi
for _ in \$(seq 200); do [ -b \$disk ] && break; sleep 0.1; done
[ -b \$disk ] || { echo GUEST-NO-DISK; poweroff -f; }
sectors=\$(cat /sys/block/\$(basename \$disk)/size)
list=\$(( sectors / 8 - 256 ))   # the record list: the disk's last MiB, in 4 KiB blocks
check() {
  ok=0 bad=0
  while read -r _ i off size sha; do
    got=\$(dd if=\$disk bs=4096 skip=\$((off / 4096)) count=\$((size / 4096)) iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "\$got" = "\$sha" ]; then ok=\$((ok + 1)); else bad=\$((bad + 1)); echo "GUEST-BAD \$i \$off \$size"; fi
  done < /records
  echo "GUEST-VERIFY ok \$ok bad \$bad"
}
echo "GUEST-START \$mode"
if [ "\$mode" = write ]; then
  i=0
  while [ \$i -lt \$n ]; do
    case \$((i % 4)) in 0) size=4096 ;; 1) size=12288 ;; 2) size=65536 ;; *) size=1048576 ;; esac
    off=\$(( i * 1048576 + (i * 8192) % (1048576 - size + 4096) / 4096 * 4096 ))
    [ \$((off + size)) -le \$((i * 1048576 + 1048576)) ] || off=\$((i * 1048576))
    dd if=/dev/urandom of=/rec bs=\$size count=1 2>/dev/null
    if dd if=/rec of=\$disk bs=4096 seek=\$((off / 4096)) conv=fsync,notrunc 2>/dev/null; then
      echo "DURABLE \$i \$off \$size \$(sha256sum /rec | cut -d' ' -f1)" | tee -a /records
    else
      echo "GUEST-WRITE-ERROR \$i"
    fi
    i=\$((i + 1))
  done
  echo 3 > /proc/sys/vm/drop_caches
  check
  dd if=/records of=\$disk bs=4096 seek=\$list conv=fsync,sync,notrunc 2>/dev/null && echo GUEST-LIST-STORED
else
  dd if=\$disk bs=4096 skip=\$list count=256 iflag=direct 2>/dev/null | tr -d '\000' | grep '^DURABLE ' > /records
  echo "GUEST-LIST \$(wc -l < /records)"
  check
fi
echo GUEST-DONE
poweroff -f
EOF
vm_guest_initrd "$W/root" "$W/initrd.gz" || fail "initramfs"

# --- the target: aio base (fixed UUID) -> pcache -> vhost-user-blk -----------------------
truncate -s 512M "$W/base.img"
cat > "$W/tgt.json" << EOF
{"subsystems": [
 {"subsystem": "bdev", "config": [
  {"method": "bdev_aio_create", "params": {"name": "Aio0", "filename": "$W/base.img", "block_size": 512}},
  {"method": "bdev_delay_create", "params": {"name": "Slow0", "base_bdev_name": "Aio0",
   "avg_read_latency": 100, "p99_read_latency": 200,
   "avg_write_latency": $VM_BASE_WRITE_US, "p99_write_latency": $VM_BASE_WRITE_US,
   "uuid": "6f1e2d3c-4b5a-4978-8a1b-2c3d4e5f6a7b"}},
  {"method": "bdev_pcache_create", "params": {"name": "PCache0", "base_bdev_name": "Slow0",
   "pmem_path": "$PMEM", "pmem_size_mb": 64, "persistence": "volatile"}},
  {"method": "bdev_wait_for_examine"}]},
 {"subsystem": "vhost_blk", "config": [
  {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.0", "dev_name": "PCache0"}}]},
 {"subsystem": "nvmf", "config": [
  {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
  {"method": "nvmf_create_subsystem", "params": {"nqn": "nqn.2016-06.io.spdk:pcachevm",
   "allow_any_host": true, "serial_number": "PCACHEVM00000001", "model_number": "pcache"}},
  {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "nqn.2016-06.io.spdk:pcachevm",
   "namespace": {"bdev_name": "PCache0"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "nqn.2016-06.io.spdk:pcachevm",
   "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "$VM_NVMF_PORT"}}}]}
]}
EOF
mkdir -p "$W/vhost"
start_tgt() { # LOG
  rm -f "$W/vhost/vhost.0" "$W/tgt.sock"
  LD_PRELOAD=$MOD "$TGT" --no-huge -s 2048 -u -m 0x1 --disable-cpumask-locks -r "$W/tgt.sock" \
    -S "$W/vhost" -c "$W/tgt.json" > "$W/$1.log" 2>&1 < /dev/null &
  TGT_PID=$!
  for _ in $(seq 120); do
    [ -S "$W/vhost/vhost.0" ] &&
      python3 "$ROOT/test/spdk/rpc_raw.py" "$W/tgt.sock" framework_wait_init '' 5 > /dev/null 2>&1 &&
      return 0
    kill -0 "$TGT_PID" 2> /dev/null || fail "spdk_tgt exited ($1)"
    sleep 0.5
  done
  fail "no vhost.0 controller ($1)"
}
# boot MODE CONSOLE [UNTIL]: runs the guest to its end, or with UNTIL only until its
# console shows that line (QEMU is then left running for the caller to kill).
boot() {
  rm -f "$MEM"
  local -a dev
  if [ "$TRANSPORT" = nvmf ]; then
    dev=(-netdev user,id=n0 -device virtio-net-pci,netdev=n0)
  else
    dev=(-object "memory-backend-file,id=mem,size=256M,mem-path=$MEM,share=on" -numa node,memdev=mem
      -chardev "socket,id=vu,path=$W/vhost/vhost.0" -device vhost-user-blk-pci,chardev=vu,num-queues=1)
  fi
  local vmdev=vda
  [ "$TRANSPORT" = nvmf ] && vmdev=nvme
  timeout "$VM_TIMEOUT" qemu-system-x86_64 -machine q35 -accel tcg -m 256 -smp 1 -display none \
    -monitor none -no-reboot -kernel "$KERNEL" -initrd "$W/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1 vm_records=$VM_RECORDS vm_mode=$1 vm_dev=$vmdev vm_port=$VM_NVMF_PORT" \
    "${dev[@]}" -serial "file:$W/$2.log" > "$W/qemu-$1.log" 2>&1 &
  QEMU_PID=$!
  if [ -n "${3:-}" ]; then
    local t0=$SECONDS
    until grep -q "$3" "$W/$2.log" 2> /dev/null; do
      kill -0 "$QEMU_PID" 2> /dev/null || fail "the guest ended before $3 ($1)"
      [ $((SECONDS - t0)) -lt "$VM_TIMEOUT" ] || fail "timeout waiting for $3 ($1)"
      sleep 0.1
    done
    return 0
  fi
  wait "$QEMU_PID" || fail "QEMU ($1) failed or timed out: $(tail -3 "$W/qemu-$1.log")"
  QEMU_PID=""
  grep -q GUEST-DONE "$W/$2.log" || fail "the guest did not finish ($1)"
  grep -q "GUEST-WRITE-ERROR\|GUEST-NO-DISK\|GUEST-NO-CONNECT" "$W/$2.log" && fail "guest error ($1)"
}
verified() { grep -m1 "^GUEST-VERIFY" "$W/$1.log" | tr -d '\r' | awk '{ print $3, $5 }'; }

echo "vm vhost tier: $KERNEL, $VM_RECORDS records, seed $VM_SEED, spdk_tgt from $SPDK_DIR, over: $VM_TRANSPORTS"
for TRANSPORT in $VM_TRANSPORTS; do
  start=$SECONDS
  # Each transport from a blank medium and base.
  rm -f "$PMEM" "$W/base.img"
  truncate -s 512M "$W/base.img"
  start_tgt tgt1-$TRANSPORT
  # Killed as soon as the guest has fsync'd its last write (the record list): the cache
  # still holds dirty data then, which only the replay after the restart can bring back.
  boot write console1-$TRANSPORT GUEST-LIST-STORED
  n=$(grep -c "^DURABLE " "$W/console1-$TRANSPORT.log")
  read -r ok1 bad1 <<< "$(verified console1-$TRANSPORT)"
  grep -q GUEST-LIST-STORED "$W/console1-$TRANSPORT.log" || fail "the guest could not store its record list"
  dirty=$(python3 "$ROOT/test/spdk/rpc_raw.py" "$W/tgt.sock" bdev_pcache_get_stats '{"name": "PCache0"}' 10 2> /dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(d.get("dirty_bytes","?"))' 2> /dev/null)
  kill -9 "$TGT_PID"; wait "$TGT_PID" 2> /dev/null; TGT_PID=""
  kill -9 "$QEMU_PID" 2> /dev/null; wait "$QEMU_PID" 2> /dev/null; QEMU_PID=""
  echo "vm vhost tier: spdk_tgt killed (SIGKILL) with ${dirty:-?} dirty bytes in the cache"
  [ "${VM_FAULT:-}" = drop-cache ] && rm -f "$PMEM"
  start_tgt tgt2-$TRANSPORT
  boot verify console2-$TRANSPORT
  read -r ok2 bad2 <<< "$(verified console2-$TRANSPORT)"
  echo "vm $TRANSPORT boots: 2, spdk_tgt kills: 1, records durable: $n, verified before the kill: $ok1, verified after the restart: $ok2 ($((SECONDS - start)) s)"
  [ "$n" = "$VM_RECORDS" ] && [ "$bad1" = 0 ] && [ "$bad2" = 0 ] && [ "$ok1" = "$n" ] && [ "$ok2" = "$n" ] ||
    fail "mismatch: before the kill $ok1 ok / $bad1 bad, after the restart $ok2 ok / $bad2 bad, of $n"
  python3 "$ROOT/test/spdk/rpc_raw.py" "$W/tgt.sock" spdk_kill_instance '{"sig_name": "SIGTERM"}' 5 > /dev/null 2>&1
  for _ in $(seq 80); do kill -0 "$TGT_PID" 2> /dev/null || break; sleep 0.25; done
  kill -9 "$TGT_PID" 2> /dev/null; wait "$TGT_PID" 2> /dev/null; TGT_PID=""
done
