"""Pipeline configuration: frozen dataclass sections (sections.py), composed into
`PipelineConfig`, with their modes (modes.py), loaded from YAML and `section.key=value`
overrides (loader.py); docs/configuration.md is generated from them (docs.py,
`python -m pipeline.config --markdown`)."""
from pipeline.config.docs import markdown
from pipeline.config.loader import (
                                    load_config,
                                    preset_text,
                                    presets,
                                    validate,
                                    validate_for_pipeline,
)
from pipeline.config.modes import (
                                    Baseline,
                                    Coarse,
                                    Kmeans,
                                    Loss,
                                    LRSchedule,
                                    Metric,
                                    NegativeSampler,
                                    Quantizer,
                                    Verify,
)
from pipeline.config.sections import (
                                    BuildConfig,
                                    DataConfig,
                                    EvalConfig,
                                    IndexConfig,
                                    InitConfig,
                                    LossConfig,
                                    NegativesConfig,
                                    PipelineConfig,
                                    PublishConfig,
                                    RayConfig,
                                    TeacherConfig,
                                    TrainConfig,
)

__all__ = ["markdown", "load_config", "preset_text", "presets", "validate",
           "validate_for_pipeline", "Baseline", "Coarse",
           "Kmeans", "LRSchedule", "Loss", "Metric", "NegativeSampler", "Quantizer", "Verify",
           "BuildConfig", "DataConfig", "EvalConfig", "IndexConfig", "InitConfig", "LossConfig",
           "NegativesConfig", "PipelineConfig", "PublishConfig", "RayConfig", "TeacherConfig",
           "TrainConfig"]
