#!/usr/bin/env bash
# Installs the tools the test suite needs when they are missing, then runs the
# README's test command (`just test`).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v just >/dev/null 2>&1; then
    echo "ci: installing just (pip install rust-just)"
    python3 -m pip install --quiet rust-just || cargo install --locked just
    hash -r
fi
if ! command -v just >/dev/null 2>&1; then
    # pip may have put it in a user or pyenv bin directory that is not on PATH yet.
    for dir in "$HOME/.local/bin" "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"; do
        [ -x "$dir/just" ] && export PATH="$dir:$PATH"
    done
fi
rustup component list --installed 2>/dev/null | grep -q clippy || echo "ci: warning: clippy component not listed"

just --version
cargo --version
time just test

# The web client's browser test: Debian's chromium and the websocket-client module.
if ! command -v chromium >/dev/null 2>&1; then
    echo "ci: installing chromium (apt)"
    apt-get install -y -qq chromium >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } || true
fi
python3 -c 'import websocket' 2>/dev/null || python3 -m pip install --quiet websocket-client || true
if command -v chromium >/dev/null 2>&1 && python3 -c 'import websocket' 2>/dev/null; then
    time just web-test
else
    echo "ci: SKIPPED just web-test: chromium or websocket-client could not be installed"
fi

# The multi-container tests need a Docker daemon and docker-compose: start the
# daemon if it is installed but not running, install compose if it is missing.
if command -v docker >/dev/null 2>&1; then
    if ! docker info >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1; then
        echo "ci: starting dockerd"
        (dockerd >/tmp/dockerd.log 2>&1 &)
        for _ in $(seq 60); do
            docker info >/dev/null 2>&1 && break
            sleep 1
        done
    fi
    if ! command -v docker-compose >/dev/null 2>&1; then
        echo "ci: installing docker-compose (apt)"
        apt-get install -y -qq docker-compose >/dev/null 2>&1 || true
    fi
fi
if command -v docker-compose >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    time just cluster-test
else
    echo "ci: SKIPPED just cluster-test: no usable Docker daemon or docker-compose on this machine"
fi
