//! Node lifecycle facts, pure: the interruption notices the clouds send (AWS
//! EventBridge events from an SQS queue; on AKS the `VMEventScheduled` Node
//! condition that node-problem-detector sets) and the typed mark Outrigger puts on a
//! doomed Node (`outrigger.dev/interruption`), which the inventory reads.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::labels;

/// AWS sends a spot interruption warning two minutes before it reclaims the instance.
pub const SPOT_NOTICE: SignedDuration = SignedDuration::from_secs(120);
/// Azure gives a Preempt scheduled event at least 30 s before the VM goes; the
/// condition node-problem-detector writes names no time Outrigger reads, so this
/// minimum is the deadline.
pub const PREEMPT_NOTICE: SignedDuration = SignedDuration::from_secs(30);
/// The Node condition node-problem-detector sets on AKS for a scheduled event.
pub const VM_EVENT_SCHEDULED: &str = "VMEventScheduled";

/// Why a node is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// An EC2 spot interruption warning.
    Spot,
    /// An AWS Health scheduled change for the instance.
    Scheduled,
    /// The instance is stopping or terminating already.
    StateChange,
    /// An Azure scheduled event that deletes or moves the VM (Preempt, Terminate,
    /// Redeploy).
    Preempt,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Spot => "spot",
            Kind::Scheduled => "scheduled",
            Kind::StateChange => "state-change",
            Kind::Preempt => "preempt",
        }
    }

    /// The capacity was reclaimed by the cloud: the offering is short, so it goes
    /// into backoff and the replacement goes elsewhere.
    pub fn reclaims_capacity(self) -> bool {
        matches!(self, Kind::Spot | Kind::Preempt)
    }
}

/// The mark on a doomed Node: why, when the notice came, and when it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interruption {
    pub kind: Kind,
    pub noticed: Timestamp,
    pub deadline: Timestamp,
}

impl Interruption {
    /// The annotation's value.
    pub fn to_annotation(self) -> String {
        serde_json::to_string(&self).expect("an interruption serialises")
    }

    /// What a Node says about its end: Outrigger's mark, else an AKS scheduled
    /// event that removes the VM (`VMEventScheduled=True` whose reason names
    /// Preempt, Terminate or Redeploy; Freeze and Reboot keep the node).
    pub fn of(node: &Node) -> Option<Interruption> {
        let marked = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(labels::INTERRUPTION))
            .and_then(|v| serde_json::from_str::<Interruption>(v).ok());
        marked.or_else(|| {
            let c = node
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == VM_EVENT_SCHEDULED && c.status == "True")?;
            let removes = matches!(
                c.reason.as_deref(),
                Some("Preempt" | "Terminate" | "Redeploy")
            );
            let noticed = c.last_transition_time.as_ref()?.0;
            removes.then_some(Interruption {
                kind: Kind::Preempt,
                noticed,
                deadline: noticed + PREEMPT_NOTICE,
            })
        })
    }
}

/// One message of the interruption queue, as far as Outrigger acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The instances go: mark their nodes.
    Interrupt {
        instances: Vec<String>,
        interruption: Interruption,
    },
    /// A rebalance recommendation: the instance is at higher risk, nothing is due.
    Rebalance { instance: String },
    /// A state change Outrigger does not act on (running, pending), or a Health
    /// event of another category.
    Ignored { detail_type: String },
}

/// Why a queue message is not a notice.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not an EventBridge event: {0}")]
    Envelope(String),
    #[error("unknown detail-type {0:?}")]
    UnknownType(String),
    #[error("{detail_type} without {field}")]
    Missing {
        detail_type: String,
        field: &'static str,
    },
}

/// The EventBridge envelope.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "detail-type")]
    detail_type: String,
    source: String,
    time: Timestamp,
    #[serde(default)]
    detail: serde_json::Value,
}

