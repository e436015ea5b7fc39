//! The process's memory allocator: mimalloc, tuned before anything allocates.
//!
//! A request allocates and frees many small buffers across worker threads;
//! glibc's malloc spent about an eighth of a loaded server's CPU on them, and
//! mimalloc a third of that. Its defaults trade memory for speed, though: with
//! 10,000 encryptions warm the server held 98 MiB. Two options bring that to
//! about 56 MiB:
//!
//! - `arena_eager_commit = 0`: commit arena memory as it is used rather than
//!   all at once. mimalloc reads this when it reserves its first arena, at the
//!   first allocation, which comes before `main`; so it is set from the ELF
//!   `.preinit_array`, which runs before every constructor and allocation.
//! - `purge_delay = 10` ms: give freed pages back soon (the default is one
//!   second; 0 costs a `madvise` and a page fault per reuse).
//!
//! Both are defaults only: a `MIMALLOC_ARENA_EAGER_COMMIT` or
//! `MIMALLOC_PURGE_DELAY` in the environment still wins.
//!
//! Shared with the benchmark's ceiling server (`bench/ceiling.rs`), so both run
//! on the same allocator settings.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in libmimalloc-sys 0.1.49's mimalloc v3
/// header (pinned in Cargo.toml).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
/// `mi_option_purge_delay` in the same header.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[allow(unsafe_code)]
extern "C" fn tune() {
    // SAFETY: plain option setters of the C library; they only store a value
    // (no allocation), and run before any other thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 10);
    }
}

// Placing a function pointer in `.preinit_array` is `unsafe_code` to the
// compiler: the loader calls it before `main`. `tune` only stores two integers.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
#[used]
#[link_section = ".preinit_array"]
static TUNE: extern "C" fn() = tune;

/// Where `.preinit_array` does not exist: as early as `main` can.
#[cfg(not(target_os = "linux"))]
pub fn tune_late() {
    tune();
}

/// Gives the free pages both allocators hold back to the operating system:
/// mimalloc's (Rust's allocations) and, with glibc, the C library's (SQLite's
/// page caches and AWS-LC's keys live there, in one arena per thread that
/// allocated). Called by [`keyward::memory`] when the server has gone idle;
/// it takes a few milliseconds, and the next allocations refill from the
/// operating system as they would after a start.
#[allow(unsafe_code, dead_code)]
pub fn release_free_memory() {
    // SAFETY: `mi_collect` frees only pages mimalloc itself holds free and may
    // be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
    // SAFETY: `malloc_trim` is thread-safe (it locks each arena in turn) and
    // only returns memory no allocation uses.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}
