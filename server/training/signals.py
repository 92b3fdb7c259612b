"""What a run watches for divergence (Photon): norms of the merged model and of each merge's update, per layer.

After every merge the server compares the new global tensors with the ones the turn started
from. Tensors are grouped by decoder block (the first number in a whole-model name, as
``model.layers.3.mlp.up_proj.weight``); tensors of no block (embeddings, final norm, head)
form the group ``other``. A spike in a block's update norm, or a model norm that keeps
growing, is the early sign Photon watches for; the owners' side of the same picture is the
training perplexity before and after each merge (:func:`server.training.reports.per_round`)
and the logits' norm per step (``output_norms`` in the history).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BLOCK = re.compile(r"\.(\d+)\.")


def _group(name: str) -> str:
    found = _BLOCK.search(name)
    return f"block {int(found.group(1))}" if found else "other"


def layer_norms(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per group: the L2 norm of the update (``after - before``) and of the model after it, and both in total.

    The update covers the tensors ``before`` holds (none before the server first has the
    global state: a first merge without a starting snapshot reports an empty update).
    """
    update_sq: dict[str, float] = {}
    model_sq: dict[str, float] = {}
    for name, new in after.items():
        group = _group(name)
        value = new.detach().double()
        model_sq[group] = model_sq.get(group, 0.0) + float(value.pow(2).sum())
        old = before.get(name)
        if old is not None and old.shape == new.shape:
            update_sq[group] = update_sq.get(group, 0.0) + float((value - old.detach().double()).pow(2).sum())
    order = sorted(model_sq, key=lambda g: (g == "other", int(g.split()[1]) if g != "other" else 0))
    update = {g: math.sqrt(update_sq[g]) for g in order if g in update_sq}
    return {
        "update": update | {"total": math.sqrt(sum(update_sq.values()))} if update else {},
        "model": {g: math.sqrt(model_sq[g]) for g in order} | {"total": math.sqrt(sum(model_sq.values()))},
    }
