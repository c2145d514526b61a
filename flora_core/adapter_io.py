"""Adapter directories on disk: load, save, and check them against a base model.

Layout (PEFT's): `<dir>/adapter_config.json` and `<dir>/adapter_model.safetensors`. Only
safetensors is read; pickled weights (adapter_model.bin, *.pt, ...) are refused, never opened.

Tensor keys are "base_model.model." + the module name as `model.named_modules()` of the causal
LM gives it (e.g. "model.layers.0.self_attn.q_proj") + a suffix per kind:

    LORA   <m>.lora_A.weight [r, d_in]    <m>.lora_B.weight [d_out, r]
           + <m>.lora_magnitude_vector [d_out] with DoRA (use_dora)
    IA3    <m>.ia3_l [d_out, 1], or [1, d_in] for PEFT's feedforward_modules
    FLORA  <m>.flora_in [r, d_in]         <m>.flora_out [r, d_out]

On load, PEFT's adapter-name-qualified spelling (".lora_A.default.weight", ".ia3_l.default") is
accepted too. Floating-point dtypes only (F16, BF16, F32, F64); the dtype is kept as stored.

FLoRA (our own format, version 1). adapter_config.json:

    {"peft_type": "FLORA", "r": 8, "target_modules": ["q_proj", "v_proj"],
     "base_model_name_or_path": "org/model" or null, "flora_format_version": 1,
     "rank_pattern": {...}}        # optional, per-module ranks matched as LoRA's rank_pattern

Each targeted linear layer becomes W = W0 o (flora_out^T @ flora_in / r), o element-wise: the
mean over rank j of the rank-1 masks outer(flora_out[j], flora_in[j]). All-ones factors give the
base model; the layer's bias is not scaled (see `adapter_weights.FloraModule`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flora_core.adapter_config import (
    CONFIG_NAME,
    FLORA_FORMAT_VERSION,
    AdapterConfig,
    is_embedding_or_head,
    parse_adapter_config,
    read_adapter_config,
)
from flora_core.adapter_weights import (
    AdapterKind,
    AdapterWeights,
    FloraModule,
    Ia3Module,
    LoraModule,
    ModuleWeights,
)

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
# A config built on save writes lora_alpha with alpha / r nearest the module's scale; for some
# (scale, r) no float alpha hits it exactly, and the saved scale is then off by about one ulp.
_BUILT_SCALE_REL_TOL = 2.0**-50
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_KEY_FORMS = {
    AdapterKind.LORA: re.compile(
        r"(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)(?:\.default)?\.weight"
        r"|(?P<dora>lora_magnitude_vector)(?:\.default)?(?:\.weight)?)"),
    AdapterKind.IA3: re.compile(r"(?P<module>.+)\.(?P<part>ia3_l)(?:\.default)?"),
    AdapterKind.FLORA: re.compile(r"(?P<module>.+)\.(?P<part>flora_in|flora_out)"),
}
_KEY_EXAMPLES = {
    AdapterKind.LORA: "<module>.lora_A.weight / <module>.lora_B.weight (/ <module>.lora_magnitude_vector)",
    AdapterKind.IA3: "<module>.ia3_l",
    AdapterKind.FLORA: "<module>.flora_in / <module>.flora_out",
}
# Substrings of keys we recognise but cannot serve, and why.
_KEY_HINTS = (
    ("lora_embedding_", "LoRA on an embedding layer is not supported yet"),
    ("lora_B.bias", "a trained lora_B bias (lora_bias) is not supported yet"),
    ("modules_to_save", "modules_to_save (full module copies) is not supported yet"),
    ("trainable_tokens", "trained embedding rows (trainable_token_indices) are not supported yet"),
)


def load_adapter(
    path: str | os.PathLike, *, max_bytes: int | None = None, max_rank: int | None = None
) -> AdapterWeights:
    """Read and validate one adapter directory (LoRA, IA3 or FLoRA).

    max_bytes bounds the weights file and the tensors it declares; max_rank bounds every
    module's rank (LoRA and FLoRA). None means no bound. Raises ValueError naming the file,
    key or field at fault and the fix.
    """
    _check_limit("max_bytes", max_bytes, minimum=0)
    _check_limit("max_rank", max_rank, minimum=1)
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(
            f"{directory} is not a directory; an adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    config = read_adapter_config(directory)
    weights_path = _weights_file(directory)
    source = str(weights_path)
    tensors = _read_tensors(weights_path, max_bytes)
    modules: dict[str, ModuleWeights] = {}
    for name, parts in _group_by_module(tensors, config.kind, source).items():
        module = _build_module(config.kind, name, parts, config, source)
        _check_module(name, module, source)
        _check_against_config(name, module, config, source)
        modules[name] = module
    if max_rank is not None:
        _check_max_rank(modules, max_rank, source)
    return AdapterWeights(kind=config.kind, modules=modules, config=dict(config.raw))


def save_adapter(adapter: AdapterWeights, path: str | os.PathLike) -> None:
    """Write `adapter` as a directory that `load_adapter` (and PEFT, for LoRA / IA3) can read.

    adapter.config is written as adapter_config.json and must agree with the weights (ranks,
    scales, feedforward modules); an empty config is replaced by one built from the weights.
    """
    if not adapter.modules:
        raise ValueError("the adapter has no modules; there is nothing to save")
    for name, module in adapter.modules.items():
        _check_module_name(name, "adapter.modules")
        _check_kind(adapter.kind, name, module)
        _check_module(name, module, "adapter.modules")
        _check_finite(name, module)
    raw = dict(adapter.config) if adapter.config else _default_config(adapter)
    config = parse_adapter_config(raw, source="adapter.config")
    if config.kind is not adapter.kind:
        raise ValueError(f"adapter.config says peft_type {raw['peft_type']!r} but the adapter is {adapter.kind.value}")
    scale_rel_tol = 0.0 if adapter.config else _BUILT_SCALE_REL_TOL
    for name, module in adapter.modules.items():
        _check_against_config(name, module, config, "adapter.config", scale_rel_tol)
    try:
        config_text = json.dumps(raw, indent=2, sort_keys=True) + "\n"
    except TypeError as err:
        raise ValueError(f"adapter.config is not JSON-serializable ({err}); keep it to plain JSON values") from err
    tensors = {key: t.detach().cpu().clone(memory_format=torch.contiguous_format) for key, t in _to_tensors(adapter)}
    _write_directory(Path(path), config_text, tensors)


def _write_directory(directory: Path, config_text: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write both files through temporary names, so a failed save leaves no half-written file."""
    directory.mkdir(parents=True, exist_ok=True)
    config_tmp, weights_tmp = directory / f".{CONFIG_NAME}.tmp", directory / f".{WEIGHTS_NAME}.tmp"
    try:
        config_tmp.write_text(config_text, encoding="utf-8")
        save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
    finally:
        config_tmp.unlink(missing_ok=True)
        weights_tmp.unlink(missing_ok=True)


