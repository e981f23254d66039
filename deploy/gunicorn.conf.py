"""Gunicorn settings, read by deploy/start-wsgi.sh in both runtimes."""

import os

from shared_settings.topology import TOPOLOGY

bind = f"{TOPOLOGY.bind_address}:{TOPOLOGY.gunicorn_port}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Only the proxy talks to Gunicorn; trust its X-Forwarded-* headers and nobody else's.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# The scheme comes from X-Forwarded-Proto alone, which the proxy always sets. Gunicorn's default
# also believes X-Forwarded-Ssl and X-Forwarded-Protocol, which a client could send through.
secure_scheme_headers = {"X-FORWARDED-PROTO": "https"}
# Gunicorn 25+ opens a control socket in $HOME by default; two stacks side by side
# would fight over it, and nothing here uses it.
control_socket_disable = True
accesslog = "-"
# %(U)s is the path without the query string: secrets in URLs never reach the log.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'
