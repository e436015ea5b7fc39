#!/usr/bin/env bash
# The supply-chain checks, offline: `cargo deny check` (advisories, licences,
# bans, sources; deny.toml says why each rule is there) against the snapshot
# of the RustSec advisory database in ../shared/advisory-db, and no RSA crate
# among the normal dependencies (RSA private-key operations only through a
# constant-time implementation; `rsa` is not one).
#
#   scripts/supply-chain.sh
#
# KEYWARD_ADVISORY_DB names another snapshot folder. cargo-deny is installed
# (pinned, --locked) if missing. Run by scripts/test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keyward/target}"
CARGO_DENY_VERSION=0.20.2

snapshot="${KEYWARD_ADVISORY_DB:-$(pwd)/../shared/advisory-db}"
if [ ! -f "$snapshot/SNAPSHOT" ]; then
  echo "scripts/supply-chain.sh: no advisory database snapshot at $snapshot (set KEYWARD_ADVISORY_DB)" >&2
  exit 1
fi

if ! cargo deny --version 2>/dev/null | grep -q " $CARGO_DENY_VERSION\$"; then
  echo "==> installing cargo-deny $CARGO_DENY_VERSION"
  CARGO_TARGET_DIR="$CARGO_TARGET_DIR/install-cargo-deny" \
    cargo install --locked --version "$CARGO_DENY_VERSION" cargo-deny
fi

# cargo-deny opens the database as a git checkout in a folder named after its
# URL (deny.toml's db-urls): a copy of the snapshot, committed once, rebuilt
# when the snapshot changes. Nothing is fetched.
root="$CARGO_TARGET_DIR/advisory-dbs"
db="$root/advisory-db-3157b0e258782691"
if [ ! -d "$db/.git" ] || ! cmp -s "$snapshot/SNAPSHOT" "$db/SNAPSHOT"; then
  rm -rf "$db"
  mkdir -p "$root"
  cp -r "$snapshot" "$db"
  date=$(grep -o '[0-9]\{4\}-[0-9]\{2\}-[0-9]\{2\}' "$db/SNAPSHOT" | head -1)
  (
    cd "$db"
    git init -q
    git add -A
    GIT_AUTHOR_DATE="${date}T00:00:00Z" GIT_COMMITTER_DATE="${date}T00:00:00Z" \
      git -c user.name=snapshot -c user.email=snapshot@localhost -c commit.gpgsign=false \
      commit -q -m "$(head -1 SNAPSHOT)"
  )
fi

echo "==> cargo deny check (advisories: $(head -1 "$snapshot/SNAPSHOT"))"
# --hide-inclusion-graph: the duplicate-version warnings alone would print
# hundreds of lines of trees; run `cargo deny check` by hand to see them.
KEYWARD_ADVISORY_DB_ROOT="$root" cargo deny --offline --locked check --hide-inclusion-graph

echo "==> no RSA crate among the normal dependencies"
rsa=$(cargo tree --offline --locked -i rsa -e normal 2>/dev/null || true)
if [ -n "$rsa" ]; then
  echo "scripts/supply-chain.sh: the rsa crate is a normal dependency:" >&2
  echo "$rsa" >&2
  exit 1
fi
