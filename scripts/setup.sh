#!/usr/bin/env bash
# Installs everything migrated's build and tests need on Debian 12 (root):
# CRIU >= 4.2 from Debian's forky suite (pinned low so nothing else moves),
# the system tools the tests use, protoc, and the Go modules.
# Idempotent: a second run only checks.
set -euo pipefail

need_root() {
	if [ "$(id -u)" != 0 ]; then
		echo "setup: must run as root (installs Debian packages)" >&2
		exit 1
	fi
}

criu_ok() {
	command -v criu >/dev/null 2>&1 || return 1
	local v
	v=$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')
	[ -n "$v" ] || return 1
	dpkg --compare-versions "$v" ge 4.2
}

pkgs_missing() {
	local missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	echo "${missing[@]:-}"
}

need_root
export DEBIAN_FRONTEND=noninteractive

# Debian forky, pinned at priority 50: only packages asked for with -t forky come from it.
if [ ! -f /etc/apt/sources.list.d/migrated-forky.sources ]; then
	cat >/etc/apt/sources.list.d/migrated-forky.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: forky
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
	cat >/etc/apt/preferences.d/migrated-forky <<'PIN'
Package: *
Pin: release n=forky
Pin-Priority: 50
PIN
	# The mirror's Release files may be older than apt's validity window.
	echo 'Acquire::Check-Valid-Until "false";' >/etc/apt/apt.conf.d/99migrated-valid-until
	updated=0
else
	updated=1
fi

base_pkgs=(iproute2 nftables iputils-arping protobuf-compiler redis-server redis-tools util-linux procps psmisc make gcc)
missing=$(pkgs_missing "${base_pkgs[@]}")
if [ -n "$missing" ] || ! criu_ok; then
	if [ "${updated:-1}" = 0 ] || [ -n "$missing" ] || ! criu_ok; then
		apt-get update -qq
	fi
	if [ -n "$missing" ]; then
		# shellcheck disable=SC2086
		apt-get install -y -qq --no-install-recommends $missing
	fi
	if ! criu_ok; then
		apt-get install -y -qq --no-install-recommends -t forky criu
	fi
fi

# Debian's redis-server package starts a system instance; tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
	systemctl stop redis-server || true
	systemctl disable redis-server >/dev/null 2>&1 || true
fi

criu_ok || { echo "setup: CRIU >= 4.2 is required, got: $(criu --version 2>&1 | head -1)" >&2; exit 1; }
if ! out=$(criu check 2>&1) || ! grep -q "Looks good" <<<"$out"; then
	echo "setup: 'criu check' did not say 'Looks good':" >&2
	echo "$out" >&2
	exit 1
fi
echo "setup: $(criu --version | head -1 | tr -s ' '), criu check: Looks good"

go mod download
echo "setup: done"
