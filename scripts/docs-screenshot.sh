#!/usr/bin/env bash
# Proves that the receiver's /docs page renders the API with the network off: starts a receiver on
# loopback and takes a screenshot of http://127.0.0.1:PORT/docs/ with headless Chromium.
#   scripts/docs-screenshot.sh [OUT.png]      default docs/receiver-docs.png
# As root (where `unshare --net` works) the receiver and Chromium run in a network namespace of
# their own that has only loopback: any request to a CDN would fail. Otherwise Chromium is still
# kept off the network (dead proxy for everything but loopback, no name resolution).
# Needs: chromium (Debian: apt-get install -y chromium), cargo, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/receiver-docs.png}

command -v chromium >/dev/null || { echo "docs-screenshot: chromium is missing (apt-get install -y chromium)" >&2; exit 1; }

if [ -z "${DOCS_SHOT_OFFLINE:-}" ]; then
  cargo build -q -p deploy-receiver
  if [ "$(id -u)" = 0 ] && unshare --net true 2>/dev/null; then
    exec unshare --net env DOCS_SHOT_OFFLINE=netns bash "$0" "$out"
  fi
  DOCS_SHOT_OFFLINE=flags
fi
if [ "$DOCS_SHOT_OFFLINE" = netns ]; then
  ip link set lo up
  echo "docs-screenshot: in a network namespace with loopback only"
fi

work=$(mktemp -d)
receiver_pid=
cleanup() {
  [ -n "$receiver_pid" ] && kill "$receiver_pid" 2>/dev/null && wait "$receiver_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RECEIVER_BIND=127.0.0.1:$port PACKAGE_DIR=$work/packages ALLOWED_NETWORKS=127.0.0.0/8 \
  DEPLOY_HMAC_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))') \
  target/debug/deploy-receiver >"$work/receiver.log" 2>&1 &
receiver_pid=$!
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "http://127.0.0.1:$port/health" >/dev/null || { cat "$work/receiver.log" >&2; exit 1; }

url=http://127.0.0.1:$port/docs/
mkdir -p "$(dirname "$out")"
rm -f "$out"
set -x
chromium --headless --no-sandbox --disable-gpu --screenshot="$out" --window-size=1280,2000 \
  --virtual-time-budget=5000 \
  --proxy-server=http://127.0.0.1:9 --proxy-bypass-list='127.0.0.1;localhost' \
  --host-resolver-rules='MAP * ~NOTFOUND, EXCLUDE 127.0.0.1' \
  "$url" 2>"$work/chromium.log"
{ set +x; } 2>/dev/null
[ -s "$out" ] || { cat "$work/chromium.log" >&2; echo "docs-screenshot: no screenshot taken" >&2; exit 1; }
echo "docs-screenshot: $url -> $out"
