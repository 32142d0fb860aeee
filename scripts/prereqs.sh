#!/usr/bin/env bash
# Installs and starts what the tests and the demo need on a fresh Debian machine (as root), or
# says exactly what is missing. Idempotent.
set -euo pipefail
demo_only=${1:-}

need_apt=()
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || need_apt+=(busybox-static)
command -v file >/dev/null || need_apt+=(file)
command -v zstd >/dev/null || need_apt+=(zstd)
if [ "$demo_only" != "--demo" ]; then
  command -v promtool >/dev/null || need_apt+=(prometheus)
  # the TLS test runs deploy/proxy/nginx.conf in front of a receiver, with certificates from openssl
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
  command -v openssl >/dev/null || need_apt+=(openssl)
  # the compose test runs docker-compose.yml's receiver and sender for real
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need_apt+=(docker-compose)
  # the receiver's start-up test runs it on a pseudo-terminal with util-linux `script`
  command -v script >/dev/null || need_apt+=(bsdutils)
  command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "prereqs: installing ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    apt-get clean
  else
    echo "prereqs: missing Debian packages: ${need_apt[*]} (install them, then re-run)" >&2
    exit 1
  fi
fi

# The Docker engine must answer; start it when this machine has it installed but stopped.
if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null; then
    echo "prereqs: starting dockerd"
    (service docker start >/dev/null 2>&1 || (nohup dockerd >/var/log/dockerd.log 2>&1 &)) || true
    for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
  fi
  docker info >/dev/null 2>&1 || { echo "prereqs: the Docker engine is not reachable (DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}); the end-to-end tests need it" >&2; exit 1; }
fi

[ "$demo_only" = "--demo" ] && exit 0

# Python tools of the API tests: openapi-spec-validator checks both OpenAPI documents, and
# schemathesis fuzzes both running services (its hook signs receiver requests with blake3).
py_missing=()
python3 -c 'import openapi_spec_validator' 2>/dev/null || py_missing+=("openapi-spec-validator==0.9.0")
python3 -c 'import schemathesis' 2>/dev/null || py_missing+=("schemathesis==4.32.5")
python3 -c 'import blake3' 2>/dev/null || py_missing+=("blake3==1.0.11")
if [ ${#py_missing[@]} -gt 0 ]; then
  echo "prereqs: installing ${py_missing[*]} (PyPI)"
  # Debian's own python3 refuses plain `pip install` (PEP 668); these are test tools, so allow it.
  python3 -m pip install --quiet "${py_missing[@]}" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "${py_missing[@]}" || {
    echo "prereqs: could not install ${py_missing[*]} with pip" >&2; exit 1; }
fi
