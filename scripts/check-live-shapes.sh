#!/usr/bin/env bash
# dstack 0.22.5's own models parse a live `dstack server`'s answers (no Accept header, as
# dstack's client sends none): in a throw-away $DSTACK_HOME, the CLI starts the server and runs
# a local task; runs/get, runs/list, runs/get_plan, fleets/list and fleets/get are then fetched with the admin token and
# checked by scripts/check-dstack-shapes.sh (strictly: unknown fields refused).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
dstack="$CARGO_TARGET_DIR/debug/dstack"
home="$(mktemp -d)"
out="$(mktemp -d)"
cleanup() {
  [ -f "$home/server/server.json" ] && kill "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$home/server/server.json")" 2>/dev/null || true
  [ -f "$home/agent/agent.pid" ] && kill "$(cat "$home/agent/agent.pid")" 2>/dev/null || true
  rm -rf "$home" "$out"
}
trap cleanup EXIT
export DSTACK_HOME="$home"
"$dstack" apply -y -f examples/hello.dstack.yml >/dev/null
read -r url token < <(python3 - "$home" <<'PY'
import json, re, sys
home = sys.argv[1]
url = json.load(open(f"{home}/server/server.json"))["url"]
token = re.search(r'token: "([^"]+)"', open(f"{home}/config.yml").read()).group(1)
print(url, token)
PY
)
post() {
  curl -sf -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    --data "$2" "$url$1"
}
post /api/runs/list '{"only_active": false}' > "$out/RunList.live.json"
run_name="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["run_spec"]["run_name"])' "$out/RunList.live.json")"
post /api/project/main/runs/get "{\"run_name\": \"$run_name\"}" > "$out/Run.live.json"
post /api/project/main/runs/get_plan \
  '{"run_spec": {"configuration": {"type": "task", "commands": ["echo hi"]}}}' > "$out/RunPlan.live.json"
post /api/project/main/fleets/list '{}' > "$out/FleetList.live.json"
post /api/project/main/fleets/get '{"name": "local"}' > "$out/Fleet.live.json"
echo "==> a live server's answers: runs/list, runs/get, runs/get_plan, fleets/list, fleets/get"
bash scripts/check-dstack-shapes.sh "$out"
