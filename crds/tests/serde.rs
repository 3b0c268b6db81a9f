//! The serde side of the types: YAML round trips, defaults, strict specs, and the
//! effective node selector.

use std::collections::BTreeMap;

use outrigger_crds::{
    CapacityType, FailoverSpec, GpuNodePool, ModelDeployment, PlacementSpec, Provider, SpreadBy,
    Strategy, WhenUnsatisfiable,
};

const POOL: &str = r#"
apiVersion: outrigger.dev/v1alpha1
kind: GpuNodePool
metadata:
  name: aws-use1a-h100
spec:
  provider: aws
  region: us-east-1
  zone: us-east-1a
  instanceType: p5.48xlarge
  gpu: {type: H100, count: 8, memoryGiB: 80}
  capacityType: spot
  pricePerNodeHour: 39.0
  nodes: {min: 0, max: 8}
  taints:
  - {key: nvidia.com/gpu, value: "true", effect: NoSchedule}
  scaling:
    aws:
      launchTemplate: {name: gpu-h100, version: "$Latest"}
      subnetIds: [subnet-1]
status:
  nodes: 3
  readyNodes: 2
  gpus: {allocatable: 16, requested: 12}
  desiredNodes: 4
  cloudInstances: 4
  conditions:
  - type: Ready
    status: "False"
    reason: NodesNotReady
    message: 1 of 3 nodes is not Ready
    lastTransitionTime: "2026-01-02T03:04:05Z"
"#;

const DEPLOYMENT: &str = r#"
apiVersion: outrigger.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: llama
  namespace: default
spec:
  replicas: 6
  gpu: {count: 4, types: [H100, A100-80GB]}
  template:
    metadata:
      labels: {app: llama}
    spec:
      containers:
      - name: vllm
        image: vllm/vllm-openai:v0.10.1
        args: [--model, meta-llama/Llama-3.3-70B-Instruct]
  placement:
    providers: [aws, azure]
    regions: [us-east-1, eastus]
    capacityTypes: [on-demand, spot]
    strategy: balanced
    spread:
    - {by: provider, minGroups: 2, maxShare: 60}
    - {by: zone, minGroups: 3}
    whenUnsatisfiable: DoNotSchedule
  failover: {unhealthyAfterSeconds: 30, rebalanceAfterSeconds: 600}
  service: {port: 8000}
status:
  observedGeneration: 3
  replicas: 6
  readyReplicas: 5
  unplacedReplicas: 0
  placements:
  - {pool: aws-use1a-h100, provider: aws, region: us-east-1, zone: us-east-1a, replicas: 3, readyReplicas: 3}
  - {pool: azure-eastus-h100, provider: azure, region: eastus, zone: "1", replicas: 3, readyReplicas: 2}
  providers: aws=3 azure=3
  costPerHour: 123.4
  conditions:
  - type: Diversified
    status: "True"
    reason: SpreadRulesMet
    message: 2 providers, 50% on the largest
    lastTransitionTime: "2026-01-02T03:04:05Z"
"#;

#[test]
fn pool_round_trips_through_yaml() {
    let pool: GpuNodePool = serde_saphyr::from_str(POOL).unwrap();
    assert_eq!(pool.spec.provider, Provider::Aws);
    assert_eq!(pool.spec.capacity_type, CapacityType::Spot);
    assert_eq!(pool.spec.gpu.memory_gib, Some(80));
    assert_eq!(pool.spec.taints[0].effect, "NoSchedule");
    let aws = pool
        .spec
        .scaling
        .as_ref()
        .and_then(|s| s.aws.as_ref())
        .unwrap();
    assert_eq!(aws.launch_template.version.as_deref(), Some("$Latest"));
    let status = pool.status.as_ref().unwrap();
    assert_eq!(status.gpus.unwrap().requested, 12);
    assert_eq!(status.conditions[0].type_, "Ready");

    let yaml = serde_saphyr::to_string(&pool).unwrap();
    let again: GpuNodePool = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(again, pool);
}

#[test]
fn deployment_round_trips_through_yaml() {
    let md: ModelDeployment = serde_saphyr::from_str(DEPLOYMENT).unwrap();
    assert_eq!(md.spec.placement.strategy, Strategy::Balanced);
    assert_eq!(md.spec.placement.spread[1].by, SpreadBy::Zone);
    assert_eq!(
        md.spec.placement.spread[1].max_share, 100,
        "default maxShare"
    );
    assert_eq!(
        md.spec.placement.when_unsatisfiable,
        WhenUnsatisfiable::DoNotSchedule
    );
    assert_eq!(md.spec.service.unwrap().port, 8000);
    let status = md.status.as_ref().unwrap();
    assert_eq!(status.placements[1].zone.as_deref(), Some("1"));
    assert_eq!(status.providers.as_deref(), Some("aws=3 azure=3"));

    let yaml = serde_saphyr::to_string(&md).unwrap();
    let again: ModelDeployment = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(again, md);
}

