#!/usr/bin/env bash
# Validates docker-compose.yml (with .env.example's values) using whichever compose tool this host
# has: the `docker compose` plugin or the standalone `docker-compose`. Fails when there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "error: neither 'docker compose' nor 'docker-compose' is installed (Debian: apt-get install docker-compose)" >&2
  exit 1
fi
"${compose[@]}" --env-file .env.example -f docker-compose.yml config -q
echo "docker-compose.yml is valid (${compose[*]})"
