#!/usr/bin/env bash
# Bring the shared database up to date, and make the demo user when DEMO_PASSWORD is set (local
# runs only). The native runtime and the compose `migrate` service run this same file.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
python wsgi_site/manage.py migrate --noinput -v0
if [[ -n ${DEMO_PASSWORD:-} ]]; then
  python wsgi_site/manage.py demo_user "${DEMO_USER:-demo}" "$DEMO_PASSWORD"
fi
