//! Least privilege: the chart grants exactly the API access the operator's code uses.
//!
//! `charts/outrigger/rbac-rules.yaml` is the one list of rules (the chart renders it).
//! [`USED`] is the audit of the code: every (group, resource, verb) the operator calls,
//! each with the code that calls it. The tests fail when
//! - the chart grants a verb that is not in the audit (or misses one that is), or
//! - an audited call is no longer in the code (so its grant must go too).
//!
//! The opposite direction, a call in the code that the audit misses, is caught by the
//! end-to-end tests run as the chart's ServiceAccount (`make e2e-as-sa`): the API
//! server refuses the call and the tests fail or report the 403.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the rules apply: cluster-wide (ClusterRole) or in the release namespace,
/// where the leader Lease lives (Role).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Cluster,
    LeaseNamespace,
    /// The peer Secret namespace (`peers.secretNamespace`).
    SecretNamespace,
    /// What a peer's operator may read here (the `outrigger-peer-reader` roles).
    PeerReader,
    PeerReaderLease,
}

/// One audited use of the API: what is called, and the code that calls it (a file
/// under `operator/src` and a snippet of it, compared with whitespace collapsed).
struct Use {
    scope: Scope,
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    file: &'static str,
    code: &'static str,
}

/// Every API call of the operator. Reflectors and controllers list and watch;
/// server-side apply is a PATCH that creates the object when it is missing, which the
/// API server also authorises as `create`.
const USED: &[Use] = &[
    Use {
        scope: Scope::Cluster,
        group: "outrigger.dev",
        resource: "modeldeployments",
        verbs: &["list", "watch"],
        file: "run.rs",
        code: "Controller::new( Api::<DeserializeGuard<ModelDeployment>>::all(client.clone()),",
    },
    Use {
        scope: Scope::Cluster,
        group: "outrigger.dev",
        resource: "modeldeployments",
        verbs: &["patch"],
        file: "controller/model_deployment/mod.rs",
        code: "&kube::api::Patch::Merge(&patch),",
    },
    Use {
        scope: Scope::Cluster,
        group: "outrigger.dev",
        resource: "modeldeployments/status",
        verbs: &["patch"],
        file: "controller/model_deployment/mod.rs",
        code: ".status::<ModelDeployment>(Some(&key.0), &key.1, manager::CHILDREN, status)",
    },
    Use {
        scope: Scope::Cluster,
        group: "outrigger.dev",
        resource: "gpunodepools",
        verbs: &["list", "watch"],
        file: "run.rs",
        code: "let pools_store = mirror( Api::all(client.clone()),",
    },
    Use {
        scope: Scope::Cluster,
        group: "outrigger.dev",
        resource: "gpunodepools",
        verbs: &["patch"],
        file: "controller/scaler.rs",
        code: "finalizer(&api, FINALIZER, pool, |event| async {",
    },
    Use {
        scope: Scope::Cluster,
        group: "outrigger.dev",
        resource: "gpunodepools/status",
        verbs: &["patch"],
        file: "controller/pool.rs",
        code: ".status::<GpuNodePool>( None, &name, manager::INVENTORY,",
    },
    Use {
        scope: Scope::Cluster,
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
        file: "run.rs",
        code: "mirror( Api::all(client.clone()), watcher::Config::default(), trim::node,",
    },
    Use {
        scope: Scope::Cluster,
        group: "",
        resource: "nodes",
        verbs: &["patch"],
        file: "controller/scaler.rs",
        code: "ctx.applier.merge::<Node>(node, &patch)",
    },
    Use {
        scope: Scope::Cluster,
        group: "",
        resource: "pods",
        verbs: &["list", "watch"],
        file: "run.rs",
        code: "mirror( Api::all(client.clone()), watcher::Config::default().fields(",
    },
    Use {
        scope: Scope::Cluster,
        group: "",
        resource: "pods",
        verbs: &["patch"],
        file: "controller/apply.rs",
        code: "let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);",
    },
    Use {
        scope: Scope::Cluster,
        group: "",
        resource: "pods",
        verbs: &["delete"],
        file: "controller/apply.rs",
        code: ".delete(name, &DeleteParams::default().grace_period(0))",
    },
    Use {
        scope: Scope::Cluster,
        group: "apps",
        resource: "deployments",
        verbs: &["list", "watch"],
        file: "run.rs",
        code: "mirror( Api::<Deployment>::all(client.clone()),",
    },
    Use {
        scope: Scope::Cluster,
        group: "apps",
        resource: "deployments",
        verbs: &["create", "patch"],
        file: "controller/model_deployment/mod.rs",
        code: "decide::Write::Deployment(d) => { let applied = applier.child(ns, d.as_ref()).await?;",
    },
    Use {
        scope: Scope::Cluster,
        group: "apps",
        resource: "deployments",
        verbs: &["delete"],
        file: "controller/model_deployment/mod.rs",
        code: "decide::Write::DeleteDeployment(name) => { applier.delete::<Deployment>(ns, name).await?;",
    },
    Use {
        scope: Scope::Cluster,
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
        file: "run.rs",
        code: "mirror( Api::<Service>::all(client.clone()),",
    },
    Use {
        scope: Scope::Cluster,
        group: "",
        resource: "services",
        verbs: &["create", "patch"],
        file: "controller/model_deployment/mod.rs",
        code: "decide::Write::Service(s) => applier.child(ns, s.as_ref()).await",
    },
    Use {
        scope: Scope::Cluster,
        group: "",
        resource: "services",
        verbs: &["delete"],
        file: "controller/model_deployment/mod.rs",
        code: "decide::Write::DeleteService(name) => applier.delete::<Service>(ns, name)",
    },
    Use {
        scope: Scope::Cluster,
        group: "policy",
        resource: "poddisruptionbudgets",
        verbs: &["list", "watch"],
        file: "run.rs",
        code: "mirror( Api::<PodDisruptionBudget>::all(client.clone()),",
    },
    Use {
        scope: Scope::Cluster,
        group: "policy",
        resource: "poddisruptionbudgets",
        verbs: &["create", "patch"],
        file: "controller/model_deployment/mod.rs",
        code: "decide::Write::Budget(b) => applier.child(ns, b.as_ref()).await",
    },
    // kube-runtime's Recorder creates an events.k8s.io/v1 Event and patches it into
    // a series when the same Event repeats.
    Use {
        scope: Scope::Cluster,
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        file: "controller/mod.rs",
        code: "self.recorder.publish(&event, reference)",
    },
    Use {
        scope: Scope::Cluster,
        group: "outrigger.dev",
        resource: "peerclusters",
        verbs: &["list", "watch"],
        file: "run.rs",
        code: "Controller::new( Api::<PeerCluster>::all(ctx.client.clone()),",
    },
    Use {
        scope: Scope::Cluster,
        group: "outrigger.dev",
        resource: "peerclusters/status",
        verbs: &["patch"],
        file: "controller/peer/mod.rs",
        code: ".status::<PeerCluster>( None, &name, manager::PEERS,",
    },
    Use {
        scope: Scope::Cluster,
        group: "",
        resource: "namespaces",
        verbs: &["get"],
        file: "run.rs",
        code: "me.uid = Api::<Namespace>::all(client.clone()) .get_opt(\"kube-system\")",
    },
    Use {
        scope: Scope::SecretNamespace,
        group: "",
        resource: "secrets",
        verbs: &["get"],
        file: "controller/peer/mod.rs",
        code: "let secret = match secrets.get_opt(&reference.name).await {",
    },
    // A peer's reads, as the reader ServiceAccount (observe/peers.rs).
    Use {
        scope: Scope::PeerReader,
        group: "outrigger.dev",
        resource: "gpunodepools",
        verbs: &["list", "watch"],
        file: "observe/peers.rs",
        code: "Api::<GpuNodePool>::all(client.clone()),",
    },
    Use {
        scope: Scope::PeerReader,
        group: "outrigger.dev",
        resource: "modeldeployments",
        verbs: &["list", "watch"],
        file: "observe/peers.rs",
        code: "Api::<DeserializeGuard<ModelDeployment>>::all(client.clone()),",
    },
    Use {
        scope: Scope::PeerReader,
        group: "outrigger.dev",
        resource: "peerclusters",
        verbs: &["list", "watch"],
        file: "observe/peers.rs",
        code: "Api::<PeerCluster>::all(client.clone()),",
    },
    Use {
        scope: Scope::PeerReader,
        group: "",
        resource: "namespaces",
        verbs: &["get"],
        file: "observe/peers.rs",
        code: "namespaces.get_opt(\"kube-system\")",
    },
    Use {
        scope: Scope::PeerReaderLease,
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get"],
        file: "observe/peers.rs",
        code: "leases.get_opt(&me.lease_name)",
    },
    Use {
        scope: Scope::PeerReaderLease,
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["list", "watch"],
        file: "observe/peers.rs",
        code: "Api::<Lease>::namespaced(client.clone(), &peer.spec.operator_namespace),",
    },
    Use {
        scope: Scope::LeaseNamespace,
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get"],
        file: "leader.rs",
        code: "self.api.get_opt(&self.name)",
    },
    Use {
        scope: Scope::LeaseNamespace,
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create"],
        file: "leader.rs",
        code: "self.api.create(&PostParams::default(), &lease)",
    },
    Use {
        scope: Scope::LeaseNamespace,
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["update"],
        file: "leader.rs",
        code: ".replace(&self.name, &PostParams::default(), &lease)",
    },
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RulesFile {
    cluster_rules: Vec<Rule>,
    lease_rules: Vec<Rule>,
    secret_rules: Vec<Rule>,
    peer_reader_cluster_rules: Vec<Rule>,
    peer_reader_lease_rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    /// Narrows a rule to named objects, which only `get` honours.
    #[serde(default)]
    resource_names: Vec<String>,
    verbs: Vec<String>,
}

type Grant = (Scope, String, String, String);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ has a parent")
        .to_path_buf()
}

