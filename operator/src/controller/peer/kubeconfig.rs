//! The peer kubeconfig check: a peer's kubeconfig is data, never a program. Before
//! any client is built from it, it must hold exactly one cluster with an `https://`
//! server and an inline CA, one user with an inline token (or an inline client
//! certificate and key), and one context joining them. Everything kube-client would
//! otherwise honour and that reaches beyond the Secret (a command to run, a file to
//! read, a proxy, a skipped TLS check, a plain-text server) is refused, naming the
//! field and the fix. Pure: it reads the YAML text only.

use serde_json::{Map, Value};

/// Why a kubeconfig is refused: the field (a path inside the kubeconfig) and what
/// to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    pub why: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field, self.why)
    }
}

fn refuse(field: impl Into<String>, why: impl Into<String>) -> Refusal {
    Refusal {
        field: field.into(),
        why: why.into(),
    }
}

/// Top-level keys a peer kubeconfig may have.
const TOP: &[&str] = &[
    "apiVersion",
    "kind",
    "clusters",
    "users",
    "contexts",
    "current-context",
    "preferences",
];
/// Keys of `clusters[0].cluster`. `insecure-skip-tls-verify` is checked apart: only
/// `false` passes.
const CLUSTER: &[&str] = &[
    "server",
    "certificate-authority-data",
    "tls-server-name",
    "insecure-skip-tls-verify",
];
/// Keys of `users[0].user`.
const USER: &[&str] = &["token", "client-certificate-data", "client-key-data"];
/// Keys of `contexts[0].context`.
const CONTEXT: &[&str] = &["cluster", "user", "namespace"];

/// What a refused key does, for the message.
fn danger(key: &str) -> &'static str {
    match key {
        "exec" => "runs a command on the operator's host",
        "auth-provider" => "runs a credential plugin",
        "tokenFile"
        | "token-file"
        | "certificate-authority"
        | "client-certificate"
        | "client-key" => {
            "reads a file on the operator's host (its own service-account token, say)"
        }
        "username" | "password" => {
            "is basic authentication, which sends a password in each request"
        }
        "proxy-url" => "sends every request through a proxy",
        "as" | "as-uid" | "as-groups" | "as-user-extra" => "asks to impersonate another user",
        "extensions" => "carries data outside the kubeconfig's checked fields",
        _ => "is not among the fields a peer kubeconfig may hold",
    }
}

