"""The typed configuration schema and its loading: the single source of truth.

`conf/` (Hydra) is composed into `params.yaml`; every stage reads `params.yaml` and
validates it against `PipelineConfig`. Unknown keys, wrong types, bad enum values and
dangling references fail here, before any work, naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, get_type_hints

from pipeline.errors import ConfigError, InputError, first_line
from pipeline.io import sha256_path, write_text
from pipeline.layout import AUTO_VARIANT, EXAMPLES, LABELS, MODEL_PARAMS, PARAMS_FILE, RECIPES, model_params

CONF_DIR = "conf"
CONFIG_NAME = "config"


class SourceFormat(Enum):
    saved_model = "saved_model"
    keras = "keras"
    h5 = "h5"
    concrete_function = "concrete_function"
    jax = "jax"


class OpsSet(Enum):
    builtins = "builtins"
    select_tf_ops = "select_tf_ops"


class Backend(Enum):
    none = "none"  # the float model as converted
    litert_quantizer = "litert_quantizer"
    converter = "converter"


class ConverterMode(Enum):
    dynamic = "dynamic"
    float16 = "float16"
    int8 = "int8"
    int16x8 = "int16x8"


class IoType(Enum):
    float32 = "float32"
    int8 = "int8"
    uint8 = "uint8"
    int16 = "int16"


class DatasetType(Enum):
    npz = "npz"
    images = "images"


class Distribution(Enum):
    uniform = "uniform"
    normal = "normal"


class TensorDtype(Enum):
    """Element types of generated inputs (every input type a LiteRT model takes)."""

    float32 = "float32"
    int32 = "int32"
    int64 = "int64"
    int8 = "int8"
    uint8 = "uint8"
    bool = "bool"


class TensorContent(Enum):
    feature = "feature"
    image = "image"


class ColorSpace(Enum):
    UNKNOWN = "UNKNOWN"
    RGB = "RGB"
    GRAYSCALE = "GRAYSCALE"


class RuntimeKind(Enum):
    litert = "litert"  # any builtin op and select TF ops (Flex)
    builtin_only = "builtin_only"  # no Flex, no custom ops
    play_services = "play_services"  # LiteRT in Google Play services: builtins only
    gpu = "gpu"  # every op must be supported by the GPU delegate


class ParallelEngine(Enum):
    local = "local"  # `-j N` worker processes on this machine
    ray = "ray"  # `-j N` workers as Ray tasks: a local Ray instance, or the cluster at ray_address


LITERT_RECIPES = (
    "dynamic_wi8_afp32",
    "weight_only_wi8_afp32",
    "weight_only_wi4_afp32",
    "static_wi8_ai8",
    "static_wi8_ai16",
)


@dataclass
class SourceConfig:
    format: SourceFormat = SourceFormat.saved_model
    # A SavedModel folder, a .keras/.h5 file, or the file a factory loads its weights from.
    path: str = "???"
    # `module:function` returning concrete functions (format concrete_function only).
    factory: Optional[str] = None
    factory_args: Dict[str, Any] = field(default_factory=dict)
    signature_key: str = "serving_default"
    # Allow Keras to deserialize arbitrary code (Lambda layers); off by default.
    trusted: bool = False


@dataclass
class ConverterOptions:
    """TFLiteConverter attributes, by their own names (an allow-list: other keys are unknown).
    None keeps TensorFlow's default."""

    # Keras LSTM/GRU/SimpleRNN without `unroll` need select TF ops unless this is true
    # (then the batch size must be 1 at run time): measured with TensorFlow 2.21.
    _experimental_default_to_single_batch_in_tensor_list_ops: Optional[bool] = None
    _experimental_lower_tensor_list_ops: Optional[bool] = None
    _experimental_enable_dynamic_update_slice: Optional[bool] = None
    _experimental_unfold_large_splat_constant: Optional[bool] = None
    experimental_enable_resource_variables: Optional[bool] = None
    legalize_custom_tensor_list_ops: Optional[bool] = None
    unfold_batchmatmul: Optional[bool] = None
    # Conversion metadata embeds environment details that break byte-identical rebuilds.
    exclude_conversion_metadata: bool = True


@dataclass
class ConversionConfig:
    ops: List[OpsSet] = field(default_factory=lambda: [OpsSet.builtins])
    allow_custom_ops: bool = False
    # Signature keys to convert; empty means the source's `signature_key`.
    signatures: List[str] = field(default_factory=list)
    converter_options: ConverterOptions = field(default_factory=ConverterOptions)


@dataclass
class DataRef:
    """`num_samples` drawn (seeded) from a `dataset` or `generator` entry, by name."""

    dataset: str = "???"
    num_samples: int = 100
    seed: int = 0
    # evaluation only: evaluate on the samples calibration may use too (same dataset or file).
    # Refused by default: a model evaluated on its calibration data looks better than it is.
    allow_overlap: bool = False


@dataclass
class TensorMetadataConfig:
    name: str = "???"
    description: str = ""
    content: TensorContent = TensorContent.feature
    color_space: ColorSpace = ColorSpace.UNKNOWN
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)
    min: List[float] = field(default_factory=list)
    max: List[float] = field(default_factory=list)
    # A text file with one label per line, packed into the model (outputs only).
    labels: Optional[str] = None


@dataclass
class MetadataConfig:
    description: str = ""
    author: str = ""
    license: str = ""
    version: str = "1"
    inputs: List[TensorMetadataConfig] = field(default_factory=list)
    outputs: List[TensorMetadataConfig] = field(default_factory=list)


@dataclass
class ModelConfig:
    team: str = "???"
    source: SourceConfig = field(default_factory=SourceConfig)
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    representative: DataRef = field(default_factory=DataRef)
    evaluation: DataRef = field(default_factory=DataRef)
    runtime: str = "litert"
    validation: str = "default"
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    # Registered model name; empty means `<team>.<model>`.
    registry_name: str = ""


@dataclass
class QuantizationConfig:
    backend: Backend = Backend.none
    # litert_quantizer: a recipe name from LITERT_RECIPES or a path to a JSON recipe.
    recipe: Optional[str] = None
    # converter: the post-training mode, and the I/O types of integer models.
    mode: Optional[ConverterMode] = None
    inference_input_type: IoType = IoType.float32
    inference_output_type: IoType = IoType.float32
    # Overrides the model's representative.num_samples for this variant.
    num_samples: Optional[int] = None


@dataclass
class DatasetConfig:
    """Samples from files: an `.npz` file, or a folder of images.

    npz: `inputs` maps each model input (signature name) to an array of the file and `labels`
    each labelled output to its labels (integers: class indices, or 0/1 per unit of a one-unit or
    multi-label output; floats: regression targets). A
    one-input model may use `inputs_key` (and `labels_key` for its only output) instead.
    images: the files feed the model's only input; with `labels_key` set (any name, e.g.
    `classes`), class sub-folders in sorted order label its only output.
    """

    type: DatasetType = DatasetType.npz
    path: str = "???"
    inputs: Dict[str, str] = field(default_factory=dict)
    inputs_key: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)
    labels_key: Optional[str] = None
    # images: resize target (height, width) and value scaling.
    image_size: List[int] = field(default_factory=list)
    scale: float = 1.0 / 255.0

    @property
    def labelled(self) -> bool:
        return bool(self.labels) or self.labels_key is not None


@dataclass
class TensorGeneratorConfig:
    """Seeded values of one input: floats from `distribution`; integers uniform in [low, high);
    bools fair coin flips."""

    shape: List[int] = field(default_factory=list)
    dtype: TensorDtype = TensorDtype.float32
    distribution: Distribution = Distribution.uniform
    low: float = 0.0
    high: float = 1.0


@dataclass
class GeneratorConfig(TensorGeneratorConfig):
    """Seeded synthetic samples (no files, no downloads), never labelled. The fields above
    describe a one-input model's input; `inputs` names each input of a model with several."""

    inputs: Dict[str, TensorGeneratorConfig] = field(default_factory=dict)
    size: int = 100
    seed: int = 0

    @property
    def labelled(self) -> bool:
        return False


@dataclass
class RuntimeConfig:
    kind: RuntimeKind = RuntimeKind.litert
    num_threads: int = 2
    # Highest op-version runtime the deployment has, e.g. "2.13.0"; empty means any.
    min_runtime_version: str = ""


