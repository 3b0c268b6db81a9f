//! The CEL rules (`x-kubernetes-validations`) of the generated CRDs, evaluated
//! client-side with kube's CEL engine: valid objects pass, each kind of mistake is
//! refused with a message that names the field and the fix.

mod support;

use kube::core::cel::{ScopeContext, Validator, WarningKind, analyze_rule, compile_schema};
use serde_json::{Value, json};
use support::{deployment_schema, peer_schema, pool_schema};

fn aws_pool() -> Value {
    json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "GpuNodePool",
        "metadata": {"name": "aws-use1a-h100"},
        "spec": {
            "provider": "aws",
            "region": "us-east-1",
            "zone": "us-east-1a",
            "instanceType": "p5.48xlarge",
            "gpu": {"type": "H100", "count": 8, "memoryGiB": 80},
            "nodes": {"min": 0, "max": 4},
            "scaling": {"aws": {"launchTemplate": {"name": "gpu-h100"}, "subnetIds": ["subnet-1"]}},
        },
    })
}

fn azure_pool() -> Value {
    json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "GpuNodePool",
        "metadata": {"name": "azure-eastus-h100"},
        "spec": {
            "provider": "azure",
            "region": "eastus",
            "zone": "1",
            "instanceType": "Standard_ND96isr_H100_v5",
            "gpu": {"type": "H100", "count": 8},
            "nodes": {"min": 0, "max": 4},
            "scaling": {"azure": {
                "subscriptionId": "00000000-0000-0000-0000-000000000000",
                "resourceGroup": "gpu",
                "scaleSetName": "h100",
            }},
        },
    })
}

fn aks_pool() -> Value {
    with(
        azure_pool(),
        "/spec/scaling/azure",
        Some(json!({"agentPool": {
            "subscriptionId": "00000000-0000-0000-0000-000000000000",
            "resourceGroup": "llm",
            "cluster": "aks-east",
            "name": "h100",
        }})),
    )
}

fn deployment() -> Value {
    json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llama", "namespace": "default"},
        "spec": {
            "replicas": 6,
            "gpu": {"count": 4, "types": ["H100"]},
            "template": {"spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}},
            "placement": {"spread": [{"by": "provider", "minGroups": 2, "maxShare": 60}]},
            "service": {"port": 8000},
        },
    })
}

/// Sets (or, with `None`, removes) the field at a JSON pointer; parents must exist.
fn with(mut object: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    let parent = object
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("no object at {parent}"));
    match value {
        Some(value) => parent.insert(key.to_string(), value),
        None => parent.remove(key),
    };
    object
}

