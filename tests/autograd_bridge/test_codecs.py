"""The update codecs: dense and top-k bytes, their round trips, their sizes, and refusing malformed input."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load, save

from autograd_bridge.codecs import MIN_DENSITY, CodecSettings, decode_update, get_codec
from autograd_bridge.codecs.sparse import (
    MAX_ELEMENTS_PER_BYTE,
    choose_index,
    index_bytes,
    index_dtype,
    kept_count,
    pack_bits,
    unpack_bits,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def topk(density: float = 1.0, values: str = "fp32", scope: str = "tensor"):
    return get_codec("topk", CodecSettings(density=density, values=values, scope=scope))


def expected_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k largest |x| by a stable sort (ties to the lower index): the reference."""
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.sort(x.abs().flatten(), descending=True, stable=True).indices[:k]] = True
    return keep.view(x.shape)


def craft(stored: dict[str, torch.Tensor], document: dict | bytes, codec: str = "topk") -> bytes:
    """A hand-made topk file: ``stored`` plus a layout tensor (JSON of ``document``, or raw bytes)."""
    text = document if isinstance(document, bytes) else json.dumps(document).encode()
    return save(
        {**stored, "layout": torch.tensor(list(text), dtype=torch.uint8)}, metadata={"titanic_codec": codec}
    )


def layout(*rows: list) -> dict:
    """A layout document of ``rows`` ([name, dtype, shape, index, kept])."""
    return {"version": 1, "tensors": list(rows)}


# -- what is kept ------------------------------------------------------------------------


def test_topk_keeps_the_largest_magnitudes_negatives_included() -> None:
    """Half of six entries: -5, -4.5 and 4 travel; the small ones, positive or negative, decode to zero."""
    x = torch.tensor([0.1, -5.0, 3.0, -0.2, 4.0, -4.5])
    got = topk(0.5).decode(topk(0.5).encode({"w": x}))["w"]
    assert torch.equal(got, torch.tensor([0.0, -5.0, 0.0, 0.0, 4.0, -4.5]))


@pytest.mark.parametrize("density", [0.01, 0.03, 0.1, 0.5, 0.9])
def test_decode_of_encode_is_x_on_the_kept_entries_and_zero_elsewhere(density: float) -> None:
    """Per tensor, exactly ceil(density * n) entries, the largest by magnitude, come back bit-exact (fp32)."""
    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(64, 48), "b.lora_A": torch.randn(5, 7, 3), "c.bias": torch.randn(17)}
    codec = topk(density)
    got = codec.decode(codec.encode(tensors))
    assert set(got) == set(tensors)
    for name, x in tensors.items():
        keep = expected_top(x, kept_count(x.numel(), density))
        assert int(keep.sum()) == math.ceil(density * x.numel() - 1e-9)
        assert got[name].dtype == x.dtype and got[name].shape == x.shape
        assert torch.equal(got[name], torch.where(keep, x, torch.zeros_like(x))), name


def test_ties_go_to_the_lower_index_and_bytes_are_deterministic() -> None:
    """Equal magnitudes keep the first entries; the same tensors always give the same bytes."""
    x = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    codec = topk(3 / 8)
    data = codec.encode({"w": x})
    assert torch.equal(decode_update(data)["w"], torch.tensor([1.0, -1.0, 1.0, 0, 0, 0, 0, 0]))
    assert data == codec.encode({"w": x.clone()})


def test_nan_is_ranked_first_so_a_diverged_update_is_seen() -> None:
    """A NaN entry travels like the largest value, as dense would carry it."""
    x = torch.tensor([1.0, float("nan"), 3.0, 2.0])
    got = decode_update(topk(0.25).encode({"w": x}))["w"]
    assert got[1].isnan() and torch.equal(got[[0, 2, 3]], torch.zeros(3))


def test_density_one_round_trips_exactly_in_the_original_dtypes() -> None:
    """At density 1 with fp32 values every tensor (fp32, fp16, bf16, 0-d, empty) comes back equal, and no index travels."""
    torch.manual_seed(1)
    tensors = {
        "f32": torch.randn(9, 4),
        "f16": torch.randn(33).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "scalar": torch.tensor(-2.5),
        "empty": torch.zeros(0, 4),
    }
    for scope in ("tensor", "partition"):
        data = topk(1.0, scope=scope).encode(tensors)
        assert set(load(data)) == {"layout", "values"}
        got = decode_update(data)
        for name, x in tensors.items():
            assert got[name].dtype == x.dtype and got[name].shape == x.shape and torch.equal(got[name], x), (
                name
            )


