//! `outrigger peer add`, `peer rotate` and `peer remove`: register two clusters as
//! peers of each other, renew their tokens, or undo it. Run against this cluster
//! (the current kubeconfig context) with a kubeconfig for the other. In each cluster
//! it makes a read-only ServiceAccount for the other alone
//! (`outrigger-peer-reader-<peer>`), bound to the reader roles that hold exactly the
//! reads a peer makes, and a TokenRequest token of bounded lifetime for it; in the
//! other it stores a kubeconfig with that token in a Secret of the peer Secret
//! namespace and creates the PeerCluster. The kubeconfig holds only inline data
//! (`controller::peer::kubeconfig`). Everything is server-side applied, so a second
//! run changes nothing but the token.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{Cluster, Context, KubeConfigOptions, Kubeconfig, NamedCluster, NamedContext};
use kube::{Client, Resource};
use outrigger_crds::{PeerCluster, PeerClusterSpec, SecretKeyRef};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The roles a peer reads with; each peer's ServiceAccount and bindings are this
/// name and `-<peer>`.
pub const READER: &str = "outrigger-peer-reader";
/// Where the peer kubeconfig Secrets go by default: a namespace of their own, so
/// the operator reads Secrets nowhere else (chart `peers.secretNamespace`).
pub const SECRET_NAMESPACE: &str = "outrigger-peers";
/// The field manager of what this command applies.
const MANAGER: &str = "outrigger-peer-cli";
/// A token's default lifetime: long enough that rotation is a monthly chore, short
/// enough that a leaked one dies on its own. The PeerCluster warns 7 days before.
const DEFAULT_TOKEN_TTL: &str = "30d";
/// The shortest lifetime the API server grants a requested token.
const MIN_TOKEN_TTL: Duration = Duration::from_secs(600);
/// The longest lifetime this command asks for.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(clap::Args, Debug)]
pub struct PeerArgs {
    #[command(subcommand)]
    command: PeerCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PeerCommand {
    /// Register cluster NAME as a peer of this one, in both directions.
    Add(AddArgs),
    /// Renew the tokens both clusters read each other with, in place: the
    /// kubeconfig Secrets keep their servers and CAs and get new tokens.
    Rotate(RotateArgs),
    /// Undo `peer add NAME` in both clusters, revoking only that peer's tokens.
    Remove(RemoveArgs),
}

#[derive(clap::Args, Debug)]
struct Target {
    /// The other cluster's name: its Outrigger's --cluster-name (chart value clusterName).
    name: String,
    /// A kubeconfig for the other cluster, with rights to create the reader and
    /// the PeerCluster there.
    #[arg(long)]
    kubeconfig: std::path::PathBuf,
    /// The context of --kubeconfig to use (default: its current context).
    #[arg(long)]
    context: Option<String>,
    /// This cluster's name: its Outrigger's --cluster-name.
    #[arg(long, env = "OUTRIGGER_CLUSTER_NAME")]
    cluster_name: String,
    /// The namespace of Outrigger in both clusters: its leader Lease, and the
    /// peer readers' ServiceAccounts.
    #[arg(long, default_value = "outrigger-system")]
    namespace: String,
    /// The namespace of the peer kubeconfig Secrets in both clusters (the
    /// operators' --peer-secret-namespace, chart peers.secretNamespace).
    #[arg(long, default_value = SECRET_NAMESPACE)]
    secret_namespace: String,
}

#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// How long each reader token lives: seconds, or a number with s, m, h or d
    /// (10m to 366d). The PeerCluster shows its expiry (status.tokenExpiresAt) and
    /// sets TokenExpiring 7 days before (at once for a shorter lifetime); renew
    /// with `outrigger peer rotate`.
    #[arg(long, default_value = DEFAULT_TOKEN_TTL, value_parser = token_ttl)]
    token_ttl: Duration,
}

