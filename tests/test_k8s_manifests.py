"""The Kubernetes manifests under k8s/, checked without a cluster.

Each kustomization is rendered here in Python (the part of kustomize the overlays use:
`resources`, `patches` of JSON 6902 operations with a target, `images`; anything else is
refused), so the tests need no tool beyond the project's venv; where `kubectl` is installed,
the rendering must equal `kubectl kustomize`. Every RayService and RayCluster is validated
against KubeRay's own CRD schema (../shared/kuberay-crds, as the API server would: unknown
fields refused), every serveConfigV2 against Ray Serve's ServeDeploySchema, and its import path
and arguments must build the application. Each check is a function returning the problems it
finds, and `test_broken_manifest_is_caught` breaks a good manifest to show each one can fail.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import jsonschema
import pytest
import yaml

from deploy.cluster_env import CLUSTER_ENV

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
KUSTOMIZATIONS = ["base", "overlays/cpu-local", "overlays/gpu"]
PLAIN_MANIFESTS = ["dev/raycluster.yaml", "tools/adapter-uploader.yaml", "monitoring/podmonitor.yaml"]
RAY_KINDS = ("RayService", "RayCluster")
IMAGE_REPOSITORY = "ghcr.io/flora-serve/flora-serve"  # the placeholder every manifest names
SHARED_ACCESS_MODES = {"ReadWriteMany", "ReadOnlyMany"}
Docs = list[dict]


# ---------------------------------------------------------------------------- rendering

def render(path: Path) -> Docs:
    """The documents of a plain manifest file, or of a kustomization directory."""
    if path.is_file():
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    kustomization = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches", "images"}
    if unknown:
        raise ValueError(f"{path}/kustomization.yaml: {sorted(unknown)} not rendered by this test; "
                         "use resources, patches (JSON 6902) and images, or extend render()")
    docs = [doc for entry in kustomization.get("resources", []) for doc in render(path / entry)]
    for patch in kustomization.get("patches", []):
        apply_patch(docs, patch, path)
    for image in kustomization.get("images", []):
        for container in containers_of(docs):
            name, _ = split_image(container["image"])
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def apply_patch(docs: Docs, patch: dict, base: Path) -> None:
    operations = yaml.safe_load((base / patch["path"]).read_text() if "path" in patch else patch["patch"])
    if not isinstance(operations, list):
        raise ValueError(f"{base}: only JSON 6902 patches (a list of operations) are rendered by this test; "
                         "strategic merges of CRDs replace whole lists in kustomize anyway")
    target = patch["target"]
    matched = [d for d in docs if d["kind"] == target.get("kind", d["kind"])
               and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])]
    if not matched:
        raise ValueError(f"{base}: patch target {target} matches no resource")
    for doc in matched:
        for operation in operations:
            json_patch(doc, operation)


def json_patch(doc: dict, operation: dict) -> None:
    """One RFC 6902 add, replace or remove operation, in place."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in operation["path"].split("/")[1:]]
    node = doc
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last, op = keys[-1], operation["op"]
    value = copy.deepcopy(operation.get("value"))
    if op == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), value)
    elif op == "add":
        node[last] = value
    elif op in ("replace", "remove"):
        key = int(last) if isinstance(node, list) else last
        if isinstance(node, dict) and key not in node:
            raise KeyError(f"{op} {operation['path']}: no such field")
        if op == "replace":
            node[key] = value
        else:
            del node[key]
    else:
        raise ValueError(f"JSON patch op {op!r} is not rendered by this test (add, replace, remove are)")


def split_image(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":")
    return (name, tag) if name and "/" not in tag else (image, "latest")


def containers_of(docs: Docs) -> Iterator[dict]:
    """Every container of every pod template, wherever it sits in a resource."""
    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    yield from value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
    for doc in docs:
        yield from walk(doc)


# ---------------------------------------------------------------------------- reading manifests

def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def ray_groups(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the first container runs Ray


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def app_args(doc: dict) -> dict:
    (application,) = serve_config(doc)["applications"]
    return application.get("args") or {}


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "8Gi", 2) as a number."""
    text = str(value)
    for suffix, scale in [("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40),
                          ("m", 1e-3), ("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)]:
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def node_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on one pod of the group: rayStartParams, else the container limits."""
    params, limits = group.get("rayStartParams", {}), ray_container(group)["resources"].get("limits", {})
    cpus = float(params["num-cpus"]) if "num-cpus" in params else quantity(limits["cpu"])
    gpus = float(params["num-gpus"]) if "num-gpus" in params else quantity(limits.get("nvidia.com/gpu", 0))
    return cpus, gpus


