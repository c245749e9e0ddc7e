#!/bin/sh
# Container entrypoint of the flowtel agent: make kernel headers available to bcc, then
# exec the command (by default `flowtel run --config /etc/flowtel/config.yaml`).
#
# bcc compiles flowtel's eBPF programs at start-up against /lib/modules/$(uname -r)/build.
# The DaemonSet mounts the host's /lib/modules read-only at /host/lib/modules and the host's
# /usr/src at /usr/src (where a host's `build` link usually points); this container's own
# /lib/modules is a writable emptyDir. This script links, as scripts/setup.sh does on a
# development machine:
#   - the host's headers when the host has them for its running kernel (exact match), else
#   - the Debian headers bundled in the image (/opt/flowtel/kernel-headers). flowtel's
#     programs use only UAPI headers and tracepoint records (DESIGN.md section 3), so
#     headers of another kernel version compile them correctly.
# It changes nothing on the host. The variables below exist for tests.
set -eu

release="${FLOWTEL_KERNEL_RELEASE:-$(uname -r)}"
modules="${FLOWTEL_MODULES_DIR:-/lib/modules}"
host_modules="${FLOWTEL_HOST_MODULES_DIR:-/host/lib/modules}"
bundled="${FLOWTEL_BUNDLED_HEADERS_DIR:-/opt/flowtel/kernel-headers}"

say() { printf 'flowtel-entrypoint: %s\n' "$*" >&2; }

kdir="$modules/$release"
if [ -e "$kdir/build/include" ]; then
  say "kernel headers for $release: $kdir/build"
elif [ -e "$host_modules/$release/build/include" ]; then
  mkdir -p "$kdir"
  ln -sfn "$host_modules/$release/build" "$kdir/build"
  if [ -e "$host_modules/$release/source" ]; then
    ln -sfn "$host_modules/$release/source" "$kdir/source"
  fi
  say "kernel headers for $release: the host's ($host_modules/$release/build)"
else
  # The newest bundled arch-specific tree, and its -common sibling (Debian splits them).
  hdr=$(ls -d "$bundled"/linux-headers-*-amd64 "$bundled"/linux-headers-*-arm64 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$hdr" ]; then
    common=$(printf '%s' "$hdr" | sed -E 's/-(cloud-|rt-)?(amd64|arm64)$/-common/')
    mkdir -p "$kdir"
    ln -sfn "$hdr" "$kdir/build"
    if [ -d "$common" ]; then
      ln -sfn "$common" "$kdir/source"
    fi
    say "no kernel headers for $release on the host; using the bundled ${hdr##*/} (fallback)"
  else
    say "WARNING: no kernel headers for $release on the host and none bundled in $bundled;" \
        "bcc may still use /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS). Run \`flowtel doctor\`."
  fi
fi

exec "$@"
