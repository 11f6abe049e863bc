//! Buffers on 2 MiB pages where the system allows it: the packed weights (carved one after
//! another from a model's [`WeightArena`]), and the models' state and KV pools.
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
//!
//! A buffer of its own covers whole huge pages only up to its last 2 MiB boundary; the rest stays
//! on small pages, so that no memory is resident beyond its bytes. For one model's many weight
//! matrices that tail was most of the story: an expert's 5.8 MiB gate/up matrix kept 31% of
//! its bytes on small pages, a 3 MiB down matrix 31%, every matrix under 2 MiB all of them, and
//! streaming such a matrix from DRAM ran at ~25 GB/s where whole huge pages give ~33. So a
//! model's packed matrices are laid end to end in one reserved range of address space
//! ([`WeightArena`]), all of it advised huge: only the last page of the whole model is partial.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

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

/// Whether the system gives huge pages to the buffers here: Linux's transparent-huge-page mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// `always` or `madvise`: advised buffers get 2 MiB pages.
    Given,
    /// `never`: everything stays on small pages.
    Off,
    /// Not Linux, or the mode could not be read.
    Unknown,
}

/// The system's transparent-huge-page mode, as `/sys/kernel/mm/transparent_hugepage/enabled`
/// shows it (the bracketed word).
pub fn huge_pages() -> HugePages {
    match std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled") {
        Ok(text) => mode_of(&text),
        Err(_) => HugePages::Unknown,
    }
}

/// The mode in the sysfs file's form, e.g. `always [madvise] never`.
fn mode_of(text: &str) -> HugePages {
    match text.split('[').nth(1).and_then(|m| m.split(']').next()) {
        Some("always" | "madvise") => HugePages::Given,
        Some("never") => HugePages::Off,
        _ => HugePages::Unknown,
    }
}

/// Bytes of this process's memory on transparent huge pages (`AnonHugePages`), where the system
/// says.
pub fn resident_on_huge_pages() -> Option<usize> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = rollup.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// Address space one arena reserves at a time: only the pages written become memory, so this
/// need not fit in memory (a reservation the system refuses is retried at half the size).
const ARENA_RESERVE: usize = 64 << 30;

/// Where a model's packed weights live: a reserved range of address space, advised as huge
/// pages as a whole, from which each matrix takes the next bytes (cache-line aligned). Matrices
/// share the reservation; it is released when the last of them, and the arena, are dropped.
/// Bytes are never reused: an arena serves one model's loading.
pub struct WeightArena {
    /// The reservation being filled, and the bytes of it handed out so far.
    current: Mutex<Option<(Arc<Reservation>, usize)>>,
    /// Bytes of address space each reservation asks for.
    reserve: usize,
}

impl Default for WeightArena {
    fn default() -> Self {
        Self::with_reserve(ARENA_RESERVE)
    }
}

impl WeightArena {
    pub fn new() -> Self {
        Self::default()
    }

    /// An arena reserving `reserve` bytes of address space at a time.
    pub fn with_reserve(reserve: usize) -> Self {
        WeightArena { current: Mutex::new(None), reserve }
    }

    /// `len` zero bytes, just after the previous request's.
    pub fn zeroed(&self, len: usize) -> WeightBytes {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |(r, used): &(Arc<Reservation>, usize)| used.next_multiple_of(LINE) + len <= r.len;
        if !current.as_ref().is_some_and(fits) {
            match Reservation::new(len, self.reserve) {
                Some(r) => *current = Some((Arc::new(r), 0)),
                // No address space to reserve: the bytes get a buffer of their own.
                None => return WeightBytes(Home::Own(HugeBuf::zeroed(len))),
            }
        }
        let Some((reservation, used)) = current.as_mut() else { unreachable!("a reservation was just made") };
        let offset = used.next_multiple_of(LINE);
        *used = offset + len;
        WeightBytes(Home::Shared { reservation: Arc::clone(reservation), offset, len })
    }
}

/// A cache line: where each of an arena's buffers starts.
const LINE: usize = 64;

/// Bytes from a [`WeightArena`] (or, made alone, a [`HugeBuf`] of their own).
pub struct WeightBytes(Home);

enum Home {
    Own(HugeBuf<u8>),
    Shared { reservation: Arc<Reservation>, offset: usize, len: usize },
}

impl WeightBytes {
    /// `len` zero bytes in a buffer of their own.
    pub fn zeroed(len: usize) -> Self {
        WeightBytes(Home::Own(HugeBuf::zeroed(len)))
    }
}

impl Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Home::Own(b) => b,
            // SAFETY: offset..offset + len lies inside the reservation (checked when carved),
            // which lives as long as this handle.
            Home::Shared { reservation, offset, len } => unsafe {
                std::slice::from_raw_parts(reservation.base.add(*offset), *len)
            },
        }
    }
}

impl DerefMut for WeightBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Home::Own(b) => b,
            // SAFETY: as for `deref`; and these bytes were handed to this handle alone, so the
            // `&mut self` borrow makes this the only access to them.
            Home::Shared { reservation, offset, len } => unsafe {
                std::slice::from_raw_parts_mut(reservation.base.add(*offset), *len)
            },
        }
    }
}

