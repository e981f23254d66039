#!/usr/bin/env bash
# Gunicorn, serving the WSGI half. The native runtime (supervisord) and the image run this same file.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
exec gunicorn --config deploy/gunicorn.conf.py wsgi_site.wsgi
