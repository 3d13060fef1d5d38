#!/usr/bin/env bash
# Installs what the tests need (Debian packages) and runs every check and test.
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: promtool (prometheus) checks /metrics, systemd-analyze checks the unit,
# busybox-static becomes the test image (no registry is reachable), python3 drives a terminal
# for `rune exec -it`, python3-grpcio is a second gRPC implementation that asks runed's health
# and reflection services, nftables is the kernel half of the data plane (tested inside
# namespaces), pebble is the ACME server the ingress gets certificates from, debootstrap builds
# the Debian root that boots systemd for the tests of the installed unit; openssl and python3
# serve the README tour (a TLS secret, a process service); unbound is the caching resolver
# put in front of runed's DNS to show its negative answers are cached; docker-registry (with
# htpasswd from apache2-utils) is the private registry images are pulled from with credentials.
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q static || need+=(busybox-static file)
command -v python3 >/dev/null || need+=(python3)
/usr/bin/python3 -c 'import grpc' 2>/dev/null || need+=(python3 python3-grpcio)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
command -v dig >/dev/null || need+=(bind9-dnsutils)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v unbound-control >/dev/null || need+=(unbound)
command -v nft >/dev/null || need+=(nftables)
command -v pebble >/dev/null || need+=(pebble)
command -v openssl >/dev/null || need+=(openssl)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v htpasswd >/dev/null || need+=(apache2-utils)
[ -x /usr/bin/python3 ] || need+=(python3)
scripts/apt-install.sh test.sh ${need[@]+"${need[@]}"} || exit 1

echo "== format"
cargo fmt --all -- --check

echo "== seam"
scripts/check-seam.sh
# The seam check must be able to fail: run it on a tree that breaks the rule.
bad=$(mktemp -d)
trap 'rm -rf "$bad"' EXIT
mkdir -p "$bad/subsystems/x"
printf 'fn f(db: &redb::Database) { let _ = db.begin_write(); }\n' >"$bad/subsystems/x/lib.rs"
if scripts/check-seam.sh "$bad" 2>/dev/null; then
    echo "seam check did not catch a write outside log/ and statemachine/" >&2
    exit 1
fi
rm "$bad/subsystems/x/lib.rs"
printf 'fn f(m: &mut M) { m.insert(format!("endpoints/{}", 1), 2); }\n' >"$bad/subsystems/x/keys.rs"
if scripts/check-seam.sh "$bad" 2>/dev/null; then
    echo "seam check did not catch a write of an endpoints/ key outside statemachine/" >&2
    exit 1
fi
rm "$bad/subsystems/x/keys.rs"

echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== build"
cargo build --workspace --bins

echo "== deploy"
unit="$bad/runed.service"
sed "s#/usr/local/bin/runed#$PWD/target/debug/runed#" deploy/runed.service >"$unit"
systemd-analyze verify "$unit"
bash -n deploy/install.sh

echo "== test images"
scripts/ensure-docker.sh
scripts/test-images.sh
scripts/systemd-image.sh

echo "== tests"
cargo test --workspace

echo "== README tour"
scripts/readme-tour.sh

# What a test daemon killed mid-create left behind (chaos-tests' sweep_dead_test_nodes does
# the same at each test binary's start): containers, networks and volumes of test nodes
# (`test-<pid>-<n>`) whose process is gone, which by now is every one.
echo "== leftovers"
for kind in container network volume; do
    case $kind in
    container) list=(ps -a) rm=(rm -f) id='{{.ID}}' ;;
    network) list=(network ls) rm=(network rm) id='{{.ID}}' ;;
    volume) list=(volume ls) rm=(volume rm -f) id='{{.Name}}' ;;
    esac
    docker "${list[@]}" --filter label=rune.node --format "$id {{.Label \"rune.node\"}}" |
        while read -r obj node; do
            pid=${node#test-}
            pid=${pid%%-*}
            if [[ $node == test-* && ! -d /proc/$pid ]]; then
                echo "removing $kind $obj of $node"
                docker "${rm[@]}" "$obj" >/dev/null || echo "could not remove $kind $obj" >&2
            fi
        done
done
