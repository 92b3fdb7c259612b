"""Two client daemons and a planning server in one event loop: hosting, connecting, uploading, stopping."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path

import pytest

from client.config import BridgeSettings, ClientConfig, ConnectionSettings, DeclaredProfile, ProfileSettings
from client.daemon import ClientDaemon
from proto.messages import RunState, StopRun, Upload
from server.config import ModelSettings
from server.planning.model_source import hf_model_source, planner_for
from tests.server.support import JOIN_TOKEN, running_app, server_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (4 blocks) saved as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import save_pretrained_dir, tiny_config

    path = tmp_path_factory.mktemp("model")
    save_pretrained_dir(AutoModelForCausalLM.from_config(tiny_config("llama")), None, path)
    return path


def daemon_config(server: str, name: str, cache: Path, *, data: Path | None = None) -> ClientConfig:
    return ClientConfig(
        client=ConnectionSettings(server=server, name=name, token=JOIN_TOKEN, data=data, cache_dir=cache),
        bridge=BridgeSettings(host="127.0.0.1"),
        profile=ProfileSettings(quick=True, device="cpu"),
        declare=DeclaredProfile(flops_per_s=1e10, upload_bytes_per_s=1e8, download_bytes_per_s=1e8, rtt_s=0.001),
    )


async def wait_for(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (value := predicate()):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)
    return value


async def test_host_uploads_and_stops(tmp_path: Path, model_dir: Path) -> None:
    """The helper hosts its stage, the owner connects, an upload arrives intact, a stop closes the host."""
    data = tmp_path / "owner.txt"
    data.write_text("text")
    config = server_config(tmp_path / "state", timeout_s=5.0)
    config = dataclasses.replace(config, model=ModelSettings(path=str(model_dir), stages=3))
    source = hf_model_source(config.model, work_dir=tmp_path / "model-work")  # type: ignore[arg-type]
    plan = planner_for(source, config.model, config.planning)  # type: ignore[arg-type]
    async with running_app(config, model=source, plan=plan) as app:
        owner = ClientDaemon(daemon_config(app.control_address, "owner", tmp_path / "owner", data=data))
        helper = ClientDaemon(daemon_config(app.control_address, "helper", tmp_path / "helper"))
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(d.run(stop)) for d in (owner, helper)]
        try:
            deployment = await wait_for(
                lambda: (d := app.state.get_deployment()) is not None and d.state == "connected" and d, 90, "connected"
            )
            (run_id,) = deployment.run_ids()
            hosted = helper.runs[run_id]
            assert hosted.state == RunState.SERVING and sorted(hosted.stages) == [1]
            assert owner.runs[run_id].state == RunState.CONNECTED and sorted(owner.runs[run_id].stages) == [0, 2]

            assert app.handler is not None
            app.handler.expect_upload("helper", run_id, 1, 1, max_bytes=2**30)  # the server takes only uploads it asked for
            app.handler.send_command("helper", Upload(run_id=run_id, partitions=(1,), round=1))
            (upload,) = await wait_for(lambda: app.state.list_uploads(run_id), 30, "upload")
            stored = Path(upload.path).read_bytes()
            assert hashlib.sha256(stored).hexdigest() == upload.header.sha256
            assert upload.client_id == "helper" and upload.header.partition == 1 and upload.header.round == 1

            app.handler.send_command("helper", StopRun(run_id=run_id, reason="test"))
            await wait_for(lambda: run_id not in helper.runs, 30, "run stopped")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert helper.runs == {} and owner.runs == {}
