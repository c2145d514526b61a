"""adapter_config.json: parse it, refuse what we cannot serve, and answer rank / scale per module.

Three kinds share PEFT's file: "LORA" and "IA3" as PEFT writes them, and our own "FLORA"
(documented in `flora_core.adapter_io`). Per-module rank and scale follow PEFT exactly:

    r_key = first key k of rank_pattern with re.match(rf"(.*\\.)?({k})$", module_name), else none
    r     = rank_pattern[r_key] if r_key else r           (same for alpha with alpha_pattern)
    scale = alpha / r, or alpha / sqrt(r) with use_rslora  (peft/tuners/lora/layer.py update_layer)

IA3 modules scale their input instead of their output when they are "feedforward" in PEFT's
sense (peft/tuners/ia3/model.py `_check_target_module_feedforward`): a string is a regex that
must `re.fullmatch` the module name; a list matches when the module name ends with an entry.

`fan_in_fan_out` (GPT-2's Conv1D) only changes how PEFT merges into the base weight: the saved
lora_A is [r, d_in] and lora_B [d_out, r] either way, so it is kept but changes nothing here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Union

from flora_core.adapter_weights import AdapterKind

CONFIG_NAME = "adapter_config.json"
FLORA_FORMAT_VERSION = 1

_KINDS = {"LORA": AdapterKind.LORA, "IA3": AdapterKind.IA3, "FLORA": AdapterKind.FLORA}
_FLORA_FIELDS = frozenset(
    {"peft_type", "r", "target_modules", "base_model_name_or_path", "flora_format_version", "rank_pattern"}
)
_RETRAIN = "retrain the adapter without it, or merge it into the base model and serve that model"

# PEFT options whose weights mean something other than plain LoRA / IA3: (field, what it is).
# Any value other than null / false / empty is refused.
_UNSUPPORTED_OPTIONS: tuple[tuple[str, str], ...] = (
    ("modules_to_save", "fully trained copies of whole modules"),
    ("target_parameters", "LoRA on raw parameters (e.g. MoE experts)"),
    ("layer_replication", "layer replication"),
    ("trainable_token_indices", "trained embedding rows"),
    ("use_qalora", "QA-LoRA"),
    ("lora_bias", "a trained bias on lora_B"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("velora_config", "the VeLoRA variant"),
    ("monteclora_config", "the MonteCLoRA variant"),
    ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"),
    ("arrow_config", "Arrow routing"),
    ("kasa_config", "the KaSA variant"),
)
# init_lora_weights values after which the adapter only works on a base model PEFT modified.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_EMBEDDING_LEAVES = frozenset({"lm_head", "wte", "wpe", "embed_out"})

PatternTargets = Union[tuple[str, ...], str, None]


def is_embedding_or_head(module_name: str) -> bool:
    """True for lm_head and embedding modules (embed_tokens, wte, wpe, ...), which we cannot adapt."""
    leaf = module_name.rsplit(".", 1)[-1]
    return leaf in _EMBEDDING_LEAVES or "embed" in leaf


def pattern_key(pattern_keys: Mapping[str, object], module_name: str) -> str | None:
    """The first key that PEFT's `get_pattern_key` would match against `module_name`, or None."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """A validated adapter_config.json.

    r / lora_alpha: the defaults for modules no pattern matches (r is None for IA3, lora_alpha
    is None for IA3 and FLoRA). target_modules / feedforward_modules: a list (kept as a tuple)
    or a regex string, as PEFT allows. raw: the whole JSON object, unchanged.
    """

    kind: AdapterKind
    r: int | None
    lora_alpha: float | None
    use_rslora: bool
    use_dora: bool  # DoRA: every LoRA module carries a magnitude vector
    target_modules: PatternTargets
    fan_in_fan_out: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    feedforward_modules: PatternTargets
    base_model_name_or_path: str | None
    raw: Mapping[str, Any] = field(repr=False)

    def rank_for(self, module_name: str) -> int:
        """The rank PEFT would give `module_name` (rank_pattern first, else r)."""
        if self.r is None:
            raise ValueError(f"{self.kind.value} adapters have no rank; rank_for({module_name!r}) is undefined")
        key = pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def scale_for(self, module_name: str) -> float:
        """LoRA's scale for `module_name`: alpha / r, or alpha / sqrt(r) with use_rslora."""
        if self.lora_alpha is None:
            raise ValueError(f"only LoRA adapters have a scale; {self.kind.value} has none ({module_name!r})")
        key = pattern_key(self.alpha_pattern, module_name)
        alpha = self.lora_alpha if key is None else self.alpha_pattern[key]
        r = self.rank_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def is_feedforward(self, module_name: str) -> bool:
        """IA3: whether PEFT scales this module's input ([1, d_in]) rather than its output ([d_out, 1])."""
        targets = self.feedforward_modules
        if targets is None:
            return False
        if isinstance(targets, str):
            return re.fullmatch(targets, module_name) is not None
        return any(module_name.endswith(target) for target in targets)


