#!/usr/bin/env python3
"""Checks of the Helm chart charts/warren.

- The chart's crds/ are byte-identical copies of the repository's crds/.
- `helm lint --strict` and `helm template` pass with the default values and
  with each scripts/testdata/chart-values/*.yaml (a `# release: NAME
  NAMESPACE` line picks the release; default `warren warren-system`).
- Every rendered manifest is valid for Kubernetes (kubernetes-validate,
  strict: unknown fields are errors). cert-manager's Issuer and Certificate
  and prometheus-operator's ServiceMonitor are not in kubernetes-validate's
  schemas: those kinds skip schema validation and get only the structural
  checks below.
- What the chart must hold, against the values it was rendered with: the
  operator's env (WARREN_WEBHOOK_SERVICE, WARREN_WEBHOOK_CONFIG, ...) names
  the rendered Service and MutatingWebhookConfiguration; the webhook's
  service, port and path reach the container's webhook port; its rules,
  selectors and policies; the RBAC is exactly the operator's list; the
  injection.yaml ConfigMap; cert-manager wiring; PDB, ServiceMonitor;
  labels, names, namespaces; security context and probes.
- With --operator BIN: `BIN inject` of examples/orders-app.yaml, given
  each rendering's injection.yaml, injects the sidecar those values ask
  for (the operator accepts the chart's injection.yaml as it is).
- The pods roll when injection.yaml changes (checksum annotation), and
  only then.
- scripts/testdata/chart-values/invalid-*.yaml must be rejected by
  values.schema.json (helm template and helm lint fail, with the text of
  the file's `# expect:` line).
- charts/warren/README.md documents every key of values.yaml.

Needs $HELM (a helm binary) and the Python packages kubernetes-validate and
PyYAML. Exits 1 on any failure, 2 when something needed is missing.
"""

import argparse
import copy
import filecmp
import glob
import os
import subprocess
import sys

try:
    import kubernetes_validate
    import yaml
except ImportError as e:
    sys.stderr.write("missing Python package (%s): pip install kubernetes-validate\n" % e.name)
    sys.exit(2)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CHART = "charts/warren"
VALUES_DIR = "scripts/testdata/chart-values"
DEFAULT_RELEASE = ("warren", "warren-system")

# Kinds whose CRDs kubernetes-validate does not ship.
UNVALIDATED_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration", "CustomResourceDefinition"}

# The operator's RBAC in a namespace it works in: every verb its code calls
# (the cluster tier checks the same list with `kubectl auth can-i --list`).
NAMESPACED_RBAC = [
    ("warren.dev", ["reliablequeues"], ["get", "list", "watch", "patch"]),
    ("warren.dev", ["retrypolicies"], ["get", "list", "watch"]),
    ("warren.dev", ["reliablequeues/status", "retrypolicies/status"], ["patch"]),
    ("", ["secrets"], ["get"]),
    ("events.k8s.io", ["events"], ["create", "patch"]),
    ("", ["pods"], ["list"]),
    ("", ["persistentvolumeclaims"], ["get", "list", "create", "patch", "delete"]),
    ("batch", ["jobs"], ["list", "create"]),
    ("apps", ["deployments", "statefulsets"], ["get"]),
]
# + admissionregistration.k8s.io mutatingwebhookconfigurations get patch,
#   resourceNames: [the configuration's name], in the ClusterRole; with
#   operator.watchNamespaces the namespaced rules are Roles in each.
LEASE_RBAC = [("coordination.k8s.io", ["leases"], ["get", "create", "patch"])]


class Report:
    def __init__(self):
        self.failures = 0

    def ok(self, what):
        print("ok      %s" % what)

    def fail(self, what):
        self.failures += 1
        print("FAILED  %s" % what)


def helm(*args):
    return subprocess.run([os.environ["HELM"], *args], cwd=ROOT, capture_output=True, text=True)


def read_yaml(path):
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


def header(path, key):
    """The text after `# KEY:` in a file's leading comment, or None."""
    with open(os.path.join(ROOT, path)) as f:
        for line in f:
            if line.startswith("# %s:" % key):
                return line.split(":", 1)[1].strip()
    return None


