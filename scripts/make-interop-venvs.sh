#!/usr/bin/env bash
# Builds the virtual environments of the real FATE clients that tests/interop drives:
#   .test-venvs/pyfate   Python 3.11, pyfate==2.2.0 (OSX queue mode client, standalone computing)
#   .test-venvs/eggroll  Python 3.10, eggroll==3.0.0 (rollsite stream mode client); optional
# These clients are never fedgate's runtime dependencies.
#
# Rules:
# - Idempotent and instant when up to date: each venv has a stamp holding a hash of this script and
#   of the interpreter's version; a matching stamp skips it. Change this file to force a rebuild.
# - Never fails the build: a venv that cannot be built gets a "<name>.failed" file next to it with
#   the reason (tests/interop reads it: skip locally, fail under CI), and the reason is printed.
# - pyfate goes in with --no-deps: its own pins (transformers, scikit-learn, grpcio 1.62.1 ...) are
#   partly unavailable or irrelevant; below is what the OSX federation path really imports
#   (measured with python -X importtime on a guest/host/arbiter run), pinned to FATE 2.2.0's own
#   pins wherever a wheel exists for the interpreter.
# - The torch CPU wheel comes from /opt/wheels on CI machines (pip's find-links), else from PyPI.
# Usage: bash scripts/make-interop-venvs.sh [--force]
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS="${FEDGATE_INTEROP_VENVS:-$ROOT/.test-venvs}"
SELF_HASH="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

PYFATE_PKGS=(
    "torch==2.13.0"             # CPU wheel; fate.arch.tensor, safetensors persistence
    "fate_utils==0.1.0"         # Rust Paillier (fate_utils.paillier) and friends
    "grpcio==1.62.1"            # FATE 2.2.0 pin
    "protobuf==4.24.4"          # FATE 2.2.0 pin (<5)
    "pydantic==1.10.12"         # FATE 2.2.0 pin (<2)
    "numpy==1.26.4"             # <2
    "ruamel.yaml==0.16.13"      # fate.arch.config
    "omegaconf==2.3.0"          # fate.arch.config
    "safetensors==0.4.1"        # FATE 2.2.0 pin
    "cloudpickle==2.1.0"        # FATE 2.2.0 pin
    "lmdb==1.4.1"               # standalone computing storage; FATE 2.2.0 pin
    "mmh3==3.1.0"               # standalone partitioner; FATE pins 3.0.0, which has no cp311 wheel
    "opentelemetry-api==1.45.2" # fate.arch.trace
    "opentelemetry-sdk==1.45.2"
)
# Not installed although pyfate lists them: pandas, rich, beautifultable, click, requests,
# scikit-learn, transformers, accelerate: nothing on the OSX federation path imports them.

EGGROLL_PKGS=(
    "eggroll==3.0.0"
    "grpcio==1.62.1"
    "protobuf==4.24.4"
    "psutil>=5.7.0"             # eggroll.trace imports it unconditionally
    "cloudpickle==2.1.0"
    "lmdb==1.4.1"
)

say() { printf 'make-interop-venvs: %s\n' "$*"; }

# find_python MAJOR.MINOR: prints a working interpreter path (pyenv versions first), or nothing.
find_python() {
    local want="$1" cand
    local roots=("${PYENV_ROOT:-}" "$HOME/.pyenv" "/root/.pyenv" "/opt/pyenv")
    for r in "${roots[@]}"; do
        [ -n "$r" ] || continue
        for cand in "$r"/versions/"$want".*/bin/python"$want"; do
            if [ -x "$cand" ] && "$cand" -c 'import sys' >/dev/null 2>&1; then echo "$cand"; return 0; fi
        done
    done
    for cand in "python$want" "/usr/bin/python$want" "/usr/local/bin/python$want"; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys' >/dev/null 2>&1; then
            command -v "$cand"; return 0
        fi
    done
    return 1
}

# build NAME PYVER CHECK_CODE PKG... : one venv; never exits non-zero.
build() {
    local name="$1" pyver="$2" check="$3"; shift 3
    local dir="$VENVS/$name" log="$VENVS/$name.log" failed="$VENVS/$name.failed"
    local py stamp_want t0
    t0=$(date +%s)
    py="$(find_python "$pyver")" || {
        say "$name: FAILED: no Python $pyver interpreter found (looked in pyenv versions and PATH)"
        echo "no Python $pyver interpreter found (pyenv versions, PATH)" >"$failed"
        return 0
    }
    stamp_want="$SELF_HASH $("$py" -c 'import sys; print(sys.version.split()[0])')"
    if [ "$FORCE" = 0 ] && [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$stamp_want" ]; then
        say "$name: up to date"
        rm -f "$failed"
        return 0
    fi
    say "$name: building with $py (log: $log)"
    rm -rf "$dir" "$failed"
    mkdir -p "$VENVS"
    : >"$log"
    fail() {
        say "$name: FAILED: $1"
        # pip's own error lines are the useful part; this machine's find-links warnings are noise.
        grep -v "WARNING: Location" "$log" | tail -n 15 | sed "s/^/  $name| /"
        printf '%s (see %s)\n' "$1" "$log" >"$failed"
    }
    "$py" -m venv "$dir" >>"$log" 2>&1 || { fail "python$pyver -m venv failed"; return 0; }
    local pip=("$dir/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
    if [ "$name" = pyfate ]; then
        "${pip[@]}" --no-deps "pyfate==2.2.0" >>"$log" 2>&1 || { fail "pip install --no-deps pyfate==2.2.0 failed"; return 0; }
    fi
    "${pip[@]}" "$@" >>"$log" 2>&1 || { fail "pip install of ${*} failed"; return 0; }
    "$dir/bin/python" -c "$check" >>"$log" 2>&1 || { fail "import check failed: $check"; return 0; }
    echo "$stamp_want" >"$dir/.stamp"
    say "$name: ready in $(( $(date +%s) - t0 )) s"
}

PYFATE_CHECK='
from fate.arch.federation.backends.osx import OSXFederation
from fate.arch.computing.backends.standalone import CSession
from fate.arch.context import Context
Context().cipher.phe.setup({"kind": "paillier", "key_length": 1024})
print("pyfate ok")'
EGGROLL_CHECK='
from eggroll.federation._rollsite_impl_grpc import RollSiteGrpc
from eggroll.config import Config
Config().load_default()
print("eggroll ok")'

build pyfate 3.11 "$PYFATE_CHECK" "${PYFATE_PKGS[@]}"
build eggroll 3.10 "$EGGROLL_CHECK" "${EGGROLL_PKGS[@]}"
exit 0