def pvc_mounts(container: dict, group: dict) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claimName, read-only) for the container's PersistentVolumeClaim mounts."""
    claims = {v["name"]: v["persistentVolumeClaim"] for v in group["template"]["spec"].get("volumes", [])
              if "persistentVolumeClaim" in v}
    return {m["mountPath"]: (claims[m["name"]]["claimName"], bool(m.get("readOnly")))
            for m in container.get("volumeMounts", []) if m["name"] in claims}


def under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


# ---------------------------------------------------------------------------- CRD schemas

def _list_type(validator, list_type, instance, schema):
    if not isinstance(instance, list):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if list_type == "map" else repr(item)
        if list_type in ("map", "set") and key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {item} in a list-type {list_type} (keys {keys})")
        seen.add(key)


def _int_or_string(validator, flag, instance, schema):
    if flag and (isinstance(instance, bool) or not isinstance(instance, (int, str))):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


def _cel_rules(validator, rules, instance, schema):
    rule_text = "; ".join(r["rule"] for r in rules)
    yield jsonschema.ValidationError(f"this field carries CEL rules that are not evaluated offline ({rule_text}); "
                                     "leave it unset or check it on a cluster")


KubeValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {
    "x-kubernetes-list-type": _list_type, "x-kubernetes-int-or-string": _int_or_string,
    "x-kubernetes-validations": _cel_rules})


def refuse_unknown_fields(schema: dict) -> None:
    """Structural schemas prune unknown fields and kubectl's strict validation refuses them: do the same."""
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    children = list(schema.get("properties", {}).values()) + list(schema.get("anyOf", [])) \
        + list(schema.get("allOf", [])) + list(schema.get("oneOf", []))
    children += [schema[k] for k in ("items", "additionalProperties", "not") if isinstance(schema.get(k), dict)]
    for child in children:
        refuse_unknown_fields(child)


@pytest.fixture(scope="session")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    if not all((CRD_DIR / f).is_file() for f in CRD_FILES.values()):
        pytest.fail(f"KubeRay CRD schemas not found in {CRD_DIR} (expected {sorted(CRD_FILES.values())}): the "
                    "tests read them from ../shared/kuberay-crds beside the repository, where CI clones main")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    validators = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=loader)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = version["schema"]["openAPIV3Schema"]
        refuse_unknown_fields(schema)
        validators[kind] = KubeValidator(schema)
    return validators


# ---------------------------------------------------------------------------- checks

def crd_problems(docs: Docs, validators: dict) -> list[str]:
    problems = []
    for doc in docs:
        if doc["kind"] in RAY_KINDS:
            if doc["apiVersion"] != "ray.io/v1":
                problems.append(f"{doc['kind']}: apiVersion {doc['apiVersion']}, expected ray.io/v1")
            problems += [f"{doc['kind']} {'/'.join(map(str, e.absolute_path))}: {e.message}"
                         for e in validators[doc["kind"]].iter_errors(doc)]
    return problems


def serve_problems(docs: Docs) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    problems = []
    for doc in (d for d in docs if d["kind"] == "RayService"):
        config = serve_config(doc)
        try:
            ServeDeploySchema.model_validate(config)
        except ValueError as error:  # pydantic.ValidationError
            problems.append(f"serveConfigV2: {error}")
            continue
        port = config.get("http_options", {}).get("port", 8000)
        for name, group in ray_groups(doc):
            ports = {p["name"]: p["containerPort"] for p in ray_container(group).get("ports", [])}
            if ports.get("serve", port) != port:
                problems.append(f"{name}: port 'serve' is {ports['serve']}, Serve listens on {port}")
        if [a["import_path"] for a in config["applications"]] != ["deploy.app:build_app"]:
            problems.append("serveConfigV2 must deploy one application, deploy.app:build_app")
    return problems


