//! The committed CRD files are exactly what the types generate.

mod support;

use std::fs;
use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use outrigger_crds::{GENERATED_HEADER, crd_files, crds};
use support::repo_root;

/// `kubectl apply` (client-side) stores the whole object, as JSON, in the
/// `kubectl.kubernetes.io/last-applied-configuration` annotation, and annotations are
/// capped at 262 144 bytes in total. Stay well below so the CRDs can grow.
const MAX_CRD_JSON_BYTES: usize = 150_000;

/// Compares the generated files with the ones in `dir` (relative to the repository).
fn assert_matches_generated(dir: &str) {
    let dir_path = repo_root().join(dir);
    for file in crd_files() {
        let path = dir_path.join(&file.file_name);
        let committed = fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == file.contents,
            "{dir}/{} is missing or differs from the types in crds/src; \
             run `cargo run -p outrigger -- crd --write {dir}` and commit the result",
            file.file_name,
        );
    }
}

#[test]
fn committed_crds_match_the_types() {
    assert_matches_generated("crds");
}

#[test]
fn chart_crds_match_the_types() {
    let chart_crds = "charts/outrigger/crds";
    if !Path::new(&repo_root().join(chart_crds)).is_dir() {
        eprintln!("{chart_crds}/ does not exist; nothing to compare");
        return;
    }
    assert_matches_generated(chart_crds);
}

#[test]
fn generated_files_are_named_after_the_plural() {
    let names: Vec<String> = crd_files().into_iter().map(|f| f.file_name).collect();
    assert_eq!(
        names,
        [
            "gpunodepools.yaml",
            "modeldeployments.yaml",
            "peerclusters.yaml"
        ]
    );
    for file in crd_files() {
        assert!(file.contents.starts_with(GENERATED_HEADER));
    }
}

#[test]
fn crd_yaml_reads_back_as_the_same_crd() {
    for (file, crd) in crd_files().iter().zip(crds()) {
        let parsed: CustomResourceDefinition =
            serde_saphyr::from_str(&file.contents).expect("the generated YAML parses");
        assert_eq!(
            parsed, crd,
            "{} does not read back as the CRD",
            file.file_name
        );
    }
}

#[test]
fn crds_fit_in_the_last_applied_annotation() {
    for crd in crds() {
        let json = serde_json::to_string(&crd).unwrap();
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        println!("{name}: {} bytes of JSON", json.len());
        assert!(
            json.len() < MAX_CRD_JSON_BYTES,
            "{name} is {} bytes as JSON, over the {MAX_CRD_JSON_BYTES}-byte budget \
             (client-side kubectl apply fails above 262144)",
            json.len()
        );
    }
}