@pytest.mark.parametrize(
    ("values", "dtype", "bound"), [("fp16", torch.float16, 2**-11), ("bf16", torch.bfloat16, 2**-8)]
)
def test_half_precision_values_round_within_half_an_ulp(
    values: str, dtype: torch.dtype, bound: float
) -> None:
    """fp16/bf16 values are x rounded to nearest (relative error <= 2^-11 / 2^-8); the result stays float32."""
    torch.manual_seed(2)
    x = torch.randn(1000) * 0.01
    data = topk(0.2, values=values).encode({"w": x})
    assert load(data)["values"].dtype == dtype
    got = decode_update(data)["w"]
    keep = expected_top(x, 200)
    assert got.dtype == torch.float32 and torch.equal(got[~keep], torch.zeros(800))
    assert torch.equal(got[keep], x[keep].to(dtype).float())
    assert float(((got[keep] - x[keep]).abs() / x[keep].abs()).max()) <= bound


def test_partition_scope_ranks_all_tensors_together() -> None:
    """Per partition, the tensor of large entries takes the whole budget; per tensor, each keeps its own share."""
    small, large = torch.arange(1.0, 101.0) * 1e-3, -torch.arange(1.0, 101.0)
    tensors = {"a.small": small, "b.large": large}
    joint = decode_update(topk(0.25, scope="partition").encode(tensors))
    assert torch.equal(joint["a.small"], torch.zeros(100))
    assert torch.equal(joint["b.large"], torch.where(torch.arange(100) >= 50, large, 0.0))
    alone = decode_update(topk(0.25, scope="tensor").encode(tensors))
    assert int((alone["a.small"] != 0).sum()) == 25 and int((alone["b.large"] != 0).sum()) == 25


def test_the_default_scope_is_the_partition() -> None:
    """FLASC takes one top-k over every adapter tensor: the default settings do the same over an encode() call."""
    assert CodecSettings().scope == "partition" and get_codec("topk").settings == CodecSettings()


def test_optimizer_state_and_integer_tensors_travel_whole_and_take_no_budget() -> None:
    """optimizer/* and non-float tensors are sent as they are, and the top-k is taken over the weights alone."""
    w = torch.arange(1.0, 11.0)
    state = {"optimizer/exp_avg/w": torch.full((10,), 1e6), "optimizer/step/w": torch.tensor(7.0)}
    counts = torch.arange(5, dtype=torch.int64)
    data = topk(0.2, scope="partition").encode({"w": w, **state, "counts": counts})
    got = decode_update(data)
    assert torch.equal(got["w"], torch.where(w > 8, w, 0.0))
    assert all(torch.equal(got[n], t) for n, t in state.items()) and torch.equal(got["counts"], counts)
    assert {k for k in load(data) if k.startswith("raw/")} == {"raw/counts", *(f"raw/{n}" for n in state)}


# -- the index set: bitmask or indices -----------------------------------------------------


@pytest.mark.parametrize(("k", "index"), [(32, "indices"), (33, "bitmask")])
def test_the_smaller_index_set_is_sent(k: int, index: str) -> None:
    """For 1024 entries a bitmask costs 128 bytes and k int32 indices 4k: the switch is at k = 33 (density 1/32)."""
    n = 1024
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    sizes = {"bitmask": (n + 7) // 8, "indices": 4 * k}
    stored = load(topk(k / n).encode({"w": x}))
    other = "indices" if index == "bitmask" else "mask"
    sent = stored["mask" if index == "bitmask" else "indices"]
    assert (
        other not in stored
        and sent.nbytes == sizes[index] == min(sizes.values())
        and stored["values"].numel() == k
    )


def test_the_index_choice_is_the_cheaper_one_for_every_count() -> None:
    """choose_index picks the argmin of the byte costs (indices on a tie, nothing when all are kept)."""
    for n in (1, 7, 8, 9, 100, 1000):
        for k in range(n + 1):
            choice = choose_index(n, k)
            if k == n:
                assert choice == "all"
            else:
                assert index_bytes(n, k, choice) == min(
                    index_bytes(n, k, "bitmask"), index_bytes(n, k, "indices")
                )


def test_indices_widen_to_int64_past_two_to_the_31() -> None:
    """int32 holds every index of 2^31 entries; past that indices are int64 and the bitmask wins above 1/64."""
    assert index_dtype(2**31) == torch.int32 and index_dtype(2**31 + 1) == torch.int64
    n = 2**31 + 64
    assert choose_index(n, n // 64) == "indices" and choose_index(n, n // 64 + 1) == "bitmask"


def test_bits_pack_little_end_first_and_unpack() -> None:
    """Entry j is bit j % 8 of byte j // 8; a set padding bit past n is refused."""
    keep = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    packed = pack_bits(keep)
    assert packed.tolist() == [1, 2] and torch.equal(unpack_bits(packed, 10), keep)
    with pytest.raises(ValueError, match="past the tensor's end"):
        unpack_bits(torch.tensor([1, 6], dtype=torch.uint8), 10)


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("density", "values", "want"),
    [
        (0.01, "fp32", (0.01 * 4 + 0.01 * 4) / 4),  # int32 indices + fp32 values: 0.02
        (0.01, "fp16", (0.01 * 4 + 0.01 * 2) / 4),  # int32 indices + fp16 values: 0.015
        (0.1, "fp32", (1 / 8 + 0.1 * 4) / 4),  # bitmask + fp32 values: 0.13125
    ],
)
def test_compression_ratio_on_a_million_entries(density: float, values: str, want: float) -> None:
    """len(topk bytes) / len(dense bytes) of a 1M-entry fp32 tensor is the payload ratio, headers aside."""
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(4))
    dense = len(get_codec("dense").encode({"w": x}))
    sparse = len(topk(density, values=values).encode({"w": x}))
    assert dense > 4_000_000 and abs(sparse / dense - want) < 2e-4, sparse / dense


