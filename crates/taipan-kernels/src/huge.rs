//! Weight buffers on 2 MiB pages where the system allows it.
//!
//! Decode streams every weight once per token (per step when batched). On 4 KiB pages that is a
//! page walk every 4 KiB, and the hardware prefetchers stop at each page's end; on 2 MiB pages
//! both nearly vanish (synthetic Jamba, Intel Xeon: 16-sequence step −5–9%, single-stream decode
//! −7%). Linux gives transparent huge pages to anonymous memory when its mode is `always`, or
//! when it is `madvise` (a common default) and the range was advised: so each large buffer
//! advises the 2 MiB-aligned pages it wholly covers before any byte is written. Where the system
//! refuses, the buffer simply stays on small pages: same contents, same results.

use std::ops::{Deref, DerefMut};

const HUGE_PAGE: usize = 2 << 20;

/// A zero-initialised byte buffer whose whole 2 MiB-aligned pages are advised as huge pages.
/// The first byte sits on a 2 MiB boundary (for buffers of at least 2 MiB), so no huge page is
/// shared with other data, and the tail past the last whole page stays on small pages: the
/// resident size is the buffer's own.
pub struct HugeBytes {
    /// Over-allocated by up to one huge page; never touched outside `start..start + len`.
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl HugeBytes {
    pub fn zeroed(len: usize) -> Self {
        if len < HUGE_PAGE {
            return HugeBytes { buf: vec![0; len], start: 0, len };
        }
        // A zeroed allocation this large is fresh pages from the system, untouched until
        // written: the advice reaches them before their first fault.
        let buf = vec![0u8; len + HUGE_PAGE];
        let start = buf.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        let whole = len / HUGE_PAGE * HUGE_PAGE;
        advise_huge_pages(&buf[start..start + whole]);
        HugeBytes { buf, start, len }
    }
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(range: &[u8]) {
    if range.is_empty() {
        return;
    }
    // SAFETY: the range is memory this process owns; the advice changes how its pages are
    // backed, never their contents. A refusal (no THP in this kernel) leaves small pages.
    unsafe { libc::madvise(range.as_ptr() as *mut libc::c_void, range.len(), libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_range: &[u8]) {}

impl Deref for HugeBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl DerefMut for HugeBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl Clone for HugeBytes {
    fn clone(&self) -> Self {
        let mut copy = HugeBytes::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl std::fmt::Debug for HugeBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_start_on_a_huge_page_and_hold_their_bytes() {
        for len in [10, HUGE_PAGE - 1, HUGE_PAGE, 3 * HUGE_PAGE + 12345] {
            let mut b = HugeBytes::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0));
            if len >= HUGE_PAGE {
                assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
            }
            for (i, v) in b.iter_mut().enumerate() {
                *v = (i % 251) as u8;
            }
            let c = b.clone();
            assert_eq!(&c[..], &b[..]);
            assert_eq!(c[len - 1], ((len - 1) % 251) as u8);
        }
    }
}