def check_adapter_fits(adapter: AdapterWeights, module_shapes: Mapping[str, tuple[int, int]]) -> None:
    """Raise ValueError unless every module of `adapter` is a layer of the base model of matching size.

    module_shapes: module name -> (d_in, d_out) of each layer that can take an adapter.
    """
    for name, module in adapter.modules.items():
        if name not in module_shapes:
            examples = sorted(module_shapes)[:3]
            raise ValueError(
                f"adapter module {name!r} matches no adapter-capable layer of the base model "
                f"(layers are named like {examples}); was the adapter trained for another model?"
            )
        expected = module_shapes[name]
        got = _module_dims(module)
        for label, want, have in (("d_in", expected[0], got[0]), ("d_out", expected[1], got[1])):
            if have is not None and have != want:
                raise ValueError(
                    f"adapter module {name!r} has {label}={have} but the base model's layer has {label}={want}; "
                    "was the adapter trained for another model?"
                )


def _module_dims(module: ModuleWeights) -> tuple[int | None, int | None]:
    """(d_in, d_out) the module implies; None where it says nothing (one side of IA3)."""
    if isinstance(module, LoraModule):
        return module.a.shape[1], module.b.shape[0]
    if isinstance(module, FloraModule):
        return module.flora_in.shape[1], module.flora_out.shape[1]
    n = module.scale.shape[0]
    return (n, None) if module.on_input else (None, n)


