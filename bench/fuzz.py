"""Fuzz benchmark: random and mutated inputs against a live server's gRPC and admin ports and a live stage host.

    python bench/fuzz.py                 # until 100,000 inputs (or --seconds, default 900)
    python bench/fuzz.py --seconds 60
    python bench/fuzz.py --quick         # 20 s

Three real processes on loopback: ``titanic-server run`` (planning for a tiny Llama drawn at
random, ``--init random``), and ``python -m autograd_bridge.serve`` hosting stage 1 of 3 of a tiny
Llama built from a config (bearer token required). Inputs, in rounds of one of each kind:

* gRPC: random bytes, mutated serializations of valid requests (bit flips, truncation, inserted
  and repeated bytes) and valid protobuf messages with random field values, each to a random
  method, half of them with a live session;
* admin API: ``POST /v1/runs`` with random bytes, mutated valid specs, deep nesting, huge and
  non-finite numbers, and requests to random routes and methods;
* stage host: frames (HELLO, FORWARD, BACKWARD, OPTIMIZER_STEP, ...) with random headers and
  tensors, mutated encoded frames, and raw WebSocket messages that break the length prefix
  (the host closes those connections; the fuzzer reconnects).

After every batch each target must still answer a valid request (gRPC ``Ping`` with a fresh
session, ``GET /v1/status`` 200, a stage host ``HELLO`` answered ``ACK``) within 10 s. Counted:
``crashes`` (a process died), ``hangs`` (an input or a check got no answer within 10 s),
``five_xx`` (admin answers >= 500), ``unexpected_status`` (gRPC UNKNOWN/INTERNAL/UNIMPLEMENTED;
a stage host answer that is neither an ERROR frame nor the request's own kind of reply, or a
connection dropped after a well-framed message), and ``rss_growth_mib``: the largest growth of a
process's resident memory from the end of the first batch to the end. Last line:
``inputs=<n> crashes=<n> hangs=<n> five_xx=<n> unexpected_status=<n> rss_growth_mib=<x>``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import torch  # noqa: E402
from google.protobuf.descriptor import Descriptor, FieldDescriptor  # noqa: E402
from google.protobuf.message import Message  # noqa: E402
from google.protobuf.message_factory import GetMessageClass  # noqa: E402

from autograd_bridge.errors import BridgeError  # noqa: E402
from autograd_bridge.frames import Frame, MessageKind, decode_frame, encode_frame  # noqa: E402
from autograd_bridge.websocket import WebSocketConnection, connect_websocket  # noqa: E402
from proto import control_pb2 as pb  # noqa: E402
from proto.messages import PROTOCOL_VERSION  # noqa: E402

SERVICE = pb.DESCRIPTOR.services_by_name["Control"]
SESSION_KEY = "x-titanic-session"
BAD_GRPC = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}
TIMEOUT_S = 10.0
RUN_ID = "fuzz-run"
HIDDEN = 64
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
REPLY_OF = {
    MessageKind.HELLO: MessageKind.ACK,
    MessageKind.FORWARD: MessageKind.FORWARD_RESULT,
    MessageKind.EVAL_FORWARD: MessageKind.FORWARD_RESULT,
    MessageKind.BACKWARD: MessageKind.BACKWARD_RESULT,
    MessageKind.OPTIMIZER_STEP: MessageKind.ACK,
    MessageKind.RELEASE: MessageKind.ACK,
    MessageKind.GET_GRADS: MessageKind.GRADS,
    MessageKind.GET_WEIGHTS: MessageKind.WEIGHTS,
    MessageKind.GET_GRAD_NORM: MessageKind.GRAD_NORM,
}


@dataclass
class Tally:
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    five_xx: int = 0
    unexpected_status: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(what[:300])


# -- mutation ----------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a few random edits: bit flips, cuts, inserted, repeated or overwritten bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            del out[at:]
        elif op == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and out:
            piece = out[at : at + rng.randint(1, 32)]
            out[at:at] = piece * rng.randint(1, 8)
        elif op == 4 and out:
            i = rng.randrange(len(out))
            out[i] = rng.choice([0, 0x7F, 0x80, 0xFF])
        else:
            del out[at : at + rng.randint(1, 8)]
    return bytes(out)


def _value(field: FieldDescriptor, rng: random.Random, depth: int) -> Any:
    t = field.type
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(
            [0.0, -1.0, 1e-320, 5e-324, 1e30, 1e308, float("inf"), float("nan"), rng.uniform(-1e12, 1e12)]
        )
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rng.choice([0, 1, 7, (1 << 32) - 1, rng.randrange(1 << 32)])
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rng.choice([0, 1, 1 << 40, (1 << 64) - 1, rng.randrange(1 << 64)])
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return rng.choice([0, -1, 1, (1 << 31) - 1, -(1 << 31)])
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return rng.choice([0, -1, 1, (1 << 63) - 1, -(1 << 63)])
    if t == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FieldDescriptor.TYPE_STRING:
        return rng.choice(
            ["", "c1", "fuzzer", "plan-1-p0", "0" * 64, "../etc", "x" * rng.randint(0, 5000), "é\u0000"]
        )
    if t == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 256))
    if t == FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values])
    return random_message(field.message_type, rng, depth + 1)


def random_message(descriptor: Descriptor, rng: random.Random, depth: int = 0) -> Message:
    """A message of ``descriptor``'s type with random fields set to edge-case values."""
    message = GetMessageClass(descriptor)()
    for f in descriptor.fields:
        if rng.random() < 0.5 or (f.type == FieldDescriptor.TYPE_MESSAGE and depth >= 3):
            continue
        if f.is_repeated:
            getattr(message, f.name).extend([_value(f, rng, depth) for _ in range(rng.randint(0, 3))])
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, f.name).CopyFrom(_value(f, rng, depth))
        else:
            setattr(message, f.name, _value(f, rng, depth))
    return message


