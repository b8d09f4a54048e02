//! What `gantry serve` tells an operator about its traffic: Prometheus
//! metrics (`/metrics`, the text format 0.0.4, with the `prometheus-client`
//! crate) and a health check (`/healthz`: the storage answers), on a listen
//! address of their own (`--metrics-listen`) so that neither is exposed
//! where the registry is.
//!
//! Route labels are the API's route kinds (`manifest`, `blob`, `upload`…),
//! never a repository name or a path: a client cannot grow the label sets.

use crate::api::Backend;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Request body bytes read by the push handlers (chunked bodies have no
/// length to read off the head), counted where they are read.
static BYTES_IN: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);

pub(crate) fn count_in(n: usize) {
    BYTES_IN.inc_by(n as u64);
}

/// A mirror's cache at work.
#[derive(Default, Debug)]
pub struct MirrorStats {
    /// Blobs and manifests answered from the cache.
    pub hits: Counter,
    /// Blobs and manifests the cache did not have (or had stale).
    pub misses: Counter,
    /// Requests sent to an upstream.
    pub upstream_fetches: Counter,
}

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 100 µs to about 52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    bytes_out: Counter,
    uploads_open: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The metrics of a server answering from `backend`.
    pub fn new(backend: &Backend) -> Metrics {
        let mut registry = Registry::with_prefix("gantry_serve");
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let (bytes_out, uploads_open) = (Counter::default(), Gauge::default());
        registry.register(
            "requests",
            "Requests answered, by route, method and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a request (its head; a body streams after), by route",
            latency.clone(),
        );
        registry.register("response_bytes", "Response body bytes sent", bytes_out.clone());
        registry.register("request_bytes", "Request body bytes received", BYTES_IN.clone());
        registry.register("uploads_open", "Upload sessions open", uploads_open.clone());
        if let Backend::Mirror(m) = backend {
            let s = m.stats();
            registry.register("mirror_cache_hits", "Answered from the mirror's cache", s.hits.clone());
            registry.register(
                "mirror_cache_misses",
                "Not in the mirror's cache (or stale)",
                s.misses.clone(),
            );
            registry.register(
                "mirror_upstream_fetches",
                "Requests the mirror sent upstream",
                s.upstream_fetches.clone(),
            );
        }
        Metrics {
            registry,
            requests,
            latency,
            bytes_out,
            uploads_open,
        }
    }

    /// One request answered.
    pub fn observe(&self, route: &'static str, method: &hyper::Method, status: u16, took: Duration, sent: u64) {
        let method = match *method {
            hyper::Method::GET => "GET",
            hyper::Method::HEAD => "HEAD",
            hyper::Method::PUT => "PUT",
            hyper::Method::POST => "POST",
            hyper::Method::PATCH => "PATCH",
            hyper::Method::DELETE => "DELETE",
            _ => "other",
        };
        self.requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("method", method.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("route", route.to_string())])
            .observe(took.as_secs_f64());
        self.bytes_out.inc_by(sent);
    }

    /// The text a scrape gets, with the gauges read now.
    pub fn render(&self, backend: &Backend) -> String {
        if let Backend::Registry { storage, .. } = backend {
            self.uploads_open.set(
                crate::with_registry!(storage, s => crate::registry_storage::RegistryStorage::uploads_open(&**s))
                    as i64,
            );
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
