"""deploy/kuberay/rayservice.yaml: the Serve config embedded in the RayService validates as
`serve deploy` validates a config file (ServeDeploySchema), its app args are the builder's own
(AppArgs), the builder turns them and the ConfigMap's catalog into the expected deployments, and
every pod reads its secrets from Kubernetes secrets, never from the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml
from ray.serve._private.build_app import build_app as serve_build
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppArgs, build_app
from trex_serve.catalog import load_catalog

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
SECRETS = {"TREX_SECRET_KEY", "TREX_ADMIN_TOKEN", "TREX_DATABASE_URL", "TREX_REDIS_URL"}


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def serve_config(manifest) -> ServeDeploySchema:
    service = manifest["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    return ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))


def _containers(manifest) -> list[dict]:
    cluster = manifest["RayService"]["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_embedded_serve_config_is_what_serve_deploy_accepts(serve_config, manifest):
    (app,) = serve_config.applications
    assert app.import_path == "deployments.app:build_app" and app.route_prefix == "/"
    args = AppArgs.model_validate(app.args)
    assert args.ingress_replicas >= 2, "a lost node must not take the whole front door"
    assert serve_config.http_options.port == 8001, "Serve's port is internal: the front proxy serves 8000"
    assert manifest["RayService"]["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert f"rayproject/ray:{ray.__version__}" in (MANIFEST.parent / "Dockerfile").read_text()


def test_the_builder_makes_the_deployments_from_the_args_and_the_catalog(serve_config, manifest, tmp_path,
                                                                        monkeypatch):
    (app,) = serve_config.applications
    catalog_file = tmp_path / "catalog.yaml"
    catalog_file.write_text(manifest["ConfigMap"]["data"]["catalog.yaml"])
    catalog = load_catalog(str(catalog_file))
    assert set(app.args["pool_autoscaling"]) <= {p.name for p in catalog.providers}, "a pool name matches no provider"
    monkeypatch.setenv("TREX_SECRET_KEY", "test")
    built = serve_build(build_app({**app.args, "catalog_path": str(catalog_file), "spread_nodes": 2}), name="trex")
    by_name = {d.name: d for d in built.deployments}
    assert by_name["Ingress"]._deployment_config.num_replicas == app.args["ingress_replicas"]
    assert by_name["Ingress"]._replica_config.max_replicas_per_node == app.args["ingress_replicas"] // 2
    for provider, sizing in app.args["pool_autoscaling"].items():
        pool = by_name[f"pool-{provider}"]
        assert pool._deployment_config.autoscaling_config.max_replicas == sizing["max_replicas"]
        assert pool._deployment_config.autoscaling_config.min_replicas == sizing["min_replicas"]
    counted = serve_build(build_app({**app.args, "catalog_path": str(catalog_file)}), name="trex")
    assert "Spreader" in {d.name for d in counted.deployments}, "the spread supervisor comes with the app"


def test_every_pod_has_the_same_environment_with_secrets_from_kubernetes(manifest):
    containers = _containers(manifest)
    envs = [c["env"] for c in containers]
    assert all(env == envs[0] for env in envs), "head, workers and front proxies must see the same settings"
    env = {e["name"]: e for e in envs[0]}
    for name in SECRETS:
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "trex-secrets", name
    for name, value in {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                        "RAY_worker_niceness": "0", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
                        "TREX_REDIS_WAIT_REPLICAS": "1"}.items():
        assert env[name]["value"] == value, name
    front = [c for c in containers if c["name"] == "front-proxy"]
    assert len(front) == 2 and all("--serve-port" in c["command"] and "8001" in c["command"] for c in front)
    mounts = [c for c in containers if c["name"].startswith("ray-")]
    assert all(m["volumeMounts"][0]["mountPath"] == "/etc/trex" for m in mounts)
