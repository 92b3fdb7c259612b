"""Where the server meets the model and the planner.

* :class:`HFModelSource` is the configured model: its config, its profile, and one
  partition's weights at a time, read from the model's safetensors files (a model that has
  none, such as a ``.gguf`` file, is converted once into ``work_dir``).
* :func:`planner_for` wraps :mod:`server.planning.planner` as the coordinator's plan function:
  registry records in, :class:`~server.control.state.PlanRow` rows out, the planner's
  ``PlanningError`` turned into the server's.

Both import torch and transformers, so only ``titanic-server run`` with a model loads them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.config import ModelSettings, PlanningSettings
from server.control.state import ClientRecord, PlanRow
from server.errors import PlanningError
from server.planning.coordinator import PlanFunction, PlanOutcome

log = logging.getLogger(__name__)


class HFModelSource:
    """A Hugging Face causal LM on disk, read one partition at a time."""

    def __init__(self, settings: ModelSettings, *, work_dir: Path) -> None:
        self.settings = settings
        self.work_dir = Path(work_dir)
        self._lock = threading.RLock()  # the planner's thread and the warm-up may ask at once
        self._dir: Path | None = None
        self._config: Any = None
        self._profile: Any = None

    def check(self) -> None:
        """Refuse (ValueError) a model path that names a local file or folder that is not there.

        Cheap, so the server can say so before it listens; a hub name (``org/name``) is left
        to the loader, whose failure stops the server too.
        """
        path = self.settings.path
        looks_local = Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") >= 2
        if looks_local and not Path(path).expanduser().exists():
            raise ValueError(f"the model {path} does not exist; pass --model a model folder (or a .gguf file)")

    def model_dir(self) -> Path:
        """A directory with the model's config.json and safetensors files."""
        with self._lock:
            if self._dir is None:
                self._dir = self._locate()
            return self._dir

    def _locate(self) -> Path:
        given = Path(self.settings.path)
        if self.settings.init == "random":
            return self._initialize(given)
        if given.is_dir() and any(given.glob("*.safetensors")):
            return given
        from autograd_bridge.models import load_causal_lm, save_pretrained_dir

        converted = self.work_dir / "converted"
        if not any(converted.glob("*.safetensors")):
            log.info("converting %s to safetensors in %s (once)", self.settings.path, converted)
            save_pretrained_dir(load_causal_lm(self.settings.path), None, converted)
        return converted

    def _initialize(self, given: Path) -> Path:
        """A model drawn at random from ``given``'s config with the init seed, written once (pre-training from scratch)."""
        import hashlib

        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from autograd_bridge.models import save_pretrained_dir

        config = AutoConfig.from_pretrained(given)
        digest = hashlib.sha256(config.to_json_string().encode()).hexdigest()[:12]
        folder = self.work_dir / f"random-{digest}-seed{self.settings.init_seed}"
        if not any(folder.glob("*.safetensors")):
            log.info("drawing %s weights from seed %d into %s (once)", config.model_type, self.settings.init_seed, folder)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.settings.init_seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            save_pretrained_dir(model, None, folder)
        return folder

    def config(self) -> Any:
        """The model's transformers config."""
        with self._lock:
            if self._config is None:
                from transformers import AutoConfig

                self._config = AutoConfig.from_pretrained(self.model_dir())
            return self._config

    def config_json(self) -> str:
        """The config as clients rebuild it (config.json's contents)."""
        return str(self.config().to_json_string())

    def profile(self, seq_len: int) -> Any:
        """The model's per-piece costs (``autograd_bridge.profile.ModelProfile``)."""
        with self._lock:
            if self._profile is None or self._profile.seq_len != seq_len:
                from autograd_bridge.profile import profile_model

                self._profile = profile_model(self.config(), seq_len=seq_len, name=self.settings.path)
            return self._profile

    def prepare(self, seq_len: int) -> None:
        """Convert (a ``.gguf``), read the config and profile now, so the first plan need not wait (blocking)."""
        self.profile(seq_len)

    def write_stage(self, *, index: int, num_stages: int, layer_start: int, layer_end: int, path: Path) -> None:
        """Write one partition's weights (and only its tensors are read) to ``path``."""
        from autograd_bridge.partition import StageSpec, load_stage, save_stage_weights

        spec = StageSpec(index=index, num_stages=num_stages, layer_start=layer_start, layer_end=layer_end)
        save_stage_weights(load_stage(self.config(), spec, self.model_dir()), path)