def merge(base, override):
    """Helm's coalescing of values: maps merge, a null removes the key."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- CRD copies -----------------------------------------------------------


def check_crd_copies(report):
    source = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "crds", "*.yaml")))
    copies = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, CHART, "crds", "*")))
    if not source:
        report.fail("no crds/*.yaml")
        return
    if source != copies:
        report.fail("%s/crds holds %s, crds/ holds %s" % (CHART, copies, source))
    for name in source:
        copy_path = os.path.join(ROOT, CHART, "crds", name)
        if not os.path.exists(copy_path):
            continue
        if filecmp.cmp(os.path.join(ROOT, "crds", name), copy_path, shallow=False):
            report.ok("%s/crds/%s is identical to crds/%s" % (CHART, name, name))
        else:
            report.fail(
                "%s/crds/%s differs from crds/%s: cp crds/*.yaml %s/crds/" % (CHART, name, name, CHART)
            )


# --- Rendering ------------------------------------------------------------


class Case:
    """One rendering of the chart: a release, a values file, --set flags."""

    def __init__(self, label, release, namespace, values_file=None, sets=()):
        self.label = label
        self.release = release
        self.namespace = namespace
        self.values_file = values_file
        self.sets = list(sets)

    def args(self):
        args = []
        if self.values_file:
            args += ["-f", self.values_file]
        for s in self.sets:
            args += ["--set", s]
        return args

    def values(self, defaults):
        values = merge(defaults, read_yaml(self.values_file) if self.values_file else {})
        for s in self.sets:
            path, _, raw = s.partition("=")
            override = yaml.safe_load(raw)
            for key in reversed(path.split(".")):
                override = {key: override}
            values = merge(values, override)
        return values

    def render(self, include_crds=True):
        args = ["template", self.release, CHART, "--namespace", self.namespace] + self.args()
        if include_crds:
            args.append("--include-crds")
        result = helm(*args)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip())
        return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


def validate_manifests(case, docs, versions, report):
    failures = 0
    skipped = []
    for doc in docs:
        name = "%s %s" % (doc.get("kind"), doc.get("metadata", {}).get("name"))
        if (doc.get("apiVersion"), doc.get("kind")) in UNVALIDATED_KINDS:
            skipped.append(doc["kind"])
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(root)"
                report.fail("%s: %s: Kubernetes %s: %s: %s" % (case.label, name, version, path, e.message))
                failures += 1
            except kubernetes_validate.SchemaNotFoundError as e:
                report.fail("%s: %s: %s" % (case.label, name, e.message))
                failures += 1
    if not failures:
        note = " (no schema, not validated: %s)" % ", ".join(sorted(set(skipped))) if skipped else ""
        report.ok(
            "%s: %d manifests valid for Kubernetes %s%s"
            % (case.label, len(docs) - len(skipped), ", ".join(versions), note)
        )


# --- What the chart must hold ---------------------------------------------


class Expect:
    """Collects the failed expectations of one rendering."""

    def __init__(self):
        self.problems = []

    def __call__(self, condition, message):
        if not condition:
            self.problems.append(message)
        return condition

    def equal(self, actual, expected, what):
        return self(actual == expected, "%s: %r, expected %r" % (what, actual, expected))


def fullname(values, release, chart_name):
    if values.get("fullnameOverride"):
        return values["fullnameOverride"][:63].rstrip("-")
    name = values.get("nameOverride") or chart_name
    if name in release:
        return release[:63].rstrip("-")
    return ("%s-%s" % (release, name))[:63].rstrip("-")


def rbac_grants(rules):
    grants = set()
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    for name in rule.get("resourceNames") or ["*"]:
                        grants.add((group, resource, verb, name))
    return grants


def expected_grants(entries):
    return rbac_grants(
        [{"apiGroups": [g], "resources": r, "verbs": v} for g, r, v in entries]
    )


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def env_map(container):
    return {e["name"]: e for e in container.get("env", [])}


def port_of(listen):
    return int(listen.rsplit(":", 1)[1])


def check_chart(case, docs, values, chart, report):
    expect = Expect()
    ns = case.namespace
    app_version = str(chart["appVersion"])
    full = fullname(values, case.release, chart["name"])
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)

    def one(kind, name=None):
        found = [d for d in by_kind.get(kind, []) if name is None or d["metadata"]["name"] == name]
        expect(len(found) == 1, "%d %s%s rendered, expected 1" % (len(found), kind, " " + name if name else ""))
        return found[0] if found else None

    # Names, namespaces, labels.
    version_label = str(values["image"].get("tag") or app_version)
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        what = "%s %s" % (kind, meta["name"])
        if kind == "CustomResourceDefinition":
            continue
        expect(meta["name"].startswith(full), "%s: name does not start with %r" % (what, full))
        if kind in CLUSTER_SCOPED:
            expect("namespace" not in meta, "%s: cluster-scoped, but has a namespace" % what)
        elif kind in ("Role", "RoleBinding") and meta.get("namespace") in (values["operator"].get("watchNamespaces") or []):
            pass  # the operator's rights in a namespace it works in
        else:
            expect.equal(meta.get("namespace"), ns, "%s: namespace" % what)
        labels = meta.get("labels") or {}
        for key, value in [
            ("app.kubernetes.io/name", chart["name"]),
            ("app.kubernetes.io/instance", case.release),
            ("app.kubernetes.io/version", version_label),
            ("app.kubernetes.io/managed-by", "Helm"),
            ("helm.sh/chart", "%s-%s" % (chart["name"], chart["version"])),
        ]:
            expect.equal(labels.get(key), value, "%s: label %s" % (what, key))

    # CRDs: the repository's.
    crds = {d["metadata"]["name"]: d for d in by_kind.get("CustomResourceDefinition", [])}
    for path in sorted(glob.glob(os.path.join(ROOT, "crds", "*.yaml"))):
        source = read_yaml(os.path.relpath(path, ROOT))
        expect(crds.get(source["metadata"]["name"]) == source, "CRD %s not rendered as in crds/" % source["metadata"]["name"])

    deployment = one("Deployment", full)
    service_account = values["serviceAccount"].get("name") or full
    if values["serviceAccount"]["create"]:
        one("ServiceAccount", service_account)
    else:
        expect(not by_kind.get("ServiceAccount"), "ServiceAccount rendered with serviceAccount.create=false")
    if deployment is None:
        return expect.problems
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    pod_labels = pod["metadata"].get("labels", {})
    selector = deployment["spec"]["selector"]["matchLabels"]
    expect(selects(selector, pod_labels), "Deployment selector does not select its pods")
    expect.equal(deployment["spec"]["replicas"], values["replicaCount"], "Deployment replicas")
    expect.equal(spec.get("serviceAccountName"), service_account, "serviceAccountName")
    for key, value in values["podLabels"].items():
        expect.equal(pod_labels.get(key), value, "pod label %s" % key)
    annotations = pod["metadata"].get("annotations", {})
    for key, value in values["podAnnotations"].items():
        expect.equal(annotations.get(key), value, "pod annotation %s" % key)
    expect("checksum/injection-config" in annotations, "pod template has no checksum/injection-config annotation")
    for key in ("nodeSelector", "tolerations", "affinity"):
        expect.equal(spec.get(key), values[key] or None, "pod %s" % key)
    expect.equal(spec.get("priorityClassName"), values["priorityClassName"] or None, "priorityClassName")
    expect.equal(spec.get("imagePullSecrets"), values["imagePullSecrets"] or None, "imagePullSecrets")

    spread = spec.get("topologySpreadConstraints") or []
    expect.equal(len(spread), len(values["topologySpreadConstraints"]), "topologySpreadConstraints")
    for constraint in spread:
        expect(
            selects(constraint.get("labelSelector", {}).get("matchLabels"), pod_labels),
            "topology spread constraint does not select the operator pods",
        )
    if not spread:
        anti = (values["affinity"] or {}).get("podAntiAffinity")
        expect(anti, "neither topology spread nor pod anti-affinity: replicas may share a node")

    containers = spec["containers"]
    expect.equal(len(containers), 1, "operator containers")
    container = containers[0]
    expect.equal(
        container["image"],
        "%s:%s" % (values["image"]["repository"], values["image"].get("tag") or app_version),
        "operator image",
    )
    expect.equal(container.get("imagePullPolicy"), values["image"]["pullPolicy"], "operator imagePullPolicy")
    expect.equal(container.get("args"), ["run"], "operator args")
    expect.equal(container.get("resources"), values["resources"], "operator resources")
    env = env_map(container)
    for name, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        got = env.get(name, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        expect.equal(got, field, "env %s (downward API)" % name)
    values_env = {k: v.get("value") for k, v in env.items()}
    expect.equal(values_env.get("WARREN_RESYNC"), values["operator"]["resync"], "WARREN_RESYNC")
    expect.equal(values_env.get("WARREN_RETRY"), values["operator"]["retry"], "WARREN_RETRY")
    expect.equal(values_env.get("WARREN_POOL_INTERVAL"), values["operator"]["poolInterval"], "WARREN_POOL_INTERVAL")
    expect.equal(values_env.get("RUST_LOG"), values["operator"]["logLevel"], "RUST_LOG")
    for extra in values["operator"]["extraEnv"]:
        expect.equal(env.get(extra["name"]), extra, "extra env %s" % extra["name"])
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    expect.equal(ports, {"admin": 8080, "webhook": 9443}, "container ports")
    for var, port in (("WARREN_ADMIN_LISTEN", "admin"), ("WARREN_WEBHOOK_LISTEN", "webhook")):
        listen = values_env.get(var)
        if expect(listen, "env %s missing" % var):
            expect.equal(port_of(listen), ports.get(port), "%s port vs container port %s" % (var, port))
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        expect.equal((get.get("path"), get.get("port")), (path, "admin"), probe)

    sc = container.get("securityContext", {})
    psc = spec.get("securityContext", {})
    expect(sc.get("runAsNonRoot") or psc.get("runAsNonRoot"), "runAsNonRoot not set")
    expect.equal(sc.get("readOnlyRootFilesystem"), True, "readOnlyRootFilesystem")
    expect.equal(sc.get("allowPrivilegeEscalation"), False, "allowPrivilegeEscalation")
    expect.equal(sc.get("capabilities", {}).get("drop"), ["ALL"], "capabilities.drop")
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    expect.equal(seccomp, "RuntimeDefault", "seccompProfile")

    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    def mount_of(kind, key, name):
        """The mountPath of the volume of `kind` (configMap/secret) named `name`."""
        for vname, volume in volumes.items():
            if volume.get(kind, {}).get(key) == name and vname in mounts:
                return mounts[vname]["mountPath"]
        return None

    # The webhook: Service, configuration, env.
    service_name = values_env.get("WARREN_WEBHOOK_SERVICE")
    config_name = values_env.get("WARREN_WEBHOOK_CONFIG")
    service = one("Service", service_name)
    config = one("MutatingWebhookConfiguration", config_name)
    if service:
        expect(selects(service["spec"]["selector"], pod_labels), "webhook Service does not select the operator pods")
    if config:
        hooks = config.get("webhooks", [])
        expect.equal([h["name"] for h in hooks], ["inject.warren.dev"], "webhooks")
        hook = hooks[0] if hooks else {}
        client = hook.get("clientConfig", {})
        target = client.get("service", {})
        expect.equal(target.get("name"), service_name, "webhook clientConfig.service.name vs WARREN_WEBHOOK_SERVICE")
        expect.equal(target.get("namespace"), ns, "webhook clientConfig.service.namespace")
        expect.equal(target.get("path"), "/mutate", "webhook path")
        if service:
            svc_ports = [p for p in service["spec"]["ports"] if p["port"] == target.get("port", 443)]
            if expect(len(svc_ports) == 1, "webhook port %s is not a port of Service %s" % (target.get("port"), service_name)):
                tp = svc_ports[0].get("targetPort", svc_ports[0]["port"])
                tp = ports.get(tp, tp)
                expect.equal(tp, port_of(values_env.get("WARREN_WEBHOOK_LISTEN", ":0")), "Service targetPort vs WARREN_WEBHOOK_LISTEN")
        expect(not client.get("caBundle"), "caBundle is rendered; the operator or cert-manager sets it")
        expect.equal(
            hook.get("rules"),
            [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "webhook rules",
        )
        expect.equal(hook.get("admissionReviewVersions"), ["v1"], "admissionReviewVersions")
        expect.equal(hook.get("sideEffects"), "NoneOnDryRun", "sideEffects")
        expect.equal(hook.get("reinvocationPolicy"), "Never", "reinvocationPolicy")
        expect.equal(hook.get("failurePolicy"), values["webhook"]["failurePolicy"], "failurePolicy")
        expect.equal(hook.get("timeoutSeconds"), values["webhook"]["timeoutSeconds"], "timeoutSeconds")
        # Only opted-in pods reach the webhook; the value adds conditions.
        user_objects = values["webhook"]["objectSelector"]
        want_objects = {"matchLabels": dict(user_objects.get("matchLabels") or {}, **{"warren.dev/inject": "enabled"})}
        if user_objects.get("matchExpressions"):
            want_objects["matchExpressions"] = user_objects["matchExpressions"]
        expect.equal(hook.get("objectSelector"), want_objects, "objectSelector")
        nsel = hook.get("namespaceSelector", {})
        excluded = [
            e for e in nsel.get("matchExpressions", [])
            if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn"
        ]
        if expect(len(excluded) == 1, "namespaceSelector has no kubernetes.io/metadata.name NotIn"):
            must = set(values["webhook"]["excludedNamespaces"]) | {"kube-system", "kube-node-lease", ns}
            expect(must <= set(excluded[0]["values"]), "namespaceSelector excludes %s, not all of %s" % (excluded[0]["values"], sorted(must)))
        user = values["webhook"]["namespaceSelector"]
        expect.equal(nsel.get("matchLabels"), user.get("matchLabels"), "namespaceSelector.matchLabels")
        for e in user.get("matchExpressions", []):
            expect(e in nsel.get("matchExpressions", []), "namespaceSelector lacks %s" % e)

        rendered = [d for d in by_kind.get("MutatingWebhookConfiguration", [])]
        annotations = config["metadata"].get("annotations") or {}
        inject_from = annotations.get("cert-manager.io/inject-ca-from")
        cert_dir = values_env.get("WARREN_WEBHOOK_CERT_DIR")
        if values["webhook"]["certManager"]["enabled"]:
            certificate = one("Certificate")
            if certificate:
                expect.equal(inject_from, "%s/%s" % (ns, certificate["metadata"]["name"]), "cert-manager.io/inject-ca-from")
                cspec = certificate["spec"]
                names = {service_name, "%s.%s" % (service_name, ns), "%s.%s.svc" % (service_name, ns), "%s.%s.svc.cluster.local" % (service_name, ns)}
                expect(names <= set(cspec.get("dnsNames", [])), "Certificate dnsNames %s lack some of %s" % (cspec.get("dnsNames"), sorted(names)))
                expect(cspec.get("secretName"), "Certificate has no secretName")
                expect(cert_dir, "WARREN_WEBHOOK_CERT_DIR unset with cert-manager")
                expect.equal(mount_of("secret", "secretName", cspec.get("secretName")), cert_dir, "mount of the Certificate's Secret vs WARREN_WEBHOOK_CERT_DIR")
                ref = cspec.get("issuerRef", {})
                given = values["webhook"]["certManager"].get("issuerRef") or {}
                if given:
                    expect.equal(ref, given, "Certificate issuerRef")
                    expect(not by_kind.get("Issuer"), "an Issuer is rendered although issuerRef is given")
                else:
                    issuer = one("Issuer", ref.get("name"))
                    expect.equal(ref.get("kind"), "Issuer", "Certificate issuerRef.kind")
                    if issuer:
                        expect("selfSigned" in issuer["spec"], "the chart's Issuer is not self-signed")
        else:
            expect(inject_from is None, "cert-manager.io/inject-ca-from set without cert-manager")
            expect(cert_dir is None, "WARREN_WEBHOOK_CERT_DIR set without cert-manager")
            expect(not by_kind.get("Certificate") and not by_kind.get("Issuer"), "cert-manager objects without cert-manager")
        expect.equal(len(rendered), 1, "MutatingWebhookConfigurations")

    # RBAC.
    watch = values["operator"].get("watchNamespaces") or []
    cluster_role = one("ClusterRole", full)
    if cluster_role and config_name:
        want = rbac_grants([{
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "verbs": ["get", "patch"],
            "resourceNames": [config_name],
        }])
        if not watch:
            want |= expected_grants(NAMESPACED_RBAC)
        got = rbac_grants(cluster_role["rules"])
        expect(got == want, "ClusterRole grants differ from the contract: extra %s, missing %s" % (sorted(got - want), sorted(want - got)))
    roles = by_kind.get("Role", [])
    leader_roles = [r for r in roles if r["metadata"].get("namespace") == ns and r["metadata"]["name"].endswith("-leader-election")]
    if expect(len(leader_roles) == 1, "%d leader-election Roles rendered, expected 1" % len(leader_roles)):
        got = rbac_grants(leader_roles[0]["rules"])
        want = expected_grants(LEASE_RBAC)
        if not values["webhook"]["certManager"]["enabled"] and config_name:
            # The self-managed CA Secret: create, and get/update of that one name.
            want |= expected_grants([("", ["secrets"], ["create"])]) | rbac_grants([{
                "apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "update"],
                "resourceNames": [config_name + "-ca"],
            }])
        expect(got == want, "leader-election Role grants differ from the contract: extra %s, missing %s" % (sorted(got - want), sorted(want - got)))
    namespaced = [r for r in roles if r not in leader_roles]
    expect.equal(sorted(r["metadata"].get("namespace") for r in namespaced), sorted(watch), "namespaces with a Role (operator.watchNamespaces)")
    for role in namespaced:
        got = rbac_grants(role["rules"])
        want = expected_grants(NAMESPACED_RBAC)
        expect(got == want, "Role in %s grants differ from the contract: extra %s, missing %s" % (role["metadata"].get("namespace"), sorted(got - want), sorted(want - got)))
    role_bindings = by_kind.get("RoleBinding", [])
    expect.equal(len(role_bindings), len(roles), "RoleBindings (one per Role)")
    for binding in role_bindings:
        target = [r for r in roles if r["metadata"]["name"] == binding["roleRef"]["name"] and r["metadata"].get("namespace") == binding["metadata"].get("namespace")]
        expect(binding["roleRef"]["kind"] == "Role" and len(target) == 1, "RoleBinding %s/%s binds no rendered Role" % (binding["metadata"].get("namespace"), binding["metadata"]["name"]))
        expect.equal(binding["subjects"], [{"kind": "ServiceAccount", "name": service_account, "namespace": ns}], "RoleBinding subjects")
    bindings = by_kind.get("ClusterRoleBinding", [])
    if expect(len(bindings) == 1 and cluster_role, "%d ClusterRoleBindings rendered, expected 1" % len(bindings)):
        b = bindings[0]
        expect.equal((b["roleRef"]["kind"], b["roleRef"]["name"]), ("ClusterRole", cluster_role["metadata"]["name"]), "ClusterRoleBinding roleRef")
        expect.equal(b["subjects"], [{"kind": "ServiceAccount", "name": service_account, "namespace": ns}], "ClusterRoleBinding subjects")
    if watch:
        hooks = (config or {}).get("webhooks") or [{}]
        nsel = hooks[0].get("namespaceSelector", {})
        expect({"key": "kubernetes.io/metadata.name", "operator": "In", "values": watch} in nsel.get("matchExpressions", []),
               "the webhook's namespaceSelector is not limited to operator.watchNamespaces")
    env_watch = values_env.get("WARREN_WATCH_NAMESPACES")
    expect.equal(env_watch, ",".join(watch), "WARREN_WATCH_NAMESPACES vs operator.watchNamespaces")

    # injection.yaml.
    injection_path = values_env.get("WARREN_INJECTION_CONFIG", "")
    directory, _, filename = injection_path.rpartition("/")
    configmaps = [d for d in by_kind.get("ConfigMap", []) if filename in (d.get("data") or {})]
    if expect(len(configmaps) == 1, "no ConfigMap holds %r" % filename):
        cm = configmaps[0]
        expect.equal(mount_of("configMap", "name", cm["metadata"]["name"]), directory, "mount of ConfigMap %s" % cm["metadata"]["name"])
        s = values["sidecar"]
        outbox = {k: s["outbox"][k] for k in ("size", "accessModes", "idleBeforeDrain", "drainJobTtl", "drainDeadline")}
        if s["outbox"].get("storageClassName") is not None:
            outbox["storageClassName"] = s["outbox"]["storageClassName"]
        want = {
            "image": "%s:%s" % (s["image"]["repository"], s["image"].get("tag") or app_version),
            "imagePullPolicy": s["image"]["pullPolicy"],
            "resources": s["resources"],
            "drainTimeout": s["drainTimeout"],
            "terminationGracePeriodSeconds": s["terminationGracePeriodSeconds"],
            "outbox": outbox,
        }
        expect.equal(yaml.safe_load(cm["data"][filename]), want, "injection.yaml")

    # PodDisruptionBudget.
    pdbs = by_kind.get("PodDisruptionBudget", [])
    pdb_values = values["podDisruptionBudget"]
    if pdb_values["enabled"]:
        if expect(len(pdbs) == 1, "%d PodDisruptionBudgets, expected 1" % len(pdbs)):
            pdb = pdbs[0]["spec"]
            expect(selects(pdb["selector"]["matchLabels"], pod_labels), "PodDisruptionBudget does not select the operator pods")
            if pdb_values.get("maxUnavailable") is not None:
                expect.equal(pdb.get("maxUnavailable"), pdb_values["maxUnavailable"], "PDB maxUnavailable")
            else:
                expect.equal(pdb.get("minAvailable"), pdb_values["minAvailable"], "PDB minAvailable")
    else:
        expect(not pdbs, "PodDisruptionBudget rendered while disabled")

    # ServiceMonitor.
    monitors = by_kind.get("ServiceMonitor", [])
    sm_values = values["serviceMonitor"]
    if sm_values["enabled"]:
        if expect(len(monitors) == 1, "%d ServiceMonitors, expected 1" % len(monitors)):
            sm = monitors[0]
            for key, value in sm_values["labels"].items():
                expect.equal(sm["metadata"]["labels"].get(key), value, "ServiceMonitor label %s" % key)
            matched = [s for s in by_kind.get("Service", []) if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            if expect(len(matched) == 1, "ServiceMonitor selects %d Services, expected 1" % len(matched)):
                endpoint = sm["spec"]["endpoints"][0]
                svc = matched[0]
                svc_ports = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
                if expect(len(svc_ports) == 1, "ServiceMonitor port %s not on Service %s" % (endpoint["port"], svc["metadata"]["name"])):
                    tp = svc_ports[0]["targetPort"]
                    expect.equal(ports.get(tp, tp), 8080, "metrics Service targetPort")
                expect.equal(endpoint.get("path"), "/metrics", "ServiceMonitor path")
                expect(selects(svc["spec"]["selector"], pod_labels), "metrics Service does not select the operator pods")
    else:
        expect(not monitors, "ServiceMonitor rendered while disabled")

    return expect.problems


def check_injection(case, docs, values, chart, operator, report):
    """The operator reads the rendered injection.yaml and injects what the
    values ask for into examples/orders-app.yaml."""
    import tempfile

    configmaps = [d for d in docs if d["kind"] == "ConfigMap" and "injection.yaml" in (d.get("data") or {})]
    if len(configmaps) != 1:
        report.fail("%s: inject: no ConfigMap with injection.yaml" % case.label)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(configmaps[0]["data"]["injection.yaml"])
        config = f.name
    try:
        result = subprocess.run(
            [operator, "inject", "-f", "examples/orders.yaml", "-f", "examples/orders-app.yaml", "--injection-config", config],
            cwd=ROOT, capture_output=True, text=True,
        )
    finally:
        os.unlink(config)
    if result.returncode != 0:
        report.fail("%s: warren-operator inject with the chart's injection.yaml: %s" % (case.label, result.stderr.strip()))
        return
    s = values["sidecar"]
    want = {
        "image": "%s:%s" % (s["image"]["repository"], s["image"].get("tag") or chart["appVersion"]),
        "imagePullPolicy": s["image"]["pullPolicy"],
        "resources": s["resources"],
    }
    problems, injected = [], 0
    for doc in yaml.safe_load_all(result.stdout):
        if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        sidecars = [c for c in pod.get("initContainers", []) + pod.get("containers", []) if c["name"] == "warren-sidecar"]
        if not sidecars:
            continue
        injected += 1
        got = {k: sidecars[0].get(k) for k in want}
        if got != want:
            problems.append("%s %s: sidecar %r, expected %r" % (doc["kind"], doc["metadata"]["name"], got, want))
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < s["terminationGracePeriodSeconds"]:
            problems.append("%s %s: terminationGracePeriodSeconds %s < %s" % (doc["kind"], doc["metadata"]["name"], grace, s["terminationGracePeriodSeconds"]))
    if not injected:
        problems.append("no warren-sidecar injected into examples/orders-app.yaml")
    for p in problems:
        report.fail("%s: inject: %s" % (case.label, p))
    if not problems:
        report.ok("%s: warren-operator inject with the chart's injection.yaml: %d workloads get the values' sidecar image, pull policy, resources, grace period" % (case.label, injected))


def check_checksum(report):
    """The pod template's checksum follows injection.yaml, and only it."""
    release, ns = DEFAULT_RELEASE

    def checksum(sets):
        docs = Case("checksum", release, ns, sets=sets).render(include_crds=False)
        deployment = [d for d in docs if d["kind"] == "Deployment"][0]
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/injection-config"]

    base = checksum([])
    changed = checksum(["sidecar.drainTimeout=31s"])
    unrelated = checksum(["operator.logLevel=debug"])
    if base != changed and base == unrelated:
        report.ok("the operator pods roll when injection.yaml changes (checksum/injection-config), not otherwise")
    else:
        report.fail(
            "checksum/injection-config: default %s, drainTimeout changed %s, logLevel changed %s"
            % (base[:12], changed[:12], unrelated[:12])
        )


