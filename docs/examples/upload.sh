#!/usr/bin/env bash
# Uploads a package to a deploy-receiver with nothing but bash, curl, openssl and python3's blake3
# (pip install blake3): a worked example of wire protocol v1 (docs/PROTOCOL.md).
#   usage: DEPLOY_HMAC_SECRET=... docs/examples/upload.sh http://127.0.0.1:8001 package.tar.zst zstd
set -euo pipefail
url=${1:?receiver URL}; pkg=${2:?package file}; compression=${3:-zstd}
secret=${DEPLOY_HMAC_SECRET:?set DEPLOY_HMAC_SECRET}; key_id=${DEPLOY_HMAC_KEY_ID:-default}
b3() { python3 -c 'import sys, blake3; print(blake3.blake3(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
package_id=$(python3 -c 'import uuid; print(uuid.uuid4())')
printf '{"package_id":"%s","package_checksum":"%s","package_size":%d,"compression":"%s"}' \
  "$package_id" "$(b3 "$pkg")" "$(stat -c %s "$pkg")" "$compression" > "$work/manifest.json"

path=/deployment/upload
# The authority signed is the Host header curl sends: host[:port] of the URL, lower case.
authority=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(p.netloc.rsplit("@", 1)[-1].lower())' "$url")
timestamp=$(date +%s)
nonce=$(openssl rand -hex 16)
canonical=$(printf 'DEPLOY-HMAC-SHA256\n%s\n%s\n%s\n%s\n%s\n%s\n%s' \
  POST "$authority" "$path" "$timestamp" "$nonce" "$key_id" "$(b3 "$work/manifest.json")")
signature=$(printf '%s' "$canonical" | openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)

curl -sS --fail-with-body "$url$path" \
  -H "X-Deploy-Key-Id: $key_id" -H "X-Deploy-Timestamp: $timestamp" \
  -H "X-Deploy-Nonce: $nonce" -H "X-Deploy-Signature: $signature" \
  -F "manifest=@$work/manifest.json;type=application/json" \
  -F "package=@$pkg;type=application/octet-stream"
echo
