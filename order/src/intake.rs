//! Protection of intake: how many `CreateOrder` calls may run at once, how
//! many per second one client may send, how long a call may wait for a
//! writer ([`crate::group_commit`]) before it is shed, and how many orders
//! may wait to be decided ([`crate::backlog`]).
//!
//! The guard sits in [`crate::api::OrderApi::create`], not in a tower stack
//! per server: the gRPC service and the REST shim share one code path, so
//! one guard (one in-flight count, one bucket per client) limits both, and
//! only `CreateOrder` is limited; `GetOrder` and `WatchOrder` stay free.
//! A rejection costs no database round trip and never waits: the caller gets
//! `RESOURCE_EXHAUSTED` (HTTP 429) with `retry-after` at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use common::config::{self, ConfigError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{backlog::Backlog, error::OrderError};

/// The gRPC metadata key and HTTP header naming the client when it has no
/// mTLS identity; without either the client is its peer IP address.
pub const CLIENT_ID_HEADER: &str = "x-client-id";

/// Longest client id used as given; longer ones are cut (a key, not data).
const MAX_CLIENT_ID_LEN: usize = 128;

/// Past this many tracked clients, buckets that have refilled are dropped
/// (a full bucket is the same as no bucket).
const EVICT_ABOVE: usize = 1024;

/// The limits, all off or generous by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `INTAKE_MAX_IN_FLIGHT` (default 0 = off): `CreateOrder` calls served
    /// at once; the next one is rejected, not queued.
    pub max_in_flight: usize,
    /// `INTAKE_RATE_LIMIT_PER_CLIENT` (default 0 = off): `CreateOrder` calls
    /// per second per client, with a burst of one second's worth.
    pub rate_per_client: u32,
    /// `INTAKE_QUEUE_TIMEOUT_MS` (default 5000, the pool's own acquire
    /// timeout): how long a call waits for a group-commit writer to take it
    /// (see [`crate::group_commit`]) before it is shed with `UNAVAILABLE`;
    /// also how long a writer retries an unreachable database for it.
    pub queue_timeout: Duration,
    /// `INTAKE_MAX_PENDING` (default 10000, 0 = off): orders waiting to be
    /// decided (PENDING in the database) past which new ones are shed with
    /// `UNAVAILABLE` (see [`crate::backlog`]).
    pub max_pending: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 0,
            rate_per_client: 0,
            queue_timeout: Duration::from_secs(5),
            max_pending: 10_000,
        }
    }
}

impl Limits {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            max_in_flight: config::var("INTAKE_MAX_IN_FLIGHT", 0)?,
            rate_per_client: config::var("INTAKE_RATE_LIMIT_PER_CLIENT", 0)?,
            queue_timeout: config::millis("INTAKE_QUEUE_TIMEOUT_MS", 5000)?,
            max_pending: config::var("INTAKE_MAX_PENDING", 10_000)?,
        })
    }
}

/// Who is calling: the mTLS identity of its certificate (see
/// [`common::tls::fingerprint`]) when it presented one, else the
/// `x-client-id` it sent, else its peer IP. The certificate comes first
/// because the CA vouches for it, while a header is whatever the caller
/// says: with mTLS on, a client cannot leave its budget by sending another
/// id.
#[must_use]
pub fn client_key(
    certificate: Option<&str>,
    client_id: Option<&str>,
    peer: Option<std::net::IpAddr>,
) -> String {
    if let Some(identity) = certificate {
        return format!("cert:{identity}");
    }
    match client_id.map(str::trim).filter(|id| !id.is_empty()) {
        Some(id) => {
            let mut end = id.len().min(MAX_CLIENT_ID_LEN);
            while !id.is_char_boundary(end) {
                end -= 1;
            }
            format!("id:{}", &id[..end])
        }
        None => peer.map_or_else(|| "peer:unknown".to_owned(), |ip| format!("peer:{ip}")),
    }
}

/// Admission to `CreateOrder`; cheap to clone, shared by both front ends.
#[derive(Clone, Debug)]
pub struct Guard {
    in_flight: Option<Arc<Semaphore>>,
    rate: Option<Arc<RateLimiter>>,
    queue_timeout: Duration,
    backlog: Backlog,
}

