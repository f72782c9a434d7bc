#!/usr/bin/env bash
# Check llmaas's OpenAI-compatible API with five real client libraries against a live service:
# the npm `openai` package (Node 20+), litellm, langchain-openai, httpx and aiohttp.
#
#   bash scripts/check_clients.sh [CLIENT ...]   # openai-node litellm langchain-openai httpx aiohttp (default: all)
#
# 1. Installs the client libraries once, outside the repo, under ${LLMAAS_CACHE:-~/.cache/llmaas}/clients/: a venv of
#    their own (venv/; llmaas's .venv is not touched) and an npm prefix (node/). CHECK_CLIENTS_UPGRADE=1 reinstalls
#    them at their newest versions; nothing is pinned (npm picks the newest `openai` whose `engines` accept this
#    node). Needs .venv (scripts/setup.sh), curl, node and npm.
# 2. Registers an app on a temporary data directory and starts `.venv/bin/llmaas serve --quiet` on it, on a free
#    loopback port (or $LLMAAS_CHECK_PORT); waits for GET /health (up to $LLMAAS_CHECK_START_TIMEOUT s, default 180:
#    a first start may measure the restore profile unless one is cached under the llmaas cache).
# 3. Runs each client (scripts/clients/check_openai.mjs, scripts/clients/check_python_clients.py): it lists the models
#    and uses the returned id; a plain chat completion (system + user, max_tokens 8, temperature 0); the same request
#    streamed, whose concatenated deltas must equal the plain reply; one call on a context made with POST /v1/contexts,
#    through the extension field "llmaas": {"context_id": ...} with only the new user message, after which the context
#    must hold that turn.
# 4. Prints `PASS client` or `FAIL client: reason` per client on stdout, then `N passed, M failed`; exits 1 if any
#    failed (2 if the service could not be started). A failing client is rerun through a logging proxy on loopback
#    (scripts/clients/capture_proxy.py) and every request it sent, with the service's answer, goes to stderr together
#    with the client's own messages. CHECK_CLIENTS_VERBOSE=1 shows the clients' messages for passing ones too, and
#    CHECK_CLIENTS_CAPTURE=1 shows their requests too (a second run of each client, through the proxy).
# The service is stopped and the temporary directory removed on exit, however the script ends.
set -uo pipefail

ALL_CLIENTS=(openai-node litellm langchain-openai httpx aiohttp)
PY_PACKAGES="litellm langchain-openai httpx aiohttp"
CLIENT_TIMEOUT_S=240

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$REPO/scripts/clients
LLMAAS=$REPO/.venv/bin/llmaas
CLIENTS_DIR=${LLMAAS_CACHE:-$HOME/.cache/llmaas}/clients
VENV=$CLIENTS_DIR/venv
NODE_PREFIX=$CLIENTS_DIR/node
START_TIMEOUT_S=${LLMAAS_CHECK_START_TIMEOUT:-180}
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"

say() { echo "check_clients: $*" >&2; }
die() { say "$*"; exit 2; }

clients=("$@")
[ ${#clients[@]} -eq 0 ] && clients=("${ALL_CLIENTS[@]}")
for c in "${clients[@]}"; do
  case " ${ALL_CLIENTS[*]} " in *" $c "*) ;; *) die "unknown client '$c' (clients: ${ALL_CLIENTS[*]})";; esac
done
[ -x "$LLMAAS" ] || die "no $LLMAAS: run scripts/setup.sh first"
command -v curl >/dev/null || die "curl is needed"

# -- 1. the client libraries, outside the repo ---------------------------------------------------------------------
mkdir -p "$CLIENTS_DIR"
install_log=$CLIENTS_DIR/install.log
stamp=$VENV/.llmaas-check-clients
if [ "${CHECK_CLIENTS_UPGRADE:-0}" = 1 ] || [ "$(cat "$stamp" 2>/dev/null)" != "$PY_PACKAGES" ]; then
  say "installing $PY_PACKAGES into $VENV (log: $install_log)"
  { [ -x "$VENV/bin/python" ] || "$REPO/.venv/bin/python" -m venv "$VENV"; } >"$install_log" 2>&1 \
    && "$VENV/bin/python" -m pip install --upgrade pip >>"$install_log" 2>&1 \
    && "$VENV/bin/python" -m pip install --upgrade $PY_PACKAGES >>"$install_log" 2>&1 \
    || { tail -n 20 "$install_log" >&2; die "pip install failed (see $install_log)"; }
  echo "$PY_PACKAGES" >"$stamp"
fi
if command -v node >/dev/null && command -v npm >/dev/null; then
  if [ "${CHECK_CLIENTS_UPGRADE:-0}" = 1 ] || [ ! -f "$NODE_PREFIX/node_modules/openai/package.json" ]; then
    say "installing the npm openai package into $NODE_PREFIX"
    mkdir -p "$NODE_PREFIX"
    npm install --prefix "$NODE_PREFIX" --no-audit --no-fund --loglevel=error openai >>"$install_log" 2>&1 \
      || { tail -n 20 "$install_log" >&2; say "npm install failed (see $install_log)"; }
  fi
fi
versions=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(litellm|langchain-openai|langchain-core|openai|httpx|aiohttp)==' | tr '\n' ' ')
node_openai=$(node -p "require('$NODE_PREFIX/node_modules/openai/package.json').version" 2>/dev/null || echo none)
say "clients: ${versions}npm openai==$node_openai, node $(node --version 2>/dev/null || echo none)"

