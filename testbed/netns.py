"""The emulated network as data and as ``ip``/``tc`` commands; nothing here runs anything.

Topology: every host (the server and each client) lives in its own network namespace with one
interface ``eth0`` and an address in ``10.77.0.0/24``; the other end of each veth pair sits in
a separate bridge namespace, enslaved to ``br0``. Nothing is created in the root namespace, so
deleting the namespaces removes every device, and traffic can only reach namespaces we made.

Shaping happens inside each client's namespace, so the client's link is the bottleneck both
ways (the server's link is left at veth speed, like a data-centre uplink):

* upload (client -> server): an ``htb`` class at the rate on ``eth0``'s egress;
* download (server -> client): ``eth0``'s ingress is redirected (``mirred``) to an ``ifb``
  device, whose egress carries a ``tbf`` at the rate. Packets beyond the bucket are dropped
  and TCP backs off to the rate, as on a real access link.

This kernel has no ``netem``: latency and loss are not emulated.

Every namespace is named ``titanic-tb-<tag>-<host>``, so ``titanic-testbed down`` finds what a
crashed run left behind by the prefix alone.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "titanic-tb"  # every namespace this tool creates starts with this
HOST_DEV = "eth0"  # a host's interface inside its namespace
IFB_DEV = "ifb0"  # the ingress-shaping device inside a client's namespace
BRIDGE_DEV = "br0"  # the bridge inside the bridge namespace
DEFAULT_SUBNET = "10.77.0.0/24"
_TAG = re.compile(r"^[a-z0-9]{1,12}$")

# tc's rate units: "bit" suffixes count bits, "bps" suffixes count bytes (tc's own convention).
_UNITS = {
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "bps": 8,
    "kbps": 8 * 10**3,
    "mbps": 8 * 10**6,
    "gbps": 8 * 10**9,
}
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)\s*$")
UNSHAPED = "none"  # in --bandwidth: leave this client's link at veth speed


def parse_rate(text: str) -> int:
    """A tc-style rate (``10mbit``, ``1.5gbit``, ``500kbps``) in bits per second."""
    match = _RATE.match(text.lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"bad rate {text!r}: write a number and a unit, e.g. 10mbit, 500kbit, 1gbit, 2mbps (bytes/s)")
    bits = round(float(match.group(1)) * _UNITS[match.group(2)])
    if bits < 8000:
        raise ValueError(f"rate {text!r} is below 8kbit; tc cannot shape that slowly with useful accuracy")
    return bits


def parse_rates(text: str, count: int) -> list[int | None]:
    """``--bandwidth``: one rate for every client, or exactly one per client, comma-separated.

    ``none`` leaves a link unshaped (None), to compare against the same topology shaped.
    """
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) == 1:
        return [_rate_or_none(parts[0])] * count
    if len(parts) != count:
        raise ValueError(f"--bandwidth lists {len(parts)} rates for {count} clients: give one rate, or one per client")
    return [_rate_or_none(p) for p in parts]


def _rate_or_none(text: str) -> int | None:
    return None if text.strip().lower() == UNSHAPED else parse_rate(text)


def format_rate(bits_per_s: float) -> str:
    """A rate for people: ``10 Mbit/s``."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if bits_per_s >= factor:
            return f"{bits_per_s / factor:.3g} {prefix}bit/s"
    return f"{bits_per_s:.3g} bit/s"


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """One emulated machine: its own namespace and address."""

    name: str  # "server", or "c0", "c1", ... for clients
    namespace: str  # the network namespace it runs in
    address: str  # its IPv4 address on the bridge
    rate_bits: int | None  # shaped rate both ways (bits/s); None: unshaped (the server, or `--bandwidth none`)


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """The whole emulated network of one testbed."""

    tag: str  # unique per testbed, part of every namespace name
    prefix_len: int  # of the subnet every host is in
    bridge_namespace: str  # where br0 and the hosts' peer ends live
    server: Host
    clients: tuple[Host, ...]

    @property
    def hosts(self) -> tuple[Host, ...]:
        """The server first, then the clients."""
        return (self.server, *self.clients)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of this testbed, the bridge's last (hosts hang off it)."""
        return (*(h.namespace for h in self.hosts), self.bridge_namespace)


def namespace_name(tag: str, host: str) -> str:
    """The namespace of ``host`` in the testbed ``tag``."""
    return f"{PREFIX}-{tag}-{host}"


def plan_topology(tag: str, rates_bits: Sequence[int | None], *, subnet: str = DEFAULT_SUBNET) -> Topology:
    """Names and addresses for a server and one client per rate (None: unshaped): server .1, clients .10, .11, ..."""
    if not _TAG.match(tag):
        raise ValueError(f"testbed tag {tag!r} must be 1-12 lowercase letters or digits")
    network = ipaddress.IPv4Network(subnet)
    if not network.is_private:
        raise ValueError(f"subnet {subnet} is not private: use a 10.x, 172.16-31.x or 192.168.x network")
    if network.num_addresses < len(rates_bits) + 12:
        raise ValueError(f"subnet {subnet} is too small for {len(rates_bits)} clients")
    base = network.network_address
    server = Host(name="server", namespace=namespace_name(tag, "server"), address=str(base + 1), rate_bits=None)
    clients = tuple(
        Host(name=f"c{i}", namespace=namespace_name(tag, f"c{i}"), address=str(base + 10 + i), rate_bits=rate)
        for i, rate in enumerate(rates_bits)
    )
    return Topology(
        tag=tag, prefix_len=network.prefixlen, bridge_namespace=namespace_name(tag, "br"), server=server, clients=clients
    )


