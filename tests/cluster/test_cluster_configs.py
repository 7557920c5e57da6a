"""Static checks of cluster/: Ray launcher YAML against Ray's own autoscaler schema, KubeRay manifests
structurally and (their pod templates and service account) against the Kubernetes schemas with
kubernetes-validate, every RayJob entrypoint and documented job command through the real argument
parser of the script it runs, and the cross-references between them and the rest of the repo.
No network, no cloud."""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws-gpu.yaml", "gcp": CLUSTER / "gcp-gpu.yaml"}
KUBERAY = CLUSTER / "kuberay"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

PRESETS = {"tiny", "llada-8b", "dream-7b"}
SERVE_IMPORT_PATH = "serve_apps.openai_app:app_builder"
IMAGE_REPO = "ghcr.io/d3ray/d3ray"  # registry-qualified; the Dockerfile's build comments tag exactly these
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest Kubernetes we document and the newest kubernetes-validate knows

# Published shapes of the instance types the configs use: (vCPUs, GPUs).
AWS_INSTANCES = {"m5.2xlarge": (8, 0), "g5.12xlarge": (48, 4), "p4d.24xlarge": (96, 8)}
GCP_MACHINES = {"n2-standard-8": (8, 0), "a2-highgpu-1g": (12, 1), "a2-highgpu-8g": (96, 8)}


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _pyproject(path: Path = ROOT) -> dict:
    """The few [project] fields these tests need (tomllib is 3.11+; the project supports 3.10)."""
    text = (path / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    deps_block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", project, flags=re.M | re.S).group(1)
    extras_block = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return {
        "name": re.search(r'^name\s*=\s*"([^"]+)"', project, flags=re.M).group(1),
        "version": re.search(r'^version\s*=\s*"([^"]+)"', project, flags=re.M).group(1),
        "requires-python": re.search(r'^requires-python\s*=\s*"([^"]+)"', project, flags=re.M).group(1),
        "dependencies": re.findall(r'^\s*"([^"]+)"', deps_block, flags=re.M),
        "extras": {m.group(1): re.findall(r'"([^"]+)"', m.group(2))
                   for m in re.finditer(r"^([\w-]+)\s*=\s*\[(.*?)\]", extras_block, flags=re.M | re.S)},
    }


def _ray_pin() -> str:
    deps = _pyproject()["dependencies"]
    (pin,) = [d for d in deps if re.match(r"ray(\[|==)", d)]
    return pin.split("==")[1]


def _worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(RAY_SCHEMA.read_text())


@pytest.fixture(params=sorted(LAUNCHERS), scope="module")
def launcher(request) -> tuple[str, dict]:
    return request.param, _load(LAUNCHERS[request.param])


# ---------------------------------------------------------------- launcher YAML: Ray's own checks


def test_ray_schema_ships_with_installed_ray(schema):
    assert RAY_SCHEMA.is_file()
    assert "available_node_types" in schema["properties"]


def test_launcher_validates_against_ray_schema(launcher, schema):
    name, cfg = launcher
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(cfg)]
    assert not errors, f"{name}: {errors}"


