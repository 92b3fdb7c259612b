"""Merging copies that trained only some head slices (heads mode): each slice averages over those that trained it."""

from __future__ import annotations

import pytest
import torch

from proto.messages import TrainedSlices
from server.training.aggregation import ClientUpdate, FedAdam, FedAvg


def _slices(name: str, dim: int, width: int, *blocks: int) -> dict[str, TrainedSlices]:
    return {name: TrainedSlices(tensor=name, dim=dim, width=width, blocks=blocks)}


def test_each_head_slice_averages_over_the_copies_that_trained_it() -> None:
    """A (4, 2) weight of 4 one-row heads; client a (1 sample) trained heads 0, 1; b (3 samples) heads 1, 2.

    Head 0: a's rows alone; head 1: (1 * a + 3 * b) / 4; head 2: b's alone; head 3: nobody, the global rows.
    """
    glob = {"q": torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [9.0, 9.0]])}
    a = torch.tensor([[1.0, 2.0], [4.0, 8.0], [100.0, 100.0], [100.0, 100.0]])
    b = torch.tensor([[-50.0, -50.0], [8.0, 4.0], [3.0, 5.0], [-50.0, -50.0]])
    updates = [
        ClientUpdate(state={"q": a}, num_samples=1, slices=_slices("q", 0, 1, 0, 1)),
        ClientUpdate(state={"q": b}, num_samples=3, slices=_slices("q", 0, 1, 1, 2)),
    ]
    merged = FedAvg().aggregate(glob, updates)["q"]
    assert torch.equal(merged, torch.tensor([[1.0, 2.0], [7.0, 5.0], [3.0, 5.0], [9.0, 9.0]]))


def test_columns_of_an_output_projection_and_wider_slices() -> None:
    """Slices along axis 1 of width 2 (two heads of width 2 in a (1, 4) o_proj): columns average per head."""
    glob = {"o": torch.zeros(1, 4)}
    updates = [
        ClientUpdate(
            state={"o": torch.tensor([[1.0, 1.0, 7.0, 7.0]])}, num_samples=2, slices=_slices("o", 1, 2, 0)
        ),
        ClientUpdate(
            state={"o": torch.tensor([[3.0, 3.0, 2.0, 4.0]])}, num_samples=2, slices=_slices("o", 1, 2, 0, 1)
        ),
    ]
    merged = FedAvg().aggregate(glob, updates)["o"]
    assert torch.equal(merged, torch.tensor([[2.0, 2.0, 2.0, 4.0]]))


def test_whole_and_frozen_tensors_next_to_sliced_ones() -> None:
    """A copy that names no slices trained the tensor whole; an empty slice list means it trained none of it."""
    glob = {"w": torch.tensor([0.0, 0.0]), "norm": torch.tensor([5.0])}
    updates = [
        ClientUpdate(state={"w": torch.tensor([2.0, 2.0]), "norm": torch.tensor([1.0])}, num_samples=1),
        ClientUpdate(
            state={"w": torch.tensor([4.0, 8.0]), "norm": torch.tensor([100.0])},
            num_samples=1,
            slices={**_slices("w", 0, 1, 1), **_slices("norm", 0, 1)},
        ),
    ]
    merged = FedAvg().aggregate(glob, updates)
    assert torch.equal(merged["w"], torch.tensor([2.0, 5.0]))  # entry 0: the whole copy only; entry 1: both
    assert torch.equal(merged["norm"], torch.tensor([1.0]))  # only the first copy trained it


def test_a_slice_nobody_trained_does_not_move_under_a_server_optimizer() -> None:
    """FedAdam steps the trained slices and leaves the untrained ones exactly where they were."""
    glob = {"q": torch.tensor([[1.0], [2.0]])}
    update = ClientUpdate(
        state={"q": torch.tensor([[5.0], [-7.0]])}, num_samples=1, slices=_slices("q", 0, 1, 0)
    )
    merged = FedAdam(lr=0.1).aggregate(glob, [update])["q"]
    assert merged[0, 0] > 1.0 and merged[1, 0] == 2.0


@pytest.mark.parametrize(
    ("part", "match"),
    [
        (TrainedSlices(tensor="q", dim=2, width=1, blocks=(0,)), "do not fit"),
        (TrainedSlices(tensor="q", dim=0, width=3, blocks=(0,)), "do not fit"),
        (TrainedSlices(tensor="q", dim=0, width=1, blocks=(4,)), "out of range"),
        (TrainedSlices(tensor="k", dim=0, width=1, blocks=(0,)), "describe"),
    ],
)
def test_slices_that_do_not_fit_the_tensor_are_refused(part: TrainedSlices, match: str) -> None:
    """Slices from the network that name another axis, width, index or tensor are a clear ValueError."""
    update = ClientUpdate(state={"q": torch.ones(4, 2)}, num_samples=1, slices={"q": part})
    with pytest.raises(ValueError, match=match):
        FedAvg().aggregate({"q": torch.zeros(4, 2)}, [update])


def test_slices_of_an_unknown_tensor_are_refused() -> None:
    """Slices filed under a name the partition does not hold are refused."""
    update = ClientUpdate(state={"q": torch.ones(2)}, num_samples=1, slices=_slices("nope", 0, 1, 0))
    with pytest.raises(ValueError, match="not a tensor of the partition"):
        FedAvg().aggregate({"q": torch.zeros(2)}, [update])
