#!/usr/bin/env bash
# Install the Debian packages the test suite drives as real programs, when they are missing:
#   chromium  the admin console is rendered in headless Chromium
#   redis-server, redis-sentinel, redis-cli  real Redis topologies (tests/support/redis.py)
#   postgresql  the store's PostgreSQL backend (tests start their own server from its binaries)
#   promtool (prometheus), systemd-analyze (systemd), haproxy  check the artefacts in deploy/
#   haproxy   also the load balancer in front of CSC nodes in cluster tests
#   wrk, curl, nginx  `make bench` only (BENCH_DEPS): load tools and a reference relay
# Usage: scripts/system_deps.sh PROGRAM:PACKAGE...   (run by `make test`; idempotent, no prompts)
set -euo pipefail

missing=()
for pair in "$@"; do
    program=${pair%%:*}
    package=${pair#*:}
    command -v "$program" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "system_deps: missing ${missing[*]} and no root to install them (apt-get install ${missing[*]})" >&2
    # locally the tests that need them skip with this reason; under CI they must not
    [ "${CI:-}" = "true" ] && exit 1
    exit 0
fi
echo "system_deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq </dev/null
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
