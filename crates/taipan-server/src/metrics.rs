//! `/metrics` in the Prometheus text format, encoded by the `prometheus` crate from the
//! engine's and the HTTP layer's atomic counters at scrape time: a scrape reads atomics only and
//! never waits for the engine's step.
//!
//! Besides our `taipan_*` series it exports the gauges that model-server routers and autoscalers
//! read under vLLM's names (the Gateway API Inference Extension's endpoint picker, vLLM's
//! production-stack router, KEDA or HPA rules written for vLLM), with vLLM's `model_name` label:
//! - `vllm:num_requests_waiting`: requests queued for admission;
//! - `vllm:num_requests_running`: sequences in the running batch;
//! - `vllm:kv_cache_usage_perc`: a fraction in [0, 1] despite the name, as in vLLM: the larger of
//!   the attention-block and the recurrent-state utilisation (a hybrid model is full when
//!   either pool is): blocks referenced by running sequences or saved states, and slots held by
//!   running sequences (a saved state's slot is given up whenever a running one needs it);
//!   also as `vllm:gpu_cache_usage_perc`, the older name production-stack still reads;
//! - `vllm:cache_config_info{block_size, num_gpu_blocks}` = 1, so a prefix-aware picker hashes
//!   prompts in our block size.

use crate::state::AppState;
use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use taipan_engine::metrics::{EngineStats, Histogram as LatencyHistogram};

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn gauge_metric(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(labels);
    m.set_gauge(g);
    m
}

fn counter_metric(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::from_label(labels);
    m.set_counter(c);
    m
}

fn gauge(name: &str, help: &str, labels: &[LabelPair], value: f64) -> MetricFamily {
    family(name, help, MetricType::GAUGE, vec![gauge_metric(labels.to_vec(), value)])
}

fn counter(name: &str, help: &str, value: u64) -> MetricFamily {
    family(name, help, MetricType::COUNTER, vec![counter_metric(vec![], value as f64)])
}

fn histogram(name: &str, help: &str, h: &LatencyHistogram) -> MetricFamily {
    let (cumulative, sum) = h.snapshot();
    let mut out = Histogram::default();
    out.set_sample_sum(sum);
    out.set_sample_count(cumulative.last().map(|b| b.1).unwrap_or(0));
    // The encoder adds the +Inf bucket from the sample count.
    out.set_bucket(
        cumulative
            .iter()
            .filter(|(le, _)| le.is_finite())
            .map(|&(le, count)| {
                let mut b = Bucket::default();
                b.set_upper_bound(le);
                b.set_cumulative_count(count);
                b
            })
            .collect(),
    );
    let mut m = Metric::default();
    m.set_histogram(out);
    family(name, help, MetricType::HISTOGRAM, vec![m])
}

/// Utilisation of a pool, 0 when it is empty.
fn fraction(used: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        (used as f64 / total as f64).clamp(0.0, 1.0)
    }
}

type GaugeRead = fn(&EngineStats) -> &AtomicUsize;
type CounterRead = fn(&EngineStats) -> &AtomicU64;

/// The engine's own gauges: name, help, where the value lives.
const ENGINE_GAUGES: [(&str, &str, GaugeRead); 8] = [
    ("taipan_queue_length", "Requests waiting for admission.", |s| &s.queued),
    ("taipan_running_sequences", "Sequences in the running batch.", |s| &s.running),
    ("taipan_kv_cache_blocks_total", "KV cache blocks in the pool.", |s| &s.kv_blocks_total),
    ("taipan_kv_cache_blocks_used", "KV cache blocks referenced by sequences.", |s| &s.kv_blocks_used),
    ("taipan_kv_cache_blocks_cached", "KV cache blocks holding a reusable prefix.", |s| &s.kv_blocks_cached),
    ("taipan_state_slots_total", "Recurrent-state slots in the pool (0 for models without recurrent layers).", |s| {
        &s.state_slots_total
    }),
    ("taipan_state_slots_running", "State slots held by running sequences.", |s| &s.state_slots_live),
    (
        "taipan_saved_states",
        "Saved recurrent states kept for prefix reuse (each holds a slot and its prefix's blocks).",
        |s| &s.saved_states,
    ),
];

