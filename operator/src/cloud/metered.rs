//! A [`CloudProvider`] decorator: a timeout on every attempt, retries of throttled
//! and transient failures with jittered exponential backoff that never sends
//! before a `Retry-After` has passed, and `outrigger_cloud_requests_total` /
//! `outrigger_cloud_request_duration_seconds` for every attempt.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use outrigger_crds::Provider;

use super::{CloudError, CloudProvider, ErrorKind, Instance, Launch, Target};
use crate::telemetry::Metrics;

/// How a [`Metered`] provider times out and retries.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The most one plain request (a list) may take.
    pub call_timeout: Duration,
    /// The most a launch or terminate may take, long-running operation included.
    pub operation_timeout: Duration,
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The first retry waits about this long; each further one twice as long.
    pub base_delay: Duration,
    /// No single wait is longer than this (a `Retry-After` above it ends the retries).
    pub max_delay: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            // A list answers in well under a second; 20 s is a cloud in trouble.
            call_timeout: Duration::from_secs(20),
            // Azure scale-set operations take minutes for GPU VMs; EC2 answers at once.
            operation_timeout: Duration::from_secs(600),
            // Four attempts over about 4 s: long enough to ride out a throttling
            // burst, short enough that the reconcile reports the failure promptly.
            attempts: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Any provider, measured, with timeouts and retries.
pub struct Metered<P> {
    inner: P,
    metrics: Arc<Metrics>,
    policy: Policy,
}

impl<P: CloudProvider> Metered<P> {
    pub fn new(inner: P, metrics: Arc<Metrics>, policy: Policy) -> Metered<P> {
        Metered {
            inner,
            metrics,
            policy,
        }
    }

