//! How the process's heap gives memory back, so that the resident size once a model is loaded is
//! what the server keeps: the weights, the KV budget and the indexes, not the load's leftovers.

/// glibc's `M_MMAP_THRESHOLD` (`malloc.h`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const M_MMAP_THRESHOLD: i32 = -3;

/// Gives every block of 128 KiB or more its own mapping for the life of the process.
///
/// By default glibc raises that threshold (up to 32 MiB) each time such a block is freed, and a
/// load frees many; the index and table buffers built afterwards then come from heap arenas, on
/// pages an earlier buffer already touched, and the capacity they never fill stays resident
/// (~18 MiB on Gemma 3's 262k vocabulary). With the threshold fixed, a large block's pages are
/// resident only once written and go back when it is freed. Serving allocates no block that
/// large per step (`strace` of a server decoding four streams: the same mappings for 8 tokens
/// as for 120), so this costs the hot path nothing. Call before anything is allocated in bulk.
pub fn keep_large_blocks_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes the allocator's tuning; it is safe to call at any time.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 128 << 10);
        }
    }
}

/// Hands memory freed while loading (the tokenizer's intermediate JSON, repacking buffers, the
/// metadata the summary read) back to the operating system.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only releases free heap pages; it is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}
