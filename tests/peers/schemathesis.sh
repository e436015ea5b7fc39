#!/usr/bin/env bash
# Runs schemathesis (property-based API testing from the OpenAPI description)
# against a live Keyward with every check: no 5xx, every status code, content
# type, header and body as documented, schema-violating requests refused,
# schema-valid ones accepted, auth enforced, and the stateful phase that chains
# operations through the spec's links (create an encryption → encrypt, rotate;
# encrypt → decrypt, rewrap, rotate; rewrap → decrypt; rotate → encrypt with
# the new version), so it decrypts real ciphertexts.
# Exits non-zero on any failure, printing each with a curl command that
# reproduces it.
#
# Required:
#   KEYWARD_URL            base URL, e.g. http://127.0.0.1:8480
#   KEYWARD_API_KEY        an API key id (kw_...): a tenant key with all five
#                          scopes, or an operator key
#   KEYWARD_API_SECRET     its secret (kws_...)
# Optional:
#   KEYWARD_ENCRYPTION_ID  an existing encryption of the key's tenant, and
#   KEYWARD_VERSION_ID     one of its versions: schemathesis then uses them for
#                          about half of the `encryptionId` / `{id}` and
#                          `encryptionVersionId` / `{versionId}` values it sends, so
#                          encrypt, decrypt, rotate, rewrap and the version routes
#                          get past 404 before the stateful phase has made its
#                          own; both may be rotated, re-policied or disabled
#   KEYWARD_TENANT_ID      a tenant: used the same way for `{tenantId}` and the
#                          `tenantId` query parameter (operator routes)
#   KEYWARD_SPEC           the OpenAPI document, a file or a URL
#                          (default: $KEYWARD_URL/openapi.json, what the server serves)
#   KEYWARD_ST_MAX_EXAMPLES  test cases per operation and phase (default 25: ~30 s)
#   KEYWARD_ST_SEED        reproduce a run (default: random; the seed is printed)
#   KEYWARD_ST_WORKERS     concurrent workers (default 1: with two, Hypothesis
#                          parses sources with `ast.parse` from both threads, and
#                          CPython 3.11's AST converter shares one recursion
#                          counter between threads, so a run could end in
#                          "SystemError: AST constructor recursion depth mismatch"
#                          inside the tool, not the server; later CPython releases
#                          fixed it)
#   KEYWARD_ST_SANITIZE    true|false: hide credentials and X-Master-Key values in
#                          the output (default true; the test suite's throwaway
#                          server sets false so the curl commands run as printed)
#   KEYWARD_ST_REPORT_DIR  keep the JUnit and JSON reports there
#   KEYWARD_ST             the `st` executable (default: $KEYWARD_PEER_VENV/bin/st,
#                          else `st` on PATH; scripts/peers.sh installs it)
#
# The server should not lock the test's address out after failed logins, which
# schemathesis makes on purpose (missing and wrong credentials): start it with
# KEYWARD_AUTH_MAX_FAILURES set high, or every later request is 429.
#
# schemathesis_hooks.py (next to this script) replaces the check
# `positive_data_acceptance` by the same check minus the refusals that depend on
# state or cryptography (a ciphertext that does not authenticate, a cursor the
# server did not issue, ...), listed there by operation, status and error code.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1

here="$(cd "$(dirname "$0")" && pwd)"

die() {
  echo "schemathesis.sh: $1" >&2
  exit "${2:-2}"
}

for v in KEYWARD_URL KEYWARD_API_KEY KEYWARD_API_SECRET; do
  [ -n "${!v:-}" ] || die "$v is not set"
done
url="${KEYWARD_URL%/}"

st="${KEYWARD_ST:-}"
if [ -z "$st" ] && [ -n "${KEYWARD_PEER_VENV:-}" ] && [ -x "$KEYWARD_PEER_VENV/bin/st" ]; then
  st="$KEYWARD_PEER_VENV/bin/st"
fi
if [ -z "$st" ]; then
  st="$(command -v st || true)"
fi
[ -n "$st" ] && [ -x "$st" ] \
  || die "schemathesis (st) not found: set KEYWARD_PEER_VENV or KEYWARD_ST, or run \`source scripts/peers.sh && ensure_peer_venv\`"

