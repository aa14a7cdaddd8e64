#!/usr/bin/env bash
# Installs everything vpcni, its tests and its lab need on Debian 12, as root:
# Debian packages (daemons the tests run for real) and a venv at .venv built
# on Debian's /usr/bin/python3 (never the pyenv shim: it adds ~100 ms per call).
set -euo pipefail
cd "$(dirname "$0")/.."

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
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages whose postinst would start services: nothing here has an init to
  # start them, and the tests start their own instances anyway.
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,controller]'
# gobgpd's gRPC stubs, generated from the .proto files of the installed gobgpd
# (golang-github-osrg-gobgp-dev), pinned to its version; never committed.
.venv/bin/python -m vpcni.evpn.genstubs
# The `vpcni` executable runtimes exec: a static Go program, built once (cached
# under /var/cache/vpcni) for this venv's Python (its standalone mode).
.venv/bin/python -c 'import sys; from vpcni.cni.install import build_go_shim; print("setup: shim", build_go_shim(sys.executable))'
echo "setup: done ($(.venv/bin/python --version), vpcni at $(readlink -f .venv/bin/vpcni))"