def _check_limit(name: str, value: int | None, *, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name}={value!r}; pass an int >= {minimum}, or None for no bound")


def _weights_file(directory: Path) -> Path:
    """The safetensors file of `directory`; refuses pickled weights without opening them."""
    path = directory / WEIGHTS_NAME
    if path.is_file():
        return path
    pickled = sorted(p.name for pattern in _PICKLE_GLOBS for p in directory.glob(pattern))
    if pickled:
        raise ValueError(
            f"{directory} holds pickled weights {pickled} and no {WEIGHTS_NAME}; pickled weights are refused "
            "because unpickling can run code. Convert them in a trusted environment: load the adapter with "
            f"peft.PeftModel.from_pretrained and call save_pretrained(dir, safe_serialization=True)"
        )
    raise ValueError(f"{directory} has no {WEIGHTS_NAME}; save the adapter with safetensors next to {CONFIG_NAME}")


def _read_tensors(path: Path, max_bytes: int | None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, after checking its size, header, dtypes and values."""
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{path} is {size} bytes, over max_bytes={max_bytes}; raise the limit or shrink the adapter")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = sorted(f.keys())
            _check_header(f, keys, path, max_bytes)
            tensors = {key: f.get_tensor(key) for key in keys}
    except SafetensorError as err:
        message = f"{path} is not a readable safetensors file ({err}); it may be truncated, save it again"
        raise ValueError(message) from err
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or Inf; the adapter is broken, re-export it")
    return tensors


def _check_header(f: Any, keys: list[str], path: Path, max_bytes: int | None) -> None:
    """Dtypes and total byte count, read from the header before any tensor is loaded."""
    if not keys:
        raise ValueError(f"{path} holds no tensors; the adapter is empty")
    total = 0
    for key in keys:
        tensor_slice = f.get_slice(key)
        dtype = tensor_slice.get_dtype()
        if dtype not in _DTYPE_BYTES:
            raise ValueError(
                f"{path}: tensor {key!r} has dtype {dtype}; adapter weights must be one of {sorted(_DTYPE_BYTES)}"
            )
        total += math.prod(tensor_slice.get_shape()) * _DTYPE_BYTES[dtype]
    if max_bytes is not None and total > max_bytes:
        raise ValueError(f"{path}: tensors take {total} bytes, over max_bytes={max_bytes}; raise the limit")


def _group_by_module(
    tensors: Mapping[str, torch.Tensor], kind: AdapterKind, source: str
) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {part ("lora_A", "ia3_l", "flora_in", ...): tensor}, sorted by module name."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        match = _KEY_FORMS[kind].fullmatch(key[len(KEY_PREFIX):]) if key.startswith(KEY_PREFIX) else None
        if match is None:
            raise ValueError(_unknown_key_message(key, kind, source))
        name, part = match["module"], match["part"] or match.groupdict().get("dora")
        _check_module_name(name, f"{source}: key {key!r}")
        parts = groups.setdefault(name, {})
        if part in parts:
            raise ValueError(f"{source}: module {name!r} has {part} twice (key {key!r}); keep one spelling of the key")
        parts[part] = tensors[key]
    return groups


def _unknown_key_message(key: str, kind: AdapterKind, source: str) -> str:
    for fragment, why in _KEY_HINTS:
        if fragment in key:
            return f"{source}: key {key!r}: {why}; retrain without it, or merge it into the base model"
    return (
        f"{source}: key {key!r} is not of a known form for a {kind.value} adapter; expected "
        f"{KEY_PREFIX}{_KEY_EXAMPLES[kind]} (check peft_type in {CONFIG_NAME})"
    )


def _check_module_name(name: str, where: str) -> None:
    if is_embedding_or_head(name):
        raise ValueError(
            f"{where}: module {name!r} is lm_head or an embedding; adapters there are not supported yet, "
            "retrain targeting only linear layers inside the transformer blocks"
        )


def _build_module(
    kind: AdapterKind, name: str, parts: dict[str, torch.Tensor], config: AdapterConfig, source: str
) -> ModuleWeights:
    """One module's weights from its tensors as stored (IA3 flattened to 1-D)."""
    needed = {AdapterKind.LORA: ("lora_A", "lora_B"), AdapterKind.FLORA: ("flora_in", "flora_out")}.get(kind, ())
    for part in needed:
        if part not in parts:
            present = sorted(parts)
            raise ValueError(f"{source}: module {name!r} has {present} but no {part}; it needs both {list(needed)}")
    if kind is AdapterKind.LORA:
        return LoraModule(a=parts["lora_A"], b=parts["lora_B"], scale=config.scale_for(name),
                          magnitude=parts.get("lora_magnitude_vector"))
    if kind is AdapterKind.FLORA:
        return FloraModule(flora_in=parts["flora_in"], flora_out=parts["flora_out"])
    return _build_ia3(name, parts["ia3_l"], config.is_feedforward(name), source)


def _build_ia3(name: str, tensor: torch.Tensor, on_input: bool, source: str) -> Ia3Module:
    """PEFT stores ia3_l as [1, d_in] for feedforward modules, [d_out, 1] otherwise."""
    expected = "[1, d_in] (a feedforward module)" if on_input else "[d_out, 1]"
    if tensor.dim() != 2 or tensor.shape[0 if on_input else 1] != 1:
        raise ValueError(
            f"{source}: module {name!r} ia3_l has shape {list(tensor.shape)} but must be {expected}; "
            f"check feedforward_modules in {CONFIG_NAME}"
        )
    return Ia3Module(scale=tensor.reshape(-1), on_input=on_input)


def _check_module(name: str, module: ModuleWeights, where: str) -> None:
    """Shapes of one module: 2-D factors of one shared rank, or a 1-D IA3 scale."""
    if isinstance(module, Ia3Module):
        if module.scale.dim() != 1 or module.scale.numel() == 0:
            shape = list(module.scale.shape)
            raise ValueError(f"{where}: module {name!r} IA3 scale has shape {shape}; it must be 1-D and non-empty")
        return
    if isinstance(module, LoraModule):
        first, second, rank_dims = ("lora_A [r, d_in]", module.a), ("lora_B [d_out, r]", module.b), (0, 1)
    else:
        first, second = ("flora_in [r, d_in]", module.flora_in), ("flora_out [r, d_out]", module.flora_out)
        rank_dims = (0, 0)
    for label, tensor in (first, second):
        if tensor.dim() != 2 or 0 in tensor.shape:
            shape = list(tensor.shape)
            raise ValueError(f"{where}: module {name!r} {label} has shape {shape}; it must be 2-D and non-empty")
    if first[1].shape[rank_dims[0]] != second[1].shape[rank_dims[1]]:
        raise ValueError(
            f"{where}: module {name!r} ranks disagree: {first[0]} has shape {list(first[1].shape)}, "
            f"{second[0]} has shape {list(second[1].shape)}; re-export the adapter"
        )
    magnitude = getattr(module, "magnitude", None)
    if magnitude is not None and tuple(magnitude.shape) != (module.b.shape[0],):
        raise ValueError(f"{where}: module {name!r} lora_magnitude_vector has shape {list(magnitude.shape)}; DoRA "
                         f"needs one entry per output, [{module.b.shape[0]}]")


def _check_finite(name: str, module: ModuleWeights) -> None:
    for field_name, value in vars(module).items():
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"adapter.modules: module {name!r} {field_name} holds NaN or Inf; fix the weights")


