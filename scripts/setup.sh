#!/usr/bin/env bash
# Idempotent developer/CI setup: Debian packages the project needs, then .venv with
# `pip install -e '.[dev]'`. A second run with nothing to do calls neither apt nor pip.
# Override the interpreter with PYTHON=/path/to/python3.
#
# Under CI (env CI=true, 1 or yes, as CI runners set it) a Debian package that cannot be
# installed is an error: the script exits 1 naming the packages, so CI never passes with
# the tests that need them skipped. Locally it is a warning (those tests skip, and
# `pytest -ra` says why). --packages-only stops after the Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(bcftools tabix prometheus kubectl chromium time redis-server rabbitmq-server)
PYTHON=${PYTHON:-python3}
PACKAGES_ONLY=0
for arg in "$@"; do
    case $arg in
    --packages-only) PACKAGES_ONLY=1 ;;
    *) echo "setup: unknown argument: $arg (usage: setup.sh [--packages-only])" >&2; exit 2 ;;
    esac
done
case ${CI:-} in
[Tt][Rr][Uu][Ee] | 1 | [Yy][Ee][Ss]) STRICT=1 ;;
*) STRICT=0 ;;
esac

log() { echo "setup: $*"; }
warn() { echo "setup: WARNING: $*" >&2; }
# A package problem: fatal under CI, a warning locally.
problem() {
    if ((STRICT)); then
        echo "setup: ERROR: $* (CI=$CI: missing packages fail the run)" >&2
        exit 1
    fi
    warn "$*"
    warn "tests that need them will be skipped (pytest -ra prints why)"
}

installed() { [[ $(dpkg -s "$1" 2>/dev/null) == *"Status: install ok installed"* ]]; }

# --- Debian packages -------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
# Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip).
if command -v "$PYTHON" >/dev/null && ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi

SUDO=()
if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null; then SUDO=(sudo); fi

if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null || [[ $EUID -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
        problem "cannot run apt-get (not found, or not root and no sudo); install these yourself: ${missing[*]}"
    else
        export DEBIAN_FRONTEND=noninteractive
        log "installing Debian packages: ${missing[*]}"
        "${SUDO[@]}" apt-get update -qq || warn "apt-get update failed; trying old lists"
        # Install only what apt can find, so one unknown name does not block the rest.
        installable=() unknown=()
        for pkg in "${missing[@]}"; do
            if [[ $(apt-cache policy "$pkg" 2>/dev/null) =~ Candidate:\ [^\(] ]]; then
                installable+=("$pkg")
            else
                unknown+=("$pkg")
            fi
        done
        if ((${#installable[@]})); then
            "${SUDO[@]}" apt-get install -y --no-install-recommends "${installable[@]}" ||
                warn "apt-get install failed (checked package by package below)"
        fi
        still=()
        for pkg in "${missing[@]}"; do
            [[ $pkg == python3-venv ]] && continue # checked by what it provides, below
            installed "$pkg" || still+=("$pkg")
        done
        if [[ " ${missing[*]} " == *" python3-venv "* ]] && ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
            still+=(python3-venv)
        fi
        if ((${#still[@]})); then
            why=""
            ((${#unknown[@]})) && why=" (no apt candidate for: ${unknown[*]})"
            problem "Debian packages not installed: ${still[*]}$why"
        else
            log "Debian packages installed: ${missing[*]}"
        fi
    fi
else
    log "Debian packages already installed"
fi
((PACKAGES_ONLY)) && exit 0

# --- Python virtual environment ---------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null; then
    echo "setup: ERROR: $PYTHON not found; taskmeter needs Python >= 3.10" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup: ERROR: $PYTHON is $("$PYTHON" -V 2>&1); taskmeter needs Python >= 3.10" >&2
    exit 1
fi

STAMP=.venv/.setup-stamp
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c '' 2>/dev/null; then
    log "creating .venv with $("$PYTHON" -V 2>&1)"
    rm -rf .venv
    "$PYTHON" -m venv .venv
fi
if [[ ! -f $STAMP || pyproject.toml -nt $STAMP ]]; then
    log "installing taskmeter (editable) with dev extras"
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    touch "$STAMP"
else
    log ".venv up to date"
fi