/// The messages of the rules `object` breaks.
fn broken_rules(schema: &Value, object: &Value) -> Vec<String> {
    match Validator::new().validate(schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

fn assert_refused(schema: &Value, object: &Value, expected: &str) {
    let broken = broken_rules(schema, object);
    assert!(
        !broken.is_empty() && broken.iter().all(|m| m.contains(expected)),
        "expected only {expected:?}, got {broken:?} for {object}"
    );
}

#[test]
fn valid_pools_pass() {
    let schema = pool_schema();
    let without_scaling = with(aws_pool(), "/spec/scaling", None);
    let without_zone = with(aws_pool(), "/spec/zone", None);
    let own_selector = with(
        aws_pool(),
        "/spec/nodeSelector",
        Some(json!({"gpu": "h100"})),
    );
    let lifecycle = with(
        with(
            aws_pool(),
            "/spec/repair",
            Some(json!({"notReadyAfterSeconds": 0})),
        ),
        "/spec/registrationTimeoutSeconds",
        Some(json!(600)),
    );
    for pool in [
        aws_pool(),
        azure_pool(),
        aks_pool(),
        without_scaling,
        without_zone,
        own_selector,
        lifecycle,
    ] {
        assert_eq!(broken_rules(&schema, &pool), Vec::<String>::new(), "{pool}");
    }
}

#[test]
fn pool_rules_refuse_mistakes() {
    let schema = pool_schema();
    let azure_block = azure_pool()["spec"]["scaling"]["azure"].clone();
    let aws_block = aws_pool()["spec"]["scaling"]["aws"].clone();
    let cases = [
        (
            with(aws_pool(), "/spec/nodes", Some(json!({"min": 5, "max": 4}))),
            "nodes.min must be <= nodes.max",
        ),
        (
            with(aws_pool(), "/spec/gpu/count", Some(json!(0))),
            "gpu.count (GPUs per node) must be at least 1",
        ),
        (
            with(
                aws_pool(),
                "/spec/scaling",
                Some(json!({"azure": azure_block})),
            ),
            "provider is aws, so scaling must set scaling.aws",
        ),
        (
            with(aws_pool(), "/spec/scaling/azure", Some(azure_block.clone())),
            "provider is aws, so scaling must set scaling.aws (and not scaling.azure)",
        ),
        (
            with(aws_pool(), "/spec/scaling", Some(json!({}))),
            "provider is aws, so scaling must set scaling.aws",
        ),
        (
            with(
                azure_pool(),
                "/spec/scaling",
                Some(json!({"aws": aws_block})),
            ),
            "provider is azure, so scaling must set scaling.azure",
        ),
        (
            with(
                azure_pool(),
                "/spec/scaling/azure/agentPool",
                Some(aks_pool()["spec"]["scaling"]["azure"]["agentPool"].clone()),
            ),
            "scaling.azure needs exactly one of scaleSetName (a VM scale set) and agentPool",
        ),
        (
            with(aks_pool(), "/spec/scaling/azure/agentPool", None),
            "scaling.azure needs exactly one of scaleSetName (a VM scale set) and agentPool",
        ),
        (
            with(azure_pool(), "/spec/scaling/azure/resourceGroup", None),
            "scaling.azure.scaleSetName needs subscriptionId and resourceGroup",
        ),
        (
            with(
                aks_pool(),
                "/spec/scaling/azure/resourceGroup",
                Some(json!("llm")),
            ),
            "with scaling.azure.agentPool, set subscriptionId and resourceGroup inside agentPool",
        ),
        (
            with(azure_pool(), "/spec/zone", Some(json!("eastus-1"))),
            "an azure zone is \"1\", \"2\" or \"3\"",
        ),
        (
            with(aws_pool(), "/spec/zone", Some(json!("us-west-2a"))),
            "an aws zone is its region plus a suffix",
        ),
        (
            with(aws_pool(), "/spec/zone", Some(json!("us-east-1"))),
            "an aws zone is its region plus a suffix",
        ),
        (
            with(aws_pool(), "/spec/nodeSelector", Some(json!({}))),
            "nodeSelector must name at least one label",
        ),
        (
            with(
                aws_pool(),
                "/spec/registrationTimeoutSeconds",
                Some(json!(5)),
            ),
            "registrationTimeoutSeconds must be 10 to 86400",
        ),
        (
            with(
                aws_pool(),
                "/spec/repair",
                Some(json!({"notReadyAfterSeconds": 100000})),
            ),
            "repair.notReadyAfterSeconds must be 0 (off) to 86400",
        ),
    ];
    for (pool, message) in &cases {
        assert_refused(&schema, pool, message);
    }
}

#[test]
fn pool_errors_point_at_the_field() {
    let pool = with(aws_pool(), "/spec/zone", Some(json!("us-west-2a")));
    let errors = Validator::new()
        .validate(&pool_schema(), &pool, None)
        .unwrap_err();
    assert_eq!(errors[0].field_path, "spec.zone");
}

#[test]
fn valid_deployments_pass() {
    let schema = deployment_schema();
    let minimal = json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {
            "replicas": 0,
            "gpu": {"count": 1},
            "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
    });
    let full_share = with(
        deployment(),
        "/spec/placement/spread",
        Some(json!([{"by": "zone", "minGroups": 3, "maxShare": 100}, {"by": "provider"}])),
    );
    for object in [deployment(), minimal, full_share] {
        assert_eq!(
            broken_rules(&schema, &object),
            Vec::<String>::new(),
            "{object}"
        );
    }
}

#[test]
fn deployment_rules_refuse_mistakes() {
    let schema = deployment_schema();
    let spread = |rule: Value| with(deployment(), "/spec/placement/spread", Some(json!([rule])));
    let cases = [
        (
            with(deployment(), "/spec/replicas", Some(json!(-1))),
            "replicas must be >= 0",
        ),
        (
            with(deployment(), "/spec/gpu/count", Some(json!(0))),
            "gpu.count (GPUs per replica) must be at least 1",
        ),
        (
            spread(json!({"by": "provider", "maxShare": 0})),
            "spread maxShare is a percentage: it must be between 1 and 100",
        ),
        (
            spread(json!({"by": "provider", "maxShare": 101})),
            "spread maxShare is a percentage: it must be between 1 and 100",
        ),
        (
            spread(json!({"by": "zone", "minGroups": 0})),
            "spread minGroups must be at least 1",
        ),
        (
            with(deployment(), "/spec/service/port", Some(json!(0))),
            "service.port must be between 1 and 65535",
        ),
        (
            with(deployment(), "/spec/service/port", Some(json!(70000))),
            "service.port must be between 1 and 65535",
        ),
        (
            with(
                deployment(),
                "/spec/template",
                Some(json!({"metadata": {}})),
            ),
            "template.spec is required",
        ),
        (
            with(
                deployment(),
                "/spec/template/spec/containers",
                Some(json!([])),
            ),
            "template.spec.containers must hold at least one container",
        ),
        (
            with(deployment(), "/metadata/name", Some(json!("m".repeat(64)))),
            "metadata.name must be at most 63 characters",
        ),
    ];
    for (object, message) in &cases {
        assert_refused(&schema, object, message);
    }
    let longest = with(deployment(), "/metadata/name", Some(json!("m".repeat(63))));
    assert_eq!(broken_rules(&schema, &longest), Vec::<String>::new());
}

/// Every rule compiles, uses only `self`/`oldSelf`, and stays inside the API server's
/// cost budget (kube-cel's estimate; the API server computes its own on create).
fn peer() -> Value {
    json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "PeerCluster",
        "metadata": {"name": "aks-prod"},
        "spec": {
            "kubeconfigSecretRef": {"namespace": "outrigger-system", "name": "peer-aks-prod", "key": "kubeconfig"},
            "unreachableAfterSeconds": 10,
            "operatorNamespace": "outrigger-system",
        },
    })
}

