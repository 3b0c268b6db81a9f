//! Whole reconciles against a mocked API server (`tower-test`) and the fake cloud:
//! the requests each pass sends, in order, and what it leaves out.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use outrigger_crds::{GpuNodePool, ModelDeployment, Provider};
use serde_json::json;

use super::apply::Applier;
use super::{Clock, Context, Stores, model_deployment, scaler};
use crate::cloud::fake::FakeCloud;
use crate::cloud::{CloudError, CloudProvider, Clouds, ErrorKind, Launch};
use crate::telemetry::Metrics;

/// One request the mocked API server received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    content_type: String,
    body: serde_json::Value,
}

impl Seen {
    fn is_write(&self) -> bool {
        self.method != "GET"
    }

    fn describe(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// An API server that answers every request: an object write with the object it
/// was sent (so a server-side apply or an Event comes back as applied), a JSON patch
/// (the finalizer) with `patched`. It records every request.
fn api_server(patched: serde_json::Value) -> (Client, Arc<Mutex<Vec<Seen>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(json!(null));
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let path = parts.uri.path().to_string();
            let mut answer = if content_type.contains("json-patch") {
                patched.clone()
            } else {
                body.clone()
            };
            // An object comes back with its name, as the API server would.
            if let Some(object) = answer.as_object_mut() {
                let name = path.rsplit('/').find(|s| *s != "status").unwrap_or("x");
                let meta = object.entry("metadata").or_insert_with(|| json!({}));
                if meta.get("name").is_none() {
                    meta["name"] = json!(name);
                }
            }
            record.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                path,
                content_type,
                body,
            });
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(service, "default"), seen)
}

fn store_of<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

/// A time the tests move by hand.
#[derive(Clone)]
struct Hands(Arc<Mutex<Timestamp>>);

impl Hands {
    fn at(t: &str) -> Hands {
        Hands(Arc::new(Mutex::new(t.parse().unwrap())))
    }

    fn set(&self, t: &str) {
        *self.0.lock().unwrap() = t.parse().unwrap();
    }

    fn clock(&self) -> Clock {
        let hands = self.0.clone();
        Arc::new(move || *hands.lock().unwrap())
    }
}

fn context(
    client: Client,
    pools: Vec<GpuNodePool>,
    deployments: Vec<Deployment>,
    clouds: Clouds,
    hands: &Hands,
) -> Arc<Context> {
    let metrics = Arc::new(Metrics::new());
    Arc::new(Context {
        stores: Stores::new(
            store_of(pools),
            store_of(Vec::new()),
            store_of(Vec::new()),
            store_of(deployments),
            store_of(Vec::new()),
            store_of(Vec::new()),
            Arc::default(),
        ),
        applier: Applier::new(client.clone(), metrics.clone()),
        metrics,
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "outrigger".into(),
                instance: None,
            },
        ),
        clouds,
        clock: hands.clock(),
        reclaim_backoff: std::time::Duration::from_secs(180),
        peers: None,
    })
}

fn md() -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "outrigger.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llm", "namespace": "ns", "uid": "u-md", "generation": 1},
        "spec": {"replicas": 4, "gpu": {"count": 8},
                 "placement": {"spread": [{"by": "provider", "minGroups": 2, "maxShare": 60}]},
                 "template": {"spec": {"containers": [{"name": "server", "image": "vllm"}]}}}
    }))
    .unwrap()
}