@dataclass
class ValidationConfig:
    """Gates; None disables a gate. A build may override any of them."""

    max_accuracy_drop: Optional[float] = None
    min_cosine: Optional[float] = None
    min_snr_db: Optional[float] = None
    max_size_ratio: Optional[float] = None
    max_latency_ms: Optional[float] = None
    latency_runs: int = 50
    warmup_runs: int = 5
    # A user task metric, `module:function(outputs, labels) -> float` (higher is better),
    # computed for the source and the model; the gate bounds its drop.
    task_metric: Optional[str] = None
    max_task_metric_drop: Optional[float] = None
    # Whether the task metric reads labels (then the evaluation dataset must have them).
    task_metric_uses_labels: bool = True
    # Models with select TF ops cannot run on this host (no Flex delegate): their execution
    # metrics are unverifiable. true delivers such a build, tagged unverified, never aliased.
    accept_unverified: bool = False

    @property
    def needs_labels(self) -> bool:
        return self.max_accuracy_drop is not None or bool(self.task_metric and self.task_metric_uses_labels)


@dataclass
class BuildConfig:
    model: str = "???"
    variant: str = "???"
    validation: Dict[str, Any] = field(default_factory=dict)



@dataclass
class AutoSelectConfig:
    """`autoselect.<model>`: pick the smallest model within a budget (the budget gates
    override the model's own gate set, so the pick also passes its validation)."""

    max_accuracy_drop: Optional[float] = 0.005
    max_task_metric_drop: Optional[float] = None  # with the model's validation.task_metric
    min_snr_db: Optional[float] = None
    max_size_ratio: Optional[float] = None
    max_latency_ms: Optional[float] = None  # latency varies between runs: the pick may too
    # Variants to try, by name; empty: every variant in `quantization` (both backends).
    candidates: List[str] = field(default_factory=list)
    # Calibration algorithms tried on every static LiteRT Quantizer candidate (replacing its
    # recipe's), each a candidate of its own; `min_max_uniform_quantize` is the recipes' own.
    algorithms: List[str] = field(default_factory=lambda: list(AUTOSELECT_ALGORITHMS))
    # A static LiteRT Quantizer candidate that misses the budget is retried up to `max_steps`
    # times, each time keeping `layers_per_step` more of its most sensitive layers in float.
    max_steps: int = 3
    layers_per_step: int = 1
    # Sensitivity: the budget metric's drop and the output SNR with one layer alone quantized,
    # measured on the first `sensitivity_samples` evaluation samples for at most
    # `sensitivity_layers` layers (those with the lowest SNR in the full model first).
    sensitivity_samples: int = 100
    sensitivity_layers: int = 32


@dataclass
class TrackingConfig:
    # Empty: $MLFLOW_TRACKING_URI, else the embedded store sqlite:///mlflow.db.
    uri: str = ""
    experiment: str = "litert-pipeline"
    enabled: bool = True
    # false: when MLflow is unreachable, warn, queue what was not logged under .litert/pending/
    # and upload it with `litert-pipeline sync` (or at the start of the next run).
    required: bool = True
    # Per HTTP request: retries with exponential backoff (0, 2, 4... s) and a timeout, so an
    # unreachable server fails within about a minute. MLFLOW_HTTP_REQUEST_* variables win.
    http_retries: int = 3
    http_timeout_seconds: int = 10


@dataclass
class NightlyConfig:
    """`litert-pipeline nightly`: how much worse than its production version a variant may get."""

    # Validation metric -> largest allowed worsening in the metric's own unit (a fall for
    # accuracy, cosine, snr_db, task_metric; a rise for size_ratio, size_bytes, latency_*_ms,
    # max_abs_error, *_drop). Metrics not listed are reported but not compared.
    tolerance: Dict[str, float] = field(default_factory=dict)
    # The summary is written to <summary>.md and <summary>.json.
    summary: str = "nightly/summary"


@dataclass
class ParallelConfig:
    """Where `run -j N` and `nightly -j N` run their workers (conf/parallel/)."""

    engine: ParallelEngine = ParallelEngine.local
    # Ray only. Empty: start a local Ray instance with N CPUs; `auto`: the cluster this machine
    # belongs to; `ray://<head>:10001`: Ray Client. Every node must see the project at the same path.
    ray_address: str = ""