/// The engine's counters.
const ENGINE_COUNTERS: [(&str, &str, CounterRead); 10] = [
    ("taipan_requests_finished_total", "Requests generated to the end.", |s| &s.requests_finished),
    ("taipan_requests_cancelled_total", "Requests dropped because the client left.", |s| &s.requests_cancelled),
    ("taipan_requests_failed_total", "Requests that failed in the engine.", |s| &s.requests_failed),
    ("taipan_prompt_tokens_total", "Prompt tokens of admitted requests.", |s| &s.prompt_tokens),
    ("taipan_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.", |s| &s.prefix_hit_tokens),
    ("taipan_generated_tokens_total", "Tokens generated.", |s| &s.generated_tokens),
    ("taipan_preemptions_total", "Sequences preempted for lack of KV blocks.", |s| &s.preemptions),
    ("taipan_engine_steps_total", "Forward steps run.", |s| &s.steps),
    ("taipan_constrained_tokens_total", "Tokens sampled under a grammar (JSON mode, tool calls).", |s| {
        &s.constrained_tokens
    }),
    ("taipan_constraint_microseconds_total", "Time spent computing grammar masks.", |s| &s.constraint_us),
];

/// Every metric family the server exports now.
pub fn gather(state: &AppState) -> Vec<MetricFamily> {
    let h = &state.http;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let size = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    let responses = ["2xx", "4xx", "429", "5xx"]
        .iter()
        .zip([&h.ok, &h.client_errors, &h.rejected_busy, &h.server_errors])
        .map(|(class, n)| counter_metric(vec![label("class", class)], load(n) as f64))
        .collect();
    let mut out = vec![family(
        "taipan_http_responses_total",
        "HTTP responses of the API routes by class.",
        MetricType::COUNTER,
        responses,
    )];
    let Some(e) = state.engine.get() else {
        return out;
    };
    let s = &e.stats;
    let model = state.names.get().and_then(|n| n.first()).cloned().unwrap_or_default();
    let model = [label("model_name", &model)];
    let kv_usage = fraction(size(&s.kv_blocks_used), size(&s.kv_blocks_total))
        .max(fraction(size(&s.state_slots_live), size(&s.state_slots_total)));
    out.extend([
        gauge("vllm:num_requests_waiting", "Requests waiting for admission.", &model, size(&s.queued) as f64),
        gauge("vllm:num_requests_running", "Sequences in the running batch.", &model, size(&s.running) as f64),
        gauge(
            "vllm:kv_cache_usage_perc",
            "KV cache usage as a fraction in [0, 1]: the larger of attention blocks and recurrent-state slots in use.",
            &model,
            kv_usage,
        ),
        gauge("vllm:gpu_cache_usage_perc", "Same as vllm:kv_cache_usage_perc (older name).", &model, kv_usage),
        gauge(
            "vllm:cache_config_info",
            "KV cache configuration, in labels.",
            &[
                label("block_size", &e.memory.block_size.to_string()),
                label("num_gpu_blocks", &e.memory.blocks.to_string()),
            ],
            1.0,
        ),
    ]);
    for (name, help, read) in ENGINE_GAUGES {
        out.push(gauge(name, help, &[], size(read(s)) as f64));
    }
    for (name, help, read) in ENGINE_COUNTERS {
        out.push(counter(name, help, load(read(s))));
    }
    out.extend([
        gauge(
            "taipan_prefix_cache_hit_rate",
            "Share of prompt tokens served from the prefix cache.",
            &[],
            fraction(load(&s.prefix_hit_tokens) as usize, load(&s.prompt_tokens) as usize),
        ),
        histogram(
            "taipan_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            &s.time_to_first_token,
        ),
        histogram(
            "taipan_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence.",
            &s.inter_token_latency,
        ),
    ]);
    out
}

/// The text exposition of [`gather`], with its content type.
pub fn render(state: &AppState) -> Result<(String, String), prometheus::Error> {
    let encoder = TextEncoder::new();
    let mut buf = Vec::with_capacity(8 << 10);
    encoder.encode(&gather(state), &mut buf)?;
    Ok((String::from_utf8_lossy(&buf).into_owned(), encoder.format_type().to_string()))
}