fn pool(name: &str, provider: &str, extra: serde_json::Value) -> GpuNodePool {
    let mut pool = json!({
        "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
        "metadata": {"name": name, "uid": format!("u-{name}"), "generation": 1},
        "spec": {"provider": provider, "region": "us-east-1", "instanceType": "p5.48xlarge",
                 "gpu": {"type": "H100", "count": 8}, "nodes": {"min": 0, "max": 4}}
    });
    merge(&mut pool, extra);
    serde_json::from_value(pool).unwrap()
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

async fn reconcile_md(ctx: &Arc<model_deployment::Ctx>, md: &ModelDeployment) {
    model_deployment::reconcile(Arc::new(DeserializeGuard(Ok(md.clone()))), ctx.clone())
        .await
        .expect("the pass succeeds");
}

#[tokio::test]
async fn the_first_placement_writes_its_children_and_status_in_one_step() {
    let (client, seen) = api_server(json!({}));
    let hands = Hands::at("2026-01-01T00:00:00Z");
    // Two scalable pools with no nodes yet: the plan grows both.
    let scaling = json!({"spec": {"scaling": {"aws": {"launchTemplate": {"name": "t"}}}}});
    let pools = vec![
        pool("aws-a", "aws", scaling.clone()),
        pool(
            "azure-a",
            "azure",
            json!({"spec": {"scaling": {"azure": {"subscriptionId": "s", "resourceGroup": "g", "scaleSetName": "v"}}}}),
        ),
    ];
    let shared = context(client, pools, Vec::new(), Clouds::default(), &hands);
    let ctx = Arc::new(model_deployment::Ctx::new(shared));
    reconcile_md(&ctx, &md()).await;
    let writes: Vec<Seen> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.is_write())
        .cloned()
        .collect();
    let order: Vec<String> = writes.iter().map(Seen::describe).collect();
    // One step, together: both Deployments, the budget (no Service is asked
    // for) and the status; nothing shrinks, so nothing waits.
    let mut first: Vec<&str> = order[..4]
        .iter()
        .map(|p| p.trim_end_matches("/status").rsplit('/').nth(1).unwrap())
        .collect();
    first.sort_unstable();
    assert_eq!(
        first,
        [
            "deployments",
            "deployments",
            "modeldeployments",
            "poddisruptionbudgets"
        ],
        "{order:?}"
    );
    assert!(
        writes[..4]
            .iter()
            .all(|s| s.content_type.starts_with("application/apply-patch")),
        "server-side apply"
    );
    let replicas: Vec<i64> = writes[..4]
        .iter()
        .filter(|s| s.path.contains("/deployments/"))
        .map(|s| s.body["spec"]["replicas"].as_i64().unwrap())
        .collect();
    assert_eq!(replicas, [2, 2], "the 60% cap: 2 and 2");
    assert!(
        order[4..].iter().all(|p| p.contains("/events")),
        "{order:?}"
    );
}

#[tokio::test]
async fn a_converged_pass_writes_nothing() {
    // The first pass, against one server; its writes become the caches of the next.
    let (client, seen) = api_server(json!({}));
    let hands = Hands::at("2026-01-01T00:00:00Z");
    let scaling = json!({"spec": {"scaling": {"aws": {"launchTemplate": {"name": "t"}}}}});
    let pools = vec![
        pool("aws-a", "aws", scaling.clone()),
        pool("azure-a", "azure", scaling),
    ];
    let first = Arc::new(model_deployment::Ctx::new(context(
        client,
        pools.clone(),
        Vec::new(),
        Clouds::default(),
        &hands,
    )));
    let mut md = md();
    reconcile_md(&first, &md).await;
    let written = seen.lock().unwrap().clone();
    let children: Vec<Deployment> = written
        .iter()
        .filter(|s| s.path.contains("/deployments/"))
        .map(|s| serde_json::from_value(s.body.clone()).unwrap())
        .collect();
    let budget: k8s_openapi::api::policy::v1::PodDisruptionBudget = written
        .iter()
        .find(|s| s.path.contains("/poddisruptionbudgets/"))
        .map(|s| serde_json::from_value(s.body.clone()).unwrap())
        .unwrap();
    md.status = written
        .iter()
        .find(|s| s.path.ends_with("/status"))
        .map(|s| serde_json::from_value(s.body["status"].clone()).unwrap());

    // The children the first pass wrote, as the watch shows them.
    let converged = |client| {
        let shared = context(
            client,
            pools.clone(),
            children.clone(),
            Clouds::default(),
            &hands,
        );
        Arc::new(model_deployment::Ctx::new(Arc::new(Context {
            stores: Stores::new(
                shared.stores.pools.clone(),
                shared.stores.nodes.clone(),
                shared.stores.pods.clone(),
                shared.stores.deployments.clone(),
                store_of(Vec::new()),
                store_of(vec![budget.clone()]),
                Arc::default(),
            ),
            applier: shared.applier.clone(),
            metrics: shared.metrics.clone(),
            recorder: shared.recorder.clone(),
            clouds: Clouds::default(),
            clock: hands.clock(),
            reclaim_backoff: std::time::Duration::from_secs(180),
            peers: None,
        })))
    };
    let writes = |seen: &Arc<std::sync::Mutex<Vec<Seen>>>| -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|s| s.is_write())
            .map(Seen::describe)
            .collect()
    };
    // The first pass published the children it wrote (status.children).
    assert_eq!(
        serde_json::to_value(md.status.as_ref().unwrap()).unwrap()["children"],
        json!([
            {"pool": "aws-a", "replicas": 2, "readyReplicas": 0, "gpusPerReplica": 8},
            {"pool": "azure-a", "replicas": 2, "readyReplicas": 0, "gpusPerReplica": 8},
        ])
    );
    let (client, seen) = api_server(json!({}));
    reconcile_md(&converged(client), &md).await;
    let writes = writes(&seen);
    assert!(writes.is_empty(), "a converged pass wrote {writes:?}");
}

