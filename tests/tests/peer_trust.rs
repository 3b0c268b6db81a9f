//! The peer boundary end to end on `hack/peers` (clusters `aws` and `azure`, one
//! operator in each, registered with `outrigger peer add`, one ModelDeployment split
//! 3/2): what a peer's kubeconfig, credentials and published facts can make this
//! cluster do, and that the pair keeps serving throughout.
//!
//! - every refused kubeconfig shape gets `Reachable=False KubeconfigRefused` naming
//!   the field, and a loopback listener standing for the attacker's server records
//!   no connection (an exec command leaves no trace either);
//! - a peer publishing `status.nodes: 4294967295` (and a pool no local one could
//!   be) leaves the other operator Ready with its memory flat and its placements as
//!   they were, and the bad pool is named by `FactsValid=False`;
//! - a peer whose Lease times run 60 s behind stays Serving, and the split stays;
//! - an expired token gives `Reachable=False Forbidden` and `TokenExpiring`; a
//!   short token gives `TokenExpiring` while it still works; `peer rotate` renews
//!   the tokens in place with the split untouched;
//! - stalled watches (a proxy holding long requests) while the probe answers are
//!   started anew, and the facts flow again;
//! - `peer remove` revokes the removed peer's tokens: its kubeconfig is refused.
//!
//! Runs only with `OUTRIGGER_PEERS_E2E=1` and the environment of `hack/e2e-peers`;
//! otherwise it says why and passes. Everything it creates has a name of its own
//! and is removed at the end, also when it fails.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use outrigger_crds::{GpuNodePool, PeerCluster};
use outrigger_tests::e2e::Operator;
use outrigger_tests::harness::eventually;
use outrigger_tests::pair::*;
use serde_json::json;

fn requested() -> bool {
    outrigger_tests::peers::requested("peer_trust")
}

fn peers(args: &[&str]) -> String {
    outrigger_tests::peers::hack(args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the clusters of hack/peers: hack/e2e-peers runs it"]
async fn a_peer_can_hurt_nothing_beyond_its_share() {
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
    split_holds(run, "after set-up").await;
    refused_kubeconfigs_make_no_connection(run).await;
    a_peers_bad_facts_are_bounded_and_its_clock_does_not_count(run, operators).await;
    tokens_expire_and_rotate_in_place(run).await;
    stalled_watches_are_started_anew(run, operators).await;
    removing_the_peer_revokes_its_tokens(run).await;
}

/// 3 Ready in aws and 2 in azure, as placed at set-up.
async fn split_holds(run: &Run, when: &str) {
    let ns = run.namespace();
    eventually(&format!("the 3/2 split {when}"), DEADLINE, || async {
        let aws = share(&run.aws, &ns).await?;
        let azure = share(&run.azure, &ns).await?;
        (aws == (3, 3) && azure == (2, 2)).then_some(())
    })
    .await;
}

/// The split stays 3/2 and PeerCluster azure in aws (and aws in azure) stays
/// Reachable for all of `window`, looked at every 500 ms.
async fn split_stays(run: &Run, window: Duration, what: &str) {
    let ns = run.namespace();
    let end = Instant::now() + window;
    let mut looks = 0;
    while Instant::now() < end {
        let aws = share(&run.aws, &ns).await;
        let azure = share(&run.azure, &ns).await;
        assert_eq!(
            (aws, azure),
            (Some((3, 3)), Some((2, 2))),
            "{what}: the split stays 3/2"
        );
        for (cluster, peer) in [("aws", "azure"), ("azure", "aws")] {
            let p = Api::<PeerCluster>::all(run.kube(cluster).clone())
                .get(peer)
                .await
                .expect("the PeerCluster");
            let reachable = p
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Reachable");
            assert!(
                reachable.as_ref().is_some_and(|c| c.status == "True"),
                "{what}: PeerCluster {peer} in {cluster} stays Reachable: {reachable:?}"
            );
        }
        looks += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("{what}: split 3/2 and both peers Reachable over {window:?} ({looks} looks)");
}

/// A condition of PeerCluster `name` in `kube` with this status and reason, once
/// it shows; its message.
async fn peer_condition_is(
    kube: &Client,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> String {
    eventually(
        &format!("PeerCluster {name}: {type_}={status} {reason}"),
        DEADLINE,
        || async {
            let peer = Api::<PeerCluster>::all(kube.clone()).get(name).await.ok()?;
            peer.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == type_ && c.status == status && c.reason == reason)
                .map(|c| c.message)
        },
    )
    .await
}

/// A PeerCluster in aws named `name` whose Secret holds `kubeconfig`.
async fn bad_peer(run: &Run, name: &str, kubeconfig: &str) {
    apply_json(
        &run.aws,
        &json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": SECRET_NAMESPACE},
            "stringData": {"kubeconfig": kubeconfig},
        }),
    )
    .await;
    apply_json(
        &run.aws,
        &json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "PeerCluster",
            "metadata": {"name": name},
            "spec": {
                "kubeconfigSecretRef": {"namespace": SECRET_NAMESPACE, "name": name},
                "operatorNamespace": NAMESPACE,
            },
        }),
    )
    .await;
}

