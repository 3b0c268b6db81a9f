//! Leader election on a `coordination.k8s.io` Lease, so two operator replicas never
//! both act. The holder renews every `RETRY`; if it cannot renew for
//! `RENEW_DEADLINE` it stops, which is before the Lease (`LEASE_DURATION`) expires
//! and another replica may take it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

/// How long a Lease is good for without renewal: the longest a standby waits after
/// a leader dies. 15 s, as kube-controller-manager uses.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// A leader that has not renewed for this long stops acting: 5 s before others may take over.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often the leader renews and a standby retries.
pub const RETRY: Duration = Duration::from_secs(2);

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// Annotations the holder keeps on the Lease: its cluster's name and its
    /// version, which peers read.
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Holding,
    HeldByOther(String),
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        cluster: &str,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            annotations: [
                (outrigger_crds::CLUSTER_NAME_ANNOTATION, cluster),
                (
                    outrigger_crds::VERSION_ANNOTATION,
                    env!("CARGO_PKG_VERSION"),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }
    }

    /// Waits until this process holds the Lease.
    pub async fn acquire(&self) {
        let mut last_holder = None;
        loop {
            match self.try_hold().await {
                Ok(Attempt::Holding) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "acquired the leader Lease");
                    return;
                }
                Ok(Attempt::HeldByOther(holder)) => {
                    if last_holder.as_ref() != Some(&holder) {
                        tracing::info!(%holder, "standing by: another replica leads");
                        last_holder = Some(holder);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "failed to read or take the leader Lease"),
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Renews the Lease until it is lost; returns the reason it was lost.
    pub async fn hold(&self) -> String {
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RETRY).await;
            match self.try_hold().await {
                Ok(Attempt::Holding) => renewed = tokio::time::Instant::now(),
                Ok(Attempt::HeldByOther(holder)) => {
                    return format!("the Lease is held by {holder}");
                }
                Err(e) => tracing::warn!(error = %e, "failed to renew the leader Lease"),
            }
            if renewed.elapsed() > RENEW_DEADLINE {
                return format!("could not renew the Lease for {RENEW_DEADLINE:?}");
            }
        }
    }

    /// Gives the Lease up so a standby takes over at once (on graceful shutdown).
    pub async fn release(&self) {
        let Ok(mut lease) = self.api.get(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "failed to release the leader Lease");
        }
    }

    /// One try to take or renew the Lease. A conflict (someone else wrote first) is
    /// not an error: the next try reads the new holder.
    async fn try_hold(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let duration = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    annotations: Some(self.annotations.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Holding),
                Err(kube::Error::Api(e)) if e.is_conflict() || e.is_already_exists() => Ok(
                    Attempt::HeldByOther("(just created by another replica)".into()),
                ),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let secs = spec.lease_duration_seconds.unwrap_or(duration);
            t.0 + SignedDuration::from_secs(i64::from(secs)) < now
        });
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(Attempt::HeldByOther(holder));
        }
        if holder != self.identity {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(MicroTime(now));
        lease
            .metadata
            .annotations
            .get_or_insert_default()
            .extend(self.annotations.clone());
        // The resourceVersion we read makes this a compare-and-swap.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Holding),
            Err(kube::Error::Api(e)) if e.is_conflict() || e.is_already_exists() => {
                Ok(Attempt::HeldByOther("(changed by another replica)".into()))
            }
            Err(e) => Err(e),
        }
    }
}
