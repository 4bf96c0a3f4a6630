#!/usr/bin/env python3
"""Schema validation of the manifests Warren ships.

- crds/*.yaml: each document is a CustomResourceDefinition that Kubernetes'
  own schema accepts (kubernetes-validate, strict), and whose
  openAPIV3Schema is structural and a valid JSON schema once translated.
- examples/*.yaml: Warren's custom resources against their CRD's
  openAPIV3Schema (jsonschema; unknown fields are errors, as with kubectl's
  strict field validation); everything else (Secrets) against Kubernetes'
  schema (kubernetes-validate, strict). A kind neither knows is an error.
- scripts/testdata/invalid-manifests/*.yaml: each must be rejected, with an
  error containing the text of its `# expect:` line; this proves the checks
  above can fail. (The cluster tier, tests/tests/cluster.rs, also sends each
  to a real API server, which must refuse it with its `# api-server:` line.)

CEL rules (x-kubernetes-validations) are not evaluated here; the unit tests
of the warren-crds crate evaluate them, and the cluster tier sends
scripts/testdata/invalid-manifests-api/ to the API server.

Exits 1 on any failure, 2 when a needed package is missing.
"""

import argparse
import copy
import glob
import os
import sys

try:
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:
    sys.stderr.write(
        "missing Python package (%s): pip install kubernetes-validate jsonschema\n" % e.name
    )
    sys.exit(2)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
INVALID_DIR = os.path.join("scripts", "testdata", "invalid-manifests")


class Invalid(Exception):
    """A manifest failed validation; the message says where and why."""


def load_documents(path):
    """The non-empty YAML documents of a file, as (label, document) pairs."""
    with open(os.path.join(ROOT, path)) as f:
        docs = list(yaml.safe_load_all(f))
    return [("%s#%d" % (path, i), d) for i, d in enumerate(docs) if d is not None]


def files(pattern):
    found = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    if not found:
        raise SystemExit("no files match %s" % pattern)
    return found


# --- Kubernetes' own kinds ------------------------------------------------


def validate_builtin(doc, versions):
    """Validates a built-in kind against each Kubernetes version's schema."""
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            raise Invalid("Kubernetes %s: %s: %s" % (e.version, path, e.message))
        except kubernetes_validate.SchemaNotFoundError as e:
            raise Invalid(e.message)


# --- CRD schemas ----------------------------------------------------------

# Value schemas that are not types: they sit next to a type, or stand in for
# one only with x-kubernetes-int-or-string / x-kubernetes-preserve-unknown-fields.
STRUCTURAL_EXEMPT = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def check_structural(schema, path="openAPIV3Schema"):
    """The parts of Kubernetes' structural-schema rules a JSON schema
    validator does not know: every node has a type, no references."""
    problems = []
    for key in ("$ref", "definitions", "$defs", "$schema"):
        if key in schema:
            problems.append("%s: %s is not allowed in a CRD schema" % (path, key))
    if "type" not in schema and not any(schema.get(k) for k in STRUCTURAL_EXEMPT):
        problems.append("%s: no type" % path)
    for name, sub in schema.get("properties", {}).items():
        problems += check_structural(sub, "%s.%s" % (path, name))
    if isinstance(schema.get("items"), dict):
        problems += check_structural(schema["items"], path + "[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += check_structural(schema["additionalProperties"], path + "{}")
    return problems


def to_json_schema(node):
    """Translates an openAPIV3Schema node into a JSON schema (draft 2020-12).

    `nullable: true` becomes a null alternative; `x-kubernetes-*` keys are
    dropped, except that preserve-unknown-fields lets unknown fields through
    and int-or-string allows both. Objects with properties refuse unknown
    fields, as kubectl's strict field validation does.
    """
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(v) for v in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
    return out


def resource_schema(crd, version):
    """The JSON schema of one version of a CRD's resources, with the fields
    every object has (apiVersion, kind, metadata) that CRDs leave out."""
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    group = crd["spec"]["group"]
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    schema.setdefault("properties", {}).update(
        {
            "apiVersion": {"const": "%s/%s" % (group, version["name"])},
            "kind": {"const": crd["spec"]["names"]["kind"]},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "namespace": {"type": "string"},
                    "labels": strings,
                    "annotations": strings,
                },
            },
        }
    )
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def load_crds(versions, report):
    """Validates crds/*.yaml; returns {(apiVersion, kind): JSON schema}."""
    schemas = {}
    for path in files("crds/*.yaml"):
        for label, doc in load_documents(path):
            try:
                if doc.get("kind") != "CustomResourceDefinition":
                    raise Invalid("not a CustomResourceDefinition: %s" % doc.get("kind"))
                validate_builtin(doc, versions)
                for version in doc["spec"]["versions"]:
                    problems = check_structural(version["schema"]["openAPIV3Schema"])
                    if problems:
                        raise Invalid("not structural: " + "; ".join(problems))
                    api_version = "%s/%s" % (doc["spec"]["group"], version["name"])
                    try:
                        schemas[(api_version, doc["spec"]["names"]["kind"])] = resource_schema(doc, version)
                    except jsonschema.SchemaError as e:
                        raise Invalid("openAPIV3Schema is not a valid JSON schema: %s" % e.message)
                report.ok(label, "CustomResourceDefinition %s (Kubernetes %s)" % (doc["metadata"]["name"], ", ".join(versions)))
            except Invalid as e:
                report.fail(label, str(e))
    return schemas