/// Held while an admitted call runs; dropping it frees its in-flight slot.
#[derive(Debug)]
pub struct Admitted {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Guard {
    #[must_use]
    pub fn new(limits: &Limits) -> Self {
        Self {
            in_flight: (limits.max_in_flight > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_in_flight))),
            rate: (limits.rate_per_client > 0)
                .then(|| Arc::new(RateLimiter::new(limits.rate_per_client))),
            queue_timeout: limits.queue_timeout,
            backlog: Backlog::new(limits.max_pending),
        }
    }

    /// Admits a call from `client`, or says at once why not: its rate is
    /// spent, or the service already serves its maximum of calls.
    pub fn admit(&self, client: &str) -> Result<Admitted, OrderError> {
        if let Some(rate) = &self.rate {
            rate.check(client, Instant::now())
                .map_err(|retry_after| OrderError::RateLimited { retry_after })?;
        }
        let permit = match &self.in_flight {
            Some(semaphore) => Some(semaphore.clone().try_acquire_owned().map_err(|_| {
                OrderError::TooManyInFlight {
                    retry_after: Duration::from_secs(1),
                }
            })?),
            None => None,
        };
        Ok(Admitted { _permit: permit })
    }

    /// Admits one more order to the backlog of undecided ones, or sheds it
    /// (see [`crate::backlog`]). Called once the request is known valid, so
    /// that a bad request gets its own error whatever the backlog.
    pub fn admit_pending(&self) -> Result<crate::backlog::Admission, OrderError> {
        self.backlog.admit()
    }

    /// The backlog bound, for the task that keeps its count.
    #[must_use]
    pub fn backlog(&self) -> Backlog {
        self.backlog.clone()
    }

    /// How long to wait for a writer before shedding the call.
    #[must_use]
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }
}

impl Default for Guard {
    fn default() -> Self {
        Self::new(&Limits::default())
    }
}

/// A token bucket per client: `rate` tokens a second, at most `rate` kept.
#[derive(Debug)]
struct RateLimiter {
    rate: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    by_client: HashMap<String, Bucket>,
    /// When refilled buckets were last dropped (at most once a second).
    swept: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            buckets: Mutex::new(Buckets {
                by_client: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    /// Takes a token of `client`'s, or returns how long until one is there.
    fn check(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut guard = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let full_after = Duration::from_secs(1);
        if guard.by_client.len() > EVICT_ABOVE
            && now.saturating_duration_since(guard.swept) >= full_after
        {
            guard
                .by_client
                .retain(|_, b| now.saturating_duration_since(b.at) < full_after);
            guard.swept = now;
        }
        let buckets = &mut guard.by_client;
        if !buckets.contains_key(client) {
            let full = Bucket {
                tokens: self.rate,
                at: now,
            };
            buckets.insert(client.to_owned(), full);
        }
        let bucket = buckets.get_mut(client).expect("inserted above");
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

/// Whole seconds for `Retry-After`: rounded up, at least 1.
#[must_use]
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_of_one_second_then_refills() {
        let limiter = RateLimiter::new(5);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.check("a", t0).is_ok());
        }
        let wait = limiter
            .check("a", t0)
            .expect_err("sixth call in the same instant");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200));
        // Another client has its own bucket.
        assert!(limiter.check("b", t0).is_ok());
        // 200 ms later one token is back, not two.
        let t1 = t0 + Duration::from_millis(200);
        assert!(limiter.check("a", t1).is_ok());
        assert!(limiter.check("a", t1).is_err());
    }

    #[test]
    fn refilled_buckets_are_evicted() {
        let limiter = RateLimiter::new(1);
        let t0 = Instant::now();
        for i in 0..=EVICT_ABOVE {
            assert!(limiter.check(&format!("c{i}"), t0).is_ok());
        }
        let later = t0 + Duration::from_secs(2);
        assert!(limiter.check("new", later).is_ok());
        assert_eq!(limiter.buckets.lock().unwrap().by_client.len(), 1);
    }

    #[test]
    fn in_flight_limit_rejects_without_queueing_and_frees_on_drop() {
        let guard = Guard::new(&Limits {
            max_in_flight: 2,
            ..Limits::default()
        });
        let a = guard.admit("x").expect("first");
        let _b = guard.admit("y").expect("second");
        assert!(matches!(
            guard.admit("z"),
            Err(OrderError::TooManyInFlight { .. })
        ));
        drop(a);
        assert!(guard.admit("z").is_ok());
    }

    #[test]
    fn off_by_default() {
        let guard = Guard::default();
        let admitted: Vec<_> = (0..10_000).map(|_| guard.admit("same")).collect();
        assert!(admitted.iter().all(Result::is_ok));
    }

    #[test]
    fn client_key_prefers_the_certificate_then_the_id_then_the_peer() {
        let ip = Some("10.0.0.7".parse().unwrap());
        assert_eq!(
            client_key(Some("sha256:ab"), Some("acme"), ip),
            "cert:sha256:ab"
        );
        assert_eq!(client_key(None, Some(" acme "), ip), "id:acme");
        assert_eq!(client_key(None, Some(""), ip), "peer:10.0.0.7");
        assert_eq!(client_key(None, None, None), "peer:unknown");
        assert_eq!(
            client_key(None, Some(&"é".repeat(100)), None).len(),
            3 + 128
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
