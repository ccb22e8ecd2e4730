# Sourced by scripts/demo and scripts/test: a virtual environment with mappedram installed.
# Set MAPPEDRAM_VENV to use another location (default: .venv in the checkout).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MAPPEDRAM_VENV:-$root/.venv}
py=${PYTHON:-python3}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if [ ! -x "$venv/bin/python" ]; then
    if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
        # Debian splits venv/ensurepip into its own package.
        rm -rf "$venv"
        ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "python${ver}-venv" >/dev/null
        "$py" -m venv "$venv"
    fi
fi
stamp="$venv/.mappedram-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e "$root[test]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
