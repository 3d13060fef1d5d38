#!/usr/bin/env bash
# Makes sure a Docker Engine answers on the default socket, since the runner tests drive a real one.
# A machine whose engine is installed but not running (CI starts from a clean machine, where no
# session's services survive) gets it started here; one without it gets Debian's docker.io first.
# The engine's log goes to ${RUNE_DOCKERD_LOG:-/tmp/rune-dockerd.log}.
set -euo pipefail

if docker info >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-docker: the Docker Engine is not reachable and starting it needs root" >&2
    exit 1
fi
if ! command -v dockerd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
log=${RUNE_DOCKERD_LOG:-/tmp/rune-dockerd.log}
# A stale pid file from an engine that died keeps a new one from starting.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
fi
if ! pgrep -x dockerd >/dev/null; then
    echo "ensure-docker: starting dockerd (log: $log)"
    setsid dockerd >"$log" 2>&1 </dev/null &
fi
deadline=$((SECONDS + 90))
until docker info >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
        echo "ensure-docker: the Docker Engine did not answer within 90 s; its log:" >&2
        tail -n 30 "$log" >&2 || true
        exit 1
    fi
    sleep 0.5
done
echo "ensure-docker: the Docker Engine answers"
