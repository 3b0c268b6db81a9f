//! `outrigger plan`: previews placements offline from manifests, with no cluster.
//!
//! Reads GpuNodePools (their optional status: nodes, readyNodes, gpus.requested, a
//! `CapacityAvailable=False` condition) and ModelDeployments (their optional
//! `status.placements` is the current placement), then plans each deployment in
//! namespace/name order, each seeing the capacity the earlier ones took.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use outrigger_crds::{GpuNodePool, ModelDeployment};
use outrigger_placement as placement;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{inputs, validate};

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A YAML file with GpuNodePools and ModelDeployments (many documents allowed); repeat for more files.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
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
    pub pool: String,
    pub provider: String,
    pub region: String,
    pub zone: Option<String>,
    pub replicas: u32,
}

pub fn run(args: &PlanArgs) -> Result<String, PlanError> {
    let (pools, deployments) = read(&args.files)?;
    if deployments.is_empty() {
        let files: Vec<String> = args.files.iter().map(|f| f.display().to_string()).collect();
        return Err(PlanError::NothingToPlan {
            files: files.join(", "),
        });
    }
    let output = plan_all(&pools, &deployments);
    Ok(match args.output {
        Format::Json => serde_json::to_string(&output).expect("plans serialise to JSON") + "\n",
        Format::Table => table(&output, &pools),
    })
}

/// Plans every deployment in namespace/name order; each sees what the earlier took.
pub fn plan_all(pools: &[GpuNodePool], deployments: &[ModelDeployment]) -> Output {
    let mut solver_pools: Vec<placement::Pool> = pools
        .iter()
        .map(|p| {
            let status = p.status.as_ref();
            inputs::pool(
                p,
                inputs::nodes_from_status(p.spec.gpu.count, status),
                inputs::growth_blocked(status, k8s_openapi::jiff::Timestamp::now()),
                true,
            )
        })
        .collect();
    let mut ordered: Vec<&ModelDeployment> = deployments.iter().collect();
    ordered.sort_by_key(|md| key(md));
    let plans = ordered
        .into_iter()
        .map(|md| {
            let request = inputs::request(md);
            let plan = placement::solve(&request, &solver_pools);
            for placed in &plan.placements {
                if let Some(pool) = solver_pools.iter_mut().find(|p| p.name == placed.pool) {
                    pool.reserve(placed.replicas, request.gpus_per_replica);
                }
            }
            DeploymentPlan {
                deployment: key(md),
                replicas: request.replicas,
                placed: plan.placed,
                unplaced: plan.unplaced,
                satisfied: plan.satisfied,
                cost_per_hour: plan.cost_per_hour,
                placements: plan
                    .placements
                    .into_iter()
                    .map(|p| PlacementRow {
                        pool: p.pool,
                        provider: p.provider,
                        region: p.region,
                        zone: p.zone,
                        replicas: p.replicas,
                    })
                    .collect(),
                explanation: plan.explanation,
            }
        })
        .collect();
    Output { plans }
}

fn key(md: &ModelDeployment) -> String {
    format!(
        "{}/{}",
        md.metadata.namespace.as_deref().unwrap_or("default"),
        md.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Reads every file; the first bad one stops with an error naming it.
pub fn read(files: &[PathBuf]) -> Result<(Vec<GpuNodePool>, Vec<ModelDeployment>), PlanError> {
    let mut pools = Vec::new();
    let mut deployments = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|source| PlanError::Read {
            file: file.clone(),
            source,
        })?;
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).map_err(|source| PlanError::Yaml {
                file: file.clone(),
                source: Box::new(source),
            })?;
        // `kubectl get -o yaml` prints a List: plan its items as documents.
        let documents = documents.into_iter().enumerate().flat_map(|(i, document)| {
            match (
                document.get("kind").and_then(|k| k.as_str()),
                document.get("items"),
            ) {
                (Some("List"), Some(serde_json::Value::Array(items))) => {
                    items.iter().map(|item| (i, item.clone())).collect()
                }
                _ => vec![(i, document)],
            }
        });
        for (i, document) in documents {
            let document_error = |message: String| PlanError::Document {
                file: file.clone(),
                document: i + 1,
                message,
            };
            if document.is_null() {
                continue;
            }
            let kind = document.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            let api_version = document
                .get("apiVersion")
                .and_then(|k| k.as_str())
                .unwrap_or("");
            let expected = format!("{}/{}", outrigger_crds::GROUP, outrigger_crds::VERSION);
            match kind {
                "GpuNodePool" | "ModelDeployment" if api_version != expected => {
                    return Err(document_error(format!(
                        "apiVersion is {api_version:?}; a {kind} has apiVersion {expected}"
                    )));
                }
                "GpuNodePool" => {
                    let pool: GpuNodePool = parse(document, file, i)?;
                    check(validate::gpu_node_pool(&pool.spec), &pool.metadata.name)
                        .map_err(document_error)?;
                    pools.push(pool);
                }
                "ModelDeployment" => {
                    let md: ModelDeployment = parse(document, file, i)?;
                    check(validate::model_deployment(&md.spec), &md.metadata.name)
                        .map_err(document_error)?;
                    deployments.push(md);
                }
                "" => {
                    return Err(document_error(
                        "has no kind; expected kind GpuNodePool or ModelDeployment".to_string(),
                    ));
                }
                other => {
                    eprintln!(
                        "note: {}, document {}: skipping kind {other}; plan reads GpuNodePool and ModelDeployment",
                        file.display(),
                        i + 1
                    );
                }
            }
        }
    }
    Ok((pools, deployments))
}

fn parse<T: DeserializeOwned>(
    document: serde_json::Value,
    file: &Path,
    index: usize,
) -> Result<T, PlanError> {
    serde_path_to_error::deserialize(document).map_err(|e| {
        let path = e.path().to_string();
        PlanError::Document {
            file: file.to_path_buf(),
            document: index + 1,
            message: format!("field {path}: {}", e.into_inner()),
        }
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

/// A table for people: per deployment, one row per pool, the provider shares, the
/// cost, and why.
fn table(output: &Output, pools: &[GpuNodePool]) -> String {
    let price: BTreeMap<&str, (f64, u32)> = pools
        .iter()
        .map(|p| {
            (
                p.metadata.name.as_deref().unwrap_or_default(),
                (p.spec.price_per_node_hour.unwrap_or(0.0), p.spec.gpu.count),
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
        let mut rows = vec![[
            "POOL".to_string(),
            "PROVIDER".to_string(),
            "REGION".to_string(),
            "ZONE".to_string(),
            "REPLICAS".to_string(),
            "NODE USD/H".to_string(),
        ]];
        for p in &plan.placements {
            let node_price = price.get(p.pool.as_str()).map_or(0.0, |(price, _)| *price);
            rows.push([
                p.pool.clone(),
                p.provider.clone(),
                p.region.clone(),
                p.zone.clone().unwrap_or_else(|| "-".to_string()),
                p.replicas.to_string(),
                format!("{node_price:.2}"),
            ]);
        }
        let widths: Vec<usize> = (0..6)
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
