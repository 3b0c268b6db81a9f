//! `outrigger plan`: previews placements offline from manifests, with no cluster.
//!
//! Reads GpuNodePools (their optional status: nodes, readyNodes, gpus.requested, a
//! capacity backoff) and ModelDeployments (their optional `status.placements` is the
//! current placement), then plans each deployment in namespace/name order, each
//! seeing the capacity the earlier ones took.
//!
//! With peers, objects belong to clusters: `--cluster NAME` before the `-f` files of
//! that cluster, or a top-level `cluster: NAME` on a document. A deployment is then
//! planned once over the pools of every cluster that holds a copy of it, named
//! `cluster/pool`, as each peer's operator plans it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use outrigger_crds::{GpuNodePool, ModelDeployment};
use outrigger_placement as placement;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::observe::global::qualified;
use crate::{inputs, validate};

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A YAML file with GpuNodePools and ModelDeployments (many documents allowed); repeat for more files.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// The cluster whose objects the `-f` files after it hold, for a plan over peers:
    /// `--cluster aws -f aws.yaml --cluster azure -f azure.yaml`.
    #[arg(long = "cluster", value_name = "NAME")]
    clusters: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
    /// The cluster of each file, from where the `--cluster` flags stand.
    #[arg(skip)]
    file_clusters: Vec<Option<String>>,
}

impl PlanArgs {
    /// Gives each file the cluster of the last `--cluster` before it on the command
    /// line (`matches` are the `plan` subcommand's).
    pub fn place_clusters(&mut self, matches: &clap::ArgMatches) -> Result<(), PlanError> {
        let files: Vec<usize> = matches
            .indices_of("files")
            .map(Iterator::collect)
            .unwrap_or_default();
        let clusters: Vec<usize> = matches
            .indices_of("clusters")
            .map(Iterator::collect)
            .unwrap_or_default();
        for name in &self.clusters {
            if let Err(why) = validate::dns_label(name) {
                return Err(PlanError::Cluster(format!(
                    "--cluster {name:?} {why}; use the cluster's --cluster-name"
                )));
            }
        }
        if let Some(last) = clusters.last()
            && files.last().is_none_or(|f| f < last)
        {
            return Err(PlanError::Cluster(format!(
                "--cluster {} has no -f file after it; --cluster names the cluster of the files that follow it: --cluster aws -f aws.yaml --cluster azure -f azure.yaml",
                self.clusters[clusters.len() - 1]
            )));
        }
        self.file_clusters = files
            .iter()
            .map(|f| {
                clusters
                    .iter()
                    .rposition(|c| c < f)
                    .map(|i| self.clusters[i].clone())
            })
            .collect();
        Ok(())
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// Why the input could not be planned. Every variant names the file and document.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("failed to read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to parse {file} as YAML: {source}")]
    Yaml {
        file: PathBuf,
        source: Box<serde_saphyr::Error>,
    },
    #[error("{file}, document {document}: {message}")]
    Document {
        file: PathBuf,
        document: usize,
        message: String,
    },
    #[error("no ModelDeployment found in {files}; pass a file that has one with -f")]
    NothingToPlan { files: String },
    #[error("{0}")]
    Cluster(String),
}

/// What `-o json` prints.
#[derive(Serialize, Debug)]
pub struct Output {
    pub plans: Vec<DeploymentPlan>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentPlan {
    pub deployment: String,
    /// The clusters that hold a copy of it, with peers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    pub replicas: u32,
    pub placed: u32,
    pub unplaced: u32,
    pub satisfied: bool,
    pub cost_per_hour: f64,
    pub placements: Vec<PlacementRow>,
    pub explanation: Vec<String>,
}

#[derive(Serialize, Debug)]
pub struct PlacementRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub pool: String,
    pub provider: String,
    pub region: String,
    pub zone: Option<String>,
    pub replicas: u32,
}

/// An object read from a file, and the cluster it belongs to (with peers).
#[derive(Debug)]
pub struct Placed<T> {
    pub cluster: Option<String>,
    pub object: T,
}

/// What the files hold.
#[derive(Debug, Default)]
pub struct Objects {
    pub pools: Vec<Placed<GpuNodePool>>,
    pub deployments: Vec<Placed<ModelDeployment>>,
}

pub fn run(args: &PlanArgs) -> Result<String, PlanError> {
    let objects = read(&args.files, &args.file_clusters)?;
    if objects.deployments.is_empty() {
        let files: Vec<String> = args.files.iter().map(|f| f.display().to_string()).collect();
        return Err(PlanError::NothingToPlan {
            files: files.join(", "),
        });
    }
    let output = plan_all(&objects);
    Ok(match args.output {
        Format::Json => serde_json::to_string(&output).expect("plans serialise to JSON") + "\n",
        Format::Table => table(&output, &objects.pools),
    })
}

/// A pool's name in the plan: qualified by its cluster with peers.
fn pool_name(cluster: Option<&str>, pool: &str) -> String {
    cluster.map_or_else(|| pool.to_string(), |c| qualified(c, pool))
}

/// One deployment, with every copy of it (sorted by cluster).
struct Deployment<'a> {
    key: String,
    copies: Vec<&'a Placed<ModelDeployment>>,
}

