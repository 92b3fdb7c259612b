"""How partition tensors travel between the server and a run's holders: codecs and densities per client.

A run's ``[communication]`` section names the codec (``autograd_bridge.codecs``) and, for a
sparse one, the share of entries kept on each direction:

* download: the server encodes what a pipeline loads with the top ``download_density`` of
  each global tensor by magnitude (FLoSS: a client starts from ``P * mask``; the mask is
  recomputed every round, and the entries outside it are zero, not stale);
* upload: a holder encodes its change since it last loaded, keeping ``upload_density``;
  the server reads the change and adds the weighted mean to its global tensors (with a
  server optimizer: the mean change is the pseudo-gradient).

Densities can differ per client (``[communication.clients.NAME]``), and with a per-round
communication budget (``budget_s``) they follow each client's measured links: a client whose
sparse upload of its partitions would take longer than the budget at its measured upload rate
sends a sparser one (FLoSS: the upload density should shrink with the upload/download ratio).
The bytes the server counts are the encoded bytes, which are what crosses the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from autograd_bridge.codecs import CodecSettings as CodecChoice
from autograd_bridge.codecs import UpdateCodec, get_codec
from proto.messages import DeviceProfile

if TYPE_CHECKING:
    from server.training.spec import CommunicationSection

__all__ = ["MIN_DENSITY", "Communication", "elements_of"]

MIN_DENSITY = 1e-3  # an automatic density never goes below this: a client always sends something
_INDEX_BYTES = 4  # what each kept entry costs beside its value, roughly (int32 index)
_VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True, slots=True)
class Communication:
    """The run's codec and each client's densities."""

    settings: CommunicationSection

    @property
    def sends_changes(self) -> bool:
        """Whether holders upload their change since they loaded (a sparse codec) rather than their values."""
        return bool(get_codec(self.settings.codec).sends_changes)

    def density(self, client_id: str, direction: str, elements: int, profile: DeviceProfile | None) -> float:
        """The share of entries ``client_id`` gets ("download") or sends ("upload") for ``elements`` trained entries."""
        s = self.settings
        configured = float(s.clients.get(client_id, {}).get(f"{direction}_density", getattr(s, f"{direction}_density")))
        if s.budget_s <= 0 or profile is None or elements <= 0:
            return configured
        rate = profile.upload_bytes_per_s if direction == "upload" else profile.download_bytes_per_s
        if rate <= 0:
            return configured
        per_entry = _VALUE_BYTES[s.values] + _INDEX_BYTES
        return max(MIN_DENSITY, min(configured, s.budget_s * rate / (elements * per_entry)))

    def download_codec(self, client_id: str, elements: int, profile: DeviceProfile | None) -> UpdateCodec:
        """The codec the server encodes ``client_id``'s LoadPartitions with."""
        s = self.settings
        choice = CodecChoice(density=self.density(client_id, "download", elements, profile), values=s.values, scope=s.scope)
        return get_codec(s.codec, choice)


def elements_of(tensors: Mapping[str, Tensor]) -> int:
    """How many entries ``tensors`` hold together."""
    return sum(int(t.numel()) for t in tensors.values())