async fn drop_bad_peer(run: &Run, name: &str) {
    Api::<PeerCluster>::all(run.aws.clone())
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete a bad PeerCluster");
    let _ = Api::<Secret>::namespaced(run.aws.clone(), SECRET_NAMESPACE)
        .delete(name, &DeleteParams::default())
        .await;
}

/// Every shape a peer kubeconfig may not have, each aimed at a loopback listener
/// that stands for the attacker's server: refused by name, and never connected to.
async fn refused_kubeconfigs_make_no_connection(run: &Run) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback listener");
    let at = listener.local_addr().expect("its address");
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let accepting = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    let marker = std::env::temp_dir().join(format!("outrigger-exec-ran-{}", run.suffix));
    let ca = base64::engine::general_purpose::STANDARD.encode("not a CA");
    let kubeconfig = |cluster: &str, user: &str| {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: evil\n  cluster:\n{cluster}\nusers:\n- name: evil\n  user:\n{user}\ncontexts:\n- name: evil\n  context: {{cluster: evil, user: evil}}\ncurrent-context: evil\n"
        )
    };
    let https = format!("    server: https://{at}\n    certificate-authority-data: {ca}");
    let token = "    token: t0ken";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "exec",
            kubeconfig(
                &https,
                &format!(
                    "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n      args: [-c, 'touch {}']",
                    marker.display()
                ),
            ),
            "users[0].user.exec",
        ),
        (
            "authprovider",
            kubeconfig(&https, "    auth-provider: {name: oidc, config: {idp-issuer-url: 'https://127.0.0.1:1'}}"),
            "users[0].user.auth-provider",
        ),
        (
            "tokenfile",
            kubeconfig(
                &https,
                "    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token",
            ),
            "users[0].user.tokenFile",
        ),
        (
            "certfiles",
            kubeconfig(&https, "    client-certificate: /etc/ssl/c.crt\n    client-key: /etc/ssl/c.key"),
            "users[0].user.client-certificate",
        ),
        (
            "password",
            kubeconfig(&https, "    password: hunter2\n    token: t0ken"),
            "users[0].user.password",
        ),
        (
            "cafile",
            kubeconfig(
                &format!("    server: https://{at}\n    certificate-authority: /etc/ssl/ca.crt"),
                token,
            ),
            "clusters[0].cluster.certificate-authority",
        ),
        (
            "insecure",
            kubeconfig(&format!("{https}\n    insecure-skip-tls-verify: true"), token),
            "clusters[0].cluster.insecure-skip-tls-verify",
        ),
        (
            "proxy",
            kubeconfig(&format!("{https}\n    proxy-url: http://{at}"), token),
            "clusters[0].cluster.proxy-url",
        ),
        (
            "plaintext",
            kubeconfig(&format!("    server: http://{at}\n    certificate-authority-data: {ca}"), token),
            "clusters[0].cluster.server",
        ),
        (
            "twoclusters",
            kubeconfig(&https, token).replace(
                "users:\n",
                &format!("- name: other\n  cluster: {{server: 'https://{at}', certificate-authority-data: {ca}}}\nusers:\n"),
            ),
            "clusters",
        ),
    ];
    let name = |case: &str| format!("trust-{case}-{}", run.suffix);
    for (case, text, _) in &cases {
        bad_peer(run, &name(case), text).await;
    }
    for (case, _, field) in &cases {
        let message = peer_condition_is(
            &run.aws,
            &name(case),
            "Reachable",
            "False",
            "KubeconfigRefused",
        )
        .await;
        assert!(
            message.contains(field) && message.contains("no connection was made"),
            "{case}: the message names {field}: {message}"
        );
        println!("refused {case}: {message}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "no refused kubeconfig made a connection to {at}"
    );
    assert!(!marker.exists(), "the exec command never ran");
    println!(
        "{} refused kubeconfigs, {} connections to the listener at {at}, exec marker absent",
        cases.len(),
        connections.load(Ordering::SeqCst)
    );
    split_stays(run, Duration::from_secs(3), "beside refused kubeconfigs").await;
    for (case, _, _) in &cases {
        drop_bad_peer(run, &name(case)).await;
    }
    accepting.abort();
}

