"""manifests/: the Kubernetes YAML parses, and every samcp flag it uses exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from samcp.cli.main import cli
from samcp.pipeline.datasets import read_manifest

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


@pytest.fixture(scope="module")
def precompute_help() -> str:
    result = CliRunner().invoke(cli, ["precompute", "--help"])
    assert result.exit_code == 0, result.output
    return result.output


def has_option(help_text: str, flag: str) -> bool:
    return re.search(rf"(^|[\s,]){re.escape(flag)}(\s|$)", help_text, re.M) is not None


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d is not None]


def pod_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]


def test_every_yaml_parses_with_kind_and_api_version():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    kinds = {}
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if f.parent.name == "examples":
                assert isinstance(doc, dict)
                continue
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), f
            kinds[doc["kind"]] = doc["apiVersion"]
    assert kinds == {
        "RayJob": "ray.io/v1",
        "RayCluster": "ray.io/v1",
        "PersistentVolumeClaim": "v1",
    }


def test_rayjob_runs_samcp_precompute_with_existing_flags(precompute_help):
    (job,) = load("rayjob-precompute.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["samcp", "precompute"]
    flags = [a for a in argv if a.startswith("--")]
    assert flags, argv
    for flag in flags:
        assert has_option(precompute_help, flag), f"{flag} is not a `samcp precompute` option"
    assert argv[argv.index("--ray-address") + 1] == "auto"
    assert argv[argv.index("--out") + 1].startswith("/data/")
    assert argv[argv.index("--sam-checkpoint") + 1].startswith("/data/")


@pytest.mark.parametrize("name", ["rayjob-precompute.yaml", "raycluster.yaml"])
def test_gpu_workers_and_shared_storage(name):
    (doc,) = load(name)
    (claim,) = load("pvc.yaml")
    head, *workers = pod_specs(doc)
    assert workers
    for pod in [head, *workers]:
        vols = {v["name"]: v for v in pod["volumes"]}
        (c,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert (
            vols[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        )
    for pod in workers:
        (c,) = pod["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"].get("limits", {})
    assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_example_run_config_keys_are_precompute_flags(precompute_help):
    path = MANIFESTS / "examples" / "precompute-coco.yaml"
    cfg = yaml.safe_load(path.read_text())
    commented = re.findall(r"^# ([a-z_]+): ", path.read_text(), re.M)
    assert cfg["source"] == "/data/coco" and cfg["shard_size"] == 16
    for key in [k for k in cfg if k != "source"] + commented:
        flag = "--" + key.replace("_", "-")
        if key == "proposals":
            assert cfg[key] in ("sam", "slic", "external")
        assert has_option(precompute_help, flag), f"{key}: {flag} is not a precompute option"


def test_example_run_config_matches_the_rayjob():
    cfg = yaml.safe_load((MANIFESTS / "examples" / "precompute-coco.yaml").read_text())
    (job,) = load("rayjob-precompute.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[2] == cfg["source"]
    for flag in [a for a in argv if a.startswith("--")]:
        key = flag[2:].replace("-", "_")
        assert str(cfg[key]) == argv[argv.index(flag) + 1], key


def test_example_image_manifest_is_valid():
    path = MANIFESTS / "examples" / "images.jsonl"
    records = read_manifest(path)
    assert len(records) == 3
    assert [r.image_id for r in records] == ["street_0001", "street_0002", "42"]
    assert records[0].file_name == str((path.parent / "images" / "street_0001.jpg").absolute())
    assert (records[2].width, records[2].height) == (640, 480)
