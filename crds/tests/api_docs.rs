//! `docs/api.md` is generated from the CRD schemas, and this test keeps it so: it
//! renders the reference and fails when the committed file differs. To update it:
//!
//!     OUTRIGGER_WRITE_DOCS=1 cargo test -p outrigger-crds --test api_docs

mod support;

use std::fmt::Write as _;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use outrigger_crds::crds;
use serde_json::Value;
use support::{repo_root, schema_of};

const HEADER: &str = "<!-- Generated from the CRD schemas by crds/tests/api_docs.rs; do not edit.\n     Update: OUTRIGGER_WRITE_DOCS=1 cargo test -p outrigger-crds --test api_docs -->\n";

/// Fields whose schema is Kubernetes' own: named, not expanded.
const KUBERNETES_TYPES: &[(&str, &str)] = &[
    (
        "spec.template",
        "a Kubernetes `PodTemplateSpec` (the inference server's pod; validated by the API server)",
    ),
    ("metadata", "a Kubernetes `ObjectMeta`"),
];

fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn type_of(schema: &Value) -> String {
    match schema["type"].as_str() {
        Some("array") => format!("[]{}", type_of(&schema["items"])),
        Some("object") if schema.get("properties").is_none() => {
            match schema.get("additionalProperties") {
                Some(v) if v.is_object() => format!("map[string]{}", type_of(v)),
                _ => "object".to_string(),
            }
        }
        Some(t) => match schema["format"].as_str() {
            Some(f) => format!("{t} ({f})"),
            None => t.to_string(),
        },
        None if schema["x-kubernetes-int-or-string"] == true => "int or string".to_string(),
        None => "any".to_string(),
    }
}

/// Limits and defaults in words.
fn constraints(schema: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(values) = schema["enum"].as_array() {
        let values: Vec<String> = values.iter().map(|v| format!("`{}`", plain(v))).collect();
        parts.push(format!("one of {}", values.join(", ")));
    }
    for (key, word) in [
        ("minimum", "min"),
        ("maximum", "max"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
    ] {
        if let Some(v) = schema.get(key).and_then(Value::as_f64) {
            // Whole numbers without the ".0" JSON gives them.
            parts.push(if v.fract() == 0.0 && v.abs() < 1e15 {
                format!("{word} {}", v as i64)
            } else {
                format!("{word} {v}")
            });
        }
    }
    if let Some(p) = schema["pattern"].as_str() {
        parts.push(format!("pattern `{p}`"));
    }
    if let Some(d) = schema.get("default") {
        parts.push(format!("default `{d}`"));
    }
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        for rule in rules {
            let message = rule["message"].as_str().unwrap_or_default();
            parts.push(if message.is_empty() {
                format!("rule `{}`", plain(&rule["rule"]))
            } else {
                format!("rule: {message}")
            });
        }
    }
    one_line(&parts.join("; "))
}

fn plain(v: &Value) -> String {
    v.as_str()
        .map_or_else(|| v.to_string(), ToString::to_string)
}

fn rows(schema: &Value, path: &str, required: bool, out: &mut String) {
    let note = KUBERNETES_TYPES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, n)| *n);
    let description = note.map_or_else(
        || one_line(schema["description"].as_str().unwrap_or_default()),
        ToString::to_string,
    );
    if !path.is_empty() {
        let _ = writeln!(
            out,
            "| `{path}` | {} | {} | {description} | {} |",
            type_of(schema),
            if required { "yes" } else { "" },
            constraints(schema),
        );
    }
    if note.is_some() {
        return;
    }
    let object = if schema["type"] == "array" {
        &schema["items"]
    } else {
        schema
    };
    let Some(properties) = object["properties"].as_object() else {
        return;
    };
    let needed: Vec<&str> = object["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let prefix = match (path, schema["type"].as_str()) {
        ("", _) => String::new(),
        (p, Some("array")) => format!("{p}[]."),
        (p, _) => format!("{p}."),
    };
    for (name, child) in properties {
        if path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind") {
            continue;
        }
        rows(
            child,
            &format!("{prefix}{name}"),
            needed.contains(&name.as_str()),
            out,
        );
    }
}

fn render_crd(crd: &CustomResourceDefinition, out: &mut String) {
    let names = &crd.spec.names;
    let version = &crd.spec.versions[0];
    let _ = writeln!(out, "## {}\n", names.kind);
    let _ = writeln!(
        out,
        "`apiVersion: {}/{}`, `kind: {}`, {} (plural `{}`, short name {}).\n",
        crd.spec.group,
        version.name,
        names.kind,
        if crd.spec.scope == "Namespaced" {
            "namespaced"
        } else {
            "cluster-scoped"
        },
        names.plural,
        names
            .short_names
            .as_ref()
            .map(|s| {
                s.iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
    );
    let schema = schema_of(crd);
    let _ = writeln!(
        out,
        "{}\n",
        one_line(schema["description"].as_str().unwrap_or_default())
    );
    if let Some(columns) = &version.additional_printer_columns {
        let shown: Vec<String> = columns
            .iter()
            .map(|c| {
                if c.priority.unwrap_or(0) > 0 {
                    format!("{} (`-o wide`)", c.name)
                } else {
                    c.name.clone()
                }
            })
            .collect();
        let _ = writeln!(out, "`kubectl get` columns: {}.\n", shown.join(", "));
    }
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        let _ = writeln!(out, "Rules on the whole object:\n");
        for rule in rules {
            let _ = writeln!(
                out,
                "- {} (`{}`)",
                one_line(rule["message"].as_str().unwrap_or_default()),
                plain(&rule["rule"])
            );
        }
        out.push('\n');
    }
    for part in ["spec", "status"] {
        let Some(sub) = schema["properties"].get(part) else {
            continue;
        };
        let _ = writeln!(out, "### {} `{part}`\n", names.kind);
        let _ = writeln!(
            out,
            "| field | type | required | description | limits and defaults |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        rows(sub, part, false, out);
        out.push('\n');
    }
}

fn render() -> String {
    let mut out = String::from(HEADER);
    out.push_str("\n# API reference (`outrigger.dev/v1alpha1`)\n\n");
    out.push_str(
        "Every field of Outrigger's two resources, from the CRD schemas the API server \
         validates against (`crds/*.yaml`). Rules marked \"rule\" are CEL validations: the API \
         server refuses an object that breaks one, with the message shown. How placement \
         reads these fields is in [placement.md](placement.md).\n\n",
    );
    for crd in crds() {
        render_crd(&crd, &mut out);
    }
    out.trim_end().to_string() + "\n"
}

#[test]
fn api_reference_matches_the_crd_schemas() {
    let path = repo_root().join("docs/api.md");
    let generated = render();
    if std::env::var("OUTRIGGER_WRITE_DOCS").as_deref() == Ok("1") {
        std::fs::write(&path, &generated).expect("docs/api.md written");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/api.md differs from the CRD schemas; run \
         `OUTRIGGER_WRITE_DOCS=1 cargo test -p outrigger-crds --test api_docs` and commit it"
    );
}
