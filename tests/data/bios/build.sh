#!/bin/sh
# Assemble exportbios.S into exportbios.bin (4 KiB: guest-physical 0xfffff000-0xffffffff).
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as --64 -o "$tmp/exportbios.o" exportbios.S
objcopy -O binary -j .text "$tmp/exportbios.o" exportbios.bin
test "$(wc -c < exportbios.bin)" -eq 4096