#[test]
fn peer_rules_refuse_a_key_that_no_secret_can_have() {
    let schema = peer_schema();
    assert_eq!(broken_rules(&schema, &peer()), Vec::<String>::new());
    assert_refused(
        &schema,
        &with(
            peer(),
            "/spec/kubeconfigSecretRef/key",
            Some(json!("kube config")),
        ),
        "kubeconfigSecretRef.key must be a Secret data key",
    );
}

#[test]
fn rules_compile_and_fit_the_cost_budget() {
    fn walk(node: &Value, path: &str, rules: &mut usize) {
        let Some(object) = node.as_object() else {
            return;
        };
        if let Some(Value::Array(validations)) = object.get("x-kubernetes-validations") {
            let compiled = compile_schema(node);
            assert!(
                !compiled.has_errors(),
                "{path}: {:?}",
                compiled.compilation_errors()
            );
            for validation in validations {
                let rule = validation["rule"].as_str().unwrap();
                let warnings: Vec<_> = analyze_rule(rule, &compiled, ScopeContext::CrdValidation)
                    .into_iter()
                    .filter(|w| {
                        matches!(w.kind, WarningKind::WrongScope | WarningKind::CostExceeded)
                    })
                    .collect();
                assert!(warnings.is_empty(), "{path}: {rule}: {warnings:?}");
                *rules += 1;
            }
        }
        if let Some(Value::Object(properties)) = object.get("properties") {
            for (name, sub) in properties {
                walk(sub, &format!("{path}.{name}"), rules);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(sub) = object.get(key) {
                walk(sub, &format!("{path}[]"), rules);
            }
        }
    }
    let mut rules = 0;
    walk(&pool_schema(), "", &mut rules);
    walk(&deployment_schema(), "", &mut rules);
    walk(&peer_schema(), "", &mut rules);
    assert_eq!(rules, 21, "a rule was added or lost; update the CEL tests");
}
