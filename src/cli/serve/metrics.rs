//! `GET /metrics`: counters and histograms of the server in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pipit_engine::serve::{Gauges, Limits};

/// Upper bounds of the latency histograms' buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (c, &b) in self.counts.iter_mut().zip(&BUCKETS) {
            if seconds <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// What the server has done since it started.
#[derive(Default)]
pub struct Metrics {
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    first_token: Mutex<Histogram>,
    per_token: Mutex<Histogram>,
}

impl Metrics {
    /// A request's prompts came in.
    pub fn prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A request is answered, with `generated` tokens.
    pub fn finished(&self, generated: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
    }

    /// The first token of a request came this long after it arrived.
    pub fn first_token(&self, d: Duration) {
        if let Ok(mut h) = self.first_token.lock() {
            h.observe(d.as_secs_f64());
        }
    }

    /// A later token came this long after the one before.
    pub fn next_token(&self, d: Duration) {
        if let Ok(mut h) = self.per_token.lock() {
            h.observe(d.as_secs_f64());
        }
    }

    /// The text format.
    pub fn render(&self, g: &Gauges, limits: &Limits) -> String {
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as u64;
        line(
            "pipit_requests_total",
            "counter",
            "Completion requests answered.",
            self.requests.load(Ordering::Relaxed),
        );
        line(
            "pipit_prompt_tokens_total",
            "counter",
            "Prompt tokens of the requests received.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        line(
            "pipit_generation_tokens_total",
            "counter",
            "Tokens generated for the requests answered.",
            self.generated_tokens.load(Ordering::Relaxed),
        );
        line(
            "pipit_running_sequences",
            "gauge",
            "Sequences in the running batches.",
            load(&g.running),
        );
        line(
            "pipit_waiting_sequences",
            "gauge",
            "Sequences waiting for room.",
            load(&g.waiting),
        );
        line(
            "pipit_batch_tokens",
            "gauge",
            "Tokens in the last pass.",
            load(&g.batch_tokens),
        );
        line(
            "pipit_batch_sequences",
            "gauge",
            "Sequences in the last pass.",
            load(&g.batch_sequences),
        );
        line(
            "pipit_passes_total",
            "counter",
            "Passes through the pipeline.",
            load(&g.passes),
        );
        line(
            "pipit_kv_cache_blocks_used",
            "gauge",
            "Blocks of the key/value cache reserved.",
            load(&g.blocks_used),
        );
        line(
            "pipit_kv_cache_blocks",
            "gauge",
            "Blocks in the key/value cache budget.",
            limits.blocks as u64,
        );
        if let Ok(h) = self.first_token.lock() {
            h.render(
                &mut out,
                "pipit_time_to_first_token_seconds",
                "Time from a request's arrival to its first token.",
            );
        }
        if let Ok(h) = self.per_token.lock() {
            h.render(
                &mut out,
                "pipit_time_per_output_token_seconds",
                "Time between a request's consecutive tokens.",
            );
        }
        out
    }
}
