"""deploy/: the KubeRay RayJob and the `ray up` cluster file name real fields, real files and real commands.

The RayJob is checked against an extract of KubeRay's RayJob CRD (``tests/data/kuberay_rayjob_v1_extract.json``,
with its source commit); the ``ray up`` file against the JSON schema shipped in the installed ``ray`` package
and Ray's own ``prepare_config``/``validate_config`` (what ``ray up`` runs before it talks to the cloud).
The sweep commands are checked against the ``crdnd-ray`` CLI and loaded with ``load_config`` and their
``--set`` overrides, so a renamed config key or command breaks this test, not a cluster run.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
EXTRACT = json.loads((Path(__file__).parent / "data" / "kuberay_rayjob_v1_extract.json").read_text())
TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def _check(node: Any, value: Any, path: str, problems: list[str]) -> None:
    """Check ``value`` against a node of the CRD extract; append one message per problem."""
    if isinstance(node, dict) and "ref" in node:
        node = EXTRACT["definitions"][node["ref"]]
    if node == "any":
        return
    if isinstance(node, str) and node in TYPES:
        expected = TYPES[node]
        if not isinstance(value, expected) or (node != "boolean" and isinstance(value, bool)):
            problems.append(f"{path}: expected {node}, got {type(value).__name__} {value!r}")
        return
    if node == "int-or-string":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            problems.append(f"{path}: expected an integer or a string, got {value!r}")
        return
    if isinstance(node, str) and node.startswith("map:"):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return
        for key, item in value.items():
            _check("string" if node == "map:string" else "int-or-string", item, f"{path}.{key}", problems)
        return
    if "array" in node:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return
        for index, item in enumerate(value):
            _check(node["array"], item, f"{path}[{index}]", problems)
        return
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a mapping, got {value!r}")
        return
    allowed = node["object"]
    for key, item in value.items():
        if key not in allowed:
            problems.append(f"{path}.{key}: not a field of the CRD here (known: {', '.join(sorted(allowed))})")
        else:
            _check(allowed[key], item, f"{path}.{key}", problems)
    problems.extend(f"{path}.{key}: required by the CRD but missing" for key in node["required"] if key not in value)


def crd_problems(manifest: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    _check(EXTRACT["root"], manifest, "RayJob", problems)
    return problems


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    documents = list(yaml.safe_load_all((DEPLOY / "rayjob-cifar100.yaml").read_text()))
    assert len(documents) == 1
    return documents[0]


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "ray-cluster-aws.yaml").read_text())


@pytest.fixture(scope="module")
def cli_commands() -> dict[str, Any]:
    import typer

    from crdnd_ray.cli import app

    return typer.main.get_command(app).commands


def _image_workdir() -> str:
    found = re.findall(r"^WORKDIR\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert len(found) == 1
    return found[0]


def check_sweep_command(command: str, project_dir: str, cli_commands: dict[str, Any]) -> dict[str, Any]:
    """Check one ``crdnd-ray sweep ...`` command line: a real command, real options, a real search space
    (``project_dir`` on the node is this repository), and ``--set`` overrides that load. Returns the config."""
    from crdnd_ray.config import load_config

    words = shlex.split(command)
    assert not {"&&", "||", ";", "|"} & set(words), f"shell operators in '{command}'"
    assert words[0] == "crdnd-ray" and words[1] in cli_commands, words[:2]
    click_command = cli_commands[words[1]]
    options = {opt for param in click_command.params for opt in getattr(param, "opts", [])}
    arguments, overrides, index = [], [], 2
    while index < len(words):
        word = words[index]
        if word.startswith("--"):
            assert word in options, f"'crdnd-ray {words[1]}' has no option {word}"
            if word == "--set":
                overrides.append(words[index + 1])
            index += 2
        else:
            arguments.append(word)
            index += 1
    assert len(arguments) == 1, arguments
    on_node = Path(arguments[0])
    assert on_node.is_absolute() and on_node.is_relative_to(project_dir), on_node
    local = REPO / on_node.relative_to(project_dir)
    assert local.is_file(), f"{on_node} is {local} here, which does not exist"
    return load_config(local, overrides)


def test_rayjob_uses_only_fields_of_the_kuberay_crd(rayjob: dict[str, Any]) -> None:
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert crd_problems(rayjob) == []


def test_the_crd_check_catches_typos_and_wrong_types(rayjob: dict[str, Any]) -> None:
    broken = copy.deepcopy(rayjob)
    broken["spec"]["shutdownAfterJobFinished"] = True
    worker = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["replica"] = 2
    worker["rayStartParams"] = {"num-gpus": 1}
    worker["template"]["spec"]["containers"][0]["resource"] = {}
    del broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    problems = "\n".join(crd_problems(broken))
    for expected in ("RayJob.spec.shutdownAfterJobFinished: not a field",
                     "workerGroupSpecs[0].replica: not a field",
                     "workerGroupSpecs[0].rayStartParams.num-gpus: expected string",
                     "containers[0].resource: not a field",
                     "headGroupSpec.rayStartParams: required"):
        assert expected in problems, problems


def test_rayjob_runs_a_real_sweep_with_a_gpu_worker_group(rayjob: dict[str, Any], cli_commands: dict[str, Any]) -> None:
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    cfg = check_sweep_command(spec["entrypoint"], _image_workdir(), cli_commands)
    assert cfg.tracking.uri == "http://mlflow:5000"
    assert str(cfg.data.root).startswith("/mnt/shared/")
    output = shlex.split(spec["entrypoint"])
    assert output[output.index("--output") + 1].startswith("/mnt/shared/"), "the sweep folder must be shared"

    cluster_spec = spec["rayClusterSpec"]
    head, workers = cluster_spec["headGroupSpec"], cluster_spec["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0", "trials must not land on the head"
    def gpus(group: dict[str, Any]) -> int:
        return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))

    gpu_groups = [group for group in workers if gpus(group) > 0]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    assert sum(group["replicas"] for group in gpu_groups) >= cfg.search.max_concurrent
    pods = [head["template"]["spec"]] + [group["template"]["spec"] for group in workers]
    assert len({pod["containers"][0]["image"] for pod in pods}) == 1, "head and workers must run one image"
    for pod in pods:
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        mounts = {mount["name"]: mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
        assert set(mounts) <= volumes
        assert "/mnt/shared" in mounts.values()


def test_the_command_check_catches_bad_keys_options_files_and_commands(cli_commands: dict[str, Any]) -> None:
    from crdnd_ray.config import ConfigError

    workdir = _image_workdir()
    space = f"{workdir}/search_spaces/cifar100.yaml"
    with pytest.raises(ConfigError, match="tracking.url"):
        check_sweep_command(f"crdnd-ray sweep {space} --set tracking.url=http://mlflow:5000", workdir, cli_commands)
    with pytest.raises(AssertionError, match="no option --outdir"):
        check_sweep_command(f"crdnd-ray sweep {space} --outdir /mnt/shared/x", workdir, cli_commands)
    with pytest.raises(AssertionError, match="does not exist"):
        check_sweep_command(f"crdnd-ray sweep {workdir}/search_spaces/cifar1000.yaml", workdir, cli_commands)
    with pytest.raises(AssertionError, match="sweeep"):
        check_sweep_command(f"crdnd-ray sweeep {space}", workdir, cli_commands)
    with pytest.raises(AssertionError, match="shell operators"):
        check_sweep_command(f"cd {workdir} && crdnd-ray sweep search_spaces/cifar100.yaml", workdir, cli_commands)


def test_ray_up_file_passes_rays_own_schema_and_validation(cluster: dict[str, Any]) -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    validate_config(prepare_config(copy.deepcopy(cluster)))
    typo = {**copy.deepcopy(cluster), "setup_command": ["true"]}
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        jsonschema.validate(typo, schema)


def test_ray_up_file_has_gpu_workers_and_installs_the_project(cluster: dict[str, Any],
                                                               cli_commands: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU", 1) == 0 and head["resources"].get("GPU", 0) == 0
    gpu_types = [name for name, node in types.items() if node["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(types[name]["max_workers"] >= 1 for name in gpu_types)
    remote = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    setup = "\n".join(cluster["setup_commands"])
    assert f"pip install -q -e {remote.replace('/home/ubuntu', '~')}" in setup
    assert "torchattacks==3.5.1" in setup
    import ray

    assert f"ray[default,tune,train]=={ray.__version__}" in setup, "pin the cluster's Ray to the local one"
    server = re.findall(r"crdnd-ray (server [^>]*?) >", "\n".join(cluster["head_start_ray_commands"]))
    assert len(server) == 1
    words = shlex.split(server[0])
    options = {opt for param in cli_commands["server"].params for opt in getattr(param, "opts", [])}
    assert words[:3] == ["server", "/home/ubuntu/mlflow", "--port"] and set(words[2::2]) <= options, words


def _sweep_commands(text: str) -> list[str]:
    """``crdnd-ray sweep ...`` commands in shell text (comment marks and line continuations removed)."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    return [match.strip() for match in re.findall(r"(crdnd-ray sweep [^\n`]*)", joined)]


def test_documented_sweep_commands_are_real(cluster: dict[str, Any], cli_commands: dict[str, Any]) -> None:
    remote = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    readme_blocks = "\n".join(re.findall(r"```bash\n(.*?)```", (DEPLOY / "README.md").read_text(), flags=re.DOTALL))
    cluster_file = (DEPLOY / "ray-cluster-aws.yaml").read_text()
    for source, text in (("README.md", readme_blocks), ("ray-cluster-aws.yaml", cluster_file)):
        commands = _sweep_commands(text)
        assert commands, f"no sweep command in {source}"
        for command in commands:
            cfg = check_sweep_command(command, remote, cli_commands)
            assert cfg.tracking.uri == "http://127.0.0.1:5000"
