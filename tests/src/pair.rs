//! Two clusters of `hack/peers` (aws and azure) serving one ModelDeployment, as
//! the several-clusters tests (`peers`, `peer_trust`) set them up: a pool and a
//! simulated cloud in each, an operator in each, `outrigger peer add` between them,
//! and the deployment applied to both. With what those tests read back (each
//! cluster's share, a PeerCluster's condition) and the clean-up that removes it all.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use outrigger_crds::{GpuNodePool, ModelDeployment, PeerCluster};
use serde_json::json;

use crate::e2e::Operator;
use crate::harness::{eventually, repo_root};
use crate::peers::{hack as peers, kubeconfig};

/// A client of cluster `name` that reads for at most 5 s.
pub async fn client(name: &str) -> Client {
    crate::peers::client(name, None, Duration::from_secs(5)).await
}

/// Nodes boot in 2 s; a failover takes seconds. Generous, as the machine may be busy.
pub const DEADLINE: Duration = Duration::from_secs(120);
pub const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000peer6";
/// Seconds of silence after which a peer is lost.
pub const UNREACHABLE_AFTER: u32 = 5;
/// The deployment's `rebalanceAfterSeconds`.
pub const REBALANCE: u32 = 20;
pub const REPLICAS: u32 = 5;
/// Where the operators keep their Leases and the peer readers' ServiceAccounts.
pub const NAMESPACE: &str = "default";
/// Where the peer kubeconfig Secrets go (`peer add`'s and the operators' default).
pub const SECRET_NAMESPACE: &str = "outrigger-peers";

/// The kubeconfig that cluster `at` reads peer `of` with (`peer add` wrote it).
pub async fn peer_kubeconfig(at: &Client, of: &str) -> String {
    let secret =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(at.clone(), SECRET_NAMESPACE)
            .get(&format!("peer-{of}"))
            .await
            .unwrap_or_else(|e| panic!("the peer Secret for {of}: {e}"));
    let bytes = secret
        .data
        .and_then(|d| d.get("kubeconfig").cloned())
        .expect("a kubeconfig key");
    String::from_utf8(bytes.0).expect("kubeconfig text")
}

pub fn outrigger_bin() -> PathBuf {
    std::env::var_os("OUTRIGGER_BIN")
        .map(PathBuf::from)
        .expect("OUTRIGGER_BIN (hack/e2e-peers sets it)")
}