impl Deployment<'_> {
    /// The spec it is planned with: the first cluster's copy.
    fn md(&self) -> &ModelDeployment {
        &self.copies[0].object
    }

    fn clusters(&self) -> BTreeSet<Option<&str>> {
        self.copies.iter().map(|c| c.cluster.as_deref()).collect()
    }

    /// Its replicas per pool now, over every copy's `status.placements` (a copy's
    /// entry names its cluster, or is of the copy's cluster); the first copy that
    /// names a pool wins.
    fn current(&self) -> BTreeMap<String, u32> {
        let mut current = BTreeMap::new();
        for copy in &self.copies {
            let placements = copy.object.status.iter().flat_map(|s| &s.placements);
            for p in placements.filter(|p| p.replicas > 0) {
                let cluster = p.cluster.as_deref().or(copy.cluster.as_deref());
                current
                    .entry(pool_name(cluster, &p.pool))
                    .or_insert(p.replicas.unsigned_abs());
            }
        }
        current
    }
}

/// Plans every deployment in namespace/name order; each sees what the earlier
/// plans took and what the later deployments hold now.
pub fn plan_all(objects: &Objects) -> Output {
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut by_key: BTreeMap<String, Vec<&Placed<ModelDeployment>>> = BTreeMap::new();
    for copy in &objects.deployments {
        by_key.entry(key(&copy.object)).or_default().push(copy);
    }
    let deployments: Vec<Deployment> = by_key
        .into_iter()
        .map(|(key, mut copies)| {
            copies.sort_by(|a, b| a.cluster.cmp(&b.cluster));
            Deployment { key, copies }
        })
        .collect();
    // Each deployment's replicas per pool now and its GPUs per replica.
    let holdings: Vec<(BTreeMap<String, u32>, u32)> = deployments
        .iter()
        .map(|d| (d.current(), d.md().spec.gpu.count))
        .collect();
    // The pools as if none of these deployments ran there: what their statuses say
    // is requested, less what the deployments hold now.
    let base: Vec<(Option<&str>, placement::Pool)> = objects
        .pools
        .iter()
        .map(|p| {
            let pool = &p.object;
            let name = pool_name(
                p.cluster.as_deref(),
                pool.metadata.name.as_deref().unwrap_or_default(),
            );
            let status = pool.status.as_ref();
            let held: u32 = holdings
                .iter()
                .map(|(current, gpus)| current.get(&name).copied().unwrap_or(0) * gpus)
                .sum();
            let requested = status
                .and_then(|s| s.gpus.as_ref())
                .map_or(0, |g| g.requested);
            let nodes = inputs::nodes_from_counts(
                pool.spec.gpu.count,
                status.and_then(|s| s.nodes).unwrap_or(0),
                status.and_then(|s| s.ready_nodes).unwrap_or(0),
                requested.saturating_sub(held),
            );
            let mut solver_pool =
                inputs::pool(pool, nodes, inputs::growth_blocked(status, now), true);
            solver_pool.name = name;
            (p.cluster.as_deref(), solver_pool)
        })
        .collect();
    // What each deployment ends up with: its plan once planned, its current
    // placement until then.
    let mut taken: Vec<(BTreeMap<String, u32>, u32)> = holdings.clone();
    let plans = deployments
        .iter()
        .enumerate()
        .map(|(i, deployment)| {
            let md = deployment.md();
            let clusters = deployment.clusters();
            let mut request = inputs::request(md);
            request.current = holdings[i].0.clone();
            let mut pools: Vec<placement::Pool> = base
                .iter()
                .filter(|(cluster, _)| clusters.contains(cluster))
                .map(|(_, pool)| pool.clone())
                .collect();
            for (other, (replicas, gpus)) in taken.iter().enumerate() {
                if other == i {
                    continue;
                }
                for pool in &mut pools {
                    if let Some(n) = replicas.get(&pool.name) {
                        pool.reserve(*n, *gpus);
                    }
                }
            }
            let plan = placement::solve(&request, &pools);
            taken[i].0 = plan
                .placements
                .iter()
                .map(|p| (p.pool.clone(), p.replicas))
                .collect();
            let mut explanation = plan.explanation;
            let disagree: Vec<&str> = deployment
                .copies
                .iter()
                .filter(|c| c.object.spec != md.spec)
                .filter_map(|c| c.cluster.as_deref())
                .collect();
            if !disagree.is_empty() {
                explanation.push(format!(
                    "the copies in {} have another spec than the one in {}, which this plan uses; their operators report InSync=False until the specs agree",
                    disagree.join(", "),
                    deployment.copies[0].cluster.as_deref().unwrap_or("-")
                ));
            }
            DeploymentPlan {
                deployment: deployment.key.clone(),
                clusters: clusters.into_iter().flatten().map(String::from).collect(),
                replicas: request.replicas,
                placed: plan.placed,
                unplaced: plan.unplaced,
                satisfied: plan.satisfied,
                cost_per_hour: plan.cost_per_hour,
                placements: plan
                    .placements
                    .into_iter()
                    .map(|p| {
                        let (cluster, pool) = match p.pool.split_once('/') {
                            Some((c, pool)) if !clusters_empty(&deployment.copies) => {
                                (Some(c.to_string()), pool.to_string())
                            }
                            _ => (None, p.pool),
                        };
                        PlacementRow {
                            cluster,
                            pool,
                            provider: p.provider,
                            region: p.region,
                            zone: p.zone,
                            replicas: p.replicas,
                        }
                    })
                    .collect(),
                explanation,
            }
        })
        .collect();
    Output { plans }
}

