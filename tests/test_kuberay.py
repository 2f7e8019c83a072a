"""The KubeRay manifest the project ships (kuberay/rayjob.yaml) and the image it runs
(kuberay/Dockerfile).

No Kubernetes here: the RayJob is checked against our own JSON Schema of the part of KubeRay's
ray.io/v1 API it uses (field names and types as KubeRay's CRD defines them; unknown keys are
refused at the RayJob spec, the cluster, the head and worker groups, the pod and the container,
so a misspelt key fails), and for what matters here: the default study with `--address auto`
and S3 storage, its inputs read from the same bucket (no volume), GPU workers from zero, no
credentials, Ray 2.60.0 everywhere, a dashboard that is not opened up, and an IAM role for the
pods (EKS IRSA) instead of keys, whose policy lets them read the inputs.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "kuberay" / "rayjob.yaml"
DOCKERFILE = ROOT / "kuberay" / "Dockerfile"
STUDY = "studies/ablate_k.py"
IRSA = "eks.amazonaws.com/role-arn"
# The `paper` preset's inputs, each given with --set: the teacher, the data (a `folder:` spec)
# and the Inception weights.
INPUT_KEYS = {"teacher.name": "", "data.spec": "folder:", "eval.extractor_weights": ""}

# ---------------------------------------------------------------------------------------------
# The schema. Types follow KubeRay's CRD (ray.io_rayjobs.yaml, version v1): int32 fields are
# integers, rayStartParams / labels / resources are maps of strings, quantities are integers or
# strings. Every field the CRD lists at a closed level is named (the ones this manifest does not
# use only by name), so a valid field passes and a misspelt one does not.

INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT = {"type": "object"}
QUANTITY = {"anyOf": [{"type": "integer"},  # 1, "500m", "16Gi"
                      {"type": "string", "pattern": r"^[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$"}]}


def closed(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


ENV_VAR = closed({"name": {"type": "string"}, "value": {"type": "string"}, "valueFrom": OBJECT}, ["name"])
CONTAINER = closed({
    "name": {"type": "string"},
    "image": {"type": "string"},
    "workingDir": {"type": "string"},
    "command": {"type": "array", "items": {"type": "string"}},
    "args": {"type": "array", "items": {"type": "string"}},
    "env": {"type": "array", "items": ENV_VAR},
    "envFrom": {"type": "array", "items": OBJECT},
    "resources": closed({
        "limits": {"type": "object", "additionalProperties": QUANTITY},
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "claims": {"type": "array", "items": OBJECT},
    }),
    "ports": {"type": "array", "items": closed({
        "containerPort": INT32, "name": {"type": "string"}, "protocol": {"type": "string"},
        "hostIP": {"type": "string"}, "hostPort": INT32,
    }, ["containerPort"])},
    "volumeMounts": {"type": "array", "items": closed({
        "name": {"type": "string"}, "mountPath": {"type": "string"}, "readOnly": {"type": "boolean"},
        "subPath": {"type": "string"}, "subPathExpr": {"type": "string"}, "mountPropagation": {"type": "string"},
        "recursiveReadOnly": {"type": "string"},
    }, ["name", "mountPath"])},
    "imagePullPolicy": {"type": "string"},
    **{name: {} for name in (
        "lifecycle", "livenessProbe", "readinessProbe", "resizePolicy", "restartPolicy", "restartPolicyRules",
        "securityContext", "startupProbe", "stdin", "stdinOnce", "terminationMessagePath",
        "terminationMessagePolicy", "tty", "volumeDevices")},
}, ["name"])
VOLUME = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"},
    "persistentVolumeClaim": closed({"claimName": {"type": "string"}, "readOnly": {"type": "boolean"}}, ["claimName"]),
    "emptyDir": closed({"medium": {"type": "string"}, "sizeLimit": QUANTITY}),
}}
TOLERATION = closed({"key": {"type": "string"}, "operator": {"type": "string"}, "value": {"type": "string"},
                     "effect": {"type": "string"}, "tolerationSeconds": {"type": "integer"}})
POD_SPEC = closed({
    "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
    "initContainers": {"type": "array", "items": CONTAINER},
    "serviceAccountName": {"type": "string"},
    "volumes": {"type": "array", "items": VOLUME},
    "tolerations": {"type": "array", "items": TOLERATION},
    "nodeSelector": STRINGS,
    **{name: {} for name in (
        "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "dnsConfig", "dnsPolicy",
        "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork", "hostPID",
        "hostUsers", "hostname", "hostnameOverride", "imagePullSecrets", "nodeName", "os", "overhead",
        "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims", "resources",
        "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "schedulingGroup",
        "securityContext", "serviceAccount", "setHostnameAsFQDN", "shareProcessNamespace", "subdomain",
        "terminationGracePeriodSeconds", "topologySpreadConstraints")},
}, ["containers"])
POD_TEMPLATE = closed({"metadata": OBJECT, "spec": POD_SPEC}, ["spec"])
HEAD_GROUP = closed({
    "template": POD_TEMPLATE,
    "rayStartParams": STRINGS,
    "serviceType": {"type": "string"},
    "enableIngress": {"type": "boolean"},
    "headService": OBJECT,
    "ingressOptions": OBJECT,
    "labels": STRINGS,
    "resources": STRINGS,
}, ["template"])
WORKER_GROUP = closed({
    "groupName": {"type": "string"},
    "minReplicas": {**INT32, "minimum": 0},
    "maxReplicas": {**INT32, "minimum": 0},
    "replicas": INT32,
    "idleTimeoutSeconds": INT32,
    "numOfHosts": INT32,
    "priority": INT32,
    "rayStartParams": STRINGS,
    "template": POD_TEMPLATE,
    "labels": STRINGS,
    "resources": STRINGS,
    "scaleStrategy": OBJECT,
    "suspend": {"type": "boolean"},
}, ["groupName", "minReplicas", "maxReplicas", "template"])
AUTOSCALER = closed({
    "idleTimeoutSeconds": INT32,
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
    "version": {"enum": ["v1", "v2"]},
    "env": {"type": "array", "items": ENV_VAR},
    **{name: {} for name in ("args", "command", "envFrom", "image", "imagePullPolicy", "resources",
                             "securityContext", "volumeMounts")},
})
RAY_CLUSTER = closed({
    "rayVersion": {"type": "string"},
    "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": AUTOSCALER,
    "headGroupSpec": HEAD_GROUP,
    "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    "headServiceAnnotations": STRINGS,
    "suspend": {"type": "boolean"},
    "managedBy": {"type": "string"},
    **{name: OBJECT for name in ("authOptions", "gcsFaultToleranceOptions", "historyServerOptions",
                                 "networkPolicy", "tlsOptions", "upgradeStrategy")},
}, ["headGroupSpec"])
RAY_JOB = closed({
    "apiVersion": {"const": "ray.io/v1"},
    "kind": {"const": "RayJob"},
    "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
    "spec": closed({
        "entrypoint": {"type": "string", "minLength": 1},
        "rayClusterSpec": RAY_CLUSTER,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": INT32,
        "activeDeadlineSeconds": INT32,
        "preRunningDeadlineSeconds": {**INT32, "minimum": 1},
        "backoffLimit": INT32,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "metadata": STRINGS,
        "clusterSelector": STRINGS,
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        **{name: OBJECT for name in ("deletionStrategy", "submitterConfig", "submitterPodTemplate")},
    }, ["entrypoint", "rayClusterSpec"]),
}, ["apiVersion", "kind", "metadata", "spec"])
SERVICE_ACCOUNT = closed({
    "apiVersion": {"const": "v1"},
    "kind": {"const": "ServiceAccount"},
    "metadata": closed({"name": {"type": "string"}, "namespace": {"type": "string"},
                        "annotations": STRINGS, "labels": STRINGS}, ["name"]),
}, ["apiVersion", "kind", "metadata"])
SCHEMAS = {"RayJob": RAY_JOB, "ServiceAccount": SERVICE_ACCOUNT}


def schema_errors(document: dict) -> list[str]:
    schema = SCHEMAS.get(document.get("kind"))
    if schema is None:
        return [f"unexpected kind {document.get('kind')!r}"]
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]


# ---------------------------------------------------------------------------------------------


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]


def the(kind: str) -> dict:
    found = [d for d in documents() if d.get("kind") == kind]
    assert len(found) == 1, f"{MANIFEST.name} holds {len(found)} {kind} documents"
    return found[0]


def cluster() -> dict:
    return the("RayJob")["spec"]["rayClusterSpec"]


def pod_specs() -> dict[str, dict]:
    spec = cluster()
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])})
    return pods


def ray_containers() -> dict[str, dict]:
    """The Ray container of each group: the first one, as KubeRay reads it."""
    return {name: pod["containers"][0] for name, pod in pod_specs().items()}


def study_command() -> list[str]:
    """The words of the entrypoint's simple command that runs the study script."""
    lexer = shlex.shlex(the("RayJob")["spec"]["entrypoint"], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if set(token) <= set("();|&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    found = [c for c in commands if STUDY in c]
    assert len(found) == 1, f"the entrypoint runs {STUDY} {len(found)} times"
    return found[0]


def option(words: list[str], name: str) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == name] + \
        [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]


def pyproject_pins() -> dict:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(re.fullmatch(r"ray\[[^\]]*\]==(\S+)", d).group(1) for d in deps if d.startswith("ray["))
    torch_max = next(re.search(r"<=(\S+?)(,|$)", d).group(1) for d in deps if d.startswith("torch>"))
    vision_max = next(re.search(r"<=(\S+?)(,|$)", d).group(1) for d in deps if d.startswith("torchvision>"))
    return {"ray": ray_pin, "torch": torch_max, "torchvision": vision_max}


# ---------------------------------------------------------------------------------------------


def test_the_schema_is_a_valid_json_schema():
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_manifest_matches_the_schema():
    docs = documents()
    assert sorted(d["kind"] for d in docs) == ["RayJob", "ServiceAccount"]
    for document in docs:
        errors = schema_errors(document)
        assert not errors, f"{document['kind']}: " + "; ".join(errors)


def misspell(path: list, old: str, new: str):
    def change(job):
        node = job
        for key in path:
            node = node[key]
        node[new] = node.pop(old)
    return change


def set_value(path: list, value):
    def change(job):
        node = job
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


CLUSTER = ["spec", "rayClusterSpec"]
WORKER = CLUSTER + ["workerGroupSpecs", 0]
BROKEN = {
    "workerGroupSpec": misspell(CLUSTER, "workerGroupSpecs", "workerGroupSpec"),
    "minReplica": misspell(WORKER, "minReplicas", "minReplica"),
    "shutdownAfterJobFinish": misspell(["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    "headGroupSpecs": misspell(CLUSTER, "headGroupSpec", "headGroupSpecs"),
    "container imag": misspell(WORKER + ["template", "spec", "containers", 0], "image", "imag"),
    "serviceAccount_name": misspell(WORKER + ["template", "spec"], "serviceAccountName", "serviceAccount_name"),
    "rayStartParams not strings": set_value(WORKER + ["rayStartParams", "num-gpus"], 1),
    "maxReplicas a string": set_value(WORKER + ["maxReplicas"], "8"),
    "apiVersion v1alpha1": set_value(["apiVersion"], "ray.io/v1alpha1"),
    "GPU limit not a quantity": set_value(WORKER + ["template", "spec", "containers", 0, "resources", "limits",
                                                    "nvidia.com/gpu"], "one"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_the_schema_check_refuses_a_broken_copy(name):
    job = copy.deepcopy(the("RayJob"))
    assert not schema_errors(job)
    BROKEN[name](job)
    assert schema_errors(job), f"a copy with {name} passed the schema check"


def test_the_entrypoint_runs_the_default_study_on_the_cluster_with_s3_storage():
    words = study_command()
    at = words.index(STUDY)
    assert at >= 1 and re.fullmatch(r"python[\d.]*", words[at - 1]), f"{STUDY} is not run by python: {words}"
    assert (ROOT / STUDY).is_file()
    assert option(words, "--address") == ["auto"], "the study must join the job's Ray cluster (--address auto)"
    assert option(words, "--preset") == ["paper"]
    storage = option(words, "--storage")
    assert len(storage) == 1 and re.fullmatch(r"s3://[^/\s]+/\S+", storage[0]), f"--storage is not an S3 URI: {storage}"
    assert "--resume" not in words, "the first run of a study has no --resume"


def test_the_entrypoint_is_one_plain_command():
    """KubeRay's submitter runs `ray job submit ... -- ENTRYPOINT ; fi ; ray job logs ...` in
    bash, the entrypoint pasted in as it is: a `&&`, `;` or `|` in it would be run by the
    submitter's shell, in the submitter's pod, not as part of the job."""
    entrypoint = the("RayJob")["spec"]["entrypoint"]
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    operators = [token for token in lexer if set(token) <= set("();|&<>")]
    assert not operators, f"the entrypoint has shell operators {operators}"
    assert "`" not in entrypoint and "$(" not in entrypoint


def test_the_study_runs_from_the_project_folder_of_the_image():
    """The entrypoint names the study script relative to the containers' workingDir, which is the
    image's WORKDIR, where the Dockerfile copies and installs the project."""
    dockerfile = DOCKERFILE.read_text()
    folder = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    assert re.search(rf"^COPY\b.* \. {re.escape(folder)}$", dockerfile, re.M)
    assert re.search(rf"pip install\b.* -e {re.escape(folder)}$", dockerfile, re.M)
    for name, container in ray_containers().items():
        assert container.get("workingDir") == folder, name
    assert study_command()[1] == STUDY


def iam_policy() -> dict:
    """The IAM policy in the manifest's header comment (for the ServiceAccount's role)."""
    lines = [line[1:].strip() for line in MANIFEST.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith('{"Version"'))
    for end in range(start + 1, len(lines) + 1):
        try:
            return json.loads(" ".join(lines[start:end]))
        except ValueError:
            continue
    raise AssertionError("the IAM policy in the header comment is not JSON")


def allowed(policy: dict, action: str, bucket: str, key: str) -> bool:
    """Whether the policy (BUCKET standing for `bucket`) allows `action` on the object `key`."""
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if statement["Effect"] == "Allow" and action in actions and any(
                fnmatch.fnmatchcase(f"arn:aws:s3:::{bucket}/{key}", r.replace("BUCKET", bucket)) for r in resources):
            return True
    return False


def input_problems(words: list[str]) -> list[str]:
    """What is wrong with the inputs the study command passes: each must be an s3:// URI in the
    bucket of --storage (the pods read it with the role that reads and writes the results, and
    copy it into their cache), not under the study's own prefix; a path would need a volume."""
    sets = dict(s.split("=", 1) for s in option(words, "--set"))
    storage = option(words, "--storage")
    bucket = re.match(r"s3://([^/]+)/", storage[0]).group(1) if storage else None
    problems = []
    for key, prefix in INPUT_KEYS.items():
        if key not in sets:
            problems.append(f"no --set {key}")
            continue
        value = sets[key]
        if not value.startswith(prefix):
            problems.append(f"{key}={value} does not start with {prefix!r}")
            continue
        found = re.fullmatch(r"s3://([^/?\s]+)/([^?\s]+)", value.removeprefix(prefix))
        if not found:
            problems.append(f"{key}={value} is not an s3:// URI of an object or folder")
        elif found.group(1) != bucket:
            problems.append(f"{key}={value} is not in the bucket of --storage ({bucket})")
        elif storage and (value.removeprefix(prefix) + "/").startswith(storage[0].rstrip("/") + "/"):
            problems.append(f"{key}={value} is under --storage")
    return problems


def test_the_inputs_are_read_from_the_bucket_of_the_storage():
    """The `paper` preset's teacher, data and Inception weights are s3:// URIs in the bucket of
    --storage: the head (which checks them before Ray starts) and every worker copy them into
    their own cache, so no pod needs a volume."""
    words = study_command()
    assert not input_problems(words), input_problems(words)
    for name, pod in pod_specs().items():
        assert not any("persistentVolumeClaim" in v for v in pod.get("volumes", [])), f"{name}: a volume claim"
        for container in pod["containers"]:
            assert not container.get("volumeMounts"), f"{name}: {container['name']} mounts a volume"


def test_the_input_check_refuses_paths_and_other_buckets():
    words = study_command()
    at = {w.split("=", 1)[0]: i for i, w in enumerate(words) if "=" in w and w.split("=", 1)[0] in INPUT_KEYS}
    assert set(at) == set(INPUT_KEYS)
    for key, value in [("teacher.name", "/mnt/inputs/teachers/my-ddpm"),
                       ("data.spec", "folder:/mnt/inputs/data/celeba64"),
                       ("data.spec", "s3://CHANGE-BUCKET/inputs/celeba64"),
                       ("eval.extractor_weights", "s3://another-bucket/inputs/inception.pth"),
                       ("teacher.name", "s3://CHANGE-BUCKET/liftplace/my-ddpm")]:
        broken = list(words)
        broken[at[key]] = f"{key}={value}"
        assert input_problems(broken), f"{key}={value} passed the input check"
    without = at["teacher.name"]  # `--set teacher.name=...` dropped
    assert input_problems(words[:without - 1] + words[without + 1:])


def test_the_pods_role_may_read_the_inputs_and_write_the_results():
    """The policy in the header comment covers what the entrypoint names: read the inputs, read
    and write under --storage, list the bucket."""
    words = study_command()
    policy = iam_policy()
    storage = re.fullmatch(r"s3://([^/]+)/(\S+)", option(words, "--storage")[0])
    bucket, prefix = storage.group(1), storage.group(2).rstrip("/")
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert allowed(policy, action, bucket, f"{prefix}/ablate_k/study.json"), action
    assert any(s["Action"] == "s3:ListBucket" and s["Resource"] == "arn:aws:s3:::BUCKET" for s in policy["Statement"])
    sets = dict(s.split("=", 1) for s in option(words, "--set"))
    for key, prefix_of_spec in INPUT_KEYS.items():
        uri = sets[key].removeprefix(prefix_of_spec)
        key_in_bucket = uri.split("/", 3)[3]
        for name in ("", "/model_index.json"):  # the object itself, or a file of the folder
            assert allowed(policy, "s3:GetObject", bucket, key_in_bucket + name), f"{key}: {uri} is not readable"
        assert not allowed(policy, "s3:PutObject", bucket, key_in_bucket + "/x"), f"{key}: inputs are read-only"


def test_gpu_workers_autoscale_from_zero():
    spec = cluster()
    assert spec["enableInTreeAutoscaling"] is True
    workers = spec["workerGroupSpecs"]
    assert workers, "no worker group"
    for group in workers:
        name = group["groupName"]
        assert group["minReplicas"] == 0, f"{name}: minReplicas should be 0 (autoscale from zero)"
        assert group["maxReplicas"] >= 1, name
        # One pod at the start at most: the driver checks that a GPU is up (on KubeRay it does
        # not know the group's maxReplicas); the autoscaler adds the others as trials queue.
        assert 0 <= group.get("replicas", 0) <= min(1, group["maxReplicas"]), f"{name}: starts with several GPU pods"
        resources = group["template"]["spec"]["containers"][0]["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        assert isinstance(gpus, int) and gpus >= 1, f"{name}: no nvidia.com/gpu limit"
        assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, name
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("resources", {})
    assert not any("gpu" in k for part in head.values() for k in part), "the head should be a CPU pod"


def test_the_cluster_goes_away_after_the_job():
    spec = the("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0


def test_ray_is_2_60_0_everywhere():
    pins = pyproject_pins()
    assert cluster()["rayVersion"] == pins["ray"] == "2.60.0"
    for name, container in ray_containers().items():
        image = container["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag.startswith(pins["ray"] + "-"), f"{name}: image {image} is not tagged with Ray {pins['ray']}"
    images = {c["image"] for c in ray_containers().values()}
    assert len(images) == 1, f"the head and the workers run different images: {images}"
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pins['ray'])}-py311-gpu$", dockerfile, re.M)
    # The pins of cluster.yaml's setup_commands, which are the project's.
    assert re.findall(r"""ray\[[\w,]+\]==([^"'\s]+)""", dockerfile) == [pins["ray"]]
    assert re.findall(r"""torch==([^"'\s]+)""", dockerfile) == [pins["torch"]]
    assert re.findall(r"""torchvision==([^"'\s]+)""", dockerfile) == [pins["torchvision"]]
    setup = "\n".join(yaml.safe_load((ROOT / "cluster.yaml").read_text())["setup_commands"])
    assert f"torch=={pins['torch']}" in setup and f"torchvision=={pins['torchvision']}" in setup


def env_of_cluster_yaml() -> dict[str, str]:
    """The variables cluster.yaml's head start command sets for `ray start`."""
    started = "\n".join(yaml.safe_load((ROOT / "cluster.yaml").read_text())["head_start_ray_commands"])
    return dict(re.findall(r"\b((?:RAY|HF)_\w+)=(\S+)", started))


def test_the_containers_get_the_start_environment_of_cluster_yaml():
    wanted = env_of_cluster_yaml()
    assert wanted.get("RAY_AUTH_MODE") == "disabled" and wanted.get("RAY_USAGE_STATS_ENABLED") == "0"
    for name, container in ray_containers().items():
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in wanted} == wanted, name
    dockerfile = DOCKERFILE.read_text()
    for key, value in wanted.items():
        assert re.search(rf"^ENV .*\b{key}={re.escape(value)}\b", dockerfile, re.M), key


def strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif node is not None:
        yield str(node)


CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.mark.parametrize("path", [MANIFEST, DOCKERFILE], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_credentials_in_it(path):
    text = path.read_text()
    for pattern in (r"aws_access_key", r"aws_secret", r"secret_access", r"session_token", r"AKIA[0-9A-Z]{16}",
                    r"-----BEGIN", r"password\s*[:=]", r"private_key_id", r"client_secret"):
        assert not re.search(pattern, text, re.IGNORECASE), f"{path.name} holds something like a credential: {pattern}"
    if path == MANIFEST:
        for value in strings(documents()):
            assert not any(name in value.upper() for name in CREDENTIAL_NAMES), value
        for name, pod in pod_specs().items():
            for container in pod["containers"]:
                assert not container.get("envFrom"), f"{name}: environment from a Secret or ConfigMap"
                assert not any("valueFrom" in e for e in container.get("env", [])), name
            assert not any("secret" in v for v in pod.get("volumes", [])), f"{name}: a Secret volume"


def test_the_pods_get_s3_access_from_an_iam_role():
    account = the("ServiceAccount")
    role = account["metadata"].get("annotations", {}).get(IRSA, "")
    assert re.fullmatch(r"arn:aws:iam::[\w-]+:role/[\w+=,.@/-]+", role), f"{IRSA} is not a role ARN: {role!r}"
    account_name = account["metadata"]["name"]
    for name, pod in pod_specs().items():
        assert pod.get("serviceAccountName") == account_name, f"{name} does not run as {account_name}"
    kinds = [d["kind"] for d in documents()]
    assert kinds.index("ServiceAccount") < kinds.index("RayJob"), "the ServiceAccount must exist before the pods"


def test_the_dashboard_is_not_opened_up():
    head = cluster()["headGroupSpec"]
    # KubeRay binds the dashboard to the pod's address when none is given (the operator follows
    # the job through the head's service); 0.0.0.0 or any other value is not to be set here.
    assert "dashboard-host" not in head.get("rayStartParams", {}), "a dashboard-host in rayStartParams"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head service is exposed outside the cluster"
    assert not head.get("enableIngress"), "an ingress to the dashboard"
    assert not any("0.0.0.0" in s for s in strings(documents()))
