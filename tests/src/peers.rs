//! What the several-clusters tests (`peers_smoke`, `peers`) share: whether they are
//! asked for, the run folder of `hack/peers`, the script itself, and a client of one
//! of its clusters.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::harness::repo_root;

/// True with `OUTRIGGER_PEERS_E2E=1` (`hack/e2e-peers`); otherwise `test` says why
/// it skips.
pub fn requested(test: &str) -> bool {
    let on = std::env::var("OUTRIGGER_PEERS_E2E").is_ok_and(|v| v == "1");
    if !on {
        let _ = writeln!(
            std::io::stderr(),
            "skipping {test}: it needs the clusters of hack/peers. Run `hack/e2e-peers` (or `make test`)."
        );
    }
    on
}

/// The run folder of `hack/peers` (`OUTRIGGER_PEERS_DIR`).
pub fn dir() -> PathBuf {
    std::env::var_os("OUTRIGGER_PEERS_DIR")
        .map(PathBuf::from)
        .expect("OUTRIGGER_PEERS_DIR (hack/e2e-peers sets it)")
}

/// The kubeconfig of cluster `name`.
pub fn kubeconfig(name: &str) -> PathBuf {
    dir().join(name).join("kubeconfig")
}

/// `hack/peers ARGS...`; its stdout, trimmed, panicking with its stderr when it fails.
pub fn hack(args: &[&str]) -> String {
    let output = std::process::Command::new(repo_root().join("hack/peers"))
        .args(args)
        .output()
        .expect("run hack/peers");
    assert!(
        output.status.success(),
        "hack/peers {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A client of cluster `name`, at its own API server or at `server`, that gives up
/// connecting after 2 s and reading after `read_timeout`.
pub async fn client(name: &str, server: Option<&str>, read_timeout: Duration) -> Client {
    let path = kubeconfig(name);
    let mut file =
        Kubeconfig::read_from(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Some(url) = server {
        for cluster in &mut file.clusters {
            if let Some(c) = cluster.cluster.as_mut() {
                c.server = Some(url.to_string());
            }
        }
    }
    let mut config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .expect("a client config");
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(read_timeout);
    Client::try_from(config).expect("a client")
}
