"""The spread supervisor's decision (deployments/spreader.py) and the config `trex-serve up` deploys
(deployments/launch.py), without a cluster."""

from __future__ import annotations

from deployments.app import AppArgs, per_node_cap
from deployments.launch import deploy_config
from deployments.spreader import respread_config


def _details(args: dict, other_apps: dict | None = None) -> dict:
    apps = {"trex": {"deployed_app_config": {"name": "trex", "route_prefix": "/",
                                             "import_path": "deployments.app:build_app", "args": args}}}
    return {"applications": {**apps, **(other_apps or {})}, "proxy_location": "HeadOnly",
            "http_options": {"host": "0.0.0.0", "port": 8000}, "grpc_options": {}, "target_capacity": None}


def test_the_per_node_cap_spreads_and_leaves_one_node_uncapped():
    assert [per_node_cap(2, n) for n in (1, 2, 3)] == [None, 1, 1]
    assert [per_node_cap(4, n) for n in (1, 2, 3)] == [None, 2, 2]
    assert per_node_cap(1, 3) is None


def test_a_changed_node_count_deploys_the_app_again_with_it_and_keeps_the_rest():
    other = {"batch": {"deployed_app_config": {"name": "batch", "import_path": "x:y"}},
             "imperative": {"deployed_app_config": None}}
    config = respread_config(_details({"ingress_replicas": 2, "revision": "r1"}, other), "trex", nodes=1,
                             built_for=2)
    assert config is not None
    assert [a["name"] for a in config["applications"]] == ["trex", "batch"], "other declarative apps kept"
    assert config["applications"][0]["args"] == {"ingress_replicas": 2, "revision": "r1", "live_nodes": 1}
    assert config["proxy_location"] == "HeadOnly" and config["http_options"]["port"] == 8000
    assert "grpc_options" not in config and "target_capacity" not in config
    AppArgs.model_validate(config["applications"][0]["args"])  # the builder takes what it is given


def test_nothing_is_deployed_when_built_for_these_nodes_fixed_by_the_operator_or_not_declarative():
    assert respread_config(_details({}), "trex", nodes=2, built_for=2) is None
    assert respread_config(_details({"live_nodes": 1}), "trex", nodes=1, built_for=2) is None
    assert respread_config(_details({"live_nodes": 1}), "trex", nodes=2, built_for=2) is not None
    assert respread_config(_details({"spread_nodes": 2}), "trex", nodes=1, built_for=2) is None
    assert respread_config(_details({"spread_supervisor": False}), "trex", nodes=1, built_for=2) is None
    assert respread_config({"applications": {"trex": {"deployed_app_config": None}}}, "trex", 1, 2) is None


def test_up_deploys_declaratively_with_what_redeploy_may_change_and_a_new_revision():
    env = {"TREX_CATALOG": "/c.yaml", "TREX_INGRESS_REPLICAS": "2",
           "TREX_POOL_AUTOSCALING": '{"a": {"max_replicas": 3}}', "TREX_SECRET_KEY": "never-in-the-config"}
    first, second = deploy_config(8001, env), deploy_config(8001, env)
    app = first["applications"][0]
    assert app["import_path"] == "deployments.app:build_app" and first["proxy_location"] == "HeadOnly"
    assert {k: v for k, v in app["args"].items() if k != "revision"} == {
        "catalog_path": "/c.yaml", "ingress_replicas": 2, "pool_autoscaling": {"a": {"max_replicas": 3}}}
    assert "never-in-the-config" not in str(first), "secrets come from the cluster's environment"
    assert app["args"]["revision"] != second["applications"][0]["args"]["revision"]
    AppArgs.model_validate(app["args"])
