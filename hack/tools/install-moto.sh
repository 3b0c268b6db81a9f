#!/usr/bin/env bash
# Installs moto (the EC2 API behind the simulator's EC2 proxy) into a Python venv at
#
#   $OUTRIGGER_CACHE/tools/moto-<hash>/        (OUTRIGGER_CACHE default: $HOME/.cache/outrigger)
#
# from the pins in hack/tools/moto-requirements.txt (wheels only). The hash covers
# that file, this script and the Python version, so a changed pin installs into a
# new folder, and a folder, once complete, is never changed again.
#
# The venv's bin folder (with moto_server and python) is printed as the last line
# of stdout; progress goes to stderr.
#
# Usage: hack/tools/install-moto.sh             install if needed, print the bin folder
#        hack/tools/install-moto.sh --print-bin print the bin folder, install nothing
#        hack/tools/install-moto.sh --check     exit 0 when installed, 1 when not
#
# Environment: PYTHON (default python3) is the interpreter the venv is made from.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${OUTRIGGER_CACHE:-$HOME/.cache/outrigger}"
PY="${PYTHON:-python3}"

log() { printf '[install-moto] %s\n' "$*" >&2; }
die() { printf '[install-moto] error: %s\n' "$*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "python3 is needed for moto (set PYTHON=...)"
[[ -f "$HERE/moto-requirements.txt" ]] || die "missing pin file hack/tools/moto-requirements.txt"

HASH="$(
    {
        sha256sum <"$HERE/moto-requirements.txt"
        sha256sum <"$HERE/install-moto.sh"
        "$PY" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -c1-16
)"
PREFIX="$CACHE_ROOT/tools/moto-$HASH"
BIN="$PREFIX/bin"
STAMP="$PREFIX/.complete"

is_complete() {
    [[ -f "$STAMP" && -x "$BIN/moto_server" && -x "$BIN/python" ]]
}

case "${1:-}" in
    "") ;;
    --print-bin) echo "$BIN"; exit 0 ;;
    --check) is_complete; exit $? ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
esac

if ! is_complete; then
    mkdir -p "$CACHE_ROOT/tools"
    # One installer per folder at a time; a second one waits, then finds it done.
    exec 9>"$CACHE_ROOT/tools/moto-$HASH.lock"
    if ! flock -n 9; then
        log "another install into $PREFIX is running; waiting for it"
        flock 9
    fi
    if ! is_complete; then
        t0=$SECONDS
        log "installing moto into $PREFIX"
        rm -rf -- "$PREFIX"
        "$PY" -m venv "$PREFIX" >&2
        "$BIN/python" -m pip install --quiet --disable-pip-version-check --no-input \
            --only-binary=:all: -r "$HERE/moto-requirements.txt" >&2
        "$BIN/python" -c 'import moto, moto.server; print("moto", moto.__version__)' >"$PREFIX/versions.txt"
        date -u +%Y-%m-%dT%H:%M:%SZ >"$STAMP"
        log "installed $(cat "$PREFIX/versions.txt") in $((SECONDS - t0)) s"
    fi
    flock -u 9
fi

echo "$BIN"