#[derive(clap::Args, Debug)]
struct AddArgs {
    #[command(flatten)]
    target: Target,
    /// The other cluster's API address as this cluster's Outrigger reaches it
    /// (default: the server in --kubeconfig).
    #[arg(long)]
    peer_server: Option<String>,
    /// This cluster's API address as the other cluster's Outrigger reaches it
    /// (default: the server of the current kubeconfig context).
    #[arg(long)]
    server: Option<String>,
    /// A PEM file with the CA of the other cluster's API server, for the
    /// kubeconfig this cluster reads it with (default: the CA in --kubeconfig).
    /// Required when --kubeconfig skips TLS verification or names no CA.
    #[arg(long)]
    peer_ca_file: Option<std::path::PathBuf>,
    /// A PEM file with the CA of this cluster's API server, for the kubeconfig the
    /// other cluster reads it with (default: the CA of the current context).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    token: TokenArgs,
    /// Seconds of silence after which each side counts the other as lost.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
    unreachable_after_seconds: u32,
    /// The name of the leader Lease (the operators' --lease-name), which the reader may get.
    #[arg(long, default_value = "outrigger-leader")]
    lease_name: String,
}

#[derive(clap::Args, Debug)]
struct RotateArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    token: TokenArgs,
}

#[derive(clap::Args, Debug)]
struct RemoveArgs {
    #[command(flatten)]
    target: Target,
}

/// `--token-ttl`: seconds, or a number with a unit.
fn token_ttl(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a lifetime: write seconds, or a number with s, m, h or d, such as 30d"
            ));
        }
    };
    let seconds = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a lifetime: write a whole number, such as 30d"))?;
    let ttl = Duration::from_secs(seconds);
    if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&ttl) {
        return Err(format!(
            "{text} is outside 10m to 366d: the API server grants no token shorter than 10 minutes, and a longer one outlives the point of expiring"
        ));
    }
    Ok(ttl)
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0}")]
    Config(String),
    #[error("{what} in cluster {cluster}: {source}")]
    Api {
        what: String,
        cluster: String,
        source: kube::Error,
    },
    #[error(
        "cluster {cluster} answered the TokenRequest for ServiceAccount {namespace}/{account} without a token: is kube-apiserver running with --service-account-issuer and --service-account-signing-key-file?"
    )]
    NoToken {
        cluster: String,
        namespace: String,
        account: String,
    },
}

/// One cluster: its name, a client, and its cluster entry in your kubeconfig
/// (what `for_peer` makes a peer's from).
struct Side {
    name: String,
    client: Client,
    cluster: Cluster,
}

pub async fn run(args: &PeerArgs) -> Result<String, PeerError> {
    match &args.command {
        PeerCommand::Add(add) => self::add(add).await,
        PeerCommand::Rotate(rotate) => self::rotate(rotate).await,
        PeerCommand::Remove(remove) => self::remove(remove).await,
    }
}

fn check_names(target: &Target) -> Result<(), PeerError> {
    for (flag, name) in [
        ("NAME", &target.name),
        ("--cluster-name", &target.cluster_name),
        ("--namespace", &target.namespace),
        ("--secret-namespace", &target.secret_namespace),
    ] {
        if let Err(why) = crate::validate::dns_label(name) {
            return Err(PeerError::Config(format!("{flag} {name:?} {why}")));
        }
    }
    if target.secret_namespace == target.namespace {
        return Err(PeerError::Config(format!(
            "--secret-namespace and --namespace are both {:?}: keep the peer Secrets in a namespace of their own, so the operator reads no Secret where it runs",
            target.namespace
        )));
    }
    if target.name == target.cluster_name {
        return Err(PeerError::Config(format!(
            "NAME and --cluster-name are both {:?}: name the other cluster, not this one",
            target.name
        )));
    }
    Ok(())
}

/// A side from a kubeconfig file (its context) or, without one, the default
/// kubeconfig's current context.
async fn side(
    name: &str,
    file: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<Side, PeerError> {
    let what = file.map_or("the current kubeconfig".to_string(), |f| {
        format!("kubeconfig {}", f.display())
    });
    let config_err = |e: String| PeerError::Config(format!("{what}: {e}"));
    let kubeconfig = match file {
        Some(path) => Kubeconfig::read_from(path),
        None => Kubeconfig::read(),
    }
    .map_err(|e| config_err(e.to_string()))?;
    let context_name = context
        .map(str::to_string)
        .or_else(|| kubeconfig.current_context.clone())
        .ok_or_else(|| config_err("names no context: pass --context".to_string()))?;
    let cluster_name = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .ok_or_else(|| config_err(format!("has no context {context_name:?}")))?;
    let yours = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| config_err(format!("has no cluster {cluster_name:?}")))?;
    let options = KubeConfigOptions {
        context: Some(context_name),
        ..KubeConfigOptions::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| config_err(e.to_string()))?;
    let client = Client::try_from(config).map_err(|e| config_err(e.to_string()))?;
    Ok(Side {
        name: name.to_string(),
        client,
        cluster: yours,
    })
}

