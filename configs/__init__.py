from configs.config import (  # noqa: F401
    Config, DataConfig, EvaluateConfig, ExportConfig, ModelConfig, TrainConfig, defaults,
)
from configs.presets import PRESETS  # noqa: F401