impl Clone for WeightBytes {
    /// A copy in a buffer of its own (a handle's bytes are never shared).
    fn clone(&self) -> Self {
        let mut copy = WeightBytes::zeroed(self.len());
        copy.copy_from_slice(self);
        copy
    }
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({} bytes)", self.len())
    }
}

/// A private anonymous mapping starting on a 2 MiB boundary, advised huge as a whole, unmapped
/// on drop.
struct Reservation {
    base: *mut u8,
    len: usize,
    /// The whole mapping (`base` may lie past its start, for alignment).
    mapped: (*mut u8, usize),
}

// SAFETY: the mapping is plain memory owned by this value; who may touch which bytes is
// decided by the `WeightBytes` handles, each of which owns a disjoint range.
unsafe impl Send for Reservation {}
unsafe impl Sync for Reservation {}

impl Reservation {
    /// A reservation of at least `len` bytes: `reserve` where the system grants it.
    #[cfg(target_os = "linux")]
    fn new(len: usize, reserve: usize) -> Option<Self> {
        let need = len.max(1).next_multiple_of(HUGE_PAGE);
        let mut size = reserve.max(need);
        loop {
            // SAFETY: a fresh private anonymous mapping, touching no existing memory.
            let at = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size + HUGE_PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if at != libc::MAP_FAILED {
                let at = at as *mut u8;
                let base = at.wrapping_add(at.align_offset(HUGE_PAGE));
                advise_huge_pages(base, size);
                return Some(Reservation { base, len: size, mapped: (at, size + HUGE_PAGE) });
            }
            if size == need {
                return None;
            }
            size = (size / 2).max(need).next_multiple_of(HUGE_PAGE);
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn new(_len: usize, _reserve: usize) -> Option<Self> {
        None
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        // SAFETY: the mapping made in `new`; every handle into it is gone (they hold this value).
        unsafe {
            libc::munmap(self.mapped.0 as *mut libc::c_void, self.mapped.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_start_on_a_huge_page_and_hold_their_bytes() {
        for len in [10, HUGE_PAGE - 1, HUGE_PAGE, 3 * HUGE_PAGE + 12345] {
            let mut b = HugeBuf::<u8>::zeroed(len);
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

    #[test]
    fn an_arena_lays_buffers_end_to_end_and_they_outlive_it() {
        let arena = WeightArena::new();
        let sizes = [100, 3 * HUGE_PAGE + 5, 64, 1];
        let mut bufs: Vec<WeightBytes> = sizes.iter().map(|&n| arena.zeroed(n)).collect();
        drop(arena);
        #[cfg(target_os = "linux")]
        {
            assert_eq!(bufs[0].as_ptr() as usize % HUGE_PAGE, 0, "the first starts a huge page");
            for (w, n) in bufs.windows(2).zip(sizes) {
                assert_eq!(w[1].as_ptr() as usize - w[0].as_ptr() as usize, n.next_multiple_of(LINE));
            }
        }
        for (i, (b, &n)) in bufs.iter_mut().zip(&sizes).enumerate() {
            assert_eq!(b.len(), n);
            assert!(b.iter().all(|&v| v == 0));
            b.fill(i as u8 + 1);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&v| v == i as u8 + 1), "buffer {i} kept its bytes");
        }
        let copy = bufs[1].clone();
        assert_ne!(copy.as_ptr(), bufs[1].as_ptr());
        assert_eq!(&copy[..], &bufs[1][..]);
    }

    #[test]
    fn a_buffer_larger_than_the_reservation_left_gets_a_new_one() {
        let arena = WeightArena::with_reserve(2 * HUGE_PAGE);
        let mut small = arena.zeroed(10);
        let mut big = arena.zeroed(3 * HUGE_PAGE);
        let mut after = arena.zeroed(HUGE_PAGE);
        let mut last = arena.zeroed(HUGE_PAGE);
        for (i, b) in [&mut small, &mut big, &mut after, &mut last].into_iter().enumerate() {
            assert!(b.iter().all(|&v| v == 0));
            b.fill(i as u8 + 1);
        }
        #[cfg(target_os = "linux")]
        {
            // The big one did not fit after the small one, and filled a reservation of its
            // own; the next two share a third.
            assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
            assert_eq!(after.as_ptr() as usize % HUGE_PAGE, 0);
            assert_eq!(last.as_ptr() as usize, after.as_ptr() as usize + HUGE_PAGE);
        }
        assert_eq!((small[9], big[3 * HUGE_PAGE - 1], after[0], last[HUGE_PAGE - 1]), (1, 2, 3, 4));
    }

    #[test]
    fn the_huge_page_mode_is_the_bracketed_word() {
        assert_eq!(mode_of("always [madvise] never\n"), HugePages::Given);
        assert_eq!(mode_of("[always] madvise never\n"), HugePages::Given);
        assert_eq!(mode_of("always madvise [never]\n"), HugePages::Off);
        assert_eq!(mode_of("garbled"), HugePages::Unknown);
    }
}