#[test]
fn absent_fields_get_their_defaults() {
    let pool: GpuNodePool = serde_saphyr::from_str(
        r#"
apiVersion: outrigger.dev/v1alpha1
kind: GpuNodePool
metadata: {name: bare}
spec:
  provider: azure
  region: eastus
  instanceType: Standard_ND96isr_H100_v5
  gpu: {type: H100, count: 8}
  nodes: {min: 0, max: 2}
"#,
    )
    .unwrap();
    assert_eq!(pool.spec.capacity_type, CapacityType::OnDemand);
    assert!(pool.spec.taints.is_empty());
    assert_eq!(pool.spec.zone, None);
    assert_eq!(pool.spec.scaling, None);
    assert_eq!(pool.status, None);

    let md: ModelDeployment = serde_saphyr::from_str(
        r#"
apiVersion: outrigger.dev/v1alpha1
kind: ModelDeployment
metadata: {name: bare, namespace: default}
spec:
  replicas: 1
  gpu: {count: 1}
  template: {spec: {containers: [{name: c, image: i}]}}
"#,
    )
    .unwrap();
    assert!(md.spec.gpu.types.is_empty());
    assert_eq!(md.spec.placement, PlacementSpec::default());
    assert_eq!(md.spec.placement.capacity_types, [CapacityType::OnDemand]);
    assert_eq!(md.spec.placement.strategy, Strategy::Cost);
    assert_eq!(
        md.spec.placement.when_unsatisfiable,
        WhenUnsatisfiable::ScheduleAnyway
    );
    assert_eq!(md.spec.failover, FailoverSpec::default());
    assert_eq!(md.spec.failover.unhealthy_after_seconds, 15);
    assert_eq!(md.spec.failover.rebalance_after_seconds, 300);
    assert_eq!(md.spec.service, None);

    let rule: outrigger_crds::SpreadRule = serde_json::from_str(r#"{"by": "pool"}"#).unwrap();
    assert_eq!((rule.min_groups, rule.max_share), (1, 100));
}

/// The schema carries the same defaults, so the API server fills them in too.
#[test]
fn schema_defaults_match_serde_defaults() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(ModelDeployment::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let placement = &spec["properties"]["placement"];
    assert_eq!(
        placement["default"],
        serde_json::to_value(PlacementSpec::default()).unwrap()
    );
    assert_eq!(
        placement["properties"]["capacityTypes"]["default"],
        serde_json::json!(["on-demand"])
    );
    assert_eq!(placement["properties"]["strategy"]["default"], "cost");
    assert_eq!(
        placement["properties"]["whenUnsatisfiable"]["default"],
        "ScheduleAnyway"
    );
    let rule = &placement["properties"]["spread"]["items"]["properties"];
    assert_eq!(rule["minGroups"]["default"], 1);
    assert_eq!(rule["maxShare"]["default"], 100);
    assert_eq!(
        spec["properties"]["failover"]["default"],
        serde_json::to_value(FailoverSpec::default()).unwrap()
    );

    let crd = serde_json::to_value(GpuNodePool::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["capacityType"]["default"], "on-demand");
}

#[test]
fn unknown_spec_fields_are_refused() {
    let typo = POOL.replace("instanceType:", "instancetype: x\n  instanceType:");
    let err = serde_saphyr::from_str::<GpuNodePool>(&typo).unwrap_err();
    assert!(err.to_string().contains("instancetype"), "{err}");

    let typo = DEPLOYMENT.replace("minGroups: 3}", "minGroup: 3}");
    let err = serde_saphyr::from_str::<ModelDeployment>(&typo).unwrap_err();
    assert!(err.to_string().contains("minGroup"), "{err}");
}

#[test]
fn status_and_metadata_stay_lenient() {
    let extra = POOL.replace(
        "  cloudInstances: 4",
        "  cloudInstances: 4\n  newerField: 1",
    );
    serde_saphyr::from_str::<GpuNodePool>(&extra).expect("unknown status fields are ignored");
}

#[test]
fn node_selector_defaults_to_the_pool_label() {
    let mut pool: GpuNodePool = serde_saphyr::from_str(POOL).unwrap();
    assert_eq!(
        pool.node_selector(),
        BTreeMap::from([(
            "outrigger.dev/pool".to_string(),
            "aws-use1a-h100".to_string()
        )])
    );
    pool.spec.node_selector = Some(BTreeMap::new());
    assert_eq!(pool.node_selector()["outrigger.dev/pool"], "aws-use1a-h100");
    let own = BTreeMap::from([(
        "node.kubernetes.io/instance-type".to_string(),
        "p5.48xlarge".to_string(),
    )]);
    pool.spec.node_selector = Some(own.clone());
    assert_eq!(pool.node_selector(), own);
}
