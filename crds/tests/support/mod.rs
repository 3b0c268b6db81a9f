//! Shared by the integration tests of `outrigger-crds`.
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use outrigger_crds::{GpuNodePool, ModelDeployment};
use serde_json::Value;

/// The workspace root (the parent of `crds/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds/ has a parent")
        .to_path_buf()
}

/// The `openAPIV3Schema` of a CRD, as JSON.
pub fn schema_of(crd: &CustomResourceDefinition) -> Value {
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has an openAPIV3Schema");
    serde_json::to_value(schema).expect("a schema serializes")
}

pub fn pool_schema() -> Value {
    schema_of(&GpuNodePool::crd())
}

pub fn deployment_schema() -> Value {
    schema_of(&ModelDeployment::crd())
}

pub fn peer_schema() -> Value {
    schema_of(&outrigger_crds::PeerCluster::crd())
}

/// Parses every document of a multi-document YAML string.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(text).expect("valid YAML")
}