/// Stands in for azure's stopped operator: renews its leader Lease every 2 s with
/// times `behind` the real ones, as an operator on a slow clock would. Stops when
/// aborted, or after 10 minutes.
fn stand_in_for_the_leader(azure: Client, behind: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let leases: Api<Lease> = Api::namespaced(azure, NAMESPACE);
        for _ in 0..300 {
            if let Ok(mut lease) = leases.get("outrigger-leader").await {
                let spec = lease.spec.get_or_insert_default();
                spec.holder_identity = Some("peers-azure".into());
                spec.renew_time = Some(MicroTime(
                    k8s_openapi::jiff::Timestamp::now()
                        - k8s_openapi::jiff::SignedDuration::try_from(behind).unwrap(),
                ));
                let _ = leases
                    .replace("outrigger-leader", &PostParams::default(), &lease)
                    .await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// With azure's operator stopped and its Lease renewed 60 s behind by the test,
/// azure publishes a pool with `status.nodes: 4294967295` and one with 100 000
/// GPUs a node. aws stays Ready with flat memory and the same placements, names the
/// bad pool, and keeps azure Serving.
async fn a_peers_bad_facts_are_bounded_and_its_clock_does_not_count(
    run: &Run,
    operators: &mut BTreeMap<&'static str, Operator>,
) {
    let aws_pid = operators["aws"].pid().expect("the aws operator's pid");
    let before = rss_kib(aws_pid);
    // Killed, not stopped: the Lease keeps its holder, which the stand-in renews.
    operators
        .remove("azure")
        .expect("the azure operator")
        .kill()
        .await;
    let stand_in = stand_in_for_the_leader(run.azure.clone(), Duration::from_secs(60));
    let huge = format!("trust-huge-{}", run.suffix);
    let wide = format!("trust-wide-{}", run.suffix);
    for (name, gpus) in [(&huge, 8), (&wide, 100_000)] {
        apply_json(
            &run.azure,
            &json!({
                "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
                "metadata": {"name": name},
                "spec": {"provider": "azure", "region": "eastus", "zone": "1",
                         "instanceType": "Standard_ND96isr_H100_v5",
                         "gpu": {"type": "B200", "count": gpus}, "nodes": {"min": 0, "max": 4}},
            }),
        )
        .await;
    }
    Api::<GpuNodePool>::all(run.azure.clone())
        .patch_status(
            &huge,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "nodes": u32::MAX, "readyNodes": u32::MAX,
                "gpus": {"allocatable": u32::MAX, "requested": 0},
            }})),
        )
        .await
        .expect("publish a huge node count");
    let message = peer_condition_is(
        &run.aws,
        "azure",
        "FactsValid",
        "False",
        "PeerFactsRejected",
    )
    .await;
    assert!(
        message.contains(&wide) && message.contains("spec.gpu.count") && !message.contains(&huge),
        "FactsValid names the pool with 100 000 GPUs a node, not the clamped one: {message}"
    );
    println!("azure's bad pool named: {message}");
    // Placements unchanged, azure Serving, while its Lease times are 60 s behind:
    // longer than three times unreachableAfterSeconds.
    split_stays(
        run,
        Duration::from_secs(u64::from(UNREACHABLE_AFTER) * 3),
        "azure's Lease 60 s behind, huge counts published",
    )
    .await;
    let after = rss_kib(aws_pid);
    let ready = reqwest::get(operators["aws"].metrics_url.replace("/metrics", "/readyz"))
        .await
        .is_ok_and(|r| r.status().is_success());
    assert!(ready, "the aws operator stays Ready");
    println!(
        "aws operator RSS {:.1} MiB before, {:.1} MiB after azure published status.nodes {} ({:+.1} MiB)",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        u32::MAX,
        (after as f64 - before as f64) / 1024.0
    );
    assert!(
        after < before + 10 * 1024,
        "the aws operator's memory stays within 10 MiB: {before} KiB -> {after} KiB"
    );
    for name in [&huge, &wide] {
        Api::<GpuNodePool>::all(run.azure.clone())
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete a bad pool");
    }
    stand_in.abort();
    operators.insert("azure", start_operator("azure").await);
    peer_condition_is(&run.aws, "azure", "FactsValid", "True", "PeerFactsAccepted").await;
    split_holds(run, "after azure's operator is back").await;
}

