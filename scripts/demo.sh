#!/usr/bin/env bash
# The main job, locally: build both programs, start a receiver on 127.0.0.1:8001, and deploy the
# example web server (examples/hello, busybox httpd FROM scratch) from its Dockerfile to a healthy
# container, through the real upload -> verify -> load -> run -> health-check pipeline.
#   scripts/demo.sh          deploy (again: a second run replaces the container, as an upgrade would)
#   scripts/demo.sh --down   stop the receiver, remove the container and the demo's images
set -euo pipefail
cd "$(dirname "$0")/.."

name=hello-deploy
port=${DEMO_PORT:-8080}
receiver_addr=${DEMO_RECEIVER_ADDR:-127.0.0.1:8001}
work=.demo
mkdir -p "$work"

stop_receiver() {
  if [ -f "$work/receiver.pid" ] && kill -0 "$(cat "$work/receiver.pid")" 2>/dev/null; then
    kill "$(cat "$work/receiver.pid")" && echo "receiver stopped"
  fi
  rm -f "$work/receiver.pid"
}

if [ "${1:-}" = "--down" ]; then
  stop_receiver
  docker rm -f "$name" >/dev/null 2>&1 && echo "container $name removed" || true
  docker images --format '{{.Repository}}:{{.Tag}}' | grep "^$name:" | xargs -r docker rmi >/dev/null && echo "images removed" || true
  exit 0
fi

scripts/prereqs.sh --demo
echo "==> building deploy-sender and deploy-receiver (release)"
cargo build --release -q -p deploy-sender -p deploy-receiver
# Where cargo put them (CARGO_TARGET_DIR or a build.target-dir setting move target/).
bin=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release
cp /bin/busybox examples/hello/busybox

[ -s "$work/secret" ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$work/secret"
export DEPLOY_HMAC_SECRET
DEPLOY_HMAC_SECRET=$(cat "$work/secret")

if ! curl -fsS "http://$receiver_addr/health" >/dev/null 2>&1; then
  echo "==> starting deploy-receiver on $receiver_addr (log: $work/receiver.log)"
  RECEIVER_BIND=$receiver_addr PACKAGE_DIR=$work/receiver-packages ALLOWED_NETWORKS=127.0.0.0/8 \
    nohup "$bin/deploy-receiver" >"$work/receiver.log" 2>&1 &
  echo $! > "$work/receiver.pid"
  for _ in $(seq 1 50); do curl -fsS "http://$receiver_addr/health" >/dev/null 2>&1 && break; sleep 0.2; done
fi
curl -fsS "http://$receiver_addr/health" >/dev/null || { echo "receiver did not start; see $work/receiver.log" >&2; exit 1; }

tag="$name:v$(date +%Y%m%d%H%M%S)"
echo "==> deploying examples/hello as $tag to http://$receiver_addr"
PACKAGE_DIR=$work/sender-packages "$bin/deploy-sender" deploy \
  --dockerfile Dockerfile --context examples/hello --tag "$tag" \
  --to "http://$receiver_addr" --name "$name" --port "127.0.0.1:$port:80" --health docker

echo
echo "==> $name is running and healthy:"
curl -fsS "http://127.0.0.1:$port/"
cat <<MSG

Reach it:        curl http://127.0.0.1:$port/
Receiver:        http://$receiver_addr/health  /docs  /metrics  /openapi.json
Deploy again:    scripts/demo.sh        (replaces the container; a failing version is rolled back)
Remove it all:   scripts/demo.sh --down
MSG