/// How a peer reaches the cluster `yours` describes: its server and TLS name, and
/// its CA inline (from `ca_file`, or your kubeconfig's data or file). Nothing else
/// of yours is carried over (no proxy, no skipped TLS check). `peer` says which
/// flag gives the CA: --peer-ca-file for the other cluster, --ca-file for this one.
fn for_peer(
    yours: &Cluster,
    ca_file: Option<&std::path::Path>,
    peer: bool,
) -> Result<Cluster, String> {
    let flag = if peer { "--peer-ca-file" } else { "--ca-file" };
    let read = |path: &std::path::Path| {
        let pem = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!(
                "{flag} {} holds no PEM certificate: give the API server's CA in PEM",
                path.display()
            ));
        }
        Ok(base64::engine::general_purpose::STANDARD.encode(pem))
    };
    let ca = match (ca_file, yours.insecure_skip_tls_verify) {
        (Some(path), _) => read(path)?,
        (None, Some(true)) => {
            return Err(format!(
                "skips TLS verification (insecure-skip-tls-verify), and a peer's kubeconfig must check the API server's certificate: pass {flag} FILE with its CA"
            ));
        }
        (None, _) => match (
            &yours.certificate_authority_data,
            &yours.certificate_authority,
        ) {
            (Some(data), _) if !data.is_empty() => data.clone(),
            (_, Some(path)) => read(std::path::Path::new(path))?,
            _ => {
                return Err(format!(
                    "names no CA for its API server, and a peer's kubeconfig must carry one: pass {flag} FILE"
                ));
            }
        },
    };
    Ok(Cluster {
        server: yours.server.clone(),
        tls_server_name: yours.tls_server_name.clone(),
        certificate_authority_data: Some(ca),
        ..Cluster::default()
    })
}

async fn apply<K>(side: &Side, namespace: Option<&str>, object: &K) -> Result<(), PeerError>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
    K::Scope: Scoped,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = K::Scope::api(side.client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| PeerError::Api {
        what: format!("failed to apply {} {name}", K::kind(&())),
        cluster: side.name.clone(),
        source,
    })?;
    Ok(())
}

async fn delete<K>(side: &Side, namespace: Option<&str>, name: &str) -> Result<bool, PeerError>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug,
    K::Scope: Scoped,
{
    let api: Api<K> = K::Scope::api(side.client.clone(), namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(source) => Err(PeerError::Api {
            what: format!("failed to delete {} {name}", K::kind(&())),
            cluster: side.name.clone(),
            source,
        }),
    }
}