fn granted() -> BTreeSet<Grant> {
    let path = repo_root().join("charts/outrigger/rbac-rules.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
    let file: RulesFile = serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("failed to parse {}: {e}", path.display()));
    let mut grants = BTreeSet::new();
    for (scope, rules) in [
        (Scope::Cluster, &file.cluster_rules),
        (Scope::LeaseNamespace, &file.lease_rules),
        (Scope::SecretNamespace, &file.secret_rules),
        (Scope::PeerReader, &file.peer_reader_cluster_rules),
        (Scope::PeerReaderLease, &file.peer_reader_lease_rules),
    ] {
        for rule in rules {
            assert!(
                rule.resource_names.is_empty() || rule.verbs.iter().all(|v| v == "get"),
                "rbac-rules.yaml: resourceNames narrow only get, not {:?}",
                rule.verbs
            );
            for verb in &rule.verbs {
                assert_ne!(verb, "*", "rbac-rules.yaml: no wildcard verbs");
                for group in &rule.api_groups {
                    for resource in &rule.resources {
                        assert_ne!(resource, "*", "rbac-rules.yaml: no wildcard resources");
                        let grant = (scope, group.clone(), resource.clone(), verb.clone());
                        assert!(
                            grants.insert(grant.clone()),
                            "rbac-rules.yaml grants {grant:?} twice"
                        );
                    }
                }
            }
        }
    }
    grants
}