def _peer_dev(host: Host) -> str:
    # The host's end in the bridge namespace; interface names are at most 15 characters.
    return f"v-{host.name}"[:15]


def setup_commands(topology: Topology) -> list[list[str]]:
    """Create the namespaces, the bridge, a veth per host, addresses, and each client's shaping."""
    br = topology.bridge_namespace
    commands: list[list[str]] = [
        ["ip", "netns", "add", br],
        ["ip", "-n", br, "link", "set", "lo", "up"],
        ["ip", "-n", br, "link", "add", BRIDGE_DEV, "type", "bridge"],
        ["ip", "-n", br, "link", "set", BRIDGE_DEV, "up"],
    ]
    for host in topology.hosts:
        ns, peer = host.namespace, _peer_dev(host)
        commands += [
            ["ip", "netns", "add", ns],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            # Both ends are created straight inside their namespaces: nothing touches the root one.
            ["ip", "link", "add", HOST_DEV, "netns", ns, "type", "veth", "peer", "name", peer, "netns", br],
            ["ip", "-n", br, "link", "set", peer, "master", BRIDGE_DEV],
            ["ip", "-n", br, "link", "set", peer, "up"],
            ["ip", "-n", ns, "addr", "add", f"{host.address}/{topology.prefix_len}", "dev", HOST_DEV],
            ["ip", "-n", ns, "link", "set", HOST_DEV, "up"],
        ]
        if host.rate_bits is not None:
            commands += shaping_commands(host.rate_bits, host.rate_bits, namespace=ns)
    return commands


def burst_bytes(rate_bits: int) -> int:
    """Token-bucket depth: 10 ms at the rate, at least 16 KiB (several full-size packets)."""
    return max(rate_bits // 8 // 100, 16 * 1024)


def shaping_commands(
    upload_bits: int, download_bits: int, *, namespace: str | None = None, dev: str = HOST_DEV, ifb: str = IFB_DEV
) -> list[list[str]]:
    """Shape ``dev``'s egress (upload) with htb and its ingress (download) with tbf on an ifb.

    With ``namespace`` the commands act inside it (``ip -n``/``tc -n``); without, on the
    current namespace (a container's own, where ``titanic-testbed shape`` runs them).
    """
    ip = ["ip", "-n", namespace] if namespace else ["ip"]
    tc = ["tc", "-n", namespace] if namespace else ["tc"]
    up, down = str(upload_bits), str(download_bits)
    return [
        # upload: everything leaving dev goes through one htb class at the rate
        [*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"],
        [*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
         "rate", f"{up}bit", "ceil", f"{up}bit", "burst", str(burst_bytes(upload_bits))],
        # a deep leaf queue: the local TCP stack backs off on it instead of dropping
        [*tc, "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "pfifo", "limit", "1000"],
        # download: redirect dev's ingress to an ifb and shape the ifb's egress
        [*ip, "link", "add", ifb, "type", "ifb"],
        [*ip, "link", "set", ifb, "up"],
        [*tc, "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"],
        [*tc, "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0",
         "action", "mirred", "egress", "redirect", "dev", ifb],
        [*tc, "qdisc", "add", "dev", ifb, "root", "tbf", "rate", f"{down}bit",
         "burst", str(burst_bytes(download_bits)), "latency", "100ms"],
    ]  # fmt: skip


def unshaping_commands(
    *, namespace: str | None = None, dev: str = HOST_DEV, ifb: str = IFB_DEV
) -> list[list[str]]:
    """Remove what :func:`shaping_commands` added, in ``namespace`` or the current one (each may fail: not there)."""
    ip = ["ip", "-n", namespace] if namespace else ["ip"]
    tc = ["tc", "-n", namespace] if namespace else ["tc"]
    return [
        [*tc, "qdisc", "del", "dev", dev, "root"],
        [*tc, "qdisc", "del", "dev", dev, "ingress"],
        [*ip, "link", "del", ifb],
    ]


def netns_exec(namespace: str, argv: list[str], *, cpus: str | None = None) -> list[str]:
    """``argv`` run inside ``namespace``, pinned to ``cpus`` (taskset list) when given."""
    pinned = ["taskset", "-c", cpus, *argv] if cpus else argv
    return ["ip", "netns", "exec", namespace, *pinned]


def testbed_namespaces(ip_netns_list: str, tag: str | None = None) -> list[str]:
    """Names in ``ip netns list`` output made by this tool (of testbed ``tag``, or of any)."""
    start = namespace_name(tag, "") if tag else f"{PREFIX}-"
    names = [line.split()[0] for line in ip_netns_list.splitlines() if line.strip()]
    return [n for n in names if n.startswith(start)]


def teardown_commands(namespaces: list[str]) -> list[list[str]]:
    """Delete ``namespaces``; their veths and ifbs go with them (run after their processes are gone)."""
    return [["ip", "netns", "del", ns] for ns in namespaces]