def hf_model_source(settings: ModelSettings, *, work_dir: Path) -> HFModelSource:
    """The model named in the config."""
    return HFModelSource(settings, work_dir=work_dir)


def client_profile(record: ClientRecord) -> Any:
    """A registry record as the planner's ``ClientProfile``."""
    from server.planning.planner.types import ClientProfile

    p = record.profile
    declared = {"memory_bytes" if d == "gpu_memory_bytes" else d for d in p.declared}
    return ClientProfile(
        client_id=record.client_id,
        flops_per_s=p.flops_per_s,
        memory_bytes=p.training_memory_bytes,
        upload_bytes_per_s=p.upload_bytes_per_s,
        download_bytes_per_s=p.download_bytes_per_s,
        rtt_s=p.rtt_s,
        capacity=p.capacity,
        declared=frozenset(declared & {"flops_per_s", "memory_bytes", "upload_bytes_per_s", "download_bytes_per_s", "rtt_s", "capacity"}),
    )


def planner_settings(model: ModelSettings, settings: PlanningSettings) -> Any:
    """The planner's settings from the server's."""
    from server.planning.planner.types import PlannerSettings

    return PlannerSettings(
        transfer_weight=settings.transfer_weight,
        compute_weight=settings.compute_weight,
        batch_tokens=settings.batch_tokens,
        micro_batches=settings.micro_batches,
        forward_passes=settings.forward_passes,
        steps_per_round=settings.steps_per_round,
        num_stages=model.stages,
        max_step_time_s=settings.max_step_time_s,
        solver=settings.solver,  # type: ignore[arg-type]
    )


def rows_of(plan: Any) -> tuple[PlanRow, ...]:
    """The planner's ``PartitionPlan`` as the server's plan rows."""
    return tuple(
        PlanRow(
            pipeline=a.pipeline,
            owner_id=a.owner_id,
            run_id="",
            partition=a.stage,
            layer_start=a.layer_start,
            layer_end=a.layer_end,
            params=a.num_params,
            client_id=a.client_id,
            est_compute_s=a.compute_s,
            est_transfer_s=a.transfer_s,
            why=a.why,
            pinned=a.pinned,
        )
        for a in plan.assignments
    )


def summary_of(plan: Any) -> dict[str, Any]:
    """Facts about the solve for the admin API.

    ``num_stages`` and ``block_counts`` are the widest cut; ``stages`` gives each owner's
    pipeline its own count (1: that owner trains the whole model alone).
    """
    return {
        "solver": plan.solver,
        "integral": plan.integral,
        "objective": round(plan.objective, 6),
        "bottleneck_s": round(plan.bottleneck_s, 6),
        "solve_ms": round(plan.solve_ms, 3),
        "num_stages": plan.num_stages,
        "block_counts": list(plan.block_counts),
        "stages": {cut.owner_id: cut.num_stages for cut in plan.cuts},
    }


def planner_for(model: HFModelSource, model_settings: ModelSettings, settings: PlanningSettings) -> PlanFunction:
    """The coordinator's plan function for ``model``."""
    from server.planning.planner import PlanningError as PlannerError
    from server.planning.planner import plan as make_plan
    from server.planning.planner.paths import estimate_paths, pipeline_loads

    def plan(clients: Sequence[ClientRecord], owners: Sequence[str]) -> PlanOutcome:
        if not owners:
            raise PlanningError(
                "no data owner among the ready clients: start at least one client with --data PATH "
                "(the owner keeps the first and last stage, or the whole model, so its data never leaves it)"
            )
        profile = model.profile(settings.seq_len)
        try:
            profiles = [client_profile(c) for c in clients]
        except ValueError as exc:
            raise PlanningError(f"a client's profile cannot be planned with: {exc}") from exc
        chosen = planner_settings(model_settings, settings)
        try:
            result = make_plan(profile, profiles, owners=list(owners), settings=chosen)
        except PlannerError as exc:
            raise PlanningError(str(exc)) from exc
        loads = pipeline_loads(profile, result, profiles, batch_tokens=chosen.batch_tokens)
        # Per owner, its pipeline's estimated seconds per step on each data path ([training] path of a run).
        est = estimate_paths(loads, chosen.micro_batches)
        return PlanOutcome(rows=rows_of(result), summary={**summary_of(result), "est_step_s": est})

    return plan
