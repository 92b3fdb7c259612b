"""The emulated network for real: namespaces, shaped links and real daemons (root only)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.orchestrate import Testbed, TestbedError, TestbedSettings, list_namespaces, with_stage_times

RATES = (10_000_000, 20_000_000, 50_000_000, 200_000_000)  # c0 (the data owner), c1, c2, c3
FLOPS = 2e10  # declared by every client, so links alone tell the clients apart


def _why_not() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (network namespaces and tc); CI runs it as root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (`ip netns`, `tc`)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


@pytest.fixture
def tag() -> Iterator[str]:
    """A fresh testbed tag; afterwards, pass or fail, none of its namespaces may exist."""
    value = "t" + secrets.token_hex(3)
    yield value
    left = list_namespaces(value)
    if left:  # clean up for the next test, then fail this one
        subprocess.run([sys.executable, "-m", "testbed.cli", "down", "--tag", value], timeout=120)
    assert left == [], f"namespaces left behind: {left}"


@pytest.fixture(scope="module")
def ready_testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, list[Any], dict[str, Any]]]:
    """Four clients on 10/20/50/200 Mbit/s links, registered and planned; torn down afterwards."""
    tag = "t" + secrets.token_hex(3)
    settings = TestbedSettings(
        rates_bits=RATES,
        work_dir=tmp_path_factory.mktemp("testbed"),
        link_seconds=1.5,
        declare_flops=(FLOPS,) * len(RATES),
        tag=tag,
        timeout_s=90.0,
    )
    try:
        with Testbed(settings, log=lambda s: None) as bed:
            clients, plan = bed.wait_ready()
            yield bed, clients, plan
    finally:
        left = list_namespaces(tag)
        if left:
            subprocess.run([sys.executable, "-m", "testbed.cli", "down", "--tag", tag], timeout=120)
        assert left == [], f"namespaces left behind: {left}"


def test_each_client_measures_its_shaped_rate_within_15_percent(ready_testbed: Any) -> None:
    """Upload and download each client reports are within 15% of the tc rate of its link."""
    bed, clients, plan = ready_testbed
    for report in bed.reports(clients, plan):
        for measured in (report.upload_bits, report.download_bits):
            assert abs(measured - report.shaped_bits) <= 0.15 * report.shaped_bits, report


def test_planner_puts_the_heaviest_partitions_on_the_fastest_links(ready_testbed: Any) -> None:
    """Among helpers, heavier partitions sit on faster links, and an idle helper is slower than any busy one."""
    bed, _clients, plan = ready_testbed
    rate = {h.name: h.rate_bits for h in bed.topology.clients}
    remote = [r for r in plan["rows"] if not r["local"]]
    assert remote, plan
    traffic = {r["client_id"]: r["weights_bytes"] or r["params"] for r in remote}
    hosts = list(traffic)
    for a in hosts:  # equal partitions may go either way; a heavier one never sits on a slower link
        for b in hosts:
            assert not (traffic[a] > traffic[b] and rate[a] < rate[b]), remote
    idle = [h.name for h in bed.topology.clients[bed.settings.owners :] if h.name not in hosts]
    assert all(rate[i] < min(rate[h] for h in hosts) for i in idle), (idle, hosts)


def test_a_failed_start_leaves_no_namespace_or_process(tag: str, tmp_path: Path) -> None:
    """A server that cannot start (no such interpreter) fails `up`, and everything is torn down."""
    (tmp_path / "model").mkdir()
    settings = TestbedSettings(rates_bits=(10_000_000,), work_dir=tmp_path, model=tmp_path / "model", tag=tag,
                               python=str(tmp_path / "no-such-python"), timeout_s=60.0)  # fmt: skip
    bed = Testbed(settings, log=lambda s: None)
    with pytest.raises(TestbedError, match="server exited"), bed:
        pass
    assert all(d.process.poll() is not None for d in [*bed.daemons]) and not bed.daemons


def test_down_removes_what_a_killed_testbed_left(tag: str, tmp_path: Path) -> None:
    """Namespaces and a process inside them, with no testbed object left to clean up, go with `down`."""
    from testbed import netns
    from testbed.orchestrate import run_commands

    topology = netns.plan_topology(tag, [10_000_000])
    run_commands(netns.setup_commands(topology))
    sleeper = subprocess.Popen(netns.netns_exec(topology.clients[0].namespace, ["sleep", "300"]))
    result = subprocess.run([sys.executable, "-m", "testbed.cli", "down", "--tag", tag],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sleeper.wait(10) != 0  # killed by the cleanup, not finished
    assert list_namespaces(tag) == []


_RECEIVER = """
import socket, sys
server = socket.create_server((sys.argv[1], 5599))
conn, _ = server.accept()
total = 0
while chunk := conn.recv(1 << 20):
    total += len(chunk)
