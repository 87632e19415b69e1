"""deploy/k8s: rendered like `kubectl apply -k` would (namespace and image set from the
kustomization), then validated against the Kubernetes OpenAPI schema, strictly (unknown
fields are errors), with kubernetes-validate (the schemas ship inside the package, so no
network is needed). Then what the schema cannot say: GPUs, gRPC health probes, advertised
pod IPs, one etcd for every process. No cluster is started here."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]  # grpc probes: 1.27+


def render() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    image = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kust.get("images", [])}
    docs = []
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is None:
                continue
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kust["namespace"]
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                c["image"] = image.get(c["image"], c["image"])
            docs.append(doc)
    return docs


def by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container(doc: dict) -> dict:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def test_every_file_is_listed_and_every_resource_is_valid():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    docs = render()
    for version in VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {e.message} "
                            f"at {'.'.join(map(str, e.path))}")


def test_a_broken_manifest_is_caught():  # the validator is not a no-op
    bad = by_name(render())[("Deployment", "decode")]
    container(bad)["readinessProbe"]["grpc"]["port"] = "grpc"  # grpc probes take a number
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    container(bad)["readinessProbe"]["grpc"]["port"] = 50052
    container(bad)["gpus"] = 1  # unknown field: strict
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_wiring():
    docs = by_name(render())
    etcd_url = "--etcd=http://etcd:2379"
    assert ("Service", "etcd") in docs and ("StatefulSet", "etcd") in docs
    coord = container(docs[("Deployment", "coordinator")])
    assert docs[("Deployment", "coordinator")]["spec"]["replicas"] >= 2 and etcd_url in coord["args"]
    assert coord["readinessProbe"]["grpc"]["port"] == 50051 and "--host=0.0.0.0" in coord["args"]
    for role in ("prefill", "decode"):
        c = container(docs[("Deployment", role)])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["readinessProbe"]["grpc"]["port"] == 50052 and "--port=50052" in c["args"]
        assert f"--role={role}" in c["args"] and etcd_url in c["args"]
        assert "--advertise-host=$(POD_IP)" in c["args"] and "--host=0.0.0.0" in c["args"]
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert "NCCL_SOCKET_IFNAME" in env and "UCX_NET_DEVICES" in env
        assert c["image"] == "pdserve:latest"


def test_worker_and_coordinator_args_parse():
    """The manifests' args are accepted by the CLI they are given to."""
    import argparse

    from pdserve import worker_cli
    from pdserve.coordinator import cli as coordinator_cli

    docs = by_name(render())
    p = argparse.ArgumentParser()
    coordinator_cli.add_arguments(p)
    args = container(docs[("Deployment", "coordinator")])["args"]
    assert args[0] == "coordinator"
    assert coordinator_cli.config_from_args(p.parse_args(args[1:])).etcd == "http://etcd:2379"
    for role in ("prefill", "decode"):
        p = argparse.ArgumentParser()
        worker_cli.add_arguments(p)
        args = [a.replace("$(POD_IP)", "10.1.2.3") for a in
                container(docs[("Deployment", role)])["args"]]
        assert args[0] == "worker"
        cfg = worker_cli.config_from_args(p.parse_args(args[1:]))
        assert cfg.advertised_host == "10.1.2.3" and cfg.etcd == "http://etcd:2379"
