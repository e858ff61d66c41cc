#!/bin/sh
# The image's entrypoint.
#
# `serve` (the default command) checks the config first. A config the gateway refuses (exit 2)
# is reported, then waited on: the container neither serves nor crash-loops under a restart
# policy; it re-checks every $GATEWAY_RECHECK_SECONDS (default 5) and at once on SIGHUP,
# starts when the config (or a secret file it names) is fixed, and SIGTERM ends the wait.
# Meanwhile the healthcheck fails: `docker ps` shows it unhealthy, `docker logs` says why.
#
# Any other command runs as is: `docker run IMAGE token --config ... --sub alice`, `check`...
set -u
if [ "${1:-serve}" != serve ]; then
  exec ollama-gateway "$@"
fi
[ $# -gt 0 ] && shift
config="${OLLAMA_GATEWAY_CONFIG:-/etc/ollama-gateway/gateway.yaml}"
recheck="${GATEWAY_RECHECK_SECONDS:-5}"
sleeper=""
trap '[ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null; exit 0' TERM INT
trap '[ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null' HUP
last=""
while :; do
  problems=$(ollama-gateway check --config "$config" 2>/dev/null)
  code=$?
  if [ "$code" -eq 0 ]; then
    exec ollama-gateway serve --config "$config" "$@"
  fi
  if [ "$code" -ne 2 ]; then  # not a verdict on the config: let the restart policy act
    printf '%s\n' "$problems" >&2
    exit "$code"
  fi
  if [ "$problems" != "$last" ]; then
    printf 'ollama-gateway: refusing %s; waiting for a fixed config (re-checked every %ss and on SIGHUP):\n%s\n' \
      "$config" "$recheck" "$problems" >&2
    last="$problems"
  fi
  sleep "$recheck" &
  sleeper=$!
  wait "$sleeper"  # returns at once when a trapped signal arrives
  sleeper=""
done
