#!/usr/bin/env bash
# Peak RSS of the `tap` binary while one big repo resyncs: a generated repo CAR (shuffled, as
# the reference PDS writes them) is served from loopback, tap backfills it into SQLite and a
# consumer acks every event. Prints the backfill time and tap's maximum resident set size.
#   scripts/bench-resync-rss.sh [RECORDS=800000] [ORDER=shuffled]
# TAP_EXTRA_ARGS passes flags to tap; TAP_BIN runs another build of tap (for A/B comparisons).
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS="${1:-800000}"
ORDER="${2:-shuffled}"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
cargo build --release -q -p tap --bin tap -p tap-atproto --example repo_car
. tests/localnet/env.sh
GEN="$(target/release/examples/repo_car generate "$WORK/repo.car" "$RECORDS" "$ORDER" 1)"
DID="$(grep -o 'did:plc:[a-z0-9]*' <<<"$GEN" | head -1)"
DIDKEY="$(grep -o 'did:key:z[A-Za-z0-9]*' <<<"$GEN" | head -1)"
echo "repo: $DID, $(du -h "$WORK/repo.car" | cut -f1) CAR, $RECORDS records + profile ($ORDER)"
(cd tests/localnet && node resync-rss.mjs serve "$WORK/repo.car" "$DID" "$DIDKEY") > "$WORK/serve.out" &
for _ in $(seq 1 100); do grep -q PORT "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
PORT="$(awk '/PORT/ {print $2}' "$WORK/serve.out")"
TAP_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
/usr/bin/time -v "${TAP_BIN:-target/release/tap}" run --bind "127.0.0.1:$TAP_PORT" --db-url "sqlite://$WORK/tap.db" \
  --plc-url "http://127.0.0.1:$PORT" --relay-url "http://127.0.0.1:1" \
  --handle-resolver-url "http://127.0.0.1:$PORT" --log-level warn ${TAP_EXTRA_ARGS:-} > "$WORK/tap.out" 2> "$WORK/time.out" &
TAP_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$TAP_PORT/health" >/dev/null && break; sleep 0.1; done
(cd tests/localnet && node resync-rss.mjs consume "http://127.0.0.1:$TAP_PORT" "$DID" "$((RECORDS + 1))")
kill -TERM "$(pgrep -P $TAP_PID tap || echo $TAP_PID)" 2>/dev/null || true
wait $TAP_PID || true
grep -E "Maximum resident set size|Elapsed" "$WORK/time.out"
