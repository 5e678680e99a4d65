#!/usr/bin/env bash
# System packages the test suite uses where they are installable (as root, Debian/Ubuntu).
# Missing tools make only their own tests skip, with the reason; this script never fails the build.
set -uo pipefail
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v ip >/dev/null || need+=(iproute2)
if ((${#need[@]})) && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install-test-deps: installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null 2>&1; } \
        || echo "install-test-deps: could not install ${need[*]}; their tests will skip"
fi
exit 0
