#!/usr/bin/env bash
# Builds the vpcni image, localhost/vpcni:<version in pyproject.toml>, with podman and
# no container registry (docs/image.md):
#   1. a base root file system from Debian packages (mmdebstrap --variant=minbase, the
#      packages in deploy/image/base-packages), cached as a tarball under
#      /var/cache/vpcni/image and imported as localhost/vpcni-base:<suite>-<hash of its inputs>;
#   2. on the host, from this checkout: gobgpd's gRPC stubs, the vpcni wheel (stubs
#      included), wheels of its dependencies from PyPI (less grpcio-tools, pinned to the
#      versions in .venv), the static Go shim;
#   3. `podman build -f deploy/image/Containerfile` FROM that base, with no network.
# Idempotent: installs only missing Debian packages, reuses the cached base and wheels,
# and does not rebuild an image whose inputs have not changed (label io.vpcni.build).
# As root. Environment: VPCNI_BASE_REFRESH=1 makes the base again (Debian updates);
# VPCNI_DEBIAN_MIRROR, VPCNI_DEBIAN_SECURITY_MIRROR; VPCNI_IMAGE_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${VPCNI_IMAGE_CACHE:-/var/cache/vpcni/image}
SUITE=bookworm
MIRROR=${VPCNI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${VPCNI_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# The interpreter of the image's venv: the shim's standalone mode runs it.
IMAGE_PYTHON=/opt/vpcni/venv/bin/python
CONTAINERFILE=deploy/image/Containerfile

start=$SECONDS
log() { printf 'build-image: [%3ds] %s\n' "$((SECONDS - start))" "$*"; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (podman, mmdebstrap)"

# ------------------------------------------------------------------ host packages
# runc, not crun: crun 1.8 (bookworm) refuses hosts whose cgroup v2 hierarchy is mounted
# beside v1 with a controller in it ("cgroups in hybrid mode not supported"); runc
# works on v1, hybrid and v2 alike.
APT_PACKAGES=(podman runc mmdebstrap)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The host side of the build (Go toolchain, gobgpd and its .proto files, a venv with
# grpcio-tools) is what scripts/setup.sh installs.
if ! .venv/bin/python -c 'import grpc_tools, vpcni.cni.install' 2>/dev/null \
   || ! command -v go >/dev/null || ! command -v gobgpd >/dev/null; then
  log "running scripts/setup.sh"
  ./scripts/setup.sh
fi
PY=$ROOT/.venv/bin/python
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE=localhost/vpcni:$VERSION
CONTROLLER_IMAGE=localhost/vpcni-controller:$VERSION

mkdir -p "$CACHE/tmp" "$CACHE/wheels"
exec 9>"$CACHE/.lock"
flock 9  # one build at a time on this machine

# podman: runc (above), and rlimits no higher than this process has: podman's defaults
# (nofile 1048576, nproc from pid_max) need CAP_SYS_RESOURCE to raise a hard limit,
# which some hosts (this project's VMs) do not grant even to root.
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
pid_max=$(cat /proc/sys/kernel/pid_max)
if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
if [ "$nofile" = unlimited ]; then nofile=1048576; fi
BUILD_FLAGS=(--runtime runc --network none --pull=never --layers=false
             --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

work=$(mktemp -d "$CACHE/tmp/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ------------------------------------------------------------------ 1. the base
mapfile -t BASE_PACKAGES < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' deploy/image/base-packages)
DPKG_FILTERS=(
  'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*'
  'path-exclude=/usr/share/locale/*' 'path-exclude=/usr/share/lintian/*'
  'path-exclude=/usr/share/bash-completion/*'
  'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright'
  # openvswitch-common: ovs-ofctl only
  'path-exclude=/usr/bin/ovs*' 'path-exclude=/usr/sbin/ovs*' 'path-include=/usr/bin/ovs-ofctl'
  'path-exclude=/usr/share/openvswitch/*'
  # glibc's iconv modules: nothing here converts character sets through iconv
  'path-exclude=/usr/lib/*/gconv/*'
)
SOURCES=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main"
         "deb $SECURITY_MIRROR $SUITE-security main")
# Left over by the package installation, never read at run time. (Not $1/tmp: mmdebstrap
# still needs what it keeps there for its own cleanup of apt's lists and cache.)
CLEANUP='rm -f "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old; find "$1/var/log" -type f -delete'
# The merged-usr hook: /usr merged by mmdebstrap, and apt satisfies init-system-helpers'
# "usrmerge | usr-is-merged" without usrmerge (which pulls in perl, ~45 MB).
MMDEBSTRAP_OPTS=(--variant=minbase --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")"
                 --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --customize-hook="$CLEANUP")
for f in "${DPKG_FILTERS[@]}"; do MMDEBSTRAP_OPTS+=(--dpkgopt="$f"); done
base_key=$(printf '%s\n' "$SUITE" "${SOURCES[@]}" "${MMDEBSTRAP_OPTS[@]}" \
             "$(dpkg-query -W -f='${Version}' mmdebstrap)" | sha256sum | cut -c1-12)
BASE=localhost/vpcni-base:$SUITE-$base_key
tarball=$CACHE/base-$SUITE-$base_key.tar
if [ "${VPCNI_BASE_REFRESH:-0}" = 1 ]; then
  log "VPCNI_BASE_REFRESH=1: making $BASE again"
  rm -f "$tarball"
  if podman image exists "$BASE"; then
    replaced_base=$(podman image inspect --format '{{.Id}}' "$BASE")
    podman untag "$BASE"
  fi
fi
if [ ! -f "$tarball" ]; then
  log "mmdebstrap $SUITE: ${BASE_PACKAGES[*]}"
  if ! mmdebstrap "${MMDEBSTRAP_OPTS[@]}" \
        "$SUITE" "$work/base.tar" "${SOURCES[@]}" >"$work/mmdebstrap.log" 2>&1; then
    tail -40 "$work/mmdebstrap.log" >&2
    die "mmdebstrap failed (the end of its log above)"
  fi
  mv "$work/base.tar" "$tarball"
  # Bases of other inputs: only the one in use is kept.
  find "$CACHE" -maxdepth 1 -name "base-*.tar" ! -name "$(basename "$tarball")" -delete
fi
if ! podman image exists "$BASE"; then
  log "podman import $tarball as $BASE"
  podman import --quiet --change "LABEL io.vpcni.base.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --change 'CMD ["/bin/sh"]' "$tarball" "$BASE" >/dev/null
fi

# ------------------------------------------------------------------ 2. on the host
src=$work/src ctx=$work/ctx
mkdir -p "$src" "$ctx/deps" "$ctx/vpcni" "$ctx/opt/cni"
# This checkout as it is, what goes into the wheel: pyproject.toml and its packages'
# folders, tracked and untracked files (not ignored ones: no stubs generated for the
# tree's own use, no caches).
mapfile -t wheel_inputs < <("$PY" -c 'import tomllib; t = tomllib.load(open("pyproject.toml", "rb"))
print("pyproject.toml", "setup.py", *t["project"]["license-files"],
      *sorted(set(t["tool"]["setuptools"]["package-dir"].values())), sep="\n")')
git ls-files -z --cached --others --exclude-standard -- "${wheel_inputs[@]}" \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -C "$src" -xf -
# gobgpd's stubs into the package (grpcio-tools is a build-time tool: host only).
"$PY" -m vpcni.evpn.genstubs --out "$src/evpn/gobgpapi" >/dev/null
# The shim: build_go_shim() builds (or finds in /var/cache/vpcni) the static binary for
# the image's interpreter; it goes where that function caches it, under the image's
# VPCNI_BUILD_CACHE, and /opt/vpcni/cni/vpcni points at it.
shim=$("$PY" -c 'import sys; from vpcni.cni.install import build_go_shim; print(build_go_shim(sys.argv[1]))' "$IMAGE_PYTHON")
shim_key=$(basename "$(dirname "$shim")")
mkdir -p "$ctx/opt/cache/shim/$shim_key"
cp "$shim" "$ctx/opt/cache/shim/$shim_key/vpcni"
chmod 0755 "$ctx/opt/cache/shim/$shim_key/vpcni"
ln -s "../cache/shim/$shim_key/vpcni" "$ctx/opt/cni/vpcni"

# Dependencies: pyproject's and its ovs extra's (the node image serves ovs nodes too),
# less grpcio-tools; the controller extra's (kopf, kubernetes: 130 MB the nodes do not
# need) for the controller image only. Pinned to .venv's versions (what the tests run
# with; the stubs' protobuf and grpcio runtime checks hold for those).
"$PY" - "$src/pyproject.toml" "$work/controller-requirements.txt" >"$work/requirements.txt" <<'PYTHON'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
for dep in project["dependencies"] + extras["ovs"]:
    name = re.match(r"[A-Za-z0-9._-]+", dep).group(0).lower().replace("_", "-")
    if name != "grpcio-tools":
        print(dep)
open(sys.argv[2], "w").write("".join(f"{dep}\n" for dep in extras["controller"]))
PYTHON
"$PY" -m pip freeze --exclude-editable --disable-pip-version-check \
  | grep -v -i -e '^vpcni==' -e ' @ ' -e '^grpcio-tools==' >"$work/constraints.txt" || true
pip_version=$("$PY" -c 'import pip; print(pip.__version__)')
wheels_key=$(cat "$work/requirements.txt" "$work/controller-requirements.txt" "$work/constraints.txt" \
               <(echo "pip $pip_version"; "$PY" -c 'import sys, sysconfig; print(sys.version, sysconfig.get_platform())') \
             | sha256sum | cut -c1-12)
wheels=$CACHE/wheels/$wheels_key
if [ ! -d "$wheels" ]; then
  log "wheels of the dependencies (PyPI) into $wheels"
  rm -rf "$wheels.tmp"
  mkdir -p "$wheels.tmp"
  "$PY" -m pip wheel -q --disable-pip-version-check -w "$wheels.tmp" \
    -r "$work/requirements.txt" -r "$work/controller-requirements.txt" -c "$work/constraints.txt"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$wheels.tmp" "pip==$pip_version"
  cp "$work/requirements.txt" "$work/controller-requirements.txt" "$work/constraints.txt" \
    "$wheels.tmp/"
  mv "$wheels.tmp" "$wheels"
  # Wheelhouses of other inputs: only the one in use is kept.
  find "$CACHE/wheels" -mindepth 1 -maxdepth 1 -type d ! -name "$wheels_key" -exec rm -rf {} +
fi
cp -l "$wheels"/* "$ctx/deps/"

# Everything the image is made of, hashed: when the image has this hash, nothing to do.
base_id=$(podman image inspect --format '{{.Id}}' "$BASE")
build_hash=$(cd "$work" && "$PY" - "$ROOT/$CONTAINERFILE" "$base_id" <<'PYTHON'
import hashlib, os, sys
h = hashlib.sha256()
h.update(open(sys.argv[1], "rb").read() + b"\0" + sys.argv[2].encode())
for top in ("src", "ctx"):
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            h.update(path.encode() + b"\0" + oct(st.st_mode).encode() + b"\0")
            h.update(os.readlink(path).encode() if os.path.islink(path) else open(path, "rb").read())
print(h.hexdigest()[:16])
PYTHON
)
current=$(podman image inspect --format '{{index .Labels "io.vpcni.build"}}' "$IMAGE" 2>/dev/null || true)
current_controller=$(podman image inspect --format '{{index .Labels "io.vpcni.build"}}' \
                       "$CONTROLLER_IMAGE" 2>/dev/null || true)
if [ "$current" = "$build_hash" ] && [ "$current_controller" = "$build_hash" ]; then
  size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
  log "$IMAGE is up to date (build $build_hash, $((size / 1000000)) MB)"
  exit 0
fi

log "vpcni wheel from this checkout"
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$ctx/vpcni" "$src" >"$work/wheel.log" 2>&1 || { cat "$work/wheel.log" >&2; die "wheel build failed"; }

# ------------------------------------------------------------------ 3. the image
old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
log "podman build $IMAGE FROM $BASE"
podman build "${BUILD_FLAGS[@]}" --build-arg "BASE=$BASE" --build-arg "VERSION=$VERSION" \
  --label "io.vpcni.build=$build_hash" --label "io.vpcni.base=$BASE" \
  -f "$ROOT/$CONTAINERFILE" --target node -t "$IMAGE" "$ctx"
# The controller's image: the node image's stages again (cached) plus the controller extra.
log "podman build $CONTROLLER_IMAGE"
old_controller=$(podman image inspect --format '{{.Id}}' "$CONTROLLER_IMAGE" 2>/dev/null || true)
podman build "${BUILD_FLAGS[@]}" --build-arg "BASE=$BASE" --build-arg "VERSION=$VERSION" \
  --label "io.vpcni.build=$build_hash" --label "io.vpcni.base=$BASE" \
  -f "$ROOT/$CONTAINERFILE" --target controller -t "$CONTROLLER_IMAGE" "$ctx"
new_controller=$(podman image inspect --format '{{.Id}}' "$CONTROLLER_IMAGE")
if [ -n "$old_controller" ] && [ "$old_controller" != "$new_controller" ]; then
  podman rmi "$old_controller" >/dev/null 2>&1 || true
fi
new=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$old" ] && [ "$old" != "$new" ]; then
  # The image this one replaces, now untagged (kept if a container still uses it).
  podman rmi "$old" >/dev/null 2>&1 || true
fi
# Bases this image no longer uses (kept while another image or a container uses one).
for tag in $(podman images --format '{{.Repository}}:{{.Tag}}' localhost/vpcni-base); do
  [ "$tag" = "$BASE" ] || podman rmi "$tag" >/dev/null 2>&1 || true
done
[ -z "${replaced_base:-}" ] || podman rmi "$replaced_base" >/dev/null 2>&1 || true
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
csize=$(podman image inspect --format '{{.Size}}' "$CONTROLLER_IMAGE")
log "built $IMAGE (build $build_hash, $((size / 1000000)) MB) and $CONTROLLER_IMAGE ($((csize / 1000000)) MB)"
