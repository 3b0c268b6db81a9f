//! The operator authenticated as the Helm chart's ServiceAccount, so the end-to-end
//! tests prove the chart's RBAC is enough (`OUTRIGGER_E2E_AS_SA=1`, `make e2e-as-sa`).
//!
//! Once per test process: render the chart's ServiceAccount and RBAC templates
//! (`helm template --show-only`), apply them, get a token from the TokenRequest API
//! (`kubectl create token`) and write a kubeconfig that holds only that token. The
//! release is named `outrigger` in namespace `default`, where the tests keep the
//! leader Lease.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::harness::repo_root;

/// The ServiceAccount's namespace: the release namespace, where the Lease is.
pub const NAMESPACE: &str = "default";
/// The ServiceAccount's name: the chart's full name for release `outrigger`.
pub const NAME: &str = "outrigger";
/// How long the token is good for: longer than a whole end-to-end run.
const TOKEN_DURATION: &str = "4h";

/// Whether the operator runs as the chart's ServiceAccount.
pub fn enabled() -> bool {
    std::env::var("OUTRIGGER_E2E_AS_SA").as_deref() == Ok("1")
}

/// The user name the API server gives the ServiceAccount.
pub fn username() -> String {
    format!("system:serviceaccount:{NAMESPACE}:{NAME}")
}

/// The kubeconfig for the operator: the ServiceAccount's when enabled, else none
/// (the operator then uses the caller's, an admin).
pub fn kubeconfig() -> Option<PathBuf> {
    static KUBECONFIG: OnceLock<PathBuf> = OnceLock::new();
    enabled().then(|| KUBECONFIG.get_or_init(set_up).clone())
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to run {program} (eval \"$(hack/cluster env)\"): {e}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        std::io::Write::write_all(&mut pipe, input.as_bytes()).expect("stdin written");
    }
    let out = child.wait_with_output().expect("process finished");
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn set_up() -> PathBuf {
    let chart = repo_root().join("charts/outrigger");
    let rbac = run(
        "helm",
        &[
            "template",
            NAME,
            &chart.to_string_lossy(),
            "--namespace",
            NAMESPACE,
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ],
        None,
    );
    run("kubectl", &["apply", "-f", "-"], Some(&rbac));
    let token = run(
        "kubectl",
        &[
            "create",
            "token",
            NAME,
            "--namespace",
            NAMESPACE,
            "--duration",
            TOKEN_DURATION,
        ],
        None,
    );
    let cluster = |field: &str| {
        run(
            "kubectl",
            &[
                "config",
                "view",
                "--raw",
                "--minify",
                "-o",
                &format!("jsonpath={{.clusters[0].cluster.{field}}}"),
            ],
            None,
        )
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": cluster("server"),
            "certificate-authority-data": cluster("certificate-authority-data"),
        }}],
        "users": [{"name": NAME, "user": {"token": token.trim()}}],
        "contexts": [{"name": NAME, "context": {"cluster": "local", "user": NAME}}],
        "current-context": NAME,
    });
    let path = std::env::temp_dir().join(format!(
        "outrigger-sa-{}-{}.kubeconfig",
        std::process::id(),
        crate::e2e::suffix()
    ));
    // JSON is YAML: kubeconfig readers take it as it is.
    std::fs::write(&path, config.to_string()).expect("kubeconfig written");
    path
}

/// Requests of the ServiceAccount in the audit log after byte `from` that the API
/// server refused (403): each is a permission the chart lacks. The audit log records
/// writes only; a refused read stops the operator's caches from filling, which the
/// tests see.
pub fn forbidden_since(from: u64) -> Vec<String> {
    let text = std::fs::read(crate::e2e::audit_log()).unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(text.len());
    let user = username();
    String::from_utf8_lossy(&text[start..])
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["user"]["username"].as_str() == Some(user.as_str()))
        .filter(|e| e["responseStatus"]["code"] == 403)
        .map(|e| {
            format!(
                "{} {}",
                e["verb"].as_str().unwrap_or(""),
                e["requestURI"].as_str().unwrap_or("")
            )
        })
        .collect()
}
