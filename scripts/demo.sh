#!/usr/bin/env bash
# The main job: a live, embedded demo (no Redis, no broker). Extra arguments go to
# `tally demo` (see `--help`), e.g. `bash scripts/demo.sh --seconds 30 --rate 20000`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally-target}"
cargo run --release --locked --quiet -- demo "$@"
