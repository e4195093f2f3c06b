#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what the tests need; builds with the `ci` profile (optimized, with debug
# assertions and overflow checks) into a target directory outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally-target}"
export CARGO_TERM_COLOR=never
export TALLY_VENV="${TALLY_VENV:-$HOME/.cache/tally-venv}"
export TALLY_NODE="${TALLY_NODE:-$HOME/.cache/tally-node}"

bash scripts/deps.sh

cargo fmt --all -- --check
cargo clippy --profile ci --locked --all-targets -- -D warnings
cargo test --profile ci --locked -- --test-threads 2
