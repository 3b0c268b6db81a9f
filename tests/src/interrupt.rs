//! Interruptions, as the clouds give them. On AWS an EventBridge-shaped event goes
//! to the interruption queue (SQS in moto) and, for a spot interruption or a
//! scheduled change, the instance is terminated at the deadline. On Azure the
//! Node gets the `VMEventScheduled` condition node-problem-detector would set on
//! AKS, and the VM is deleted at the deadline (a spot VM with eviction policy
//! Delete).

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use outrigger_crds::Provider;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::simulator::Shared;

/// The queue the simulator sends interruption events to, unless others were made.
pub const QUEUE_NAME: &str = "outrigger-interruptions";
/// The longest notice the control API takes: every deadline task ends by itself.
pub const MAX_NOTICE_SECONDS: u64 = 600;

/// What kind of interruption to give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An EC2 spot interruption warning; the instance goes at the deadline.
    Spot,
    /// An EC2 rebalance recommendation; nothing goes.
    Rebalance,
    /// An AWS Health scheduled change; the instance goes at its start.
    Scheduled,
    /// An Azure Preempt scheduled event; the VM goes at the deadline.
    Preempt,
}

/// `POST /interrupt`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    pub provider: Provider,
    /// The EC2 instance (AWS), or else `node`.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The Node's name.
    #[serde(default)]
    pub node: Option<String>,
    pub kind: Kind,
    pub notice_seconds: u64,
}

/// The SQS client on moto, and the queues made, by name. Every message goes to
/// each of them, as an EventBridge rule with several targets would send it: a test
/// reads a queue of its own, so a message that an operator stopped mid-receive
/// took in flight (for the visibility timeout) never delays the next test's.
pub(crate) struct Queue {
    client: aws_sdk_sqs::Client,
    urls: tokio::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

fn sqs_error(what: &str, e: impl std::error::Error) -> String {
    format!(
        "failed to {what}: {}",
        aws_sdk_sqs::error::DisplayErrorContext(e)
    )
}

impl Queue {
    pub(crate) fn new(moto_url: &str) -> Queue {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "outrigger-local",
                "outrigger-local",
                None,
                None,
                "sim",
            ))
            .endpoint_url(moto_url)
            .build();
        Queue {
            client: aws_sdk_sqs::Client::from_conf(config),
            urls: tokio::sync::Mutex::default(),
        }
    }

    /// The URL of queue `name`, creating it when moto does not have it (the first
    /// time, or after a reset).
    pub(crate) async fn url(&self, name: &str) -> Result<String, String> {
        let mut urls = self.urls.lock().await;
        if let Some(u) = urls.get(name) {
            let there = self
                .client
                .get_queue_attributes()
                .queue_url(u)
                .send()
                .await
                .is_ok();
            if there {
                return Ok(u.clone());
            }
        }
        let made = self
            .client
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| sqs_error("create the interruption queue in moto", e))?;
        let made = made.queue_url.unwrap_or_default();
        urls.insert(name.to_string(), made.clone());
        Ok(made)
    }

    /// Messages in queue `name`, visible or received and not yet deleted.
    pub(crate) async fn depth(&self, name: &str) -> Result<u64, String> {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let url = self.url(name).await?;
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(A::ApproximateNumberOfMessages)
            .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| sqs_error("read the interruption queue", e))?;
        let attributes = out.attributes.unwrap_or_default();
        Ok([
            A::ApproximateNumberOfMessages,
            A::ApproximateNumberOfMessagesNotVisible,
        ]
        .iter()
        .filter_map(|a| attributes.get(a)?.parse::<u64>().ok())
        .sum())
    }

    /// Sends `body` to every queue made (the default one when none is).
    pub(crate) async fn send(&self, body: String) -> Result<(), String> {
        let mut names: Vec<String> = self.urls.lock().await.keys().cloned().collect();
        if names.is_empty() {
            names.push(QUEUE_NAME.to_string());
        }
        for name in names {
            let url = self.url(&name).await?;
            self.client
                .send_message()
                .queue_url(url)
                .message_body(body.clone())
                .send()
                .await
                .map_err(|e| sqs_error("send to the interruption queue", e))?;
        }
        Ok(())
    }
}