conn.sendall(str(total).encode())
"""

_SENDER = """
import socket, sys, time
for _ in range(100):  # the receiver may not listen yet
    try:
        conn = socket.create_connection((sys.argv[1], 5599), timeout=30)
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
began = time.perf_counter()
conn.sendall(bytes(int(sys.argv[2])))
conn.shutdown(socket.SHUT_WR)
assert int(conn.recv(64)) == int(sys.argv[2])
print(time.perf_counter() - began)
"""


def _upload_seconds(topology: Any, client: int, nbytes: int) -> float:
    """Seconds for ``client`` to send ``nbytes`` to the server's namespace over TCP, acknowledged."""
    from testbed import netns

    server = topology.server
    receiver = subprocess.Popen(netns.netns_exec(server.namespace, [sys.executable, "-c", _RECEIVER, server.address]))
    try:
        argv = [sys.executable, "-c", _SENDER, server.address, str(nbytes)]
        sent = subprocess.run(netns.netns_exec(topology.clients[client].namespace, argv),
                              capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    finally:
        receiver.wait(30)
    return float(sent.stdout)


def test_unshaping_lifts_the_rate_limit_of_every_client(tag: str, tmp_path: Path) -> None:
    """2 MB that take over a second on an 8 Mbit/s link go several times faster once the shaping is removed."""
    from testbed.orchestrate import run_commands

    settings = TestbedSettings(rates_bits=(8_000_000,), work_dir=tmp_path, tag=tag)
    bed = Testbed(settings, log=lambda s: None)  # only its network: no daemons needed to move bytes
    try:
        from testbed import netns

        run_commands(netns.setup_commands(bed.topology))
        shaped = _upload_seconds(bed.topology, 0, 2_000_000)
        bed.unshape_links()
        unshaped = _upload_seconds(bed.topology, 0, 2_000_000)
    finally:
        subprocess.run([sys.executable, "-m", "testbed.cli", "down", "--tag", tag], capture_output=True, timeout=120)
    assert shaped > 1.5, shaped  # 16 Mbit at 8 Mbit/s: 2 s
    assert not bed.links_shaped and unshaped < shaped / 4, (shaped, unshaped)


def test_a_tiny_model_run_completes_across_the_namespaces(ready_testbed: Any, tmp_path: Path) -> None:
    """A short run started through the server's CLI finishes, and every client holding a partition has stage times."""
    bed, clients, plan = ready_testbed
    run_file = tmp_path / "run.toml"
    run_file.write_text("rounds = 1\nsteps_per_round = 2\nbatch_size = 2\nseq_len = 32\n")
    runs = bed.start_and_follow_run(run_file, timeout_s=240)
    assert runs and all(str(r["state"]).lower() in ("completed", "complete", "done", "finished") for r in runs), runs
    timing = bed.run_timing(runs)
    assert timing.steps == 2 and timing.step_seconds is not None and timing.step_seconds > 0
    holders = [r for r in with_stage_times(bed.reports(clients, plan), timing) if r.partitions]
    assert holders and all(len(r.stage_seconds) == len(r.partitions) for r in holders), holders
    for report in holders:
        assert all(s is not None and s > 0 for s in report.stage_seconds), report
