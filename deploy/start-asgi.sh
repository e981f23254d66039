#!/usr/bin/env bash
# One Daphne process, serving the ASGI half. The native runtime (supervisord) and the image run this
# same file. Daphne's access log writes HTTP query strings, where a session key may be, so it goes
# to /dev/null (it is on by default); nginx keeps the access log, without query strings.
# The endpoint form of --bind/--port, for its backlog: Twisted's default of 50 overflows when
# hundreds of sockets reconnect at once, and nginx then answers 502.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
exec daphne \
  --endpoint "tcp:port=${DAPHNE_PORT}:interface=${BIND_ADDRESS}:backlog=1024" \
  --proxy-headers \
  --access-log /dev/null \
  --ping-interval 20 --ping-timeout 30 \
  --websocket-max-message-size "${WS_MAX_MESSAGE_SIZE:-65536}" \
  "${ASGI_APP:-asgi_site.asgi:application}"