/// The kubeconfig text of a peer Secret, admitted or refused.
pub fn admit(text: &str) -> Result<(), Refusal> {
    let value: Value = serde_saphyr::from_str(text).map_err(|e| {
        refuse(
            "the kubeconfig",
            format!("is not YAML: {}", first_line(&e.to_string())),
        )
    })?;
    let top = object(&value, "the kubeconfig")?;
    only(top, "", TOP)?;
    let cluster_name = single(top, "clusters", "cluster", |field, cluster| {
        only(cluster, &field, CLUSTER)?;
        let server = cluster
            .get("server")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !server.starts_with("https://") || server.len() <= "https://".len() {
            return Err(refuse(
                format!("{field}.server"),
                format!(
                    "is {server:?}: a peer's API server is reached over TLS only; give its https:// address"
                ),
            ));
        }
        if cluster
            .get("insecure-skip-tls-verify")
            .is_some_and(|v| v != &Value::Bool(false))
        {
            return Err(refuse(
                format!("{field}.insecure-skip-tls-verify"),
                "turns off the check of the peer's certificate: remove it and put the peer's CA in certificate-authority-data (outrigger peer add --peer-ca-file FILE)",
            ));
        }
        if cluster
            .get("certificate-authority-data")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(refuse(
                format!("{field}.certificate-authority-data"),
                "is missing: inline the peer API server's CA, base64-encoded (outrigger peer add inlines it, or takes --peer-ca-file FILE)",
            ));
        }
        Ok(())
    })?;
    let user_name = single(top, "users", "user", |field, user| {
        only(user, &field, USER)?;
        let has = |k: &str| {
            user.get(k)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        };
        let certificate = has("client-certificate-data");
        let key = has("client-key-data");
        if certificate != key {
            let missing = if certificate {
                "client-key-data"
            } else {
                "client-certificate-data"
            };
            return Err(refuse(
                format!("{field}.{missing}"),
                "is missing: a client certificate needs both client-certificate-data and client-key-data, inline",
            ));
        }
        if !has("token") && !certificate {
            return Err(refuse(
                format!("{field}.token"),
                "is missing: give the peer reader's token inline (outrigger peer add writes it)",
            ));
        }
        Ok(())
    })?;
    let context = single(top, "contexts", "context", |field, context| {
        only(context, &field, CONTEXT)
    })?;
    let named = |k: &str| {
        top.get("contexts")
            .and_then(|c| c.get(0))
            .and_then(|c| c.get("context"))
            .and_then(|c| c.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    if named("cluster") != cluster_name {
        return Err(refuse(
            "contexts[0].context.cluster",
            format!(
                "is {:?}, but the one cluster is named {cluster_name:?}: name it",
                named("cluster")
            ),
        ));
    }
    if named("user") != user_name {
        return Err(refuse(
            "contexts[0].context.user",
            format!(
                "is {:?}, but the one user is named {user_name:?}: name it",
                named("user")
            ),
        ));
    }
    let current = top
        .get("current-context")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if current != context {
        return Err(refuse(
            "current-context",
            format!("is {current:?}, but the one context is named {context:?}: name it"),
        ));
    }
    Ok(())
}

/// The inline token of an admitted kubeconfig's one user, if it has one.
pub fn token(text: &str) -> Option<String> {
    let value: Value = serde_saphyr::from_str(text).ok()?;
    value
        .get("users")?
        .get(0)?
        .get("user")?
        .get("token")?
        .as_str()
        .map(str::to_string)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

fn object<'a>(value: &'a Value, field: &str) -> Result<&'a Map<String, Value>, Refusal> {
    value
        .as_object()
        .ok_or_else(|| refuse(field, "is not a mapping"))
}

/// Refuses the first key of `map` not in `allowed`.
fn only(map: &Map<String, Value>, field: &str, allowed: &[&str]) -> Result<(), Refusal> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => {
            let path = if field.is_empty() {
                key.clone()
            } else {
                format!("{field}.{key}")
            };
            Err(refuse(
                path,
                format!(
                    "{}: remove it; a peer kubeconfig holds only an https server with inline certificate-authority-data, and an inline token or client certificate and key",
                    danger(key)
                ),
            ))
        }
    }
}

