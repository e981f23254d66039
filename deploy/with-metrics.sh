#!/usr/bin/env bash
# Compose (deploy/compose.metrics.yaml): run a server command, e.g. deploy/start-asgi.sh, with this
# container's own metrics exporter beside it. A container has its own processes and files, so
# each one sums its own and Prometheus finds every replica by DNS (deploy/prometheus.yml).
# The directory starts empty: files of the container's previous run would add up.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
export PROMETHEUS_MULTIPROC_DIR="${STATE_DIR}/metrics"
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
deploy/start-metrics.sh &
exec "$@"