/// An `Api` for a namespaced or a cluster-scoped kind.
trait Scoped {
    fn api<K>(client: Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = Self>;
}

impl Scoped for k8s_openapi::NamespaceResourceScope {
    fn api<K>(client: Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = Self>,
    {
        Api::namespaced(client, namespace.unwrap_or("default"))
    }
}

impl Scoped for k8s_openapi::ClusterResourceScope {
    fn api<K>(client: Client, _: Option<&str>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = Self>,
    {
        Api::all(client)
    }
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(BTreeMap::from([(
            crate::labels::MANAGED_BY.to_string(),
            crate::labels::MANAGER.to_string(),
        )])),
        ..ObjectMeta::default()
    }
}

/// The chart's one list of permissions (charts/outrigger/rbac-rules.yaml).
const RULES: &str = include_str!("../../charts/outrigger/rbac-rules.yaml");

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReaderRules {
    peer_reader_cluster_rules: Vec<PolicyRule>,
    peer_reader_lease_rules: Vec<PolicyRule>,
}

fn reader_rules() -> ReaderRules {
    serde_saphyr::from_str(RULES).expect("rbac-rules.yaml holds the peer reader's rules")
}

/// Every read a peer makes of a cluster, and nothing else (`observe::peers`).
pub fn reader_cluster_rules() -> Vec<PolicyRule> {
    reader_rules().peer_reader_cluster_rules
}

/// The namespaced read: the operator's leader Lease, by name.
pub fn reader_namespace_rules(lease: &str) -> Vec<PolicyRule> {
    reader_rules()
        .peer_reader_lease_rules
        .into_iter()
        .map(|mut rule| {
            rule.resource_names = Some(vec![lease.to_string()]);
            rule
        })
        .collect()
}

/// The ServiceAccount, and its bindings, that cluster `peer` reads another with.
pub fn reader_name(peer: &str) -> String {
    format!("{READER}-{peer}")
}

/// A token of `account` and when it expires.
struct Token {
    token: String,
    expires: String,
}

/// Makes, in `side`, the reader of cluster `peer` (its own ServiceAccount, bound to
/// the shared reader roles) and returns a new token for it.
async fn reader(
    side: &Side,
    peer: &str,
    namespace: &str,
    lease: &str,
    ttl: Duration,
) -> Result<Token, PeerError> {
    let ns = Some(namespace);
    let account = reader_name(peer);
    apply(
        side,
        None,
        &Namespace {
            metadata: meta(namespace, None),
            ..Namespace::default()
        },
    )
    .await?;
    apply(
        side,
        ns,
        &ServiceAccount {
            metadata: meta(&account, ns),
            // Its tokens are requested, never mounted.
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        },
    )
    .await?;
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: account.clone(),
        namespace: Some(namespace.into()),
        ..Subject::default()
    };
    apply(
        side,
        None,
        &ClusterRole {
            metadata: meta(READER, None),
            rules: Some(reader_cluster_rules()),
            ..ClusterRole::default()
        },
    )
    .await?;
    apply(
        side,
        None,
        &ClusterRoleBinding {
            metadata: meta(&account, None),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: READER.into(),
            },
            subjects: Some(vec![subject.clone()]),
        },
    )
    .await?;
    apply(
        side,
        ns,
        &Role {
            metadata: meta(READER, ns),
            rules: Some(reader_namespace_rules(lease)),
        },
    )
    .await?;
    apply(
        side,
        ns,
        &RoleBinding {
            metadata: meta(&account, ns),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: READER.into(),
            },
            subjects: Some(vec![subject]),
        },
    )
    .await?;
    token(side, namespace, &account, ttl).await
}

/// A new TokenRequest token of `account`, living `ttl` (or less, if the API server
/// caps it: the answer's expiry is the one reported).
async fn token(
    side: &Side,
    namespace: &str,
    account: &str,
    ttl: Duration,
) -> Result<Token, PeerError> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(side.client.clone(), namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .map_err(|source| PeerError::Api {
            what: format!("failed to request a token of ServiceAccount {namespace}/{account}"),
            cluster: side.name.clone(),
            source,
        })?;
    let no_token = || PeerError::NoToken {
        cluster: side.name.clone(),
        namespace: namespace.to_string(),
        account: account.to_string(),
    };
    let status = answer.status.ok_or_else(no_token)?;
    let token = status
        .token
        .filter(|t| !t.is_empty())
        .ok_or_else(no_token)?;
    Ok(Token {
        token,
        expires: status
            .expiration_timestamp
            .map_or("an expiry it did not say".to_string(), |t| t.0.to_string()),
    })
}

/// A kubeconfig that reaches `cluster` (at `server` when given) with `token`.
fn kubeconfig_for(name: &str, cluster: &Cluster, server: Option<&str>, token: &str) -> String {
    let mut cluster = cluster.clone();
    if let Some(server) = server {
        cluster.server = Some(server.to_string());
    }
    let user = format!("{READER}@{name}");
    let file = Kubeconfig {
        clusters: vec![NamedCluster {
            name: name.to_string(),
            cluster: Some(cluster),
            other: Default::default(),
        }],
        auth_infos: vec![kube::config::NamedAuthInfo {
            name: user.clone(),
            auth_info: Some(kube::config::AuthInfo {
                token: Some(token.to_string().into()),
                ..kube::config::AuthInfo::default()
            }),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: name.to_string(),
            context: Some(Context {
                cluster: name.to_string(),
                user: Some(user),
                ..Context::default()
            }),
            other: Default::default(),
        }],
        current_context: Some(name.to_string()),
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        ..Kubeconfig::default()
    };
    serde_saphyr::to_string(&file).expect("a kubeconfig serialises")
}