# -- the processes -----------------------------------------------------------------------------


def spawn(args: list[str], ready: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python args`` from the repository root; returns it and its first line starting with ``ready``."""
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(ready):
            # Keep reading its output (the last lines kept) so a chatty process never blocks on a full pipe.
            TAILS[process.pid] = drain(process)
            return process, line.strip()
    raise RuntimeError(f"{args[:3]} exited ({process.wait()}) before it was ready")


TAILS: dict[int, collections.deque[str]] = {}


def drain(process: subprocess.Popen[str]) -> collections.deque[str]:
    """The last 30 lines of ``process``'s output, kept up to date by a thread."""
    import threading

    tail: collections.deque[str] = collections.deque(maxlen=30)

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line)

    threading.Thread(target=read, daemon=True).start()
    return tail


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def make_stage_files(folder: Path) -> tuple[Path, Path]:
    """A tiny Llama's config folder and its weights file (drawn at random)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config_dir = folder / "model"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "architectures"})
    )
    model.save_pretrained(config_dir)
    return config_dir, config_dir / "model.safetensors"


# -- the fuzzers -------------------------------------------------------------------------------


class GrpcFuzzer:
    def __init__(self, address: str, token: str, rng: random.Random, tally: Tally) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.token, self.rng, self.tally = token, rng, tally
        self.session: tuple[tuple[str, str], ...] = ()
        self.valid = self._valid_requests()

    def _valid_requests(self) -> dict[str, bytes]:
        profile = pb.DeviceProfile(
            flops_per_s=1e9,
            memory_bytes=1 << 30,
            device="cpu",
            capacity=1,
            upload_bytes_per_s=1e7,
            download_bytes_per_s=1e7,
            rtt_s=0.001,
        )
        return {
            "Register": pb.RegisterRequest(
                name="fuzz-2", join_token=self.token, profile=profile, protocol_version=PROTOCOL_VERSION
            ).SerializeToString(),
            "ReportProfile": pb.ProfileReport(profile=profile).SerializeToString(),
            "Heartbeat": pb.HeartbeatRequest(runs=[pb.RunStatus(run_id="r1", state=3)]).SerializeToString(),
            "ReportStatus": pb.StatusReport(command_id=1).SerializeToString(),
            "Ping": pb.PingRequest(nonce=5).SerializeToString(),
            "ProbeDownload": pb.ProbeRequest(seconds=0.01, chunk_bytes=1024).SerializeToString(),
            "DownloadPartition": pb.PartitionRequest(run_id="r1", partition=0).SerializeToString(),
            "UploadPartition": pb.WeightChunk(
                header=pb.WeightHeader(run_id="r1", partition=0, total_bytes=4, sha256="0" * 64)
            ).SerializeToString(),
        }

    async def register(self) -> None:
        reply = await self.channel.unary_unary(
            f"/{SERVICE.full_name}/Register", response_deserializer=pb.RegisterReply.FromString
        )(
            pb.RegisterRequest(
                name="fuzzer",
                join_token=self.token,
                protocol_version=PROTOCOL_VERSION,
                profile=pb.DeviceProfile(flops_per_s=1e9, device="cpu", capacity=1),
            ).SerializeToString(),
            timeout=TIMEOUT_S,
        )
        self.session = ((SESSION_KEY, reply.session_token),)

    def _payload(self, method: Any) -> bytes:
        choice = self.rng.random()
        if choice < 0.3:
            return self.rng.randbytes(self.rng.randint(0, 200))
        if choice < 0.6 and method.name in self.valid:
            return mutate(self.valid[method.name], self.rng)
        return random_message(method.input_type, self.rng).SerializeToString()

    async def one(self) -> None:
        method = self.rng.choice(list(SERVICE.methods))
        path = f"/{SERVICE.full_name}/{method.name}"
        metadata = self.session if self.rng.random() < 0.5 else ()
        payloads = [self._payload(method) for _ in range(self.rng.randint(1, 3))]
        self.tally.inputs += 1
        try:
            if method.client_streaming:
                await self.channel.stream_unary(path)(iter(payloads), metadata=metadata, timeout=TIMEOUT_S)
            elif method.server_streaming:
                async for _ in self.channel.unary_stream(path)(payloads[0], metadata=metadata, timeout=0.3):
                    pass
            else:
                await self.channel.unary_unary(path)(payloads[0], metadata=metadata, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                if not method.server_streaming:
                    self.tally.hangs += 1
                    self.tally.note(f"grpc {method.name} hung")
            elif code in BAD_GRPC:
                self.tally.unexpected_status += 1
                self.tally.note(f"grpc {method.name} {code.name}: {error.details()}")
            elif code == grpc.StatusCode.UNAUTHENTICATED and metadata:
                await self.register()  # a fuzzed Leave or Register ended the session

    async def check(self) -> None:
        await self.register()
        reply = await self.channel.unary_unary(
            f"/{SERVICE.full_name}/Ping", response_deserializer=pb.PingReply.FromString
        )(pb.PingRequest(nonce=42).SerializeToString(), metadata=self.session, timeout=TIMEOUT_S)
        if reply.nonce != 42:
            raise RuntimeError("Ping answered the wrong nonce")


def admin_bodies(rng: random.Random) -> bytes:
    valid = {"spec": {"rounds": 2, "training": {"lr": 1e-4, "batch_size": 4}, "local_work": {"steps": 3}}}
    choice = rng.randrange(6)
    if choice == 0:
        return rng.randbytes(rng.randint(0, 300))
    if choice == 1:
        return mutate(json.dumps(valid).encode(), rng)
    if choice == 2:
        depth = rng.choice([10, 100, 10_000, 200_000])
        return (
            ("[" * depth + "]" * depth).encode()
            if rng.random() < 0.5
            else ('{"a":' * depth + "1" + "}" * depth).encode()
        )
    if choice == 3:
        number = rng.choice(["1e999", "-1e999", "Infinity", "NaN", "1" + "0" * 5000, "1e308", "-0", "5e-324"])
        key = rng.choice(
            ["rounds", "seed", "lr", "batch_size", "steps", "server_lr", "upload_density", "val_fraction"]
        )
        return f'{{"spec": {{"{key}": {number}}}}}'.encode()
    if choice == 4:
        return json.dumps(
            {
                "spec": {rng.choice(["training", "aggregation", "x"]): {"lr": rng.random() * 1e6}},
                "resume": rng.choice(["run-1", "../x", 5, None]),
            }
        ).encode()
    return b"x" * rng.choice([1 << 10, 1 << 20, 3 << 20])


class AdminFuzzer:
    def __init__(self, url: str, token: str, rng: random.Random, tally: Tally) -> None:
        self.url, self.rng, self.tally = url, rng, tally
        self.http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}"}, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)
        )

    async def one(self) -> None:
        self.tally.inputs += 1
        if self.rng.random() < 0.8:
            method, route, body = "POST", "/v1/runs", admin_bodies(self.rng)
        else:
            method = self.rng.choice(["GET", "POST", "PUT", "DELETE"])
            route = self.rng.choice(
                [
                    "/v1/status",
                    "/v1/runs/run-1",
                    "/v1/runs/%00",
                    "/v1/runs/x/stop",
                    "/metrics",
                    "/v1/plan?format=" + "x" * 100,
                    "/" + "a" * 3000,
                    "/v1/clients",
                ]
            )
            body = admin_bodies(self.rng)
        try:
            async with self.http.request(method, self.url + route, data=body) as response:
                await response.read()
                if response.status >= 500:
                    self.tally.five_xx += 1
                    self.tally.note(f"admin {method} {route} {body[:60]!r} -> {response.status}")
        except TimeoutError:
            self.tally.hangs += 1
            self.tally.note(f"admin {method} {route} hung")
        except aiohttp.ClientError:
            pass  # the server refused the request before answering (a connection closed on a huge body)

    async def check(self) -> None:
        async with self.http.get(self.url + "/v1/status") as response:
            if response.status != 200:
                raise RuntimeError(f"GET /v1/status answered {response.status}")

    async def close(self) -> None:
        await self.http.close()


class HostFuzzer:
    def __init__(self, url: str, token: str, rng: random.Random, tally: Tally) -> None:
        self.url, self.token, self.rng, self.tally = url, token, rng, tally
        self.conn: WebSocketConnection | None = None
        self.request_id = 0

    async def connection(self) -> WebSocketConnection:
        if self.conn is None or self.conn.closed:
            self.conn = await connect_websocket(self.url, token=self.token)
        return self.conn

    def _tensor(self) -> torch.Tensor:
        shape = self.rng.choice(
            [(2, 5, HIDDEN), (1, 1, HIDDEN), (2, 0, HIDDEN), (2, 5), (0,), (3, 4, 7), (1, 300, HIDDEN)]
        )
        dtype = self.rng.choice(
            [torch.float32, torch.float32, torch.float16, torch.float64, torch.int64, torch.bool]
        )
        t = (
            torch.randn(shape).to(dtype)
            if dtype.is_floating_point
            else torch.randint(-5, 600, shape).to(dtype)
        )
        if dtype.is_floating_point and self.rng.random() < 0.1:
            t.view(-1)[:1] = float(self.rng.choice(["nan", "inf", "1e38"])) if t.numel() else 0.0
        return t

    def _frame(self) -> Frame:
        self.request_id += 1
        kind = self.rng.choice([*REPLY_OF, MessageKind.ERROR, MessageKind.ACK])
        names = self.rng.choice(
            [("x",), ("grad",), ("x", "attention_mask"), ("x", "position_ids"), (), ("y",)]
        )
        options = self.rng.choice(
            [
                {},
                {"lr": self.rng.choice(["1e308", "nan", "-1", "0.001", "x"])},
                {"grad_scale": self.rng.choice(["2", "nan", "0.5"])},
            ]
        )
        return Frame(
            kind=kind,
            request_id=self.request_id,
            run_id=self.rng.choice([RUN_ID, RUN_ID, "other"]),
            step=self.rng.choice([0, 1, 2**31]),
            micro_batch=self.rng.choice([0, 1, 63]),
            stage=self.rng.choice([1, 1, 0, 9]),
            tensors={n: self._tensor() for n in names},
            options=options,
        )

    async def one(self) -> None:
        self.tally.inputs += 1
        conn = await self.connection()
        frame = self._frame()
        parts = encode_frame(frame)
        choice = self.rng.random()
        if choice < 0.2:
            parts = [mutate(b"".join(bytes(p) for p in parts), self.rng)]
        elif choice < 0.25:
            await self._raw_broken_message()
            return
        try:
            await conn.send(parts)
            reply = decode_frame(await asyncio.wait_for(conn.recv(), TIMEOUT_S))
        except TimeoutError:
            self.tally.hangs += 1
            self.tally.note(f"host {frame.kind.name} hung")
            await conn.close()
            return
        except BridgeError as error:  # the host closed a well-framed connection
            self.tally.unexpected_status += 1
            self.tally.note(f"host {frame.kind.name}: {error}")
            return
        if reply.kind == MessageKind.ERROR:
            return
        # A mutated frame may have become another request; an intact one gets its own kind of reply.
        allowed = set(REPLY_OF.values()) if choice < 0.2 else {REPLY_OF.get(frame.kind)}
        if reply.kind not in allowed:
            self.tally.unexpected_status += 1
            self.tally.note(f"host {frame.kind.name} answered {reply.kind.name}")

    async def _raw_broken_message(self) -> None:
        """A message whose length prefix lies or is cut: the host must close this connection with a reason."""
        from websockets.asyncio.client import connect

        async with connect(
            self.url, additional_headers={"Authorization": f"Bearer {self.token}"}, compression=None
        ) as ws:
            await ws.send(
                self.rng.choice(
                    [b"", b"abc", (1 << 40).to_bytes(8, "little"), (100).to_bytes(8, "little") + b"x" * 200]
                )
            )
            try:
                await asyncio.wait_for(ws.wait_closed(), TIMEOUT_S)
            except TimeoutError:
                self.tally.hangs += 1
                self.tally.note("host kept a broken connection open")

    async def check(self) -> None:
        conn = await self.connection()
        self.request_id += 1
        await conn.send(
            encode_frame(Frame(kind=MessageKind.HELLO, request_id=self.request_id, run_id=RUN_ID))
        )
        reply = decode_frame(await asyncio.wait_for(conn.recv(), TIMEOUT_S))
        if reply.kind != MessageKind.ACK:
            raise RuntimeError(f"HELLO answered {reply.kind.name}: {reply.error_message}")

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


# -- the run -----------------------------------------------------------------------------------


async def fuzz(
    *,
    seconds: float,
    target: int,
    batch: int,
    seed: int,
    grpc_address: str,
    admin_url: str,
    host_url: str,
    join_token: str,
    admin_token: str,
    host_token: str,
    pids: dict[str, int],
    alive: Callable[[], list[str]],
) -> tuple[Tally, float]:
    rng = random.Random(seed)
    tally = Tally()
    fuzzers = [
        GrpcFuzzer(grpc_address, join_token, rng, tally),
        AdminFuzzer(admin_url, admin_token, rng, tally),
        HostFuzzer(host_url, host_token, rng, tally),
    ]
    await fuzzers[0].register()  # type: ignore[attr-defined]
    baseline: dict[str, float] = {}
    growth = 0.0
    deadline = time.monotonic() + seconds
    batches = 0
    while tally.inputs < target and time.monotonic() < deadline:
        for _ in range(batch // len(fuzzers)):
            for fuzzer in fuzzers:
                await fuzzer.one()  # type: ignore[attr-defined]
        dead = alive()
        if dead:
            tally.crashes += len(dead)
            tally.note(f"died: {dead}")
            break
        for fuzzer in fuzzers:
            try:
                await asyncio.wait_for(fuzzer.check(), TIMEOUT_S)  # type: ignore[attr-defined]
            except (
                TimeoutError,
                RuntimeError,
                grpc.aio.AioRpcError,
                aiohttp.ClientError,
                BridgeError,
            ) as error:
                tally.hangs += 1
                tally.note(f"check of {type(fuzzer).__name__} failed: {error!r}")
        batches += 1
        rss = {name: rss_mib(pid) for name, pid in pids.items()}
        if batches == 1:
            baseline = rss
        else:
            growth = max(growth, *(rss[n] - baseline[n] for n in rss))
        if batches % 10 == 0:
            print(
                f"{tally.inputs} inputs, crashes {tally.crashes}, hangs {tally.hangs}, 5xx {tally.five_xx}, "
                f"unexpected {tally.unexpected_status}; RSS "
                + ", ".join(f"{n} {v:.0f} MiB" for n, v in rss.items()),
                flush=True,
            )
    await fuzzers[1].close()  # type: ignore[attr-defined]
    await fuzzers[2].close()  # type: ignore[attr-defined]
    await fuzzers[0].channel.close()  # type: ignore[attr-defined]
    return tally, growth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=900.0, help="stop after this long (or at --inputs)")
    parser.add_argument("--inputs", type=int, default=100_000, help="stop after this many inputs")
    parser.add_argument("--batch", type=int, default=300, help="inputs between health checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 20.0)
    torch.set_num_threads(1)
    join_token, admin_token, host_token = (secrets.token_urlsafe(16) for _ in range(3))
    with tempfile.TemporaryDirectory(prefix="titanic-fuzz-") as tmp:
        config_dir, weights = make_stage_files(Path(tmp))
        server, ready = spawn(
            [
                "-m",
                "server.cli",
                "run",
                "--port",
                "0",
                "--admin-port",
                "0",
                "--state-dir",
                f"{tmp}/state",
                f"--join-token={join_token}",
                f"--admin-token={admin_token}",
                "--model",
                str(config_dir),
                "--log-level",
                "WARNING",
            ],
            "titanic-server ready",
        )
        fields = dict(part.split("=", 1) for part in ready.split()[2:])
        host, listening = spawn(
            [
                "-m",
                "autograd_bridge.serve",
                "--config",
                str(config_dir),
                "--weights",
                str(weights),
                "--stage",
                "1/3:1-2",
                "--run-id",
                RUN_ID,
                f"--token={host_token}",
                "--exit-with-stdin",
            ],
            "listening",
        )
        processes = {"server": server, "host": host}

        def dead() -> list[str]:
            return [name for name, p in processes.items() if p.poll() is not None]

        try:
            began = time.monotonic()
            tally, growth = asyncio.run(
                fuzz(
                    seconds=args.seconds,
                    target=args.inputs,
                    batch=args.batch,
                    seed=args.seed,
                    grpc_address=fields["control"],
                    admin_url=fields["admin"],
                    host_url=listening.split()[1],
                    join_token=join_token,
                    admin_token=admin_token,
                    host_token=host_token,
                    pids={n: p.pid for n, p in processes.items()},
                    alive=dead,
                )
            )
            took = time.monotonic() - began
        finally:
            for name, p in processes.items():
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        print(f"{name} did not stop within 30 s of SIGTERM; killed. Its last lines:")
                        print("".join(TAILS[p.pid]))
                        p.kill()
                        p.wait()
    print(f"{tally.inputs} inputs in {took:.0f} s ({tally.inputs / took:.0f}/s)")
    for example in tally.examples:
        print("  " + example)
    print(
        f"inputs={tally.inputs} crashes={tally.crashes} hangs={tally.hangs} five_xx={tally.five_xx} "
        f"unexpected_status={tally.unexpected_status} rss_growth_mib={growth:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
