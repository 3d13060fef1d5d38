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
if [ -n "$violations" ]; then
    echo "seam check failed: only log/ and statemachine/ may write the state tables." >&2
    echo "Propose a rune_statemachine::Command through rune_log::Log instead:" >&2
    echo "$violations" >&2
    exit 1
fi
echo "seam check: ok (no state writes outside log/ and statemachine/)"