/// A queue message's body, parsed, as of `now` (the time it was received).
pub fn parse(body: &str, now: Timestamp) -> Result<Notice, ParseError> {
    let e: Envelope =
        serde_json::from_str(body).map_err(|err| ParseError::Envelope(err.to_string()))?;
    let missing = |field| ParseError::Missing {
        detail_type: e.detail_type.clone(),
        field,
    };
    let instance = || {
        e.detail
            .get("instance-id")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| missing("detail.instance-id"))
    };
    let interrupt = |instances: Vec<String>, kind: Kind, deadline: Timestamp| Notice::Interrupt {
        instances,
        interruption: Interruption {
            kind,
            noticed: now,
            deadline,
        },
    };
    match (e.source.as_str(), e.detail_type.as_str()) {
        ("aws.ec2", "EC2 Spot Instance Interruption Warning") => Ok(interrupt(
            vec![instance()?],
            Kind::Spot,
            e.time + SPOT_NOTICE,
        )),
        ("aws.ec2", "EC2 Instance Rebalance Recommendation") => Ok(Notice::Rebalance {
            instance: instance()?,
        }),
        ("aws.ec2", "EC2 Instance State-change Notification") => {
            let state = e
                .detail
                .get("state")
                .and_then(|v| v.as_str())
                .ok_or_else(|| missing("detail.state"))?;
            if matches!(
                state,
                "stopping" | "stopped" | "shutting-down" | "terminated"
            ) {
                Ok(interrupt(vec![instance()?], Kind::StateChange, now))
            } else {
                Ok(Notice::Ignored {
                    detail_type: format!("{} ({state})", e.detail_type),
                })
            }
        }
        ("aws.health", "AWS Health Event") => {
            let category = e.detail.get("eventTypeCategory").and_then(|v| v.as_str());
            if category != Some("scheduledChange") {
                return Ok(Notice::Ignored {
                    detail_type: format!("{} ({})", e.detail_type, category.unwrap_or("-")),
                });
            }
            let instances: Vec<String> = e
                .detail
                .get("affectedEntities")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|a| a.get("entityValue").and_then(|v| v.as_str()))
                .map(str::to_string)
                .collect();
            if instances.is_empty() {
                return Err(missing("detail.affectedEntities[].entityValue"));
            }
            let start = e
                .detail
                .get("startTime")
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse::<Timestamp>().ok())
                .unwrap_or(now);
            Ok(interrupt(instances, Kind::Scheduled, start))
        }
        _ => Err(ParseError::UnknownType(e.detail_type.clone())),
    }
}

