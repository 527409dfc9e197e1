#!/usr/bin/env bash
# Container jobs vs `podman run` of the same image, side by side (release build): starts a
# podman Docker-API service on a temporary socket, imports a busybox image, runs N of each.
#   usage: bench/container_latency.sh [N]   (default 20; needs podman, runc, busybox-static)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
n="${1:-20}"
image=localhost/dstack-test-busybox:latest
dir="$(mktemp -d)"
podman system service --time=0 "unix://$dir/podman.sock" &
service=$!
trap 'kill $service 2>/dev/null; rm -rf "$dir"' EXIT
if ! podman image exists "$image"; then
  mkdir -p "$dir/rootfs/bin" "$dir/rootfs/tmp"
  cp /usr/bin/busybox "$dir/rootfs/bin/"
  for a in sh true echo sleep; do ln -s busybox "$dir/rootfs/bin/$a"; done
  tar -C "$dir/rootfs" -cf "$dir/rootfs.tar" . && podman import "$dir/rootfs.tar" "$image"
fi
cargo build -q --release -p dstack-agent
cargo build -q --release -p dstack-backends --example container_latency
for _ in $(seq 50); do [ -S "$dir/podman.sock" ] && break; sleep 0.1; done
"$CARGO_TARGET_DIR/release/examples/container_latency" "unix://$dir/podman.sock" "$image" "$n"
