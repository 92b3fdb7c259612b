"""The global model after every round, on disk, and what the server needs to resume a run.

Layout::

    <root>/<run_id>/round-<n>/
        config.json, model.safetensors, ...      full fine-tuning: what from_pretrained loads
        adapter_config.json,                     LoRA: what PeftModel.from_pretrained loads
        adapter_model.safetensors
        tokenizer.json, tokenizer_config.json    when a tokenizer was given
        titanic_state.json                       round number, kind, and the server state tree
        titanic_state.safetensors                the tensors of that tree (e.g. FedAdam moments)

A round is written into a hidden temporary folder next to its final place and renamed into
place only once every file is written and synced, so a crash at any point leaves either the
whole round or no ``round-<n>`` folder at all; :meth:`CheckpointStore.latest` then finds the
previous round. Nothing here pickles: the server state is JSON with its tensors stored by
safetensors, and reading it back never runs ``torch.load``.

The server state is a tree of dicts (string keys), lists, strings, numbers, booleans, None
and tensors, e.g. ``{"round": 3, "aggregator": FedAdam(...).state_dict(), "seed": 7}``;
tuples come back as lists.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from autograd_bridge.models import load_causal_lm, save_pretrained_dir

__all__ = ["STATE_JSON", "STATE_TENSORS", "CheckpointStore", "SavedRound", "from_peft_names", "to_peft_names"]

STATE_JSON = "titanic_state.json"
STATE_TENSORS = "titanic_state.safetensors"
_FORMAT = 1
_TENSOR_KEY = "$tensor"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ROUND_DIR = re.compile(r"^round-(\d+)$")
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # what peft puts before whole-model names in adapter files


def to_peft_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Adapter tensors under whole-model names (``...lora_A.default.weight``) as peft saves them."""
    return {_PEFT_PREFIX + name.replace(".default.", "."): t for name, t in state.items()}


