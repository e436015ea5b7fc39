# Sourced by scripts/test: SoftHSM2 (a PKCS#11 token in files) and OpenSC's
# pkcs11-tool for the `pkcs11` master-key provider's tests (tests/api/pkcs11.rs).
#
#   start_softhsm   installs softhsm2 and opensc with apt-get when missing,
#                   checks that a throwaway token can be made in a temp folder
#                   (its own SOFTHSM2_CONF) with a non-extractable AES key, and
#                   exports KEYWARD_TEST_PKCS11_MODULE; fails, never skips.
#   stop_softhsm    removes the temp folder.
#
# Each test makes its own token the same way (new_softhsm_token below is the
# recipe; the tests run its steps themselves), so that one test taking its
# token away does not disturb another.

_softhsm_module() {
  local m
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
           /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so; do
    [ -f "$m" ] && { echo "$m"; return 0; }
  done
  return 1
}

# new_softhsm_token DIR LABEL PIN KEY_LABEL: a token in DIR (DIR/softhsm2.conf,
# DIR/tokens) holding a sensitive, non-extractable AES-256 key KEY_LABEL.
new_softhsm_token() {
  local dir="$1" label="$2" pin="$3" key="$4"
  mkdir -p "$dir/tokens"
  printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$dir" > "$dir/softhsm2.conf"
  SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label "$label" \
    --so-pin "so-$pin" --pin "$pin" >/dev/null || return 1
  SOFTHSM2_CONF="$dir/softhsm2.conf" pkcs11-tool --module "$KEYWARD_TEST_PKCS11_MODULE" \
    --token-label "$label" --login --pin "$pin" --keygen --key-type AES:32 --label "$key" \
    --sensitive >/dev/null || return 1
}

start_softhsm() {
  if ! command -v softhsm2-util >/dev/null || ! command -v pkcs11-tool >/dev/null; then
    local sudo=; [ "$(id -u)" -ne 0 ] && sudo=sudo
    echo "scripts/softhsm.sh: installing softhsm2 and opensc" >&2
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq softhsm2 opensc >/dev/null \
      || { echo "scripts/softhsm.sh: cannot install softhsm2 and opensc" >&2; return 1; }
  fi
  KEYWARD_TEST_PKCS11_MODULE=$(_softhsm_module) \
    || { echo "scripts/softhsm.sh: libsofthsm2.so not found" >&2; return 1; }
  export KEYWARD_TEST_PKCS11_MODULE
  KEYWARD_TEST_SOFTHSM_DIR=$(mktemp -d /tmp/keyward-softhsm.XXXXXX)
  export KEYWARD_TEST_SOFTHSM_DIR
  if ! new_softhsm_token "$KEYWARD_TEST_SOFTHSM_DIR" keyward-check 1234 check-key; then
    echo "scripts/softhsm.sh: cannot make a SoftHSM token with an AES key" >&2
    return 1
  fi
  echo "scripts/softhsm.sh: SoftHSM2 module $KEYWARD_TEST_PKCS11_MODULE" >&2
}

stop_softhsm() {
  [ -n "${KEYWARD_TEST_SOFTHSM_DIR:-}" ] && rm -rf "$KEYWARD_TEST_SOFTHSM_DIR"
  unset KEYWARD_TEST_SOFTHSM_DIR
  return 0
}