/// No copy belongs to a cluster: a plan of one cluster, with plain pool names.
fn clusters_empty(copies: &[&Placed<ModelDeployment>]) -> bool {
    copies.iter().all(|c| c.cluster.is_none())
}

fn key(md: &ModelDeployment) -> String {
    format!(
        "{}/{}",
        md.metadata.namespace.as_deref().unwrap_or("default"),
        md.metadata.name.as_deref().unwrap_or_default()
    )
}

/// A document of a file, and where it came from.
struct Document {
    file: PathBuf,
    index: usize,
    cluster: Option<String>,
    value: serde_json::Value,
}

impl Document {
    fn error(&self, message: String) -> PlanError {
        PlanError::Document {
            file: self.file.clone(),
            document: self.index + 1,
            message,
        }
    }
}

/// Reads every file (`clusters[i]` is the cluster of `files[i]`, from `--cluster`);
/// the first bad document stops with an error naming it.
pub fn read(files: &[PathBuf], clusters: &[Option<String>]) -> Result<Objects, PlanError> {
    let mut documents = Vec::new();
    for (n, file) in files.iter().enumerate() {
        let text = std::fs::read_to_string(file).map_err(|source| PlanError::Read {
            file: file.clone(),
            source,
        })?;
        let values: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).map_err(|source| PlanError::Yaml {
                file: file.clone(),
                source: Box::new(source),
            })?;
        // `kubectl get -o yaml` prints a List: plan its items as documents.
        for (index, value) in values.into_iter().enumerate() {
            let items = match (
                value.get("kind").and_then(|k| k.as_str()),
                value.get("items"),
            ) {
                (Some("List"), Some(serde_json::Value::Array(items))) => items.clone(),
                _ => vec![value],
            };
            for mut value in items.into_iter().filter(|v| !v.is_null()) {
                let from_flag = clusters.get(n).cloned().flatten();
                let document = |cluster, value| Document {
                    file: file.clone(),
                    index,
                    cluster,
                    value,
                };
                let cluster = match value.as_object_mut().and_then(|o| o.remove("cluster")) {
                    None => from_flag,
                    Some(serde_json::Value::String(named)) => {
                        if let Err(why) = validate::dns_label(&named) {
                            return Err(document(None, value).error(format!(
                                "field cluster {named:?} {why}; use the cluster's --cluster-name"
                            )));
                        }
                        if let Some(flag) = from_flag.filter(|f| *f != named) {
                            return Err(document(None, value).error(format!(
                                "field cluster says {named:?}, but the file follows --cluster {flag}; remove one of the two"
                            )));
                        }
                        Some(named)
                    }
                    Some(other) => {
                        return Err(document(None, value).error(format!(
                            "field cluster is {other}; it is a cluster name, a string"
                        )));
                    }
                };
                documents.push(document(cluster, value));
            }
        }
    }
    mixed_clusters(&documents)?;
    let mut objects = Objects::default();
    let mut deployments = Vec::new();
    let mut seen = BTreeSet::new();
    let expected = format!("{}/{}", outrigger_crds::GROUP, outrigger_crds::VERSION);
    for document in documents {
        let text = |field: &str| {
            document
                .value
                .pointer(field)
                .and_then(|v| v.as_str())
                .map(String::from)
        };
        let kind = text("/kind").unwrap_or_default();
        let api_version = text("/apiVersion").unwrap_or_default();
        match kind.as_str() {
            "GpuNodePool" | "ModelDeployment" if api_version != expected => {
                return Err(document.error(format!(
                    "apiVersion is {api_version:?}; a {kind} has apiVersion {expected}"
                )));
            }
            "GpuNodePool" | "ModelDeployment" => {
                let name = text("/metadata/name").unwrap_or_default();
                let namespace = text("/metadata/namespace").unwrap_or_else(|| "default".into());
                let id = (
                    kind.clone(),
                    document.cluster.clone(),
                    namespace,
                    name.clone(),
                );
                if !seen.insert(id) {
                    return Err(document.error(format!(
                        "a second {kind} named {name:?}{}: each object once per cluster; with several clusters' objects, put --cluster NAME before each cluster's files",
                        document.cluster.as_deref().map(|c| format!(" in cluster {c}")).unwrap_or_default()
                    )));
                }
                if kind == "ModelDeployment" {
                    deployments.push(document);
                    continue;
                }
                let pool: GpuNodePool = parse(&document)?;
                check(validate::gpu_node_pool(&pool.spec), &pool.metadata.name)
                    .map_err(|m| document.error(m))?;
                objects.pools.push(Placed {
                    cluster: document.cluster,
                    object: pool,
                });
            }
            "" => {
                return Err(document.error(
                    "has no kind; expected kind GpuNodePool or ModelDeployment".to_string(),
                ));
            }
            other => {
                eprintln!(
                    "note: {}, document {}: skipping kind {other}; plan reads GpuNodePool and ModelDeployment",
                    document.file.display(),
                    document.index + 1
                );
            }
        }
    }
    // Deployments after pools: a current placement may name just `pool` and
    // `replicas`, and takes its provider, region and zone from the pool.
    for mut document in deployments {
        complete_placements(&mut document, &objects.pools)?;
        let md: ModelDeployment = parse(&document)?;
        check(validate::model_deployment(&md.spec), &md.metadata.name)
            .map_err(|m| document.error(m))?;
        objects.deployments.push(Placed {
            cluster: document.cluster,
            object: md,
        });
    }
    Ok(objects)
}

