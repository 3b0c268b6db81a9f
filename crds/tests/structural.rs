//! Static checks that the generated schemas are structural schemas the API server
//! accepts (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema),
//! without an API server.

mod support;

use serde_json::{Map, Value};
use support::{deployment_schema, pool_schema, schema_of};

/// Formats the API server knows; any other is ignored by it (and warned about).
const KNOWN_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "binary",
    "date",
    "date-time",
    "duration",
    "password",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
];

/// Keys a structural schema must not use anywhere (kube inlines everything; the
/// combinators are only allowed in narrow forms we do not need).
const FORBIDDEN_KEYS: &[&str] = &[
    "$ref",
    "$defs",
    "definitions",
    "$schema",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "uniqueItems",
    "patternProperties",
    "dependencies",
    "const",
];

fn walk(path: &str, node: &Map<String, Value>, problems: &mut Vec<String>) {
    for key in FORBIDDEN_KEYS {
        if node.contains_key(*key) {
            problems.push(format!("{path}: uses `{key}`"));
        }
    }
    let int_or_string = node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let ty = node.get("type").and_then(Value::as_str);
    if ty.is_none() && !int_or_string && !preserve {
        problems.push(format!("{path}: no `type`"));
    }
    if let Some(format) = node.get("format").and_then(Value::as_str)
        && !KNOWN_FORMATS.contains(&format)
    {
        problems.push(format!(
            "{path}: format `{format}` is not one the API server knows"
        ));
    }
    if let Some(default) = node.get("default") {
        check_value(&format!("{path} (default)"), node, default, problems);
    }
    if let Some(Value::Array(values)) = node.get("enum") {
        for value in values {
            check_value(&format!("{path} (enum)"), node, value, problems);
        }
    }

    let properties = node.get("properties").and_then(Value::as_object);
    match node.get("additionalProperties") {
        None => {}
        Some(Value::Object(sub)) => {
            if properties.is_some() {
                problems.push(format!("{path}: both properties and additionalProperties"));
            }
            walk(&format!("{path}.*"), sub, problems);
        }
        Some(other) => problems.push(format!("{path}: additionalProperties is `{other}`")),
    }
    if let Some(properties) = properties {
        if ty != Some("object") {
            problems.push(format!("{path}: properties on a non-object"));
        }
        for (name, sub) in properties {
            match sub.as_object() {
                Some(sub) => walk(&format!("{path}.{name}"), sub, problems),
                None => problems.push(format!("{path}.{name}: not a schema object")),
            }
        }
    }
    if let Some(Value::Array(required)) = node.get("required") {
        for name in required.iter().filter_map(Value::as_str) {
            if !properties.is_some_and(|p| p.contains_key(name)) {
                problems.push(format!(
                    "{path}: requires `{name}`, which it does not define"
                ));
            }
        }
    }
    if ty == Some("array") {
        match node.get("items").and_then(Value::as_object) {
            Some(items) => {
                walk(&format!("{path}[]"), items, problems);
                check_list_type(path, node, items, problems);
            }
            None => problems.push(format!("{path}: array without an items schema")),
        }
    }
    if let Some(Value::Array(rules)) = node.get("x-kubernetes-validations") {
        for rule in rules {
            let message = rule.get("message").and_then(Value::as_str).unwrap_or("");
            if message.is_empty() {
                problems.push(format!("{path}: a CEL rule without a message: {rule}"));
            }
        }
    }
}

/// `x-kubernetes-list-type: map` needs object items whose keys are required (or
/// defaulted) scalars.
fn check_list_type(
    path: &str,
    node: &Map<String, Value>,
    items: &Map<String, Value>,
    problems: &mut Vec<String>,
) {
    if node.get("x-kubernetes-list-type").and_then(Value::as_str) != Some("map") {
        return;
    }
    let keys = node
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if keys.is_empty() {
        problems.push(format!("{path}: list-type map without list-map-keys"));
    }
    let required = items
        .get("required")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for key in keys.iter().filter_map(Value::as_str) {
        let key_schema = items.get("properties").and_then(|p| p.get(key));
        let defaulted = key_schema.is_some_and(|k| k.get("default").is_some());
        if !required.contains(&Value::from(key)) && !defaulted {
            problems.push(format!(
                "{path}: list-map key `{key}` is neither required nor defaulted"
            ));
        }
    }
}

