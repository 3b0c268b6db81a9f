//! Smoke test of the several-clusters test bed (`hack/peers up`, clusters `aws` and
//! `azure`): machines become Nodes of the cluster their tag names and run GPU pods
//! there; a cluster taken down keeps its data when it comes back; a partition cuts
//! the peer link between two clusters (refused, or accepted and never answered)
//! and nothing else, and healing opens it again. Its fresh clusters also show an
//! operator started before the CRDs exist: it says how to install them, and
//! starts once they are.
//!
//! Runs only with `OUTRIGGER_PEERS_E2E=1` and the environment of `hack/e2e-peers`
//! (`OUTRIGGER_PEERS_DIR` and the simulators of `eval "$(hack/peers env aws)"`);
//! otherwise it says why and passes. Everything it creates has a name of its own
//! and is removed at the end, also when it fails.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_ec2::types::{InstanceType, Placement, ResourceType, Tag, TagSpecification};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::config::Kubeconfig;
use kube::{Api, Client, ResourceExt};
use outrigger_crds::{CLUSTER_TAG, POOL_LABEL};
use outrigger_tests::e2e::{Operator, SimClouds};
use outrigger_tests::harness::{eventually, repo_root};
use outrigger_tests::peers;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Nodes appear after the boot delay (2 s) and a registrar pass; a cluster comes
/// back in a few seconds. Generous, as the machine may be busy.
const DEADLINE: Duration = Duration::from_secs(90);
/// How long a client waits on a blackholed link before it gives up.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
const AWS_ZONE: &str = "us-east-1a";
const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000peer5";

fn requested() -> bool {
    peers::requested("peers_smoke")
}

fn peers_dir() -> PathBuf {
    peers::dir()
}

/// A client of cluster `name`, at its own API server or at `server`.
async fn client(name: &str, server: Option<&str>) -> Client {
    peers::client(name, server, CLIENT_TIMEOUT).await
}

/// `hack/peers ARGS...`; its stdout, panicking with its stderr when it fails.
fn peers(args: &[&str]) -> String {
    peers::hack(args)
}

struct Run {
    suffix: String,
    aws: Client,
    azure: Client,
    sim: SimClouds,
    ec2: aws_sdk_ec2::Client,
}

