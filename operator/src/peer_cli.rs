//! `outrigger peer add` and `outrigger peer remove`: register two clusters as peers
//! of each other, or undo it. Run against this cluster (the current kubeconfig
//! context) with a kubeconfig for the other. In each cluster it makes a read-only
//! ServiceAccount (`outrigger-peer-reader`) with exactly the reads a peer makes, and
//! its token; in the other it stores a kubeconfig with that token in a Secret and
//! creates the PeerCluster. Everything is server-side applied, so a second run
//! changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::config::{Cluster, Context, KubeConfigOptions, Kubeconfig, NamedCluster, NamedContext};
use kube::{Client, Resource};
use outrigger_crds::{PeerCluster, PeerClusterSpec, SecretKeyRef};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The ServiceAccount, roles and token Secret a peer reads with.
pub const READER: &str = "outrigger-peer-reader";
/// The field manager of what this command applies.
const MANAGER: &str = "outrigger-peer-cli";
/// How long the token controller may take to fill the reader's token.
const TOKEN_WAIT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
pub struct PeerArgs {
    #[command(subcommand)]
    command: PeerCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PeerCommand {
    /// Register cluster NAME as a peer of this one, in both directions.
    Add(AddArgs),
    /// Undo `peer add NAME` in both clusters.
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
    /// The namespace of Outrigger in both clusters, where the peer Secrets go.
    #[arg(long, default_value = "outrigger-system")]
    namespace: String,
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
    /// Seconds of silence after which each side counts the other as lost.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
    unreachable_after_seconds: u32,
    /// The name of the leader Lease (the operators' --lease-name), which the reader may get.
    #[arg(long, default_value = "outrigger-leader")]
    lease_name: String,
}

#[derive(clap::Args, Debug)]
struct RemoveArgs {
    #[command(flatten)]
    target: Target,
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
        "the token of ServiceAccount {namespace}/{READER} in cluster {cluster} was not filled within {TOKEN_WAIT:?}: is kube-controller-manager running with --service-account-private-key-file?"
    )]
    NoToken { cluster: String, namespace: String },
}

/// One cluster: its name, a client, and how to reach it (server, CA).
struct Side {
    name: String,
    client: Client,
    cluster: Cluster,
}

pub async fn run(args: &PeerArgs) -> Result<String, PeerError> {
    match &args.command {
        PeerCommand::Add(add) => self::add(add).await,
        PeerCommand::Remove(remove) => self::remove(remove).await,
    }
}

