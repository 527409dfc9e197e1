#!/usr/bin/env bash
# The services proxy against nginx, side by side in one run, loopback only: the same app (an
# nginx answering a fixed 200, fast enough not to be the bottleneck, run as the service's
# job) reached (a) directly, (b) through `dstack server`'s proxy at the service URL, with the
# token, and (c) through nginx as a reverse proxy (upstream keep-alive, as one would set it
# up). Each gets a warm-up, then N requests at concurrency C with keep-alive (`ab -k`);
# requests/s and p50/p99 latency are printed as a Markdown table.
#   usage: bench/proxy.sh [N] [C]            (release build; installs nginx and ab with apt)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
n="${1:-20000}"
c="${2:-16}"
if ! command -v nginx >/dev/null || ! command -v ab >/dev/null; then
  apt-get install -y -q nginx-light apache2-utils >/dev/null
fi
cargo build -q --release -p dstack-cli -p dstack-agent
dstack="$CARGO_TARGET_DIR/release/dstack"
work="$(mktemp -d)"
export DSTACK_HOME="$work/home" DSTACK_AGENT_BIN="$CARGO_TARGET_DIR/release/dstack-agent"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
app_port="$(free_port)"
proxy_port="$(free_port)"
cleanup() {
  "$dstack" stop -y bench-app >/dev/null 2>&1 || true
  [ -f "$work/proxy.pid" ] && kill "$(cat "$work/proxy.pid")" 2>/dev/null || true
  [ -f "$DSTACK_HOME/agent/agent.pid" ] && kill "$(cat "$DSTACK_HOME/agent/agent.pid")" 2>/dev/null || true
  [ -f "$DSTACK_HOME/server/server.json" ] && kill "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$DSTACK_HOME/server/server.json")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/app.conf" <<CONF
worker_processes 1;
pid $work/app.pid;
error_log stderr;
events {}
http {
  access_log off;
  server { listen 127.0.0.1:$app_port; location / { return 200 "ok\n"; } }
}
CONF
cat > "$work/proxy.conf" <<CONF
worker_processes 1;
pid $work/proxy.pid;
error_log stderr;
events {}
http {
  access_log off;
  upstream app { server 127.0.0.1:$app_port; keepalive 32; }
  server {
    listen 127.0.0.1:$proxy_port;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
cat > "$work/service.dstack.yml" <<CONF
type: service
name: bench-app
port: $app_port
commands:
  - nginx -p $work -c $work/app.conf -g 'daemon off;'
CONF
"$dstack" apply -f "$work/service.dstack.yml" -y -d >/dev/null
nginx -p "$work" -c "$work/proxy.conf"
url="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$DSTACK_HOME/server/server.json")/proxy/services/main/bench-app/"
token="$(sed -n 's/^ *token: "\(.*\)"/\1/p' "$DSTACK_HOME/config.yml" | head -1)"
for _ in $(seq 100); do
  code="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "$url" || true)"
  [ "$code" = 200 ] && break
  sleep 0.2
done
[ "$code" = 200 ] || { echo "the service did not become ready ($code)"; exit 1; }

measure() { # name url [header]
  local name="$1" target="$2"; shift 2
  ab -q -k -n 2000 -c "$c" "$@" "$target" >/dev/null 2>&1
  ab -q -k -n "$n" -c "$c" -e "$work/$name.csv" "$@" "$target" > "$work/$name.out" 2>&1
  local rps p50 p99 failed
  rps="$(sed -n 's/^Requests per second: *\([0-9.]*\).*/\1/p' "$work/$name.out")"
  failed="$(sed -n 's/^Failed requests: *\([0-9]*\).*/\1/p' "$work/$name.out")"
  non2xx="$(sed -n 's/^Non-2xx responses: *\([0-9]*\).*/\1/p' "$work/$name.out")"
  p50="$(awk -F, '$1=="50"{print $2}' "$work/$name.csv")"
  p99="$(awk -F, '$1=="99"{print $2}' "$work/$name.csv")"
  printf '| %s | %s | %s | %s | %s |\n' "$name" "$rps" "$p50" "$p99" "$failed/${non2xx:-0}"
}
echo "$n requests, concurrency $c, keep-alive; latency in ms (ab's percentiles)"
echo "| path | requests/s | p50 ms | p99 ms | failed/non-2xx |"
echo "| --- | --- | --- | --- | --- |"
measure direct "http://127.0.0.1:$app_port/"
measure dstack-proxy "$url" -H "Authorization: Bearer $token"
measure nginx-proxy "http://127.0.0.1:$proxy_port/"