def read_adapter_config(directory: Path) -> AdapterConfig:
    """Read and validate `directory/adapter_config.json`."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing: an adapter directory needs {CONFIG_NAME} next to its weights")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or re-save the file") from err
    return parse_adapter_config(data, source=str(path))


def parse_adapter_config(data: Any, *, source: str = CONFIG_NAME) -> AdapterConfig:
    """Validate the parsed JSON of an adapter_config.json (source names the file in errors)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError(f"{source}: field 'peft_type' is missing; set it to one of {sorted(_KINDS)}")
    if peft_type not in _KINDS:
        raise ValueError(f"{source}: peft_type={peft_type!r} is not supported; use one of {sorted(_KINDS)}")
    kind = _KINDS[peft_type]
    if kind is AdapterKind.FLORA:
        _check_flora_fields(data, source)
    else:
        _check_supported_options(data, source)
    target_modules = _targets(data, "target_modules", source)
    _check_targets_not_embeddings(target_modules, source)
    rank_pattern = _rank_pattern(data, source) if kind is not AdapterKind.IA3 else {}
    alpha_pattern = _alpha_pattern(data, source) if kind is AdapterKind.LORA else {}
    return AdapterConfig(
        kind=kind,
        r=None if kind is AdapterKind.IA3 else _positive_int(data.get("r", _default_r(kind)), "r", source),
        lora_alpha=_number(data.get("lora_alpha", 8), "lora_alpha", source) if kind is AdapterKind.LORA else None,
        use_rslora=_bool(data, "use_rslora", source) if kind is AdapterKind.LORA else False,
        use_dora=_bool(data, "use_dora", source) if kind is AdapterKind.LORA else False,
        target_modules=target_modules,
        fan_in_fan_out=_bool(data, "fan_in_fan_out", source),
        rank_pattern=MappingProxyType(rank_pattern),
        alpha_pattern=MappingProxyType(alpha_pattern),
        feedforward_modules=_targets(data, "feedforward_modules", source) if kind is AdapterKind.IA3 else None,
        base_model_name_or_path=_optional_str(data, "base_model_name_or_path", source),
        raw=MappingProxyType(dict(data)),
    )


def _default_r(kind: AdapterKind) -> int | None:
    """PEFT's LoraConfig defaults r to 8; our FLoRA format requires it."""
    return 8 if kind is AdapterKind.LORA else None


def _check_supported_options(data: Mapping[str, Any], source: str) -> None:
    """Refuse PEFT options whose saved weights we would serve wrongly."""
    for name, what in _UNSUPPORTED_OPTIONS:
        value = data.get(name)
        if value not in (None, False, [], {}, ""):
            raise ValueError(f"{source}: {name}={value!r} ({what}) is not supported yet; {_RETRAIN}")
    bias = data.get("bias", "none")
    if bias not in (None, "none"):
        raise ValueError(f"{source}: bias={bias!r} (trained base-layer biases) is not supported yet; use bias='none'")
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{source}: init_lora_weights={init!r} means the adapter needs a base model that PEFT modified; "
            "convert it to plain LoRA first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )


def _check_flora_fields(data: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(data) - _FLORA_FIELDS)
    if unknown:
        raise ValueError(
            f"{source}: unknown field(s) {unknown} for peft_type 'FLORA'; allowed: {sorted(_FLORA_FIELDS)}"
        )
    version = data.get("flora_format_version")
    if version != FLORA_FORMAT_VERSION:
        raise ValueError(
            f"{source}: flora_format_version={version!r} is not supported; this reader understands "
            f"flora_format_version={FLORA_FORMAT_VERSION}"
        )


def _check_targets_not_embeddings(targets: PatternTargets, source: str) -> None:
    if isinstance(targets, str):
        names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", targets)
    else:
        names = [t.rsplit(".", 1)[-1] for t in targets or ()]
    bad = sorted({n for n in names if is_embedding_or_head(n)})
    if bad:
        raise ValueError(
            f"{source}: target_modules includes {bad}; adapters on lm_head or embeddings are not supported "
            "yet, retrain targeting only linear layers inside the transformer blocks"
        )


def _targets(data: Mapping[str, Any], name: str, source: str) -> PatternTargets:
    value = data.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{source}: {name}={value!r}; expected a list of module names or a regex string")


def _rank_pattern(data: Mapping[str, Any], source: str) -> dict[str, int]:
    pattern = _mapping(data, "rank_pattern", source)
    return {k: _positive_int(v, f"rank_pattern[{k!r}]", source) for k, v in pattern.items()}


def _alpha_pattern(data: Mapping[str, Any], source: str) -> dict[str, float]:
    pattern = _mapping(data, "alpha_pattern", source)
    return {k: _number(v, f"alpha_pattern[{k!r}]", source) for k, v in pattern.items()}


def _mapping(data: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {name}={value!r}; expected an object mapping module-name patterns to values")
    for key in value:
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{source}: {name} key {key!r} is not a valid regex ({err})") from err
    return value


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: {name}={value!r}; it must be a positive integer (the adapter rank)")
    return value


def _number(value: Any, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{source}: {name}={value!r}; it must be a finite number")
    return float(value)


def _bool(data: Mapping[str, Any], name: str, source: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {name}={value!r}; it must be true or false")
    return value


def _optional_str(data: Mapping[str, Any], name: str, source: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{source}: {name}={value!r}; it must be a string or null")
    return value
