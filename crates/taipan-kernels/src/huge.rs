//! Buffers on 2 MiB pages where the system allows it: the packed weights, and the models' state
//! and KV pools.
//!
//! Decode streams every weight once per token (per step when batched). On 4 KiB pages that is a
//! page walk every 4 KiB, and the hardware prefetchers stop at each page's end; on 2 MiB pages
//! both nearly vanish (synthetic Jamba, Intel Xeon: 16-sequence step −5–9%, single-stream decode
//! −7%; the state and KV pools on huge pages too: another −6%, the Mamba scan's 2 MiB of states
//! per layer no longer missing the TLB). Linux gives transparent huge pages to anonymous memory
//! when its mode is `always`, or when it is `madvise` (a common default) and the range was
//! advised: so each large buffer advises the 2 MiB-aligned pages it wholly covers before any byte
//! is written. Where the system refuses, the buffer simply stays on small pages: same contents,
//! same results.

use std::ops::{Deref, DerefMut};

const HUGE_PAGE: usize = 2 << 20;

/// Element types whose all-zero bytes are their zero (so a zeroed allocation is a buffer of
/// zeros, and needs no writing).
pub trait Zeroed: Copy + Default + PartialEq + std::fmt::Debug + 'static {}
impl Zeroed for u8 {}
impl Zeroed for f32 {}
impl Zeroed for u64 {}

/// A zero-initialised buffer whose whole 2 MiB-aligned pages are advised as huge pages. The
/// first element sits on a 2 MiB boundary (for buffers of at least 2 MiB), so no huge page is
/// shared with other data, and the tail past the last whole page stays on small pages: the
/// resident size is the buffer's own.
pub struct HugeBuf<T: Zeroed> {
    /// Over-allocated by up to one huge page; never touched outside `start..start + len`.
    buf: Vec<T>,
    start: usize,
    len: usize,
}

/// Packed weight bytes.
pub type HugeBytes = HugeBuf<u8>;

impl<T: Zeroed> HugeBuf<T> {
    pub fn zeroed(len: usize) -> Self {
        let size = std::mem::size_of::<T>();
        if len * size < HUGE_PAGE {
            return HugeBuf { buf: vec![T::default(); len], start: 0, len };
        }
        // A zeroed allocation this large is fresh pages from the system, untouched until
        // written: the advice reaches them before their first fault.
        let buf = vec![T::default(); len + HUGE_PAGE / size];
        let start = buf.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE / size);
        let whole = len * size / HUGE_PAGE * HUGE_PAGE;
        advise_huge_pages(buf[start..].as_ptr() as *const u8, whole);
        HugeBuf { buf, start, len }
    }

    /// Grows to `len` elements, the new ones zero (a new buffer, the old contents copied).
    pub fn grow_zeroed(&mut self, len: usize) {
        if len > self.len {
            let mut grown = HugeBuf::zeroed(len);
            grown[..self.len].copy_from_slice(self);
            *self = grown;
        }
    }
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(at: *const u8, bytes: usize) {
    if bytes == 0 {
        return;
    }
    // SAFETY: the range is memory this process owns (inside the buffer's allocation); the
    // advice changes how its pages are backed, never their contents. A refusal (no THP in this
    // kernel) leaves small pages.
    unsafe { libc::madvise(at as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_at: *const u8, _bytes: usize) {}

impl<T: Zeroed> Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl<T: Zeroed> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl<T: Zeroed> Clone for HugeBuf<T> {
    fn clone(&self) -> Self {
        let mut copy = HugeBuf::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl<T: Zeroed> std::fmt::Debug for HugeBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf({} elements)", self.len)
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

    #[test]
    fn float_buffers_grow_keeping_their_values() {
        let mut b = HugeBuf::<f32>::zeroed(1000);
        b[999] = 2.5;
        b.grow_zeroed(HUGE_PAGE);
        assert_eq!(b.len(), HUGE_PAGE);
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!((b[998], b[999], b[1000], b[HUGE_PAGE - 1]), (0.0, 2.5, 0.0, 0.0));
    }
}