/// An expired token: Forbidden, and TokenExpiring says it expired. A short one:
/// TokenExpiring while it still works. `peer rotate` renews both sides' tokens in
/// place, with the split untouched.
async fn tokens_expire_and_rotate_in_place(run: &Run) {
    // A token whose exp claim is an hour past (its signature is nobody's): the
    // API server refuses it, and its expiry is read from it.
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let exp = k8s_openapi::jiff::Timestamp::now().as_second() - 3600;
    let expired = format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(json!({"alg": "RS256", "kid": "e2e"})),
        b64(
            json!({"exp": exp, "iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:default:nobody"})
        )
    );
    let real = peer_kubeconfig(&run.aws, "azure").await;
    let mut doc: serde_json::Value = serde_saphyr::from_str(&real).expect("the peer kubeconfig");
    doc["users"][0]["user"]["token"] = json!(expired);
    let name = format!("trust-expired-{}", run.suffix);
    bad_peer(run, &name, &doc.to_string()).await;
    let forbidden = peer_condition_is(&run.aws, &name, "Reachable", "False", "Forbidden").await;
    let expiring =
        peer_condition_is(&run.aws, &name, "TokenExpiring", "True", "TokenExpired").await;
    println!(
        "expired token: Reachable=False Forbidden: {forbidden}; TokenExpiring=True: {expiring}"
    );
    drop_bad_peer(run, &name).await;

    let azure_kubeconfig = outrigger_tests::peers::kubeconfig("azure");
    let rotate = |ttl: &'static str| {
        let file = azure_kubeconfig.clone();
        async move {
            let file = file.to_str().unwrap().to_string();
            outrigger(
                "aws",
                &[
                    "peer",
                    "rotate",
                    "azure",
                    "--kubeconfig",
                    &file,
                    "--cluster-name",
                    "aws",
                    "--namespace",
                    NAMESPACE,
                    "--token-ttl",
                    ttl,
                ],
            )
            .unwrap_or_else(|e| panic!("outrigger peer rotate: {e}"))
        }
    };
    println!("{}", rotate("1h").await);
    for (cluster, peer) in [("aws", "azure"), ("azure", "aws")] {
        let message = peer_condition_is(
            run.kube(cluster),
            peer,
            "TokenExpiring",
            "True",
            "TokenExpiresSoon",
        )
        .await;
        println!("{cluster} reads {peer} with a 1 h token: {message}");
    }
    split_stays(
        run,
        Duration::from_secs(3),
        "after a rotation to 1 h tokens",
    )
    .await;
    println!("{}", rotate("30d").await);
    for (cluster, peer) in [("aws", "azure"), ("azure", "aws")] {
        peer_condition_is(
            run.kube(cluster),
            peer,
            "TokenExpiring",
            "False",
            "TokenValid",
        )
        .await;
        let p = Api::<PeerCluster>::all(run.kube(cluster).clone())
            .get(peer)
            .await
            .expect("the PeerCluster");
        println!(
            "{cluster} reads {peer} until {:?}",
            p.status.and_then(|s| s.token_expires_at).map(|t| t.0)
        );
    }
    split_stays(
        run,
        Duration::from_secs(3),
        "after a rotation to 30 d tokens",
    )
    .await;
}