/// The kubeconfig of `text` with `token` in place of its user's, checked as the
/// operator will check it.
fn with_token(text: &str, token: &str) -> Result<String, String> {
    let mut file = Kubeconfig::from_yaml(text).map_err(|e| e.to_string())?;
    let user = file
        .auth_infos
        .first_mut()
        .and_then(|u| u.auth_info.as_mut())
        .ok_or("it has no user")?;
    // The token replaces whatever the user held: a client certificate would
    // otherwise go on naming the user.
    *user = kube::config::AuthInfo {
        token: Some(token.to_string().into()),
        ..kube::config::AuthInfo::default()
    };
    let text = serde_saphyr::to_string(&file).map_err(|e| e.to_string())?;
    admit(&text)?;
    Ok(text)
}

/// `text` as the operator will take it, or why it would refuse it.
fn admit(text: &str) -> Result<(), String> {
    crate::controller::peer::kubeconfig::admit(text).map_err(|r| r.to_string())
}

fn secret_name(peer: &str) -> String {
    format!("peer-{peer}")
}

/// The Secret in `at`'s peer Secret namespace that holds `kubeconfig` for `of`.
async fn store(at: &Side, of: &str, kubeconfig: String, target: &Target) -> Result<(), PeerError> {
    admit(&kubeconfig).map_err(|e| {
        PeerError::Config(format!(
            "the kubeconfig for cluster {of} would be refused by the operator in {}: {e}",
            at.name
        ))
    })?;
    let namespace = target.secret_namespace.as_str();
    apply(
        at,
        None,
        &Namespace {
            metadata: meta(namespace, None),
            ..Namespace::default()
        },
    )
    .await?;
    apply(
        at,
        Some(namespace),
        &Secret {
            metadata: meta(&secret_name(of), Some(namespace)),
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                "kubeconfig".to_string(),
                ByteString(kubeconfig.into_bytes()),
            )])),
            ..Secret::default()
        },
    )
    .await
}

/// In `at`: the Secret with a kubeconfig for `of`, and the PeerCluster for it.
async fn register(
    at: &Side,
    of: &str,
    kubeconfig: String,
    args: &AddArgs,
) -> Result<(), PeerError> {
    let target = &args.target;
    store(at, of, kubeconfig, target).await?;
    let mut peer = PeerCluster::new(
        of,
        PeerClusterSpec {
            kubeconfig_secret_ref: SecretKeyRef {
                namespace: target.secret_namespace.clone(),
                name: secret_name(of),
                key: "kubeconfig".into(),
            },
            unreachable_after_seconds: args.unreachable_after_seconds,
            operator_namespace: target.namespace.clone(),
        },
    );
    peer.metadata.labels = meta(of, None).labels;
    apply(at, None, &peer).await
}

