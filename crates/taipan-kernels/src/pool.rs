//! The compute thread pool: one worker per extra core, the caller working too.
//!
//! A decode step runs a few hundred small parallel regions, so dispatch must cost about a
//! microsecond: workers spin briefly on an atomic epoch before parking on a condvar. Tasks are
//! claimed from a shared counter, so when another process takes a core, the threads that run pick
//! up the remaining tasks; a worker that never woke up for a region is simply not waited for
//! (it must join the region before it may take a task, and the caller closes it when done).
//!
//! A task that panics, on the caller or on a worker, stops the region from handing out more
//! tasks; the caller still waits for every joined worker (the closure it lent them lives until
//! then) and re-raises the first panic on its own thread. The pool stays usable afterwards.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const CLOSED: u64 = 1 << 31;
const ACTIVE_MASK: u64 = CLOSED - 1;
/// How long an idle worker spins before it parks.
const SPIN_FOR: Duration = Duration::from_micros(300);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// `epoch << 32 | closed << 31 | active workers`.
    state: AtomicU64,
    next_task: AtomicUsize,
    n_tasks: AtomicUsize,
    /// Written by the caller before an epoch opens, read by workers that joined it.
    job: UnsafeCell<Option<*const Job>>,
    sleepers: AtomicUsize,
    /// The first panic of the current region, re-raised by the caller once the region drains.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    lock: Mutex<bool>,
    wake: Condvar,
}

// SAFETY: `job` is written only between regions (no worker has joined one), and read only by
// workers that joined the current region, which the caller waits for before returning.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of compute threads.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    epoch: std::cell::Cell<u64>,
    busy: Mutex<()>,
}

// SAFETY: `epoch` is only touched while holding `busy`.
unsafe impl Sync for ThreadPool {}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            next_task: AtomicUsize::new(0),
            n_tasks: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            sleepers: AtomicUsize::new(0),
            panic: Mutex::new(None),
            lock: Mutex::new(false),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("taipan-compute-{i}"))
                    .spawn(move || worker_loop(&s))
                    .expect("spawning a compute thread")
            })
            .collect();
        ThreadPool { shared, workers, epoch: std::cell::Cell::new(0), busy: Mutex::new(()) }
    }

    /// Threads in the pool, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i` in `0..n_tasks`, spread over the pool; returns when all are done.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: no worker is inside a region (the previous one was closed and drained), so
        // nobody reads `job` now. The lifetime is erased; we wait for every joined worker below.
        unsafe {
            let erased: *const Job = std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f);
            *s.job.get() = Some(erased);
        }
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.next_task.store(0, Ordering::Relaxed);
        let epoch = self.epoch.get() + 1;
        self.epoch.set(epoch);
        s.state.store(epoch << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        run_tasks(s, f);
        s.state.fetch_or(CLOSED, Ordering::SeqCst);
        let mut spins = 0u32;
        while s.state.load(Ordering::Acquire) & ACTIVE_MASK != 0 {
            spins += 1;
            if spins < 10_000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // Every joined worker has left: nobody can call `f` any more.
        let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = panic {
            resume_unwind(payload);
        }
    }

    /// Calls `f(i, row)` for every `row_len`-long row `i` of `data`, rows spread over the pool
    /// (each row visited by one task).
    pub fn for_rows_mut(&self, data: &mut [f32], row_len: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        assert!(row_len > 0 && data.len().is_multiple_of(row_len), "rows of {row_len} in {}", data.len());
        let base = RowsPtr(data.as_mut_ptr());
        self.for_chunks(data.len() / row_len, 1, &|range| {
            for i in range {
                // SAFETY: row `i` lies inside `data` (its length is a multiple of `row_len`),
                // and each row index is handed to exactly one task, so the slices are disjoint.
                let row = unsafe { std::slice::from_raw_parts_mut(base.at(i * row_len), row_len) };
                f(i, row);
            }
        });
    }

    /// Splits `0..n` into chunks of at least `min_chunk` items, about four per thread, and runs
    /// `f(range)` for each.
    pub fn for_chunks(&self, n: usize, min_chunk: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let chunk = n.div_ceil(self.threads() * 4).max(min_chunk).max(1);
        let tasks = n.div_ceil(chunk);
        self.run(tasks, &|i| f(i * chunk..((i + 1) * chunk).min(n)));
    }
}

