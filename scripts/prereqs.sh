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
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "prereqs: installing ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
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