impl Run {
    fn pool(&self, cluster: &str) -> String {
        format!("peers-smoke-{cluster}-{}", self.suffix)
    }
    fn namespace(&self) -> String {
        format!("peers-smoke-{}", self.suffix)
    }
    fn scale_set(&self) -> String {
        format!("peerssmoke{}", self.suffix)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the clusters of hack/peers: hack/e2e-peers runs it"]
async fn two_clusters_share_the_clouds_and_can_be_lost_and_cut_apart() {
    if !requested() {
        return;
    }
    let sim = SimClouds::from_env();
    let run = Run {
        suffix: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        aws: client("aws", None).await,
        azure: client("azure", None).await,
        ec2: sim.ec2("us-east-1").await,
        sim,
    };
    let outcome = AssertUnwindSafe(steps(&run)).catch_unwind().await;
    clean_up(&run).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn steps(run: &Run) {
    an_operator_without_crds_says_how_to_install_them(run).await;
    machines_become_nodes_of_their_own_cluster_and_run_gpu_pods(run).await;
    an_outage_takes_a_providers_nodes_down_in_whichever_cluster(run).await;
    a_cluster_taken_down_comes_back_with_its_data(run).await;
    for mode in ["refuse", "blackhole"] {
        a_partition_cuts_the_peer_link_only(run, mode).await;
    }
}

/// On the `aws` cluster, fresh from `hack/peers up` with no CRDs yet (hack/e2e-peers
/// applies none): the operator names what is missing and the fix, stays unready, and
/// starts its controllers once the CRDs are created. Then both clusters get them.
async fn an_operator_without_crds_says_how_to_install_them(run: &Run) {
    let crds: Api<CustomResourceDefinition> = Api::all(run.aws.clone());
    assert!(
        crds.get_opt("modeldeployments.outrigger.dev")
            .await
            .expect("read CRDs")
            .is_none(),
        "this step needs a cluster without the CRDs"
    );
    let operator = Operator::start("no-crds", &[]).await;
    let log = || std::fs::read_to_string(&operator.log).unwrap_or_default();
    eventually(
        "the operator to name the missing CRDs",
        DEADLINE,
        || async { log().contains("kubectl apply -f crds/").then_some(()) },
    )
    .await;
    let ready = reqwest::get(operator.metrics_url.replace("/metrics", "/readyz"))
        .await
        .expect("readyz answers");
    assert!(!ready.status().is_success(), "not ready without the CRDs");
    assert!(
        !log().contains("404 page not found"),
        "no cryptic watch errors: {}",
        log()
    );
    for kube in [&run.aws, &run.azure] {
        let api: Api<CustomResourceDefinition> = Api::all(kube.clone());
        for crd in outrigger_crds::crds() {
            match api.create(&PostParams::default(), &crd).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => panic!("create CRD {}: {e}", crd.name_any()),
            }
        }
    }
    eventually("the controllers to start", DEADLINE, || async {
        log().contains("CRDs are installed now").then_some(())
    })
    .await;
    eventually("the operator ready", DEADLINE, || async {
        reqwest::get(operator.metrics_url.replace("/metrics", "/readyz"))
            .await
            .ok()?
            .status()
            .is_success()
            .then_some(())
    })
    .await;
    operator.stop().await;
}

async fn nodes_of(kube: &Client, pool: &str) -> Vec<Node> {
    let nodes: Api<Node> = Api::all(kube.clone());
    nodes
        .list(&ListParams::default().labels(&format!("{POOL_LABEL}={pool}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

async fn machines_become_nodes_of_their_own_cluster_and_run_gpu_pods(run: &Run) {
    let aws_pool = run.pool("aws");
    let azure_pool = run.pool("azure");
    run.ec2
        .run_instances()
        .image_id("ami-12345678")
        .instance_type(InstanceType::from("p5.48xlarge"))
        .placement(Placement::builder().availability_zone(AWS_ZONE).build())
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key(POOL_LABEL).value(&aws_pool).build())
                .tags(Tag::builder().key(CLUSTER_TAG).value("aws").build())
                .build(),
        )
        .send()
        .await
        .expect("RunInstances");
    run.sim
        .control
        .create_scale_set(json!({
            "subscriptionId": SUBSCRIPTION, "resourceGroup": run.namespace(),
            "name": run.scale_set(), "location": "eastus",
            "sku": "Standard_ND96isr_H100_v5", "zones": ["1"], "capacity": 1,
            "pool": azure_pool, "cluster": "azure",
        }))
        .await;

    for (kube, other, pool) in [
        (&run.aws, &run.azure, &aws_pool),
        (&run.azure, &run.aws, &azure_pool),
    ] {
        let node = eventually(&format!("a Node of pool {pool}"), DEADLINE, || async {
            nodes_of(kube, pool).await.into_iter().next()
        })
        .await;
        assert!(
            nodes_of(other, pool).await.is_empty(),
            "the Node of {pool} must be in its own cluster only"
        );
        run_gpu_pod(kube, &run.namespace(), pool, &node.name_any()).await;
    }
}

/// A pod asking for one GPU lands on `node` (the pool's only Node) and runs.
async fn run_gpu_pod(kube: &Client, namespace: &str, pool: &str, node: &str) {
    let namespaces: Api<Namespace> = Api::all(kube.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {namespace}: {e}"),
    }
    let pods: Api<Pod> = Api::namespaced(kube.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "gpu"},
        "spec": {
            "nodeSelector": {POOL_LABEL: pool},
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "server", "image": "inference:1",
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }))
    .unwrap();
    // The namespace's default ServiceAccount comes a moment after the namespace.
    eventually(
        &format!("pod gpu created in {namespace}"),
        DEADLINE,
        || async {
            match pods.create(&PostParams::default(), &pod).await {
                Ok(_) => Some(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Some(()),
                Err(_) => None,
            }
        },
    )
    .await;
    eventually(&format!("pod gpu Running on {node}"), DEADLINE, || async {
        let p = pods.get("gpu").await.ok()?;
        let spec_node = p.spec.as_ref()?.node_name.as_deref()?;
        let phase = p.status.as_ref()?.phase.as_deref()?;
        (spec_node == node && phase == "Running").then_some(())
    })
    .await;
}

/// The Ready condition of the pool's only Node, in `kube`.
async fn ready_of(kube: &Client, pool: &str) -> Option<String> {
    let node = nodes_of(kube, pool).await.into_iter().next()?;
    node.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status)
}

async fn an_outage_takes_a_providers_nodes_down_in_whichever_cluster(run: &Run) {
    run.sim
        .control
        .outage(json!({"provider": "azure", "region": "eastus"}))
        .await;
    let pool = run.pool("azure");
    eventually(
        "the azure Node NotReady in cluster azure",
        DEADLINE,
        || async {
            ready_of(&run.azure, &pool)
                .await
                .filter(|s| s != "True")
                .map(|_| ())
        },
    )
    .await;
    assert_eq!(
        ready_of(&run.aws, &run.pool("aws")).await.as_deref(),
        Some("True"),
        "an azure outage leaves the aws cluster's Nodes alone"
    );
    run.sim.control.recover("azure").await;
    eventually("the azure Node Ready again", DEADLINE, || async {
        ready_of(&run.azure, &pool)
            .await
            .filter(|s| s == "True")
            .map(|_| ())
    })
    .await;
}

async fn a_cluster_taken_down_comes_back_with_its_data(run: &Run) {
    let maps: Api<ConfigMap> = Api::namespaced(run.aws.clone(), &run.namespace());
    let map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "kept"}, "data": {"answer": "42"},
    }))
    .unwrap();
    maps.create(&PostParams::default(), &map)
        .await
        .expect("create the ConfigMap");

    // Down through the control API, up through the script: both are the interface.
    run.sim
        .control
        .call(reqwest::Method::POST, "/clusters/aws/down", None)
        .await;
    eventually(
        "the API server of a cluster that is down to refuse connections",
        DEADLINE,
        || async { TcpStream::connect(api_addr("aws")).await.err().map(|_| ()) },
    )
    .await;
    let namespaces: Api<Namespace> = Api::all(run.azure.clone());
    namespaces
        .get(&run.namespace())
        .await
        .expect("the other cluster still serves");

    peers(&["fault", "up", "aws"]);
    let kept = eventually("the ConfigMap after up", DEADLINE, || async {
        maps.get("kept").await.ok()
    })
    .await;
    assert_eq!(
        kept.data.and_then(|d| d.get("answer").cloned()).as_deref(),
        Some("42")
    );
    assert_eq!(
        nodes_of(&run.aws, &run.pool("aws")).await.len(),
        1,
        "the Nodes stay as they were"
    );
}

