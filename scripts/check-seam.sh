#!/usr/bin/env bash
# The seam: only log/ and statemachine/ may open write transactions on the state databases.
# Every other crate reads state through the log's read views and changes it by proposing a
# Command. Fails, naming file and line, when Rust code elsewhere begins a redb write
# transaction or names the types that only a writer needs.
#
# Usage: scripts/check-seam.sh [ROOT]   (ROOT defaults to the repository)
set -euo pipefail
root="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
cd "$root"
pattern='\.begin_write\s*\(|WriteTransaction|\bTable<\s*&|insert_reserve|\.retain_in\s*\('
violations=$(grep -rnE "$pattern" --include='*.rs' . \
    | grep -vE '^\./(log|statemachine|target)/' || true)
# The projections' own key spaces are written by apply alone: a store call on one of them
# anywhere else is a second writer in the making.
keys='(insert|remove|put|upsert)\s*\(\s*(&?format!\()?"(network|endpoints|local_instances|policy)/'
key_writes=$(grep -rnE "$keys" --include='*.rs' . | grep -vE '^\./(log|statemachine|target)/' || true)
violations=$(printf '%s\n%s\n' "$violations" "$key_writes" | sed '/^$/d')
if [ -n "$violations" ]; then
    echo "seam check failed: only log/ and statemachine/ may write the state tables." >&2
    echo "Propose a rune_statemachine::Command through rune_log::Log instead:" >&2
    echo "$violations" >&2
    exit 1
fi
echo "seam check: ok (no state writes outside log/ and statemachine/, no writes of network/, endpoints/, local_instances/, policy/ keys)"
