"""Each local gateway gets ingress-replica ports no other gateway on the machine uses: a port one
gateway's replica just left must never be bound by another gateway's replica while a stale proxy
of the first still sends there (it would answer the first gateway's keys with 401)."""

from __future__ import annotations

import socket

from trex_serve.local import ingress_ports
from trex_serve.local.embedded import free_port


def test_two_gateways_get_disjoint_blocks_outside_rays_shared_range(tmp_path):
    registry = tmp_path / "ports.json"
    a = ingress_ports.claim(tmp_path / "a", free_port(), registry)
    b = ingress_ports.claim(tmp_path / "b", free_port(), registry)
    assert a[1] - a[0] == b[1] - b[0] == ingress_ports.SPAN
    assert set(range(*a)).isdisjoint(range(*b))
    assert set(range(*a)).isdisjoint(range(30000, 31000)) and set(range(*b)).isdisjoint(range(30000, 31000))
    env = ingress_ports.ray_env(*a)
    assert env == {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(a[0]),
                   "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(a[1])}


def test_the_same_home_keeps_its_block_and_down_releases_it(tmp_path):
    registry = tmp_path / "ports.json"
    first = ingress_ports.claim(tmp_path / "a", free_port(), registry)
    assert ingress_ports.claim(tmp_path / "a", free_port(), registry) == first
    other = ingress_ports.claim(tmp_path / "b", free_port(), registry)
    ingress_ports.release(tmp_path / "a", registry)
    assert ingress_ports.claim(tmp_path / "c", free_port(), registry) == first
    assert other != first


def test_a_live_gateways_block_is_held_and_a_dead_ones_is_reused(tmp_path):
    registry = tmp_path / "ports.json"
    ray = socket.socket()
    ray.bind(("127.0.0.1", 0))
    ray.listen()
    try:
        old = 0.0  # claimed long ago: only a listening Ray keeps the claim
        live = ingress_ports.claim(tmp_path / "live", ray.getsockname()[1], registry, now=old)
        dead = ingress_ports.claim(tmp_path / "dead", free_port(), registry, now=old)
        later = ingress_ports.CLAIM_GRACE_S * 10
        assert ingress_ports.claim(tmp_path / "new", free_port(), registry, now=later) == dead
        assert ingress_ports.claim(tmp_path / "newer", free_port(), registry, now=later) not in (live, dead)
    finally:
        ray.close()


def test_a_block_with_a_bound_port_is_skipped(tmp_path):
    registry = tmp_path / "ports.json"
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("0.0.0.0", ingress_ports.FIRST_PORT + 7))
    squatter.listen()
    try:
        first, _ = ingress_ports.claim(tmp_path / "a", free_port(), registry)
        assert not first <= ingress_ports.FIRST_PORT + 7 < first + ingress_ports.SPAN
    finally:
        squatter.close()