# -- 2. a live service on a temporary data directory -----------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/llmaas-check-clients.XXXXXX") || die "mktemp failed"
SERVER_PID= PROXY_PID= CLIENT_PID=
stop() {  # stop PID: TERM, then KILL after 30 s
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && { say "process $pid did not stop in 30 s: killing it"; kill -KILL "$pid" 2>/dev/null; }
  wait "$pid" 2>/dev/null
  return 0
}
cleanup() {
  [ -n "$CLIENT_PID" ] && stop "$CLIENT_PID"
  [ -n "$PROXY_PID" ] && stop "$PROXY_PID"
  [ -n "$SERVER_PID" ] && stop "$SERVER_PID"
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
HOME_DIR=$TMP/home
service_log() {  # the service's own output and the last lines of its log, for a failure to start
  cat "$TMP/serve.out" >&2 2>/dev/null
  tail -n 20 "$HOME_DIR"/logs/* >&2 2>/dev/null
}

# the key is printed on a line of its own, `llmaas-...` (the last line, unless a note follows it)
"$LLMAAS" apps --home "$HOME_DIR" add check-clients --max-contexts 16 >"$TMP/apps.out" 2>"$TMP/apps.err"
KEY=$(grep -E '^llmaas-[A-Za-z0-9_-]+$' "$TMP/apps.out" | tail -n 1)
[ -n "$KEY" ] || KEY=$(tail -n 1 "$TMP/apps.out")
[ -n "$KEY" ] || { cat "$TMP/apps.out" "$TMP/apps.err" >&2; die "llmaas apps add failed"; }
PORT=${LLMAAS_CHECK_PORT:-$("$VENV/bin/python" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
BASE=http://127.0.0.1:$PORT
t0=$SECONDS
"$LLMAAS" serve --home "$HOME_DIR" --port "$PORT" --quiet >"$TMP/serve.out" 2>&1 &
SERVER_PID=$!
until curl -fsS --max-time 2 "$BASE/health" >/dev/null 2>&1; do
  kill -0 "$SERVER_PID" 2>/dev/null || { service_log; SERVER_PID=; die "the service exited during start"; }
  ((SECONDS - t0 < START_TIMEOUT_S)) || { service_log; die "no answer from $BASE/health in $START_TIMEOUT_S s"; }
  sleep 0.5
done
say "service up on $BASE after $((SECONDS - t0)) s ($(curl -fsS "$BASE/health"))"

# -- 3. the clients ----------------------------------------------------------------------------------------------------
run_client() {  # run_client NAME BASE_URL OUT ERR: the client's result line to OUT, its messages to ERR
  local c=$1 base=$2 rc
  if [ "$c" = openai-node ]; then
    command -v node >/dev/null || { echo "FAIL $c: node not found" >"$3"; return 1; }
    OPENAI_NODE_PREFIX=$NODE_PREFIX LLMAAS_BASE_URL=$base LLMAAS_KEY=$KEY \
      timeout "$CLIENT_TIMEOUT_S" node "$HERE/check_openai.mjs" >"$3" 2>"$4" &
  else
    LLMAAS_KEY=$KEY timeout "$CLIENT_TIMEOUT_S" "$VENV/bin/python" "$HERE/check_python_clients.py" "$c" \
      --base-url "$base" >"$3" 2>"$4" &
  fi
  CLIENT_PID=$!  # in the background, so that a signal to this script is handled at once
  wait "$CLIENT_PID"
  rc=$?
  CLIENT_PID=
  return "$rc"
}
indent() { sed 's/^/    /' >&2; }

capture() {  # rerun client $1 through the logging proxy and show what it sent and what the service answered
  local c=$1 log=$TMP/$1.capture.jsonl port_file=$TMP/$1.proxy-port i
  "$VENV/bin/python" "$HERE/capture_proxy.py" serve --upstream "$BASE" --log "$log" --port-file "$port_file" \
    2>"$TMP/$c.proxy.err" &
  PROXY_PID=$!
  for ((i = 0; i < 100; i++)); do [ -s "$port_file" ] && break; sleep 0.1; done
  if [ ! -s "$port_file" ]; then
    say "the capture proxy did not start"; indent <"$TMP/$c.proxy.err"
  else
    run_client "$c" "http://127.0.0.1:$(cat "$port_file")" "$TMP/$c.capture.out" "$TMP/$c.capture.err"
    echo "  $c rerun through a logging proxy: $(head -n 1 "$TMP/$c.capture.out")" >&2
    echo "  what $c sent, and what the service answered:" >&2
    "$VENV/bin/python" "$HERE/capture_proxy.py" show "$log" | indent
  fi
  stop "$PROXY_PID"
  PROXY_PID=
}

passed=0 failed=0
for c in "${clients[@]}"; do
  t=$SECONDS
  run_client "$c" "$BASE" "$TMP/$c.out" "$TMP/$c.err"
  rc=$?
  line=$(grep -E "^(PASS|FAIL) $c(:|\$)" "$TMP/$c.out" | tail -n 1)
  if [ -z "$line" ]; then
    if [ "$rc" = 124 ]; then line="FAIL $c: no result in $CLIENT_TIMEOUT_S s"
    else line="FAIL $c: exited with status $rc without a result line"; fi
  elif [ "$rc" != 0 ] && [ "${line#PASS}" != "$line" ]; then
    line="FAIL $c: printed PASS but exited with status $rc"
  fi
  echo "$line"
  if [ "${line#PASS}" != "$line" ]; then
    passed=$((passed + 1))
    [ "${CHECK_CLIENTS_VERBOSE:-0}" = 1 ] && indent <"$TMP/$c.err"
    [ "${CHECK_CLIENTS_CAPTURE:-0}" = 1 ] && capture "$c"
  else
    failed=$((failed + 1))
    echo "  $c's messages:" >&2
    tail -n 60 "$TMP/$c.err" | indent
    [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null && capture "$c"
  fi
  say "$c took $((SECONDS - t)) s"
  if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
    say "the service has exited:"; service_log; SERVER_PID=
  fi
done

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