/// The start of a buffer whose disjoint rows tasks of one region write.
struct RowsPtr(*mut f32);
// SAFETY: tasks touch disjoint rows, and the region ends before the buffer's borrow does.
unsafe impl Sync for RowsPtr {}

impl RowsPtr {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Claims and runs tasks until none are left. A panic is caught, recorded for the caller, and
/// ends the region's hand-out of tasks; it never escapes (a worker must always leave the region).
fn run_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n = s.n_tasks.load(Ordering::Relaxed);
    let outcome = catch_unwind(AssertUnwindSafe(|| loop {
        let i = s.next_task.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }));
    if let Err(payload) = outcome {
        s.next_task.store(usize::MAX / 2, Ordering::Relaxed);
        let mut first = s.panic.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(payload);
    }
}

fn worker_loop(s: &Shared) {
    let mut seen_epoch = 0u64;
    loop {
        // Wait for a new region: spin, then park.
        let started = Instant::now();
        let mut state = s.state.load(Ordering::Acquire);
        while state >> 32 == seen_epoch {
            if started.elapsed() < SPIN_FOR {
                std::hint::spin_loop();
            } else {
                let mut stop = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.state.load(Ordering::SeqCst) >> 32 == seen_epoch && !*stop {
                    stop = s.wake.wait(stop).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                if *stop {
                    return;
                }
            }
            state = s.state.load(Ordering::Acquire);
        }
        seen_epoch = state >> 32;
        // Join the region unless the caller already closed it.
        loop {
            if state >> 32 != seen_epoch || state & CLOSED != 0 {
                break;
            }
            match s.state.compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // SAFETY: joined an open region, so `job` is set and outlives our use of it.
                    let job = unsafe { (*s.job.get()).map(|p| &*p) };
                    if let Some(job) = job {
                        run_tasks(s, job);
                    }
                    s.state.fetch_sub(1, Ordering::AcqRel);
                    break;
                }
                Err(now) => state = now,
            }
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let mut stop = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            *stop = true;
            self.shared.wake.notify_all();
        }
        // A spinning worker parks within SPIN_FOR and then sees `stop`.
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        let pool = ThreadPool::new(3);
        for n in [1usize, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn for_rows_mut_hands_each_row_to_one_call_with_its_index() {
        let pool = ThreadPool::new(3);
        for rows in [1usize, 2, 5, 97] {
            let mut data = vec![0f32; rows * 6];
            pool.for_rows_mut(&mut data, 6, &|i, row| {
                assert_eq!(row.len(), 6);
                row.iter_mut().enumerate().for_each(|(j, v)| *v += (i * 6 + j) as f32);
            });
            assert!(data.iter().enumerate().all(|(k, &v)| v == k as f32), "{rows} rows");
        }
    }

    #[test]
    fn many_regions_in_a_row_and_after_parking() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            pool.for_chunks(64, 1, &|r| {
                total.fetch_add(r.len(), Ordering::Relaxed);
            });
            if round == 1000 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(total.load(Ordering::Relaxed), 64 * 2000);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_after_every_worker_left_and_the_pool_still_works() {
        let pool = ThreadPool::new(3);
        for bad in [0usize, 5, 63] {
            let started = AtomicUsize::new(0);
            let finished = AtomicUsize::new(0);
            let caught = catch_unwind(AssertUnwindSafe(|| {
                pool.run(64, &|i| {
                    started.fetch_add(1, Ordering::SeqCst);
                    if i == bad {
                        panic!("task {i} fails");
                    }
                    std::thread::sleep(Duration::from_micros(200));
                    finished.fetch_add(1, Ordering::SeqCst);
                });
            }));
            let payload = caught.expect_err("the panic reaches the caller");
            let msg = payload.downcast_ref::<String>().cloned().unwrap_or_default();
            assert_eq!(msg, format!("task {bad} fails"));
            // Every task that started has finished (or is the one that panicked): no worker is
            // still inside the closure the caller lent.
            assert_eq!(finished.load(Ordering::SeqCst) + 1, started.load(Ordering::SeqCst));
        }
        let total = AtomicUsize::new(0);
        pool.run(100, &|_| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn drop_joins_parked_workers() {
        let pool = ThreadPool::new(4);
        pool.run(8, &|_| {});
        std::thread::sleep(Duration::from_millis(2));
        drop(pool);
    }
}