def check_readme(defaults, report):
    """Every key of values.yaml is in charts/warren/README.md."""
    leaves = {"resources", "podSecurityContext", "securityContext", "affinity", "issuerRef"}

    def paths(node, prefix=""):
        for key, value in node.items():
            path = prefix + key
            if isinstance(value, dict) and value and key not in leaves:
                yield from paths(value, path + ".")
            else:
                yield path

    with open(os.path.join(ROOT, CHART, "README.md")) as f:
        readme = f.read()
    missing = [p for p in paths(defaults) if "`%s`" % p not in readme]
    if missing:
        report.fail("%s/README.md does not document: %s" % (CHART, ", ".join(missing)))
    else:
        report.ok("%s/README.md documents every key of values.yaml" % CHART)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kubernetes-version",
        action="append",
        help="Kubernetes version(s) to validate against (repeatable; default: "
        "the newest kubernetes-validate ships)",
    )
    parser.add_argument(
        "--operator",
        help="a warren-operator binary: checks that its `inject` reads each "
        "rendered injection.yaml and injects what the values ask for",
    )
    args = parser.parse_args()
    if not os.environ.get("HELM"):
        sys.stderr.write("HELM must name a helm binary (scripts/check-chart installs one)\n")
        return 2
    versions = args.kubernetes_version or [kubernetes_validate.latest_version()]
    helm_version = helm("version", "--short").stdout.strip()
    print("helm %s, kubernetes-validate %s; Kubernetes %s" % (helm_version, kubernetes_validate.__version__, ", ".join(versions)))

    report = Report()
    check_crd_copies(report)
    chart = read_yaml(os.path.join(CHART, "Chart.yaml"))
    defaults = read_yaml(os.path.join(CHART, "values.yaml"))

    files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, VALUES_DIR, "*.yaml")))
    valid = [f for f in files if not os.path.basename(f).startswith("invalid-")]
    invalid = [f for f in files if os.path.basename(f).startswith("invalid-")]
    if not valid or not invalid:
        report.fail("%s needs valid and invalid-*.yaml values files" % VALUES_DIR)

    cases = [Case("default values", *DEFAULT_RELEASE)]
    for path in valid:
        release = (header(path, "release") or " ".join(DEFAULT_RELEASE)).split()
        cases.append(Case(path, release[0], release[1], values_file=path))

    for case in cases:
        lint = helm("lint", "--strict", CHART, "--namespace", case.namespace, *case.args())
        if lint.returncode != 0:
            report.fail("%s: helm lint --strict: %s" % (case.label, (lint.stdout + lint.stderr).strip()))
        else:
            report.ok("%s: helm lint --strict" % case.label)
        try:
            docs = case.render()
        except RuntimeError as e:
            report.fail("%s: helm template: %s" % (case.label, e))
            continue
        kinds = sorted("%s" % d["kind"] for d in docs)
        report.ok("%s: helm template (release %s in %s): %s" % (case.label, case.release, case.namespace, ", ".join(kinds)))
        validate_manifests(case, docs, versions, report)
        problems = check_chart(case, docs, case.values(defaults), chart, report)
        if problems:
            for p in problems:
                report.fail("%s: %s" % (case.label, p))
        else:
            report.ok("%s: webhook/Service/env agree, RBAC is the contract's, injection.yaml, labels, security" % case.label)
        if args.operator:
            check_injection(case, docs, case.values(defaults), chart, args.operator, report)

    for path in invalid:
        expect = header(path, "expect")
        if not expect:
            report.fail("%s has no '# expect: <error text>' line" % path)
            continue
        template = helm("template", "warren", CHART, "-f", path)
        lint = helm("lint", "--strict", CHART, "-f", path)
        lint_out = lint.stdout + lint.stderr
        if template.returncode == 0:
            report.fail("%s: helm template accepted it; values.schema.json must reject it" % path)
        elif expect not in template.stderr:
            report.fail("%s: helm template rejected it, but not with %r: %s" % (path, expect, template.stderr.strip()))
        elif lint.returncode == 0 or expect not in lint_out:
            report.fail("%s: helm lint --strict did not reject it with %r: %s" % (path, expect, lint_out.strip()))
        else:
            reason = [l.strip() for l in template.stderr.splitlines() if expect in l][-1]
            report.ok("%s: rejected by values.schema.json: %s" % (path, reason))

    check_checksum(report)
    check_readme(defaults, report)

    if report.failures:
        print("%d chart check(s) failed" % report.failures)
        return 1
    print("chart checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
