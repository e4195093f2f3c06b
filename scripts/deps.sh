#!/usr/bin/env bash
# Installs what the test suite starts for real: redis-server and redis-cli (Debian's
# redis-server and redis-tools), openssl (the TLS test makes its own CA and
# certificate), promtool (Debian's prometheus: it checks deploy/'s alert rules), and
# a Python venv with grpcio-tools (PyPI) for the third-party gRPC client test, duckdb
# (PyPI: reads the compacted Parquet in the archive tests) and moto[server] (PyPI: a
# local S3-compatible server for the lake on S3), in
# ${TALLY_VENV:-$HOME/.cache/tally-venv}, and kinesalite (npm: the Kinesis API in
# memory, started by scripts/kinesalite.js) in ${TALLY_NODE:-$HOME/.cache/tally-node},
# both outside the clone.
# Safe to run again; does nothing when all is there.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing ${need_apt[*]} (apt-get)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

VENV="${TALLY_VENV:-$HOME/.cache/tally-venv}"
if ! "$VENV/bin/python" -c 'import grpc_tools, grpc_health, grpc_reflection, duckdb, moto.server' >/dev/null 2>&1; then
  echo "installing grpcio-tools, duckdb and moto into $VENV (pip)" >&2
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    duckdb==2.0.0 'moto[server]==5.2.5'
fi

NODE_DIR="${TALLY_NODE:-$HOME/.cache/tally-node}"
if [ ! -f "$NODE_DIR/node_modules/kinesalite/package.json" ]; then
  echo "installing kinesalite into $NODE_DIR (npm)" >&2
  mkdir -p "$NODE_DIR"
  npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error kinesalite@3.3.3 >/dev/null
fi