spec="${KEYWARD_SPEC:-$url/openapi.json}"
location=("$spec")
case "$spec" in
  http://* | https://*) ;;
  *)
    [ -f "$spec" ] || die "KEYWARD_SPEC=$spec is not a file"
    spec="$(cd "$(dirname "$spec")" && pwd)/$(basename "$spec")"
    location=("$spec" --url "$url")
    ;;
esac

work="$(mktemp -d "${TMPDIR:-/tmp}/keyward-schemathesis.XXXXXX")"
cleanup() {
  if [ -n "${KEYWARD_ST_REPORT_DIR:-}" ]; then
    mkdir -p "$KEYWARD_ST_REPORT_DIR"
    cp -r "$work/reports/." "$KEYWARD_ST_REPORT_DIR/" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
# schemathesis and hypothesis write next to the working directory: keep that
# out of the checkout.
cd "$work"

# Known ids, as schemathesis dictionaries bound to the fields that take them.
config="$work/schemathesis.toml"
: >"$config"
bind() { # bind DICTIONARY VALUE FIELD...
  local name="$1" value="$2" field
  shift 2
  [[ "$value" =~ ^[0-9a-fA-F-]{36}$ ]] || die "not a UUID: $value"
  printf '[dictionaries.%s]\nvalues = ["%s"]\n' "$name" "$value" >>"$config"
  for field in "$@"; do
    bindings+=("\"$field\" = { dictionary = \"$name\", probability = 0.5 }")
  done
}
bindings=()
[ -n "${KEYWARD_ENCRYPTION_ID:-}" ] && bind encryption_ids "$KEYWARD_ENCRYPTION_ID" body.encryptionId path.id
[ -n "${KEYWARD_VERSION_ID:-}" ] && bind version_ids "$KEYWARD_VERSION_ID" body.encryptionVersionId path.versionId
[ -n "${KEYWARD_TENANT_ID:-}" ] && bind tenant_ids "$KEYWARD_TENANT_ID" path.tenantId query.tenantId
if [ "${#bindings[@]}" -gt 0 ]; then
  printf '[parameters]\n' >>"$config"
  printf '%s\n' "${bindings[@]}" >>"$config"
fi

args=(
  --config-file "$config"
  run "${location[@]}"
  --checks all
  # Replaced by keyward_positive_data_acceptance from the hooks.
  --exclude-checks positive_data_acceptance
  --header "X-Api-Key: $KEYWARD_API_KEY"
  --header "X-Api-Secret: $KEYWARD_API_SECRET"
  --max-examples "${KEYWARD_ST_MAX_EXAMPLES:-25}"
  --workers "${KEYWARD_ST_WORKERS:-1}"
  --continue-on-failure
  --request-timeout 30
  --generation-database none
  --output-sanitize "${KEYWARD_ST_SANITIZE:-true}"
  --report junit,json
  --report-dir "$work/reports"
  --no-color
)
[ -n "${KEYWARD_ST_SEED:-}" ] && args+=(--seed "$KEYWARD_ST_SEED")

echo "schemathesis.sh: $("$st" --version) against $url, spec ${location[*]}"
status=0
SCHEMATHESIS_HOOKS="$here/schemathesis_hooks.py" "$st" "${args[@]}" || status=$?

# A run that tested nothing (a spec that did not load, a server that did not
# answer) must not pass.
report="$(ls "$work"/reports/*.json 2>/dev/null | head -n 1 || true)"
if [ "$status" -eq 0 ]; then
  [ -n "$report" ] || die "schemathesis wrote no report" 1
  py="$(dirname "$st")/python"
  [ -x "$py" ] || py=python3
  "$py" - "$report" <<'EOF' || status=1
import json, sys
r = json.load(open(sys.argv[1]))
generated = r.get("test_cases", {}).get("generated", 0)
failures = r.get("failures") or []
errors = r.get("errors") or []
if not r.get("complete", True) or generated == 0 or failures or errors:
    print(f"schemathesis.sh: incomplete run: complete={r.get('complete')}, "
          f"{generated} test cases, {len(failures)} failures, {len(errors)} errors", file=sys.stderr)
    sys.exit(1)
EOF
fi
if [ "$status" -ne 0 ]; then
  echo "schemathesis.sh: FAILED (st exit status $status); each failure above has a curl command" \
    "that reproduces it; rerun with KEYWARD_ST_SEED=<the seed above> to repeat the run, and" \
    "KEYWARD_ST_REPORT_DIR=DIR to keep the reports (the temporary folder above is removed)" >&2
  exit 1
fi
echo "schemathesis.sh: OK"