def storage_problems(docs: Docs) -> list[str]:
    """Paths the app reads (model, adapter_dir) on PVCs are mounted read-only in every Ray pod."""
    problems = []
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in (d for d in docs if d["kind"] == "RayService"):
        args = app_args(doc)
        for name, group in ray_groups(doc):
            mounts = pvc_mounts(ray_container(group), group)
            if args.get("adapter_dir") and not any(under(args["adapter_dir"], m) for m in mounts):
                problems.append(f"{name}: adapter_dir {args['adapter_dir']} is on no PersistentVolumeClaim mount")
            for mount, (claim, read_only) in mounts.items():
                read = [args[k] for k in ("model", "adapter_dir") if args.get(k) and under(args[k], mount)]
                if read and not read_only:
                    problems.append(f"{name}: {read} mounted read-write from {claim}")
                if claim not in claims:
                    problems.append(f"{name}: claim {claim} is not among the manifests")
                elif not SHARED_ACCESS_MODES & set(claims[claim]["spec"]["accessModes"]):
                    problems.append(f"{name}: claim {claim} is not ReadWriteMany or ReadOnlyMany")
    return problems


def gpu_problems(docs: Docs) -> list[str]:
    problems = []
    for doc in (d for d in docs if d["kind"] in RAY_KINDS):
        for name, group in ray_groups(doc):
            resources, spec = ray_container(group)["resources"], group["template"]["spec"]
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            if gpus is None:
                continue
            if resources.get("requests", {}).get("nvidia.com/gpu", gpus) != gpus:
                problems.append(f"{name}: nvidia.com/gpu requests differ from limits")
            if not any(t.get("key") == "nvidia.com/gpu" and t.get("effect") in (None, "NoSchedule")
                       and t.get("operator", "Equal") == "Exists" for t in spec.get("tolerations", [])):
                problems.append(f"{name}: requests nvidia.com/gpu but does not tolerate the nvidia.com/gpu taint")
        if doc["kind"] == "RayService":
            wants = float(app_args(doc).get("replica_num_gpus", 0)) > 0
            has = any(node_resources(g)[1] > 0 for _, g in ray_groups(doc))
            if wants != has:
                problems.append(f"replica_num_gpus asks for GPUs: {wants}; a worker group has them: {has}")
    return problems


def scaling_problems(docs: Docs) -> list[str]:
    """Both autoscalers on, and the worker groups at their largest hold Serve's largest replica count."""
    problems = []
    for doc in (d for d in docs if d["kind"] == "RayService"):
        spec, args = cluster_spec(doc), app_args(doc)
        if not spec.get("enableInTreeAutoscaling"):
            problems.append("enableInTreeAutoscaling is off")
        auto = args.get("autoscaling_config") or {}
        if args.get("num_replicas") != "auto" or not {"min_replicas", "max_replicas"} <= set(auto):
            problems.append("the replicas do not autoscale (num_replicas: auto with min and max_replicas)")
            continue
        need_cpu, need_gpu = float(args.get("replica_num_cpus", 1)), float(args.get("replica_num_gpus", 0))
        capacity = 0
        for name, group in ray_groups(doc):
            cpus, gpus = node_resources(group)
            per_pod = min(math.floor(cpus / need_cpu) if need_cpu else math.inf,
                          math.floor(gpus / need_gpu) if need_gpu else math.inf)
            if name != "head" and not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
                problems.append(f"{name}: replicas outside [minReplicas, maxReplicas]")
            capacity += per_pod * (1 if name == "head" else group["maxReplicas"])
        if capacity < auto["max_replicas"]:
            problems.append(f"max_replicas {auto['max_replicas']} but the largest cluster places {capacity}")
    return problems


def pod_problems(docs: Docs) -> list[str]:
    """Resources and probes of every Ray container; probes never make a loading model restart."""
    problems = []
    for doc in (d for d in docs if d["kind"] in RAY_KINDS):
        for name, group in ray_groups(doc):
            container = ray_container(group)
            resources = container.get("resources", {})
            for kind in ("cpu", "memory"):
                request, limit = resources.get("requests", {}).get(kind), resources.get("limits", {}).get(kind)
                if request is None or limit is None or quantity(request) > quantity(limit):
                    problems.append(f"{name}: {kind} needs a request no larger than its limit")
            ports = {p["name"] for p in container.get("ports", [])} | {p["containerPort"] for p in
                                                                        container.get("ports", [])}
            wanted = ("livenessProbe", "readinessProbe") if doc["kind"] == "RayService" else ("livenessProbe",)
            for probe_name in wanted:
                probe = container.get(probe_name)
                if probe is None:
                    problems.append(f"{name}: no {probe_name}")
                    continue
                http = probe.get("httpGet")
                if http and http["port"] not in ports:
                    problems.append(f"{name}: {probe_name} targets port {http['port']}, not a container port")
                target = str(probe)
                if probe_name == "livenessProbe" and ("/ready" in target or "/v1/" in target):
                    problems.append(f"{name}: livenessProbe depends on a model replica; a loading model restarts")
                if name == "head" and (http or ":8000" in target):
                    problems.append(f"{name}: head {probe_name} depends on the Serve app, deployed after the head")
    return problems


