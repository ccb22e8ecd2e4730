#!/bin/bash
# Make the libvirt save images of tests/data/libvirt with a real libvirt (virsh save).
#
# usage: sudo tests/data/libvirt/make_images.sh [OUTDIR]     (default: this directory)
#
# Needs root, libvirt >= 11.1 (virsh save --image-format; Debian bookworm-backports has
# 11.3: apt-get install libvirt-clients/bookworm-backports libvirt-daemon/bookworm-backports
# libvirt-daemon-driver-qemu/bookworm-backports ...), qemu-system-x86_64, zstd, python3.
#
# libvirtd runs privately: the script re-executes itself in a new mount namespace, with
# tmpfs over /run, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt and a copy of
# /etc/libvirt (qemu.conf: QEMU as root, no security driver, logs to files). Nothing of
# the machine's own libvirt state is read or changed, and no systemd is needed.
#
# The guest (domain.xml): TCG, 64 MiB, no disks, no network, RAM backed by a shared file
# (libvirt names it /var/lib/libvirt/qemu/ram/<id>-<name>/pc.ram). It is started paused,
# the pattern of tests/data/qemu/expected_ram.py is written into that file (QEMU maps it
# shared, so the guest's RAM then holds the pattern), and virsh saves it; the CPU never
# runs. Each image is then restored by libvirt (paused) into a fresh guest, and its RAM
# file must equal the pattern before the image is kept.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(realpath -m "${1:-$HERE}")
NAME=mappedram-test

if [ -z "${MAPPEDRAM_PRIVATE_NS:-}" ]; then
    [ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
    for tool in libvirtd virsh qemu-system-x86_64 zstd python3 unshare; do
        command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
    done
    exec unshare --mount --propagation private env MAPPEDRAM_PRIVATE_NS=1 "$0" "$@"
fi

WORK=$(mktemp -d /tmp/mappedram-libvirt.XXXXXX)
DAEMON_PID=""
cleanup() {
    virsh destroy "$NAME" >/dev/null 2>&1 || true
    if [ -n "$DAEMON_PID" ]; then kill "$DAEMON_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/etc"
cp -a /etc/libvirt/. "$WORK/etc/"
cat >> "$WORK/etc/qemu.conf" <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
EOF
mount --bind "$WORK/etc" /etc/libvirt
for dir in /run /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do
    mkdir -p "$dir" && mount -t tmpfs tmpfs "$dir"
done

libvirtd --daemon --pid-file "$WORK/libvirtd.pid"
for _ in $(seq 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
done
DAEMON_PID=$(cat "$WORK/libvirtd.pid")
export LIBVIRT_DEFAULT_URI=qemu:///system

python3 "$HERE/../qemu/expected_ram.py" "$WORK/pattern.raw" --size-mib 64 --seed 0x5EED --zero-permille 500
virsh define "$HERE/domain.xml" >/dev/null

ram_file() { ls -d /var/lib/libvirt/qemu/ram/*-"$NAME"/pc.ram; }

# save IMAGE VIRSH-SAVE-OPTIONS...: a paused guest holding the pattern, saved with virsh
save() {
    local image=$1; shift
    virsh start --paused "$NAME" >/dev/null
    dd if="$WORK/pattern.raw" of="$(ram_file)" bs=1M conv=notrunc,fsync status=none
    virsh save "$NAME" "$WORK/$image" "$@" >/dev/null
    echo "virsh save $NAME $image $*" > "$WORK/$image.cmd"
    # libvirt itself loads the image; the restored guest's RAM must be the pattern
    virsh restore --paused "$WORK/$image" >/dev/null
    cmp "$(ram_file)" "$WORK/pattern.raw"
    virsh destroy "$NAME" >/dev/null
    echo "$image: saved, restored by libvirt, RAM equals the pattern"
}

save pc-64M-raw.save --image-format raw
save pc-64M-sparse.save --image-format sparse --running
save pc-64M-sparse-parallel2.save --image-format sparse --parallel-channels 2
save pc-64M-zstd.save --image-format zstd

mkdir -p "$OUT"
python3 - "$WORK" "$OUT" "$(virsh version --daemon | sed -n 's/^Running against daemon: //p')" \
    "$(qemu-system-x86_64 --version | head -1)" <<'EOF'
import hashlib, json, os, struct, subprocess, sys

work, out, libvirt_version, qemu_version = sys.argv[1:]
images = []
for name in sorted(f for f in os.listdir(work) if f.endswith(".save")):
    path = os.path.join(work, name)
    with open(path, "rb") as f:
        head = f.read(92)
        magic = head[:16].decode()
        version, data_len, was_running, fmt, cookie_offset = struct.unpack_from("<5I", head, 16)
        f.seek(92 + data_len)
        stream_magic = f.read(4)
    data = open(path, "rb").read()
    subprocess.run(["zstd", "-q", "-19", "-f", path, "-o", os.path.join(out, name + ".zst")], check=True)
    os.chmod(os.path.join(out, name + ".zst"), 0o644)
    st = os.stat(path)
    images.append({
        "file": name + ".zst",
        "command": open(path + ".cmd").read().strip(),
        "bytes": st.st_size,
        "allocated": st.st_blocks * 512,
        "zst_bytes": os.path.getsize(os.path.join(out, name + ".zst")),
        "sha256": hashlib.sha256(data).hexdigest(),
        "header": {"magic": magic, "version": version, "data_len": data_len, "was_running": was_running,
                   "format": fmt, "cookieOffset": cookie_offset},
        "stream_offset": 92 + data_len,
        "stream_magic": stream_magic.decode("latin-1"),
    })
index = {"libvirt": libvirt_version, "qemu": qemu_version, "guest_ram": "pc.ram, 64 MiB, the pattern of "
         "tests/data/qemu/expected_ram.py (seed 0x5EED, zero_permille 500)", "images": images}
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump(index, f, indent=2)
    f.write("\n")
for im in images:
    print(f"{im['file']}: {im['bytes']} bytes, stream at {im['stream_offset']:#x}, sha256 {im['sha256']}")
EOF
