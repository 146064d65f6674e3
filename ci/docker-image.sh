#!/usr/bin/env bash
# Builds the `dynamo` container image FROM scratch (no registry is needed):
# the release binary, stripped, plus the shared libraries `ldd` says it needs,
# laid out under target/docker/rootfs, then `docker build` with docker/Dockerfile.
# Usage: ci/docker-image.sh [TAG]   (default dynamo:dev)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-dynamo:dev}
log() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

command -v docker >/dev/null || { log "error: docker is not installed"; exit 1; }
docker info >/dev/null 2>&1 || { log "error: the Docker daemon is not reachable (docker info failed)"; exit 1; }

log "building dynamo (release)"
cargo build --release --locked -p dynamo-node --bin dynamo >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN="$TARGET_DIR/release/dynamo"

CONTEXT="$TARGET_DIR/docker"
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/rootfs/usr/local/bin" "$CONTEXT/rootfs/data" "$CONTEXT/rootfs/tmp"
# Debug info is for perf on the host; the image does not need 60 MB of it.
objcopy --strip-debug "$BIN" "$CONTEXT/rootfs/usr/local/bin/dynamo"
# Every library the dynamic linker loads, at the path it loads it from (the
# loader itself included); symlinks resolved so the files themselves are copied.
ldd "$BIN" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' | while read -r lib; do
    mkdir -p "$CONTEXT/rootfs$(dirname "$lib")"
    cp -L "$lib" "$CONTEXT/rootfs$lib"
done
# glibc resolves host names (the peers' service names) through these.
mkdir -p "$CONTEXT/rootfs/etc"
printf 'hosts: files dns\n' >"$CONTEXT/rootfs/etc/nsswitch.conf"
cp docker/Dockerfile "$CONTEXT/Dockerfile"
log "docker build -t $TAG ($(du -sh "$CONTEXT/rootfs" | cut -f1) rootfs)"
docker build -q -t "$TAG" "$CONTEXT" >&2
log "built $TAG"