@dataclass
class PipelineConfig:
    model: Dict[str, ModelConfig] = field(default_factory=dict)
    build: Dict[str, BuildConfig] = field(default_factory=dict)
    quantization: Dict[str, QuantizationConfig] = field(default_factory=dict)
    dataset: Dict[str, DatasetConfig] = field(default_factory=dict)
    generator: Dict[str, GeneratorConfig] = field(default_factory=dict)
    runtime: Dict[str, RuntimeConfig] = field(default_factory=dict)
    validation: Dict[str, ValidationConfig] = field(default_factory=dict)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Model name -> auto-selection budget (declared in the model's conf file).
    autoselect: Dict[str, AutoSelectConfig] = field(default_factory=dict)
    # Bundled example models built by the `prepare` stage.
    examples: List[str] = field(default_factory=list)

    def gates(self, build: str) -> ValidationConfig:
        """The build's gate set: its model's, with the build's overrides applied."""
        entry = self.build[build]
        base = self.validation[self.model[entry.model].validation]
        return merge_gates(base, entry.validation, key=f"build.{build}.validation")


FLOAT32_MAX = 3.4028234663852886e38
SEED_MAX = 2**32 - 1
SAMPLES_MAX = 10_000_000
# The range (inclusive) of every number in the schema, by dataclass and field; NaN and
# infinity are refused everywhere. Checks that relate two numbers (high > low, std != 0,
# a generator's integer range) live with their dataclass's checks below.
RANGES: dict[tuple[type, str], tuple[float, float]] = {
    (DataRef, "num_samples"): (1, SAMPLES_MAX),
    (DataRef, "seed"): (0, SEED_MAX),
    (QuantizationConfig, "num_samples"): (1, SAMPLES_MAX),
    (DatasetConfig, "scale"): (1e-12, 1e12),
    (TensorGeneratorConfig, "low"): (-FLOAT32_MAX, FLOAT32_MAX),
    (TensorGeneratorConfig, "high"): (-FLOAT32_MAX, FLOAT32_MAX),
    (GeneratorConfig, "size"): (1, 1_000_000),
    (GeneratorConfig, "seed"): (0, SEED_MAX),
    (TensorMetadataConfig, "mean"): (-1e6, 1e6),
    (TensorMetadataConfig, "std"): (-1e6, 1e6),
    (TensorMetadataConfig, "min"): (-FLOAT32_MAX, FLOAT32_MAX),
    (TensorMetadataConfig, "max"): (-FLOAT32_MAX, FLOAT32_MAX),
    (RuntimeConfig, "num_threads"): (1, 64),
    (ValidationConfig, "max_accuracy_drop"): (0, 1),
    (ValidationConfig, "min_cosine"): (-1, 1),
    (ValidationConfig, "min_snr_db"): (-1000, 1000),
    (ValidationConfig, "max_size_ratio"): (0, 1000),
    (ValidationConfig, "max_latency_ms"): (0, 3_600_000),
    (ValidationConfig, "latency_runs"): (1, 10_000),
    (ValidationConfig, "warmup_runs"): (0, 1_000),
    (ValidationConfig, "max_task_metric_drop"): (0, 1e6),
    (AutoSelectConfig, "max_accuracy_drop"): (0, 1),
    (AutoSelectConfig, "max_task_metric_drop"): (0, 1e6),
    (AutoSelectConfig, "min_snr_db"): (-1000, 1000),
    (AutoSelectConfig, "sensitivity_samples"): (1, SAMPLES_MAX),
    (AutoSelectConfig, "sensitivity_layers"): (0, 10_000),
    (AutoSelectConfig, "max_size_ratio"): (0, 1000),
    (AutoSelectConfig, "max_latency_ms"): (0, 3_600_000),
    (AutoSelectConfig, "max_steps"): (0, 100),
    (AutoSelectConfig, "layers_per_step"): (1, 1000),
    (TrackingConfig, "http_retries"): (0, 10),
    (TrackingConfig, "http_timeout_seconds"): (1, 600),
    (NightlyConfig, "tolerance"): (0, 1e6),
}


def check_numbers(node: Any, key: str, file: str) -> None:
    """Every number under `node` (a config dataclass) is finite and within RANGES, else a
    ConfigError naming its key."""
    if isinstance(node, dict):
        for name, value in node.items():
            check_numbers(value, f"{key}.{name}", file)
        return
    if isinstance(node, list):
        for index, value in enumerate(node):
            check_numbers(value, f"{key}[{index}]", file)
        return
    if not hasattr(node, "__dataclass_fields__"):
        return
    for name in node.__dataclass_fields__:
        value, where = getattr(node, name), f"{key}.{name}" if key else name
        bounds = next((RANGES[(kind, name)] for kind in type(node).__mro__ if (kind, name) in RANGES), None)
        if bounds is None:
            check_numbers(value, where, file)
            continue
        values = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
        for item, number in values:
            item_key = where if item is None else f"{where}.{item}" if isinstance(value, dict) else f"{where}[{item}]"
            if number is None:
                continue
            if isinstance(number, float) and not math.isfinite(number):  # (an int of 400 digits is no float)
                raise ConfigError(f"must be a finite number, not {number}", file=file, key=item_key)
            _within(number, *bounds, file, item_key)


def merge_gates(base: ValidationConfig, overrides: Dict[str, Any], *, key: str, file: str = PARAMS_FILE) -> ValidationConfig:
    """`base` with `overrides` (a build's `validation` entries) applied, type-checked."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not overrides:
        return base
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), overrides))
    except OmegaConfBaseException as exc:
        sub_key, message = _one_line_omegaconf_error(exc)
        raise ConfigError(message, file=file, key=f"{key}.{sub_key}" if sub_key else key) from None


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (for `@hydra.main` entry points)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


# --- loading --------------------------------------------------------------------------

_KEY_IN_MESSAGE = re.compile(r"full_key: (\S+)")


def _one_line_omegaconf_error(exc: Exception) -> tuple[str, str]:
    """(full key, message) from an OmegaConf error's multi-line text."""
    text = str(exc)
    key = getattr(exc, "full_key", None) or (_KEY_IN_MESSAGE.search(text) or [None, ""])[1]
    message = text.splitlines()[0] if text else type(exc).__name__
    if type(exc).__name__ == "ConfigKeyError" and "not in" in message:
        message = f"unknown key ({message})"
    return str(key), message


def validate(raw: Any, *, file: str) -> PipelineConfig:
    """Validate a plain dict/DictConfig against the schema; return the typed config."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    container = OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw
    _reject_instantiation_keys(container, file)
    _reject_unknown_keys(container, PipelineConfig, file)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), raw)
        cfg: PipelineConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key, message = _one_line_omegaconf_error(exc)
        raise ConfigError(message, file=file, key=key) from None
    _check_references(cfg, file)
    return cfg


# Hydra's instantiation keys. Configs here are data: nothing ever builds objects from them,
# and these keys are refused everywhere, even inside free-form dicts such as factory_args.
INSTANTIATION_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


def _reject_instantiation_keys(node: Any, file: str, prefix: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in INSTANTIATION_KEYS:
                raise ConfigError("unknown key (configs never name classes to instantiate)", file=file,
                                  key=f"{prefix}{key}")
            _reject_instantiation_keys(value, file, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _reject_instantiation_keys(value, file, f"{prefix.rstrip('.')}[{index}].")


# Validation metrics, and whether a larger value is better (nightly tolerances, registry tags).
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "cosine": True,
    "snr_db": True,
    "task_metric": True,  # the gate set's own metric (pipeline.task_metrics: higher is better)
    "accuracy_drop": False,
    "task_metric_drop": False,
    "max_abs_error": False,
    "size_bytes": False,
    "size_ratio": False,
    "latency_median_ms": False,
    "latency_p90_ms": False,
}

# Names that reach file paths (models, variants, datasets, builds): no separators, no dots;
# starting and ending with a letter or digit, as DVC artifact names (`<model>-<variant>`) must.
NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_]*[A-Za-z0-9])?")
NAME_RULE = "names use A-Z, a-z, 0-9 and _ only, and start and end with a letter or digit"
REGISTRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
TEAM_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?")
# Tensor names as LiteRT signatures spell them.
TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
INTEGER_RANGES = {TensorDtype.int32: (-2**31, 2**31 - 1), TensorDtype.int64: (-2**63, 2**63 - 1),
                  TensorDtype.int8: (-128, 127), TensorDtype.uint8: (0, 255)}
# Generated datasets live in memory: bound what a config can ask for (values across all inputs).
MAX_GENERATED_VALUES = 1 << 27
MAX_DIMENSION = 1 << 20
# Metadata normalization and stats: one value per channel at most.
MAX_CHANNEL_VALUES = 4096
TRACKING_URI = re.compile(r"^(sqlite:///|https?://|file:|databricks|postgresql|mysql)")


# What an untrusted config may name as a function: the bundled factory, and any public function
# of the task metrics module (pure functions, reviewed as code). Anything else, e.g. a project
# function that writes files, needs `trusted: true`.
TRUSTED_FUNCTIONS = frozenset({"pipeline.examples:digits_concrete_functions"})
TRUSTED_MODULES = frozenset({"pipeline.task_metrics"})


def check_function_reference(reference: str, *, trusted: bool, key: str, file: str = PARAMS_FILE) -> None:
    """A `module:function` a config names: well formed, and allowed unless `trusted`. Checked when
    the config loads and again before the import; nothing is imported here."""
    module_name, _, function_name = reference.partition(":")
    if not module_name or not function_name or function_name.startswith("_"):
        raise ConfigError(f"'{reference}' is not 'module:function'", file=file, key=key)
    if not trusted and reference not in TRUSTED_FUNCTIONS and module_name not in TRUSTED_MODULES:
        allowed = ", ".join([*sorted(TRUSTED_FUNCTIONS), *(f"{m}:*" for m in sorted(TRUSTED_MODULES))])
        raise ConfigError(f"'{reference}' is not a function a config may name without trust ({allowed}): set "
                          "trusted: true to import it, only for code you trust", file=file, key=key)


RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9][A-Za-z0-9.-]{0,252}:(?P<port>[0-9]{1,5})")


def is_ray_address(text: str) -> bool:
    """`auto`, <host>:<port> or ray://<host>:<port>, the port in 1..65535."""
    address = RAY_ADDRESS.fullmatch(text)
    return bool(address) and (address["port"] is None or 1 <= int(address["port"]) <= 65535)


def check_tracking_uri(uri: str) -> None:
    """The syntax of a tracking URI (MLflow is not contacted)."""
    if uri and not TRACKING_URI.match(uri):
        shown = re.sub(r"//[^/@]*@", "//***@", uri)
        raise ConfigError(f"malformed tracking URI '{shown}'", key="tracking.uri")


def data_files(data: DatasetConfig | GeneratorConfig) -> str | None:
    """The file or folder a dataset reads (None for generators)."""
    return None if isinstance(data, GeneratorConfig) else os.path.normpath(data.path)


def _reject_unknown_keys(node: Any, schema: Any, file: str, prefix: str = "") -> None:
    """Unknown keys anywhere, named by their full key (OmegaConf loses the path inside lists)."""
    import dataclasses
    import typing

    origin, arguments = typing.get_origin(schema), typing.get_args(schema)
    if origin is typing.Union:  # Optional[X]
        for option in arguments:
            if option is not type(None):
                _reject_unknown_keys(node, option, file, prefix)
        return
    if dataclasses.is_dataclass(schema) and isinstance(node, dict):
        hints = typing.get_type_hints(schema)
        for key, value in node.items():
            if key not in hints:
                raise ConfigError(f"unknown key (not in {schema.__name__})", file=file, key=f"{prefix}{key}")
            _reject_unknown_keys(value, hints[key], file, f"{prefix}{key}.")
    elif origin in (dict, typing.Dict) and isinstance(node, dict):
        for key, value in node.items():
            _reject_unknown_keys(value, arguments[1], file, f"{prefix}{key}.")
    elif origin in (list, typing.List) and isinstance(node, list):
        for index, value in enumerate(node):
            _reject_unknown_keys(value, arguments[0], file, f"{prefix.rstrip('.')}[{index}].")


# Each metadata text (description, author, ...) is written into every delivered model, where
# the size gate cannot see it (it compares the payload without metadata).
MAX_METADATA_TEXT = 16_384


def _check_references(cfg: PipelineConfig, file: str) -> None:
    def need(group: dict, name: str, key: str, what: str) -> None:
        if name not in group:
            known = ", ".join(sorted(group)) or "none"
            raise ConfigError(f"unknown {what} '{name}' (known: {known})", file=file, key=key)

    def named(group: dict, prefix: str, pattern: re.Pattern = NAME, what: str = NAME_RULE) -> None:
        for name in group:
            if not pattern.fullmatch(str(name)):
                raise ConfigError(what, file=file, key=f"{prefix}.{name}")

    for group_name in ("model", "quantization", "dataset", "generator", "runtime", "validation", "autoselect"):
        named(getattr(cfg, group_name), group_name)
    check_numbers(cfg, "", file)
    data = {**cfg.dataset, **cfg.generator}
    for name in set(cfg.dataset) & set(cfg.generator):
        raise ConfigError("a dataset and a generator share this name", file=file, key=f"generator.{name}")
    for name, dataset in cfg.dataset.items():
        _check_dataset(dataset, f"dataset.{name}", file)
    for name, generator in cfg.generator.items():
        _check_generator(generator, f"generator.{name}", file)
    for name, model in cfg.model.items():
        key = f"model.{name}"
        need(data, model.representative.dataset, f"{key}.representative.dataset", "dataset")
        need(data, model.evaluation.dataset, f"{key}.evaluation.dataset", "dataset")
        need(cfg.runtime, model.runtime, f"{key}.runtime", "runtime")
        need(cfg.validation, model.validation, f"{key}.validation", "validation gate set")
        source = model.source
        if (source.format is SourceFormat.concrete_function) != bool(source.factory):
            raise ConfigError(
                "a factory 'module:function' is required for format concrete_function, and only there",
                file=file,
                key=f"{key}.source.factory",
            )
        if source.factory:
            check_function_reference(source.factory, trusted=source.trusted, key=f"{key}.source.factory", file=file)
        for part in ("representative", "evaluation"):
            ref = getattr(model, part)
            if isinstance(data[ref.dataset], GeneratorConfig) and ref.num_samples > data[ref.dataset].size:
                raise ConfigError(f"generator '{ref.dataset}' makes {data[ref.dataset].size} samples, fewer than "
                                  f"{ref.num_samples}", file=file, key=f"{key}.{part}.num_samples")
        if not source.trusted:
            _check_inside_project(source.path, file, f"{key}.source.path")
        texts = [(f"{key}.metadata.{field}", getattr(model.metadata, field))
                 for field in ("description", "author", "license", "version")]
        texts += [(f"{key}.metadata.{role}[{index}].{field}", getattr(tensor, field))
                  for role in ("inputs", "outputs") for index, tensor in enumerate(getattr(model.metadata, role))
                  for field in ("name", "description")]
        for text_key, text in texts:
            if len(text) > MAX_METADATA_TEXT:
                raise ConfigError(f"{len(text):,} characters: metadata text goes into every delivered model; the "
                                  f"limit is {MAX_METADATA_TEXT:,}", file=file, key=text_key)
        for role in ("inputs", "outputs"):
            if not getattr(model.metadata, role):  # the metadata stage would find out after conversion
                raise ConfigError(f"no {role} described: every delivered model carries metadata describing each of "
                                  f"its {role} (see conf/model/digits.yaml)", file=file, key=f"{key}.metadata.{role}")
            for index, tensor in enumerate(getattr(model.metadata, role)):
                if tensor.labels is not None:
                    _check_inside_project(tensor.labels, file, f"{key}.metadata.{role}[{index}].labels", under=LABELS)
                _check_tensor_numbers(tensor, file, f"{key}.metadata.{role}[{index}]")
        if not TEAM_NAME.fullmatch(model.team):  # it names registered models (`<team>.<model>`) and tags
            raise ConfigError("team names use A-Z, a-z, 0-9, _ and - only, and start and end with a letter or digit",
                              file=file, key=f"{key}.team")
        if model.registry_name and not REGISTRY_NAME.fullmatch(model.registry_name):
            raise ConfigError("registered model names use A-Z, a-z, 0-9, _ . and - only", file=file,
                              key=f"{key}.registry_name")
        _check_overlap(model, data, key, file)
        evaluation = data[model.evaluation.dataset]
        if cfg.validation[model.validation].needs_labels and not evaluation.labelled:
            raise ConfigError(f"gate set '{model.validation}' needs labels (accuracy or a task metric), but "
                              f"evaluation dataset '{model.evaluation.dataset}' has none: choose a gate set "
                              "without them (e.g. default)", file=file, key=f"{key}.validation")
    for name, gates in cfg.validation.items():
        _check_gates(gates, f"validation.{name}", file)
    for name, build in cfg.build.items():
        need(cfg.model, build.model, f"build.{name}.model", "model")
        need(cfg.quantization, build.variant, f"build.{name}.variant", "quantization variant")
        if name != f"{build.model}-{build.variant}":
            raise ConfigError(
                f"build names are '<model>-<variant>': expected '{build.model}-{build.variant}'",
                file=file,
                key=f"build.{name}",
            )
        unknown_gates = set(build.validation) - set(ValidationConfig.__dataclass_fields__)
        if unknown_gates:
            raise ConfigError(f"unknown gate {sorted(unknown_gates)[0]!r}", file=file, key=f"build.{name}.validation")
        model = cfg.model[build.model]
        gates = merge_gates(cfg.validation[model.validation], build.validation, key=f"build.{name}.validation",
                            file=file)
        _check_gates(gates, f"build.{name}.validation", file)
        if gates.needs_labels and not data[model.evaluation.dataset].labelled:
            raise ConfigError(f"these gates need labels, but evaluation dataset '{model.evaluation.dataset}' has "
                              "none", file=file, key=f"build.{name}.validation")
    for name, variant in cfg.quantization.items():
        key = f"quantization.{name}"
        if variant.backend is Backend.litert_quantizer:
            recipe = variant.recipe or ""
            if recipe not in LITERT_RECIPES and not recipe.endswith(".json"):
                raise ConfigError(
                    f"unknown recipe '{recipe}' (use one of {', '.join(LITERT_RECIPES)} or a .json file)",
                    file=file,
                    key=f"{key}.recipe",
                )
            if recipe not in LITERT_RECIPES:
                _check_inside_project(recipe, file, f"{key}.recipe", under=RECIPES)
        if variant.backend is Backend.converter and variant.mode is None:
            raise ConfigError("the converter backend needs a mode", file=file, key=f"{key}.mode")
    for name, auto in cfg.autoselect.items():
        key = f"autoselect.{name}"
        need(cfg.model, name, key, "model")
        for index, candidate in enumerate(auto.candidates):
            need(cfg.quantization, candidate, f"{key}.candidates[{index}]", "quantization variant")
        for index, algorithm in enumerate(auto.algorithms):
            if algorithm not in CALIBRATION_ALGORITHMS:
                raise ConfigError(f"'{algorithm}' is not a calibration algorithm of LiteRT Quantizer (use "
                                  f"{', '.join(CALIBRATION_ALGORITHMS)})", file=file, key=f"{key}.algorithms[{index}]")
        gate_set = cfg.validation.get(cfg.model[name].validation)
        if auto.max_task_metric_drop is not None and gate_set is not None and not gate_set.task_metric:
            raise ConfigError(f"gate set '{cfg.model[name].validation}' of model {name} has no task_metric to "
                              "measure this drop", file=file, key=f"{key}.max_task_metric_drop")
        if f"{name}-{AUTO_VARIANT}" in cfg.build:
            raise ConfigError(f"'{AUTO_VARIANT}' is the auto-selected variant: rename this build",
                              file=file, key=f"build.{name}-{AUTO_VARIANT}")
    for metric, allowed in cfg.nightly.tolerance.items():
        if metric not in HIGHER_IS_BETTER:
            raise ConfigError(f"unknown metric (use {', '.join(HIGHER_IS_BETTER)})", file=file,
                              key=f"nightly.tolerance.{metric}")
    _check_inside_project(cfg.nightly.summary, file, "nightly.summary")
    if cfg.parallel.ray_address and not is_ray_address(cfg.parallel.ray_address):
        raise ConfigError("not a Ray address (empty, auto, <host>:<port> or ray://<host>:<port>)", file=file,
                          key="parallel.ray_address")
    if cfg.parallel.ray_address and cfg.parallel.engine is not ParallelEngine.ray:
        raise ConfigError("a Ray address needs engine: ray", file=file, key="parallel.ray_address")
    if cfg.tracking.enabled:  # a malformed URI fails before any work, not when the first stage logs
        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            check_tracking_uri(env_uri or cfg.tracking.uri)
        except ConfigError as exc:
            raise ConfigError(exc.message, file="$MLFLOW_TRACKING_URI" if env_uri else file, key=exc.key) from None


# Set by `sweep` for its members' stages, which run in a folder of links into the project.
PROJECT_ROOT_ENV = "LITERT_PROJECT_ROOT"


def _in_project(resolved: Path) -> bool:
    roots = [Path.cwd()] + ([Path(os.environ[PROJECT_ROOT_ENV])] if os.environ.get(PROJECT_ROOT_ENV) else [])
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def _check_inside_project(path: str, file: str, key: str, under: Path | None = None) -> None:
    """A path a config names stays in the project (and in `under`, the folder DVC tracks for it)."""
    normal = Path(os.path.normpath(path))
    if normal.is_absolute() or normal.parts[:1] == ("..",):
        raise ConfigError(f"'{path}' is outside the project: name a path relative to it", file=file, key=key)
    # A symbolic link committed inside the project may lead anywhere on the host: the path is
    # checked as it resolves, here (every stage loads its config) and so before it is read.
    try:
        resolved = normal.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a loop of symbolic links
        raise ConfigError(f"'{path}' cannot be resolved: {first_line(exc)}", file=file, key=key) from None
    if not _in_project(resolved):
        raise ConfigError(f"'{path}' leads outside the project through a symbolic link", file=file, key=key)
    if under is not None and normal.parts[:len(under.parts)] != under.parts:
        raise ConfigError(f"'{path}' must live in {under}/ (a dependency of the stages that read it)", file=file,
                          key=key)


def _check_dataset(dataset: DatasetConfig, key: str, file: str) -> None:
    _check_inside_project(dataset.path, file, f"{key}.path")
    if dataset.type is DatasetType.npz:
        if bool(dataset.inputs) == bool(dataset.inputs_key):
            raise ConfigError("name the arrays: inputs_key (a one-input model) or inputs (input name -> array "
                              "key), not both", file=file, key=f"{key}.inputs")
        if dataset.labels and dataset.labels_key:
            raise ConfigError("labels_key (the only output) or labels (output name -> array key), not both",
                              file=file, key=f"{key}.labels")
    elif dataset.inputs or dataset.labels or dataset.inputs_key:
        raise ConfigError("an image folder feeds one input: inputs, labels and inputs_key are for npz datasets",
                          file=file, key=f"{key}.inputs")
    for part in ("inputs", "labels"):
        for tensor in getattr(dataset, part):
            if not TENSOR_NAME.fullmatch(tensor):
                raise ConfigError("not a tensor name (A-Z, a-z, 0-9, _ . : -)", file=file, key=f"{key}.{part}.{tensor}")
    if dataset.image_size and (len(dataset.image_size) != 2 or not all(1 <= d <= 8192 for d in dataset.image_size)):
        raise ConfigError("[height, width], each 1 to 8192", file=file, key=f"{key}.image_size")


def _check_generator(generator: GeneratorConfig, key: str, file: str) -> None:
    if bool(generator.shape) == bool(generator.inputs):
        raise ConfigError("give a shape (a one-input model) or inputs (input name -> shape, dtype...), not both",
                          file=file, key=key)
    tensors = generator.inputs.items() if generator.inputs else [("", generator)]
    values = 0
    for name, tensor in tensors:
        where = f"{key}.inputs.{name}" if name else key
        if name and not TENSOR_NAME.fullmatch(name):
            raise ConfigError("not a tensor name (A-Z, a-z, 0-9, _ . : -)", file=file, key=where)
        if not tensor.shape or not all(isinstance(d, int) and 1 <= d <= MAX_DIMENSION for d in tensor.shape):
            raise ConfigError(f"a shape of sizes 1 to {MAX_DIMENSION:,} (without the batch dimension)", file=file,
                              key=f"{where}.shape")
        if tensor.high <= tensor.low and tensor.dtype is not TensorDtype.bool:
            raise ConfigError("must be greater than low", file=file, key=f"{where}.high")
        if tensor.dtype in INTEGER_RANGES:  # integers are drawn from [ceil(low), ceil(high))
            smallest, largest = INTEGER_RANGES[tensor.dtype]
            if math.ceil(tensor.high) <= math.ceil(tensor.low):
                raise ConfigError("integer values need an integer in [low, high)", file=file, key=f"{where}.high")
            if tensor.low < smallest or tensor.high > largest + 1:
                raise ConfigError(f"{tensor.dtype.value} values lie in [{smallest}, {largest}]", file=file,
                                  key=f"{where}.low" if tensor.low < smallest else f"{where}.high")
        values += generator.size * math.prod(tensor.shape)
    if values > MAX_GENERATED_VALUES:
        raise ConfigError(f"would generate {values:,} values (the limit is {MAX_GENERATED_VALUES:,}): lower size "
                          "or the shapes", file=file, key=f"{key}.size")


def _check_overlap(model: ModelConfig, data: dict, key: str, file: str) -> None:
    """Evaluation must not draw from calibration's samples unless the config says so."""
    representative, evaluation = model.representative, model.evaluation
    if evaluation.allow_overlap:
        return
    first, second = data[representative.dataset], data[evaluation.dataset]
    same = representative.dataset == evaluation.dataset or (
        data_files(first) is not None and data_files(first) == data_files(second)
    ) or (isinstance(first, GeneratorConfig) and first == second)
    if same:
        raise ConfigError(f"evaluation would draw from the samples calibration uses ('{representative.dataset}' and "
                          f"'{evaluation.dataset}' are the same data): use a separate evaluation dataset, or set "
                          f"{key}.evaluation.allow_overlap: true", file=file, key=f"{key}.evaluation.dataset")


# LiteRT Quantizer's algorithm keys (litert_quantizer.algorithm_manager.AlgorithmName; a test
# holds this list to the installed package).
QUANTIZER_ALGORITHMS = ("no_quantize", "min_max_uniform_quantize", "float_casting", "dequantized_weight_recovery",
                        "OCTAV", "HADAMARD_ROTATION", "DECOMPOSED_HADAMARD_ROTATION", "MSE", "GPTQ", "OSCAR")
# The algorithms that calibrate static recipes (measured in conf/recipes/README.md); an
# auto-selection tries these by default (OCTAV gave min/max's SNR on every example).
CALIBRATION_ALGORITHMS = ("min_max_uniform_quantize", "MSE", "OCTAV", "GPTQ")
AUTOSELECT_ALGORITHMS = ("min_max_uniform_quantize", "MSE", "GPTQ")
RECIPE_ENTRY_KEYS = {"regex", "operation", "algorithm_key", "op_config"}


def check_recipe_entries(entries: Any, *, file: str, key: str) -> None:
    """A JSON recipe's structure: a non-empty list of entries, each naming an op regex, an
    operation, a known algorithm and its op config (the quantizer's parser then checks the op
    config's fields). Checked when the variant quantizes, so one team's broken recipe fails its
    own builds, not the whole run."""
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError("a recipe is a non-empty JSON list of op configs", file=file, key=key)
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        missing = sorted(RECIPE_ENTRY_KEYS - set(entry))
        if missing:
            raise ConfigError(f"invalid recipe: the entry has no {missing[0]}", file=file, key=where)
        if entry["algorithm_key"] not in QUANTIZER_ALGORITHMS:
            raise ConfigError(f"invalid recipe: unknown algorithm {entry['algorithm_key']!r} (one of "
                              f"{', '.join(QUANTIZER_ALGORITHMS)})", file=file, key=f"{where}.algorithm_key")
        if not isinstance(entry["regex"], str) or not isinstance(entry["op_config"], dict):
            raise ConfigError("invalid recipe: regex is a string and op_config a mapping", file=file, key=where)
        try:
            re.compile(entry["regex"])
        except re.error as exc:
            raise ConfigError(f"invalid recipe: regex: {exc}", file=file, key=f"{where}.regex") from None


def _check_tensor_numbers(tensor: TensorMetadataConfig, file: str, key: str) -> None:
    """Normalization and stats numbers, beyond their ranges, before any stage packs them (the
    metadata stage checks them against the model's shape and evaluation data)."""
    for name in ("mean", "std", "min", "max"):
        values = getattr(tensor, name)
        if len(values) > MAX_CHANNEL_VALUES:
            raise ConfigError(f"{len(values)} values (the limit is {MAX_CHANNEL_VALUES})", file=file, key=f"{key}.{name}")
    if bool(tensor.mean) != bool(tensor.std):
        raise ConfigError("mean and std go together", file=file, key=f"{key}.{'std' if tensor.mean else 'mean'}")
    if 0 in tensor.std:
        raise ConfigError("must not be 0 (clients divide by it)", file=file, key=f"{key}.std")
    if any(low > high for low, high in zip(tensor.min, tensor.max)):
        raise ConfigError("must not be below min", file=file, key=f"{key}.max")


def _check_gates(gates: ValidationConfig, key: str, file: str) -> None:
    if gates.task_metric:
        check_function_reference(gates.task_metric, trusted=False, key=f"{key}.task_metric", file=file)
    check_numbers(gates, key, file)


def _within(value: float, low: float, high: float, file: str, key: str) -> None:
    if not low <= value <= high:
        raise ConfigError(f"must be between {_number(low)} and {_number(high)}, not {_number(value)}", file=file,
                          key=key)


def _number(value: float) -> str:
    if isinstance(value, int):  # as written (Python refuses to print ints of over 4,300 digits)
        return str(value) if abs(value) < 10**30 else f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:g}"


