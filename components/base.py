"""What a stage is: a ComponentSpec (what it reads and writes, the config it depends on, its executor and
set-up hook) and the context it runs in."""
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
    # {name: artifacts_dir/name} of the side caches the stage's spec declares (see ComponentSpec.side_caches)
    side_caches: Mapping[str, Path] = field(default_factory=dict)

    def side_cache(self, name: str) -> Path:
        """The directory of a declared side cache; a stage writes nothing outside `output_dir` undeclared."""
        if name not in self.side_caches:
            raise KeyError(f"side cache '{name}' is not declared in the stage's ComponentSpec.side_caches")
        return self.side_caches[name]


@dataclass(frozen=True)
class ComponentSpec:
    """A pipeline stage, TFX style.

    name:            the artifact directory it writes, `artifacts_dir/<name>/`
    inputs:          names of upstream stages whose artifacts it reads
    config_sections: config sections whose values change its output (part of the fingerprint)
    executor:        `Do(context) -> meta`; meta holds `figures` (key numbers) and anything else to record
    input_payload:   optional, config -> JSON-able description of outside inputs (e.g. source files)
    optional_inputs: upstream stages read when their artifact exists (e.g. export records evaluate's metrics)
    outputs:         files (relative to `<name>/`) every run writes; checked before the artifact is committed
    side_caches:     directories under `artifacts_dir` the stage writes outside `<name>/`, outside any
                     fingerprinted artifact (e.g. `.train-work`: train's resume state); the executor reaches
                     them through `context.side_cache(name)`
    setup:           optional, config -> None, run by the driver before any stage of the run starts (and
                     before TensorFlow initialises), e.g. train's logical CPU devices
    stage:           the `--stage` name when it is not `name` (`import` writes the train artifact)
    check_inputs:    optional, config -> None, raises a one-line StageError when the outside inputs are unusable
                     (e.g. `data.root` missing); the driver calls it before any lock, folder or Sacred run
    """

    name: str
    inputs: Tuple[str, ...]
    config_sections: Tuple[str, ...]
    executor: Callable[[StageContext], Mapping[str, Any]]
    input_payload: Optional[Callable[[Any], Any]] = None
    optional_inputs: Tuple[str, ...] = ()
    outputs: Tuple[str, ...] = ()
    side_caches: Tuple[str, ...] = ()
    setup: Optional[Callable[[Any], None]] = None
    check_inputs: Optional[Callable[[Any], None]] = None
    stage: Optional[str] = None

    @property
    def command(self) -> str:
        """The `--stage` name that runs this spec."""
        return self.stage or self.name
