#!/usr/bin/env bash
# A service scaled to zero (`replicas: 0..1`): the time from its first request until the
# answer (the proxy holds the request, the autoscaler starts a replica, the port check finds
# it ready), against the replica's own start-up time (the same app started by hand until its
# port answers). R rounds; the service is stopped and applied again between rounds.
#   usage: bench/scale_to_zero.sh [R]            (release build)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
rounds="${1:-5}"
cargo build -q --release -p dstack-cli -p dstack-agent
dstack="$CARGO_TARGET_DIR/release/dstack"
work="$(mktemp -d)"
export DSTACK_HOME="$work/home" DSTACK_AGENT_BIN="$CARGO_TARGET_DIR/release/dstack-agent"
app="$PWD/dstack-cli/tests/apps/service_app.py"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cleanup() {
  "$dstack" stop -y cold >/dev/null 2>&1 || true
  [ -f "$DSTACK_HOME/agent/agent.pid" ] && kill "$(cat "$DSTACK_HOME/agent/agent.pid")" 2>/dev/null || true
  [ -f "$DSTACK_HOME/server/server.json" ] && kill "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$DSTACK_HOME/server/server.json")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/cold.dstack.yml" <<CONF
type: service
name: cold
port: $port
auth: false
replicas: 0..1
scaling:
  metric: rps
  target: 10
commands:
  - python3 $app $port
CONF
python3 - "$dstack" "$work/cold.dstack.yml" "$app" "$port" "$rounds" <<'PY'
import json, os, socket, statistics, subprocess, sys, time, urllib.request
dstack, config, app, port, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def port_open():
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False

def own_start():
    started = time.perf_counter()
    p = subprocess.Popen(["python3", app, str(port)], stderr=subprocess.DEVNULL)
    while not port_open():
        time.sleep(0.001)
    took = time.perf_counter() - started
    p.kill(); p.wait()
    return took

def cold_request(url):
    subprocess.run([dstack, "apply", "-f", config, "-y", "-d"], check=True, capture_output=True)
    started = time.perf_counter()
    with urllib.request.urlopen(url + "first", timeout=120) as answer:
        assert answer.status == 200
    took = time.perf_counter() - started
    subprocess.run([dstack, "stop", "-y", "cold"], check=True, capture_output=True)
    while port_open():
        time.sleep(0.05)
    return took

own = [own_start() for _ in range(rounds)]
home = os.environ["DSTACK_HOME"]
subprocess.run([dstack, "ps"], check=True, capture_output=True)  # starts the server
server = json.load(open(os.path.join(home, "server", "server.json")))["url"]
url = f"{server}/proxy/services/main/cold/"
cold = [cold_request(url) for _ in range(rounds)]
ms = lambda xs: f"{statistics.median(xs) * 1000:.0f} ms (min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f})"
print(f"{rounds} rounds")
print(f"| the app's own start-up (process start to port open) | {ms(own)} |")
print(f"| first request to a service at zero replicas, until its answer | {ms(cold)} |")
PY
