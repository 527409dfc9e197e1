#!/usr/bin/env bash
# A 200-trial sweep on two SSH fleet hosts (sshd in network namespaces 10.231.253.2 and
# 10.231.253.6), without a repo and with a 50 MB repo (50 files of random bytes, committed):
# the wall time of each and how many times the hosts received the repo (release build).
#   usage: bench/repo_sweep.sh [N]   (default 200; needs root, iproute2, openssh-server, git)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
n="${1:-200}"
dir="$(mktemp -d)"
cleanup() {
  for k in 1 2; do
    for p in $(ip netns pids "dsrrepo$k" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "dsrrepo$k" 2>/dev/null || true
    ip link del "vdsrrepo$k" 2>/dev/null || true
  done
  rm -rf "$dir" "$HOME"/.dstack-rs/bench-repo-*
}
trap cleanup EXIT
cleanup; dir="$(mktemp -d)"
ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
cp "$dir/client_key.pub" "$dir/authorized_keys"
mkdir -p /run/sshd
hosts=()
for k in 1 2; do
  ns="dsrrepo$k"; base=$(( (k - 1) * 4 ))
  ip netns add "$ns"
  ip link add "vdsrrepo$k" type veth peer name "vdsrrepo${k}n"
  ip link set "vdsrrepo${k}n" netns "$ns"
  ip addr add "10.231.253.$((base + 1))/30" dev "vdsrrepo$k" && ip link set "vdsrrepo$k" up
  ip netns exec "$ns" ip addr add "10.231.253.$((base + 2))/30" dev "vdsrrepo${k}n"
  ip netns exec "$ns" ip link set "vdsrrepo${k}n" up && ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" /usr/sbin/sshd -f /dev/null -h "$dir/host_key" \
    -o ListenAddress="10.231.253.$((base + 2))" -o PidFile="$dir/sshd$k.pid" \
    -o AuthorizedKeysFile="$dir/authorized_keys" -o StrictModes=no -o UsePAM=no \
    -o PermitRootLogin=prohibit-password
  hosts+=("10.231.253.$((base + 2))")
done
cat > "$dir/fleet.yml" <<YAML
type: fleet
name: bench-repo
ssh_config:
  user: root
  identity_file: $dir/client_key
  hosts: [${hosts[0]}, ${hosts[1]}]
YAML
mkdir -p "$dir/repo/src"
for i in $(seq 1 50); do head -c 1048576 /dev/urandom > "$dir/repo/src/blob$i.bin"; done
git -C "$dir/repo" init -q
git -C "$dir/repo" add .
git -C "$dir/repo" -c user.name=bench -c user.email=bench@example.com commit -qm repo
cargo build -q --release -p dstack-agent
cargo build -q --release -p dstack-backends --example repo_sweep
DSTACK_AGENT_BIN="$CARGO_TARGET_DIR/release/dstack-agent" \
  "$CARGO_TARGET_DIR/release/examples/repo_sweep" "$dir/fleet.yml" "$dir/repo" "$n"