# -- the dense codec and reading any member's bytes ----------------------------------------


def test_dense_bytes_are_plain_safetensors_with_a_tag() -> None:
    """The dense codec's tensor data are those of safetensors.save; any safetensors reader and any member decode them."""
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "optimizer/step/a": torch.tensor(2.0)}
    tagged, plain = get_codec("dense").encode(tensors), save(tensors)
    data_of = lambda b: b[8 + int.from_bytes(b[:8], "little") :]  # noqa: E731  (bytes after the header)
    assert data_of(tagged) == data_of(plain) and b'"titanic_codec":"dense"' in tagged
    for got in (load(tagged), get_codec("dense").decode(tagged), topk(0.1).decode(tagged)):
        assert set(got) == set(tensors) and all(torch.equal(got[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_untagged_safetensors_bytes_decode_as_dense(metadata: dict[str, str] | None) -> None:
    """Files from before codecs tagged their bytes (or from any safetensors writer) read as dense."""
    tensors = {"w": torch.randn(4), "optimizer/step/w": torch.tensor(1.0)}
    got = decode_update(save(tensors, metadata=metadata))
    assert set(got) == set(tensors) and all(torch.equal(got[n], t) for n, t in tensors.items())


def test_topk_bytes_decode_through_every_member() -> None:
    """The encoding names its codec, so the dense codec's decode reads top-k bytes too."""
    x = torch.randn(50)
    data = topk(0.1).encode({"w": x})
    assert torch.equal(get_codec("dense").decode(data)["w"], decode_update(data)["w"])


def test_a_file_of_optimizer_state_alone_round_trips() -> None:
    """With nothing to rank, only the raw tensors and an empty layout travel."""
    state = {"optimizer/exp_avg/w": torch.randn(3), "optimizer/step/w": torch.tensor(4.0)}
    data = topk(0.1).encode(state)
    assert set(load(data)) == {"layout", *(f"raw/{n}" for n in state)}
    got = decode_update(data)
    assert set(got) == set(state) and all(torch.equal(got[n], t) for n, t in state.items())


def test_decoded_tensors_share_no_memory_and_encode_again() -> None:
    """Tensors that came in one stream are separate: the dense codec (safetensors) can write them back."""
    tensors = {"a": torch.randn(4), "b": torch.randn(4), "tied": torch.randn(3)}
    tensors["also_tied"] = tensors["tied"].view(3)
    got = decode_update(topk(1.0).encode(tensors))
    again = decode_update(get_codec("dense").encode(got))
    assert all(torch.equal(again[n], t) for n, t in tensors.items())


def test_a_lora_partition_pays_little_header() -> None:
    """120 LoRA tensors of a 135M model at density 0.01: each name travels once, so headers stay below the payload."""
    tensors = {
        f"model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight": torch.randn(
            (8, 576) if ab == "A" else (576, 8)
        )
        for i in range(30)
        for p in "qv"
        for ab in "AB"
    }
    n = sum(t.numel() for t in tensors.values())  # 552,960
    data = topk(0.01).encode(tensors)
    payload = kept_count(n, 0.01) * 8  # fp32 value + int32 index per kept entry
    assert payload < len(data) < 2 * payload
    assert len(get_codec("dense").encode(tensors)) / len(data) > 25


def test_an_honest_file_at_the_lowest_density_is_not_refused() -> None:
    """The elements-per-byte cap leaves room for MIN_DENSITY with fp16 values and a tensor that keeps nothing."""
    big, small = torch.randn(2**22), torch.full((420,), 100.0)
    data = topk(MIN_DENSITY, values="fp16", scope="partition").encode({"big": big, "small": small})
    got = decode_update(data)
    assert torch.equal(got["small"], small) and int((got["big"] != 0).sum()) == 0
    assert (2**22 + 420) / len(data) < MAX_ELEMENTS_PER_BYTE


# -- malformed input -----------------------------------------------------------------------


def test_garbage_and_unknown_encodings_are_refused() -> None:
    """Non-safetensors bytes, non-bytes, and an unknown codec tag are ValueErrors that say what is wrong."""
    with pytest.raises(ValueError, match="not a dense or topk update"):
        decode_update(b"\x00\x01 not safetensors")
    with pytest.raises(ValueError, match="an update is bytes"):
        decode_update("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown update encoding 'zstd'"):
        decode_update(save({"w": torch.ones(2)}, metadata={"titanic_codec": "zstd"}))


VALUES = torch.ones(2)
I32 = torch.int32


@pytest.mark.parametrize(
    ("stored", "document", "match"),
    [
        ({"values": VALUES}, b"not json", "not JSON"),
        ({"values": VALUES}, b"[" * 100_000, "not JSON"),
        ({"values": VALUES}, b"\xff\xfe\x00", "not JSON"),
        ({"values": VALUES}, {"version": 2, "tensors": []}, "version 2"),
        ({"values": VALUES}, {"version": 1}, "no tensors list"),
        ({"values": VALUES}, layout(["w", "float32", [2]]), r"not \[name, dtype, shape, index, kept\]"),
        ({"values": VALUES}, layout(["w", "float32", [-2], "all", 2]), "not a list of sizes"),
        ({"values": VALUES}, layout(["w", "float32", [True, 2], "all", 2]), "not a list of sizes"),
        ({"values": VALUES}, layout(["w", "int8", [2], "all", 2]), "dtype 'int8'"),
        ({"values": VALUES}, layout(["w", ["float32"], [2], "all", 2]), r"dtype \['float32'\]"),
        ({"values": VALUES}, layout(["w", "float32", [2], "rle", 2]), "index 'rle'"),
        ({"values": VALUES}, layout(["w", "float32", [2], "indices", 3]), "keeps 3 of the 2"),
        ({"values": VALUES}, layout(["w", "float32", [2], "all", 1]), "keeps 1 of the 2"),
        ({"values": VALUES}, layout(["w", "float32", [2], "indices", 1.5]), "keeps 1.5"),
        (
            {"values": VALUES},
            layout(["w", "float32", [1], "all", 1], ["w", "float32", [1], "all", 1]),
            "twice",
        ),
        ({"values": VALUES}, layout(["w", "float32", [2**20, 2**20], "indices", 2]), "refusing to allocate"),
        (
            {"values": VALUES},
            layout(["w", "float32", [3], "all", 3]),
            r"values is torch.float32 \[2\]; its layout needs \[3\]",
        ),
        ({}, layout(["w", "float32", [2], "all", 2]), "lacks tensors its layout needs: values"),
        (
            {"values": VALUES},
            layout(["w", "float32", [8], "bitmask", 2]),
            "lacks tensors its layout needs: mask",
        ),
        (
            {"values": VALUES, "extra": VALUES.clone()},
            layout(["w", "float32", [2], "all", 2]),
            "does not use: extra",
        ),
        (
            {"values": VALUES, "mask": torch.zeros(1, dtype=torch.uint8)},
            layout(["w", "float32", [2], "all", 2]),
            "does not use: mask",
        ),
        ({"values": VALUES.int()}, layout(["w", "float32", [2], "all", 2]), "values is torch.int32"),
        (
            {"values": VALUES, "raw/w": VALUES.clone()},
            layout(["w", "float32", [2], "all", 2]),
            "both whole and sparse",
        ),
        (
            {"values": VALUES, "indices": torch.tensor([0, 9], dtype=I32)},
            layout(["w", "float32", [4], "indices", 2]),
            r"'w' has indices that are not strictly increasing within \[0, 4\)",
        ),
        (
            {"values": VALUES, "indices": torch.tensor([2, 2], dtype=I32)},
            layout(["w", "float32", [4], "indices", 2]),
            "strictly",
        ),
        (
            {"values": VALUES, "indices": torch.tensor([-1, 2], dtype=I32)},
            layout(["w", "float32", [4], "indices", 2]),
            "strictly",
        ),
        (
            {"values": VALUES, "indices": torch.tensor([0, 1])},
            layout(["w", "float32", [4], "indices", 2]),
            "of torch.int32",
        ),
        (
            {"values": VALUES, "indices": torch.tensor([0, 1, 2], dtype=I32)},
            layout(["w", "float32", [4], "indices", 1], ["x", "float32", [4], "indices", 1]),
            r"indices is torch.int32 \[3\]; its layout needs \[2\]",
        ),
        (
            {"values": VALUES, "mask": torch.tensor([7], dtype=torch.uint8)},
            layout(["w", "float32", [8], "bitmask", 2]),
            "has a mask keeping 3 entries, not 2",
        ),
        (
            {"values": VALUES, "mask": torch.tensor([3, 0], dtype=torch.uint8)},
            layout(["w", "float32", [8], "bitmask", 2]),
            r"needs \[1\]",
        ),
        (
            {"values": VALUES, "mask": torch.tensor([0b0110_0000], dtype=torch.uint8)},
            layout(["w", "float32", [5], "bitmask", 2]),
            "past the tensor's end",
        ),
    ],
)
def test_malformed_topk_files_are_refused_with_the_reason(stored, document, match: str) -> None:
    """Each inconsistency a sender could put in a top-k file is a ValueError naming it, before any large allocation."""
    with pytest.raises(ValueError, match=match):
        decode_update(craft(stored, document))


def test_a_topk_file_without_its_layout_is_refused() -> None:
    """Tagged topk but no layout tensor: a ValueError, not dense tensors under internal names."""
    with pytest.raises(ValueError, match="lacks its layout"):
        decode_update(save({"values": VALUES}, metadata={"titanic_codec": "topk"}))


def test_mutated_and_truncated_encodings_decode_or_raise_value_error() -> None:
    """A bounded fuzz: truncations, byte flips (header and data) and insertions give ValueError or valid tensors, never a crash."""
    torch.manual_seed(5)
    tensors = {
        "a": torch.randn(40),  # bitmask at 0.2
        "b": torch.randn(3, 100),  # indices at 0.02 per tensor
        "c": torch.randn(2),  # all kept
        "optimizer/exp_avg/a": torch.randn(40),
    }
    samples = [
        topk(0.2, scope="tensor").encode(
            {"a": tensors["a"], "c": tensors["c"], "optimizer/exp_avg/a": tensors["optimizer/exp_avg/a"]}
        ),
        topk(0.02, values="bf16", scope="tensor").encode({"b": tensors["b"]}),
        topk(0.1, values="fp16", scope="partition").encode(tensors),
        get_codec("dense").encode(tensors),
    ]
    rng = random.Random(6)
    outcomes = {"refused": 0, "decoded": 0}
    for i in range(600):
        data = bytearray(samples[i % len(samples)])
        header_end = 8 + int.from_bytes(data[:8], "little")
        kind = i % 4
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:  # anywhere
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 2:  # inside the header: names, dtypes, shapes, offsets, the tag
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(header_end)] = rng.randrange(256)
        else:  # inside the data: layout JSON, indices, masks, values
            at = rng.randrange(header_end, len(data))
            data[at] = rng.randrange(256)
        try:
            got = decode_update(bytes(data))
        except ValueError:
            outcomes["refused"] += 1
        else:
            outcomes["decoded"] += 1
            assert all(isinstance(t, torch.Tensor) and t.numel() <= 10_000 for t in got.values())
    assert outcomes["refused"] > 100 and outcomes["decoded"] > 10, outcomes


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0.0}, r"density must be in \[0.0001, 1\]"),
        ({"density": 1.5}, r"density must be in \[0.0001, 1\]"),
        ({"density": MIN_DENSITY / 2}, r"density must be in"),
        ({"density": float("nan")}, "density must be a number"),
        ({"density": True}, "density must be a number"),
        ({"density": "0.1"}, "density must be a number"),
        ({"values": "fp8"}, "values must be one of fp32, fp16, bf16"),
        ({"scope": "layer"}, "scope must be one of tensor, partition"),
    ],
)
def test_codec_settings_refuse_what_they_cannot_do(kwargs: dict, match: str) -> None:
    """Each bad setting is a ValueError that says what is allowed."""
    with pytest.raises(ValueError, match=match):
        CodecSettings(**kwargs)


def test_get_codec_hands_its_settings_to_the_member() -> None:
    """get_codec(name, settings) builds the member with them; the dense codec sends values, top-k changes."""
    settings = CodecSettings(density=0.05, values="bf16", scope="tensor")
    codec = get_codec("topk", settings)
    assert codec.name == "topk" and codec.settings is settings and codec.sends_changes  # type: ignore[attr-defined]
    assert get_codec("dense").sends_changes is False