/// The event EventBridge would deliver for `kind` on `instance`, sent `now`, with
/// the instance going `notice` later. A spot warning's deadline is its time plus
/// two minutes, so a shorter notice dates the event back.
pub fn event(
    kind: Kind,
    instance: &str,
    (region, zone): (&str, &str),
    notice: SignedDuration,
    now: Timestamp,
) -> Value {
    let (detail_type, source, time, detail) = match kind {
        Kind::Spot => (
            "EC2 Spot Instance Interruption Warning",
            "aws.ec2",
            now - (SignedDuration::from_secs(120) - notice),
            json!({"instance-id": instance, "instance-action": "terminate"}),
        ),
        Kind::Rebalance => (
            "EC2 Instance Rebalance Recommendation",
            "aws.ec2",
            now,
            json!({"instance-id": instance}),
        ),
        Kind::Scheduled | Kind::Preempt => (
            "AWS Health Event",
            "aws.health",
            now,
            json!({"eventTypeCategory": "scheduledChange", "service": "EC2",
                   "eventTypeCode": "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED",
                   "startTime": (now + notice).to_string(),
                   "affectedEntities": [{"entityValue": instance}]}),
        ),
    };
    json!({
        "version": "0",
        "id": uuid::Uuid::new_v4().to_string(),
        "detail-type": detail_type,
        "source": source,
        "account": "123456789012",
        "time": time.to_string(),
        "region": region,
        "resources": [format!("arn:aws:ec2:{zone}:instance/{instance}")],
        "detail": detail,
    })
}

/// Gives the interruption; answers what was done.
pub(crate) async fn interrupt(shared: Arc<Shared>, request: Request) -> Result<Value, String> {
    if request.notice_seconds > MAX_NOTICE_SECONDS {
        return Err(format!(
            "noticeSeconds must be at most {MAX_NOTICE_SECONDS}"
        ));
    }
    let notice = Duration::from_secs(request.notice_seconds);
    match request.provider {
        Provider::Aws => {
            if request.kind == Kind::Preempt {
                return Err(
                    "kind preempt is Azure's; on aws use spot, rebalance or scheduled".into(),
                );
            }
            let instance = match (&request.instance_id, &request.node) {
                (Some(id), _) => id.clone(),
                // The registrar names an EC2 Node after its instance.
                (None, Some(node)) => node.clone(),
                (None, None) => return Err("give instanceId or node".into()),
            };
            let (region, found) = shared
                .moto
                .find_instance(&shared.aws_regions(), &instance)
                .await
                .map_err(|e| format!("failed to look for instance {instance} in moto: {e}"))?
                .ok_or_else(|| {
                    format!("no instance {instance} in the regions the simulator knows")
                })?;
            let zone = found.zone;
            let body = event(
                request.kind,
                &instance,
                (&region, &zone),
                SignedDuration::try_from(notice).unwrap_or(SignedDuration::ZERO),
                Timestamp::now(),
            );
            shared.queue.send(body.to_string()).await?;
            tracing::info!(%instance, kind = ?request.kind, ?notice, "control: interruption sent to the queue");
            if request.kind != Kind::Rebalance {
                let shared = shared.clone();
                let id = instance.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(notice).await;
                    match shared.moto.terminate(&region, &id).await {
                        Ok(()) => {
                            tracing::info!(instance = %id, "control: interrupted instance terminated at its deadline")
                        }
                        Err(e) => {
                            tracing::warn!(instance = %id, error = %e, "control: failed to terminate an interrupted instance")
                        }
                    }
                    shared.wake_registrar();
                });
            }
            Ok(json!({"provider": "aws", "instanceId": instance, "event": body}))
        }
        Provider::Azure => {
            if request.kind != Kind::Preempt {
                return Err("on azure the kind is preempt".into());
            }
            let node = request
                .node
                .clone()
                .ok_or_else(|| "give node (the VM's computer name)".to_string())?;
            let vm = shared
                .azure()
                .vm_named(&node)
                .ok_or_else(|| format!("no scale-set VM named {node}"))?;
            let now = Timestamp::now();
            let not_before = now + SignedDuration::try_from(notice).unwrap_or(SignedDuration::ZERO);
            let condition = json!({"status": {"conditions": [{
                "type": "VMEventScheduled", "status": "True", "reason": "Preempt",
                "message": format!("Preempt scheduled for {not_before}"),
                "lastTransitionTime": now.to_string(), "lastHeartbeatTime": now.to_string(),
            }]}});
            let mut set = false;
            for client in &shared.clusters {
                let nodes: Api<Node> = Api::all(client.clone());
                if nodes
                    .patch_status(
                        &node,
                        &PatchParams::default(),
                        &Patch::Strategic(&condition),
                    )
                    .await
                    .is_ok()
                {
                    set = true;
                }
            }
            if !set {
                return Err(format!("no cluster has a Node {node}"));
            }
            tracing::info!(%node, ?notice, "control: Preempt scheduled");
            let shared = shared.clone();
            let name = node.clone();
            tokio::spawn(async move {
                tokio::time::sleep(notice).await;
                shared.azure().evict(&vm);
                tracing::info!(node = %name, "control: preempted VM deleted at its deadline");
                shared.wake_registrar();
            });
            Ok(json!({"provider": "azure", "node": node, "notBefore": not_before.to_string()}))
        }
    }
}
