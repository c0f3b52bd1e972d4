"""Which network interface holds an address, and what torch.distributed needs to use it.

gloo and NCCL pick their interface from the hostname, which on many hosts resolves to
127.0.0.1: between two machines the group then never forms (`Gloo connectFullMesh failed
... remote=[127.0.0.1]`). A worker sets `GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` to
the interface that holds its Ray node address instead (`pin_socket_interface`).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

_SIOCGIFADDR = 0x8915  # <linux/sockios.h>: an interface's IPv4 address


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def ipv4_interfaces() -> dict[str, str]:
    """interface name -> its (first) IPv4 address, for interfaces that have one (Linux)."""
    found: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def interface_for(ip: str) -> str | None:
    """The interface holding `ip`, or None (an IPv6 address, or none of this host's)."""
    for name, address in ipv4_interfaces().items():
        if address == ip:
            return name
    return None


def pin_socket_interface(node_ip: str) -> str | None:
    """Point gloo and NCCL at the interface holding `node_ip` unless the user chose one
    (an environment variable already set wins). Returns the interface set, if any."""
    name = interface_for(node_ip)
    if name is None:
        return None
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, name)
    return name
