#!/usr/bin/env python3
"""Writes kubeconform JSON schemas, one file per kind, named as kubeconform's
`{{ .ResourceKind }}{{ .KindSuffix }}.json` template expects
(`deployment-apps-v1.json`, `service-v1.json`, `modeldeployment-outrigger-v1alpha1.json`).

  openapi2schemas.py OUT_DIR --openapi FILE... --crd FILE...

--openapi: OpenAPI v3 documents as the API server serves them (/openapi/v3/<group>/<version>);
--crd: CustomResourceDefinition YAML files (read with `kubectl create --dry-run=client -o json`
by the caller, so only JSON is parsed here).

The schemas are strict, as kubeconform's -strict expects of its schema folder: an
object that lists its properties allows no others, unless it preserves unknown
fields.
"""
import argparse
import copy
import json
import os
import sys


SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
SCHEMAS = ("items", "additionalProperties", "not")


def strict(schema):
    """Returns a schema with JSON-Schema fixes for Kubernetes' OpenAPI dialect, made
    strict. Walks schemas only (a property may be named `nullable` or `anyOf`)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strict(s) for name, s in value.items()}
        elif key in SCHEMA_LISTS and isinstance(value, list):
            out[key] = [strict(s) for s in value]
        elif key in SCHEMAS:
            out[key] = [strict(s) for s in value] if isinstance(value, list) else strict(value)
        else:
            out[key] = value
    if out.get("format") == "int-or-string" or out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("format", None)
        out["anyOf"] = [{"type": "string"}, {"type": "integer"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def file_name(group, version, kind):
    suffix = "-" + group.split(".")[0].lower() if group else ""
    return "%s%s-%s.json" % (kind.lower(), suffix, version.lower())


def from_openapi(path, out_dir):
    with open(path) as f:
        doc = json.load(f)
    schemas = doc.get("components", {}).get("schemas", {})
    # Refs point into components/schemas: keep that section in every file.
    shared = {"components": {"schemas": {k: strict(v) for k, v in schemas.items()}}}
    written = 0
    for name, schema in schemas.items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            body = copy.deepcopy(shared)
            body["$ref"] = "#/components/schemas/" + name
            target = os.path.join(out_dir, file_name(gvk["group"], gvk["version"], gvk["kind"]))
            with open(target, "w") as f:
                json.dump(body, f)
            written += 1
    return written


def from_crd(path, out_dir):
    with open(path) as f:
        crd = json.load(f)
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    written = 0
    for version in crd["spec"]["versions"]:
        schema = strict(version["schema"]["openAPIV3Schema"])
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        schema["additionalProperties"] = False
        target = os.path.join(out_dir, file_name(group, version["name"], kind))
        with open(target, "w") as f:
            json.dump(schema, f)
        written += 1
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--openapi", nargs="*", default=[])
    parser.add_argument("--crd", nargs="*", default=[])
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    n = sum(from_openapi(p, args.out_dir) for p in args.openapi)
    n += sum(from_crd(p, args.out_dir) for p in args.crd)
    if n == 0:
        sys.exit("no schemas written")
    print("%d schemas in %s" % (n, args.out_dir), file=sys.stderr)


if __name__ == "__main__":
    main()
