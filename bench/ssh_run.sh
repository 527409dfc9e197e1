#!/usr/bin/env bash
# `ssh <run> true` (the whole process: OpenSSH client, `dstack ssh-proxy`, the server's
# `runs/ssh` tunnel, the agent's SSH endpoint) against plain `ssh` to an sshd on this machine
# (the floor: an sshd in a network namespace, 10.231.253.2), for a dev environment on this
# machine and one on that same sshd host as an SSH fleet (the run's host reached directly is
# the floor). Median and p90 of N runs each (release build).
#   usage: bench/ssh_run.sh [N]   (default 50; needs root, iproute2, openssh-server;
#   PROFILE=debug to try it on a debug build)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
n="${1:-50}"
ns=dsrbenchssh
dir="$(mktemp -d)"
cleanup() {
  if [ -f "$dir/dh/server/server.json" ]; then
    kill "$(sed 's/.*"pid":\([0-9]*\).*/\1/' "$dir/dh/server/server.json")" 2>/dev/null || true
  fi
  [ -f "$dir/dh/agent/agent.pid" ] && kill "$(cat "$dir/dh/agent/agent.pid")" 2>/dev/null || true
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
  ip link del vdsrbenchssh 2>/dev/null || true
  rm -rf "$HOME"/.dstack-rs/bench-ssh-run-* "$dir"
}
trap cleanup EXIT
profile="${PROFILE:-release}"
if [ "$profile" = release ]; then
  cargo build -q --release -p dstack-cli -p dstack-agent
else
  cargo build -q -p dstack-cli -p dstack-agent
fi
bin="$CARGO_TARGET_DIR/$profile"
ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
cp "$dir/client_key.pub" "$dir/authorized_keys"
ip netns add "$ns"
ip link add vdsrbenchssh type veth peer name vdsrbenchsshn
ip link set vdsrbenchsshn netns "$ns"
ip addr add 10.231.253.1/30 dev vdsrbenchssh && ip link set vdsrbenchssh up
ip netns exec "$ns" ip addr add 10.231.253.2/30 dev vdsrbenchsshn
ip netns exec "$ns" ip link set vdsrbenchsshn up && ip netns exec "$ns" ip link set lo up
mkdir -p /run/sshd
# Logins start plain (this machine's ~/.bashrc may run slow tools): masked in the host's own
# mount namespace only.
ip netns exec "$ns" sh -c "[ -f \"\$HOME/.bashrc\" ] && mount --bind /dev/null \"\$HOME/.bashrc\"; \
  exec /usr/sbin/sshd -f /dev/null -h $dir/host_key -o ListenAddress=10.231.253.2 \
  -o PidFile=$dir/sshd.pid -o AuthorizedKeysFile=$dir/authorized_keys -o StrictModes=no \
  -o UsePAM=no -o PermitRootLogin=prohibit-password -o MaxStartups=100"
sleep 0.5

export HOME="$dir/home" DSTACK_HOME="$dir/dh" DSTACK_AGENT_BIN="$bin/dstack-agent"
mkdir -p "$HOME"
cat > "$dir/fleet.yml" <<YAML
type: fleet
name: bench-ssh-run
ssh_config:
  user: root
  identity_file: $dir/client_key
  hosts: [10.231.253.2]
YAML
cat > "$dir/local.yml" <<YAML
type: dev-environment
name: bench-local
backends: [local]
resources: {cpu: 1.., memory: 0.1GB..}
YAML
cat > "$dir/remote.yml" <<YAML
type: dev-environment
name: bench-remote
fleets: [bench-ssh-run]
resources: {cpu: 1.., memory: 0.1GB..}
YAML
"$bin/dstack" apply -f "$dir/fleet.yml" -y >/dev/null
"$bin/dstack" apply -f "$dir/local.yml" -y -d >/dev/null 2>&1
"$bin/dstack" apply -f "$dir/remote.yml" -y -d >/dev/null 2>&1
for host in bench-local bench-remote; do
  for _ in $(seq 300); do
    grep -q "^Host $host " "$DSTACK_HOME/ssh/config" 2>/dev/null && break
    sleep 0.1
  done
done

cfg="$HOME/.ssh/config"
floor=(ssh -F /dev/null -i "$dir/client_key" -o IdentitiesOnly=yes -o BatchMode=yes
       -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@10.231.253.2)
measure() { # label, command...
  local label="$1"; shift
  "$@" true  # warm up, and fail early
  python3 - "$n" "$label" "$@" <<'PY'
import subprocess, sys, time
n, label, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
times = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(cmd + ["true"], check=True, stdin=subprocess.DEVNULL)
    times.append((time.perf_counter() - t) * 1000)
times.sort()
print(f"{label:<40} median {times[len(times) // 2]:7.1f} ms   p90 {times[int(len(times) * 0.9)]:7.1f} ms")
PY
}
echo "ssh <run> true vs plain ssh, $n runs each ($profile build)"
measure "plain ssh to the sshd host (floor)" "${floor[@]}"
measure "ssh bench-local (this machine)" ssh -F "$cfg" -o BatchMode=yes bench-local
measure "ssh bench-remote (on the sshd host)" ssh -F "$cfg" -o BatchMode=yes bench-remote
"$bin/dstack" stop bench-local -y >/dev/null
"$bin/dstack" stop bench-remote -y >/dev/null
"$bin/dstack" fleet delete bench-ssh-run -y >/dev/null || true
