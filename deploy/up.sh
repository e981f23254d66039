#!/usr/bin/env bash
# `make up-MODE`: run the stack with Docker Compose when an engine answers (or RUNTIME=docker),
# natively otherwise (or RUNTIME=native). The first line says which, and why.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."
mode=$1

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
  deploy/require.sh nginx redis-server
  exec env SPLIT_MODE="$mode" "${PYTHON:-.venv/bin/python}" -m deploy.native
fi

# A secret key for local compose runs, made once; production sets SECRET_KEY itself.
if [[ -z ${SECRET_KEY:-} ]]; then
  mkdir -p var
  [[ -s var/compose-secret-key ]] || head -c 48 /dev/urandom | base64 > var/compose-secret-key
  SECRET_KEY=$(cat var/compose-secret-key)
  export SECRET_KEY
fi
# Compose prefers shell variables to the env file's; the mode, at least, is the target's.
export SPLIT_MODE=$mode
# shellcheck disable=SC1090
source "deploy/$mode.env"
echo "Open ${PUBLIC_SCHEME}://${APP_HOST}:${PUBLIC_PORT}/ once the services are healthy; log in as ${DEMO_USER} / ${DEMO_PASSWORD}."
exec docker compose --env-file "deploy/$mode.env" \
  -f deploy/compose.yaml -f "deploy/compose.$mode.yaml" \
  up --build --scale "asgi=${ASGI_REPLICAS:-1}"