/// `outrigger ARGS...` against cluster `name`; its stdout, or its stderr as the error.
pub fn outrigger(name: &str, args: &[&str]) -> Result<String, String> {
    let output = std::process::Command::new(outrigger_bin())
        .env("KUBECONFIG", kubeconfig(name))
        .args(args)
        .output()
        .expect("run outrigger");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

pub struct Run {
    pub suffix: String,
    pub aws: Client,
    pub azure: Client,
}

impl Run {
    pub fn namespace(&self) -> String {
        format!("peers-{}", self.suffix)
    }
    pub fn pool(&self, cluster: &str) -> String {
        format!("peers-{cluster}-{}", self.suffix)
    }
    pub fn kube(&self, cluster: &str) -> &Client {
        if cluster == "aws" {
            &self.aws
        } else {
            &self.azure
        }
    }
}

pub const MD: &str = "llm";

pub fn pools(run: &Run) -> [(&'static str, serde_json::Value); 2] {
    [
        (
            "aws",
            json!({
                "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
                "metadata": {"name": run.pool("aws")},
                "spec": {
                    "provider": "aws", "region": "us-east-1", "zone": "us-east-1a",
                    "instanceType": "p5.48xlarge", "gpu": {"type": "H100", "count": 8},
                    "pricePerNodeHour": 98.32, "nodes": {"min": 0, "max": 4},
                    "scaling": {"aws": {"launchTemplate": {"name": format!("peers-{}", run.suffix)}}},
                },
            }),
        ),
        (
            "azure",
            json!({
                "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
                "metadata": {"name": run.pool("azure")},
                "spec": {
                    "provider": "azure", "region": "eastus", "zone": "1",
                    "instanceType": "Standard_ND96isr_H100_v5", "gpu": {"type": "H100", "count": 8},
                    "pricePerNodeHour": 110.0, "nodes": {"min": 0, "max": 4},
                    "scaling": {"azure": {
                        "subscriptionId": SUBSCRIPTION, "resourceGroup": run.namespace(),
                        "scaleSetName": format!("peers{}", run.suffix),
                    }},
                },
            }),
        ),
    ]
}

pub fn model(run: &Run) -> serde_json::Value {
    json!({
        "apiVersion": "outrigger.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": MD, "namespace": run.namespace()},
        "spec": {
            "replicas": REPLICAS,
            "gpu": {"count": 1, "types": ["H100"]},
            "template": {"spec": {"containers": [{"name": "server", "image": "server:1"}]}},
            "placement": {"spread": [{"by": "provider", "minGroups": 2, "maxShare": 60}]},
            "failover": {"unhealthyAfterSeconds": 5, "rebalanceAfterSeconds": REBALANCE},
        },
    })
}

pub async fn start_operator(cluster: &str) -> Operator {
    let kubeconfig = kubeconfig(cluster);
    let ec2 = std::env::var("AWS_ENDPOINT_URL_EC2").expect("AWS_ENDPOINT_URL_EC2");
    let azure = std::env::var("AZURE_ENDPOINT_URL").expect("AZURE_ENDPOINT_URL");
    let azure_ca = std::env::var("OUTRIGGER_AZURE_CA_FILE").expect("OUTRIGGER_AZURE_CA_FILE");
    Operator::start_with(
        &format!("peers-{cluster}"),
        &[("KUBECONFIG", kubeconfig.to_str().expect("a UTF-8 path"))],
        &[
            "--cluster-name",
            cluster,
            "--aws-endpoint-url",
            &ec2,
            "--azure-endpoint-url",
            &azure,
            "--azure-ca-file",
            &azure_ca,
            "--azure-token",
            "e2e",
            "--scale-down-after-seconds",
            "600",
        ],
    )
    .await
}

pub async fn apply_json(kube: &Client, value: &serde_json::Value) {
    let params = PatchParams::apply("peers-e2e").force();
    let name = value["metadata"]["name"].as_str().unwrap().to_string();
    match value["kind"].as_str().unwrap() {
        "GpuNodePool" => {
            Api::<GpuNodePool>::all(kube.clone())
                .patch(&name, &params, &Patch::Apply(value))
                .await
                .expect("apply the pool");
        }
        "ModelDeployment" => {
            let ns = value["metadata"]["namespace"].as_str().unwrap();
            Api::<ModelDeployment>::namespaced(kube.clone(), ns)
                .patch(&name, &params, &Patch::Apply(value))
                .await
                .expect("apply the ModelDeployment");
        }
        "PeerCluster" => {
            Api::<PeerCluster>::all(kube.clone())
                .patch(&name, &params, &Patch::Apply(value))
                .await
                .expect("apply the PeerCluster");
        }
        "Secret" => {
            let ns = value["metadata"]["namespace"].as_str().unwrap();
            Api::<k8s_openapi::api::core::v1::Secret>::namespaced(kube.clone(), ns)
                .patch(&name, &params, &Patch::Apply(value))
                .await
                .expect("apply the Secret");
        }
        "Lease" => {
            let ns = value["metadata"]["namespace"].as_str().unwrap();
            Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(kube.clone(), ns)
                .patch(&name, &params, &Patch::Apply(value))
                .await
                .expect("apply the Lease");
        }
        other => panic!("no apply for {other}"),
    }
}

pub async fn set_up(run: &Run, operators: &mut BTreeMap<&'static str, Operator>) {
    for kube in [&run.aws, &run.azure] {
        let crds: Api<CustomResourceDefinition> = Api::all(kube.clone());
        for crd in outrigger_crds::crds() {
            crds.patch(
                &crd.name_any(),
                &PatchParams::apply("peers-e2e").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("apply a CRD");
        }
        let namespaces: Api<Namespace> = Api::all(kube.clone());
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": run.namespace()}})).unwrap();
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("create the namespace: {e}"),
        }
    }
    for cluster in ["aws", "azure"] {
        eventually(
            &format!("the PeerCluster CRD served in {cluster}"),
            DEADLINE,
            || async {
                Api::<PeerCluster>::all(run.kube(cluster).clone())
                    .list(&ListParams::default())
                    .await
                    .ok()
            },
        )
        .await;
    }
    // The clouds behind each cluster's pool, then the pools, each in its own cluster.
    let dir = std::env::temp_dir().join(format!("outrigger-peers-{}", run.suffix));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    for (cluster, pool) in pools(run) {
        let file = dir.join(format!("{cluster}.json"));
        std::fs::write(&file, pool.to_string()).expect("write the pool");
        peers(&["clouds", cluster, file.to_str().unwrap()]);
        apply_json(run.kube(cluster), &pool).await;
    }
    for cluster in ["aws", "azure"] {
        operators.insert(cluster, start_operator(cluster).await);
    }
    // Each reaches the other through its loopback link, which a partition cuts.
    let to_azure = peers(&["env", "aws", "--peer", "azure"]);
    let to_aws = peers(&["env", "azure", "--peer", "aws"]);
    let unreachable = UNREACHABLE_AFTER.to_string();
    let azure_kubeconfig = kubeconfig("azure");
    let args = [
        "peer",
        "add",
        "azure",
        "--kubeconfig",
        azure_kubeconfig.to_str().unwrap(),
        "--cluster-name",
        "aws",
        "--namespace",
        NAMESPACE,
        "--peer-server",
        to_azure.trim(),
        "--server",
        to_aws.trim(),
        "--unreachable-after-seconds",
        &unreachable,
    ];
    let said = outrigger("aws", &args).unwrap_or_else(|e| panic!("outrigger peer add: {e}"));
    println!("{said}");
    // Again: nothing changes.
    let versions = |kube: Client| async move {
        Api::<PeerCluster>::all(kube)
            .list(&ListParams::default())
            .await
            .expect("list PeerClusters")
            .items
            .iter()
            .map(|p| (p.name_any(), p.metadata.generation))
            .collect::<Vec<_>>()
    };
    let before = versions(run.azure.clone()).await;
    outrigger("aws", &args).unwrap_or_else(|e| panic!("outrigger peer add, again: {e}"));
    assert_eq!(
        versions(run.azure.clone()).await,
        before,
        "a second add changes nothing"
    );
    for (cluster, peer) in [("aws", "azure"), ("azure", "aws")] {
        eventually(
            &format!("PeerCluster {peer} in {cluster} Reachable and Mutual"),
            DEADLINE,
            || async {
                let p = Api::<PeerCluster>::all(run.kube(cluster).clone())
                    .get(peer)
                    .await
                    .ok()?;
                let conditions = p.status?.conditions;
                let ok = |t: &str| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == t && c.status == "True")
                };
                (ok("Reachable") && ok("Mutual")).then_some(())
            },
        )
        .await;
    }
    for cluster in ["aws", "azure"] {
        apply_json(run.kube(cluster), &model(run)).await;
    }
}