/// The instance id at the end of an AWS `spec.providerID` (`aws:///zone/i-...`).
pub fn aws_instance(provider_id: &str) -> Option<&str> {
    provider_id
        .strip_prefix("aws://")
        .and_then(|rest| rest.rsplit('/').next())
        .filter(|id| id.starts_with("i-"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn event(detail_type: &str, source: &str, detail: serde_json::Value) -> String {
        json!({"version": "0", "id": "7bf73129-1428-4cd3-a780-95db273d1602",
               "detail-type": detail_type, "source": source, "account": "123456789012",
               "time": "2026-12-02T10:00:00Z", "region": "us-east-1",
               "resources": ["arn:aws:ec2:us-east-1a:instance/i-0abc"], "detail": detail})
        .to_string()
    }

    #[test]
    fn a_spot_warning_is_due_two_minutes_after_its_time() {
        let now = at("2026-12-02T10:00:01Z");
        let body = event(
            "EC2 Spot Instance Interruption Warning",
            "aws.ec2",
            json!({"instance-id": "i-0abc", "instance-action": "terminate"}),
        );
        assert_eq!(
            parse(&body, now),
            Ok(Notice::Interrupt {
                instances: vec!["i-0abc".into()],
                interruption: Interruption {
                    kind: Kind::Spot,
                    noticed: now,
                    deadline: at("2026-12-02T10:02:00Z")
                }
            })
        );
    }

    #[test]
    fn state_changes_act_only_when_the_instance_goes() {
        let now = at("2026-12-02T10:00:01Z");
        let change = |state: &str| {
            parse(
                &event(
                    "EC2 Instance State-change Notification",
                    "aws.ec2",
                    json!({"instance-id": "i-0abc", "state": state}),
                ),
                now,
            )
        };
        for state in ["stopping", "stopped", "shutting-down", "terminated"] {
            assert!(
                matches!(change(state), Ok(Notice::Interrupt { interruption, .. }) if interruption.deadline == now && interruption.kind == Kind::StateChange)
            );
        }
        assert!(matches!(change("running"), Ok(Notice::Ignored { .. })));
    }

    #[test]
    fn a_scheduled_health_event_names_every_affected_instance() {
        let now = at("2026-12-02T10:00:01Z");
        let body = event(
            "AWS Health Event",
            "aws.health",
            json!({"eventTypeCategory": "scheduledChange", "startTime": "2026-12-03T00:00:00Z",
                   "affectedEntities": [{"entityValue": "i-1"}, {"entityValue": "i-2"}]}),
        );
        let Ok(Notice::Interrupt {
            instances,
            interruption,
        }) = parse(&body, now)
        else {
            panic!("not an interruption");
        };
        assert_eq!(instances, ["i-1", "i-2"]);
        assert_eq!(interruption.deadline, at("2026-12-03T00:00:00Z"));
        let issue = event(
            "AWS Health Event",
            "aws.health",
            json!({"eventTypeCategory": "issue"}),
        );
        assert!(matches!(parse(&issue, now), Ok(Notice::Ignored { .. })));
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        let now = Timestamp::UNIX_EPOCH;
        assert!(matches!(
            parse("not json", now),
            Err(ParseError::Envelope(_))
        ));
        assert_eq!(
            parse(&event("Something Else", "aws.ec2", json!({})), now),
            Err(ParseError::UnknownType("Something Else".into()))
        );
        assert_eq!(
            parse(
                &event(
                    "EC2 Spot Instance Interruption Warning",
                    "aws.ec2",
                    json!({})
                ),
                now
            ),
            Err(ParseError::Missing {
                detail_type: "EC2 Spot Instance Interruption Warning".into(),
                field: "detail.instance-id"
            })
        );
        assert!(matches!(
            parse(
                &event(
                    "EC2 Instance Rebalance Recommendation",
                    "aws.ec2",
                    json!({"instance-id": "i-9"})
                ),
                now
            ),
            Ok(Notice::Rebalance { .. })
        ));
    }

    #[test]
    fn a_node_is_doomed_by_the_mark_or_by_a_removing_scheduled_event() {
        let mark = Interruption {
            kind: Kind::Spot,
            noticed: at("2026-12-02T10:00:00Z"),
            deadline: at("2026-12-02T10:00:20Z"),
        };
        let marked: Node = serde_json::from_value(json!({"metadata": {"name": "n",
            "annotations": {labels::INTERRUPTION: mark.to_annotation()}}}))
        .unwrap();
        assert_eq!(Interruption::of(&marked), Some(mark));
        let scheduled = |reason: &str| -> Node {
            serde_json::from_value(json!({"metadata": {"name": "n"}, "status": {"conditions": [
                {"type": "VMEventScheduled", "status": "True", "reason": reason,
                 "lastTransitionTime": "2026-12-02T10:00:00Z", "message": "x"}]}}))
            .unwrap()
        };
        let preempt = Interruption::of(&scheduled("Preempt")).unwrap();
        assert_eq!(preempt.kind, Kind::Preempt);
        assert_eq!(preempt.deadline, at("2026-12-02T10:00:30Z"));
        assert_eq!(Interruption::of(&scheduled("Freeze")), None);
        assert_eq!(aws_instance("aws:///us-east-1a/i-0abc"), Some("i-0abc"));
        assert_eq!(aws_instance("azure:///subscriptions/x"), None);
    }
}
