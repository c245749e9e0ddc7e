#!/usr/bin/env bash
# The one place that knows what this machine needs. Idempotent: every step checks first,
# so a second run finishes in seconds. Run as root (make demo / make test call it).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }

# Debian packages. Tools are named by a file each provides, so a present tool costs nothing.
# python3-bpfcc: bcc for the system Python (the PyPI "bcc" is an unrelated project).
# linux-headers-amd64: bcc compiles against headers; used as the fallback below.
declare -A PKG_FOR=(
  [/usr/lib/python3/dist-packages/bcc/__init__.py]=python3-bpfcc
  [/usr/share/doc/linux-headers-amd64]=linux-headers-amd64
  [/usr/sbin/bpftool]=bpftool
  [/usr/bin/ip]=iproute2
  [/usr/sbin/dnsmasq]=dnsmasq-base
  [/usr/bin/dig]=dnsutils
  [/usr/bin/tcpdump]=tcpdump
  [/usr/bin/iperf3]=iperf3
  # dnsperf drives the full-rate DNS end-to-end test (tests/integration/test_dns_e2e.py) and
  # the DNS workload of bench/datapath.py (make bench).
  [/usr/bin/dnsperf]=dnsperf
  # The C preprocessor checks bpf/flowtel.h against the constants Python reads (tests/contracts/test_header_constants.py).
  [/usr/bin/cpp]=cpp
  [/usr/sbin/nft]=nftables
  [/usr/bin/nstat]=iproute2
  [/usr/sbin/tc]=iproute2
  [/usr/bin/kmod]=kmod
  [/usr/bin/ping]=iputils-ping
  # A real Prometheus server scrapes the prometheus exporter in its tests.
  [/usr/bin/prometheus]=prometheus
  # A real headless browser renders the web UI in its tests (nothing is fetched from outside).
  [/usr/bin/chromium]=chromium
  [/usr/lib/python3.11/venv/__init__.py]=python3-venv
  [/usr/lib/python3/dist-packages/pip/__init__.py]=python3-pip
)
missing=()
for f in "${!PKG_FOR[@]}"; do
  [ -e "$f" ] || missing+=("${PKG_FOR[$f]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Kernel headers: this machine's kernel has no matching package, but flowtel's programs
# use only UAPI headers and tracepoint records, so Debian's newest headers work.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(printf '%s' "$hdr" | sed -E 's/-(cloud-|rt-)?amd64$/-common/')
  if [ -n "$hdr" ]; then
    say "linking $kdir/{build,source} -> $hdr (fallback kernel headers)"
    mkdir -p "$kdir"
    ln -sfn "$hdr" "$kdir/build"
    ln -sfn "${common}" "$kdir/source"
  else
    say "WARNING: no kernel headers found under /usr/src" >&2
  fi
fi

# tracefs and bpffs (tracepoint formats are read at run time; maps get pinned).
if [ ! -d /sys/kernel/tracing/events ]; then
  say "mounting tracefs on /sys/kernel/tracing"
  mount -t tracefs tracefs /sys/kernel/tracing
fi
if ! mount | grep -q ' /sys/fs/bpf type bpf '; then
  say "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# The virtualenv: system Python (3.11) so Debian's bcc is importable.
if [ ! -x .venv/bin/python ]; then
  say "creating .venv from /usr/bin/python3 --system-site-packages"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.flowtel-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing flowtel (editable) with test extras"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