/// The one entry of list `list` (`clusters`, `users`, `contexts`), checked by
/// `check` on its `inner` mapping; returns the entry's name.
fn single(
    top: &Map<String, Value>,
    list: &str,
    inner: &str,
    check: impl FnOnce(String, &Map<String, Value>) -> Result<(), Refusal>,
) -> Result<String, Refusal> {
    let entries = top
        .get(list)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if entries.len() != 1 {
        return Err(refuse(
            list,
            format!(
                "has {} entries: a peer kubeconfig holds exactly one (outrigger peer add writes one of each)",
                entries.len()
            ),
        ));
    }
    let entry = object(&entries[0], &format!("{list}[0]"))?;
    only(entry, &format!("{list}[0]"), &["name", inner])?;
    let name = entry
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let field = format!("{list}[0].{inner}");
    let body = entry
        .get(inner)
        .ok_or_else(|| refuse(&field, "is missing"))?;
    check(field.clone(), object(body, &field)?)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: v1
kind: Config
clusters:
- name: azure
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority-data: Q0E=
users:
- name: reader
  user:
    token: abc
contexts:
- name: azure
  context: {cluster: azure, user: reader}
current-context: azure
";

    fn with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    fn refused(text: &str) -> Refusal {
        admit(text).expect_err("refused")
    }

    #[test]
    fn an_inline_https_token_kubeconfig_is_admitted() {
        admit(GOOD).unwrap();
        assert_eq!(token(GOOD).as_deref(), Some("abc"));
        admit(&with(
            "    token: abc\n",
            "    client-certificate-data: Qw==\n    client-key-data: Sw==\n",
        ))
        .unwrap();
        admit(&with(
            "    certificate-authority-data: Q0E=\n",
            "    certificate-authority-data: Q0E=\n    insecure-skip-tls-verify: false\n    tls-server-name: api\n",
        ))
        .unwrap();
    }

    #[test]
    fn each_field_that_reaches_beyond_the_secret_is_refused_by_name() {
        let cases = [
            (
                with(
                    "    token: abc\n",
                    "    exec: {command: /bin/sh, apiVersion: client.authentication.k8s.io/v1}\n",
                ),
                "users[0].user.exec",
                "runs a command",
            ),
            (
                with("    token: abc\n", "    auth-provider: {name: gcp}\n"),
                "users[0].user.auth-provider",
                "plugin",
            ),
            (
                with(
                    "    token: abc\n",
                    "    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token\n",
                ),
                "users[0].user.tokenFile",
                "reads a file",
            ),
            (
                with(
                    "    token: abc\n",
                    "    token: abc\n    token-file: /etc/token\n",
                ),
                "users[0].user.token-file",
                "reads a file",
            ),
            (
                with(
                    "    token: abc\n",
                    "    client-certificate: /c\n    client-key: /k\n",
                ),
                "users[0].user.client-certificate",
                "reads a file",
            ),
            (
                with("    token: abc\n", "    username: u\n    password: p\n"),
                "users[0].user.password",
                "",
            ),
            (
                with(
                    "    certificate-authority-data: Q0E=\n",
                    "    certificate-authority: /etc/ca.crt\n",
                ),
                "clusters[0].cluster.certificate-authority",
                "reads a file",
            ),
            (
                with(
                    "    certificate-authority-data: Q0E=\n",
                    "    certificate-authority-data: Q0E=\n    insecure-skip-tls-verify: true\n",
                ),
                "clusters[0].cluster.insecure-skip-tls-verify",
                "--peer-ca-file",
            ),
            (
                with(
                    "    certificate-authority-data: Q0E=\n",
                    "    certificate-authority-data: Q0E=\n    proxy-url: http://127.0.0.1:9\n",
                ),
                "clusters[0].cluster.proxy-url",
                "proxy",
            ),
            (
                with("https://127.0.0.1:6443", "http://127.0.0.1:6443"),
                "clusters[0].cluster.server",
                "https://",
            ),
            (
                with("    certificate-authority-data: Q0E=\n", ""),
                "clusters[0].cluster.certificate-authority-data",
                "missing",
            ),
            (
                with("    token: abc\n", "    as: admin\n    token: abc\n"),
                "users[0].user.as",
                "impersonate",
            ),
            (
                with(
                    "users:\n",
                    "- name: other\n  cluster: {server: 'https://10.0.0.1', certificate-authority-data: Q0E=}\nusers:\n",
                ),
                "clusters",
                "2 entries",
            ),
            (
                with(
                    "current-context: azure\n",
                    "current-context: azure\n- name: two\n  user: {token: x}\n",
                )
                .replacen(
                    "current-context: azure\n- name",
                    "current-context: azure\nusers2:\n- name",
                    1,
                ),
                "users2",
                "not among",
            ),
            (
                with(
                    "  context: {cluster: azure, user: reader}",
                    "  context: {cluster: elsewhere, user: reader}",
                ),
                "contexts[0].context.cluster",
                "elsewhere",
            ),
        ];
        for (text, field, says) in cases {
            let refusal = refused(&text);
            assert_eq!(refusal.field, field, "{text}");
            assert!(refusal.why.contains(says), "{refusal}");
        }
    }

    #[test]
    fn the_one_context_must_be_the_current_one() {
        assert_eq!(
            refused(&with("current-context: azure\n", "")).field,
            "current-context"
        );
        assert_eq!(
            refused(&with(
                "current-context: azure\n",
                "current-context: other\n"
            ))
            .field,
            "current-context"
        );
    }

    #[test]
    fn text_that_is_not_a_kubeconfig_is_refused() {
        assert_eq!(refused("[1, 2").field, "the kubeconfig");
        assert_eq!(refused("- a\n- b\n").field, "the kubeconfig");
        assert_eq!(refused("clusters: []\n").field, "clusters");
    }
}
