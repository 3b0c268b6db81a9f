//! Peers end to end on `hack/peers` (clusters `aws` and `azure`, one operator in
//! each, registered with `outrigger peer add`): one ModelDeployment applied to both
//! is placed across the clusters within its rules, a whole cluster lost moves its
//! share to the other within seconds, its return brings the split back without a
//! dip, a partition makes both sides serve everything and healing converges, and
//! no peer identity ever writes.
//!
//! Runs only with `OUTRIGGER_PEERS_E2E=1` and the environment of `hack/e2e-peers`;
//! otherwise it says why and passes. Everything it creates has a name of its own
//! and is removed at the end, also when it fails.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use outrigger_crds::{GpuNodePool, ModelDeployment, PeerCluster};
use outrigger_tests::e2e::Operator;
use outrigger_tests::harness::eventually;
use outrigger_tests::pair::*;
use serde_json::json;

fn requested() -> bool {
    outrigger_tests::peers::requested("peers")
}

fn peers_dir() -> PathBuf {
    outrigger_tests::peers::dir()
}

/// `hack/peers ARGS...`; panics with its stderr when it fails.
fn peers(args: &[&str]) -> String {
    outrigger_tests::peers::hack(args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the clusters of hack/peers: hack/e2e-peers runs it"]
async fn peers_serve_one_deployment_and_survive_losing_a_cluster() {
    if !requested() {
        return;
    }
    let run = Run {
        suffix: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        aws: client("aws").await,
        azure: client("azure").await,
    };
    let mut operators = BTreeMap::new();
    let outcome = AssertUnwindSafe(steps(&run, &mut operators))
        .catch_unwind()
        .await;
    clean_up(&run, operators).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn steps(run: &Run, operators: &mut BTreeMap<&'static str, Operator>) {
    set_up(run, operators).await;
    placed_across_clusters_within_the_rules(run).await;
    bad_peers_are_named_and_nothing_else_stops(run).await;
    a_whole_cluster_lost_moves_its_share(run, operators).await;
    for mode in ["refuse", "blackhole"] {
        a_partition_makes_both_serve_and_healing_converges(run, mode).await;
    }
    deleting_one_copy_then_the_other(run).await;
    no_peer_identity_writes(run);
}

/// Both clusters serve, all Ready, within the 60% cap: 3 and 2, either way round
/// (the plan keeps where replicas run when the rules allow).
fn split(aws: (u32, u32), azure: (u32, u32)) -> bool {
    let cap = REPLICAS * 60 / 100;
    aws.0 == aws.1
        && azure.0 == azure.1
        && aws.0 + azure.0 == REPLICAS
        && (1..=cap).contains(&aws.0)
        && (1..=cap).contains(&azure.0)
}

/// The placements a copy's status shows: (cluster, pool) -> replicas.
async fn placements(kube: &Client, namespace: &str) -> Option<BTreeMap<(String, String), i32>> {
    let md = Api::<ModelDeployment>::namespaced(kube.clone(), namespace)
        .get(MD)
        .await
        .ok()?;
    Some(
        md.status?
            .placements
            .into_iter()
            .map(|p| ((p.cluster.unwrap_or_default(), p.pool), p.replicas))
            .collect(),
    )
}

async fn placed_across_clusters_within_the_rules(run: &Run) {
    let ns = run.namespace();
    let split = eventually("3 Ready on aws and 2 on azure", DEADLINE, || async {
        let aws = share(&run.aws, &ns).await?;
        let azure = share(&run.azure, &ns).await?;
        (aws == (3, 3) && azure == (2, 2)).then_some((aws, azure))
    })
    .await;
    println!(
        "placed across clusters: aws {:?}, azure {:?} (replicas, ready)",
        split.0, split.1
    );
    let expected = BTreeMap::from([
        (("aws".to_string(), run.pool("aws")), 3),
        (("azure".to_string(), run.pool("azure")), 2),
    ]);
    for cluster in ["aws", "azure"] {
        eventually(
            &format!("the copy in {cluster} to show the plan over both clusters"),
            DEADLINE,
            || async { (placements(run.kube(cluster), &ns).await? == expected).then_some(()) },
        )
        .await;
    }
    let providers = Api::<ModelDeployment>::namespaced(run.azure.clone(), &ns)
        .get(MD)
        .await
        .expect("the copy")
        .status
        .and_then(|s| s.providers);
    assert_eq!(
        providers.as_deref(),
        Some("aws=3 azure=2"),
        "the Providers column sums over clusters"
    );
    // `outrigger plan` over both clusters' objects prints the plan they serve.
    let dir = std::env::temp_dir().join(format!("outrigger-peers-{}", run.suffix));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let mut args = vec!["plan".to_string(), "-o".into(), "json".into()];
    for cluster in ["aws", "azure"] {
        let kube = run.kube(cluster);
        let pool = Api::<GpuNodePool>::all(kube.clone())
            .get(&run.pool(cluster))
            .await
            .expect("the pool");
        let copy = Api::<ModelDeployment>::namespaced(kube.clone(), &ns)
            .get(MD)
            .await
            .expect("the copy");
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [pool, copy]});
        let file = dir.join(format!("{cluster}-objects.json"));
        std::fs::write(&file, list.to_string()).expect("write the objects");
        args.extend(["--cluster".into(), cluster.into(), "-f".into()]);
        args.push(file.to_str().expect("a UTF-8 path").to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let printed = outrigger("aws", &args).unwrap_or_else(|e| panic!("outrigger plan: {e}"));
    let printed: serde_json::Value = serde_json::from_str(&printed).expect("JSON");
    let planned: BTreeMap<(String, String), i32> = printed["plans"][0]["placements"]
        .as_array()
        .expect("placements")
        .iter()
        .map(|p| {
            (
                (
                    p["cluster"].as_str().unwrap_or_default().to_string(),
                    p["pool"].as_str().unwrap_or_default().to_string(),
                ),
                i32::try_from(p["replicas"].as_i64().unwrap_or_default()).unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        planned, expected,
        "outrigger plan over both clusters prints the plan they serve: {printed}"
    );
    println!("outrigger plan --cluster aws -f ... --cluster azure -f ...: {planned:?}, as served");
}

/// A PeerCluster that cannot work, and what its `Reachable` condition must say.
struct BadPeer<'a> {
    name: String,
    /// The key and text of its Secret; no Secret without.
    secret: Option<(&'a str, String)>,
    operator_namespace: &'a str,
    reason: &'a str,
    says: &'a str,
}

/// Every kind of bad PeerCluster on aws gets a condition that names the field and
/// the fix, and the deployment served by aws and azure carries on untouched.
async fn bad_peers_are_named_and_nothing_else_stops(run: &Run) {
    let suffix = &run.suffix;
    // The peer kubeconfigs `peer add` wrote: aws's for azure, and azure's for aws
    // (aws's own address, with a token aws takes).
    let azure_kubeconfig = peer_kubeconfig(&run.aws, "azure").await;
    let aws_kubeconfig = peer_kubeconfig(&run.azure, "aws").await;
    // In azure, a live Lease that says its cluster is named aws, as a second
    // cluster with this one's name would have.
    let twin = format!("peers-twin-{suffix}");
    let namespaces: Api<Namespace> = Api::all(run.azure.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": twin}})).unwrap(),
        )
        .await
        .expect("create the twin's namespace");
    // aws reads azure as ServiceAccount outrigger-peer-reader-aws, which may read
    // only the leader Lease of azure's operator namespace: here it may read the
    // twin's too.
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "outrigger-peer-reader", "namespace": twin},
        "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                   "resourceNames": ["outrigger-leader"], "verbs": ["get", "list", "watch"]}],
    }))
    .unwrap();
    Api::namespaced(run.azure.clone(), &twin)
        .create(&PostParams::default(), &role)
        .await
        .expect("the twin's reader Role");
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "outrigger-peer-reader-aws", "namespace": twin},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "outrigger-peer-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "outrigger-peer-reader-aws", "namespace": NAMESPACE}],
    }))
    .unwrap();
    Api::namespaced(run.azure.clone(), &twin)
        .create(&PostParams::default(), &binding)
        .await
        .expect("the twin's reader RoleBinding");
    let renew = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    );
    apply_json(
        &run.azure,
        &json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "outrigger-leader", "namespace": twin,
                "annotations": {"outrigger.dev/cluster-name": "aws"}},
            "spec": {"holderIdentity": "twin", "leaseDurationSeconds": 3600,
                "renewTime": renew},
        }),
    )
    .await;
    let cases = [
        BadPeer {
            name: format!("bad-nosecret-{suffix}"),
            secret: None,
            operator_namespace: NAMESPACE,
            reason: "SecretMissing",
            says: "spec.kubeconfigSecretRef",
        },
        BadPeer {
            name: format!("bad-nokey-{suffix}"),
            secret: Some(("config", azure_kubeconfig.clone())),
            operator_namespace: NAMESPACE,
            reason: "KeyMissing",
            says: "spec.kubeconfigSecretRef.key",
        },
        BadPeer {
            name: format!("bad-garbled-{suffix}"),
            secret: Some(("kubeconfig", "clusters: [this is not".to_string())),
            operator_namespace: NAMESPACE,
            reason: "KubeconfigInvalid",
            says: "outrigger peer add",
        },
        BadPeer {
            name: format!("bad-self-{suffix}"),
            secret: Some(("kubeconfig", aws_kubeconfig)),
            operator_namespace: NAMESPACE,
            reason: "SameCluster",
            says: "points back at this cluster",
        },
        BadPeer {
            name: format!("gcp-{suffix}"),
            secret: Some(("kubeconfig", azure_kubeconfig.clone())),
            operator_namespace: NAMESPACE,
            reason: "NameMismatch",
            says: "--cluster-name azure",
        },
        BadPeer {
            name: format!("bad-twin-{suffix}"),
            secret: Some(("kubeconfig", azure_kubeconfig)),
            operator_namespace: &twin,
            reason: "DuplicateName",
            says: "give each cluster its own clusterName",
        },
    ];
    for BadPeer {
        name,
        secret,
        operator_namespace,
        ..
    } in &cases
    {
        if let Some((key, text)) = secret {
            apply_json(
                &run.aws,
                &json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": name, "namespace": SECRET_NAMESPACE},
                    "stringData": {*key: text},
                }),
            )
            .await;
        }
        apply_json(
            &run.aws,
            &json!({
                "apiVersion": "outrigger.dev/v1alpha1", "kind": "PeerCluster",
                "metadata": {"name": name},
                "spec": {
                    "kubeconfigSecretRef": {"namespace": SECRET_NAMESPACE, "name": name},
                    "operatorNamespace": operator_namespace,
                },
            }),
        )
        .await;
    }
    for BadPeer {
        name, reason, says, ..
    } in &cases
    {
        let message = peer_condition(&run.aws, name, "Reachable", reason).await;
        assert!(
            message.contains(says),
            "{name}: Reachable=False {reason}: the message says {says:?}: {message}"
        );
        println!("bad peer {name}: Reachable=False {reason}: {message}");
    }
    // The real peers and the deployment carry on.
    for (cluster, peer) in [("aws", "azure"), ("azure", "aws")] {
        let p = Api::<PeerCluster>::all(run.kube(cluster).clone())
            .get(peer)
            .await
            .expect("the real PeerCluster");
        let conditions = p.status.expect("a status").conditions;
        for t in ["Reachable", "Mutual"] {
            assert!(
                conditions
                    .iter()
                    .any(|c| c.type_ == t && c.status == "True"),
                "{cluster}'s PeerCluster {peer} stays {t}: {conditions:?}"
            );
        }
    }
    let ns = run.namespace();
    for cluster in ["aws", "azure"] {
        let want = if cluster == "aws" { (3, 3) } else { (2, 2) };
        assert_eq!(
            share(run.kube(cluster), &ns).await,
            Some(want),
            "{cluster} keeps its share beside the bad peers"
        );
    }
    let peers_api: Api<PeerCluster> = Api::all(run.aws.clone());
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(run.aws.clone(), SECRET_NAMESPACE);
    for BadPeer { name, .. } in &cases {
        peers_api
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete a bad PeerCluster");
        let _ = secrets.delete(name, &DeleteParams::default()).await;
    }
    namespaces
        .delete(&twin, &DeleteParams::default())
        .await
        .expect("delete the twin's namespace");
}

