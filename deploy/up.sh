#!/usr/bin/env bash
# `make up-MODE`: run the stack with Docker Compose when an engine answers (or RUNTIME=docker),
# natively otherwise (or RUNTIME=native). The first line says which, and why.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
mode=${1:-}
case $mode in
  same-domain | cross-domain | subdomain) ;;
  *) echo "Unknown mode '$mode': use same-domain, cross-domain or subdomain." >&2; exit 2 ;;
esac

case ${RUNTIME:-} in
  docker) runtime=docker why="RUNTIME=docker" ;;
  native) runtime=native why="RUNTIME=native" ;;
  "") if docker info >/dev/null 2>&1; then
        runtime=docker why="a Docker engine answers 'docker info'"
      else
        runtime=native why="no Docker engine answers 'docker info'"
      fi ;;
  *) echo "RUNTIME=$RUNTIME: use docker or native." >&2; exit 2 ;;
esac
echo "Runtime: $runtime ($why)."

if [[ $runtime == native ]]; then
  if [[ ${DATABASE:-sqlite} == postgres ]]; then
    deploy/require.sh nginx redis-server '/usr/lib/postgresql/*/bin/initdb:postgresql'
  else
    deploy/require.sh nginx redis-server
  fi
  exec env SPLIT_MODE="$mode" "${PYTHON:-.venv/bin/python}" -m deploy.native
fi

# A secret key for local compose runs, made once; production sets SECRET_KEY itself.
if [[ -z ${SECRET_KEY:-} ]]; then
  mkdir -p var
  [[ -s var/compose-secret-key ]] || head -c 48 /dev/urandom | base64 > var/compose-secret-key
  SECRET_KEY=$(cat var/compose-secret-key)
  export SECRET_KEY
fi
# Compose prefers the shell's variables to the env file's, so what the user exported wins; the
# mode, at least, is the target's. Read the env file for the rest without overwriting any.
export SPLIT_MODE=$mode
while IFS='=' read -r key value; do
  if [[ $key =~ ^[A-Z_][A-Z0-9_]*$ && -z ${!key+set} ]]; then
    printf -v "$key" '%s' "$value"
  fi
done < "deploy/$mode.env"
# Subdomain mode routes like cross-domain (sockets on their own host); its env file scopes the
# session cookie to the parent domain.
files=(-f deploy/compose.yaml -f "deploy/compose.${mode/subdomain/cross-domain}.yaml")
# Redis with failover, as in the native runtime: REDIS_SENTINEL=1 adds the Sentinels.
sentinel=${REDIS_SENTINEL:-}
if [[ ${sentinel,,} =~ ^(1|true|yes|y|on|ok)$ ]]; then
  files+=(-f deploy/compose.sentinel.yaml)
fi
echo "Open ${PUBLIC_SCHEME}://${APP_HOST}:${PUBLIC_PORT}/ once the services are healthy; log in as ${DEMO_USER} / ${DEMO_PASSWORD}."
exec docker compose --env-file "deploy/$mode.env" "${files[@]}" \
  up --build --scale "asgi=$ASGI_REPLICAS"