def from_peft_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`to_peft_names`."""
    out = {}
    for name, tensor in state.items():
        bare = name.removeprefix(_PEFT_PREFIX)
        for marker in ("lora_A", "lora_B"):
            bare = bare.replace(f".{marker}.", f".{marker}.default.")
        out[bare] = tensor
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedRound:
    """One complete checkpoint, as read back."""

    run_id: str  # the run it belongs to
    round: int  # the round it ends
    path: Path  # its folder: from_pretrained (or PeftModel.from_pretrained) loads it
    adapter: bool  # True: a PEFT adapter folder; False: a whole model
    server_state: dict[str, Any]  # what save_round was given, tensors restored


class CheckpointStore:
    """Rounds of runs under ``root``; every write is all-or-nothing."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ writing

    def save_round(
        self,
        run_id: str,
        round: int,
        model: Any,
        *,
        config: Any = None,
        tokenizer: Any = None,
        server_state: Mapping[str, Any],
        adapter: bool = False,
    ) -> Path:
        """Write round ``round`` of ``run_id`` and return its folder.

        ``model`` is, for full fine-tuning (``adapter=False``), a ``PreTrainedModel`` or a
        complete state dict keyed by whole-model names together with its ``config`` (a
        ``PretrainedConfig``; a tied ``lm_head.weight`` may be left out). For LoRA
        (``adapter=True``) it is a ``PeftModel``, or an adapter state dict as
        ``peft.get_peft_model_state_dict`` returns it together with its ``config`` (a
        ``PeftConfig`` whose ``base_model_name_or_path`` names the base model).
        ``tokenizer`` is saved alongside when given. A round that exists already is refused.
        """
        run_dir = self._run_dir(run_id)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        final = run_dir / f"round-{round}"
        if final.exists():
            raise ValueError(f"{final} exists already; a round is written once (resume from latest() + 1)")
        tree, tensors = _encode_state(server_state)
        run_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".round-{round}.", suffix=".tmp", dir=run_dir))
        try:
            if adapter:
                _write_adapter(model, config, staging)
            else:
                _write_model(model, config, staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            save_file(tensors, staging / STATE_TENSORS)
            header = {"format": _FORMAT, "run_id": run_id, "round": round, "adapter": adapter, "state": tree}
            (staging / STATE_JSON).write_text(json.dumps(header, indent=1), encoding="utf-8")
            _sync_tree(staging)
            os.rename(staging, final)  # the commit point: atomic within one file system
            _sync_dir(run_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    # ------------------------------------------------------------------ reading

    def rounds(self, run_id: str) -> list[int]:
        """The complete rounds of ``run_id``, oldest first (empty when there are none)."""
        run_dir = self._run_dir(run_id)
        if not run_dir.is_dir():
            return []
        found = (_ROUND_DIR.match(entry.name) for entry in run_dir.iterdir() if entry.is_dir())
        return sorted(int(match.group(1)) for match in found if match)

    def load_round(self, run_id: str, round: int) -> SavedRound:
        """Read back the state of one complete round."""
        path = self._run_dir(run_id) / f"round-{round}"
        if not path.is_dir():
            raise ValueError(f"run {run_id!r} has no round {round} under {self.root}; rounds: {self.rounds(run_id)}")
        try:
            header = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
            tensors = load_file(path / STATE_TENSORS)
        except (OSError, ValueError) as error:
            raise ValueError(f"checkpoint {path} cannot be read ({error}); delete that folder to resume from the one before") from error
        if header.get("format") != _FORMAT:
            raise ValueError(f"checkpoint {path} has format {header.get('format')!r}, this server reads {_FORMAT}")
        return SavedRound(
            run_id=run_id,
            round=int(header["round"]),
            path=path,
            adapter=bool(header["adapter"]),
            server_state=_decode_state(header["state"], tensors),
        )

    def latest(self, run_id: str) -> SavedRound | None:
        """The newest complete round of ``run_id`` and its server state, or None before round 0 ends."""
        done = self.rounds(run_id)
        return self.load_round(run_id, done[-1]) if done else None

    def remove_incomplete(self, run_id: str) -> int:
        """Delete temporary folders a crash left behind; return how many there were."""
        run_dir = self._run_dir(run_id)
        if not run_dir.is_dir():
            return 0
        stale = [entry for entry in run_dir.iterdir() if entry.name.startswith(".round-") and entry.is_dir()]
        for entry in stale:
            shutil.rmtree(entry)
        return len(stale)

    def prune(self, run_id: str, *, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` rounds (>= 1); return the rounds deleted."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the newest round is what a restart resumes from), got {keep}")
        old = self.rounds(run_id)[:-keep]
        for number in old:
            shutil.rmtree(self._run_dir(run_id) / f"round-{number}")
        return old

    # ------------------------------------------------------------------ LoRA export

    def export_merged(
        self,
        run_id: str,
        round: int,
        out_dir: str | os.PathLike[str],
        *,
        base_model: PreTrainedModel | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Path:
        """Merge an adapter round into its base model and write a plain model folder.

        ``base_model`` is the model the adapters were trained on: a loaded model (copied,
        not changed), a name or path for :func:`~autograd_bridge.models.load_causal_lm`, or
        None for the adapter config's ``base_model_name_or_path``. The tokenizer saved with
        the round is copied. ``out_dir`` must not exist yet or be empty; it is written
        atomically like a round.
        """
        from peft import PeftConfig, PeftModel

        saved = self.load_round(run_id, round)
        if not saved.adapter:
            raise ValueError(f"round {round} of run {run_id!r} is a whole model already; load {saved.path} directly")
        if isinstance(base_model, PreTrainedModel):
            base = copy.deepcopy(base_model)  # PeftModel.from_pretrained injects layers in place
        else:
            name = base_model or PeftConfig.from_pretrained(str(saved.path)).base_model_name_or_path
            if not name:
                raise ValueError(f"{saved.path}/adapter_config.json names no base model; pass base_model=")
            base = load_causal_lm(name, dtype=dtype)
        merged = PeftModel.from_pretrained(base, saved.path).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(saved.path) if (saved.path / "tokenizer_config.json").is_file() else None
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty; choose a new folder for the merged model")
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            save_pretrained_dir(merged, tokenizer, staging)
            _sync_tree(staging)
            if out.exists():
                out.rmdir()
            os.rename(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return out

    def _run_dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise ValueError(
                f"run id {run_id!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return self.root / run_id


# --------------------------------------------------------------------------- model files


def _write_model(model: Any, config: Any, folder: Path) -> None:
    """A whole model, from a PreTrainedModel or a state dict + config."""
    if hasattr(model, "peft_config"):  # a PeftModel, or a model with adapters loaded into it
        raise ValueError("got a PEFT model with adapter=False; pass adapter=True, or merge_and_unload() it first")
    if isinstance(model, PreTrainedModel):
        save_pretrained_dir(model, None, folder)
        return
    if not isinstance(model, Mapping):
        raise ValueError(f"model must be a PreTrainedModel or a state dict, got {type(model).__name__}")
    if not isinstance(config, PretrainedConfig):
        raise ValueError("a state dict needs config=<the model's PretrainedConfig> to be saved as a model")
    save_pretrained_dir(_model_from_state(model, config), None, folder)


def _model_from_state(state: Mapping[str, Tensor], config: PretrainedConfig) -> PreTrainedModel:
    """A model (on the meta device, then given ``state``'s tensors) ready for save_pretrained."""
    config = config.__class__.from_dict(config.to_dict())
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # set by gguf loading; the tensors here are plain
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(
            f"the state dict has tensors this {config.model_type} model does not: {result.unexpected_keys[:5]}; "
            "keys must be whole-model parameter names"
        )
    model.tie_weights()
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if missing:
        raise ValueError(
            f"the state dict lacks {len(missing)} tensors of the model, e.g. {missing[:5]}; "
            "gather every partition before saving a round"
        )
    return model


def _write_adapter(model: Any, config: Any, folder: Path) -> None:
    """A PEFT adapter folder, from a PeftModel or an adapter state dict + PeftConfig."""
    from peft import PeftConfig, PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(str(folder))
        return
    if not isinstance(model, Mapping):
        raise ValueError(f"with adapter=True, model must be a PeftModel or an adapter state dict, got {type(model).__name__}")
    if not isinstance(config, PeftConfig):
        raise ValueError("an adapter state dict needs config=<its peft LoraConfig> to be saved")
    config.save_pretrained(str(folder))
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.items()}
    save_file(tensors, folder / _ADAPTER_WEIGHTS, metadata={"format": "pt"})


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder``, so the rename publishes data that is on disk."""
    for directory, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _sync_dir(Path(directory))


def _sync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- server state


def _encode_state(state: Mapping[str, Any]) -> tuple[Any, dict[str, Tensor]]:
    """``(JSON tree with tensor references, tensors)`` for a server state tree."""
    if not isinstance(state, Mapping):
        raise ValueError(f"server_state must be a dict, got {type(state).__name__}")
    tensors: dict[str, Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().contiguous().clone()
            return {_TENSOR_KEY: key}
        if isinstance(value, Mapping):
            for key in value:
                if not isinstance(key, str) or key == _TENSOR_KEY:
                    raise ValueError(f"server_state{where}: keys must be strings other than {_TENSOR_KEY!r}, got {key!r}")
            return {key: encode(item, f"{where}[{key!r}]") for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise ValueError(
            f"server_state{where} is a {type(value).__name__}; use dicts, lists, str, int, float, bool, None or tensors"
        )

    return encode(state, ""), tensors


def _decode_state(tree: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The inverse of :func:`_encode_state`."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR_KEY}:
            return tensors[tree[_TENSOR_KEY]]
        return {key: _decode_state(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_decode_state(value, tensors) for value in tree]
    return tree
