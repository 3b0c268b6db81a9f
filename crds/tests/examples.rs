//! Every document in `examples/` is a valid GpuNodePool or ModelDeployment: it
//! deserializes into the type of its kind and passes the CRD's CEL rules.

mod support;

use std::fs;

use kube::core::cel::Validator;
use outrigger_crds::{GpuNodePool, ModelDeployment};
use serde_json::Value;
use support::{deployment_schema, pool_schema, repo_root, yaml_documents};

#[test]
fn examples_are_valid_resources() {
    let dir = repo_root().join("examples");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .expect("examples/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in examples/");

    let (pools, deployments) = (pool_schema(), deployment_schema());
    let validator = Validator::new();
    let mut counts = (0, 0);
    for path in &files {
        let name = path
            .strip_prefix(repo_root())
            .unwrap()
            .display()
            .to_string();
        let documents = yaml_documents(&fs::read_to_string(path).unwrap());
        assert!(!documents.is_empty(), "{name} has no documents");
        for (i, document) in documents.into_iter().enumerate() {
            let at = format!("{name}, document {}", i + 1);
            assert_eq!(document["apiVersion"], "outrigger.dev/v1alpha1", "{at}");
            let schema = match document["kind"].as_str() {
                Some("GpuNodePool") => {
                    let pool: GpuNodePool = serde_json::from_value(document.clone())
                        .unwrap_or_else(|e| panic!("{at}: {e}"));
                    assert!(
                        pool.metadata.namespace.is_none(),
                        "{at}: pools are cluster-scoped"
                    );
                    counts.0 += 1;
                    &pools
                }
                Some("ModelDeployment") => {
                    let md: ModelDeployment = serde_json::from_value(document.clone())
                        .unwrap_or_else(|e| panic!("{at}: {e}"));
                    assert!(md.metadata.namespace.is_some(), "{at}: say which namespace");
                    counts.1 += 1;
                    &deployments
                }
                other => panic!("{at}: unexpected kind {other:?}"),
            };
            if let Err(errors) = validator.validate(schema, &document, None) {
                panic!("{at} breaks the CRD's rules: {errors}");
            }
            assert_eq!(
                document.get("status"),
                None::<&Value>,
                "{at}: examples carry no status"
            );
        }
    }
    println!(
        "{} pools, {} deployments in {} files",
        counts.0,
        counts.1,
        files.len()
    );
    assert!(
        counts.0 >= 6 && counts.1 >= 2,
        "examples lost documents: {counts:?}"
    );
}