/// Either every pool and deployment belongs to a cluster, or none does.
fn mixed_clusters(documents: &[Document]) -> Result<(), PlanError> {
    let mut with = BTreeSet::new();
    let mut without = BTreeSet::new();
    for document in documents {
        let kind = document.value.get("kind").and_then(|k| k.as_str());
        if matches!(kind, Some("GpuNodePool" | "ModelDeployment")) {
            let file = document.file.display().to_string();
            if document.cluster.is_some() {
                with.insert(file);
            } else {
                without.insert(file);
            }
        }
    }
    if with.is_empty() || without.is_empty() {
        return Ok(());
    }
    let list = |files: BTreeSet<String>| files.into_iter().collect::<Vec<_>>().join(", ");
    Err(PlanError::Cluster(format!(
        "objects in {} belong to a cluster but objects in {} do not: put --cluster NAME before every -f file, or give every document a top-level `cluster: NAME`",
        list(with),
        list(without)
    )))
}

/// Fills `provider`, `region` and `zone` of the `status.placements` entries that
/// leave them out, from the pool each names.
fn complete_placements(
    document: &mut Document,
    pools: &[Placed<GpuNodePool>],
) -> Result<(), PlanError> {
    let Some(entries) = document
        .value
        .pointer_mut("/status/placements")
        .and_then(|p| p.as_array_mut())
    else {
        return Ok(());
    };
    let mut problem = None;
    for (i, entry) in entries.iter_mut().enumerate() {
        let Some(entry) = entry.as_object_mut() else {
            continue;
        };
        if entry.contains_key("provider") && entry.contains_key("region") {
            continue;
        }
        let Some(name) = entry.get("pool").and_then(|p| p.as_str()) else {
            continue;
        };
        let cluster = entry
            .get("cluster")
            .and_then(|c| c.as_str())
            .map(String::from)
            .or_else(|| document.cluster.clone());
        let Some(pool) = pools
            .iter()
            .find(|p| p.cluster == cluster && p.object.metadata.name.as_deref() == Some(name))
        else {
            problem = Some(format!(
                "field status.placements[{i}].pool names GpuNodePool {name:?}{}, which no file defines: add its file with -f, or give the entry its provider and region",
                cluster
                    .map(|c| format!(" of cluster {c}"))
                    .unwrap_or_default()
            ));
            break;
        };
        let spec = &pool.object.spec;
        entry
            .entry("provider")
            .or_insert_with(|| spec.provider.as_str().into());
        entry
            .entry("region")
            .or_insert_with(|| spec.region.clone().into());
        if let Some(zone) = &spec.zone {
            entry.entry("zone").or_insert_with(|| zone.clone().into());
        }
    }
    match problem {
        Some(message) => Err(document.error(message)),
        None => Ok(()),
    }
}

