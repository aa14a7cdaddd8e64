#!/usr/bin/env bash
# Installs everything vpcni, its tests and its lab need on Debian 12, as root:
# Debian packages (daemons the tests run for real) and a venv at .venv built
# on Debian's /usr/bin/python3 (never the pyenv shim: it adds ~100 ms per call).
# One progress line per step on stderr: `setup: [ 12s] <step>: <what>`.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
step() { printf 'setup: [%3ds] %s\n' "$((SECONDS - start))" "$*" >&2; }

APT_PACKAGES=(
  iproute2 iputils-ping iperf3 tcpdump nftables python3-nftables ethtool procps psmisc curl
  python3 python3-venv python3-dev
  containernetworking-plugins golang-go golang-github-appc-cni-dev
  frr gobgpd golang-github-osrg-gobgp-dev openvswitch-switch
  etcd-server etcd-client
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages whose postinst would start services: nothing here has an init to
  # start them, and the tests start their own instances anyway.
  apt-get install -y -qq "${missing[@]}" >/dev/null
  step "packages: installed ${#missing[@]} (of ${#APT_PACKAGES[@]})"
else
  step "packages: all ${#APT_PACKAGES[@]} installed already"
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
fi
# The build requirements ([build-system] in pyproject.toml: setuptools, grpcio-tools) go
# into the venv and the editable install builds there (--no-build-isolation): its build_py
# (setup.py) generates gobgpd's gRPC stubs into evpn/gobgpapi/ with this venv's
# grpcio-tools, in step with the grpcio and protobuf vpcni runs with.
mapfile -t build_requires < <(.venv/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")')
.venv/bin/pip install -q --disable-pip-version-check "${build_requires[@]}"
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e '.[test,controller,ovs]'
step "venv: .venv ($(.venv/bin/python --version)), vpcni $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("vpcni"))') installed"
# gobgpd's gRPC stubs, generated from the .proto files of the installed gobgpd
# (golang-github-osrg-gobgp-dev), pinned to its version; never committed.
stubs=$(.venv/bin/python -m vpcni.evpn.genstubs)
step "stubs: ${stubs#genstubs: } ($(gobgpd --version 2>/dev/null || echo 'gobgpd not found'))"
# The `vpcni` executable runtimes exec: a static Go program, built once (cached
# under /var/cache/vpcni) for this venv's Python (its standalone mode).
shim=$(.venv/bin/python -c 'import sys; from vpcni.cni.install import build_go_shim; print(build_go_shim(sys.executable))')
step "shim: $shim"
step "done ($(.venv/bin/python --version), vpcni at $(readlink -f .venv/bin/vpcni))"
