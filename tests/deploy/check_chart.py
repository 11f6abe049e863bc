"""Renders the Helm chart under deploy/helm/taipan with Helm's own engine (helm-python-sdk, which
embeds Helm) for several value sets, lints it, and validates every rendered manifest:
core Kubernetes kinds against the Kubernetes OpenAPI schemas (kubernetes-validate, strict);
the custom resources (InferencePool, HTTPRoute, KEDA ScaledObject), whose schemas ship with their
controllers and not with Kubernetes, against the required fields of their published API
references, written out below. Then checks what the chart promises: resources tied to --threads
and --kv-cache-mb, probes on /health, API keys only from a Secret, the pool selecting the pods."""
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "taipan"
KUBE = "1.33"

CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "required": ["selector", "targetPorts", "endpointPickerRef"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                            "additionalProperties": {"type": "string"}}}},
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8,
                                "items": {"type": "object", "required": ["number"],
                                          "properties": {"number": {"type": "integer", "minimum": 1,
                                                                    "maximum": 65535}}}},
                "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
                "endpointPickerRef": {
                    "type": "object", "required": ["name", "port"],
                    "properties": {"name": {"type": "string", "minLength": 1},
                                   "port": {"type": "object", "required": ["number"],
                                            "properties": {"number": {"type": "integer"}}},
                                   "failureMode": {"enum": ["FailOpen", "FailClose"]}}}}}}},
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "required": ["parentRefs", "rules"], "properties": {
            "parentRefs": {"type": "array", "minItems": 1,
                           "items": {"type": "object", "required": ["name"]}},
            "rules": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                "backendRefs": {"type": "array", "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"group": {"type": "string"}, "kind": {"type": "string"}}}}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"]},
            "minReplicaCount": {"type": "integer"}, "maxReplicaCount": {"type": "integer"},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"],
                "properties": {"metadata": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}}},
}

VALUE_SETS = {
    "defaults": {},
    "everything": {
        "threads": 4, "kvCacheMiB": 1024, "memory": {"modelMiB": 700},
        "aliases": ["jamba-mini", "jamba-large"], "extraArgs": ["--max-batch-tokens", "256"],
        "apiKeys": {"keys": ["k1", "k2"]},
        "autoscaling": {"keda": {"enabled": True}},
        "inferenceExtension": {"enabled": True},
    },
    "hub-model": {
        "model": {"hub": "org/Some-Model-GGUF:Q4_K_M", "hfTokenSecret": "hf-token", "existingClaim": "hub-cache"},
    },
    "hpa-claim-secret": {
        "model": {"existingClaim": "models", "file": "jamba.gguf"},
        "apiKeys": {"existingSecret": "taipan-keys"},
        "autoscaling": {"hpa": {"enabled": True}},
    },
}


def rendered(values):
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(values)
    docs = []
    for path, text in chart.render(values=values, name="demo").items():
        docs += [(path, d) for d in yaml.safe_load_all(text) if d]
    return docs


def merged(values):
    return helm.Chart.load(str(CHART)).merge_values(values)


def validate(path, doc):
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[key])
        return "custom resource, published required fields"
    kubernetes_validate.validate(doc, KUBE, strict=True)
    return f"Kubernetes {KUBE} schema, strict"


def check_promises(name, values, docs):
    v = merged(values)
    by_kind = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (deploy,) = by_kind["Deployment"]
    pod = deploy["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["TAIPAN_THREADS"]["value"] == str(v["threads"])
    assert env["TAIPAN_KV_CACHE_MB"]["value"] == str(v["kvCacheMiB"])
    memory = v["memory"]["modelMiB"] + v["kvCacheMiB"] + v["memory"]["overheadMiB"]
    for side in ("requests", "limits"):
        assert c["resources"][side]["cpu"] == str(v["threads"]), name
        assert c["resources"][side]["memory"] == f"{memory}Mi", name
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "models"]
    if v["model"]["hub"]:
        assert env["TAIPAN_MODEL"]["value"] == v["model"]["hub"]
        assert env["HF_HOME"]["value"].startswith(mount["mountPath"] + "/")
        assert mount["readOnly"] is False
        token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": v["model"]["hfTokenSecret"], "key": v["model"]["hfTokenKey"]}
    else:
        assert env["TAIPAN_MODEL"]["value"] == "/models/" + v["model"]["file"]
        assert mount["readOnly"] is True and "HF_TOKEN" not in env
    keys = env.get("TAIPAN_API_KEYS")
    if v["apiKeys"]["keys"] or v["apiKeys"]["existingSecret"]:
        ref = keys["valueFrom"]["secretKeyRef"]
        assert "value" not in keys
        secret = v["apiKeys"]["existingSecret"] or ref["name"]
        assert ref["name"] == secret
        if v["apiKeys"]["keys"]:
            (s,) = by_kind["Secret"]
            assert s["metadata"]["name"] == secret and s["stringData"][ref["key"]] == ",".join(v["apiKeys"]["keys"])
    else:
        assert keys is None and "Secret" not in by_kind
    scaled = v["autoscaling"]["hpa"]["enabled"] or v["autoscaling"]["keda"]["enabled"]
    assert ("replicas" in deploy["spec"]) != scaled
    init = pod["spec"].get("initContainers", [])
    assert bool(init) == (not v["model"]["existingClaim"] and not v["model"]["hub"])
    labels = pod["metadata"]["labels"]
    for pool in by_kind.get("InferencePool", []):
        assert all(labels.get(k) == val for k, val in pool["spec"]["selector"]["matchLabels"].items())
        assert pool["spec"]["targetPorts"] == [{"number": c["ports"][0]["containerPort"]}]
    for so in by_kind.get("ScaledObject", []):
        assert "vllm:num_requests_waiting" in so["spec"]["triggers"][0]["metadata"]["query"]
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == v["autoscaling"]["hpa"]["metricName"]
    return sorted(by_kind)


def main():
    report = helm.lint(str(CHART), strict=True)
    print("helm lint:", report)
    # Helm's severities: 1 info, 2 warning, 3 error. Info ("icon is recommended") is allowed.
    assert not report["errors"] and all(m["severity"] < 2 for m in report["messages"]), report
    for name, values in VALUE_SETS.items():
        docs = rendered(values)
        for path, doc in docs:
            how = validate(path, doc)
            print(f"{name}: {doc['kind']} ({path.split('/')[-1]}) valid: {how}")
        print(f"{name}: promises hold for {', '.join(check_promises(name, values, docs))}")
    print("chart OK")


if __name__ == "__main__":
    sys.exit(main())