# YAML is read whole and expanded by OmegaConf: bound both (anchors and aliases can make a
# small file expand to billions of nodes).
MAX_YAML_BYTES = 8 << 20
MAX_YAML_NODES = 1_000_000
MAX_INT_DIGITS = 100


def read_yaml_text(path: str | Path) -> str:
    """A YAML file's text, refused (ConfigError, one line) when it is not a regular UTF-8 file
    within MAX_YAML_BYTES, or when its aliases would expand past MAX_YAML_NODES."""
    import yaml

    file = str(path)
    try:
        if not Path(path).is_file():
            raise ConfigError("cannot read: not a regular file" if Path(path).exists() else
                              "cannot read: No such file or directory", file=file)
        if Path(path).stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{Path(path).stat().st_size:,} bytes (the limit is {MAX_YAML_BYTES:,})", file=file)
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=file) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", file=file) from None
    try:
        root = yaml.compose(text, Loader=safe_loader())
    except yaml.YAMLError as exc:
        raise ConfigError(malformed_yaml(exc), file=file) from None
    sizes: dict[int, int] = {}
    inside: set[int] = set()  # the nodes holding the one being counted

    def expanded(node: Any) -> int:  # shared (aliased) nodes counted once per use, computed once
        if id(node) in inside:  # every reader would recurse without end
            raise ConfigError(f"malformed YAML: line {node.start_mark.line + 1}, column {node.start_mark.column + 1}: "
                              "an alias inside the node it refers to", file=file)
        if id(node) not in sizes:
            inside.add(id(node))
            if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":int") and len(node.value) > MAX_INT_DIGITS:
                # Python refuses to read an int of over 4,300 digits: a traceback, not an error line
                raise ConfigError(f"malformed YAML: line {node.start_mark.line + 1}, column {node.start_mark.column + 1}: "
                                  f"an integer of {len(node.value):,} characters", file=file)
            if isinstance(node, yaml.MappingNode):  # PyYAML keeps the last of two equal keys silently
                seen: set[str] = set()
                for key, _ in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                        if key.value in seen:
                            raise ConfigError(f"malformed YAML: line {key.start_mark.line + 1}, column "
                                              f"{key.start_mark.column + 1}: duplicate key '{key.value}'", file=file)
                        seen.add(key.value)
            children = node.value if isinstance(node.value, list) else []
            pairs = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
            sizes[id(node)] = min(1 + sum(expanded(child) for child in pairs), MAX_YAML_NODES + 1)
            inside.discard(id(node))
        return sizes[id(node)]

    if root is not None and expanded(root) > MAX_YAML_NODES:
        raise ConfigError(f"expands to more than {MAX_YAML_NODES:,} values (anchors and aliases)", file=file)
    return text


