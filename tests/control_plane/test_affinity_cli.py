"""``keyplane nodes`` and ``keyplane bindings``: the real command in a
subprocess against a real control plane; and the affinity flags."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from keyplane_cli import build_parser
from keyplane_cli.affinity_flags import affinity_options_from_args
from tests.control_plane.affinity_helpers import bind, make_pool
from tests.control_plane.conftest import Harness
from tests.control_plane.test_etag_cli import keyplane


async def test_cli_nodes_and_bindings(harness: Harness, tmp_path: Path) -> None:
    pool = await make_pool(harness)
    code, out, err = await keyplane(
        harness, tmp_path, "nodes", "add", "-t", "acme", "--route", pool.route_id, "--url", "http://10.1.0.9:8000"
    )
    assert (code, err) == (0, "")
    assert out.startswith("added node nd_") and out.rstrip().endswith("active")
    first = await bind(harness, pool.client_key_id)

    code, out, _ = await keyplane(harness, tmp_path, "nodes", "list", "-t", "acme")
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:6] == ["ID", "ROUTE", "URL", "MODEL", "STATE", "HEALTH"]
    assert len(rows) == 4
    bound = next(r for r in rows if r.startswith(first.binding.node_id))
    assert bound.split()[4:7] == ["active", "healthy", "1"]

    code, out, _ = await keyplane(harness, tmp_path, "bindings", "list", "-t", "acme", "-o", "json")
    listed = json.loads(out)["bindings"]
    assert code == 0 and [(b["client_key_id"], b["node_id"]) for b in listed] == [
        (pool.client_key_id, first.binding.node_id)
    ]
    code, out, _ = await keyplane(harness, tmp_path, "bindings", "list", "-t", "acme", "--node", "nd_other")
    assert (code, out.strip()) == (0, "(no bindings)")

    code, out, _ = await keyplane(harness, tmp_path, "bindings", "stats", "-t", "acme", "-o", "yaml")
    stats = yaml.safe_load(out)
    assert code == 0 and stats["bindings"] == "1" and stats["created"] == "1"  # uint64 as JSON strings

    code, out, err = await keyplane(harness, tmp_path, "nodes", "drain", "-t", "acme", first.binding.node_id)
    assert (code, err) == (0, "") and "drained node" in out and "draining" in out
    code, out, err = await keyplane(harness, tmp_path, "nodes", "remove", "-t", "acme", first.binding.node_id)
    assert (code, err) == (0, "") and "(1 bindings deleted)" in out

    await bind(harness, pool.client_key_id)
    code, out, _ = await keyplane(
        harness, tmp_path, "bindings", "delete", "-t", "acme", "--client-key", pool.client_key_id
    )
    assert (code, out.strip()) == (0, "deleted 1 bindings")
    code, out, err = await keyplane(harness, tmp_path, "bindings", "delete", "-t", "acme")
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT")


def test_affinity_flags_reach_the_config() -> None:
    args = build_parser({}).parse_args(
        [
            "control-plane",
            "--store",
            "sqlite:///x.db",
            "--binding-ttl",
            "120",
            "--binding-sweep-interval",
            "5",
            "--binding-sweep-batch",
            "50",
        ]
    )
    assert affinity_options_from_args(args) == {
        "binding_ttl": 120.0,
        "binding_sweep_interval": 5.0,
        "binding_sweep_batch": 50,
    }
    defaults = affinity_options_from_args(build_parser({}).parse_args(["up"]))
    assert defaults == {"binding_ttl": 600.0, "binding_sweep_interval": 30.0, "binding_sweep_batch": 1000}
