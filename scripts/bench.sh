#!/usr/bin/env bash
# Every benchmark, side by side with its peers on this machine, and one table of the figures.
# Usage: scripts/bench.sh [BENCH ...]   (default: all; names are runed/benches/*.rs)
# Needs root (network namespaces, nftables) and Docker (the rollout's container rows). Each
# bench's own output is kept in target/bench/<time>/<bench>.txt. Not part of .ci/run: the
# whole set takes about 20 minutes on 2 cores, after a release and a dist build (the writes and DNS
# benches measure in alternating rounds, BENCH_ROUNDS, default 3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# The peers: etcd (writes, backup), unbound and dnsperf (DNS), haproxy (data plane), nginx and
# wrk (ingress), nftables (the kernel table), busybox-static (the test image).
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v unbound >/dev/null || need+=(unbound)
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
# Static, as test.sh asks: it is copied into an image FROM scratch.
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q static || need+=(busybox-static file)
scripts/apt-install.sh bench.sh ${need[@]+"${need[@]}"} || exit 1
scripts/ensure-docker.sh || exit 1
scripts/test-images.sh || exit 1

if [ $# -gt 0 ]; then
    benches=("$@")
else
    benches=(writes cluster dns nft dataplane ingress projections rollout operations)
fi
out="target/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out" || exit 1
cargo bench -p runed --no-run || exit 1
# runed and rune as production runs them: the dist profile (link-time optimisation across
# crates, 10-20 % less CPU per write than the release profile; a fresh build takes ~18 minutes
# on 2 cores). The benches start the binaries in RUNE_BIN_DIR.
cargo build --profile dist --bins || exit 1
export RUNE_BIN_DIR="$PWD/target/dist"
failed=()
for b in "${benches[@]}"; do
    echo "== $b"
    # The summary lines (common::summary) go to the file only, for the table below.
    cargo bench -p runed --bench "$b" 2>&1 | tee "$out/$b.txt" | grep -v --line-buffered "^summary"
    if [ "${PIPESTATUS[0]}" != 0 ]; then
        failed+=("$b")
    fi
done

echo
echo "## runed against its peers, this machine, one run ($(nproc) cores; ratio above 1: runed ahead)"
echo
echo "| figure | runed | unit | peer | peer's | ratio |"
echo "|---|--:|---|---|--:|--:|"
for b in "${benches[@]}"; do
    grep -h "^summary" "$out/$b.txt" 2>/dev/null |
        awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6, $7 }'
done
echo
echo "each bench's own tables: $out"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
