#!/usr/bin/env bash
# Make sure system commands exist: `deploy/require.sh COMMAND[:DEBIAN_PACKAGE] ...`. A COMMAND
# that is a path pattern is looked for on disk, for programs Debian keeps off PATH
# ('/usr/lib/postgresql/*/bin/initdb:postgresql'; quote it).
# Missing ones are installed with apt-get when we are root on Debian/Ubuntu; otherwise
# we stop and print the exact command that installs them.
set -o errexit -o pipefail -o nounset

missing=()
for spec in "$@"; do
  name=${spec%%:*}
  if [[ $name == /* ]]; then
    compgen -G "$name" >/dev/null || missing+=("${spec#*:}")
  else
    command -v "$name" >/dev/null 2>&1 || missing+=("${spec#*:}")
  fi
done
((${#missing[@]})) || exit 0

if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "Installing ${missing[*]} with apt-get..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "Missing: ${missing[*]}. Install with:" >&2
echo "  sudo apt-get install ${missing[*]}" >&2
exit 1