fn capacity_error() -> CloudError {
    CloudError::new(
        ErrorKind::InsufficientCapacity,
        "launch",
        "InsufficientInstanceCapacity",
        "no p5.48xlarge in us-east-1a",
    )
}

/// A child Deployment of 2 replicas of 8 GPUs on `pool`: two nodes' worth.
fn child_on(pool: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": format!("llm-{pool}"), "namespace": "ns",
                     "labels": {"outrigger.dev/deployment": "llm", "outrigger.dev/pool": pool}},
        "spec": {"replicas": 2, "selector": {},
                 "template": {"spec": {"containers": [{"name": "server",
                     "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}}
    }))
    .unwrap()
}

fn scaler_ctx(shared: Arc<Context>) -> Arc<scaler::Ctx> {
    Arc::new(scaler::Ctx::new(
        shared,
        scaler::Settings {
            cooldown: std::time::Duration::from_secs(300),
            boot_grace: std::time::Duration::from_secs(900),
            backoff: std::time::Duration::from_secs(180),
        },
    ))
}

fn aws_only(fake: &FakeCloud) -> Clouds {
    Clouds {
        aws: Some(Arc::new(fake.clone())),
        azure: None,
    }
}

/// The status the scaler last applied to pool `aws-a`.
fn last_pool_status(seen: &Mutex<Vec<Seen>>) -> Option<serde_json::Value> {
    seen.lock()
        .unwrap()
        .iter()
        .rev()
        .find(|s| s.path.ends_with("/gpunodepools/aws-a/status"))
        .map(|s| s.body["status"].clone())
}

fn launches(fake: &FakeCloud) -> usize {
    fake.calls()
        .iter()
        .filter(|c| c.operation == "launch")
        .count()
}

#[tokio::test]
async fn a_capacity_error_blocks_launches_until_its_backoff_ends() {
    let (client, seen) = api_server(json!({}));
    let hands = Hands::at("2026-01-01T00:00:00Z");
    let fake = FakeCloud::new(Provider::Aws);
    let aws = pool(
        "aws-a",
        "aws",
        json!({"metadata": {"finalizers": [scaler::FINALIZER]},
               "spec": {"scaling": {"aws": {"launchTemplate": {"name": "t"}}}}}),
    );
    let clouds = aws_only(&fake);
    let ctx = scaler_ctx(context(
        client,
        vec![aws.clone()],
        vec![child_on("aws-a")],
        clouds,
        &hands,
    ));
    let pool = Arc::new(aws);

    fake.fail_next("launch", capacity_error());
    scaler::reconcile(pool.clone(), ctx.clone()).await.unwrap();
    assert_eq!(launches(&fake), 1);
    let status = last_pool_status(&seen).expect("the backoff is written");
    assert_eq!(status["capacityBackoff"]["until"], "2026-01-01T00:03:00Z");
    assert_eq!(status["capacityBackoff"]["reason"], "InsufficientCapacity");
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|s| s.path.contains("/events") && s.body["reason"] == "InsufficientCapacity"),
        "a Warning Event"
    );

    // Within the backoff: no launch, however often it looks.
    for t in ["2026-01-01T00:00:30Z", "2026-01-01T00:02:59Z"] {
        hands.set(t);
        scaler::reconcile(pool.clone(), ctx.clone()).await.unwrap();
    }
    assert_eq!(launches(&fake), 1, "blocked until 00:03:00");

    // After it: the pool grows again, and the backoff is cleared.
    hands.set("2026-01-01T00:03:01Z");
    scaler::reconcile(pool.clone(), ctx.clone()).await.unwrap();
    assert_eq!(launches(&fake), 2);
    assert_eq!(fake.instances_now().len(), 2);
    let status = last_pool_status(&seen).unwrap();
    assert!(status.get("capacityBackoff").is_none(), "{status}");
    assert_eq!(status["cloudInstances"], 2);
}