/// The aws cluster goes at once: its control plane is killed (its nodes, and the
/// pods on them, keep running, as in a control-plane outage). Then it comes back
/// without its replicas, and takes its share again after the rebalance window.
async fn a_whole_cluster_lost_moves_its_share(
    run: &Run,
    operators: &mut BTreeMap<&'static str, Operator>,
) {
    let ns = run.namespace();
    let down = Instant::now();
    peers(&["fault", "down", "aws"]);
    let stopped = down.elapsed().as_secs_f64();
    eventually("every replica Ready in azure", DEADLINE, || async {
        (share(&run.azure, &ns).await? == (REPLICAS, REPLICAS)).then_some(())
    })
    .await;
    let took = down.elapsed().as_secs_f64();
    println!(
        "cluster aws down: all {REPLICAS} replicas Ready in azure {took:.1} s after `fault down aws` began (the kill itself took {stopped:.1} s; unreachableAfterSeconds {UNREACHABLE_AFTER})"
    );
    // The aws operator lost its API; it restarts with the cluster.
    if let Some(old) = operators.remove("aws") {
        old.kill().await;
    }
    let up = Instant::now();
    peers(&["fault", "up", "aws"]);
    // Its replicas did not survive the outage, as when its nodes went too: the
    // children are scaled to 0 before its operator starts again.
    let children = Api::<Deployment>::namespaced(run.aws.clone(), &ns);
    for child in children
        .list(&ListParams::default().labels(&format!("outrigger.dev/deployment={MD}")))
        .await
        .expect("list aws's children")
    {
        children
            .patch(
                &child.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 0}})),
            )
            .await
            .expect("scale a child to 0");
    }
    eventually("aws's replicas gone", DEADLINE, || async {
        (share(&run.aws, &ns).await? == (0, 0)).then_some(())
    })
    .await;
    operators.insert("aws", start_operator("aws").await);
    // Until the split is back: never under the replicas Ready, aws never runs more
    // than its share (no full copy), and takes nothing before the rebalance window.
    let mut aws_most = 0;
    let mut fewest = u32::MAX;
    let mut aws_again = None;
    let last = loop {
        assert!(
            up.elapsed() < DEADLINE + Duration::from_secs(u64::from(REBALANCE)),
            "the split did not come back"
        );
        // A cluster that does not answer this once is not counted as serving none.
        let (Some(azure), Some(aws)) = (share(&run.azure, &ns).await, share(&run.aws, &ns).await)
        else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        aws_most = aws_most.max(aws.0);
        fewest = fewest.min(aws.1 + azure.1);
        if aws.0 > 0 && aws_again.is_none() {
            aws_again = Some(k8s_openapi::jiff::Timestamp::now());
        }
        if split(aws, azure) {
            break (aws.0, azure.0);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let back = Api::<PeerCluster>::all(run.azure.clone())
        .get("aws")
        .await
        .expect("azure's PeerCluster aws")
        .status
        .and_then(|s| s.back_since)
        .expect("azure saw aws back")
        .0;
    let again = aws_again.expect("aws took replicas again");
    let after_back = again.duration_since(back).as_secs_f64();
    println!(
        "cluster aws back with no replicas: split again {:.1} s after `up` (aws {}, azure {}); aws took replicas again {after_back:.1} s after azure saw it back (rebalanceAfterSeconds {REBALANCE}); fewest Ready sampled {fewest}, most replicas on aws {aws_most}",
        up.elapsed().as_secs_f64(),
        last.0,
        last.1
    );
    assert!(
        fewest >= REPLICAS,
        "a sampled moment had only {fewest} Ready"
    );
    assert!(
        aws_most < REPLICAS,
        "aws launched a full copy ({aws_most} replicas)"
    );
    // backSince is kept in whole seconds: a second of slack.
    assert!(
        after_back >= f64::from(REBALANCE) - 1.0,
        "aws took replicas {after_back:.1} s after it was back, inside rebalanceAfterSeconds {REBALANCE}"
    );
}

async fn a_partition_makes_both_serve_and_healing_converges(run: &Run, mode: &str) {
    let ns = run.namespace();
    peers(&["fault", "partition", "aws", "azure", "--mode", mode]);
    let mut most = 0;
    let mut fewest = u32::MAX;
    eventually(
        &format!("both sides serving every replica ({mode})"),
        DEADLINE,
        || async {
            let aws = share(&run.aws, &ns).await?;
            let azure = share(&run.azure, &ns).await?;
            (aws.1 == REPLICAS && azure.1 == REPLICAS).then_some(())
        },
    )
    .await;
    peers(&["fault", "heal", "aws", "azure"]);
    let started = Instant::now();
    loop {
        let aws = share(&run.aws, &ns).await.unwrap_or_default();
        let azure = share(&run.azure, &ns).await.unwrap_or_default();
        most = most.max(aws.0 + azure.0);
        fewest = fewest.min(aws.1 + azure.1);
        if aws.0 + azure.0 == REPLICAS && aws.1 + azure.1 == REPLICAS {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE + Duration::from_secs(u64::from(REBALANCE)),
            "the sides did not converge ({mode}): aws {aws:?} azure {azure:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "partition ({mode}) healed: {REPLICAS} replicas again after {:.1} s; fewest Ready sampled {fewest}, most replicas {most}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        fewest >= REPLICAS,
        "a sampled moment had only {fewest} Ready"
    );
    assert!(most <= 2 * REPLICAS, "{most} replicas at once");
    // The split returns after the rebalance window.
    eventually("a split within the rules again", DEADLINE, || async {
        let aws = share(&run.aws, &ns).await?;
        let azure = share(&run.azure, &ns).await?;
        split(aws, azure).then_some(())
    })
    .await;
}

/// Deleting the aws copy moves its share to azure before its replicas go; deleting
/// the azure copy then removes everything.
async fn deleting_one_copy_then_the_other(run: &Run) {
    let ns = run.namespace();
    Api::<ModelDeployment>::namespaced(run.aws.clone(), &ns)
        .delete(MD, &DeleteParams::default())
        .await
        .expect("delete the aws copy");
    let started = Instant::now();
    let mut fewest = u32::MAX;
    loop {
        let aws = share(&run.aws, &ns).await.unwrap_or_default();
        let azure = share(&run.azure, &ns).await.unwrap_or_default();
        fewest = fewest.min(aws.1 + azure.1);
        let gone = Api::<ModelDeployment>::namespaced(run.aws.clone(), &ns)
            .get_opt(MD)
            .await
            .ok()
            .flatten()
            .is_none();
        if gone && aws == (0, 0) && azure == (REPLICAS, REPLICAS) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the aws copy did not hand over: aws {aws:?} azure {azure:?}, gone {gone}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "aws copy deleted: azure serves all {REPLICAS} after {:.1} s; fewest Ready sampled {fewest}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        fewest >= REPLICAS,
        "a sampled moment had only {fewest} Ready"
    );
    Api::<ModelDeployment>::namespaced(run.azure.clone(), &ns)
        .delete(MD, &DeleteParams::default())
        .await
        .expect("delete the azure copy");
    eventually("nothing left in either cluster", DEADLINE, || async {
        for kube in [&run.aws, &run.azure] {
            if share(kube, &ns).await? != (0, 0) {
                return None;
            }
            let children = Api::<Deployment>::namespaced(kube.clone(), &ns)
                .list(&ListParams::default().labels(&format!("outrigger.dev/deployment={MD}")))
                .await
                .ok()?;
            let copy = Api::<ModelDeployment>::namespaced(kube.clone(), &ns)
                .get_opt(MD)
                .await
                .ok()?;
            if !children.items.is_empty() || copy.is_some() {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// The audit logs of both clusters show no write by the peer reader.
fn no_peer_identity_writes(run: &Run) {
    // Each cluster reads the other as a ServiceAccount of its own.
    let reader = format!("system:serviceaccount:{NAMESPACE}:outrigger-peer-reader-");
    let mut reads = 0;
    for cluster in ["aws", "azure"] {
        let log = peers_dir().join(cluster).join("logs/audit.log");
        let text =
            std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        for line in text.lines() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if !entry["user"]["username"]
                .as_str()
                .is_some_and(|u| u.starts_with(&reader))
            {
                continue;
            }
            let verb = entry["verb"].as_str().unwrap_or_default();
            assert!(
                matches!(verb, "get" | "list" | "watch"),
                "the peer reader wrote in {cluster}: {line}"
            );
            reads += 1;
        }
    }
    assert!(reads > 0, "the audit logs show the peer reader's reads");
    println!(
        "read-only: {reads} requests by {reader}* in the audit logs, none a write ({})",
        run.suffix
    );
}
