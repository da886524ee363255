"""``keyplane nodes`` and ``keyplane bindings`` (issue 14): the nodes of vllm
targets (add, drain, remove, list) and the (client key, model) -> node
affinity bindings (list, delete, stats), through the AdminService, with
``-o table|json|yaml`` like every admin command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

from google.protobuf.timestamp_pb2 import Timestamp

from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import resources_pb2
from keyplane_cli.admin import _tenant
from keyplane_cli.admin_client import AdminClient, admin_flags, with_admin_client
from keyplane_cli.output import emit as _emit
from keyplane_cli.tables import table as _table

__all__ = ["add_affinity_commands", "bindings_table", "nodes_table", "run_affinity"]

_NODE_STATES = {
    resources_pb2.NODE_STATE_ACTIVE: "active",
    resources_pb2.NODE_STATE_DRAINING: "draining",
    resources_pb2.NODE_STATE_REMOVED: "removed",
}
_MAX_PAGE = 1000
_HEALTH = {
    resources_pb2.HEALTH_STATE_COOLDOWN: "cooldown",
    resources_pb2.HEALTH_STATE_UNHEALTHY: "unhealthy",
}


def _when(value: Timestamp) -> str:
    return datetime.fromtimestamp(value.ToNanoseconds() / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _health(node: resources_pb2.Node) -> str:
    if not node.HasField("health"):
        return "healthy"
    name = _HEALTH.get(node.health.state, "healthy")
    if node.health.HasField("until") and name == "cooldown":
        name += f" until {_when(node.health.until)}"
    return name


def nodes_table(resp: admin_pb2.ListNodesResponse) -> str:
    if not resp.nodes:
        return "(no nodes)"
    counts = {c.node_id: c.bindings for c in resp.binding_counts}
    rows = [
        (
            n.id,
            n.route_id,
            n.url,
            n.upstream_model,
            _NODE_STATES.get(n.state, "?"),
            _health(n),
            str(counts.get(n.id, 0)),
            "node_urls" if n.from_route else "added",
            f"etag={n.etag}",
        )
        for n in resp.nodes
    ]
    header = ("ID", "ROUTE", "URL", "MODEL", "STATE", "HEALTH", "BINDINGS", "FROM", "ETAG")
    return "\n".join(_table(header, rows))


def bindings_table(bindings: Sequence[resources_pb2.Binding], *, more: bool = False) -> str:
    if not bindings:
        return "(no bindings)"
    rows = [
        (b.client_key_id, b.public_model, b.node_id, b.node_url, _when(b.expire_time), str(b.moves)) for b in bindings
    ]
    lines = _table(("CLIENT KEY", "MODEL", "NODE", "URL", "EXPIRES", "MOVES"), rows)
    if more:
        lines.append("(more bindings: raise --limit or filter)")
    return "\n".join(lines)


def _stats_table(resp: admin_pb2.GetBindingStatsResponse) -> str:
    rows = [
        (name, str(getattr(resp, name)))
        for name in (
            "bindings",
            "hits",
            "misses",
            "created",
            "moves",
            "sidecar_hits",
            "overrides",
            "fallbacks",
            "swept",
        )
    ]
    return "\n".join(_table(("COUNTER", "VALUE"), rows))


def _node_line(verb: str, node: resources_pb2.Node) -> str:
    return f"{verb} node {node.id} ({node.url}) of route {node.route_id}: {_NODE_STATES.get(node.state, '?')}"


def _nodes(args: argparse.Namespace, client: AdminClient, out: TextIO) -> None:
    if args.action == "add":
        request = admin_pb2.AddNodeRequest(
            tenant=args.tenant, route_id=args.route, url=args.url, upstream_model=args.upstream_model or ""
        )
        resp = client.call("AddNode", request)
        _emit(args, resp, _node_line("added", resp.node), out)
    elif args.action == "drain":
        resp = client.call(
            "DrainNode", admin_pb2.DrainNodeRequest(tenant=args.tenant, id=args.id, etag=args.etag or "")
        )
        _emit(args, resp, _node_line("drained", resp.node) + " (keeps its bindings until they expire)", out)
    elif args.action == "remove":
        remove = admin_pb2.RemoveNodeRequest(tenant=args.tenant, id=args.id, etag=args.etag or "")
        resp = client.call("RemoveNode", remove)
        text = _node_line("removed", resp.node) + f" ({resp.bindings_deleted} bindings deleted)"
        _emit(args, resp, text, out)
    elif args.action == "list":
        listing = admin_pb2.ListNodesRequest(tenant=args.tenant, route_id=args.route or "", show_removed=args.all)
        resp = client.call("ListNodes", listing)
        _emit(args, resp, lambda: nodes_table(resp), out)


def _bindings(args: argparse.Namespace, client: AdminClient, out: TextIO) -> None:
    filters = {
        "tenant": args.tenant,
        "client_key_id": getattr(args, "client_key", None) or "",
        "public_model": getattr(args, "model", None) or "",
        "node_id": getattr(args, "node", None) or "",
    }
    if args.action == "list":
        # Follows the pages up to --limit bindings.
        resp = admin_pb2.ListBindingsResponse()
        while True:
            size = min(max(args.limit - len(resp.bindings), 0), _MAX_PAGE)
            request = admin_pb2.ListBindingsRequest(**filters, page_size=size, page_token=resp.next_page_token)
            page: admin_pb2.ListBindingsResponse = client.call("ListBindings", request)
            resp.bindings.extend(page.bindings)
            resp.next_page_token = page.next_page_token
            if not page.next_page_token or len(resp.bindings) >= args.limit:
                break
        _emit(args, resp, lambda: bindings_table(resp.bindings, more=bool(resp.next_page_token)), out)
    elif args.action == "delete":
        resp = client.call("DeleteBindings", admin_pb2.DeleteBindingsRequest(**filters))
        _emit(args, resp, f"deleted {resp.deleted} bindings", out)
    elif args.action == "stats":
        resp = client.call("GetBindingStats", admin_pb2.GetBindingStatsRequest(tenant=args.tenant))
        _emit(args, resp, lambda: _stats_table(resp), out)


def run_affinity(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def body(client: AdminClient) -> int:
        (_nodes if args.group == "nodes" else _bindings)(args, client, out)
        return 0

    return with_admin_client(args, body)


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client-key", help="only the bindings of this client key id")
    parser.add_argument("--model", "-m", help="only the bindings of this public model")
    parser.add_argument("--node", help="only the bindings to this node id")


def add_affinity_commands(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register the nodes and bindings command groups."""

    def group(name: str, help_text: str) -> Any:
        parser = sub.add_parser(name, help=help_text)
        handlers[name] = run_affinity
        return parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(actions: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        admin_flags(parser)
        _tenant(parser)
        return parser

    nodes = group("nodes", "the nodes of vllm targets: add, drain, remove, list (affinity)")
    add = action(nodes, "add", "add a node to a route's vllm target")
    add.add_argument("--route", "-r", required=True, help="the route's id (from routes list)")
    add.add_argument(
        "--url",
        required=True,
        help="the node's OpenAI-compatible base URL, /v1 included (requests go to URL/chat/completions), e.g. http://10.0.0.7:8000/v1",
    )
    add.add_argument("--upstream-model", help="the vllm target it serves (default: the route's first vllm target)")
    for name, text in (
        ("drain", "keep the node's bindings until they expire, bind nothing new to it"),
        ("remove", "stop using the node; its bindings are deleted and move on the next request"),
    ):
        parser = action(nodes, name, text)
        parser.add_argument("id", help="the node's id (from nodes list)")
        parser.add_argument("--etag", help="only if the node still has this etag (from list); else ABORTED")
    listing = action(nodes, "list", "list nodes with state, health and live bindings")
    listing.add_argument("--route", "-r", help="only this route's nodes")
    listing.add_argument("--all", action="store_true", help="include removed nodes")

    bindings = group("bindings", "(client key, model) -> node affinity bindings: list, delete, stats")
    blist = action(bindings, "list", "list bindings (every filter given must match)")
    _filters(blist)
    blist.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    _filters(action(bindings, "delete", "delete the matching bindings (name a client key, model or node)"))
    action(bindings, "stats", "counts of hits, misses, moves and sidecar-reported overrides")
