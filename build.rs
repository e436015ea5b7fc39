//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds
//! `migrations/` at compile time, and a new file there changes no Rust source,
//! so without this a build (and the test suite) would keep the old list. This
//! is the build script sqlx recommends (`sqlx migrate build-script`).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
