//! Acts on interruption notices: the AWS interruption queue (EventBridge events
//! in SQS, long-polled) and, through the pool controller, the AKS scheduled events
//! node-problem-detector shows as a Node condition. A doomed node is marked
//! (`outrigger.dev/interruption`) and cordoned at once, so every plan counts it
//! lost; its pods get the lowest deletion cost, so the ReplicaSet removes them
//! first once their replacements are Ready; reclaimed spot capacity puts its
//! offering into backoff, so the replacement goes to another offering.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;
use kube::Resource;
use kube::runtime::events::EventType;
use outrigger_crds::{CapacityBackoff, GpuNodePool};
use tokio::sync::watch;

use super::{Context, Error};
use crate::labels;
use crate::lifecycle::{self, Interruption, Notice};
use crate::observe::inventory::{Inventory, NodeFacts, offering_of};

/// The longest wait SQS allows for one receive: messages arrive as soon as they
/// are sent, and an idle queue costs one request per 20 s.
const LONG_POLL_SECONDS: i32 = 20;
/// How long a received message stays hidden from other receivers: acting takes
/// well under a second, and a message an operator received just before it died
/// (a leader change) is shown again this soon, not after the queue's default 30 s.
const VISIBILITY_SECONDS: i32 = 10;
/// After a failed receive, try again this much later.
const RETRY: Duration = Duration::from_secs(5);

/// The interruption queue.
pub struct Queue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl Queue {
    /// A queue client from the same AWS configuration (credentials, endpoint
    /// override) as EC2's.
    pub fn new(config: &aws_config::SdkConfig, url: String) -> Queue {
        Queue {
            client: aws_sdk_sqs::Client::new(config),
            url,
        }
    }

    /// Receives, acts and deletes until `stop`. A message is deleted once acted on,
    /// and also when it cannot be parsed or names no node of ours: a message that
    /// cannot be acted on is never received again.
    pub async fn run(self, ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
        tracing::info!(queue = %self.url, "reading interruption notices");
        loop {
            let receive = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .wait_time_seconds(LONG_POLL_SECONDS)
                .visibility_timeout(VISIBILITY_SECONDS)
                .send();
            let received = tokio::select! {
                r = receive => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let messages = match received {
                Ok(out) => out.messages.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(queue = %self.url, error = %DisplayErrorContext(&e), "failed to receive from the interruption queue; trying again in 5 s");
                    ctx.metrics.reconcile_failed(CONTROLLER, "queue");
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => continue,
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            };
            for m in messages {
                let done = handle(&ctx, m.body().unwrap_or_default()).await;
                if let Err(e) = done {
                    // Acting failed (the API server): keep it, SQS shows it again
                    // after its visibility timeout.
                    tracing::warn!(error = %e, "failed to act on an interruption notice; it stays in the queue");
                    continue;
                }
                if let Some(receipt) = m.receipt_handle() {
                    let deleted = self
                        .client
                        .delete_message()
                        .queue_url(&self.url)
                        .receipt_handle(receipt)
                        .send()
                        .await;
                    if let Err(e) = deleted {
                        tracing::warn!(error = %DisplayErrorContext(&e), "failed to delete an interruption message");
                    }
                }
            }
        }
    }
}

pub const CONTROLLER: &str = "interruption";

/// Acts on one queue message's body.
async fn handle(ctx: &Context, body: &str) -> Result<(), Error> {
    let now = ctx.now();
    let notice = match lifecycle::parse(body, now) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, body = %body.chars().take(200).collect::<String>(), "interruption queue: a message Outrigger cannot act on; deleted");
            let kind = match e {
                lifecycle::ParseError::Envelope(_) => "unparsable",
                lifecycle::ParseError::UnknownType(_) => "unknown-type",
                lifecycle::ParseError::Missing { .. } => "incomplete",
            };
            ctx.metrics.interruption("aws", kind, "deleted");
            return Ok(());
        }
    };
    let inventory = ctx.stores.inventory(now);
    match notice {
        Notice::Interrupt {
            instances,
            interruption,
        } => {
            for id in &instances {
                match ours(&inventory, id) {
                    Some((pool, node)) => {
                        if !mark(ctx, pool, node, interruption).await? {
                            ctx.metrics
                                .interruption("aws", interruption.kind.as_str(), "already");
                        }
                    }
                    None => {
                        tracing::info!(instance = %id, kind = interruption.kind.as_str(), nodes = inventory.nodes.len(), "interruption notice for an instance that is no node of a pool: deleted");
                        ctx.metrics
                            .interruption("aws", interruption.kind.as_str(), "not-ours");
                    }
                }
            }
        }
        Notice::Rebalance { instance } => match ours(&inventory, &instance) {
            Some((pool, node)) => {
                ctx.metrics.interruption("aws", "rebalance", "event");
                ctx.publish(
                    &pool.object_ref(&()),
                    "Interruption",
                    EventType::Normal,
                    "RebalanceRecommended",
                    format!(
                        "EC2 recommends rebalancing node {} (instance {instance}): it is at higher risk of a spot interruption; Outrigger replaces it when the notice comes",
                        node.name
                    ),
                )
                .await;
            }
            None => ctx.metrics.interruption("aws", "rebalance", "not-ours"),
        },
        Notice::Ignored { detail_type } => {
            tracing::debug!(%detail_type, "interruption queue: nothing to do");
            ctx.metrics.interruption("aws", "other", "ignored");
        }
    }
    Ok(())
}