def _check_kind(kind: AdapterKind, name: str, module: ModuleWeights) -> None:
    expected = {AdapterKind.LORA: LoraModule, AdapterKind.FLORA: FloraModule, AdapterKind.IA3: Ia3Module}[kind]
    if not isinstance(module, expected):
        raise ValueError(f"adapter.modules: module {name!r} is a {type(module).__name__} in a {kind.value} adapter")


def _check_against_config(
    name: str, module: ModuleWeights, config: AdapterConfig, where: str, scale_rel_tol: float = 0.0
) -> None:
    """Ranks (LoRA, FLoRA), scales (LoRA) and feedforward flags (IA3) must be what the config says."""
    if isinstance(module, Ia3Module):
        if config.is_feedforward(name) != module.on_input:
            raise ValueError(
                f"{where}: module {name!r} has on_input={module.on_input} but feedforward_modules="
                f"{config.feedforward_modules!r} says {config.is_feedforward(name)}; make them agree"
            )
        return
    if config.rank_for(name) != module.rank:
        raise ValueError(
            f"{where}: {CONFIG_NAME} gives module {name!r} rank {config.rank_for(name)} (r / rank_pattern) "
            f"but its weights have rank {module.rank}; fix r or rank_pattern"
        )
    if isinstance(module, LoraModule) and config.use_dora != (module.magnitude is not None):
        has = "has" if module.magnitude is not None else "has no"
        raise ValueError(f"{where}: module {name!r} {has} lora_magnitude_vector but use_dora is {config.use_dora} in "
                         f"{CONFIG_NAME}; DoRA adapters need both, plain LoRA neither")
    scale = config.scale_for(name) if isinstance(module, LoraModule) else None
    if scale is not None and not math.isclose(scale, module.scale, rel_tol=scale_rel_tol, abs_tol=0.0):
        raise ValueError(
            f"{where}: {CONFIG_NAME} gives module {name!r} scale {scale!r} "
            f"(lora_alpha / alpha_pattern / use_rslora) but the module has scale {module.scale!r}; make them agree"
        )


