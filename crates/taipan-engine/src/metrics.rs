//! Counters and histograms the engine updates and the server exports.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24];

/// A fixed-bucket histogram safe to update from one thread and read from others.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let i = LATENCY_BUCKETS.iter().position(|&b| seconds <= b).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket bound (the last is +Inf), and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64) {
        let mut acc = 0;
        let mut out = Vec::new();
        for (i, c) in self.counts.iter().enumerate() {
            acc += c.load(Ordering::Relaxed);
            out.push((LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), acc));
        }
        (out, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Everything the engine reports.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Set when the engine thread ended (it died): nothing more is served.
    pub stopped: std::sync::atomic::AtomicBool,
    /// Set when the server's shutdown grace ran out: every request in flight, and any that
    /// arrives later, is cancelled with [`crate::Event::Cancelled`].
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// Panics caught inside a step (each failed the requests it touched).
    pub internal_errors: AtomicU64,
    /// Requests submitted and not yet admitted.
    pub queued: AtomicUsize,
    /// Sequences admitted and running.
    pub running: AtomicUsize,
    pub requests_finished: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub prefix_hit_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    pub kv_blocks_total: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_cached: AtomicUsize,
    /// Recurrent-state slots in the pool, held by running sequences, and saved states.
    pub state_slots_total: AtomicUsize,
    pub state_slots_live: AtomicUsize,
    pub saved_states: AtomicUsize,
    /// Tokens sampled under a grammar, and the time spent on their masks (microseconds).
    pub constrained_tokens: AtomicU64,
    pub constraint_us: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
}
