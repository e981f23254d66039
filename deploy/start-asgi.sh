#!/usr/bin/env bash
# One Daphne process, serving the ASGI half. The native runtime (supervisord) and the image run this
# same file. Daphne's access log writes HTTP query strings, where a session key may be, so it goes
# to /dev/null (it is on by default); nginx keeps the access log, without query strings.
# The endpoint form of --bind/--port, for its backlog: Twisted's default of 50 overflows when
# hundreds of sockets reconnect at once, and nginx then answers 502.
# asgi_site.server is daphne's own command line with a Server that closes an oversized message
# with 1009 and, on SIGTERM, stops listening and closes its sockets with 1012 over
# WS_DRAIN_SECONDS before it exits (the stop timeouts of supervisord and compose outlast it).
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
exec python -m asgi_site.server \
  --endpoint "tcp:port=${DAPHNE_PORT}:interface=${BIND_ADDRESS}:backlog=1024" \
  --proxy-headers \
  --access-log /dev/null \
  --ping-interval 20 --ping-timeout 30 \
  --websocket-max-message-size "${WS_MAX_MESSAGE_SIZE:-65536}" \
  "${ASGI_APP:-asgi_site.asgi:application}"
