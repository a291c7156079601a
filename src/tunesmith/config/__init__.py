"""The recipe schema, one pydantic model per section and one module per stage, and its loading.

Every section refuses unknown keys and is validated once, at the boundary; :mod:`.loading` reads the
YAML, applies ``--set`` overrides and reports every problem at once with its field path. The names
below are the package's interface: ``from tunesmith.config import Recipe, load_recipe``.
"""

from tunesmith.config.data import (
    BalanceStep,
    CharLengthStep,
    DataSection,
    DocumentsSection,
    ExactDedupStep,
    ExportSpec,
    HubSource,
    LanguageStep,
    NearDedupStep,
    NumericRangeStep,
    OrderSection,
    ProfileSection,
    RegexStep,
    SampleStep,
    ScrubStep,
    SemanticDedupStep,
    SplitFiles,
    SplitSection,
    Step,
    TokenLengthStep,
)
from tunesmith.config.eval import BandsSection, ContenderSpec, EndpointSpec, EvalSection, JudgeSpec
from tunesmith.config.loading import (
    arm_recipe,
    deep_merge,
    dump_resolved,
    load_recipe,
    parse_overrides,
    validate_recipe,
)
from tunesmith.config.recipe import ARM_DATA_KEYS, ArmSpec, ModelSection, Recipe
from tunesmith.config.section import Section
from tunesmith.config.synth import (
    EvolInstructTask,
    ParaphraseTask,
    PreferencePairsTask,
    ProviderSection,
    QAFromDocumentsTask,
    SamplingSection,
    SeedQuestionsTask,
    SynthSection,
)
from tunesmith.config.train import (
    HEAD_TASKS,
    UNMEASURED_LENGTH,
    DpoSection,
    HostedSection,
    LoraSection,
    TrainSection,
)

__all__ = [
    "ARM_DATA_KEYS", "HEAD_TASKS", "ArmSpec", "BalanceStep", "BandsSection", "CharLengthStep", "ContenderSpec",
    "DataSection", "DocumentsSection", "DpoSection", "EndpointSpec", "EvalSection", "EvolInstructTask",
    "ExactDedupStep", "ExportSpec", "HostedSection", "HubSource", "JudgeSpec", "LanguageStep", "LoraSection",
    "ModelSection", "NearDedupStep", "NumericRangeStep", "OrderSection", "ParaphraseTask", "PreferencePairsTask",
    "ProfileSection", "ProviderSection", "QAFromDocumentsTask", "Recipe", "RegexStep", "SampleStep",
    "SamplingSection", "ScrubStep", "Section", "SeedQuestionsTask", "SemanticDedupStep", "SplitFiles",
    "SplitSection", "Step", "SynthSection", "TokenLengthStep", "TrainSection", "UNMEASURED_LENGTH", "arm_recipe",
    "deep_merge",
    "dump_resolved", "load_recipe", "parse_overrides", "validate_recipe",
]
