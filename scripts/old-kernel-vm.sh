#!/usr/bin/env bash
# Boots Debian 12's own kernel (6.1, from Debian's linux-image-amd64, which
# takes no overlay layer as a file descriptor) in qemu-system-x86 (TCG; see
# VM_ACCEL below) from an initramfs carrying the gantry
# binary, its plugins and a 60-layer image archive, and runs there:
#   load, export and fsck --verify-content with the driver `auto`,
# which must choose overlay2 (mounting by /proc/self/fd paths). Prints the
# guest's console and ends with "old-kernel VM: ok" or fails.
#
# Not in .ci/run: it fetches a kernel and boots a VM (seconds, once fetched).
# Run as root after `make build`. VM_DIR=DIR keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=$repo/target/release
[ -x "$bin/gantry" ] || { echo "old-kernel VM: build first (make build)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "old-kernel VM: run as root (apt-get, the guest's files)" >&2; exit 1; }
for p in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio; do
    command -v "${p%%:*}" >/dev/null || need="${need:-} ${p#*:}"
done
if [ -n "${need:-}" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
work=${VM_DIR:-$(mktemp -d /var/tmp/gantry-vm.XXXXXX)}
mkdir -p "$work"
cd "$work"

# Debian 12's kernel package, unpacked here, not installed.
if ! ls kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    rm -f ./*.deb
    apt-get download linux-image-amd64 >/dev/null
    image_pkg=$(dpkg-deb -f linux-image-amd64_*.deb Depends | grep -o 'linux-image-[0-9][^ ,]*' | head -1)
    apt-get download "$image_pkg" >/dev/null
    dpkg-deb -x linux-image-[0-9]*.deb kernel
fi
vmlinuz=$(ls kernel/boot/vmlinuz-* | head -1)
kver=${vmlinuz##*/vmlinuz-}
ovl=$(find "kernel/lib/modules/$kver" -name 'overlay.ko*' | head -1)
[ -n "$ovl" ] || { echo "old-kernel VM: no overlay module in $kver" >&2; exit 1; }

# The image: 60 small layers, an OCI layout in a tar.
if [ ! -f image.tar ]; then
    rm -rf layout
    "$bin/gen-image" tiny layout >/dev/null
    tar -C layout -cf image.tar .
fi

# The initramfs: busybox, gantry with the libraries it links, its plugins.
rm -rf root && mkdir -p root/{bin,dev,proc,sys,tmp,store,gantry/plugins}
cp "$(command -v busybox)" root/bin/busybox
for a in sh mount insmod mkdir ls cat echo uname poweroff sync grep tar wc; do ln -s busybox "root/bin/$a"; done
cp "$bin/gantry" root/gantry/
cp "$bin"/../wasm32-wasip2/release/gantry_{transport_v2,driver_overlay2,driver_vfs}.wasm root/gantry/plugins/
for lib in $(ldd "$bin/gantry" | grep -o '/[^ ]*'); do
    mkdir -p "root$(dirname "$lib")"
    cp -L "$lib" "root$lib"
done
case $ovl in
*.xz) xz -dc "$ovl" > root/overlay.ko ;;
*.zst) zstd -qdc "$ovl" > root/overlay.ko ;;
*) cp "$ovl" root/overlay.ko ;;
esac
cp image.tar root/image.tar
cat > root/init <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1g tmpfs /store
mount -t tmpfs tmpfs /tmp
echo "guest: Linux $(uname -r)"
insmod /overlay.ko || echo "guest: overlay is built in"
g="/gantry/gantry --root /store/g"
result=fail
id=$($g load -i /image.tar | grep -o 'sha256:[0-9a-f]*')
echo "guest: loaded ${id:-nothing}"
if [ -n "$id" ] &&
    $g export "$id" -o /store/export.tar &&
    $g fsck --verify-content; then
    echo "guest: driver dirs: $(ls /store/g | grep -E '^(overlay2|vfs)$')"
    echo "guest: export entries: $(tar -tf /store/export.tar | wc -l)"
    [ -d /store/g/overlay2 ] && result=ok
fi
echo "guest-result: $result"
sync
poweroff -f
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet | gzip -1) > initrd.gz

# TCG by default: the guest boots and runs in seconds. VM_ACCEL=kvm uses
# /dev/kvm instead; on this project's (nested) machines it refuses
# `-cpu host`'s arch-capabilities MSR, and without it hangs after the
# kernel decompresses.
accel=(-accel tcg)
if [ "${VM_ACCEL:-tcg}" = kvm ]; then
    accel=(-accel kvm -cpu host,-arch-capabilities)
fi
echo "old-kernel VM: booting Linux $kver with ${accel[*]}"
timeout 1200 qemu-system-x86_64 "${accel[@]}" -m 2048 -smp 2 -nographic -no-reboot \
    -kernel "$vmlinuz" -initrd initrd.gz \
    -append "console=ttyS0 panic=-1 rdinit=/init quiet" | tee console.log
grep -q "guest-result: ok" console.log || { echo "old-kernel VM: FAILED (console in $work/console.log)" >&2; exit 1; }
echo "old-kernel VM: ok"
