"""Run files for forward gradients: the [forward_gradient] section, per-owner methods, and what travels."""

from __future__ import annotations

import pytest

from autograd_bridge.methods import get_method
from proto.messages import Command
from proto.serde import command_from_proto, command_to_proto
from server.training.local_work import Work
from server.training.spec import prepare_command, spec_from_mapping, train_command


def test_a_mixed_run_gives_each_owner_its_method_and_the_settings_reach_it() -> None:
    """alice trains with forward gradients at the file's settings, everyone else with the run's method."""
    spec = spec_from_mapping({
        "training": {"method": "backprop", "methods": {"alice": "forward_gradient"}},
        "forward_gradient": {"h": 0.02, "perturbations": 3, "max_perturbations": 9, "var_threshold": 0.1,
                             "sampler": True, "candidates": 5},
    })  # fmt: skip
    alice, bob = prepare_command(spec, "run-a", "alice"), prepare_command(spec, "run-b", "bob")
    assert (alice.method, bob.method) == ("forward_gradient", "backprop")
    back = command_from_proto(command_to_proto(Command(command_id=1, body=alice))).body
    method = get_method(back.method, back.method_options)
    assert method.settings.h == 0.02 and method.settings.perturbations == 3 and method.settings.sampler  # type: ignore[attr-defined]
    assert get_method(bob.method, bob.method_options).name == "backprop"  # backprop ignores the options
    work = Work(steps=1, start=0)
    assert (
        train_command(spec, bridge_run="run-a", round=1, work=work, model="m", owner="alice").method
        == "forward_gradient"
    )
    assert (
        train_command(spec, bridge_run="run-b", round=1, work=work, model="m", owner="bob").method
        == "backprop"
    )


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"training": {"methods": {"alice": "zeroth_order"}}}, r"\[training.methods\] alice must be one of"),
        ({"forward_gradient": {"h": 0.0}}, r"\[forward_gradient\] h must be a positive number"),
        (
            {"forward_gradient": {"perturbations": 8, "max_perturbations": 4}},
            r"\[forward_gradient\] needs 1 <= perturbations",
        ),
        ({"forward_gradient": {"sampler": "yes"}}, r"\[forward_gradient\] sampler must be true or false"),
    ],
)
def test_bad_forward_gradient_settings_are_refused_by_name(values, says) -> None:
    """Each bad key is a ValueError naming its section and key."""
    with pytest.raises(ValueError, match=says):
        spec_from_mapping(values)


@pytest.mark.parametrize(
    "options", [{"h": "nan"}, {"perturbations": "two"}, {"sampler": "1"}, {"seed": "-3"}]
)
def test_a_holder_refuses_bad_method_options_from_the_network(options) -> None:
    """method_options arrive over the network: a bad one is a ValueError naming the setting."""
    with pytest.raises(ValueError, match="forward_gradient"):
        get_method("forward_gradient", options)
