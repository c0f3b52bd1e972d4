"""Named deployments: one record per deployment, so `pdserve status` and `pdserve down` find
their own cluster and namespace, never whatever `ray.init(address="auto")` would pick.

    ~/.pdserve/deployments/<name>.json   (PDSERVE_HOME moves ~/.pdserve)

A record holds the Ray address the deployment runs on, its Ray namespace (`pdserve-<name>`:
two deployments' actors never share one), the router's address, and the Ray head that
`pdserve up` started for it (its process group, with the temp dir it runs in), which is
the only Ray process `pdserve down` ever stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass
class StartedHead:
    """A Ray head `pdserve up --detach` started: `ray start --head --block` leads its own
    process group, whose members are that head's processes only."""

    pid: int
    pgid: int
    temp_dir: str


@dataclass
class DeploymentRecord:
    name: str
    namespace: str
    address: str  # the Ray cluster's GCS address (host:port)
    router_url: str = ""
    config_path: str = ""
    detached: bool = False
    owner_pid: int = 0  # the `pdserve up` process of a foreground deployment
    started_heads: list[StartedHead] = field(default_factory=list)


def check_name(name: str) -> str:
    """A deployment name is a file name and part of a Ray namespace: letters, digits, `_.-`."""
    if not _NAME.match(name or ""):
        raise ValueError(
            f"--name: {name!r} is not a deployment name (letters, digits and _.- , at most 63, "
            "starting with a letter or digit)"
        )
    return name


def default_name(config_path: str) -> str:
    """The config file's name without its extension (`deploy/local.yaml` -> `local`)."""
    stem = os.path.splitext(os.path.basename(config_path))[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", stem) or "pdserve"


def namespace_for(name: str) -> str:
    return f"pdserve-{name}"


def records_dir() -> str:
    home = os.environ.get("PDSERVE_HOME") or os.path.join(os.path.expanduser("~"), ".pdserve")
    return os.path.join(home, "deployments")


def _path(name: str) -> str:
    return os.path.join(records_dir(), f"{check_name(name)}.json")


def save(record: DeploymentRecord) -> str:
    """Write the record atomically; returns its path."""
    path = _path(record.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(record), f, indent=2)
    os.replace(tmp, path)
    return path


def names() -> list[str]:
    try:
        files = os.listdir(records_dir())
    except FileNotFoundError:
        return []
    return sorted(f[: -len(".json")] for f in files if f.endswith(".json"))


def exists(name: str) -> bool:
    return os.path.isfile(_path(name))


def load(name: str) -> DeploymentRecord:
    """The record of deployment `name`; a ValueError naming the known ones when there is none."""
    try:
        with open(_path(name)) as f:
            data = json.load(f)
    except FileNotFoundError:
        known = ", ".join(names()) or "none"
        raise ValueError(f"no deployment named {name!r} on this host (known: {known})") from None
    heads = [StartedHead(**h) for h in data.pop("started_heads", [])]
    return DeploymentRecord(**data, started_heads=heads)


def remove(name: str) -> None:
    try:
        os.remove(_path(name))
    except FileNotFoundError:
        pass


def resolve_name(name: str | None) -> str:
    """`--name`, or the only deployment recorded on this host."""
    if name:
        return check_name(name)
    known = names()
    if len(known) == 1:
        return known[0]
    if not known:
        raise ValueError("no pdserve deployment recorded on this host (start one with `pdserve up`)")
    raise ValueError(f"several deployments on this host: pass --name (one of: {', '.join(known)})")