fn check_names(target: &Target) -> Result<(), PeerError> {
    for (flag, name) in [
        ("NAME", &target.name),
        ("--cluster-name", &target.cluster_name),
    ] {
        if let Err(why) = crate::validate::dns_label(name) {
            return Err(PeerError::Config(format!("{flag} {name:?} {why}")));
        }
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
    let mut cluster = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| config_err(format!("has no cluster {cluster_name:?}")))?;
    // The peer's copy must stand alone: a CA file becomes inline data.
    if let Some(path) = cluster.certificate_authority.take() {
        let pem = std::fs::read(&path).map_err(|e| config_err(format!("{path}: {e}")))?;
        cluster.certificate_authority_data =
            Some(base64::engine::general_purpose::STANDARD.encode(pem));
    }
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
        cluster,
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

/// Makes the reader in `side` and returns its token.
async fn reader(side: &Side, namespace: &str, lease: &str) -> Result<String, PeerError> {
    let ns = Some(namespace);
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
            metadata: meta(READER, ns),
            ..ServiceAccount::default()
        },
    )
    .await?;
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: READER.into(),
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
            metadata: meta(READER, None),
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
            metadata: meta(READER, ns),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: READER.into(),
            },
            subjects: Some(vec![subject]),
        },
    )
    .await?;
    let mut token_secret = Secret {
        metadata: meta(READER, ns),
        type_: Some("kubernetes.io/service-account-token".into()),
        ..Secret::default()
    };
    token_secret.metadata.annotations = Some(BTreeMap::from([(
        "kubernetes.io/service-account.name".to_string(),
        READER.to_string(),
    )]));
    apply(side, ns, &token_secret).await?;
    let secrets: Api<Secret> = Api::namespaced(side.client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + TOKEN_WAIT;
    loop {
        let token = secrets
            .get_opt(READER)
            .await
            .map_err(|source| PeerError::Api {
                what: format!("failed to read Secret {namespace}/{READER}"),
                cluster: side.name.clone(),
                source,
            })?
            .and_then(|s| s.data)
            .and_then(|d| d.get("token").cloned())
            .filter(|t| !t.0.is_empty());
        if let Some(token) = token {
            return String::from_utf8(token.0).map_err(|_| {
                PeerError::Config(format!(
                    "the token in Secret {namespace}/{READER} of cluster {} is not text",
                    side.name
                ))
            });
        }
        if tokio::time::Instant::now() > deadline {
            return Err(PeerError::NoToken {
                cluster: side.name.clone(),
                namespace: namespace.to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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

fn secret_name(peer: &str) -> String {
    format!("peer-{peer}")
}

/// In `at`: the Secret with a kubeconfig for `of`, and the PeerCluster for it.
async fn register(
    at: &Side,
    of: &str,
    kubeconfig: String,
    args: &AddArgs,
) -> Result<(), PeerError> {
    let namespace = args.target.namespace.as_str();
    let name = secret_name(of);
    apply(
        at,
        Some(namespace),
        &Secret {
            metadata: meta(&name, Some(namespace)),
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                "kubeconfig".to_string(),
                ByteString(kubeconfig.into_bytes()),
            )])),
            ..Secret::default()
        },
    )
    .await?;
    let mut peer = PeerCluster::new(
        of,
        PeerClusterSpec {
            kubeconfig_secret_ref: SecretKeyRef {
                namespace: namespace.to_string(),
                name,
                key: "kubeconfig".into(),
            },
            unreachable_after_seconds: args.unreachable_after_seconds,
            operator_namespace: namespace.to_string(),
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
    let namespace = target.namespace.as_str();
    let here_token = reader(&here, namespace, &args.lease_name).await?;
    let there_token = reader(&there, namespace, &args.lease_name).await?;
    register(
        &here,
        &there.name,
        kubeconfig_for(
            &there.name,
            &there.cluster,
            args.peer_server.as_deref(),
            &there_token,
        ),
        args,
    )
    .await?;
    register(
        &there,
        &here.name,
        kubeconfig_for(
            &here.name,
            &here.cluster,
            args.server.as_deref(),
            &here_token,
        ),
        args,
    )
    .await?;
    Ok(format!(
        "peers: {here} and {there} are registered both ways (PeerCluster {there} in {here}, PeerCluster {here} in {there}; read-only ServiceAccount {namespace}/{READER} in each)\n\
         check: kubectl get peerclusters (in each cluster): Reachable and Mutual turn True once both operators run\n",
        here = here.name,
        there = there.name,
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
        delete::<Secret>(at, Some(namespace), &secret_name(of)).await?;
        said.push(format!("removed PeerCluster {of} from {}", at.name));
        // The reader serves every peer of the cluster: it goes with the last one.
        let left = Api::<PeerCluster>::all(at.client.clone())
            .list(&Default::default())
            .await
            .map_err(|source| PeerError::Api {
                what: "failed to list PeerClusters".into(),
                cluster: at.name.clone(),
                source,
            })?;
        if left.items.is_empty() {
            delete::<ClusterRoleBinding>(at, None, READER).await?;
            delete::<ClusterRole>(at, None, READER).await?;
            delete::<RoleBinding>(at, Some(namespace), READER).await?;
            delete::<Role>(at, Some(namespace), READER).await?;
            delete::<Secret>(at, Some(namespace), READER).await?;
            delete::<ServiceAccount>(at, Some(namespace), READER).await?;
            said.push(format!(
                "removed the reader {namespace}/{READER} from {} (no peer left there)",
                at.name
            ));
        }
    }
    Ok(format!("peers: {}\n", said.join("; ")))
}