/// The links between the clusters stall (connections open then are held
/// unanswered, new ones pass): each operator's watches of the other go silent
/// while its probes answer, are started anew, and the facts flow again.
async fn stalled_watches_are_started_anew(run: &Run, operators: &BTreeMap<&'static str, Operator>) {
    let restarts = |cluster: &'static str| async move {
        operators_metric(operators, cluster, "outrigger_peer_watch_restarts").await
    };
    let (aws_before, azure_before) = (restarts("aws").await, restarts("azure").await);
    peers(&["fault", "partition", "aws", "azure", "--mode", "stall"]);
    let stalled = Instant::now();
    eventually(
        "both operators restart their watches of the other",
        DEADLINE,
        || async {
            (restarts("aws").await > aws_before && restarts("azure").await > azure_before)
                .then_some(())
        },
    )
    .await;
    println!(
        "stalled links: both sides' watches started anew {:.1} s after the stall (unreachableAfterSeconds {UNREACHABLE_AFTER})",
        stalled.elapsed().as_secs_f64()
    );
    // The facts flow again: a pool made in azure now shows in aws's FactsValid.
    let late = format!("trust-late-{}", run.suffix);
    apply_json(
        &run.azure,
        &json!({
            "apiVersion": "outrigger.dev/v1alpha1", "kind": "GpuNodePool",
            "metadata": {"name": late},
            "spec": {"provider": "azure", "region": "eastus", "zone": "1",
                     "instanceType": "Standard_ND96isr_H100_v5",
                     "gpu": {"type": "B200", "count": 100_000}, "nodes": {"min": 0, "max": 1}},
        }),
    )
    .await;
    let message = peer_condition_is(
        &run.aws,
        "azure",
        "FactsValid",
        "False",
        "PeerFactsRejected",
    )
    .await;
    assert!(message.contains(&late), "{message}");
    println!("after the stall, aws sees azure's new pool: {message}");
    Api::<GpuNodePool>::all(run.azure.clone())
        .delete(&late, &DeleteParams::default())
        .await
        .expect("delete the late pool");
    peers(&["fault", "heal"]);
    peer_condition_is(&run.aws, "azure", "FactsValid", "True", "PeerFactsAccepted").await;
    split_stays(run, Duration::from_secs(3), "after the stall healed").await;
}

/// One metric of cluster `cluster`'s operator (0 when not exported).
async fn operators_metric(
    operators: &BTreeMap<&'static str, Operator>,
    cluster: &str,
    name: &str,
) -> f64 {
    operators[cluster].metric(name).await.unwrap_or(0.0)
}

/// `peer remove` deletes each side's reader ServiceAccount for the other: the
/// kubeconfigs they read each other with are refused from then on, and the reader
/// roles other peers are bound to stay.
async fn removing_the_peer_revokes_its_tokens(run: &Run) {
    let texts = [
        ("aws", "azure", peer_kubeconfig(&run.aws, "azure").await),
        ("azure", "aws", peer_kubeconfig(&run.azure, "aws").await),
    ];
    for (_, peer, text) in &texts {
        assert_eq!(
            reads_pools(text).await,
            Ok(()),
            "{peer}'s reader reads before the removal"
        );
    }
    let azure_kubeconfig = outrigger_tests::peers::kubeconfig("azure");
    let said = outrigger(
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
    )
    .unwrap_or_else(|e| panic!("outrigger peer remove: {e}"));
    println!("{said}");
    for (at, peer, text) in &texts {
        let refused = eventually(
            &format!("the token {at} read {peer} with to be revoked"),
            DEADLINE,
            // 403 while only its bindings are gone; 401 once its ServiceAccount is.
            || async {
                reads_pools(text)
                    .await
                    .err()
                    .filter(|e| e.starts_with("HTTP 401"))
            },
        )
        .await;
        println!("after peer remove, {at}'s old token for {peer}: {refused}");
        let roles = Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(run.kube(peer).clone())
            .get_opt("outrigger-peer-reader")
            .await
            .expect("read the reader ClusterRole");
        assert!(roles.is_some(), "the shared reader roles stay in {peer}");
    }
}

/// Lists GpuNodePools with a peer kubeconfig: `Err` with the HTTP status when refused.
async fn reads_pools(text: &str) -> Result<(), String> {
    let file = kube::config::Kubeconfig::from_yaml(text).expect("a kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .expect("a client config");
    let client = Client::try_from(config).expect("a client");
    match Api::<GpuNodePool>::all(client)
        .list(&Default::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(format!("HTTP {} {}", status.code, status.reason)),
        Err(e) => panic!("listing pools with a peer kubeconfig: {e}"),
    }
}
