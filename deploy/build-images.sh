#!/usr/bin/env bash
# Builds the deploy-receiver and deploy-sender container images WITHOUT pulling anything:
# static x86_64 binaries (glibc with crt-static; no musl target needed) are packaged FROM scratch.
#
#   deploy/build-images.sh                 # images deploy-receiver:<version> and :latest, same for sender
#   TAG=1.2.3 deploy/build-images.sh       # another tag
#   SKIP_CARGO=1 deploy/build-images.sh    # package binaries already built
#
# Environment: TAG (default: the workspace version), STATIC_TARGET_DIR (default target/static),
# IMAGES ("receiver sender"), SKIP_CARGO.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

triple=x86_64-unknown-linux-gnu
target_dir="${STATIC_TARGET_DIR:-$root/target/static}"
images="${IMAGES:-receiver sender}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
tag="${TAG:-$version}"
revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

if [[ -z "${SKIP_CARGO:-}" ]]; then
  packages=()
  for image in $images; do packages+=(-p "deploy-$image"); done
  echo "==> cargo build --release (static, $triple) into $target_dir"
  # --target keeps RUSTFLAGS away from build scripts and proc macros, which must stay dynamic.
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked "${packages[@]}" --target "$triple" --target-dir "$target_dir"
fi

context="$target_dir/image-context"
rm -rf "$context"
mkdir -p "$context/rootfs/etc" "$context/rootfs/tmp" \
  "$context/rootfs/var/lib/deploy-receiver/packages" "$context/rootfs/var/lib/deploy-receiver/state" \
  "$context/rootfs/var/lib/deploy-sender/packages" "$context/rootfs/var/lib/deploy-sender/state"
chmod 1777 "$context/rootfs/tmp"
chmod -R 0750 "$context/rootfs/var/lib/deploy-receiver" "$context/rootfs/var/lib/deploy-sender"
printf 'root:x:0:0:root:/:/sbin/nologin\ndeploy:x:10001:10001:deploy:/nonexistent:/sbin/nologin\n' >"$context/rootfs/etc/passwd"
printf 'root:x:0:\ndeploy:x:10001:\n' >"$context/rootfs/etc/group"
# Static glibc resolves names with its built-in files and dns services; say so explicitly.
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$context/rootfs/etc/nsswitch.conf"

for image in $images; do
  binary="$target_dir/$triple/release/deploy-$image"
  [[ -x "$binary" ]] || { echo "error: $binary is missing: run without SKIP_CARGO" >&2; exit 1; }
  # A dynamic binary would start nowhere FROM scratch: refuse it here, not at run time. (A
  # static-pie has a dynamic section but no program interpreter and no NEEDED libraries.)
  if readelf -lW "$binary" | grep -q 'program interpreter' || readelf -dW "$binary" | grep -q '(NEEDED)'; then
    echo "error: $binary is dynamically linked:" >&2
    ldd "$binary" >&2 || true
    exit 1
  fi
  # Debug line tables are for local backtraces; the image gets the binary without them.
  strip --strip-debug -o "$context/deploy-$image" "$binary"
  chmod 0755 "$context/deploy-$image"
  echo "==> docker build deploy-$image:$tag ($(du -h "$context/deploy-$image" | cut -f1) static binary)"
  DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build --pull=false \
    -f "deploy/$image.scratch.Dockerfile" \
    -t "deploy-$image:$tag" -t "deploy-$image:latest" \
    --label "org.opencontainers.image.title=deploy-$image" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    "$context"
done
docker image ls --filter "reference=deploy-*" --format 'table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.Size}}'
