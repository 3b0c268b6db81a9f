//! What the tests share: moto as a child process, waiting on a condition with a
//! deadline, and whether the cluster tests should run.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// How long moto may take to start (it imports every backend: a few seconds).
const MOTO_START: Duration = Duration::from_secs(60);
/// How often [`eventually`] checks its condition.
const POLL: Duration = Duration::from_millis(200);

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    // `cargo test` names the package's folder at run time too; prefer it, as a test
    // binary a shared target folder kept from another clone carries that clone's.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Why moto could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error("failed to run hack/tools/install-moto.sh: {0}")]
    Install(String),
    #[error("failed to find a free port: {0}")]
    Port(std::io::Error),
    #[error("failed to start {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("moto did not answer on {url} within {MOTO_START:?}")]
    NotReady { url: String },
}

/// The folder with `moto_server`: `OUTRIGGER_MOTO_BIN`, else what
/// `hack/tools/install-moto.sh` installs (the first run takes about half a minute).
pub fn moto_bin() -> Result<PathBuf, MotoError> {
    if let Some(dir) = std::env::var_os("OUTRIGGER_MOTO_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = repo_root().join("hack/tools/install-moto.sh");
    let output = std::process::Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| MotoError::Install(format!("{}: {e}", script.display())))?;
    if !output.status.success() {
        return Err(MotoError::Install(format!(
            "{} exited with {}",
            script.display(),
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| MotoError::Install("it printed no bin folder".into()))
}

/// A moto server on a free loopback port, stopped when dropped.
pub struct Moto {
    url: String,
    _child: Child,
}

impl Moto {
    pub async fn start() -> Result<Self, MotoError> {
        let bin = tokio::task::spawn_blocking(moto_bin)
            .await
            .map_err(|e| MotoError::Install(e.to_string()))??;
        let path = bin.join("moto_server");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + MOTO_START;
        let mut url = String::new();
        // A moto that exits at once lost its port to another listener: another port.
        for _ in 0..3 {
            let port = free_port().map_err(MotoError::Port)?;
            let mut child = Command::new(&path)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| MotoError::Spawn {
                    path: path.clone(),
                    source,
                })?;
            url = format!("http://127.0.0.1:{port}");
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                let probe = http
                    .get(format!("{url}/moto-api/"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                // Ours only while our child still runs: the answer could come from
                // whoever holds the port.
                if probe.is_ok_and(|r| r.status().is_success())
                    && matches!(child.try_wait(), Ok(None))
                {
                    return Ok(Moto { url, _child: child });
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Err(MotoError::NotReady { url })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

/// A loopback port nothing listens on right now, and that no other caller in this
/// process was given. The OS may hand a port just released to the next bind, so two
/// tests starting a moto at once could both get it; the second moto would then
/// fail to bind and its test would talk to the first one's.
pub fn free_port() -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Bounded: the ephemeral range has thousands of ports, and a process asks for
    // a few dozen.
    for _ in 0..100 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no loopback port that this process was not given already",
    ))
}

/// Checks `condition` until it yields a value, and panics naming `what` when
/// `timeout` passes first. Tests wait with this, never with fixed sleeps.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// True when the cluster tests are asked for (`OUTRIGGER_E2E=1`); otherwise they
/// print why they skip.
pub fn e2e_requested(test: &str) -> bool {
    let on = std::env::var("OUTRIGGER_E2E").is_ok_and(|v| v == "1");
    if !on {
        // Straight to stderr: the test harness captures eprintln! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "skipping {test}: it needs the local cluster. Run `hack/cluster up` and `eval \"$(hack/cluster env)\"`, then `OUTRIGGER_E2E=1 cargo test -p outrigger-tests --test <name> -- --ignored` (or `make e2e`)."
        );
    }
    on
}

/// A client of the simulator's control API for tests: every call panics with the
/// simulator's answer when it fails.
#[derive(Clone, Debug)]
pub struct Control {
    http: reqwest::Client,
    base: String,
}

impl Control {
    pub fn new(base: &str) -> Self {
        Control {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
        }
    }

    /// `method path` with an optional JSON body; the JSON answer.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(b) = &body {
            request = request.json(b);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("control API {method} {path}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "control API {method} {path} {body:?}: {status}: {text}"
        );
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Injects a fault (`{"fault": ..., filters, "times"}`); its id.
    pub async fn inject(&self, fault: serde_json::Value) -> String {
        let injected = self
            .call(reqwest::Method::POST, "/faults", Some(fault))
            .await;
        injected["id"].as_str().unwrap_or_default().to_string()
    }

    pub async fn clear(&self, id: &str) {
        self.call(reqwest::Method::DELETE, &format!("/faults/{id}"), None)
            .await;
    }

    pub async fn clear_all(&self) {
        self.call(reqwest::Method::DELETE, "/faults", None).await;
    }

    /// Sets a capacity limit (`{"provider", "instanceType", "region", "zone", "limit"}`).
    pub async fn capacity(&self, limit: serde_json::Value) {
        self.call(reqwest::Method::PUT, "/capacity", Some(limit))
            .await;
    }

    /// Starts an outage (`{"provider", "region", "api"}`).
    pub async fn outage(&self, outage: serde_json::Value) {
        self.call(reqwest::Method::POST, "/outage", Some(outage))
            .await;
    }

    /// Ends the outages of `provider`.
    pub async fn recover(&self, provider: &str) {
        self.call(
            reqwest::Method::DELETE,
            &format!("/outage?provider={provider}"),
            None,
        )
        .await;
    }

    /// Creates a scale set from a fixture (see `azure::scale_set::ScaleSetFixture`).
    pub async fn create_scale_set(&self, fixture: serde_json::Value) {
        self.call(reqwest::Method::POST, "/azure/scalesets", Some(fixture))
            .await;
    }

    /// Creates an AKS agent pool (see `AgentPoolFixture`).
    pub async fn create_agent_pool(&self, fixture: serde_json::Value) {
        self.call(reqwest::Method::POST, "/azure/agentpools", Some(fixture))
            .await;
    }

    pub async fn delete_scale_set(&self, subscription: &str, resource_group: &str, name: &str) {
        self.call(
            reqwest::Method::DELETE,
            &format!("/azure/scalesets/{subscription}/{resource_group}/{name}"),
            None,
        )
        .await;
    }

    pub async fn state(&self) -> serde_json::Value {
        self.call(reqwest::Method::GET, "/state", None).await
    }
}