# --- Resources ------------------------------------------------------------


def validate_resource(doc, crds, versions):
    """Validates one manifest; returns what it was validated against."""
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        raise Invalid("not a Kubernetes object (no apiVersion/kind)")
    key = (doc["apiVersion"], doc["kind"])
    name = "%s %s" % (doc["kind"], (doc.get("metadata") or {}).get("name"))
    if key in crds:
        validator = jsonschema.Draft202012Validator(crds[key])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            raise Invalid(
                "; ".join(
                    "%s: %s" % (".".join(str(p) for p in e.absolute_path) or "(root)", e.message)
                    for e in errors
                )
            )
        return "%s (CRD schema)" % name
    if doc["apiVersion"].split("/")[0].endswith("warren.dev"):
        raise Invalid("no CRD in crds/ for %s %s" % key)
    validate_builtin(doc, versions)
    return "%s (Kubernetes %s)" % (name, ", ".join(versions))


class Report:
    def __init__(self):
        self.failures = 0

    def ok(self, label, what):
        print("ok      %s: %s" % (label, what))

    def fail(self, label, why):
        self.failures += 1
        print("FAILED  %s: %s" % (label, why))


def expected_error(path):
    with open(os.path.join(ROOT, path)) as f:
        for line in f:
            if line.startswith("# expect:"):
                return line[len("# expect:"):].strip()
    raise SystemExit("%s has no '# expect: <error text>' line" % path)


def check_injected(doc):
    """An injected workload holds the sidecar, its outbox and its env."""
    if doc["kind"] == "Pod":
        spec, meta = doc["spec"], doc["metadata"]
    else:
        spec, meta = doc["spec"]["template"]["spec"], doc["spec"]["template"]["metadata"]
    if meta.get("annotations", {}).get("warren.dev/injected") != "true":
        raise Invalid("%s %s was not injected" % (doc["kind"], doc["metadata"]["name"]))
    sidecars = [c for c in spec.get("initContainers", []) + spec["containers"]
                if c["name"] == "warren-sidecar"]
    if len(sidecars) != 1:
        raise Invalid("expected one warren-sidecar container, found %d" % len(sidecars))
    env = {e["name"] for e in sidecars[0].get("env", [])}
    missing = {"WARREN_DATA_DIR", "WARREN_BROKER_PASSWORD", "WARREN_BROKER_VHOST"} - env
    if missing:
        raise Invalid("sidecar env lacks %s" % ", ".join(sorted(missing)))
    volumes = {v["name"] for v in spec.get("volumes", [])}
    templates = {t["metadata"]["name"] for t in doc.get("spec", {}).get("volumeClaimTemplates", [])}
    if "warren-outbox" not in volumes | templates:
        raise Invalid("no warren-outbox volume or volume claim template")
    return "sidecar, outbox and broker env injected"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kubernetes-version",
        action="append",
        help="Kubernetes version(s) for the built-in schemas (repeatable; "
        "default: 1.31 and the newest kubernetes-validate ships)",
    )
    parser.add_argument(
        "--injected",
        action="append",
        default=[],
        help="output of `warren-operator inject -f` to validate as well "
        "(repeatable); every workload in it must hold the sidecar",
    )
    args = parser.parse_args()
    versions = args.kubernetes_version or ["1.31", kubernetes_validate.latest_version()]
    print("kubernetes-validate %s, jsonschema %s; Kubernetes %s" % (
        kubernetes_validate.__version__, jsonschema_version(), ", ".join(versions)))

    report = Report()
    crds = load_crds(versions, report)

    for path in files("examples/*.yaml"):
        for label, doc in load_documents(path):
            try:
                report.ok(label, validate_resource(doc, crds, versions))
            except Invalid as e:
                report.fail(label, str(e))

    for path in args.injected:
        for label, doc in load_documents(os.path.abspath(path)):
            try:
                what = validate_resource(doc, crds, versions)
                if doc.get("kind") in ("Pod", "Deployment", "StatefulSet"):
                    what += "; " + check_injected(doc)
                report.ok(label, what)
            except Invalid as e:
                report.fail(label, str(e))

    for path in files(os.path.join(INVALID_DIR, "*.yaml")):
        expect = expected_error(path)
        docs = load_documents(path)
        if len(docs) != 1:
            report.fail(path, "holds %d documents; an invalid case holds one" % len(docs))
            continue
        label, doc = docs[0]
        try:
            what = validate_resource(doc, crds, versions)
            report.fail(label, "accepted, but must be rejected: %s" % what)
        except Invalid as e:
            if expect in str(e):
                report.ok(label, "rejected as it must be: %s" % e)
            else:
                report.fail(label, "rejected, but not with %r: %s" % (expect, e))

    if report.failures:
        print("%d manifest check(s) failed" % report.failures)
        return 1
    print("all manifests valid")
    return 0


def jsonschema_version():
    from importlib.metadata import version

    return version("jsonschema")


if __name__ == "__main__":
    sys.exit(main())
