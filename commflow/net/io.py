"""Topologies from and to YAML / JSON files.

Two forms. A builder call::

    builder: leaf_spine          # leaf_spine | fat_tree | rail_optimized | dual_plane
    leaves: 8
    spines: 8
    hosts_per_leaf: 8
    link_gbps: 400
    failed: [[leaf0, spine3]]    # optional: cables to fail (both directions)

or an explicit graph (every cable full duplex unless ``duplex: false``)::

    name: tiny
    hosts: [h0, h1, h2, h3]
    switches: [leaf0, leaf1, spine0]
    links:
      - [h0, leaf0, 100]                         # [a, b, gbps]
      - {src: leaf0, dst: spine0, gbps: 400}     # mapping form; duplex defaults to true
    failed: [[leaf0, spine0]]

Errors name the entry (``links[3]``), the value and the rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from .topology import Topology, _Builder, dual_plane, fat_tree, leaf_spine, rail_optimized

__all__ = ["load", "save", "from_dict"]

BUILDERS = {"leaf_spine": leaf_spine, "fat_tree": fat_tree, "rail_optimized": rail_optimized,
            "dual_plane": dual_plane}
_EXPLICIT_KEYS = {"name", "hosts", "switches", "links", "failed"}
_LINK_KEYS = {"src", "dst", "a", "b", "gbps", "duplex"}


def load(path: str | Path) -> Topology:
    """Read a topology from ``.yaml`` / ``.yml`` / ``.json``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path: no such file {str(p)!r}")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    elif p.suffix.lower() in {".yaml", ".yml"}:
        data = yaml.safe_load(text)
    else:
        raise ValueError(f"path: unknown topology file type {p.suffix!r} (use .yaml, .yml or .json)")
    return from_dict(data, source=str(p))


def save(topo: Topology, path: str | Path) -> Path:
    """Write the explicit form of ``topo`` (``.json`` or ``.yaml``)."""
    p = Path(path)
    d = topo.to_dict()
    if p.suffix.lower() == ".json":
        p.write_text(json.dumps(d, indent=1))
    else:
        p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def from_dict(data, source: str = "topology") -> Topology:
    """Build a topology from the parsed file contents (see the module docstring)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    failed = data.pop("failed", None) or []
    if "builder" in data:
        kind = data.pop("builder")
        if kind not in BUILDERS:
            raise ValueError(f"{source}: builder: unknown builder {kind!r} (choose from {sorted(BUILDERS)})")
        try:
            topo = BUILDERS[kind](**data)
        except TypeError as e:
            raise ValueError(f"{source}: {kind}: {e}") from None
    else:
        topo = _explicit(data, source)
    if failed:
        pairs = []
        for i, item in enumerate(failed):
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ValueError(f"{source}: failed[{i}]: expected [a, b], got {item!r}")
            for n in item:
                if n not in topo.node_index:
                    raise ValueError(f"{source}: failed[{i}]: unknown node {n!r}")
            pairs.append(tuple(item))
        topo = topo.fail(pairs)
    return topo


def _explicit(data: dict, source: str) -> Topology:
    unknown = set(data) - _EXPLICIT_KEYS
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_EXPLICIT_KEYS | {'builder'})})")
    for key in ("hosts", "links"):
        if not data.get(key):
            raise ValueError(f"{source}: {key}: required and must be a non-empty list")
    b = _Builder()
    index: dict[str, int] = {}
    for key, is_host in (("hosts", True), ("switches", False)):
        for i, name in enumerate(data.get(key) or []):
            if not isinstance(name, str) or not name:
                raise ValueError(f"{source}: {key}[{i}]: node names must be non-empty strings, got {name!r}")
            if name in index:
                raise ValueError(f"{source}: {key}[{i}]: duplicate node name {name!r}")
            index[name] = b.add(name, host=is_host)
    for i, item in enumerate(data["links"]):
        where = f"{source}: links[{i}]"
        if isinstance(item, (list, tuple)):
            if len(item) != 3:
                raise ValueError(f"{where}: expected [a, b, gbps], got {item!r}")
            a, z, gbps, duplex = *item, True
        elif isinstance(item, dict):
            extra = set(item) - _LINK_KEYS
            if extra:
                raise ValueError(f"{where}: unknown key(s) {sorted(extra)} (allowed: {sorted(_LINK_KEYS)})")
            a, z = item.get("src", item.get("a")), item.get("dst", item.get("b"))
            gbps, duplex = item.get("gbps"), bool(item.get("duplex", True))
        else:
            raise ValueError(f"{where}: expected [a, b, gbps] or a mapping, got {item!r}")
        for n in (a, z):
            if n not in index:
                raise ValueError(f"{where}: unknown node {n!r}")
        if isinstance(gbps, bool) or not isinstance(gbps, (int, float)) or not gbps > 0:
            raise ValueError(f"{where}: capacity must be > 0 Gbit/s, got {gbps!r}")
        if a == z:
            raise ValueError(f"{where}: a link from {a!r} to itself is not allowed")
        if duplex:
            b.cable(index[a], index[z], float(gbps))
        else:
            b.src.append(index[a])
            b.dst.append(index[z])
            b.gbps.append(float(gbps))
    hosts = np.asarray([index[h] for h in data["hosts"]], np.int64)
    return b.build(data.get("name", source), {"kind": "explicit"}, hosts)
