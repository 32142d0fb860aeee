#!/usr/bin/env bash
# Builds the deploy-receiver and deploy-sender container images WITHOUT pulling anything: the
# binaries of the README's build (`cargo build --release`) are packaged FROM scratch together with
# the shared libraries they link (glibc and its loader, as `ldd` lists them), so no static or musl
# toolchain is needed. A static binary is packaged as it is.
#
#   deploy/build-images.sh                        # deploy-receiver:<version> and :latest, same for sender
#   TAG=1.2.3 deploy/build-images.sh              # another tag
#   SKIP_CARGO=1 deploy/build-images.sh           # package the binaries already in BIN_DIR
#   BIN_DIR=target/debug SKIP_CARGO=1 ...         # package other binaries (the tests do)
#
# Environment: TAG (default: the workspace version), LATEST (1: also tag :latest; 0: do not),
# BIN_DIR (default target/release, or $CARGO_TARGET_DIR/release), IMAGES ("receiver sender"),
# SKIP_CARGO.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

images="${IMAGES:-receiver sender}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
tag="${TAG:-$version}"
latest="${LATEST:-1}"
revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
bin_dir="${BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/release}"

if [[ -z "${SKIP_CARGO:-}" ]]; then
  packages=()
  for image in $images; do packages+=(-p "deploy-$image"); done
  echo "==> cargo build --release ${packages[*]}"
  cargo build --release --locked "${packages[@]}"
fi

# One staging directory per image: its binary, the libraries that binary needs, a minimal /etc.
stage() {
  local image=$1 binary=$2 context=$3
  rm -rf "$context"
  mkdir -p "$context/rootfs/etc" "$context/rootfs/tmp" \
    "$context/data/packages" "$context/data/state"
  chmod 1777 "$context/rootfs/tmp"
  chmod -R 0750 "$context/data"
  printf 'root:x:0:0:root:/:/sbin/nologin\ndeploy:x:10001:10001:deploy:/nonexistent:/sbin/nologin\n' >"$context/rootfs/etc/passwd"
  printf 'root:x:0:\ndeploy:x:10001:\n' >"$context/rootfs/etc/group"
  # glibc resolves names with its built-in files and dns services (compose service names too).
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$context/rootfs/etc/nsswitch.conf"
  # Debug line tables are for local backtraces; the image gets the binary without them.
  strip --strip-debug -o "$context/deploy-$image" "$binary"
  chmod 0755 "$context/deploy-$image"
  local interpreter
  interpreter="$(readelf -lW "$binary" | sed -n 's/.*\[Requesting program interpreter: \(.*\)\]/\1/p')"
  if [[ -n "$interpreter" ]]; then
    # Every library at the path the loader finds it on this host, and the loader itself.
    local libs
    libs="$(ldd "$binary" | awk '/=> \//{print $3} /^\s*\//{print $1}')"
    for lib in $interpreter $libs; do
      mkdir -p "$context/rootfs$(dirname "$lib")"
      cp -L "$lib" "$context/rootfs$lib"
    done
    echo "    dynamic binary: carries $(echo "$interpreter" $libs | wc -w) libraries ($(du -sh "$context/rootfs" | cut -f1))"
  else
    echo "    static binary: no libraries needed"
  fi
}

for image in $images; do
  binary="$bin_dir/deploy-$image"
  [[ -x "$binary" ]] || { echo "error: $binary is missing: build it (cargo build --release) or run without SKIP_CARGO" >&2; exit 1; }
  context="$bin_dir/image-context/$image"
  echo "==> staging $binary"
  stage "$image" "$binary" "$context"
  tags=(-t "deploy-$image:$tag")
  [[ "$latest" == 1 ]] && tags+=(-t "deploy-$image:latest")
  echo "==> docker build ${tags[*]}"
  DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build --pull=false -q \
    -f "deploy/$image.scratch.Dockerfile" "${tags[@]}" \
    --label "org.opencontainers.image.title=deploy-$image" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    "$context"
  # The image must start: a missing library shows here, not on the target host.
  docker run --rm --entrypoint "/deploy-$image" "deploy-$image:$tag" --version
done
docker image ls --filter "reference=deploy-receiver:$tag" --filter "reference=deploy-sender:$tag" \
  --format 'table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.Size}}'