    async fn call<T, F, Fut>(
        &self,
        operation: &'static str,
        timeout: Duration,
        mut attempt: F,
    ) -> Result<T, CloudError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CloudError>>,
    {
        let provider = self.inner.provider().as_str();
        let mut tried = 0;
        loop {
            tried += 1;
            let started = std::time::Instant::now();
            let result = match tokio::time::timeout(timeout, attempt()).await {
                Ok(result) => result,
                Err(_) => Err(CloudError::new(
                    ErrorKind::Transient,
                    operation,
                    "Timeout",
                    format!("no answer within {timeout:?}"),
                )),
            };
            let label = match &result {
                Ok(_) => "ok",
                Err(e) => e.category(),
            };
            self.metrics
                .cloud_request(provider, operation, label, started.elapsed());
            let error = match result {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            if !error.retryable() || tried >= self.policy.attempts {
                return Err(error);
            }
            let wait = delay(&self.policy, tried, &error.kind);
            let Some(wait) = wait else {
                return Err(error);
            };
            tracing::debug!(%error, ?wait, attempt = tried, "cloud call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

/// How long to wait before attempt `tried + 1`: full jitter over the exponential
/// step (half to all of it), and never less than the server's `Retry-After`.
/// `None` when the server asks for more than `max_delay`: give up for now.
pub fn delay(policy: &Policy, tried: u32, kind: &ErrorKind) -> Option<Duration> {
    let step = policy
        .base_delay
        .saturating_mul(1u32 << (tried - 1).min(16))
        .min(policy.max_delay);
    let jitter = random_fraction();
    let jittered = step.mul_f64(0.5 + jitter / 2.0);
    match kind {
        ErrorKind::Throttled {
            retry_after: Some(after),
        } => (*after <= policy.max_delay).then_some(jittered.max(*after)),
        _ => Some(jittered),
    }
}

/// A number in [0, 1) from the process's random hasher keys.
fn random_fraction() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[async_trait::async_trait]
impl<P: CloudProvider> CloudProvider for Metered<P> {
    fn provider(&self) -> Provider {
        self.inner.provider()
    }

    async fn instances(&self, target: &Target) -> Result<Vec<Instance>, CloudError> {
        self.call("list", self.policy.call_timeout, || {
            self.inner.instances(target)
        })
        .await
    }

    async fn launch(&self, target: &Target, launch: &Launch) -> Result<u32, CloudError> {
        self.call("launch", self.policy.operation_timeout, || {
            self.inner.launch(target, launch)
        })
        .await
    }

    async fn terminate(&self, target: &Target, ids: &[String]) -> Result<(), CloudError> {
        self.call("terminate", self.policy.operation_timeout, || {
            self.inner.terminate(target, ids)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::fake::{FakeCloud, target};

    fn throttled(after: u64) -> CloudError {
        CloudError::new(
            ErrorKind::Throttled {
                retry_after: Some(Duration::from_secs(after)),
            },
            "launch",
            "TooManyRequests",
            "slow down",
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_for_retry_after_and_records_each_attempt() {
        let fake = FakeCloud::new(Provider::Azure);
        fake.fail_next("launch", throttled(7));
        let metrics = Arc::new(Metrics::new());
        let cloud = Metered::new(fake.clone(), metrics.clone(), Policy::default());
        let launch = Launch {
            have: 0,
            add: 2,
            token: "t".into(),
        };
        assert_eq!(cloud.launch(&target(), &launch).await, Ok(2));
        let calls = fake.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[0].launch, calls[1].launch,
            "a retry repeats the same token"
        );
        let gap = calls[1].at - calls[0].at;
        assert!(gap >= Duration::from_secs(7), "retried after {gap:?}");
        let text = metrics.encode().unwrap();
        assert!(text.contains(r#"outrigger_cloud_requests_total{provider="azure",operation="launch",result="Throttled"} 1"#), "{text}");
        assert!(text.contains(r#"outrigger_cloud_requests_total{provider="azure",operation="launch",result="ok"} 1"#), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_errors_are_not_retried() {
        let fake = FakeCloud::new(Provider::Aws);
        fake.fail_next(
            "launch",
            CloudError::new(
                ErrorKind::InsufficientCapacity,
                "launch",
                "InsufficientInstanceCapacity",
                "none left",
            ),
        );
        let cloud = Metered::new(fake.clone(), Arc::new(Metrics::new()), Policy::default());
        let launch = Launch {
            have: 0,
            add: 1,
            token: "t".into(),
        };
        let error = cloud.launch(&target(), &launch).await.unwrap_err();
        assert_eq!(error.kind, ErrorKind::InsufficientCapacity);
        assert_eq!(fake.calls().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_give_up_after_the_attempts() {
        let fake = FakeCloud::new(Provider::Aws);
        for _ in 0..10 {
            fake.fail_next(
                "list",
                CloudError::new(ErrorKind::Transient, "list", "InternalError", "oops"),
            );
        }
        let policy = Policy::default();
        let cloud = Metered::new(fake.clone(), Arc::new(Metrics::new()), policy);
        assert!(cloud.instances(&target()).await.is_err());
        assert_eq!(fake.calls().len(), policy.attempts as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn a_terminate_is_retried_with_the_same_ids() {
        let fake = FakeCloud::new(Provider::Aws);
        fake.fail_next(
            "terminate",
            CloudError::new(ErrorKind::Transient, "terminate", "InternalError", "oops"),
        );
        let cloud = Metered::new(fake.clone(), Arc::new(Metrics::new()), Policy::default());
        let ids = vec!["i-1".to_string(), "i-2".to_string()];
        cloud.terminate(&target(), &ids).await.unwrap();
        let calls = fake.calls();
        assert_eq!(calls.len(), 2);
        assert!(calls.iter().all(|c| c.ids == ids));
    }

    #[test]
    fn delays_grow_are_jittered_and_capped() {
        let policy = Policy::default();
        for tried in 1..10 {
            let d = delay(&policy, tried, &ErrorKind::Transient).unwrap();
            let step = policy
                .base_delay
                .saturating_mul(1 << (tried - 1))
                .min(policy.max_delay);
            assert!(d >= step / 2 && d <= step, "{tried}: {d:?} vs {step:?}");
        }
        let too_long = ErrorKind::Throttled {
            retry_after: Some(Duration::from_secs(3600)),
        };
        assert_eq!(delay(&policy, 1, &too_long), None);
    }
}
