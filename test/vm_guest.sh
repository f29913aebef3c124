# Shared by the VM tiers (test/vm_tier.sh, test/vm_vhost.sh), sourced: what a guest
# needs from this machine, and its initramfs.
#
#   vm_guest_prereqs MODULE...   checks root, QEMU, cpio, a static busybox and a guest
#                                kernel whose MODULEs (with dependencies) exist; calls the
#                                caller's `skip` otherwise. Sets KERNEL and VM_MODS.
#   vm_guest_root DIR            a root tree in DIR: busybox, the modules in /mod, and
#                                VM_MOD_ORDER (their insmod order) for the caller's /init.
#   vm_guest_initrd DIR OUT      packs DIR (with the caller's DIR/init) into OUT (gzip cpio).
#
# Invariant: nothing here writes outside the directories it is given.

vm_guest_prereqs() {
  [ "$(id -u)" = 0 ] || skip "needs root"
  local t
  for t in qemu-system-x86_64 cpio python3 modprobe; do
    command -v "$t" > /dev/null || skip "$t missing (apt-get install qemu-system-x86 cpio kmod)"
  done
  # ldd fails on a static executable, which is what an initramfs without libc needs.
  { [ -x /bin/busybox ] && ! ldd /bin/busybox > /dev/null 2>&1; } ||
    skip "no static busybox (apt-get install busybox-static)"
  KERNEL=$(ls /boot/vmlinuz-* 2> /dev/null | sort -V | tail -1)
  [ -n "$KERNEL" ] || skip "no guest kernel in /boot (apt-get install linux-image-cloud-amd64)"
  local kver=${KERNEL#/boot/vmlinuz-}
  VM_MODS=$(modprobe -a --show-depends -S "$kver" "$@" 2> /dev/null | awk '$1 == "insmod" { print $2 }')
  [ -n "$VM_MODS" ] || skip "no $* modules for $kver"
}

vm_guest_root() {
  local m
  mkdir -p "$1/bin" "$1/mod" "$1/proc" "$1/sys" "$1/dev"
  cp /bin/busybox "$1/bin/busybox"
  VM_MOD_ORDER=""
  for m in $VM_MODS; do
    cp "$m" "$1/mod/"
    VM_MOD_ORDER="$VM_MOD_ORDER /mod/$(basename "$m")"
  done
}

vm_guest_initrd() {
  chmod +x "$1/init"
  (cd "$1" && find . | cpio -o -H newc 2> /dev/null | gzip -1 > "$2")
}