/// The loopback address of cluster `name`'s own API server.
fn api_addr(name: &str) -> String {
    let path = peers_dir().join(name).join("kubeconfig");
    let file = Kubeconfig::read_from(&path).expect("kubeconfig");
    let server = file.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("a server URL");
    server.trim_start_matches("https://").to_string()
}

async fn a_partition_cuts_the_peer_link_only(run: &Run, mode: &str) {
    let link = peers(&["env", "aws", "--peer", "azure"]);
    let link_addr = link.trim_start_matches("https://").to_string();
    let through_link = client("azure", Some(&link)).await;
    let namespaces: Api<Namespace> = Api::all(through_link);
    namespaces
        .get(&run.namespace())
        .await
        .expect("azure through the open link");

    // A connection open before the partition is cut by it too.
    let mut open = TcpStream::connect(&link_addr)
        .await
        .expect("connect the link");
    peers(&["fault", "partition", "aws", "azure", "--mode", mode]);

    match mode {
        "refuse" => {
            eventually("the cut link to refuse connections", DEADLINE, || async {
                TcpStream::connect(&link_addr).await.is_err().then_some(())
            })
            .await;
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(DEADLINE, open.read(&mut buf))
                .await
                .expect("the open connection ends");
            assert!(
                matches!(read, Ok(0) | Err(_)),
                "a refused link resets its open connections: {read:?}"
            );
        }
        _ => {
            let mut fresh = TcpStream::connect(&link_addr)
                .await
                .expect("a blackholed link accepts");
            fresh.write_all(b"\x16\x03\x01").await.expect("write");
            let mut buf = [0u8; 1];
            assert!(
                tokio::time::timeout(CLIENT_TIMEOUT, fresh.read(&mut buf))
                    .await
                    .is_err(),
                "a blackholed link never answers"
            );
            let result = namespaces.get(&run.namespace()).await;
            assert!(result.is_err(), "a client through the blackhole times out");
        }
    }

    // Nothing else is cut: each cluster reaches its own API, and the clouds answer.
    for kube in [&run.aws, &run.azure] {
        let own: Api<Namespace> = Api::all(kube.clone());
        own.get(&run.namespace()).await.expect("its own API server");
    }
    run.sim.control.state().await;

    peers(&["fault", "heal", "aws", "azure"]);
    eventually("azure through the healed link", DEADLINE, || async {
        namespaces.get(&run.namespace()).await.ok()
    })
    .await;
    drop(open);
}

async fn clean_up(run: &Run) {
    // Whatever failed, leave the bed whole: the link open, aws up.
    let _ = std::process::Command::new(repo_root().join("hack/peers"))
        .args(["fault", "heal"])
        .output();
    if TcpStream::connect(api_addr("aws")).await.is_err() {
        let _ = std::process::Command::new(repo_root().join("hack/peers"))
            .args(["fault", "up", "aws"])
            .output();
    }
    outrigger_tests::e2e::terminate_pool_instances(&run.ec2, &run.pool("aws")).await;
    // Not Control::delete_scale_set, which panics when the scale set is already gone.
    let _ = reqwest::Client::new()
        .delete(format!(
            "{}/azure/scalesets/{SUBSCRIPTION}/{}/{}",
            run.sim.control_url,
            run.namespace(),
            run.scale_set()
        ))
        .send()
        .await;
    for kube in [&run.aws, &run.azure] {
        let namespaces: Api<Namespace> = Api::all(kube.clone());
        let _ = namespaces
            .delete(&run.namespace(), &DeleteParams::default())
            .await;
    }
    for (kube, pool) in [(&run.aws, run.pool("aws")), (&run.azure, run.pool("azure"))] {
        let _ = eventually(&format!("the Nodes of {pool} gone"), DEADLINE, || async {
            nodes_of(kube, &pool).await.is_empty().then_some(())
        })
        .await;
    }
}