def test_launcher_passes_ray_up_config_preparation(launcher):
    """The provider-independent part of `ray up`: merge with the provider's defaults.yaml, then
    Ray's validate_config (schema + head type known + sum(min_workers) <= max_workers)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    name, cfg = launcher
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["provider"]["type"] == name
    # our setup commands survive the merge into the per-role lists `ray up` actually runs
    assert prepared["worker_setup_commands"][: len(cfg["setup_commands"])] == cfg["setup_commands"]
    assert prepared["head_setup_commands"][: len(cfg["setup_commands"])] == cfg["setup_commands"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["available_node_types"][c["head_node_type"]].update(min_cpus=1),  # unknown key
        lambda c: next(iter(_worker_types(c).values()))["resources"].update(GPU="4"),  # string count
        lambda c: c.update(max_workers="six"),
        lambda c: c["provider"].pop("type"),
    ],
    ids=["unknown-node-key", "gpu-as-string", "max-workers-string", "no-provider-type"],
)
def test_schema_rejects_broken_variants(launcher, schema, mutate):
    """The schema check above is live: the same configs, broken in one field, are rejected."""
    cfg = copy.deepcopy(launcher[1])
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, schema)


def test_ray_validate_rejects_unknown_head_type(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(launcher[1]))
    cfg["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(cfg)


# ---------------------------------------------------------------- launcher YAML: cross-checks


def test_node_types_and_autoscaling_bounds(launcher):
    name, cfg = launcher
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = _worker_types(cfg)
    assert workers, f"{name}: no worker node types"
    assert cfg["max_workers"] >= 1
    for key, nt in workers.items():
        lo, hi = nt.get("min_workers", 0), nt["max_workers"]
        assert 0 <= lo <= hi <= cfg["max_workers"], f"{name}/{key}: min {lo}, max {hi}, cluster {cfg['max_workers']}"
    assert sum(nt.get("min_workers", 0) for nt in workers.values()) <= cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 60
    assert cfg["upscaling_speed"] > 0


def test_gpu_resources_declared_and_match_hardware(launcher):
    name, cfg = launcher
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    for key, nt in cfg["available_node_types"].items():
        res, nc = nt["resources"], nt["node_config"]
        if name == "aws":
            cpus, gpus = AWS_INSTANCES[nc["InstanceType"]]
        else:
            cpus, gpus = GCP_MACHINES[nc["machineType"]]
        assert res.get("CPU") == cpus, f"{name}/{key}: CPU {res.get('CPU')} != {cpus}"
        assert res.get("GPU", 0) == gpus, f"{name}/{key}: GPU {res.get('GPU')} != {gpus}"
        if key != cfg["head_node_type"]:
            assert gpus >= 1, f"{name}/{key}: every worker type is a GPU type"


def test_gcp_gpu_nodes_have_matching_accelerators_and_terminate_on_maintenance():
    cfg = _load(LAUNCHERS["gcp"])
    for key, nt in _worker_types(cfg).items():
        nc = nt["node_config"]
        accels = nc["guestAccelerators"]
        assert sum(a["acceleratorCount"] for a in accels) == nt["resources"]["GPU"], key
        assert all(a["acceleratorType"] == "nvidia-tesla-a100" for a in accels), key
        m = re.fullmatch(r"a2-highgpu-(\d+)g", nc["machineType"])
        assert m and int(m.group(1)) == nt["resources"]["GPU"], key
        assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE", key
        items = {i["key"]: i["value"] for i in nc["metadata"]["items"]}
        assert items.get("install-nvidia-driver") == "True", key


def test_aws_nodes_use_a_gpu_driver_ami_and_enough_disk():
    cfg = _load(LAUNCHERS["aws"])
    for key, nt in cfg["available_node_types"].items():
        nc = nt["node_config"]
        assert nc["ImageId"].startswith(("ami-", "resolve:ssm:")), key
        assert "nvidia-driver" in nc["ImageId"] or nc["ImageId"].startswith("ami-"), key
        (root_disk,) = nc["BlockDeviceMappings"]
        assert root_disk["Ebs"]["VolumeSize"] >= 200, key


def test_setup_commands_install_the_mounted_working_tree(launcher):
    name, cfg = launcher
    mounts = cfg["file_mounts"]
    installs = [c for c in cfg["setup_commands"] if re.search(r"\bpip install\b.*\s-e\s", c)]
    assert installs, f"{name}: no `pip install -e` in setup_commands"
    (target,) = re.findall(r"\s-e\s+(\S+)", installs[0])
    path, _, extras = shlex.split(target)[0].partition("[")
    path = path.replace("$HOME", "~")
    assert path in mounts, f"{name}: installs {path} but file_mounts has {sorted(mounts)}"
    local = (ROOT / mounts[path]).resolve()
    assert local == ROOT, f"{name}: {path} is mounted from {local}, not the repo root"
    assert _pyproject(local)["name"] == "d3ray"
    # git-ignored paths (.venv, runs/) are not shipped to every node
    assert ".gitignore" in cfg["rsync_filter"]
    # URIs of the cloud's object store must resolve through fsspec on every node: the storage extra
    fs_extra, fs_pkg = {"aws": ("s3", "s3fs"), "gcp": ("gcs", "gcsfs")}[name]
    declared = _pyproject()["extras"]
    assert fs_extra in extras.rstrip("]").split(","), f"{name}: extra {fs_extra} missing from {installs[0]!r}"
    assert any(d.startswith(fs_pkg) for d in declared[fs_extra]), declared
    assert any("torch.cuda.is_available()" in c for c in cfg["worker_setup_commands"]), name


def test_aws_workers_have_an_instance_profile_for_s3():
    """Ray Train uploads checkpoints from every worker, so workers (not just the head) need S3 credentials."""
    cfg = _load(LAUNCHERS["aws"])
    for key, nt in _worker_types(cfg).items():
        profile = nt["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn", "").startswith("arn:aws:iam::"), key
    readme = (CLUSTER / "README.md").read_text()
    names = {nt["node_config"]["IamInstanceProfile"].get("Name") for nt in _worker_types(cfg).values()}
    for name in names - {None}:
        assert name in readme, f"cluster/README.md does not document the instance profile {name}"
    assert "s3:PutObject" in readme and "s3:ListBucket" in readme


def test_container_ray_matches_pinned_and_installed_ray(launcher):
    name, cfg = launcher
    pin = _ray_pin()
    assert pin == ray.__version__
    image = cfg["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", image)
    assert m, f"{name}: unexpected image {image}"
    assert m.group(1) == pin, f"{name}: image Ray {m.group(1)} != pinned {pin}"
    py = _pyproject()["requires-python"]
    assert py.startswith(">=3.") and int(m.group(3)) >= int(py.split(".")[1])


def test_ray_start_commands(launcher):
    name, cfg = launcher
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert cfg["head_start_ray_commands"][0] == "ray stop" == cfg["worker_start_ray_commands"][0]
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head, "without it the autoscaler never runs"
    (port,) = re.findall(r"--port=(\d+)", head)
    (worker_port,) = re.findall(r"--address=\$RAY_HEAD_IP:(\d+)", worker)
    assert port == worker_port
    assert "--head" not in worker
    dash = re.findall(r"--dashboard-host=(\S+)", head)
    assert dash == ["127.0.0.1"], f"{name}: dashboard/job API must stay on loopback, got {dash}"


# ---------------------------------------------------------------- KubeRay manifests


def _manifests() -> dict[str, dict]:
    return {p.name: _load(p) for p in sorted(KUBERAY.glob("*.yaml"))}


RAY_MANIFESTS = sorted(name for name, doc in _manifests().items() if doc["kind"] in ("RayJob", "RayService"))


def _pod_templates(doc: dict):
    cluster = _cluster_spec(doc)
    yield "head", cluster["headGroupSpec"]["template"]
    for g in cluster["workerGroupSpecs"]:
        yield g["groupName"], g["template"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def _containers(cluster: dict):
    yield "head", cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for g in cluster["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]["containers"]


def _serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def _gpu_manifest(doc: dict) -> bool:
    return "tiny" not in doc["metadata"]["name"]


def test_expected_manifests_exist():
    kinds = {name: doc["kind"] for name, doc in _manifests().items()}
    assert kinds == {"rayjob.yaml": "RayJob", "rayservice.yaml": "RayService", "rayservice-tiny.yaml": "RayService",
                     "serviceaccount.yaml": "ServiceAccount"}


@pytest.mark.parametrize("fname", RAY_MANIFESTS)
def test_kuberay_manifest_structure(fname):
    doc = _load(KUBERAY / fname)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in {"RayJob", "RayService"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    cluster = _cluster_spec(doc)
    assert cluster["rayVersion"] == _ray_pin()
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # KubeRay reaches it through a Service
    groups = cluster["workerGroupSpecs"]
    assert groups
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names)
    for g in groups:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", g["groupName"])
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    images = set()
    for group, containers in _containers(cluster):
        assert containers, group
        for c in containers:
            assert c["name"] and c["image"], group
            images.add(c["image"])
            res = c["resources"]
            for kind in ("cpu", "memory"):
                assert kind in res["limits"], f"{group}: {kind} limit (Ray sizes itself from limits)"
    assert len(images) == 1, f"head and workers must run one image (same Ray/Python): {images}"


@pytest.mark.parametrize("fname", RAY_MANIFESTS)
def test_kuberay_gpu_limits(fname):
    doc = _load(KUBERAY / fname)
    cluster = _cluster_spec(doc)
    head_limits = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    for g in cluster["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            res = c["resources"]
            gpus = res["limits"].get("nvidia.com/gpu")
            if not _gpu_manifest(doc):
                assert gpus is None, f"{fname}/{g['groupName']}: CPU manifest asks for GPUs"
                continue
            assert isinstance(gpus, int) and gpus >= 1, f"{fname}/{g['groupName']}: nvidia.com/gpu {gpus!r}"
            # Kubernetes rejects extended resources whose request differs from the limit
            assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
            assert c["image"].endswith("-gpu"), c["image"]


def _entrypoint_config(argv: list[str]):
    """Parse a `python <script> ...` command with the script's own parser (its config validates on build)."""
    import importlib

    assert argv[0] == "python", argv
    script = argv[1].removeprefix("/home/ray/d3ray/")
    assert (ROOT / script).is_file(), f"{script} does not exist in the repo"
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    return module.parse_args(argv[2:])