#[tokio::test]
async fn release_keeps_the_finalizer_while_instances_live() {
    let (client, seen) = api_server(json!({
        "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
        "metadata": {"name": "aws-a"},
        "spec": {"provider": "aws", "region": "us-east-1", "instanceType": "p5.48xlarge",
                 "gpu": {"type": "H100", "count": 8}, "nodes": {"min": 0, "max": 4}}
    }));
    let hands = Hands::at("2026-01-01T00:00:00Z");
    let fake = FakeCloud::new(Provider::Aws);
    let launch = Launch {
        have: 0,
        add: 2,
        token: "t".into(),
    };
    fake.launch(&crate::cloud::fake::target(), &launch)
        .await
        .unwrap();
    let deleting = pool(
        "aws-a",
        "aws",
        json!({"metadata": {"finalizers": [scaler::FINALIZER],
                            "deletionTimestamp": "2026-01-01T00:00:00Z"},
               "spec": {"scaling": {"aws": {"launchTemplate": {"name": "t"}}}}}),
    );
    let clouds = aws_only(&fake);
    let ctx = scaler_ctx(context(
        client,
        vec![deleting.clone()],
        Vec::new(),
        clouds,
        &hands,
    ));
    let pool = Arc::new(deleting);
    let finalizer_writes = || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|s| s.content_type.contains("json-patch"))
            .count()
    };

    fake.fail_next(
        "terminate",
        CloudError::new(
            ErrorKind::Transient,
            "terminate",
            "InternalError",
            "try again",
        ),
    );
    assert!(scaler::reconcile(pool.clone(), ctx.clone()).await.is_err());
    assert_eq!(
        finalizer_writes(),
        0,
        "the finalizer stays while instances live"
    );
    assert!(fake.instances_now().iter().all(|i| i.live()));

    scaler::reconcile(pool.clone(), ctx.clone()).await.unwrap();
    assert!(fake.instances_now().iter().all(|i| !i.live()));
    assert_eq!(finalizer_writes(), 1, "then it goes");
}

