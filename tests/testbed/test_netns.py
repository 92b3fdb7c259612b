"""The testbed's network as data: rates, names, addresses and the ip/tc commands (no root needed)."""

from __future__ import annotations

import pytest

from testbed import netns


def test_parse_rate_reads_tc_units_in_bits_and_bytes() -> None:
    """Bit units count bits and bps units count bytes, as tc does."""
    assert netns.parse_rate("10mbit") == 10_000_000
    assert netns.parse_rate("1.5Gbit") == 1_500_000_000
    assert netns.parse_rate("2mbps") == 16_000_000


@pytest.mark.parametrize("text", ["10", "fast", "10 furlongs", "1kbit"])
def test_parse_rate_refuses_what_tc_cannot_shape(text: str) -> None:
    """A rate with no unit, an unknown unit, or one too slow to shape is refused with a hint."""
    with pytest.raises(ValueError, match="rate"):
        netns.parse_rate(text)


def test_parse_rates_repeats_one_rate_or_needs_one_per_client() -> None:
    """One rate applies to every client; a list must have one entry per client."""
    assert netns.parse_rates("20mbit", 3) == [20_000_000] * 3
    assert netns.parse_rates("10mbit,200mbit", 2) == [10_000_000, 200_000_000]
    with pytest.raises(ValueError, match="one per client"):
        netns.parse_rates("10mbit,20mbit", 3)


def test_topology_gives_private_addresses_and_prefixed_namespaces() -> None:
    """The server is .1, clients .10 up, and every namespace carries the tool's prefix and the tag."""
    topo = netns.plan_topology("ab12", [10_000_000, 50_000_000])
    assert topo.server.address == "10.77.0.1"
    assert [c.address for c in topo.clients] == ["10.77.0.10", "10.77.0.11"]
    assert all(ns.startswith("titanic-tb-ab12-") for ns in topo.namespaces)
    assert len(set(topo.namespaces)) == 4


def test_topology_refuses_a_public_subnet() -> None:
    """Traffic must stay inside our namespaces: a public network is refused."""
    with pytest.raises(ValueError, match="not private"):
        netns.plan_topology("t", [10_000_000], subnet="8.8.8.0/24")


def test_setup_never_creates_a_device_in_the_root_namespace() -> None:
    """Every ip/tc command names a namespace, or creates a link directly inside them."""
    topo = netns.plan_topology("t1", [10_000_000, 20_000_000])
    for argv in netns.setup_commands(topo):
        if argv[:3] == ["ip", "netns", "add"]:
            continue
        placed = argv[1] == "-n" or ("netns" in argv and argv[argv.index("netns") + 1] in topo.namespaces)
        assert placed, argv
        if argv[1] == "-n":
            assert argv[2] in topo.namespaces, argv


def test_setup_shapes_each_client_both_ways_at_its_rate_and_not_the_server() -> None:
    """Each client gets an htb upload class and an ifb tbf at its own rate; the server is not shaped."""
    topo = netns.plan_topology("t2", [10_000_000, 200_000_000])
    commands = netns.setup_commands(topo)
    for client in topo.clients:
        mine = [a for a in commands if a[:3] == ["tc", "-n", client.namespace]]
        rates = [a[a.index("rate") + 1] for a in mine if "rate" in a]
        assert rates == [f"{client.rate_bits}bit"] * 2
        assert any("mirred" in a and netns.IFB_DEV in a for a in mine)
    assert not [a for a in commands if a[0] == "tc" and a[2] == topo.server.namespace]


def test_shaping_without_namespace_acts_on_the_current_one() -> None:
    """In a container the commands are plain ip/tc on the given device."""
    commands = netns.shaping_commands(8_000_000, 16_000_000, dev="eth1")
    assert all(a[0] in ("ip", "tc") and a[1] != "-n" for a in commands)
    assert ["tc", "qdisc", "add", "dev", "eth1", "handle", "ffff:", "ingress"] in commands


def test_burst_covers_ten_milliseconds_but_at_least_a_few_packets() -> None:
    """Slow links get the 16 KiB floor, fast ones 10 ms of traffic."""
    assert netns.burst_bytes(10_000_000) == 16 * 1024
    assert netns.burst_bytes(800_000_000) == 1_000_000


def test_netns_exec_pins_cpus_inside_the_namespace() -> None:
    """taskset runs inside ip netns exec, around the command."""
    assert netns.netns_exec("ns", ["python", "-V"], cpus="1") == ["ip", "netns", "exec", "ns", "taskset", "-c", "1", "python", "-V"]
    assert netns.netns_exec("ns", ["python"]) == ["ip", "netns", "exec", "ns", "python"]


def test_testbed_namespaces_finds_only_ours() -> None:
    """Cleanup considers the prefix (and the tag when given), never other namespaces."""
    listing = "titanic-tb-aa-server (id: 3)\nother\ntitanic-tb-bb-c0\ntitanic-tbx\n"
    assert netns.testbed_namespaces(listing) == ["titanic-tb-aa-server", "titanic-tb-bb-c0"]
    assert netns.testbed_namespaces(listing, "bb") == ["titanic-tb-bb-c0"]
    assert netns.teardown_commands(["titanic-tb-bb-c0"]) == [["ip", "netns", "del", "titanic-tb-bb-c0"]]


def test_unshaping_removes_both_directions_and_the_ifb() -> None:
    """Re-shaping starts by deleting the root and ingress qdiscs and the ifb device."""
    commands = netns.unshaping_commands(dev="eth1")
    assert ["tc", "qdisc", "del", "dev", "eth1", "root"] in commands
    assert ["tc", "qdisc", "del", "dev", "eth1", "ingress"] in commands
    assert ["ip", "link", "del", netns.IFB_DEV] in commands


def test_unshaping_a_namespace_names_it_in_every_command() -> None:
    """Unshaping from outside acts inside the client's namespace (ip -n / tc -n), never on the root one."""
    commands = netns.unshaping_commands(namespace="titanic-tb-ab-c0")
    assert commands and all(argv[1:3] == ["-n", "titanic-tb-ab-c0"] for argv in commands)


def test_topology_leaves_a_none_rate_unshaped() -> None:
    """A client given no rate gets no tc command at all; the shaped one keeps its own."""
    topo = netns.plan_topology("t3", [None, 10_000_000])
    commands = netns.setup_commands(topo)
    assert not any(argv[0] == "tc" and topo.clients[0].namespace in argv for argv in commands)
    assert any(argv[0] == "tc" and topo.clients[1].namespace in argv for argv in commands)
