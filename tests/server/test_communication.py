"""[communication]: codecs and densities per client, from the run file, an override, or the measured links."""

from __future__ import annotations

import pytest

from proto.messages import DeviceProfile
from server.training.communication import MIN_DENSITY, Communication
from server.training.spec import spec_from_mapping


def communication(**values: object) -> Communication:
    return Communication(spec_from_mapping({"communication": values}).communication)


def test_densities_come_from_the_run_file_and_per_client_overrides() -> None:
    """Each direction has its density; a client's own table wins for it alone."""
    c = communication(codec="topk", upload_density=0.25, download_density=0.5, clients={"slow": {"upload_density": 0.05}})
    assert c.sends_changes
    assert c.density("fast", "upload", 1000, None) == 0.25 and c.density("fast", "download", 1000, None) == 0.5
    assert c.density("slow", "upload", 1000, None) == 0.05 and c.density("slow", "download", 1000, None) == 0.5


def test_a_budget_makes_slow_uplinks_send_sparser_updates() -> None:
    """density = budget x measured rate / (entries x bytes per kept entry), capped by the run's and floored."""
    c = communication(codec="topk", upload_density=0.5, budget_s=1.0)
    slow = DeviceProfile(upload_bytes_per_s=8_000.0, download_bytes_per_s=80_000.0)
    # 1e5 entries, fp32 value + int32 index = 8 bytes each: 8,000 B/s for 1 s keeps 1,000 entries.
    assert c.density("a", "upload", 100_000, slow) == pytest.approx(0.01)
    assert c.density("a", "download", 100_000, slow) == pytest.approx(0.1)
    assert c.density("a", "upload", 100, slow) == 0.5  # fits easily: the run's density caps it
    assert c.density("a", "upload", 10**9, slow) == MIN_DENSITY  # never nothing
    assert c.density("a", "upload", 100_000, None) == 0.5  # no profile: the run's density


def test_a_dense_run_sends_values() -> None:
    """The default codec sends whole tensors, so holders upload values, not changes."""
    assert not communication().sends_changes


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"upload_density": 0.0}, r"upload_density must be a share of entries in \[0.0001, 1\]"),
        ({"download_density": 1.5}, "download_density"),
        ({"values": "int4"}, "values must be fp32, fp16 or bf16"),
        ({"scope": "layer"}, "scope must be"),
        ({"budget_s": -1.0}, "budget_s"),
        ({"error_feedback": "yes"}, "error_feedback must be true or false"),
        ({"clients": {"a": {"upload_density": 2.0}}}, r"\[communication.clients.a\] upload_density"),
        ({"clients": {"a": {"speed": 1.0}}}, "takes upload_density and download_density only"),
    ],
)
def test_bad_communication_settings_are_refused(values: dict[str, object], message: str) -> None:
    """Each bad value names its key and the range it must be in."""
    with pytest.raises(ValueError, match=message):
        communication(**values)