def token_problems(docs: Docs) -> list[str]:
    """The management API is on only with a token read from a Secret, never written in the manifest."""
    problems = []
    for doc in (d for d in docs if d["kind"] == "RayService"):
        args = app_args(doc)
        if "management_token" in args:
            problems.append("management_token is written in serveConfigV2; use management_token_env and a Secret")
        if not args.get("enable_adapter_management"):
            continue
        variable = args.get("management_token_env")
        if not variable:
            problems.append("enable_adapter_management without management_token_env: the API would be open")
        for name, group in ray_groups(doc):
            env = {e["name"]: e for e in ray_container(group).get("env", [])}
            if "secretKeyRef" not in env.get(variable, {}).get("valueFrom", {}):
                problems.append(f"{name}: {variable} is not set from a Secret")
    return problems


def image_problems(docs: Docs, version: str) -> list[str]:
    problems = []
    for container in containers_of(docs):
        name, tag = split_image(container["image"])
        if name != IMAGE_REPOSITORY or tag not in (version, f"{version}-gpu"):
            problems.append(f"{container['name']}: image {container['image']}, expected {IMAGE_REPOSITORY}:{version}"
                            "[-gpu]")
    for doc in (d for d in docs if d["kind"] in RAY_KINDS):
        images = {ray_container(g)["image"] for _, g in ray_groups(doc)}
        gpu = any(node_resources(g)[1] > 0 for _, g in ray_groups(doc))
        if len(images) != 1 or split_image(images.pop())[1].endswith("-gpu") != gpu:
            problems.append(f"{doc['metadata']['name']}: one image for every Ray pod, the -gpu one iff GPU workers")
    return problems


ALL_CHECKS: dict[str, Callable[..., list[str]]] = {
    "serve": serve_problems, "storage": storage_problems, "gpu": gpu_problems, "scaling": scaling_problems,
    "pods": pod_problems, "token": token_problems}


# ---------------------------------------------------------------------------- building the app

def build_args(doc: dict, tmp_path: Path) -> tuple[dict, dict]:
    """The serve config's args with only what needs the cluster replaced, and the replacements."""
    args, mounts = dict(app_args(doc)), set()
    for _, group in ray_groups(doc):
        mounts |= set(pvc_mounts(ray_container(group), group))
    overrides = {}
    if any(under(args.get("model", ""), m) for m in mounts):
        overrides["model"] = "flora-tiny-llama"
    if any(under(args.get("adapter_dir") or "", m) for m in mounts):
        overrides["adapter_dir"] = str(tmp_path)
    if float(args.get("replica_num_gpus", 0)) > 0:
        overrides["replica_num_gpus"] = 0
    return {**args, **overrides}, overrides


def build(doc: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, dict]:
    from deploy.app import AppArgs, build_app

    args, overrides = build_args(doc, tmp_path)
    unknown = sorted(set(args) - set(AppArgs.model_fields))
    if unknown:
        pytest.fail(f"serveConfigV2 passes {unknown}, which deploy/app.py's AppArgs does not accept "
                    "(management_token_env: see 'Management token' in k8s/README.md)")
    if args.get("management_token_env"):
        monkeypatch.setenv(args["management_token_env"], "token-from-the-secret")
    return build_app(args), overrides


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def rendered() -> dict[str, Docs]:
    return {name: render(K8S / name) for name in KUSTOMIZATIONS + PLAIN_MANIFESTS}


@pytest.fixture(scope="session")
def project_version() -> str:
    return re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def ray_service(docs: Docs) -> dict:
    (doc,) = [d for d in docs if d["kind"] == "RayService"]
    return doc


# ---------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", KUSTOMIZATIONS + ["dev/raycluster.yaml"])
def test_ray_manifests_match_the_kuberay_crds(name, rendered, crd_validators):
    assert [d["kind"] for d in rendered[name] if d["kind"] in RAY_KINDS], f"{name} has no Ray resource"
    assert crd_problems(rendered[name], crd_validators) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS + ["dev/raycluster.yaml"])
