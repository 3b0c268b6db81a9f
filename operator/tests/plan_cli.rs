//! `outrigger plan` as a user runs it: the examples plan cleanly, the JSON has the
//! documented shape, and bad input exits 2 naming the file, document and field.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn plan(files: &[PathBuf], extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrigger"));
    cmd.arg("plan");
    for f in files {
        cmd.arg("-f").arg(f);
    }
    cmd.args(extra).output().expect("outrigger runs")
}

fn pools_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pools-aws.yaml")
}

/// Writes `text` to a fresh file for one test.
fn fixture(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("fixture written");
    path
}

const DEPLOYMENT: &str = r#"apiVersion: outrigger.dev/v1alpha1
kind: ModelDeployment
metadata: {name: bad, namespace: ml}
spec:
  replicas: 2
  gpu: {count: 1}
  template:
    spec:
      containers: [{name: server, image: vllm/vllm-openai:v0.6.4}]
  placement:
    spread: [{by: provider, minGroups: 1, maxShare: 60}]
"#;

#[test]
fn every_example_plans_with_every_rule_met() {
    let out = plan(&examples(), &["-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let plans = json["plans"].as_array().expect("plans array");
    assert!(plans.len() >= 2, "every example deployment is planned");
    for plan in plans {
        let keys: Vec<&str> = plan
            .as_object()
            .expect("plan object")
            .keys()
            .map(String::as_str)
            .collect();
        for key in [
            "deployment",
            "replicas",
            "placed",
            "unplaced",
            "satisfied",
            "costPerHour",
            "placements",
            "explanation",
        ] {
            assert!(keys.contains(&key), "plan has {key}: {plan}");
        }
        assert_eq!(plan["satisfied"], true, "{plan}");
        assert_eq!(plan["unplaced"], 0, "{plan}");
        for placement in plan["placements"].as_array().expect("placements") {
            for key in ["pool", "provider", "region", "zone", "replicas"] {
                assert!(placement.get(key).is_some(), "placement has {key}");
            }
        }
    }
}

#[test]
fn the_llama_example_keeps_every_provider_at_or_under_sixty_percent() {
    let out = plan(&examples(), &["-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let llama = json["plans"]
        .as_array()
        .expect("plans")
        .iter()
        .find(|p| {
            p["deployment"]
                .as_str()
                .is_some_and(|d| d.contains("llama"))
        })
        .expect("the llama example is planned");
    let replicas = llama["replicas"].as_u64().expect("replicas");
    let mut per_provider = std::collections::BTreeMap::<String, u64>::new();
    for p in llama["placements"].as_array().expect("placements") {
        *per_provider
            .entry(p["provider"].as_str().expect("provider").to_string())
            .or_default() += p["replicas"].as_u64().expect("replicas");
    }
    assert_eq!(per_provider.len(), 2, "{per_provider:?}");
    for (provider, n) in per_provider {
        assert!(
            n * 100 <= replicas * 60,
            "{provider} holds {n} of {replicas}"
        );
    }
}

#[test]
fn the_table_shows_pools_shares_and_reasons() {
    let out = plan(&examples(), &[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(text.contains("POOL"), "{text}");
    assert!(text.contains("providers: aws="), "{text}");
    assert!(text.contains("why:"), "{text}");
}

fn assert_bad_input(out: &Output, must_mention: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "exit 2 on bad input");
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in must_mention {
        assert!(err.contains(needle), "stderr names {needle:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_missing_file_exits_2_naming_it() {
    let out = plan(&[PathBuf::from("/nonexistent/pools.yaml")], &[]);
    assert_bad_input(&out, &["/nonexistent/pools.yaml"]);
}

#[test]
fn max_share_zero_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = DEPLOYMENT.replace("maxShare: 60", "maxShare: 0");
    let file = fixture(&dir, "md.yaml", &format!("---\n{text}"));
    let out = plan(&[pools_file(), file.clone()], &[]);
    assert_bad_input(
        &out,
        &[
            &file.display().to_string(),
            "document 1",
            "spec.placement.spread[0].maxShare",
        ],
    );
}

#[test]
fn an_unknown_field_exits_2_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = DEPLOYMENT.replace("  replicas: 2\n", "  replicas: 2\n  replicaz: 3\n");
    let file = fixture(
        &dir,
        "md.yaml",
        &format!("kind: Namespace\napiVersion: v1\nmetadata: {{name: ml}}\n---\n{text}"),
    );
    let out = plan(&[pools_file(), file.clone()], &[]);
    assert_bad_input(
        &out,
        &[&file.display().to_string(), "document 2", "replicaz"],
    );
}

#[test]
fn a_wrong_type_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = DEPLOYMENT.replace("replicas: 2", "replicas: six");
    let file = fixture(&dir, "md.yaml", &text);
    let out = plan(&[pools_file(), file.clone()], &[]);
    assert_bad_input(
        &out,
        &[&file.display().to_string(), "document 1", "spec.replicas"],
    );
}

#[test]
fn broken_yaml_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = fixture(&dir, "md.yaml", "kind: [unclosed\n");
    let out = plan(std::slice::from_ref(&file), &[]);
    assert_bad_input(&out, &[&file.display().to_string()]);
}

#[test]
fn a_pool_with_min_above_max_exits_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = fixture(
        &dir,
        "pool.yaml",
        "apiVersion: outrigger.dev/v1alpha1\nkind: GpuNodePool\nmetadata: {name: p}\nspec:\n  provider: aws\n  region: us-east-1\n  instanceType: p5.48xlarge\n  gpu: {type: H100, count: 8}\n  nodes: {min: 5, max: 2}\n",
    );
    let out = plan(std::slice::from_ref(&file), &[]);
    assert_bad_input(
        &out,
        &[
            &file.display().to_string(),
            "spec.nodes",
            "nodes.min must be <= nodes.max",
        ],
    );
}

#[test]
fn later_deployments_see_what_earlier_ones_took() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = "apiVersion: outrigger.dev/v1alpha1\nkind: GpuNodePool\nmetadata: {name: only}\nspec:\n  provider: aws\n  region: us-east-1\n  instanceType: p5.48xlarge\n  gpu: {type: H100, count: 8}\n  nodes: {min: 0, max: 1}\n  scaling: {aws: {launchTemplate: {name: gpu}, subnetIds: [subnet-1]}}\n";
    let md = |name: &str| {
        DEPLOYMENT
            .replace("name: bad", &format!("name: {name}"))
            .replace("gpu: {count: 1}", "gpu: {count: 8}")
            .replace("replicas: 2", "replicas: 1")
    };
    let file = fixture(
        &dir,
        "all.yaml",
        &format!("{pool}---\n{}---\n{}", md("b"), md("a")),
    );
    let out = plan(&[file], &["-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["plans"][0]["deployment"], "ml/a");
    assert_eq!(json["plans"][0]["placed"], 1);
    assert_eq!(json["plans"][1]["deployment"], "ml/b");
    assert_eq!(json["plans"][1]["placed"], 0, "the one node went to ml/a");
}

#[test]
fn a_kubectl_list_plans_its_items() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pools = std::fs::read_to_string(pools_file()).expect("pools");
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&format!("{pools}---\n{DEPLOYMENT}")).expect("YAML");
    let items: Vec<&serde_json::Value> = docs.iter().filter(|d| !d.is_null()).collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    let file = fixture(&dir, "list.json", &list.to_string());
    let out = plan(&[file], &["-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["plans"][0]["deployment"], "ml/bad");
}

/// A pool of one cluster for the several-clusters tests.
fn cluster_pool(provider: &str) -> String {
    let (region, zone, instance, scaling) = if provider == "aws" {
        (
            "us-east-1",
            "us-east-1a",
            "p5.48xlarge",
            "{aws: {launchTemplate: {name: gpu}}}",
        )
    } else {
        (
            "eastus",
            "\"1\"",
            "Standard_ND96isr_H100_v5",
            "{azure: {subscriptionId: 00000000-0000-0000-0000-000000000000, resourceGroup: rg, scaleSetName: gpu}}",
        )
    };
    format!(
        "apiVersion: outrigger.dev/v1alpha1\nkind: GpuNodePool\nmetadata: {{name: h100}}\nspec:\n  provider: {provider}\n  region: {region}\n  zone: {zone}\n  instanceType: {instance}\n  gpu: {{type: H100, count: 8}}\n  pricePerNodeHour: 100\n  nodes: {{min: 0, max: 4}}\n  scaling: {scaling}\n"
    )
}

/// The same deployment as both clusters hold it: 5 replicas, at most 60% per provider.
const COPY: &str = r#"apiVersion: outrigger.dev/v1alpha1
kind: ModelDeployment
metadata: {name: llm, namespace: ml}
spec:
  replicas: 5
  gpu: {count: 1, types: [H100]}
  template: {spec: {containers: [{name: server, image: server:1}]}}
  placement: {spread: [{by: provider, minGroups: 2, maxShare: 60}]}
"#;

fn success(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[test]
fn several_clusters_plan_once_over_every_copy_pools() {
    let dir = tempfile::tempdir().expect("temp dir");
    let aws = fixture(
        &dir,
        "aws.yaml",
        &format!("{}---\n{COPY}", cluster_pool("aws")),
    );
    let azure = fixture(
        &dir,
        "azure.yaml",
        &format!("{}---\n{COPY}", cluster_pool("azure")),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrigger"));
    cmd.args(["plan", "-o", "json", "--cluster", "aws", "-f"])
        .arg(&aws)
        .args(["--cluster", "azure", "-f"])
        .arg(&azure);
    let json = success(&cmd.output().expect("outrigger runs"));
    let plans = json["plans"].as_array().expect("plans");
    assert_eq!(plans.len(), 1, "one plan for the two copies: {json}");
    assert_eq!(plans[0]["clusters"], serde_json::json!(["aws", "azure"]));
    assert_eq!(plans[0]["satisfied"], true);
    let mut rows: Vec<(String, String, u64)> = plans[0]["placements"]
        .as_array()
        .expect("placements")
        .iter()
        .map(|p| {
            (
                p["cluster"].as_str().expect("cluster").to_string(),
                p["pool"].as_str().expect("pool").to_string(),
                p["replicas"].as_u64().expect("replicas"),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            ("aws".to_string(), "h100".to_string(), 3),
            ("azure".to_string(), "h100".to_string(), 2)
        ]
    );

    // The same objects with a top-level `cluster` field give the same plan.
    let tagged = |name: &str, text: &str| {
        let text = text.replace(
            "kind: GpuNodePool\n",
            &format!("kind: GpuNodePool\ncluster: {name}\n"),
        );
        text.replace(
            "kind: ModelDeployment\n",
            &format!("kind: ModelDeployment\ncluster: {name}\n"),
        )
    };
    let both = fixture(
        &dir,
        "both.yaml",
        &format!(
            "{}---\n{}",
            tagged("aws", &format!("{}---\n{COPY}", cluster_pool("aws"))),
            tagged("azure", &format!("{}---\n{COPY}", cluster_pool("azure")))
        ),
    );
    assert_eq!(success(&plan(&[both], &["-o", "json"])), json);
}

#[test]
fn copies_that_disagree_are_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let aws = fixture(
        &dir,
        "aws.yaml",
        &format!("{}---\n{COPY}", cluster_pool("aws")),
    );
    let azure = fixture(
        &dir,
        "azure.yaml",
        &format!(
            "{}---\n{}",
            cluster_pool("azure"),
            COPY.replace("replicas: 5", "replicas: 4")
        ),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrigger"));
    cmd.args(["plan", "--cluster", "aws", "-f"])
        .arg(&aws)
        .args(["--cluster", "azure", "-f"])
        .arg(&azure);
    let out = cmd.output().expect("outrigger runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("CLUSTER"), "{text}");
    assert!(
        text.contains("the copies in azure have another spec than the one in aws")
            && text.contains("InSync=False"),
        "{text}"
    );
}

#[test]
fn bad_cluster_flags_exit_2_saying_how() {
    let dir = tempfile::tempdir().expect("temp dir");
    let aws = fixture(
        &dir,
        "aws.yaml",
        &format!("{}---\n{COPY}", cluster_pool("aws")),
    );
    let azure = fixture(
        &dir,
        "azure.yaml",
        &format!("{}---\n{COPY}", cluster_pool("azure")),
    );
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_outrigger"))
            .arg("plan")
            .args(args)
            .output()
            .expect("outrigger runs")
    };
    let (a, z) = (aws.as_os_str(), azure.as_os_str());
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    assert_bad_input(
        &run(&[os("-f"), a, os("--cluster"), os("azure")]),
        &["--cluster azure has no -f file after it"],
    );
    assert_bad_input(
        &run(&[os("-f"), a, os("--cluster"), os("azure"), os("-f"), z]),
        &["belong to a cluster", "aws.yaml do not", "--cluster NAME"],
    );
    assert_bad_input(
        &run(&[os("--cluster"), os("Azure_1"), os("-f"), z]),
        &["--cluster \"Azure_1\"", "DNS label"],
    );
    assert_bad_input(
        &run(&[os("-f"), a, os("-f"), z]),
        &["a second GpuNodePool named \"h100\"", "--cluster NAME"],
    );
}

#[test]
fn a_current_placement_of_just_pool_and_replicas_takes_the_rest_from_the_pool() {
    let dir = tempfile::tempdir().expect("temp dir");
    // One node, full with this deployment's own 8 replicas: it keeps them there.
    let pool = cluster_pool("aws").replace("max: 4", "max: 1")
        + "status: {nodes: 1, readyNodes: 1, gpus: {capacity: 8, allocatable: 8, requested: 8}}\n";
    let md = COPY
        .replace("replicas: 5", "replicas: 8")
        .replace("minGroups: 2", "minGroups: 1")
        .replace("maxShare: 60", "maxShare: 100")
        + "status:\n  placements:\n  - {pool: h100, replicas: 8}\n";
    let file = fixture(&dir, "one.yaml", &format!("{pool}---\n{md}"));
    let json = success(&plan(&[file], &["-o", "json"]));
    assert_eq!(json["plans"][0]["placed"], 8, "{json}");
    assert_eq!(json["plans"][0]["placements"][0]["provider"], "aws");
    assert!(
        json["plans"][0]["explanation"]
            .to_string()
            .contains("keeps 8 of its current replicas"),
        "{json}"
    );
    let unknown = fixture(
        &dir,
        "unknown.yaml",
        &format!("{pool}---\n{}", md.replace("{pool: h100,", "{pool: a100,")),
    );
    assert_bad_input(
        &plan(&[unknown], &[]),
        &["status.placements[0].pool", "\"a100\"", "no file defines"],
    );
}
