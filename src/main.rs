//! The `keyward` binary: parse the command line and hand over to the library.
//!
//! The library forbids `unsafe` code; the binary denies it everywhere but the
//! allocator's tuning and release ([`allocator`]), which call C option setters
//! before `main` and the allocators' release functions when idle, and says
//! there why that is sound.

#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser;

mod allocator;

fn main() -> ExitCode {
    #[cfg(not(target_os = "linux"))]
    allocator::tune_late();
    keyward::memory::register_allocator_release(allocator::release_free_memory);
    let cli = keyward::cli::Cli::parse();
    // One TLS provider for every client in the process (AWS-LC; Vault's HTTP
    // client expects a process default).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(keyward::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<keyward::cli::ExitWith>() {
            // A documented outcome: its message alone, and its status.
            Some(exit) => {
                eprintln!("error: {}", exit.message);
                ExitCode::from(exit.code)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