fn parse<T: DeserializeOwned>(document: &Document) -> Result<T, PlanError> {
    serde_path_to_error::deserialize(document.value.clone()).map_err(|e| {
        let path = e.path().to_string();
        document.error(format!("field {path}: {}", e.into_inner()))
    })
}

fn check(errors: Vec<validate::FieldError>, name: &Option<String>) -> Result<(), String> {
    if errors.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
    Err(format!(
        "{} is invalid: {}",
        name.as_deref().unwrap_or("(no name)"),
        list.join("; ")
    ))
}

/// A table for people: per deployment, one row per pool (with its cluster, with
/// peers), the provider shares, the cost, and why.
fn table(output: &Output, pools: &[Placed<GpuNodePool>]) -> String {
    let price: BTreeMap<(Option<&str>, &str), f64> = pools
        .iter()
        .map(|p| {
            (
                (
                    p.cluster.as_deref(),
                    p.object.metadata.name.as_deref().unwrap_or_default(),
                ),
                p.object.spec.price_per_node_hour.unwrap_or(0.0),
            )
        })
        .collect();
    let mut out = String::new();
    for plan in &output.plans {
        let verdict = if plan.satisfied {
            "every rule met"
        } else {
            "NOT every rule met"
        };
        let _ = writeln!(
            out,
            "{}: {} of {} replicas placed, {}, {:.2} USD/h",
            plan.deployment, plan.placed, plan.replicas, verdict, plan.cost_per_hour
        );
        if !plan.clusters.is_empty() {
            let _ = writeln!(out, "  copies in clusters: {}", plan.clusters.join(", "));
        }
        let with_cluster = !plan.clusters.is_empty();
        let mut header = vec![
            "POOL",
            "PROVIDER",
            "REGION",
            "ZONE",
            "REPLICAS",
            "NODE USD/H",
        ];
        if with_cluster {
            header.insert(0, "CLUSTER");
        }
        let mut rows: Vec<Vec<String>> = vec![header.into_iter().map(String::from).collect()];
        for p in &plan.placements {
            let node_price = price
                .get(&(p.cluster.as_deref(), p.pool.as_str()))
                .copied()
                .unwrap_or(0.0);
            let mut row = vec![
                p.pool.clone(),
                p.provider.clone(),
                p.region.clone(),
                p.zone.clone().unwrap_or_else(|| "-".to_string()),
                p.replicas.to_string(),
                format!("{node_price:.2}"),
            ];
            if with_cluster {
                row.insert(0, p.cluster.clone().unwrap_or_default());
            }
            rows.push(row);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
        }
        let mut shares: BTreeMap<&str, u32> = BTreeMap::new();
        for p in &plan.placements {
            *shares.entry(p.provider.as_str()).or_default() += p.replicas;
        }
        let shares: Vec<String> = shares
            .iter()
            .map(|(provider, n)| {
                let percent = f64::from(*n) * 100.0 / f64::from(plan.placed.max(1));
                format!("{provider}={n} ({percent:.0}%)")
            })
            .collect();
        let _ = writeln!(out, "  providers: {}", shares.join(" "));
        let _ = writeln!(out, "  why:");
        for line in &plan.explanation {
            let _ = writeln!(out, "    - {line}");
        }
        out.push('\n');
    }
    out
}
