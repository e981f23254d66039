"""
The metrics exporter: every process's Prometheus metrics, summed, on one internal address.

    python -m deploy.metrics      (PROMETHEUS_MULTIPROC_DIR, BIND_ADDRESS, METRICS_PORT)

Gunicorn workers and Daphne processes write their metrics to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode; asgi_site/metrics.py and
wsgi_site/metrics.py). This serves their sum at http://BIND_ADDRESS:METRICS_PORT/metrics,
beside the servers and never through nginx: one exporter per host in the native runtime
(a supervisord program), one per container in compose (deploy/with-metrics.sh).

Counters of a process that died stay in the sum, so they never go back; before each scrape
the gauges of processes no longer alive are dropped (prometheus_client's
mark_process_dead), however they died, SIGKILL included.
"""

import os
import re
import sys
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from shared_settings.topology import TOPOLOGY

# prometheus_client's file for a live-mode gauge of one process: gauge_livesum_1234.db
LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def drop_dead_gauges(path: Path) -> None:
    """Forget the live-mode gauges of every process that is gone."""
    pids = {int(m[1]) for f in path.iterdir() if (m := LIVE_GAUGE_FILE.fullmatch(f.name))}
    for pid in pids:
        if not alive(pid):
            mark_process_dead(pid, str(path))


class LiveProcessesCollector(MultiProcessCollector):
    """prometheus_client's MultiProcessCollector, minus the gauges of dead processes."""

    def __init__(self, registry: CollectorRegistry, path: Path) -> None:
        super().__init__(registry, str(path))
        self.directory = path

    def collect(self):
        drop_dead_gauges(self.directory)
        return super().collect()


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass  # a line per scrape says nothing


def main() -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not Path(directory).is_dir():
        sys.exit("Set PROMETHEUS_MULTIPROC_DIR to the directory the servers write metrics to.")
    registry = CollectorRegistry()
    LiveProcessesCollector(registry, Path(directory))
    address, port = TOPOLOGY.bind_address, TOPOLOGY.metrics_port
    server = make_server(address, port, make_wsgi_app(registry), handler_class=QuietHandler)
    print(f"Serving metrics on http://{address}:{port}/metrics", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
