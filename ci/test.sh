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
