"""What a stage is: a ComponentSpec (inputs, config it depends on, executor) and the context it runs in."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple

from components.artifacts import Artifact


@dataclass
class StageContext:
    """Everything an executor may touch: its config, its input artifacts and its staging output dir."""

    config: Any  # configs.Config
    inputs: Mapping[str, Artifact]
    output_dir: Path
    log_scalar: Callable[[str, float, Optional[int]], None] = lambda name, value, step=None: None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("pipeline"))
    force: bool = False
    fingerprint: str = ""  # of this stage run (config sections + inputs), as recorded in artifact.json
    commit: bool = True  # False: the executor's output is discarded (a non-chief worker of a multi-worker job)


@dataclass(frozen=True)
class ComponentSpec:
    """A pipeline stage, TFX style.

    name:            the artifact directory it writes, `artifacts_dir/<name>/`
    inputs:          names of upstream stages whose artifacts it reads
    config_sections: config sections whose values change its output (part of the fingerprint)
    executor:        `Do(context) -> meta`; meta holds `figures` (key numbers) and anything else to record
    input_payload:   optional, config -> JSON-able description of outside inputs (e.g. source files)
    optional_inputs: upstream stages read when their artifact exists (e.g. export records evaluate's metrics)
    """

    name: str
    inputs: Tuple[str, ...]
    config_sections: Tuple[str, ...]
    executor: Callable[[StageContext], Mapping[str, Any]]
    input_payload: Optional[Callable[[Any], Any]] = None
    optional_inputs: Tuple[str, ...] = ()