fn used() -> BTreeSet<Grant> {
    USED.iter()
        .flat_map(|u| {
            u.verbs.iter().map(|verb| {
                (
                    u.scope,
                    u.group.to_string(),
                    u.resource.to_string(),
                    (*verb).to_string(),
                )
            })
        })
        .collect()
}

#[test]
fn the_chart_grants_exactly_what_the_code_uses() {
    let granted = granted();
    let used = used();
    let extra: Vec<&Grant> = granted.difference(&used).collect();
    let missing: Vec<&Grant> = used.difference(&granted).collect();
    assert!(
        extra.is_empty(),
        "charts/outrigger/rbac-rules.yaml grants what the operator never calls: {extra:?}; \
         remove it, or add the call to USED in operator/tests/rbac.rs with the code that makes it"
    );
    assert!(
        missing.is_empty(),
        "the operator calls what charts/outrigger/rbac-rules.yaml does not grant: {missing:?}"
    );
}

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn every_audited_call_is_still_in_the_code() {
    let src = repo_root().join("operator/src");
    for u in USED {
        let path = src.join(u.file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
        assert!(
            collapse(&text).contains(&collapse(u.code)),
            "operator/src/{} no longer contains `{}` (the {:?} of {}/{}): if the call moved, \
             update USED; if it is gone, drop the grant from charts/outrigger/rbac-rules.yaml",
            u.file,
            u.code,
            u.verbs,
            u.group,
            u.resource,
        );
    }
}
