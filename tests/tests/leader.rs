//! Two `outrigger run` processes: exactly one acts; kill it and the other takes
//! over within the Lease duration, with no writes from both at once.

use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use outrigger_crds::ModelDeployment;
use outrigger_tests::e2e::{self, Fleet, Operator, PoolSpec, TestNamespace, wait_for};
use serde_json::json;

#[tokio::test]
#[ignore = "needs the local cluster: hack/e2e runs it"]
async fn one_leader_acts_and_a_standby_takes_over() {
    if !e2e::enabled("one_leader_acts_and_a_standby_takes_over") {
        return;
    }
    let _turn = e2e::serial().await;
    let client = e2e::client().await;
    let pool = format!("leader-{}", e2e::suffix());
    let region = format!("us-{pool}");
    let fleet = Fleet::new(
        &client,
        &[PoolSpec {
            name: &pool,
            provider: "aws",
            region: &region,
            zone: &format!("{region}a"),
            nodes: 1,
            gpus_per_node: 8,
            price: 1.0,
        }],
    )
    .await;
    let ns = TestNamespace::new(&client, "leader").await;
    let first = Operator::start("first", &[]).await;
    first.wait_leading().await;
    let second = Operator::start("second", &[]).await;
    // The standby serves but does not lead.
    wait_for(
        "the standby to serve metrics",
        Duration::from_secs(20),
        || async { second.metric("outrigger_leader").await.map(|_| ()) },
    )
    .await;
    assert!(
        first.leading().await && !second.leading().await,
        "exactly one leads"
    );

    let from = e2e::audit_log_len();
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let region = fleet.regions()[0].clone();
    let md = |name: &str, replicas: i32| -> ModelDeployment {
        serde_json::from_value(json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "gpu": {"count": 1}, "placement": {"regions": [region]},
                "template": {"spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.4"}]}}}
        }))
        .expect("valid")
    };
    api.create(&PostParams::default(), &md("before", 2))
        .await
        .expect("created");
    e2e::kubectl(&[
        "wait",
        "--for=condition=Ready",
        "md/before",
        "-n",
        &ns.name,
        "--timeout=60s",
    ]);
    let standby_writes = e2e::writes_since(
        from,
        &format!("outrigger/{} second", env!("CARGO_PKG_VERSION")),
    );
    assert!(
        standby_writes.is_empty(),
        "the standby wrote: {standby_writes:?}"
    );
    assert!(
        !e2e::writes_since(
            from,
            &format!("outrigger/{} first", env!("CARGO_PKG_VERSION"))
        )
        .is_empty(),
        "the leader acted"
    );

    let killed = Instant::now();
    first.kill().await;
    second.wait_leading().await;
    let takeover = killed.elapsed();
    println!(
        "takeover: {:.1} s after the leader was killed (Lease duration 15 s)",
        takeover.as_secs_f64()
    );
    // The Lease lasts 15 s and a standby retries every 2 s.
    assert!(
        takeover <= Duration::from_secs(20),
        "takeover took {takeover:?}"
    );

    let after = e2e::audit_log_len();
    api.create(&PostParams::default(), &md("after", 2))
        .await
        .expect("created");
    e2e::kubectl(&[
        "wait",
        "--for=condition=Ready",
        "md/after",
        "-n",
        &ns.name,
        "--timeout=60s",
    ]);
    let old_leader_writes = e2e::writes_since(
        after,
        &format!("outrigger/{} first", env!("CARGO_PKG_VERSION")),
    );
    assert!(
        old_leader_writes.is_empty(),
        "the dead leader wrote: {old_leader_writes:?}"
    );

    second.stop().await;
    ns.delete().await;
    fleet.delete().await;
}