async fn add(args: &AddArgs) -> Result<String, PeerError> {
    let target = &args.target;
    check_names(target)?;
    let here = side(&target.cluster_name, None, None).await?;
    let there = side(
        &target.name,
        Some(&target.kubeconfig),
        target.context.as_deref(),
    )
    .await?;
    let config_err = |what: &str, e: String| PeerError::Config(format!("{what}: {e}"));
    let here_cluster = for_peer(&here.cluster, args.ca_file.as_deref(), false)
        .map_err(|e| config_err("the current kubeconfig", e))?;
    let there_cluster = for_peer(&there.cluster, args.peer_ca_file.as_deref(), true)
        .map_err(|e| config_err(&format!("kubeconfig {}", target.kubeconfig.display()), e))?;
    // Both kubeconfigs are checked as the operators will check them before
    // anything is written, so a bad server or CA leaves both clusters as they were.
    for (at, of, cluster, server) in [
        (&here, &there, &there_cluster, args.peer_server.as_deref()),
        (&there, &here, &here_cluster, args.server.as_deref()),
    ] {
        admit(&kubeconfig_for(&of.name, cluster, server, "token")).map_err(|e| {
            PeerError::Config(format!(
                "the kubeconfig for cluster {} would be refused by the operator in {}: {e}",
                of.name, at.name
            ))
        })?;
    }
    let namespace = target.namespace.as_str();
    let ttl = args.token.token_ttl;
    // In each cluster, the reader the other reads it with.
    let here_token = reader(&here, &there.name, namespace, &args.lease_name, ttl).await?;
    let there_token = reader(&there, &here.name, namespace, &args.lease_name, ttl).await?;
    register(
        &here,
        &there.name,
        kubeconfig_for(
            &there.name,
            &there_cluster,
            args.peer_server.as_deref(),
            &there_token.token,
        ),
        args,
    )
    .await?;
    register(
        &there,
        &here.name,
        kubeconfig_for(
            &here.name,
            &here_cluster,
            args.server.as_deref(),
            &here_token.token,
        ),
        args,
    )
    .await?;
    Ok(format!(
        "peers: {here} and {there} are registered both ways (PeerCluster {there} in {here}, PeerCluster {here} in {there}; kubeconfig Secrets in {secrets}; read-only ServiceAccounts {namespace}/{here_reader} in {here} and {namespace}/{there_reader} in {there})\n\
         tokens: {here} reads {there} until {there_expires}; {there} reads {here} until {here_expires} (renew with `outrigger peer rotate {there}`)\n\
         check: kubectl get peerclusters (in each cluster): Reachable and Mutual turn True once both operators run\n",
        here = here.name,
        there = there.name,
        secrets = target.secret_namespace,
        here_reader = reader_name(&there.name),
        there_reader = reader_name(&here.name),
        there_expires = there_token.expires,
        here_expires = here_token.expires,
    ))
}

/// The kubeconfig text in `at`'s Secret for peer `of`.
async fn stored(at: &Side, of: &str, target: &Target) -> Result<String, PeerError> {
    let namespace = target.secret_namespace.as_str();
    let name = secret_name(of);
    let secret = Api::<Secret>::namespaced(at.client.clone(), namespace)
        .get_opt(&name)
        .await
        .map_err(|source| PeerError::Api {
            what: format!("failed to read Secret {namespace}/{name}"),
            cluster: at.name.clone(),
            source,
        })?
        .ok_or_else(|| {
            PeerError::Config(format!(
                "cluster {} has no Secret {namespace}/{name}: register the peers first with `outrigger peer add {}`",
                at.name, target.name
            ))
        })?;
    secret
        .data
        .and_then(|d| d.get("kubeconfig").cloned())
        .and_then(|b| String::from_utf8(b.0).ok())
        .ok_or_else(|| {
            PeerError::Config(format!(
                "Secret {namespace}/{name} in cluster {} holds no kubeconfig text: run `outrigger peer add {}` again",
                at.name, target.name
            ))
        })
}

async fn rotate(args: &RotateArgs) -> Result<String, PeerError> {
    let target = &args.target;
    check_names(target)?;
    let here = side(&target.cluster_name, None, None).await?;
    let there = side(
        &target.name,
        Some(&target.kubeconfig),
        target.context.as_deref(),
    )
    .await?;
    let namespace = target.namespace.as_str();
    let ttl = args.token.token_ttl;
    let mut said = Vec::new();
    // Both kubeconfigs are read before anything is written, so a missing one
    // leaves both as they were.
    let in_here = stored(&here, &there.name, target).await?;
    let in_there = stored(&there, &here.name, target).await?;
    for (at, of, text) in [(&here, &there, in_here), (&there, &here, in_there)] {
        // `at` reads `of` with a token of `of`'s reader for `at`.
        let token = token(of, namespace, &reader_name(&at.name), ttl).await?;
        let text = with_token(&text, &token.token).map_err(|e| {
            PeerError::Config(format!(
                "the kubeconfig for cluster {} in cluster {} cannot take a new token ({e}): run `outrigger peer add {}` again",
                of.name, at.name, target.name
            ))
        })?;
        store(at, &of.name, text, target).await?;
        said.push(format!(
            "{} reads {} until {}",
            at.name, of.name, token.expires
        ));
    }
    Ok(format!(
        "peers: new tokens: {}; the operators switch to them without a pause, and each old token lives until its own expiry\n",
        said.join("; ")
    ))
}

