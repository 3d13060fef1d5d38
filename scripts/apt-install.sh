#!/usr/bin/env bash
# Installs the Debian packages named (those a script found missing); nothing when none are.
# Usage: scripts/apt-install.sh WHO PACKAGE...   (WHO names the caller in the error)
set -euo pipefail
who=$1
shift
[ $# -gt 0 ] || exit 0
if [ "$(id -u)" != 0 ]; then
    echo "$who: missing $*: run as root or install them with apt-get" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