/// Replicas and ready replicas of the deployment's children in one cluster; `None`
/// when the cluster does not answer.
pub async fn share(kube: &Client, namespace: &str) -> Option<(u32, u32)> {
    let list = Api::<Deployment>::namespaced(kube.clone(), namespace)
        .list(&ListParams::default().labels(&format!("outrigger.dev/deployment={MD}")))
        .await
        .ok()?;
    let count = |n: Option<i32>| n.unwrap_or(0).max(0).unsigned_abs();
    Some(list.items.iter().fold((0, 0), |(r, ready), d| {
        (
            r + count(d.spec.replicas),
            ready + count(d.status.as_ref().and_then(|s| s.ready_replicas)),
        )
    }))
}

/// Waits until PeerCluster `name` in `kube` has condition `type_` False with
/// `reason`, and returns its message.
pub async fn peer_condition(kube: &Client, name: &str, type_: &str, reason: &str) -> String {
    eventually(
        &format!("PeerCluster {name}: {type_}=False {reason}"),
        DEADLINE,
        || async {
            let peer = Api::<PeerCluster>::all(kube.clone()).get(name).await.ok()?;
            peer.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == type_ && c.status == "False" && c.reason == reason)
                .map(|c| c.message)
        },
    )
    .await
}

pub async fn clean_up(run: &Run, operators: BTreeMap<&'static str, Operator>) {
    peers(&["fault", "heal"]);
    if std::process::Command::new(repo_root().join("hack/peers"))
        .args(["fault", "up", "aws"])
        .output()
        .is_err()
    {
        eprintln!("could not bring aws up again");
    }
    let azure_kubeconfig = kubeconfig("azure");
    let _ = outrigger(
        "aws",
        &[
            "peer",
            "remove",
            "azure",
            "--kubeconfig",
            azure_kubeconfig.to_str().unwrap(),
            "--cluster-name",
            "aws",
            "--namespace",
            NAMESPACE,
        ],
    );
    for cluster in ["aws", "azure"] {
        let kube = run.kube(cluster);
        let _ = Api::<ModelDeployment>::namespaced(kube.clone(), &run.namespace())
            .delete(MD, &DeleteParams::default())
            .await;
    }
    // The pools go through their finalizers, which the operators release.
    for cluster in ["aws", "azure"] {
        let kube = run.kube(cluster);
        let pools: Api<GpuNodePool> = Api::all(kube.clone());
        let _ = pools
            .delete(&run.pool(cluster), &DeleteParams::default())
            .await;
        let _ = tokio::time::timeout(DEADLINE, async {
            while pools
                .get_opt(&run.pool(cluster))
                .await
                .ok()
                .flatten()
                .is_some()
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
        .await;
        let _ = Api::<Namespace>::all(kube.clone())
            .delete(&run.namespace(), &DeleteParams::default())
            .await;
    }
    for (_, operator) in operators {
        operator.stop().await;
    }
}
