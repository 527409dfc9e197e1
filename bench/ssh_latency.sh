#!/usr/bin/env bash
# Submit→running on an idle SSH fleet host: one sshd host in a network namespace
# (10.231.254.2), a fleet applied to it, then N sequential `true` tasks (release build).
#   usage: bench/ssh_latency.sh [N]   (default 200; needs root, iproute2, openssh-server)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
n="${1:-200}"
ns=dsrbench
dir="$(mktemp -d)"
cleanup() {
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
  ip link del vdsrbench 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
cleanup; dir="$(mktemp -d)"
ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
cp "$dir/client_key.pub" "$dir/authorized_keys"
ip netns add "$ns"
ip link add vdsrbench type veth peer name vdsrbenchn
ip link set vdsrbenchn netns "$ns"
ip addr add 10.231.254.1/30 dev vdsrbench && ip link set vdsrbench up
ip netns exec "$ns" ip addr add 10.231.254.2/30 dev vdsrbenchn
ip netns exec "$ns" ip link set vdsrbenchn up && ip netns exec "$ns" ip link set lo up
mkdir -p /run/sshd
ip netns exec "$ns" /usr/sbin/sshd -f /dev/null -h "$dir/host_key" -o ListenAddress=10.231.254.2 \
  -o PidFile="$dir/sshd.pid" -o AuthorizedKeysFile="$dir/authorized_keys" -o StrictModes=no \
  -o UsePAM=no -o PermitRootLogin=prohibit-password
cat > "$dir/fleet.yml" <<YAML
type: fleet
name: bench-ssh
ssh_config:
  user: root
  identity_file: $dir/client_key
  hosts: [10.231.254.2]
YAML
cargo build -q --release -p dstack-agent
cargo build -q --release -p dstack-backends --example ssh_latency
"$CARGO_TARGET_DIR/release/examples/ssh_latency" "$dir/fleet.yml" "$n"