/// The pool and node of an EC2 instance, when it is a node of one of the pools.
fn ours<'a>(inventory: &'a Inventory, instance: &str) -> Option<(&'a GpuNodePool, &'a NodeFacts)> {
    inventory.nodes.iter().find_map(|n| {
        let id = lifecycle::aws_instance(n.provider_id.as_deref()?)?;
        (id == instance).then_some(())?;
        Some((inventory.pools.get(n.pool?)?.as_ref(), n))
    })
}

/// Marks a doomed node: the typed mark and the cordon, the lowest deletion cost on
/// its pods, reclaimed capacity as an offering backoff, an Event and the metric.
/// A node marked already is left as it is: false.
pub async fn mark(
    ctx: &Context,
    pool: &GpuNodePool,
    node: &NodeFacts,
    interruption: Interruption,
) -> Result<bool, Error> {
    let provider = pool.spec.provider;
    let marked = ctx
        .stores
        .nodes
        .get(&kube::runtime::reflector::ObjectRef::new(&node.name))
        .and_then(|n| {
            n.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(labels::INTERRUPTION).cloned())
        });
    if marked.is_some() {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": {"annotations": {labels::INTERRUPTION: interruption.to_annotation()}},
        "spec": {"unschedulable": true},
    });
    ctx.applier.merge::<Node>(&node.name, &patch).await?;
    let cost =
        serde_json::json!({"metadata": {"annotations": {labels::POD_DELETION_COST: "-1000"}}});
    for pod in ctx.stores.pods.state() {
        let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node.name);
        let theirs = pod
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(labels::DEPLOYMENT));
        if let (true, true, Some(ns), Some(name)) = (
            on_node,
            theirs,
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
        ) {
            ctx.applier.merge_pod(ns, name, &cost).await?;
        }
    }
    let now = ctx.now();
    if interruption.kind.reclaims_capacity() {
        let seconds = u32::try_from(ctx.reclaim_backoff.as_secs()).unwrap_or(u32::MAX);
        ctx.stores.reclaim(
            provider,
            CapacityBackoff {
                until: Time(now + SignedDuration::from_secs(i64::from(seconds))),
                seconds,
                reason: "Interrupted".to_string(),
                code: match interruption.kind {
                    lifecycle::Kind::Preempt => "Preempt".to_string(),
                    _ => "SpotInterruption".to_string(),
                },
                offering: offering_of(pool),
            },
            now,
        );
    }
    let left = interruption.deadline.duration_since(now).as_secs_f64();
    tracing::warn!(node = %node.name, kind = interruption.kind.as_str(), deadline = %interruption.deadline, "interruption: node cordoned; its replicas move");
    ctx.metrics
        .interruption(provider.as_str(), interruption.kind.as_str(), "cordoned");
    ctx.publish(
        &pool.object_ref(&()),
        "Interruption",
        EventType::Warning,
        "Interrupted",
        format!(
            "node {} gets a {} interruption: it goes at {} ({left:.0} s from now); cordoned, its replicas stay until their replacements are Ready{}",
            node.name,
            interruption.kind.as_str(),
            interruption.deadline,
            if interruption.kind.reclaims_capacity() {
                format!(
                    ", and offering {} {} is in backoff",
                    pool.spec.instance_type,
                    pool.spec.zone.as_deref().unwrap_or("(no zone)")
                )
            } else {
                String::new()
            }
        ),
    )
    .await;
    Ok(true)
}