async fn remove(args: &RemoveArgs) -> Result<String, PeerError> {
    let target = &args.target;
    check_names(target)?;
    let here = side(&target.cluster_name, None, None).await?;
    let there = side(
        &target.name,
        Some(&target.kubeconfig),
        target.context.as_deref(),
    )
    .await?;
    let namespace = target.namespace.as_str();
    let mut said = Vec::new();
    for (at, of) in [(&here, &there.name), (&there, &here.name)] {
        delete::<PeerCluster>(at, None, of).await?;
        delete::<Secret>(at, Some(&target.secret_namespace), &secret_name(of)).await?;
        // Deleting its ServiceAccount revokes every token of this peer, and only
        // of this one.
        let account = reader_name(of);
        delete::<ClusterRoleBinding>(at, None, &account).await?;
        delete::<RoleBinding>(at, Some(namespace), &account).await?;
        delete::<ServiceAccount>(at, Some(namespace), &account).await?;
        said.push(format!(
            "removed PeerCluster {of} from {} and revoked {of}'s reader {namespace}/{account} there",
            at.name
        ));
    }
    Ok(format!("peers: {}\n", said.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(yaml: &str) -> Cluster {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn token_lifetimes_take_units_and_stay_within_bounds() {
        assert_eq!(token_ttl("30d").unwrap(), Duration::from_secs(30 * 86_400));
        assert_eq!(token_ttl("3600").unwrap(), Duration::from_secs(3600));
        assert_eq!(token_ttl("12h").unwrap(), Duration::from_secs(12 * 3600));
        assert!(token_ttl("5m").unwrap_err().contains("10m to 366d"));
        assert!(token_ttl("400d").unwrap_err().contains("10m to 366d"));
        assert!(token_ttl("1w").unwrap_err().contains("s, m, h or d"));
        assert!(token_ttl("d").unwrap_err().contains("whole number"));
    }

    #[test]
    fn a_peer_gets_only_the_server_its_tls_name_and_an_inline_ca() {
        let yours = cluster(
            "server: https://10.1.2.3:6443\ncertificate-authority-data: Q0E=\nproxy-url: http://proxy:3128\ntls-server-name: api\n",
        );
        let theirs = for_peer(&yours, None, true).unwrap();
        assert_eq!(theirs.server.as_deref(), Some("https://10.1.2.3:6443"));
        assert_eq!(theirs.certificate_authority_data.as_deref(), Some("Q0E="));
        assert_eq!(theirs.tls_server_name.as_deref(), Some("api"));
        assert_eq!(theirs.proxy_url, None);
        let text = kubeconfig_for("azure", &theirs, None, "t0ken");
        admit(&text).unwrap();
        let rotated = with_token(&text, "n3w").unwrap();
        assert!(
            rotated.contains("n3w") && !rotated.contains("t0ken"),
            "{rotated}"
        );
    }

    #[test]
    fn a_kubeconfig_that_skips_tls_checks_needs_the_ca_given() {
        let insecure = cluster("server: https://10.1.2.3:6443\ninsecure-skip-tls-verify: true\n");
        let e = for_peer(&insecure, None, true).unwrap_err();
        assert!(e.contains("--peer-ca-file"), "{e}");
        let e = for_peer(&insecure, None, false).unwrap_err();
        assert!(e.contains("--ca-file"), "{e}");
        let dir = std::env::temp_dir().join(format!("outrigger-peer-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("ca.crt");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let theirs = for_peer(&insecure, Some(&pem), true).unwrap();
        assert_eq!(theirs.insecure_skip_tls_verify, None);
        admit(&kubeconfig_for("azure", &theirs, None, "t")).unwrap();
        let none = cluster("server: https://10.1.2.3:6443\n");
        assert!(
            for_peer(&none, None, true)
                .unwrap_err()
                .contains("names no CA")
        );
        std::fs::write(&pem, "not a certificate").unwrap();
        assert!(
            for_peer(&insecure, Some(&pem), true)
                .unwrap_err()
                .contains("no PEM")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