def malformed_yaml(exc: Exception) -> str:
    """One line for a YAML syntax error: where (PyYAML's mark) and what."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if not problem:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"malformed YAML: {where}{problem}"


def load(path: str | Path = PARAMS_FILE, *, require_sources: bool = False, model: str | None = None,
         build: str | None = None, data: str | None = None) -> PipelineConfig:
    """Load and validate `params.yaml`. With `require_sources`, source paths must exist.

    A stage names what it works on, `model`, `build` (then its model) or `data` (a dataset or
    generator), and gets only that part, validated (`stage_part`): its start-up then costs the
    same at 5 models or 500 (the whole file at 50 models takes 1.7 s to validate, in each of
    hundreds of stage processes).
    """
    file = str(path)
    raw = None
    if data is None and (model or build):  # build names are '<model>-<variant>'; models have no '-'
        raw = _cut_part(path, model or build.partition("-")[0], build)
    if raw is None:
        raw = read_params(path)
        if build is not None:
            model = _model_of_build(raw, build)
        if model is not None or data is not None:
            raw = stage_part(raw, model=model, data=data)
    cfg = validate(raw, file=file)
    if require_sources:
        for name, model in cfg.model.items():
            check_source_exists(model, name, file=file)
    return cfg


def read_params(path: str | Path = PARAMS_FILE) -> dict:
    """params.yaml as parsed, unvalidated: a mapping (an empty file is every default)."""
    raw = parse_yaml(read_yaml_text(path), str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a mapping of keys to values is expected, not a {type(raw).__name__}", file=str(path))
    return raw


# A model's part names the params.yaml it was cut from (the SHA-256 of its bytes), when loading
# the part as JSON gives back exactly what it holds (not so for keys that are not strings).
PART_OF = "_part_of"


def model_parts(path: str | Path = PARAMS_FILE) -> dict[str, dict]:
    """Each model's part of params.yaml (`stage_part`, what its stages load), once the whole
    file validates: the files the DVC `params` of the model's stages name (layout.model_params),
    which its stages then load instead of the whole file (`_cut_part`)."""
    raw = read_params(path)
    validate(raw, file=str(path))
    digest = sha256_path(path)
    parts = {}
    for name in raw.get("model") or {}:
        part = stage_part(raw, model=name)
        parts[name] = {PART_OF: digest, **part} if json.loads(json.dumps(part)) == part else part
    return parts


def write_model_parts(path: str | Path = PARAMS_FILE) -> list[Path]:
    """The `params` stage: each model's part (`model_parts`) as the JSON file beside `path` that
    `_cut_part` reads, and no other (a removed model's part goes with it)."""
    import shutil

    parts = model_parts(path)
    folder = Path(path).parent / MODEL_PARAMS
    shutil.rmtree(folder, ignore_errors=True)
    return [write_text(Path(path).parent / model_params(name), json.dumps(part, indent=1) + "\n")
            for name, part in parts.items()]


def _cut_part(path: str | Path, model: str, build: str | None) -> dict | None:
    """`model`'s part of `path` as the `params` stage wrote it, if cut from these very bytes (and
    holding `build`): a stage then reads a few KB of JSON, not all of params.yaml (its config in
    55 ms against 271 ms at 50 models, in each of hundreds of stage processes; bench/noop.md)."""
    part_file = Path(path).parent / model_params(model)
    try:
        if (not NAME.fullmatch(model) or not Path(path).is_file() or not part_file.is_file()
                or max(Path(path).stat().st_size, part_file.stat().st_size) > MAX_YAML_BYTES):
            return None
        digest = sha256_path(path)
        part = json.loads(part_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(part, dict) or part.pop(PART_OF, None) != digest:
        return None
    return part if build is None or build in _section(part, "build") else None


def safe_loader() -> type:
    """PyYAML's safe loader, libyaml's when PyYAML has it (several times faster)."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str, file: str) -> Any:
    """YAML as OmegaConf reads it (its float forms such as 1e-3, no timestamps), parsed by libyaml.
    read_yaml_text has refused duplicate keys and runaway aliases already."""
    import yaml
    from omegaconf._utils import get_yaml_loader

    class Loader(safe_loader()):  # type: ignore[misc]
        yaml_implicit_resolvers = get_yaml_loader().yaml_implicit_resolvers

    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(malformed_yaml(exc), file=file) from None


def _model_of_build(params: Any, build: str) -> str | None:
    entry = _section(params, "build").get(build)
    name = entry.get("model") if isinstance(entry, dict) else None
    return name if isinstance(name, str) else None


def _section(params: Any, group: str) -> dict:
    section = params.get(group) if isinstance(params, dict) else None
    return section if isinstance(section, dict) else {}


def stage_part(params: Any, *, model: str | None = None, data: str | None = None) -> Any:
    """The part of composed params one stage reads: the sections every model shares, and model
    `model` (its entry, builds, auto-selection and data, and of the shared groups only the gate
    set, runtime and variants it uses) or, for a data stage, dataset or generator `data` alone.
    A name the file lacks, or a malformed section, keeps the whole file or section: validating
    it reports the problem as it would without this."""
    entry = _section(params, "model").get(model) if model is not None else None
    if (model is not None and not isinstance(entry, dict)) or any(
            params.get(group) is not None and not isinstance(params.get(group), dict)
            for group in ("model", "build", "autoselect", "dataset", "generator")):
        return params
    if model is not None:
        uses = {part.get("dataset") for part in (entry.get(name) for name in ("representative", "evaluation"))
                if isinstance(part, dict)}
        kept = {"model": {model: entry},
                "build": {key: value for key, value in _section(params, "build").items()
                          if isinstance(value, dict) and value.get("model") == model},
                "autoselect": {key: value for key, value in _section(params, "autoselect").items() if key == model}}
    else:
        uses, kept = {data}, {"model": {}, "build": {}, "autoselect": {}}
    for group in ("dataset", "generator"):
        kept[group] = {key: value for key, value in _section(params, group).items() if key in uses}
    if model is not None:
        # Stages list these groups whole (DVC cannot interpolate `validation.${model.<m>.validation}`):
        # cut to what the model uses, an edit of another model's gate set or variant reruns nothing here.
        kept.update(_used_entries(params, entry, kept["build"].values(), kept["autoselect"].get(model)))
    return {**params, **{group: section for group, section in kept.items() if group in params}}


def _used_entries(params: dict, entry: dict, builds: Any, auto: Any) -> dict[str, dict]:
    """Of the shared `validation`, `runtime` and `quantization` groups, the entries one model names;
    a group is left whole when a name is missing from it (or auto-selection tries every variant)."""
    defaults = ModelConfig.__dataclass_fields__
    wanted = {group: [entry.get(group, defaults[group].default)] for group in ("validation", "runtime")}
    candidates = auto.get("candidates") if isinstance(auto, dict) else []
    if auto is None or (isinstance(candidates, list) and candidates):
        wanted["quantization"] = [build.get("variant") for build in builds] + list(candidates or [])
    used = {}
    for group, names in wanted.items():  # unvalidated: a name may be anything, a list or a mapping
        section = _section(params, group)
        if all(isinstance(name, str) and name in section for name in names):
            used[group] = {key: value for key, value in section.items() if key in names}
    return used


def check_inputs_exist(cfg: PipelineConfig, conf_dir: str | Path = CONF_DIR) -> None:
    """Every source and dataset file the config names exists, or a bundled example will make it:
    checked before `dvc repro`, which would otherwise refuse the stage with a missing dependency."""
    made = [Path(EXAMPLES.name, name) for name in cfg.examples]
    # (path, key, whether a folder is right: a source may be a SavedModel)
    named = [(model.source.path, f"model.{name}.source.path", True) for name, model in cfg.model.items()]
    named += [(dataset.path, f"dataset.{name}.path", False) for name, dataset in cfg.dataset.items()]
    named += [(tensor.labels, f"model.{name}.metadata.{role}[{index}].labels", False)
              for name, model in cfg.model.items() for role in ("inputs", "outputs")
              for index, tensor in enumerate(getattr(model.metadata, role)) if tensor.labels]
    for path, key, folder_allowed in named:
        problem = None
        if not Path(path).exists() and not any(folder in Path(path).parents for folder in made):
            problem = f"'{path}' does not exist"
        elif Path(path).is_dir() and not folder_allowed:
            problem = f"'{path}' is a folder: name a file"
        elif Path(path).exists():
            problem = _special_file(Path(path))
        if problem:
            file = _conf_file_defining(Path(conf_dir).resolve(), key)
            raise InputError(problem, file=_relative(file) if file else PARAMS_FILE, key=key)


MAX_FOLDERS_WALKED = 100_000


def _special_file(path: Path) -> str | None:
    """Why `path` (or a file in it) is not a regular file DVC and the stages can read: a FIFO
    or a device blocks `dvc status` (it hashes every dependency) and the stage forever."""
    if path.is_file():
        return None
    if not path.is_dir():
        return f"'{path}' is not a regular file or folder (a FIFO, socket or device)"
    for count, (folder, _, names) in enumerate(os.walk(path)):
        if count > MAX_FOLDERS_WALKED:
            return f"'{path}' holds more than {MAX_FOLDERS_WALKED} folders"
        for name in names:
            if not os.path.isfile(os.path.join(folder, name)):
                return f"'{Path(folder, name)}' (in '{path}') is not a regular file (a FIFO, socket, device or broken link)"
    return None


# A source folder (a SavedModel) holds a few files; more is not a model, and the walk is bounded.
MAX_SOURCE_FILES = 10_000


def check_source_exists(model: ModelConfig, name: str, *, file: str = PARAMS_FILE) -> None:
    """The source exists and, for a folder, nothing in it leads out of the project through a
    symbolic link (the path itself was checked as it resolves when the config loaded)."""
    key = f"model.{name}.source.path"
    source = Path(model.source.path)
    if not source.exists():
        raise InputError(f"source path '{model.source.path}' does not exist", file=file, key=key)
    if not source.is_dir() or model.source.trusted:
        return
    seen = 0
    for folder, folders, files in os.walk(source):  # does not descend into linked folders
        for entry in (*folders, *files):
            seen += 1
            if seen > MAX_SOURCE_FILES:
                raise InputError(f"source folder '{source}' holds over {MAX_SOURCE_FILES:,} files: not a model",
                                 file=file, key=key)
            path = Path(folder, entry)
            if path.is_symlink():
                try:
                    inside = _in_project(path.resolve())
                except (RuntimeError, OSError):  # a loop of symbolic links
                    inside = False
                if not inside:
                    raise InputError(f"'{path}' in the source folder leads outside the project through a symbolic "
                                     "link", file=file, key=key)


# --- composition (conf/ -> params.yaml) -------------------------------------------------


def compose(overrides: list[str] | None = None, conf_dir: str | Path = CONF_DIR) -> str:
    """Compose `conf/` as DVC's Hydra integration does, validate it, and return the YAML text of
    the typed config (every default spelled out, unused datasets and examples left out).

    Errors name the conf file that holds the offending key.
    """
    return compose_typed(overrides, conf_dir)[0]


def compose_typed(overrides: list[str] | None = None, conf_dir: str | Path = CONF_DIR) -> tuple[str, PipelineConfig]:
    """`compose`'s text, and the typed config it holds (what loading that text gives: validating
    the 50-model text again took 1.2 s of every run's start)."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf_path = Path(conf_dir).resolve()
    for override in overrides or []:  # Hydra's int() refuses over 4,300 digits with a ValueError
        digits = max((len(run) for run in re.findall(r"\d+", override)), default=0)
        if digits > MAX_INT_DIGITS:
            raise ConfigError(f"an integer of {digits:,} digits", file="command line", key=override.split("=", 1)[0])
    for conf_file in sorted(Path(conf_dir).rglob("*.yaml")):  # Hydra reads them whole: bound them first
        read_yaml_text(conf_file)
    _check_one_owner_per_key(Path(conf_dir))
    try:
        with initialize_config_dir(str(conf_path), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except OverrideParseException as exc:
        raise ConfigError(" ".join(str(exc).split()), file="command line") from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(" ".join(str(exc).split()), file=str(Path(conf_dir) / f"{CONFIG_NAME}.yaml")) from None
    except Exception as exc:  # yaml.YAMLError from a malformed group file
        if not isinstance(exc, yaml.YAMLError):  # e.g. Hydra's bare AssertionError on a defaults entry
            what = f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"Hydra could not compose the defaults list ({what}): each entry names a group and "
                              "an option, e.g. `- dataset: [digits_calibration]`",
                              file=str(Path(conf_dir) / f"{CONFIG_NAME}.yaml"), key="defaults") from None
        mark = getattr(exc, "problem_mark", None)
        named = getattr(mark, "name", None)  # the file Hydra read, or "<unicode string>"
        raise ConfigError(malformed_yaml(exc), file=_relative(named) if named and Path(named).is_file() else str(conf_dir)
                          ) from None
    try:
        typed = validate(cfg, file="params.yaml")
    except ConfigError as exc:
        if _overridden(overrides or [], exc.key, conf_path):
            raise ConfigError(exc.message, file="command line", key=exc.key) from None
        exc.file = _conf_file_defining(conf_path, exc.key) or str(Path(conf_dir) / f"{CONFIG_NAME}.yaml")
        raise ConfigError(exc.message, file=_relative(exc.file), key=exc.key) from None
    # Every schema field is written out, defaults included: DVC's params dependencies need each
    # key a stage lists to exist, even when a team's conf file leaves the section out.
    used = used_only(plain(typed))
    typed = replace(typed, dataset={name: typed.dataset[name] for name in used["dataset"]},
                    generator={name: typed.generator[name] for name in used["generator"]}, examples=used["examples"])
    return OmegaConf.to_yaml(OmegaConf.create(used)), typed


def used_only(params: dict[str, Any]) -> dict[str, Any]:
    """The composed params without the datasets, generators and bundled examples no selected
    model uses, so `run 'model=[x]'` prepares and materializes only what x needs."""
    models = (params.get("model") or {}).values()
    used = {model["representative"]["dataset"] for model in models} | {model["evaluation"]["dataset"] for model in models}
    kept = {group: {name: entry for name, entry in (params.get(group) or {}).items() if name in used}
            for group in ("dataset", "generator")}
    paths = [Path(model["source"]["path"]) for model in models]
    paths += [Path(entry["path"]) for entry in kept["dataset"].values()]
    examples = [name for name in params.get("examples") or []
                if any(path.parts[:2] == (EXAMPLES.name, name) for path in paths)]
    return {**params, **kept, "examples": examples}


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


_UNSET = object()


def _walk(node: Any, key: str) -> tuple[Any, str, int]:
    """Follow a full key (`a.b[0].c`, names may hold dots) into plain data: (the node reached,
    the part of the key left, how many steps were taken)."""
    remaining, depth = key, 0
    while remaining and isinstance(node, (dict, list)):
        if isinstance(node, list):
            index = re.match(r"\[(\d+)\]\.?", remaining)
            if not index or int(index.group(1)) >= len(node):
                break
            node, remaining = node[int(index.group(1))], remaining[index.end():]
        else:
            keys = [str(k) for k in node if remaining == str(k) or remaining.startswith((f"{k}.", f"{k}["))]
            if not keys:
                break
            key_found = max(keys, key=len)
            rest = remaining[len(key_found):]
            node, remaining = node[key_found], rest[1:] if rest.startswith(".") else rest  # names may start with dots
        depth += 1
    return node, remaining, depth


def value_at(data: Any, key: str) -> Any:
    node, remaining, _ = _walk(data, key)
    return _UNSET if remaining else node


def _overridden(overrides: list[str], key: str | None, conf_dir: Path) -> bool:
    """Whether a command-line override (`a.b=1`, `+a.b=1`, `++a.b=1`) set `key` or a part of it.
    Choosing a group's options (`model=[x]`) sets nothing: the option's file does."""
    for override in overrides:
        name = override.split("=", 1)[0].lstrip("+~")
        if (conf_dir / name.replace("/", os.sep)).is_dir():
            continue
        if key and (key == name or key.startswith((f"{name}.", f"{name}["))):
            return True
    return False


# Folders of conf/ that are not composed into params.yaml: Hydra's own settings and sweeps.
NOT_COMPOSED = ("hydra", "sweep")
# `${resolver:...}`: a conf file could copy the machine's environment (`oc.env`) into
# params.yaml, MLflow and the registry. Plain `${a.b}` references stay allowed.
RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")


def _package_prefix(text: str, group: tuple[str, ...]) -> str:
    """The key a conf file's values go under (its `# @package` header, else its group folder);
    empty for `_global_`."""
    header = re.search(r"^#\s*@package\s+(\S+)", text, re.MULTILINE)
    package = (header.group(1) if header else ".".join(group)).replace("_group_", ".".join(group))
    return "" if package == "_global_" else package


def _check_one_owner_per_key(conf_dir: Path) -> None:
    """Each key is set by one conf file: Hydra would let a later file (another team's) silently
    override an earlier one's value, e.g. loosen its gates. Options of a one-choice group
    (`tracking: local`) are alternatives and may set the same keys. No resolvers either, and
    no model file without a model."""
    import yaml

    defaults = (yaml.safe_load(read_yaml_text(conf_dir / f"{CONFIG_NAME}.yaml")) or {}).get("defaults") or []
    # Chosen one at a time in the defaults list, or by the schema (one `parallel`, however
    # config.yaml chooses it, or leaves it to the defaults).
    one_choice = {group for entry in defaults if isinstance(entry, dict)
                  for group, choice in entry.items() if isinstance(choice, str)}
    one_choice |= {name for name, kind in get_type_hints(PipelineConfig).items() if is_dataclass(kind)}
    owners: dict[str, tuple[Path, str, str]] = {}  # key set -> (file, its package, key)
    holders: dict[str, tuple[Path, str, str]] = {}  # a key holding keys set -> (the first file, its package, key)
    without_model: list[Path] = []
    for file in sorted(conf_dir.rglob("*.yaml")):
        relative = file.relative_to(conf_dir)
        if relative.parts[0] in NOT_COMPOSED:
            continue
        text = read_yaml_text(file)
        group = relative.parts[:-1]
        prefix = _package_prefix(text, group)
        try:  # libyaml: PyYAML's own parser took 0.4 s of `compose` at 50 models
            node = yaml.load(text, Loader=safe_loader()) or {}
        except yaml.YAMLError:
            continue  # Hydra reports it, naming the file
        leaves = list(_leaves(node, prefix))
        for key, value in leaves:
            if isinstance(value, str) and RESOLVER.search(value):
                raise ConfigError("resolvers (`${oc.env:…}` and the like) are not allowed in conf files: they would "
                                  "copy this machine's environment into params.yaml and MLflow", file=_relative(file),
                                  key=key)
            # The same key, or one holding the other (`nightly: 1.0` where conf/nightly/ sets
            # `nightly.tolerance.*`: Hydra keeps one and drops the other without a word).
            other, other_prefix, other_key = owners.get(key) or holders.get(key) or next(
                (owners[part] for part in _parents(key) if part in owners), (file, prefix, key))
            owners.setdefault(key, (file, prefix, key))
            for part in _parents(key):
                holders.setdefault(part, (file, prefix, key))
            alternatives = group and other.parent == file.parent and group[0] in one_choice
            if other != file and not alternatives:
                # The file whose package holds the key owns it (conf/validation/x.yaml for
                # validation.x.*); a broader file (a model's `_global_` one) is the intruder.
                owner, intruder = (other, file) if len(other_prefix) >= len(prefix) else (file, other)
                key = key if intruder == file else other_key
                owner_group = owner.parent.relative_to(conf_dir).parts
                # An option of a one-choice group stands for all of them: which is chosen is not known here.
                named = (f"the options of {_relative(owner.parent)}/" if owner_group and owner_group[0] in one_choice
                         else _relative(owner))
                raise ConfigError(f"also set by {named}: each key belongs to one conf file (Hydra would "
                                  "let one file override the other silently)", file=_relative(intruder), key=key)
        _check_builds_of_own_models(leaves, file)
        if group == ("model",) and not any(key.startswith("model.") for key, _ in leaves):
            without_model.append(file)
    if without_model:  # after the keys' owners: a conflict says more
        # Selected, it would add nothing and the run would build less than asked, silently.
        raise ConfigError("declares no model: a model file holds `model: {<name>: …}` and its builds (see "
                          "conf/model/digits.yaml)", file=_relative(without_model[0]), key="model")


def _check_builds_of_own_models(leaves: list[tuple[str, Any]], file: Path) -> None:
    """A conf file builds and auto-selects the models it declares, and no other: another team's
    file could otherwise add a build of this team's model under gates of its own choosing, and
    the run would deliver and register it under this team's name. `leaves`: the file's (key, value)s."""
    declared = {key.split(".")[1] for key, _ in leaves if key.startswith("model.")}
    for key, value in leaves:
        parts = key.split(".")
        if parts[0] == "build" and parts[-1] == "model" and len(parts) == 3:
            target = value
        elif parts[0] == "autoselect" and len(parts) >= 2:
            target, key = parts[1], f"autoselect.{parts[1]}"
        else:
            continue
        if target not in declared:
            raise ConfigError(f"builds model '{target}', which this file does not declare: a conf file builds and "
                              "auto-selects its own models only", file=_relative(file), key=key)


def _parents(key: str) -> list[str]:
    """The keys holding `key`: `a` and `a.b` for `a.b.c`."""
    parts = key.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def _leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(full key, value) of every value a YAML tree sets (lists are values; `defaults` is Hydra's)."""
    if isinstance(node, dict):
        for name, value in node.items():
            if not prefix and name == "defaults":
                continue
            yield from _leaves(value, f"{prefix}.{name}" if prefix else str(name))
    else:
        yield prefix, node


def conf_file_setting(conf_dir: Path, full_key: str | None, value: Any) -> str | None:
    """The conf file that sets `full_key` to `value` (relative to the working folder), or None:
    a value params.yaml holds but no conf file set (an override, a hand edit) stays params.yaml's."""
    found = _conf_file_defining(Path(conf_dir).resolve(), full_key, with_value=True)
    if found is None or found[1] is _UNSET or found[1] != value:
        return None
    return _relative(found[0])


def _conf_file_defining(conf_dir: Path, full_key: str | None, *, with_value: bool = False) -> Any:
    """Which conf file sets `full_key`: the one setting the longest part of it, else the one whose
    package holds it (a default the file left out). Names may contain dots (`build.a-../../x`),
    so keys are matched against each file's own keys rather than split on dots."""
    import yaml

    if not full_key:
        return None
    best: tuple[int, int, str] | None = None
    for file in sorted(conf_dir.rglob("*.yaml")):
        text = file.read_text(encoding="utf-8")
        prefix = _package_prefix(text, file.parent.relative_to(conf_dir).parts)
        if prefix and not (full_key == prefix or full_key.startswith(prefix + ".")):
            continue
        try:
            node: Any = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            continue
        node, remaining, depth = _walk(node, full_key[len(prefix) + 1:] if prefix else full_key)
        score = (depth, len(prefix), str(file), _UNSET if remaining else node)  # a key set beats a package holding it
        if (depth or prefix) and (best is None or score[:2] > best[:2]):
            best = score
    if best is None:
        return None
    return (best[2], best[3]) if with_value else best[2]


def plain(obj: Any) -> Any:
    """A config dataclass as plain JSON-able data (enums by name), as OmegaConf's
    `to_container(structured(obj), enum_to_str=True)` gives it for a validated config, in a
    fraction of the time (1.5 s of `compose` at 50 models went to OmegaConf's walk)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {name: plain(getattr(obj, name)) for name in obj.__dataclass_fields__}
    if isinstance(obj, Enum):
        return obj.name
    if isinstance(obj, dict):
        return {key: plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(value) for value in obj]
    return obj


def config_hash(*parts: Any) -> str:
    """A stable hash of config objects (dataclasses or plain data)."""
    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
