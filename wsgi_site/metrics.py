"""
The page half's Prometheus metrics, one set per Gunicorn worker.

With PROMETHEUS_MULTIPROC_DIR set (both runtimes set it), each worker writes its values to
a file of that directory and the exporter (`python -m deploy.metrics`) sums them over
every worker: an increment is a write to a memory-mapped file, never a round trip.
"""

from prometheus_client import Counter

TICKETS_MINTED = Counter("split_tickets_minted", "Tickets minted by POST /ws-ticket/.")
ANNOUNCEMENTS = Counter(
    "split_announcements", "Announcements recorded and sent to every socket by POST /announce/."
)
