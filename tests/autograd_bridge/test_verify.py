"""titanic-verify and the bridge over real WebSockets between real processes."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import pytest
import torch

from autograd_bridge.errors import PeerLostError
from autograd_bridge.partition import even_stage_specs, save_stage_weights, split_model
from autograd_bridge.remote import ClientSettings, StageClient
from autograd_bridge.serve import StageHostProcess

LAST_LINE = re.compile(r"^max_abs_diff=(\S+) stages=(\d+) model=(.+)$")


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autograd_bridge.verify", *args],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("llama", ["--stages", "4", "--attn", "eager"]),
        ("gpt2", ["--stages", "3", "--micro-batches", "2", "--batch-size", "4", "--schedule", "gpipe"]),
        ("llama", ["--stages", "4", "--path", "chain"]),
        ("llama", ["--stages", "4", "--path", "chain", "--micro-batches", "3", "--batch-size", "6"]),
    ],
)
def test_verify_cli_splits_over_websocket_processes_exactly(tiny_model_dir, family, extra):
    """The CLI hosts stages in separate processes, prints a table and an OK last line, exits 0."""
    path = tiny_model_dir(family)
    proc = _verify("--model", str(path), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) <= 1e-5
    assert match.group(2) == extra[1]
    assert sum("ws://127.0.0.1:" in line for line in lines) == int(extra[1]) - 2


@pytest.mark.slow
def test_all_remote_layout_is_exact_untied_and_refused_for_tied_embeddings(tiny_model_dir):
    """Every stage on a host matches the whole model (Llama, untied); GPT-2's tied head is refused with the reason."""
    proc = _verify("--model", str(tiny_model_dir("llama")), "--stages", "3", "--layout", "all-remote",
                   "--transport", "memory")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = LAST_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match and float(match.group(1)) <= 1e-5
    proc = _verify("--model", str(tiny_model_dir("gpt2")), "--stages", "3", "--layout", "all-remote",
                   "--transport", "memory")  # fmt: skip
    assert proc.returncode == 2 and "ties its head" in proc.stderr and "--layout u-shape" in proc.stderr


@pytest.mark.slow
def test_verify_cli_splits_an_alibi_model_exactly(tiny_model_dir):
    """BLOOM passes titanic-verify: K=4, hosts build ALiBi from the mask sent in frames, 1F1B micro-batches."""
    proc = _verify(
        "--model", str(tiny_model_dir("bloom")), "--stages", "4", "--micro-batches", "2", "--batch-size", "4",
        "--transport", "memory",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = LAST_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match and float(match.group(1)) <= 1e-5 and match.group(2) == "4"


@pytest.mark.slow
def test_verify_cli_exits_non_zero_above_tolerance(tiny_model_dir):
    """With a tolerance below the fp32 rounding of micro-batching, the check fails with status 1."""
    proc = _verify(
        "--model", str(tiny_model_dir("gpt2")), "--stages", "3", "--transport", "memory",
        "--micro-batches", "2", "--batch-size", "4", "--tolerance", "1e-12",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "MISMATCH" in proc.stdout
    assert LAST_LINE.match(proc.stdout.strip().splitlines()[-1])


def test_verify_cli_refuses_more_stages_than_blocks(tiny_model_dir):
    """Asking for more stages than the model has blocks is a usage error (status 2) with a reason."""
    proc = _verify("--model", str(tiny_model_dir("llama")), "--stages", "40", "--transport", "memory")
    assert proc.returncode == 2
    assert "cannot be cut into 40 stages" in proc.stderr


@pytest.mark.slow
def test_killed_host_process_fails_the_step_promptly(tmp_path, load_tiny):
    """A stage host killed between forward and backward raises PeerLostError within seconds."""
    model = load_tiny("llama")
    model.config.save_pretrained(tmp_path)
    specs = even_stage_specs(model.config.num_hidden_layers, 3)
    stage = split_model(model, specs)[1]
    save_stage_weights(stage, tmp_path / "stage-1.safetensors")
    host = StageHostProcess(tmp_path, [tmp_path / "stage-1.safetensors"], [specs[1]], run_id="r")
    try:

        async def scenario() -> float:
            client = await StageClient.connect(host.url, run_id="r", stage=1, settings=ClientSettings(timeout_s=60))
            x = torch.randn(2, 4, model.config.hidden_size)
            y = await client.forward(x, step=0, micro_batch=0)
            assert torch.allclose(y, stage(x), atol=1e-6)
            host.kill()
            started = time.monotonic()
            with pytest.raises(PeerLostError):
                await client.backward(torch.ones_like(y), step=0, micro_batch=0)
            await client.close()
            return time.monotonic() - started

        assert asyncio.run(scenario()) < 10
    finally:
        host.close()


@pytest.mark.slow
def test_host_process_refuses_peers_without_the_run_token(tmp_path, load_tiny):
    """A host started with --token refuses a client that does not present it."""
    model = load_tiny("llama")
    model.config.save_pretrained(tmp_path)
    specs = even_stage_specs(model.config.num_hidden_layers, 3)
    save_stage_weights(split_model(model, specs)[1], tmp_path / "s1.safetensors")
    host = StageHostProcess(tmp_path, [tmp_path / "s1.safetensors"], [specs[1]], run_id="r", token="secret")
    try:

        async def scenario() -> None:
            with pytest.raises(Exception) as refused:
                await StageClient.connect(host.url, run_id="r", stage=1, token="wrong")
            assert "401" in str(refused.value) or "403" in str(refused.value) or "refused" in str(refused.value)
            client = await StageClient.connect(host.url, run_id="r", stage=1, token="secret")
            await client.close()

        asyncio.run(scenario())
    finally:
        host.close()