@pytest.mark.parametrize("check", ALL_CHECKS)
def test_manifest_checks(name, check, rendered):
    assert ALL_CHECKS[check](rendered[name]) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_serve_config_builds_the_application(name, rendered, tmp_path, monkeypatch):
    from ray.serve import Application

    app, overrides = build(ray_service(rendered[name]), tmp_path, monkeypatch)
    assert isinstance(app, Application)
    if app_args(ray_service(rendered[name])).get("management_token_env"):
        ingress_settings = app._bound_deployment.init_args[0]  # what FloraIngress is constructed with
        assert ingress_settings.management_token == "token-from-the-secret"
    if name == "overlays/cpu-local":
        assert overrides == {}, "the CPU overlay must build exactly as deployed"


def test_overlays_are_what_they_say(rendered):
    gpu, local = ray_service(rendered["overlays/gpu"]), ray_service(rendered["overlays/cpu-local"])
    assert [n for n, g in ray_groups(gpu) if node_resources(g)[1] > 0] == ["gpu"]
    assert app_args(gpu)["adapter_dir"] == "/adapters" and app_args(gpu)["enable_adapter_management"]
    assert all(node_resources(g)[1] == 0 for _, g in ray_groups(local))
    assert app_args(local)["model"] == "flora-tiny-llama"
    small = sum(quantity(ray_container(g)["resources"]["requests"]["memory"]) for _, g in ray_groups(local))
    assert small <= 6 * 2**30, "cpu-local must fit a laptop's kind cluster"


def test_images_agree(rendered, project_version):
    for name, docs in rendered.items():
        assert image_problems(docs, project_version) == [], name
    dockerfile = (REPO / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.M).group(1)
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert torch_version == re.search(r"TORCH_VERSION:-([\d.]+)", setup).group(1)
    for docs in rendered.values():
        for doc in (d for d in docs if d["kind"] in RAY_KINDS):
            assert cluster_spec(doc)["rayVersion"] == ray_version, doc["metadata"]["name"]


def test_image_context_holds_the_package():
    """What pyproject installs is copied by the Dockerfile and let through by .dockerignore."""
    pyproject = (REPO / "pyproject.toml").read_text()
    include = re.search(r"^include = \[(.*)\]", pyproject, re.M).group(1)
    needed = [p.strip(' "*') for p in include.split(",")]
    dockerfile, ignore = (REPO / "Dockerfile").read_text(), (REPO / ".dockerignore").read_text().split()
    for package in needed:
        assert re.search(rf"^COPY .*\b{package} ", dockerfile, re.M), package
        assert f"!{package}/" in ignore, package
    for file in ("pyproject.toml", re.search(r'^readme = "(.+)"', pyproject, re.M).group(1)):
        assert file in dockerfile and f"!{file}" in ignore, file


def test_image_and_readme_start_ray_with_the_cluster_env():
    """Every variable of deploy.cluster_env, which no Serve config can carry, is set by the image (so every
    KubeRay pod has it) and by the README's `serve run` command."""
    dockerfile, readme = (REPO / "Dockerfile").read_text(), (REPO / "README.md").read_text()
    serve_command = re.search(r"^bash scripts/setup.sh && (.*serve run deploy/serve_config.yaml)$", readme, re.M)
    assert CLUSTER_ENV and serve_command
    for name, value in CLUSTER_ENV.items():
        assert re.search(rf"^ENV {name}={value}$", dockerfile, re.M), f"Dockerfile: ENV {name}={value}"
        assert f"{name}={value} " in serve_command.group(1), f"README: {name}={value} before serve run"


