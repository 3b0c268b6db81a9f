//! Schema adjustments that kube's derive does not make on its own.
//!
//! - The embedded `PodTemplateSpec` loses its descriptions: they are most of the
//!   CRD's size, and the client-side `kubectl apply` annotation caps an object at
//!   262 144 bytes.
//! - Rust-only integer formats (`uint32`, ...) become plain bounds the API server
//!   understands.
//! - Doc comments, hard-wrapped in the source, become one line per paragraph, so
//!   `kubectl explain` wraps them to the terminal instead of at our column 90.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use schemars::{Schema, SchemaGenerator};
use serde_json::{Map, Value};

/// Schema of a `PodTemplateSpec` with the same structure as k8s-openapi's (so the
/// API server still validates and prunes the template) but without any
/// `description` inside it. The field that embeds it keeps its own description.
pub(crate) fn pod_template(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<PodTemplateSpec>();
    if let Some(object) = schema.as_object_mut() {
        strip_descriptions(object);
    }
    schema
}

/// Removes `description` from a schema object and every schema nested in it.
/// Walks schema positions only, so a property that happens to be *named*
/// `description` is kept.
fn strip_descriptions(schema: &mut Map<String, Value>) {
    schema.remove("description");
    for_each_subschema(schema, &mut strip_descriptions);
}

/// Adapts a schemars schema to Kubernetes conventions: Rust integer formats become
/// bounds, and hard-wrapped doc comments become one line per paragraph.
///
/// Used as a container-level `#[schemars(transform = ...)]` on specs and statuses; it
/// walks the whole subtree, so the top of a spec or status covers every field.
pub(crate) fn kubernetes_conventions(schema: &mut Schema) {
    if let Some(object) = schema.as_object_mut() {
        adapt(object);
    }
}

fn adapt(schema: &mut Map<String, Value>) {
    rewrite_format(schema);
    if let Some(Value::String(description)) = schema.get_mut("description") {
        *description = unwrap_paragraphs(description);
    }
    for_each_subschema(schema, &mut adapt);
}

/// Schemars names formats after Rust types (`uint32`, `uint16`, ...). They are not
/// OpenAPI formats the API server knows: it drops them, so they validate nothing.
/// Say the same thing with `minimum`/`maximum` instead.
fn rewrite_format(schema: &mut Map<String, Value>) {
    let max = match schema.get("format").and_then(Value::as_str) {
        Some("uint8") => Some(Some(u64::from(u8::MAX))),
        Some("uint16") => Some(Some(u64::from(u16::MAX))),
        Some("uint32") => Some(Some(u64::from(u32::MAX))),
        // The API server reads integers as int64 already. A maximum of i64::MAX
        // would reach it as a float (the CRD type holds bounds as f64), and it then
        // refuses every value with "Maximum boundary value must be of type integer".
        Some("uint64" | "uint") => Some(None),
        _ => None,
    };
    if let Some(max) = max {
        schema.remove("format");
        schema.entry("minimum").or_insert(Value::from(0));
        if let Some(max) = max {
            schema.entry("maximum").or_insert(Value::from(max));
        }
    }
}

/// Joins the lines of each paragraph with spaces. Paragraphs (blank-line separated)
/// that look like lists or code (a line starting with `-`, `*`, a space or a code
/// fence) are kept as they are.
fn unwrap_paragraphs(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            let keep = paragraph
                .lines()
                .skip(1)
                .any(|line| line.starts_with(['-', '*', ' ']) || line.starts_with("```"));
            if keep {
                paragraph.to_string()
            } else {
                paragraph
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Calls `f` on every direct subschema of `schema` (properties, items,
/// additionalProperties, combinators).
fn for_each_subschema(schema: &mut Map<String, Value>, f: &mut dyn FnMut(&mut Map<String, Value>)) {
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        for property in properties.values_mut() {
            if let Value::Object(property) = property {
                f(property);
            }
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        match schema.get_mut(key) {
            Some(Value::Object(sub)) => f(sub),
            Some(Value::Array(subs)) => subs
                .iter_mut()
                .filter_map(Value::as_object_mut)
                .for_each(&mut *f),
            _ => {}
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = schema.get_mut(key) {
            subs.iter_mut()
                .filter_map(Value::as_object_mut)
                .for_each(&mut *f);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strips_descriptions_but_not_properties_named_description() {
        let mut schema = json!({
            "description": "top",
            "type": "object",
            "properties": {
                "description": {"type": "string", "description": "a field named description"},
                "list": {"type": "array", "items": {"type": "object", "description": "item"}},
                "map": {"type": "object", "additionalProperties": {"type": "string", "description": "v"}},
            }
        });
        strip_descriptions(schema.as_object_mut().unwrap());
        assert_eq!(
            schema,
            json!({
                "type": "object",
                "properties": {
                    "description": {"type": "string"},
                    "list": {"type": "array", "items": {"type": "object"}},
                    "map": {"type": "object", "additionalProperties": {"type": "string"}},
                }
            })
        );
    }

    #[test]
    fn paragraphs_are_unwrapped_lists_kept() {
        assert_eq!(
            unwrap_paragraphs("one\ntwo\n\nthree\n- a\n- b"),
            "one two\n\nthree\n- a\n- b"
        );
        assert_eq!(unwrap_paragraphs("single line"), "single line");
    }

    #[test]
    fn rust_formats_become_bounds() {
        let mut schema = Schema::try_from(json!({
            "type": "object",
            "properties": {
                "a": {"type": "integer", "format": "uint32", "minimum": 1},
                "b": {"type": "integer", "format": "uint16", "minimum": 0, "maximum": 65535},
                "c": {"type": "integer", "format": "int32"},
            }
        }))
        .unwrap();
        kubernetes_conventions(&mut schema);
        assert_eq!(
            schema.to_value(),
            json!({
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 1, "maximum": 4_294_967_295_u64},
                    "b": {"type": "integer", "minimum": 0, "maximum": 65535},
                    "c": {"type": "integer", "format": "int32"},
                }
            })
        );
    }
}
