#!/usr/bin/env bash
# Install QEMU >= 9.0 (qemu-system-x86) and the test helpers on Debian: zstd, fio, openssl,
# b3sum (benchmarks), xfsprogs (a reflink filesystem for the chain tests).
#
# Debian 12 (bookworm) ships QEMU 7.2; QEMU 10 comes from the bookworm-backports
# suite. The backports source is derived from the machine's own Debian apt source
# (same URI, same keyring), so no mirror is named here.
set -euo pipefail

have_qemu() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    local v
    v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1)
    [ -n "$v" ] && [ "$v" -ge 9 ]
}

need=()
have_qemu || need+=(qemu-system-x86)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v b3sum >/dev/null 2>&1 || need+=(b3sum)
command -v mkfs.xfs >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v mkfs.xfs >/dev/null 2>&1 || need+=(xfsprogs)
[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

. /etc/os-release
codename=${VERSION_CODENAME:?cannot tell the Debian codename}
backports="${codename}-backports"

if ! grep -rqs -- "$backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=""
    signed=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        # deb822: take the stanza whose Suites list the plain codename.
        read -r uri signed < <(awk -v cn="$codename" '
            BEGIN { RS=""; FS="\n" }
            {
                u=""; s=""; k=""; ok=0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/)       { u=$i; sub(/^URIs:[ \t]*/, "", u); sub(/[ \t].*/, "", u) }
                    if ($i ~ /^Signed-By:/)  { k=$i; sub(/^Signed-By:[ \t]*/, "", k) }
                    if ($i ~ /^Suites:/)     { n=split(substr($i, 8), a, /[ \t]+/); for (j = 1; j <= n; j++) if (a[j] == cn) ok=1 }
                }
                if (ok && u != "") { print u, k; exit }
            }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk -v cn="$codename" '$1 == "deb" && $3 == cn { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || { echo "install-qemu: no Debian apt source for $codename found" >&2; exit 1; }
    {
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: $backports"
        echo "Components: main"
        [ -n "$signed" ] && echo "Signed-By: $signed"
    } | $SUDO tee /etc/apt/sources.list.d/mappedram-backports.sources >/dev/null
fi

$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -t "$backports" qemu-system-x86 zstd fio openssl b3sum xfsprogs >/dev/null
have_qemu || { echo "install-qemu: qemu-system-x86_64 >= 9 still missing" >&2; exit 1; }
qemu-system-x86_64 --version | head -n1