def test_rayjob_entrypoint_parses_with_full_py_s_own_parser():
    doc = _load(KUBERAY / "rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    # the image installs the repo at /home/ray/d3ray (cluster/Dockerfile): the script must exist there
    assert argv[1] == "/home/ray/d3ray/pipelines/full.py"
    cfg = _entrypoint_config(argv)  # FullConfig: raises on a missing --prompts or a bad value
    recipe = cfg.recipe
    assert recipe.preset == "llada-8b"
    assert re.match(r"(s3|gs)://", cfg.run_dir), "pods need shared storage for the run directory"
    assert re.match(r"(s3|gs)://", recipe.prompts)
    from d3core.models.hub import parse_hub_ref

    assert parse_hub_ref(recipe.teacher) is not None and parse_hub_ref(recipe.ar_model) is not None
    assert recipe.trajectories.teacher == recipe.teacher == recipe.evaluate.models["teacher"]  # one setting
    # the check is live: an entrypoint without the prompts is refused by the same parser
    with pytest.raises(ValueError, match="needs --prompts"):
        _entrypoint_config(["python", argv[1], "--preset", "llada-8b", "--run-dir", cfg.run_dir])
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    cluster = doc["spec"]["rayClusterSpec"]
    # llada-8b trajectories want 8 GPUs and FSDP2 8 ranks: one worker group must offer 8 GPUs per pod
    per_pod = [g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
               for g in cluster["workerGroupSpecs"]]
    assert max(g["maxReplicas"] * n for g, n in zip(cluster["workerGroupSpecs"], per_pod)) >= 8
    assert 8 in per_pod


@pytest.mark.parametrize("fname", RAY_MANIFESTS)
def test_images_are_registry_qualified_and_pinned(fname):
    doc = _load(KUBERAY / fname)
    version, ray_pin = _pyproject()["version"], _ray_pin()
    flavour = "gpu" if _gpu_manifest(doc) else "cpu"
    expected = f"{IMAGE_REPO}:{version}-ray{ray_pin}-py311-{flavour}"
    for group, containers in _containers(_cluster_spec(doc)):
        for c in containers:
            assert c["image"] == expected, f"{fname}/{group}: {c['image']} (want {expected})"
    assert f"-t {expected}" in (CLUSTER / "Dockerfile").read_text(), "the Dockerfile's build command tags it"


@pytest.mark.parametrize("fname", [f for f in RAY_MANIFESTS if "tiny" not in f])
def test_gpu_pods_select_gpu_nodes_and_run_as_the_storage_identity(fname):
    doc = _load(KUBERAY / fname)
    for group, template in _pod_templates(doc):
        spec = template["spec"]
        assert spec.get("serviceAccountName") == "d3ray", f"{fname}/{group}: no object-storage identity"
        if group == "head":
            continue
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
        rules = {e["key"]: (e["operator"], e["values"]) for e in term["matchExpressions"]}
        # torch 2.13.0's CUDA 13.0 wheel needs a driver >= 580 (cluster/README.md)
        assert rules["nvidia.com/cuda.driver-version.major"] == ("Gt", ["579"])
        op, (mib,) = rules["nvidia.com/gpu.memory"]
        assert op == "Gt" and int(mib) >= 22000, "an 8B model in bf16 needs a 24 GB+ GPU"


def test_service_account_documents_both_clouds():
    doc = _load(KUBERAY / "serviceaccount.yaml")
    assert doc["apiVersion"] == "v1" and doc["metadata"]["name"] == "d3ray"
    notes = doc["metadata"]["annotations"]
    assert notes["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert notes["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    text = (KUBERAY / "serviceaccount.yaml").read_text()
    for needed in ("s3:PutObject", "s3:ListBucket", "roles/storage.objectUser", "workloadIdentityUser"):
        assert needed in text, needed


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("fname", sorted(p.name for p in KUBERAY.glob("*.yaml")))
def test_manifests_validate_against_the_kubernetes_schemas(fname, version):
    """kubernetes-validate (strict: unknown fields are errors) on what it has schemas for: the service
    account, and every pod template a KubeRay manifest embeds (as the v1 PodTemplate Kubernetes builds)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")

    doc = _load(KUBERAY / fname)
    if doc["kind"] not in ("RayJob", "RayService"):
        kubernetes_validate.validate(doc, version, strict=True)
        return
    for group, template in _pod_templates(doc):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{doc['metadata']['name']}-{group}"},
               "template": template}
        kubernetes_validate.validate(pod, version, strict=True)


def test_kubernetes_validation_is_live():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")

    doc = _load(KUBERAY / "rayjob.yaml")
    template = copy.deepcopy(dict(_pod_templates(doc))["gpu-a100x8"])
    expr = template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"][0]
    expr["values"] = 39000  # must be a list of strings
    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "broken"}, "template": template}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)
    template["spec"]["containers"][0]["resorces"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("fname,preset", [("rayservice.yaml", "llada-8b"), ("rayservice-tiny.yaml", "tiny")])
def test_rayservice_serve_config(fname, preset):
    doc = _load(KUBERAY / fname)
    assert isinstance(doc["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string, not a mapping"
    cfg = _serve_config(doc)
    (app,) = cfg["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH
    assert app["route_prefix"] == "/"
    assert app["args"]["preset"] == preset
    assert app["args"]["preset"] in PRESETS
    if preset != "tiny":
        assert re.match(r"(s3|gs)://\S+", app["args"]["model"]), app["args"]
    assert set(app) <= {"name", "import_path", "route_prefix", "args", "runtime_env", "deployments"}
    # the schema `serve deploy` (and KubeRay, through the dashboard) validates the config with
    from ray.serve.schema import ServeDeploySchema

    parsed = ServeDeploySchema.model_validate(cfg)
    assert parsed.applications[0].import_path == SERVE_IMPORT_PATH
    # Serve listens on all pod interfaces, on the port the head container exposes as `serve`
    assert parsed.http_options.host == "0.0.0.0"
    head = _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports.get("serve") == parsed.http_options.port


def test_serve_schema_check_is_live():
    from ray.serve.schema import ServeDeploySchema

    cfg = _serve_config(_load(KUBERAY / "rayservice.yaml"))
    cfg["applications"][0]["import_paht"] = cfg["applications"][0].pop("import_path")
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        ServeDeploySchema.model_validate(cfg)


def test_dockerfile_base_matches_pin_and_installs_d3ray():
    text = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG BASE=(\S+)$", text, flags=re.M)
    assert base == f"rayproject/ray:{_ray_pin()}-py311-gpu"
    torch_pin = [d for d in _pyproject()["dependencies"] if d.startswith("torch")]
    assert torch_pin and torch_pin[0] in text, "the image installs the same torch pin as pyproject"
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)


def test_dockerfile_installs_dependencies_before_copying_the_code():
    """A code change must not rebuild the torch layer: dependencies come from pyproject.toml alone, first."""
    lines = [line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if not line.startswith("#")]
    steps = [(i, line.split()[0], line) for i, line in enumerate(lines) if line.split() and
             line.split()[0] in ("COPY", "RUN")]
    copies = [(i, line) for i, kind, line in steps if kind == "COPY"]
    assert len(copies) == 2, copies
    (first, first_line), (second, second_line) = copies
    assert first_line.split()[-2:] == ["pyproject.toml", "/home/ray/d3ray/pyproject.toml"]
    assert second_line.split()[-2:] == [".", "/home/ray/d3ray"]
    deps = "\n".join(lines[first:second])
    assert "pip install --no-cache-dir -r" in deps and "tomllib" in deps and "['dependencies']" in deps
    for extra in ("s3", "gcs", "serve"):
        assert f"extras['{extra}']" in deps and extra in _pyproject()["extras"], extra
    final = "\n".join(lines[second:])
    assert "--no-deps" in final and " -e " not in final  # a plain install of the code, nothing re-resolved


def test_serve_import_path_resolves_to_app_builder():
    module, attr = SERVE_IMPORT_PATH.split(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():
        pytest.skip(f"{path.relative_to(ROOT)} not written yet")
    tree = ast.parse(path.read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert attr in defs or attr in assigned, f"{path.name} defines no top-level {attr}"
    if attr in defs:
        # Serve calls an application builder with one argument: the `args` mapping of the config
        fn = defs[attr]
        assert len(fn.args.args) + len(fn.args.posonlyargs) >= 1 or fn.args.vararg


@pytest.mark.parametrize("fname", ["rayservice.yaml", "rayservice-tiny.yaml"])
def test_rayservice_args_build_a_serve_config_that_fits_the_worker_group(fname):
    """The builder args parse into the serving app's own config, and the worker group can hold the
    replicas that config asks Ray for (GPUs and CPUs per replica, up to the autoscaling maximum)."""
    if not (ROOT / "serve_apps" / "config.py").is_file():
        pytest.skip("serve_apps/config.py not written yet")
    from serve_apps.config import ServeConfig

    doc = _load(KUBERAY / fname)
    (app,) = _serve_config(doc)["applications"]
    opts = ServeConfig.from_args(dict(app["args"])).deployment_options()
    actor = opts["ray_actor_options"]
    replicas = opts.get("autoscaling_config", {}).get("max_replicas", opts.get("num_replicas", 1))
    groups = _cluster_spec(doc)["workerGroupSpecs"]
    limits = [(g, g["template"]["spec"]["containers"][0]["resources"]["limits"]) for g in groups]
    gpus_needed = actor.get("num_gpus", 0) * replicas
    gpus_available = sum(g["maxReplicas"] * lim.get("nvidia.com/gpu", 0) for g, lim in limits)
    assert gpus_available >= gpus_needed, (f"{fname}: {gpus_needed} GPUs for {replicas} replicas, "
                                           f"group has {gpus_available}")
    assert any(float(lim["cpu"]) >= actor.get("num_cpus", 1) for _, lim in limits), f"{fname}: no pod fits a replica"


# ---------------------------------------------------------------- README


def _job_commands(text: str) -> list[list[str]]:
    """Every `python pipelines/<script>.py ...` command in the markdown code blocks of ``text``."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0]
            m = re.search(r"(python pipelines/\w+\.py.*)$", line)
            if m:
                commands.append(shlex.split(m.group(1)))
    return commands


def test_readme_commands_reference_real_files_and_parse():
    text = (CLUSTER / "README.md").read_text()
    for rel in set(re.findall(r"\b(cluster/[\w./-]+\.yaml)\b", text)):
        assert (ROOT / rel).is_file(), rel
    for rel in set(re.findall(r"-f (cluster/[\w./-]+)", text)):
        assert (ROOT / rel).is_file(), rel
    commands = _job_commands(text) + _job_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 3
    for argv in commands:
        if any(a in ("URI", "{tiny,llada-8b,dream-7b}") for a in argv):  # the README's usage template
            continue
        _entrypoint_config(argv)  # the script's parser (and its config checks) accept the documented command
    for model in ("GSAI-ML/LLaDA-8B-Instruct", "Dream-org/Dream-v0-Instruct-7B"):
        assert model in text
    for cmd in ("ray up", "ray down", "ray job submit", "kubectl apply", "kubectl delete"):
        assert cmd in text, cmd