def _check_max_rank(modules: Mapping[str, ModuleWeights], max_rank: int, source: str) -> None:
    for name, module in modules.items():
        if not isinstance(module, Ia3Module) and module.rank > max_rank:
            raise ValueError(f"{source}: module {name!r} has rank {module.rank}, above max_rank={max_rank}; raise it")


def _to_tensors(adapter: AdapterWeights) -> list[tuple[str, torch.Tensor]]:
    """(PEFT-style key, tensor) pairs for every module of `adapter`."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, m in sorted(adapter.modules.items()):
        key = KEY_PREFIX + name
        if isinstance(m, LoraModule):
            out += [(f"{key}.lora_A.weight", m.a), (f"{key}.lora_B.weight", m.b)]
            if m.magnitude is not None:
                out.append((f"{key}.lora_magnitude_vector", m.magnitude))
        elif isinstance(m, FloraModule):
            out += [(f"{key}.flora_in", m.flora_in), (f"{key}.flora_out", m.flora_out)]
        else:
            out.append((f"{key}.ia3_l", m.scale.reshape(1, -1) if m.on_input else m.scale.reshape(-1, 1)))
    return out


def _default_config(adapter: AdapterWeights) -> dict[str, object]:
    """An adapter_config.json that describes `adapter` exactly, with per-module patterns where needed."""
    names = sorted(adapter.modules)
    base: dict[str, object] = {"target_modules": names, "base_model_name_or_path": None}
    if adapter.kind is AdapterKind.IA3:
        ff = [n for n in names if adapter.modules[n].on_input]
        ia3 = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "feedforward_modules": ff, "fan_in_fan_out": False}
        return {**base, **ia3}
    r = max(adapter.modules[n].rank for n in names)
    rank_pattern = {re.escape(n): adapter.modules[n].rank for n in names if adapter.modules[n].rank != r}
    if adapter.kind is AdapterKind.FLORA:
        extra = {"rank_pattern": rank_pattern} if rank_pattern else {}
        return {**base, "peft_type": "FLORA", "r": r, "flora_format_version": FLORA_FORMAT_VERSION, **extra}
    alphas = {n: _alpha_for(adapter.modules[n].scale, adapter.modules[n].rank) for n in names}
    alpha = next(alphas[n] for n in names if adapter.modules[n].rank == r)
    alpha_pattern = {re.escape(n): a for n, a in alphas.items() if a != alpha}
    return {
        **base, "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": False,
        "use_dora": any(adapter.modules[n].magnitude is not None for n in names),
        "fan_in_fan_out": False, "bias": "none",
    }


def _alpha_for(scale: float, r: int) -> float:
    """The lora_alpha whose alpha / r (PEFT's scale) is nearest to `scale`: exact whenever any float is.

    Not every scale is reachable: for r = 9, consecutive alphas give quotients more than one ulp apart.
    """
    alpha = up = down = float(scale) * r
    candidates = [alpha]
    for _ in range(4):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    return min(candidates, key=lambda a: abs(a / r - scale))