/// A child Deployment of ModelDeployment `ns/md` in pool `aws-a` (object `uid`),
/// as applied (with `ready` Ready replicas when it has a status).
fn child_deployment(uid: &str, replicas: i32, hash: &str, ready: Option<i32>) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "md-aws-a", "namespace": "ns", "uid": uid,
                     "labels": {"outrigger.dev/deployment": "md", "outrigger.dev/pool": "aws-a",
                                "app.kubernetes.io/managed-by": "outrigger"},
                     "annotations": {"outrigger.dev/applied-hash": hash}},
        "spec": {"replicas": replicas,
                 "selector": {"matchLabels": {"outrigger.dev/deployment": "md"}},
                 "template": {"spec": {"containers": [{"name": "server", "image": "vllm",
                     "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}},
        "status": ready.map(|r| json!({"readyReplicas": r})),
    }))
    .unwrap()
}

/// Stores whose Deployment store starts with `initial`, and the Deployment watch as
/// `observe::watch` runs it: the store first, then the written children, then the
/// generation.
struct ChildWatch {
    stores: Stores,
    writer: reflector::store::Writer<Deployment>,
    written: crate::observe::written::WrittenChildren,
}

impl ChildWatch {
    fn new(initial: Deployment) -> ChildWatch {
        let (deployments, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(initial));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let written = crate::observe::written::WrittenChildren::default();
        let stores = Stores::new(
            store_of(vec![pool("aws-a", "aws", json!({}))]),
            store_of(Vec::new()),
            store_of(Vec::new()),
            deployments,
            store_of(Vec::new()),
            store_of(Vec::new()),
            Arc::default(),
        )
        .with_written(written.clone());
        ChildWatch {
            stores,
            writer,
            written,
        }
    }

    fn watch(&mut self, event: watcher::Event<Deployment>) {
        self.writer.apply_watcher_event(&event);
        match &event {
            watcher::Event::Apply(d) => self.written.seen(&d.metadata, false),
            watcher::Event::Delete(d) => self.written.seen(&d.metadata, true),
            _ => {}
        }
        self.stores
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn wrote(&self, applied: Option<Deployment>, now: Timestamp) {
        self.stores.wrote("ns", "md-aws-a", applied, now);
    }

    /// Replicas and Ready replicas of `ns/md` in pool `aws-a`, as the inventory
    /// built at `now` counts them.
    fn counted(&self, now: Timestamp) -> (Option<u32>, Option<u32>) {
        let owner = ("ns".to_string(), "md".to_string());
        let inventory = self.stores.inventory(now);
        (
            inventory.current(&owner).get("aws-a").copied(),
            inventory.ready(&owner).get("aws-a").copied(),
        )
    }
}

#[test]
fn a_written_child_counts_from_its_apply_until_the_watch_shows_it() {
    let mut w = ChildWatch::new(child_deployment("u1", 1, "old", Some(1)));
    let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
    assert_eq!(w.counted(t0), (Some(1), Some(1)));

    // Applied with 3 replicas: counted at once, with the Ready replicas the store
    // has of the same object.
    w.wrote(Some(child_deployment("u1", 3, "new", Some(1))), t0);
    assert_eq!(w.counted(t0), (Some(3), Some(1)));
    // The watch shows it: from then on the store alone counts, also a later change
    // someone else makes.
    w.watch(watcher::Event::Apply(child_deployment(
        "u1",
        3,
        "new",
        Some(2),
    )));
    assert_eq!(w.counted(t0), (Some(3), Some(2)));
    w.watch(watcher::Event::Apply(child_deployment(
        "u1",
        5,
        "theirs",
        Some(2),
    )));
    assert_eq!(w.counted(t0), (Some(5), Some(2)));

    // Deleted: gone before the watch says so.
    w.wrote(None, t0);
    assert_eq!(w.counted(t0), (None, None));
    w.watch(watcher::Event::Delete(child_deployment(
        "u1",
        5,
        "theirs",
        Some(2),
    )));
    assert_eq!(w.counted(t0), (None, None));

    // Created again, shown and deleted by someone else before the next build:
    // nothing counts.
    w.wrote(Some(child_deployment("u2", 2, "again", None)), t0);
    w.watch(watcher::Event::Apply(child_deployment(
        "u2", 2, "again", None,
    )));
    w.watch(watcher::Event::Delete(child_deployment(
        "u2", 2, "again", None,
    )));
    assert_eq!(w.counted(t0), (None, None));

    // Written while the store still holds another object of the same name: its
    // Ready replicas are not this one's.
    w.watch(watcher::Event::Apply(child_deployment(
        "u3",
        2,
        "gone-soon",
        Some(2),
    )));
    w.wrote(Some(child_deployment("u4", 2, "fresh", None)), t0);
    assert_eq!(w.counted(t0), (Some(2), Some(0)));

    // A write the watch never shows counts for 30 s, then the store does, with no
    // other change to build the inventory again.
    w.wrote(Some(child_deployment("u3", 4, "lost", None)), t0);
    assert_eq!(w.counted(t0), (Some(4), Some(2)));
    let later = t0 + std::time::Duration::from_secs(31);
    assert_eq!(w.counted(later), (Some(2), Some(2)));
}

#[test]
fn a_child_applied_again_with_the_same_spec_is_not_ended_by_the_old_ones_delete() {
    let mut w = ChildWatch::new(child_deployment("u1", 2, "same", Some(2)));
    let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
    // Deleted, then applied again with the same spec: a new object, none Ready yet.
    w.wrote(None, t0);
    w.wrote(Some(child_deployment("u2", 2, "same", None)), t0);
    assert_eq!(w.counted(t0), (Some(2), Some(0)));
    // The old object's delete arrives: the new one still counts.
    w.watch(watcher::Event::Delete(child_deployment(
        "u1",
        2,
        "same",
        Some(2),
    )));
    assert_eq!(w.counted(t0), (Some(2), Some(0)));
    // Then the new one: the store counts it.
    w.watch(watcher::Event::Apply(child_deployment(
        "u2",
        2,
        "same",
        Some(1),
    )));
    assert_eq!(w.counted(t0), (Some(2), Some(1)));
}