def test_monitoring_and_tools_fit_the_ray_pods(rendered):
    (monitor,) = rendered["monitoring/podmonitor.yaml"]
    (uploader,) = rendered["tools/adapter-uploader.yaml"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    for name in KUSTOMIZATIONS + ["dev/raycluster.yaml"]:
        for doc in (d for d in rendered[name] if d["kind"] in RAY_KINDS):
            for group_name, group in ray_groups(doc):
                labels = group["template"]["metadata"]["labels"]
                assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(), (name, group_name)
                assert port in {p["name"] for p in ray_container(group)["ports"]}, (name, group_name)
                params = group["rayStartParams"]
                assert params.get("metrics-export-port") == str(
                    {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}[port])
    claims = {d["metadata"]["name"] for d in rendered["overlays/gpu"] if d["kind"] == "PersistentVolumeClaim"}
    assert {v["persistentVolumeClaim"]["claimName"] for v in uploader["spec"]["volumes"]} == claims


def test_every_manifest_file_is_checked():
    covered = {K8S / p for p in PLAIN_MANIFESTS}
    for name in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
        covered |= {K8S / name / "kustomization.yaml"}
        covered |= {(K8S / name / r).resolve() for r in kustomization.get("resources", [])}
        covered |= {K8S / name / p["path"] for p in kustomization.get("patches", []) if "path" in p}
    files = {p for p in K8S.rglob("*.yaml")}
    assert files - covered == set(), "add these to KUSTOMIZATIONS, PLAIN_MANIFESTS or a kustomization"


WORKER = "/spec/rayClusterConfig/workerGroupSpecs/0"
HEAD_CONTAINER = "/spec/rayClusterConfig/headGroupSpec/template/spec/containers/0"
BREAKAGES = {  # what breaks -> (JSON patch on the gpu overlay's RayService, the check, what it must say)
    "misspelled field": ({"op": "add", "path": f"{WORKER}/maxReplica", "value": 4}, "crd",
                         "'maxReplica' was unexpected"),
    "wrong type": ({"op": "replace", "path": f"{WORKER}/maxReplicas", "value": "four"}, "crd", "not of type 'integer'"),
    "duplicate port": ({"op": "add", "path": f"{HEAD_CONTAINER}/ports/-", "value": {"name": "serve2",
                                                                                    "containerPort": 8000}},
                       "crd", "duplicate entry"),
    "bad serve config": ({"op": "replace", "path": "/spec/serveConfigV2", "value": "applications: [{name: flora}]"},
                         "serve", "import_path"),
    "read-write adapters": ({"op": "replace", "path": f"{WORKER}/template/spec/containers/0/volumeMounts/1/readOnly",
                             "value": False}, "storage", "mounted read-write"),
    "no toleration": ({"op": "remove", "path": f"{WORKER}/template/spec/tolerations"}, "gpu", "taint"),
    "too few workers": ({"op": "replace", "path": f"{WORKER}/maxReplicas", "value": 2}, "scaling", "places 2"),
    "liveness on /ready": ({"op": "replace", "path": f"{WORKER}/template/spec/containers/0/livenessProbe",
                            "value": {"httpGet": {"path": "/ready", "port": "serve"}}}, "pods", "loading model"),
    "token from no Secret": ({"op": "remove", "path": f"{HEAD_CONTAINER}/env"}, "token", "not set from a Secret"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_manifest_is_caught(breakage, rendered, crd_validators):
    operation, check, message = BREAKAGES[breakage]
    problems = (lambda d: crd_problems(d, crd_validators)) if check == "crd" else ALL_CHECKS[check]
    docs = copy.deepcopy(rendered["overlays/gpu"])
    assert problems(docs) == []
    json_patch(ray_service(docs), operation)
    assert any(message in problem for problem in problems(docs)), problems(docs)


def test_broken_args_do_not_build(rendered, tmp_path):
    from deploy.app import build_app

    args, _ = build_args(ray_service(rendered["overlays/cpu-local"]), tmp_path)
    with pytest.raises(ValueError, match="lora_slot"):  # pydantic's ValidationError is a ValueError
        build_app({**args, "lora_slot": 8})
    with pytest.raises(ValueError, match="adapter_dir"):
        build_app({**args, "adapter_dir": str(tmp_path / "missing")})


def test_render_refuses_what_it_does_not_implement(tmp_path):
    doc = {"kind": "K", "metadata": {"name": "n"}, "spec": {"a": [1, 2]}}
    json_patch(doc, {"op": "add", "path": "/spec/a/-", "value": 3})
    json_patch(doc, {"op": "add", "path": "/spec/b~1c", "value": {}})
    assert doc["spec"] == {"a": [1, 2, 3], "b/c": {}}
    with pytest.raises(KeyError):
        json_patch(doc, {"op": "replace", "path": "/spec/missing", "value": 1})
    with pytest.raises(ValueError, match="move"):
        json_patch(doc, {"op": "move", "path": "/spec/a", "from": "/spec/b"})
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        render(tmp_path)
    assert split_image("localhost:5000/flora:1.2") == ("localhost:5000/flora", "1.2")
    assert split_image("localhost:5000/flora") == ("localhost:5000/flora", "latest")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed; the Python rendering is used")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendering_equals_kubectl_kustomize(name, rendered):
    output = subprocess.run(["kubectl", "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60,
                            check=True).stdout
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(output), key=key) == sorted(rendered[name], key=key)