/// A default or enum value must have the node's type.
fn check_value(path: &str, node: &Map<String, Value>, value: &Value, problems: &mut Vec<String>) {
    let ok = match node.get("type").and_then(Value::as_str) {
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.is_array(),
        Some("object") => value.is_object(),
        _ => true,
    };
    if !ok {
        problems.push(format!("{path}: `{value}` does not match the type"));
    }
}

fn structural_problems(schema: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    walk(
        "",
        schema.as_object().expect("a schema object"),
        &mut problems,
    );
    problems
}

#[test]
fn schemas_are_structural() {
    for crd in outrigger_crds::crds() {
        let schema = schema_of(&crd);
        let problems = structural_problems(&schema);
        assert!(
            problems.is_empty(),
            "{} is not a structural schema:\n{}",
            crd.metadata.name.unwrap_or_default(),
            problems.join("\n")
        );
        // The API server supplies apiVersion, kind and metadata; a schema that
        // declares metadata may only say it is an object.
        let root = schema["properties"].as_object().unwrap();
        for key in ["spec", "status"] {
            assert!(root.contains_key(key), "root schema lacks `{key}`");
        }
        if let Some(metadata) = root.get("metadata") {
            assert_eq!(metadata, &serde_json::json!({"type": "object"}));
        }
    }
}

#[test]
fn the_checker_finds_problems() {
    let bad = serde_json::json!({
        "type": "object",
        "properties": {
            "a": {"$ref": "#/definitions/A"},
            "b": {"type": "integer", "format": "uint32", "default": "x"},
            "c": {"type": "array"},
        },
        "additionalProperties": false,
        "required": ["d"],
    });
    let problems = structural_problems(&bad);
    assert_eq!(problems.len(), 7, "{problems:#?}");
}

/// Every field of our own (outside the embedded PodTemplateSpec and the
/// k8s-openapi types) has a description, so `kubectl explain` says what it is.
#[test]
fn own_fields_are_documented() {
    fn walk(path: &str, node: &Value, missing: &mut Vec<String>) {
        if node.get("description").is_none() {
            missing.push(path.to_string());
        }
        let Some(properties) = node.get("properties").and_then(Value::as_object) else {
            return;
        };
        for (name, sub) in properties {
            let sub_path = format!("{path}.{name}");
            // Embedded Kubernetes types document themselves (or are stripped on purpose).
            let embedded = matches!(
                sub_path.as_str(),
                ".spec.template" | ".spec.taints" | ".status.conditions"
            );
            if embedded {
                if sub.get("description").is_none() {
                    missing.push(sub_path);
                }
                continue;
            }
            walk(&sub_path, sub, missing);
            if let Some(items) = sub.get("items").filter(|i| i.get("properties").is_some()) {
                walk(&format!("{sub_path}[]"), items, missing);
            }
        }
    }
    for schema in [pool_schema(), deployment_schema()] {
        let mut missing = Vec::new();
        walk("", &schema, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }
}

#[test]
fn embedded_template_has_no_descriptions_inside() {
    fn count(node: &Value) -> usize {
        match node {
            Value::Object(map) => {
                map.get("description")
                    .map_or(0, |d| usize::from(d.is_string()))
                    + map.values().map(count).sum::<usize>()
            }
            Value::Array(values) => values.iter().map(count).sum(),
            _ => 0,
        }
    }
    let template = &deployment_schema()["properties"]["spec"]["properties"]["template"];
    assert!(
        template["description"].is_string(),
        "the template field itself is documented"
    );
    let inside = count(&template["properties"]);
    assert_eq!(
        inside, 0,
        "descriptions inside the embedded PodTemplateSpec"
    );
    // The structure stays, so the API server still validates the template.
    let containers = &template["properties"]["spec"]["properties"]["containers"];
    assert_eq!(containers["type"], "array");
    assert!(containers["items"]["properties"]["image"].is_object());
}
