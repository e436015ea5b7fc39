#!/usr/bin/env bash
# The supply-chain checks, offline: `cargo deny check` (advisories, licences,
# bans, sources; deny.toml says why each rule is there) against the snapshot
# of the RustSec advisory database in ../shared/advisory-db, and no RSA crate
# among the normal dependencies (RSA private-key operations only through a
# constant-time implementation; `rsa` is not one).
#
#   scripts/supply-chain.sh             # the checks
#   scripts/supply-chain.sh --vendor    # refresh supply-chain/advisory-db
#
# KEYWARD_ADVISORY_DB names another snapshot folder. cargo-deny is installed
# (pinned, --locked) if missing. Run by scripts/test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keyward/target}"
CARGO_DENY_VERSION=0.20.2

# The full snapshot: KEYWARD_ADVISORY_DB, else ../shared/advisory-db beside the
# checkout, else /work/shared/advisory-db. A clone elsewhere (a CI runner that
# has no copy) falls back to supply-chain/advisory-db: the advisories of the
# same snapshot for every crate in Cargo.lock, refreshed from the full one with
# `scripts/supply-chain.sh --vendor` whenever Cargo.lock gains a crate.
vendored="$(pwd)/supply-chain/advisory-db"
snapshot=
for candidate in "${KEYWARD_ADVISORY_DB:-}" "$(pwd)/../shared/advisory-db" /work/shared/advisory-db; do
  if [ -n "$candidate" ] && [ -f "$candidate/SNAPSHOT" ]; then
    snapshot=$candidate
    break
  fi
done

if [ "${1:-}" = "--vendor" ]; then
  if [ -z "$snapshot" ]; then
    echo "scripts/supply-chain.sh --vendor: no full snapshot found (set KEYWARD_ADVISORY_DB)" >&2
    exit 1
  fi
  rm -rf "$vendored"
  mkdir -p "$vendored/crates"
  cp "$snapshot/SNAPSHOT" "$vendored/SNAPSHOT"
  [ -d "$snapshot/rust" ] && cp -r "$snapshot/rust" "$vendored/rust"
  sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | sort -u | while read -r crate; do
    if [ -d "$snapshot/crates/$crate" ]; then cp -r "$snapshot/crates/$crate" "$vendored/crates/$crate"; fi
  done
  echo "supply-chain/advisory-db: $(ls "$vendored/crates" | wc -l) crates' advisories from $(head -1 "$snapshot/SNAPSHOT")"
  exit 0
fi

if [ -z "$snapshot" ]; then
  if [ ! -f "$vendored/SNAPSHOT" ]; then
    echo "scripts/supply-chain.sh: no advisory database snapshot (set KEYWARD_ADVISORY_DB)" >&2
    exit 1
  fi
  echo "scripts/supply-chain.sh: no full snapshot beside the checkout; using the vendored subset in supply-chain/advisory-db"
  snapshot=$vendored
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
# For every target platform, and passing only on cargo's own "nothing to
# print" (a cargo tree that fails for another reason fails the check).
rsa=$(cargo tree --offline --locked --target all -e normal -i rsa 2>&1 || true)
if ! grep -qE "nothing to print|did not match any packages" <<<"$rsa"; then
  echo "scripts/supply-chain.sh: the rsa crate is a normal dependency:" >&2
  echo "$rsa" >&2
  exit 1
fi
