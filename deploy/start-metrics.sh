#!/usr/bin/env bash
# The metrics exporter (deploy/metrics.py): the sum of every process's metrics in
# PROMETHEUS_MULTIPROC_DIR, on BIND_ADDRESS:METRICS_PORT. supervisord runs it natively, one per
# host; in compose deploy/with-metrics.sh runs it in each container, beside that container's server.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
exec python -m deploy.metrics
