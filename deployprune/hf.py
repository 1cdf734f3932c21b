"""Hugging Face model directories: loaded without running their code, compacted models written back.

A directory written by ``save_pretrained`` (``config.json`` plus ``model.safetensors``, or shards
listed in ``model.safetensors.index.json``) is read like this (:func:`read_directory`):

* ``config.json`` is parsed as JSON. A config that names custom code (``auto_map``, the
  ``trust_remote_code`` route) is refused: deployprune never imports code from a model directory.
* The architecture is ``config["architectures"][0]``, looked up *only* among transformers' own
  classes (``getattr(transformers, name)``, a subclass of ``PreTrainedModel`` whose config class
  has the directory's ``model_type``). The model is built from the config.
* Weights come from the safetensors files only (``safetensors.torch.load_file``, size-checked, shard
  names plain files inside the directory); a directory with only ``pytorch_model.bin`` (a pickle) is
  refused. transformers' own loading then gets the parsed config and those tensors (so the
  architecture's checkpoint key conversions and weight tying apply); every key must fit.
* Masks come from ``--masks`` (NNI layout, module names of the library model). Zero rows of the
  weights are never guessed to be masks: a zero row is not a request to remove a unit.

Example inputs are keyword inputs (:func:`parse_keyword_input`: ``input_ids=1,128``), checked
against the forward signature, or defaults for the model's main input (:func:`default_inputs`).

The compacted model is written back by :func:`save_compacted`: when its widths can be expressed by
the config (every layer pruned alike: ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads`` ... with ``head_dim`` kept), with ``save_pretrained`` and the updated
config, so that ``from_pretrained`` loads it cleanly; otherwise as the original config, the
safetensors weights and ``deployprune_widths.json``, the per-module sizes from which
:func:`load_compacted` rebuilds it. Either way the written directory is loaded back and compared
with the compact model before it is moved into place.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapt import KeywordModel, flat_outputs
from .errors import DeployPruneError, InputError, MaskError, UnsafeFileError, UnsupportedError, UsageError, one_line
from .io import (
    CHECKPOINT_FORMAT,
    DEFAULT_MAX_FILE_BYTES,
    InputShape,
    LoadedModel,
    check_input_file,
    dtype_name,
    parse_input_shape,
    torch_load,
)
from .masks import Masks, normalize_masks
from .pipeline import FinalizeOutcome

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WIDTHS_FILE = "deployprune_widths.json"
WIDTHS_FORMAT = "deployprune.hf_widths"
WIDTHS_VERSION = 1
#: JSON files of a model directory bigger than this are refused (config, index, widths).
MAX_JSON_BYTES = 64 * 1024**2
#: The wrapper that gives the pipeline a tensor-in/tensor-out view names the model ``model``.
PREFIX = "model."

#: Config fields that size an MLP (the perturbation in :func:`config_for_widths` finds which
#: parameters each one sizes, so a field that means something else here is simply not used).
MLP_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "hidden_dim", "encoder_ffn_dim",
            "decoder_ffn_dim", "ffn_hidden_size", "mlp_dim")
#: Config fields that count attention heads.
HEAD_KEYS = ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "encoder_attention_heads",
             "decoder_attention_heads", "multi_query_group_num", "n_head_kv", "num_kv_heads")
#: Fields whose ``None`` (or absence) means a value derived from others; pinned before widths change,
#: so that head_dim stays what it is when the head count drops.
_PINNED_DEFAULTS = {
    "head_dim": lambda c: c.hidden_size // c.num_attention_heads,
    "n_inner": lambda c: 4 * c.n_embd,
}
#: Files of a model directory copied next to a compacted model (tokenizer, processor, generation).
_SIDE_FILES = re.compile(
    r"(tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)"
    r"|merges\.txt|spiece\.model|sentencepiece\.bpe\.model|(pre)?processor_config\.json|chat_template\.(jinja|json)"
    r"|generation_config\.json)"
)


# --------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------


def transformers_module() -> Any:
    """``import transformers``, first making torchvision importable next to a CPU torch.

    transformers imports torchvision when it is installed; torchvision's wheel for this torch
    release is a CUDA build whose operators do not register against the CPU build, so the shim of
    :mod:`deployprune._compat` is applied first (it only skips those failing registrations).
    """
    if importlib.util.find_spec("torchvision") is not None:
        from ._compat import tolerate_missing_torchvision_ops

        tolerate_missing_torchvision_ops()
    try:
        import transformers
    except ImportError as exc:
        raise UnsupportedError(f"Hugging Face model directories need the transformers package ({exc}); "
                               "pip install transformers safetensors") from None
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own warnings and progress bars off inside (its messages are about configs we built)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()




def is_model_directory(path: str | os.PathLike) -> bool:
    """A directory holding ``config.json``: what ``save_pretrained`` writes."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


# --------------------------------------------------------------------------------------------
# Reading a directory
# --------------------------------------------------------------------------------------------


@dataclass
class HFSource:
    """What a model directory holds, checked; nothing of it has run."""

    directory: Path
    architecture: str
    model_class: type
    config: Any
    config_dict: dict[str, Any]
    weight_files: tuple[Path, ...]
    widths: dict[str, Any] | None = None  # deployprune_widths.json of a compacted model with per-layer widths


def _read_json(path: Path, what: str) -> Any:
    if path.is_symlink() and not path.resolve().is_file():
        raise InputError(f"{path}: is a dangling symlink; {what} must be a regular file")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise InputError(f"{path}: {what} is {size / 1024**2:.0f} MiB, too large for JSON metadata")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: {what} is not valid JSON ({one_line(exc, 100)})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def _custom_code(obj: Any, trail: str = "") -> str | None:
    """Where a config names custom code (``auto_map`` at any depth), or None."""
    if isinstance(obj, Mapping):
        if "auto_map" in obj:
            return f"{trail}auto_map"
        for k, v in obj.items():
            found = _custom_code(v, f"{trail}{k}.")
            if found:
                return found
    return None


def resolve_architecture(name: Any, where: str) -> type:
    """``name`` as one of transformers' own model classes (never code from elsewhere)."""
    T = transformers_module()
    from transformers import PreTrainedModel

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise InputError(f"{where}: 'architectures' names {name!r}, not a class name; "
                         "re-save the model with save_pretrained")
    try:
        cls = getattr(T, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)) or name.startswith(("TF", "Flax")):
        raise InputError(f"{where}: unknown architecture {name!r}: not a model class of transformers "
                         f"{T.__version__}; deployprune builds only transformers' own architectures")
    return cls


def read_directory(path: str | os.PathLike, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> HFSource:
    """Check a ``save_pretrained`` directory and parse its config (see the module docstring)."""
    directory = Path(path)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such model directory")
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise InputError(f"{directory}: no {CONFIG_FILE}; a Hugging Face model directory is written by save_pretrained")
    where = str(cfg_path)
    config_dict = _read_json(cfg_path, "the model config")
    if not isinstance(config_dict, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(config_dict).__name__}")
    custom = _custom_code(config_dict)
    if custom:
        raise UnsafeFileError(f"{where}: names custom model code ({custom}, trust_remote_code); deployprune never "
                              "runs code from a model directory and builds only transformers' own architectures")
    archs = config_dict.get("architectures")
    if not (isinstance(archs, list) and archs):
        raise InputError(f"{where}: names no architecture ('architectures' is missing or empty); "
                         "re-save the model with save_pretrained")
    cls = resolve_architecture(archs[0], where)
    model_type = config_dict.get("model_type")
    config_class = cls.config_class
    if model_type != getattr(config_class, "model_type", None):
        raise InputError(f"{where}: model_type {model_type!r} does not match architecture {archs[0]} "
                         f"(model_type {config_class.model_type!r})")
    try:
        with quiet_transformers():
            config = config_class.from_dict(copy.deepcopy(config_dict))
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects
        raise InputError(f"{where}: transformers rejects the config ({type(exc).__name__}: "
                         f"{one_line(exc, 140)})") from None
    widths = None
    if (directory / WIDTHS_FILE).exists():
        widths = _read_widths(directory / WIDTHS_FILE, archs[0])
    return HFSource(directory, archs[0], cls, config, config_dict, _weight_files(directory, max_file_bytes), widths)


def _plain_name(name: Any, where: str) -> str:
    if not (isinstance(name, str) and re.fullmatch(r"[\w][\w.-]*", name) and ".." not in name):
        raise UnsafeFileError(f"{where}: weight file {name!r} is not a plain file name inside the directory; "
                              "refusing to read it")
    return name


def _weight_files(directory: Path, max_bytes: int) -> tuple[Path, ...]:
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.exists():
        names = [WEIGHTS_FILE]
    elif index.exists():
        data = _read_json(index, "the safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: expected a 'weight_map' of tensor names to shard files")
        names = sorted({_plain_name(v, str(index)) for v in weight_map.values()})
    else:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {', '.join(pickles[:3])}: pickles, which deployprune does not load from a model directory)" \
            if pickles else ""
        raise InputError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}{found}; "
                         "re-save the model with save_pretrained(..., safe_serialization=True)")
    total = 0
    files = []
    for name in names:
        p = check_input_file(directory / name, max_bytes=max_bytes, what="safetensors weights file")
        total += p.stat().st_size
        files.append(p)
    if total > max_bytes:
        raise InputError(f"{directory}: the weights are {total / 1024**3:.1f} GiB, above the "
                         f"{max_bytes / 1024**3:.1f} GiB limit; if you trust them, raise it with --max-file-size")
    return tuple(files)


def read_weights(source: HFSource) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (never a pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in source.weight_files:
        try:
            part = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"{path}: not a readable safetensors file ({one_line(exc, 120)}); "
                             "re-save or re-copy it") from None
        for key in part:
            if key in out:
                raise InputError(f"{path}: tensor {key!r} is stored in two shards; the directory is inconsistent")
        out.update(part)
    return out


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------


def _build(source: HFSource) -> nn.Module:
    try:
        with quiet_transformers():
            model = source.model_class(copy.deepcopy(source.config))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{source.directory}: building {source.architecture} from its config failed "
                         f"({type(exc).__name__}: {one_line(exc, 140)})") from None
    return model


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, Mapping) else set()


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``: keys and shapes must fit; tied weights may be absent (tied again)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    untied = [k for k in missing if k not in _tied_keys(model)]

    if untied or unexpected:
        parts = ([f"missing {_few(untied)}"] if untied else []) + ([f"unexpected {_few(unexpected)}"] if unexpected
                                                                    else [])
        raise InputError(f"{where}: the weights do not fit the architecture: {'; '.join(parts)}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        hint = (" (a compacted model with per-layer widths needs its deployprune_widths.json)"
                if not (Path(where).parent / WIDTHS_FILE).exists() else "")
        raise InputError(f"{where}: the weights do not fit the architecture: shape mismatch for {_few(bad)} "
                         f"(file vs model){hint}")
    model.load_state_dict(dict(state), strict=False)
    if missing:
        model.tie_weights()


def build_model(source: HFSource) -> nn.Module:
    """The model of ``source`` in float32 and eval mode, its weights read from the safetensors files.

    A plain directory goes through transformers' own loading (``from_pretrained`` given the parsed
    config and the tensors read here, so it applies the architecture's checkpoint key conversions and
    ties shared weights); every key must fit. A directory with ``deployprune_widths.json`` is built
    from its config, each listed module shrunk to the recorded sizes, and loaded key for key.
    """
    state = read_weights(source)
    where = str(source.weight_files[0])
    if source.widths is not None:
        model = _build(source)
        apply_widths_(model, source.widths, str(source.directory / WIDTHS_FILE))
        load_weights(model, state, where)
        return model.eval()
    dtypes = sorted({dtype_name(t.dtype) for t in state.values() if t.is_floating_point()})
    if dtypes and dtypes != ["float32"]:
        log.info("%s: weights in %s are loaded as float32", source.directory, ", ".join(dtypes))
    try:
        with quiet_transformers():
            model, info = source.model_class.from_pretrained(
                None, config=copy.deepcopy(source.config), state_dict=state, dtype=torch.float32,
                output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - e.g. a size mismatch
        raise InputError(f"{where}: the weights do not fit {source.architecture} ({type(exc).__name__}: "
                         f"{one_line(exc, 140)})") from None
    problems = [f"{what.replace('_', ' ')} {_few(sorted(map(str, keys)))}" for what, keys in info.items() if keys]
    if problems:
        raise InputError(f"{where}: the weights do not fit {source.architecture}: {'; '.join(problems)}")
    return model.eval()


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_compacted(directory: str | os.PathLike, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> nn.Module:
    """A compacted model written by :func:`save_compacted` (or any ``save_pretrained`` directory).

    A directory with ``deployprune_widths.json`` is rebuilt from its config, each listed module
    shrunk to the recorded sizes, then the safetensors weights are loaded; no pickle is read and no
    code from the directory runs.
    """
    source = read_directory(directory, max_file_bytes=max_file_bytes)
    return build_model(source)


# --------------------------------------------------------------------------------------------
# The per-module widths spec (deployprune_widths.json)
# --------------------------------------------------------------------------------------------


def _size_value(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, tuple) and bool(v) and all(isinstance(d, int) and not isinstance(d, bool) for d in v)


def widths_spec(reference: nn.Module, compact: nn.Module, architecture: str) -> dict[str, Any]:
    """What differs between ``compact`` and the model its config builds (``reference``): per module,
    the shapes of its own parameters/buffers and its integer size attributes (``out_features``,
    ``nf``, ``num_attention_heads``, ``all_head_size`` ...)."""
    ref_modules = dict(reference.named_modules())
    modules: dict[str, Any] = {}
    for name, mod in compact.named_modules():
        ref = ref_modules.get(name)
        if ref is None or type(ref) is not type(mod):
            raise UnsupportedError(f"module {name!r} of the compact model is {type(mod).__name__}, not the "
                                   f"{type(ref).__name__ if ref is not None else 'nothing'} the config builds; "
                                   "its widths cannot be written as a spec (write a .pt2 program instead)")
        entry: dict[str, Any] = {}
        tensors = {}
        for kind in ("_parameters", "_buffers"):
            for pname, t in getattr(mod, kind).items():
                r = getattr(ref, kind).get(pname)
                if t is None or r is None:
                    continue
                if tuple(t.shape) != tuple(r.shape):
                    tensors[pname] = list(t.shape)
        attrs = {}
        for k, v in vars(mod).items():
            if k.startswith("_") or not _size_value(v):
                continue
            rv = vars(ref).get(k)
            if _size_value(rv) and rv != v:
                attrs[k] = list(v) if isinstance(v, tuple) else v
        if tensors:
            entry["tensors"] = tensors
        if attrs:
            entry["attributes"] = attrs
        own = _own_config_fields(mod, compact)
        if own:
            entry["config"] = own
        if entry:
            modules[name] = entry
    missing = sorted(set(ref_modules) - {n for n, _ in compact.named_modules()})
    if missing:
        raise UnsupportedError(f"the compact model has no module {missing[0]!r}; its widths cannot be written "
                               "as a spec")
    return {
        "format": WIDTHS_FORMAT,
        "version": WIDTHS_VERSION,
        "architecture": architecture,
        "about": "per-module sizes of a model compacted by deployprune with widths that differ per layer; "
                 "rebuild it with deployprune.hf.load_compacted(directory)",
        "modules": modules,
    }


def _own_config_fields(mod: nn.Module, model: nn.Module) -> dict[str, int]:
    """Int fields in which a module's own copy of the config (finalize gives one to an attention whose
    forward reads ``self.config.num_attention_heads``, Phi-3's) differs from the model's config."""
    cfg, top = vars(mod).get("config"), getattr(model, "config", None)
    if cfg is None or top is None or cfg is top or not hasattr(cfg, "to_dict"):
        return {}
    mine, theirs = cfg.to_dict(), top.to_dict()
    return {k: v for k, v in mine.items() if _size_value(v) and isinstance(v, int) and theirs.get(k) != v}


def _apply_config_fields(mod: nn.Module, model: nn.Module, name: str, fields: Any, where: str) -> None:
    top = getattr(model, "config", None)
    if vars(mod).get("config") is not top or not isinstance(fields, dict):
        raise InputError(f"{where}: module {name!r} has no config of its own to set fields on")
    own = copy.copy(top)
    for key, value in fields.items():
        current = getattr(top, key, None) if isinstance(key, str) and not key.startswith("_") else None
        if not (_size_value(current) and isinstance(current, int) and isinstance(value, int)
                and not isinstance(value, bool) and value > 0):
            raise InputError(f"{where}: {name}: config field {key!r} is not a size of the config "
                             f"(or {value!r} is not a positive integer)")
        setattr(own, key, value)
    mod.config = own


def _read_widths(path: Path, architecture: str) -> dict[str, Any]:
    spec = _read_json(path, "the widths spec")
    where = str(path)
    if not isinstance(spec, dict) or spec.get("format") != WIDTHS_FORMAT:
        raise InputError(f"{where}: not a deployprune widths spec (format {WIDTHS_FORMAT!r})")
    version = spec.get("version")
    if not isinstance(version, int) or version > WIDTHS_VERSION:
        raise InputError(f"{where}: widths spec version {version!r} is not supported by this deployprune "
                         f"(reads version {WIDTHS_VERSION}); upgrade deployprune")
    if spec.get("architecture") != architecture:
        raise InputError(f"{where}: written for architecture {spec.get('architecture')!r}, the config names "
                         f"{architecture!r}")
    if not isinstance(spec.get("modules"), dict):
        raise InputError(f"{where}: 'modules' must be an object of module name -> sizes")
    return spec


def apply_widths_(model: nn.Module, spec: Mapping[str, Any], where: str) -> None:
    """Shrink the modules ``spec`` lists: new empty tensors of the recorded shapes, recorded size
    attributes set. Only existing tensors and existing integer attributes can be changed."""
    modules = dict(model.named_modules())
    for name, entry in spec["modules"].items():
        mod = modules.get(name) if isinstance(name, str) else None
        if mod is None or not isinstance(entry, dict):
            raise InputError(f"{where}: module {name!r} is not part of the architecture")
        for pname, shape in (entry.get("tensors") or {}).items():
            if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                    for d in shape)):
                raise InputError(f"{where}: {name}.{pname}: bad shape {shape!r}")
            if math.prod(shape) > 2**36:
                raise InputError(f"{where}: {name}.{pname}: shape {shape} is too large")
            if pname in mod._parameters and mod._parameters[pname] is not None:
                old = mod._parameters[pname]
                if old.dim() != len(shape):
                    raise InputError(f"{where}: {name}.{pname}: {len(shape)} dims, the architecture has {old.dim()}")
                mod._parameters[pname] = nn.Parameter(torch.empty(shape, dtype=old.dtype),
                                                      requires_grad=old.requires_grad)
            elif pname in mod._buffers and mod._buffers[pname] is not None:
                old = mod._buffers[pname]
                if old.dim() != len(shape):
                    raise InputError(f"{where}: {name}.{pname}: {len(shape)} dims, the architecture has {old.dim()}")
                mod._buffers[pname] = torch.zeros(shape, dtype=old.dtype)
            else:
                raise InputError(f"{where}: {name} has no tensor {pname!r}")
        fields = entry.get("config") or {}
        if fields:
            _apply_config_fields(mod, model, name, fields, where)
        for attr, value in (entry.get("attributes") or {}).items():
            current = vars(mod).get(attr) if isinstance(attr, str) and not attr.startswith("_") else None
            new = tuple(value) if isinstance(value, list) else value
            if not (_size_value(current) and _size_value(new) and isinstance(new, tuple) == isinstance(current, tuple)):
                raise InputError(f"{where}: {name}.{attr} is not a size attribute of the architecture "
                                 f"(or {value!r} is not a size)")
            setattr(mod, attr, new)


# --------------------------------------------------------------------------------------------
# Widths the config can express
# --------------------------------------------------------------------------------------------


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_shapes(cls: type, config: Any) -> dict[str, tuple[int, ...]] | None:
    """State-dict shapes of ``cls(config)``, built on the meta device (no memory, no init cost)."""
    try:
        with quiet_transformers(), torch.device("meta"):
            return _shapes(cls(copy.deepcopy(config)))
    except Exception:  # noqa: BLE001 - a config the architecture rejects
        return None


def _config_keys(config: Any, keys: Sequence[str]) -> list[str]:
    """The keys ``config`` has as plain ints, one name per underlying field (attribute_map aliases)."""
    aliases = getattr(config, "attribute_map", {}) or {}
    out: list[str] = []
    seen: set[str] = set()
    for key in keys:
        real = aliases.get(key, key)
        if real in seen or not hasattr(config, key):
            continue
        value = getattr(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out.append(key)
            seen.add(real)
    return out


def config_for_widths(cls: type, config: Any, shapes: Mapping[str, tuple[int, ...]]
                      ) -> tuple[Any, dict[str, int]] | None:
    """A copy of ``config`` from which ``cls`` builds a model with exactly these state-dict ``shapes``,
    and the fields it changed; None when no change of the MLP-width and head-count fields does.

    Which parameter dimensions a field sizes is measured, not assumed: the architecture is built
    (on the meta device) with the field one larger, and the new value is read off the dimensions
    that moved; it must be the same integer everywhere the field reaches.
    """
    base_cfg = copy.deepcopy(config)
    plain = _meta_shapes(cls, base_cfg)
    if plain is None:
        return None
    for key, default in _PINNED_DEFAULTS.items():  # e.g. head_dim: kept when the head count changes
        if getattr(base_cfg, key, None) is None:  # None, or absent (Phi-3 reads getattr(config, "head_dim", ...))
            with contextlib.suppress(Exception):
                trial = copy.deepcopy(base_cfg)
                setattr(trial, key, int(default(trial)))
                if _meta_shapes(cls, trial) == plain:
                    base_cfg = trial
    if set(plain) != set(shapes):
        return None
    diff = {k for k in plain if plain[k] != tuple(shapes[k])}
    if not diff:
        return base_cfg, {}
    # every dimension is affine in the fields (head_dim pinned): measure each field's slope on each
    # dimension, then solve for the fields' changes together (Phi-3's fused qkv_proj has
    # num_attention_heads * head_dim + 2 * num_key_value_heads * head_dim rows)
    keys: list[str] = []
    slopes: list[dict[tuple[str, int], float]] = []
    for key in _config_keys(base_cfg, MLP_KEYS + HEAD_KEYS):
        value = getattr(base_cfg, key)
        probe_shapes, step = None, 0
        for step in (1, value):
            probe = copy.deepcopy(base_cfg)
            setattr(probe, key, value + step)
            probe_shapes = _meta_shapes(cls, probe)
            if probe_shapes is not None and set(probe_shapes) == set(plain):
                break
            probe_shapes = None
        if probe_shapes is None:
            continue
        slope: dict[tuple[str, int], float] = {}
        for k, before in plain.items():
            after = probe_shapes[k]
            if len(after) != len(before):
                slope = {}
                break
            for i, (b, p) in enumerate(zip(before, after, strict=True)):
                if b != p:
                    slope[(k, i)] = (p - b) / step
        if slope:
            keys.append(key)
            slopes.append(slope)
    if not keys:
        return None
    dims = sorted({d for sl in slopes for d in sl} | {(k, i) for k in diff for i in range(len(plain[k]))})
    for k in diff:
        if len(shapes[k]) != len(plain[k]):
            return None
    matrix = np.array([[sl.get(d, 0.0) for sl in slopes] for d in dims])
    target = np.array([shapes[k][i] - plain[k][i] for k, i in dims], dtype=float)
    delta, *_ = np.linalg.lstsq(matrix, target, rcond=None)
    if not np.allclose(matrix @ np.round(delta), target):
        return None
    updates: dict[str, int] = {}
    for key, d in zip(keys, np.round(delta).astype(int), strict=True):
        value = getattr(base_cfg, key)
        if d != 0 and value + d >= 1:
            updates[key] = int(value + d)
    if not updates:
        return None
    candidate = copy.deepcopy(base_cfg)
    for key, new in updates.items():
        setattr(candidate, key, new)
    if _meta_shapes(cls, candidate) != {k: tuple(v) for k, v in shapes.items()}:
        return None
    return candidate, updates


# --------------------------------------------------------------------------------------------
# Example inputs
# --------------------------------------------------------------------------------------------


def forward_inputs(model: nn.Module) -> list[str]:
    """The tensor inputs ``model.forward`` takes by name (annotated as tensors, or unannotated)."""
    sig = inspect.signature(type(model).forward)
    names = []
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        if ann is inspect.Parameter.empty or "Tensor" in str(ann):
            names.append(name)
    return names


def _is_integer_input(name: str) -> bool:
    return name.endswith("_ids") or name.endswith("attention_mask") or name == "pixel_mask"


def parse_keyword_input(text: str) -> tuple[str, InputShape]:
    """``input_ids=1,128`` (or ``NAME=SHAPE:DTYPE[:HIGH]``) -> ``(name, InputShape)``.

    Without a dtype, ``*_ids`` and attention masks are int64 and everything else float32.
    """
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise UsageError(f"--input {text!r}: expected NAME=SHAPE, e.g. input_ids=1,128 (keyword inputs of a "
                         "Hugging Face model directory); use --input-shape for positional inputs")
    try:
        shape = parse_input_shape(rest)
    except UsageError as exc:
        msg = str(exc).replace(f"--input-shape {rest!r}", f"--input {text!r}", 1)
        raise UsageError(msg.replace("--input-shape", "--input", 1)) from None
    if ":" not in rest:
        shape = InputShape(shape.shape, torch.int64 if _is_integer_input(name) else torch.float32)
    return name, shape


def default_inputs(model: nn.Module) -> list[tuple[str, InputShape]]:
    """Example inputs for the model's main input when none are given.

    Text: ``input_ids`` (and ``attention_mask``, ``decoder_input_ids`` where the forward takes them) of
    1x16; images: ``pixel_values`` 1 x channels x image_size x image_size; audio: ``input_values``
    1x16000 or ``input_features`` 1 x mel bins x (2 x max_source_positions).
    """
    config = model.config
    names = set(forward_inputs(model))
    main = getattr(model, "main_input_name", "input_ids")
    seq = 16
    if main == "input_ids":
        out = [("input_ids", InputShape((1, seq), torch.int64))]
        if "attention_mask" in names:
            out.append(("attention_mask", InputShape((1, seq), torch.int64)))
        if "decoder_input_ids" in names and getattr(config, "is_encoder_decoder", False):
            out.append(("decoder_input_ids", InputShape((1, seq), torch.int64)))
        return out
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return [("pixel_values", InputShape((1, int(getattr(config, "num_channels", 3)), int(h), int(w))))]
    if main == "input_values":
        return [("input_values", InputShape((1, 16000)))]
    if main == "input_features":
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        return [("input_features", InputShape((1, int(getattr(config, "num_mel_bins", 80)), frames)))]
    raise UsageError(f"{type(model).__name__}: no default example inputs for its main input {main!r}; "
                     f"pass them with --input NAME=SHAPE (it takes {', '.join(sorted(names))})")


def _vocab(config: Any) -> int | None:
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        v = getattr(cfg, "vocab_size", None) if cfg is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def make_inputs(model: nn.Module, specs: Sequence[tuple[str, InputShape]], *, seed: int = 0,
                where: str = "") -> dict[str, torch.Tensor]:
    """Seeded keyword example inputs. Token ids are drawn from ``[0, vocab_size)``, token type ids from
    ``[0, type_vocab_size)``, position ids count up, attention masks are ones, floats are N(0, 1); a
    ``high`` given with the shape bounds integer values instead. Names are checked against the forward."""
    allowed = forward_inputs(model)
    prefix = f"{where}: " if where else ""
    for name, _ in specs:
        if name not in allowed:
            raise UsageError(f"--input {name}: {prefix}{type(model).__name__}.forward takes no input {name!r}; "
                             f"allowed: {', '.join(allowed)}")
    seen: set[str] = set()
    for name, _ in specs:
        if name in seen:
            raise UsageError(f"--input {name}: given twice")
        seen.add(name)
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, s in specs:
        if s.dtype.is_floating_point:
            out[name] = torch.randn(s.shape, generator=gen).to(s.dtype)
        elif s.dtype == torch.bool:
            out[name] = torch.randint(0, 2, s.shape, generator=gen).to(torch.bool)
        elif s.high is None and "mask" in name:
            out[name] = torch.ones(s.shape, dtype=s.dtype)
        elif s.high is None and name == "position_ids":
            out[name] = torch.arange(s.shape[-1]).expand(s.shape).to(s.dtype).contiguous()
        else:
            high = s.high
            if high is None and name in ("input_ids", "decoder_input_ids"):
                high = _vocab(config)
            elif high is None and name == "token_type_ids":
                high = getattr(config, "type_vocab_size", None)
            out[name] = torch.randint(0, int(high or 2), s.shape, generator=gen).to(s.dtype)
    return out


def _constants(model: nn.Module) -> dict[str, Any]:
    """Non-tensor keyword inputs the pipeline passes: no KV cache in the outputs."""
    params = inspect.signature(type(model).forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


# --------------------------------------------------------------------------------------------
# Loading for the pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class HFLoaded(LoadedModel):
    """A loaded model directory. ``model`` is a tensor-in/tensor-out view (:class:`~deployprune.adapt.
    KeywordModel`, the library model is ``model.model``), so every pipeline step works unchanged;
    module and mask names therefore carry the prefix ``model.``."""

    hf: HFSource | None = None
    keyword_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def library_model(self) -> nn.Module:
        return self.model.model


def _prefixed_masks(view: nn.Module, raw: Mapping[str, Any], source: str) -> Masks:
    """Masks named after the library model (or already after the view) -> normalized, view names."""
    inner = dict(view.model.named_modules())
    outer = dict(view.named_modules())
    renamed: dict[Any, Any] = {}
    for name, per in raw.items():
        if isinstance(name, str) and name in inner:
            renamed[PREFIX + name if name else "model"] = per
        elif isinstance(name, str) and name in outer:
            renamed[name] = per
        else:
            renamed[name] = per  # normalize_masks names it
    try:
        return normalize_masks(view, renamed, source=source)
    except MaskError as exc:  # name modules as the user does: without the view's prefix
        raise MaskError(str(exc).replace(f"'{PREFIX}", "'")) from None


def _mask_file(path: str | os.PathLike, max_bytes: int) -> Mapping[str, Any]:
    path = check_input_file(path, max_bytes=max_bytes, what="masks file")
    obj = torch_load(path, allow_pickle=False, max_bytes=max_bytes, what="masks file")
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj.get("masks") or {}
    if not isinstance(obj, Mapping):
        raise MaskError(f"{path}: expected masks as a dict {{module_name: {{param_name: mask}}}}, got "
                        f"{type(obj).__name__}")
    return obj


def load_directory(
    path: str | os.PathLike,
    *,
    inputs: Sequence[str | tuple[str, InputShape]] | None = None,
    masks: str | os.PathLike | Mapping[str, Any] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    check_forward: bool = True,
) -> HFLoaded:
    """A ``save_pretrained`` directory as a :class:`~deployprune.io.LoadedModel` for the pipeline.

    ``inputs``: ``"input_ids=1,128"`` strings or ``(name, InputShape)`` (default: :func:`default_inputs`).
    ``masks``: an NNI-layout masks file (or dict) named after the library model's modules (masks are
    never guessed from zeros in the weights).
    """
    source = read_directory(path, max_file_bytes=max_file_bytes)
    model = build_model(source)
    if inputs:
        specs = [parse_keyword_input(s) if isinstance(s, str) else s for s in inputs]
    else:
        specs = default_inputs(model)
    example = make_inputs(model, specs, where=str(source.directory))
    view = KeywordModel(model, 0, list(example), _constants(model)).eval()
    mask_files: list[Path] = []
    if isinstance(masks, (str, os.PathLike)):
        raw = _mask_file(masks, max_file_bytes)
        where = str(masks)
        mask_files.append(Path(masks))
    else:
        raw, where = (masks or {}), "masks"
    final_masks = _prefixed_masks(view, raw, where) if raw else {}
    loaded = HFLoaded(
        model=view,
        example_inputs=tuple(example.values()),
        masks=final_masks,
        source=source.directory,
        kind="hf",
        arch=None,
        input_shapes=[InputShape(tuple(t.shape), t.dtype) for t in example.values()],
        compact=source.widths is not None,
        files=(source.directory, *mask_files),
        hf=source,
        keyword_inputs=example,
    )
    if check_forward:
        try:
            with torch.no_grad():
                view(*loaded.example_inputs)
        except Exception as exc:  # noqa: BLE001 - reported as one line
            desc = ", ".join(f"{k}={'x'.join(map(str, t.shape))} ({dtype_name(t.dtype)})" for k, t in example.items())
            raise InputError(f"{source.directory}: {source.architecture} fails on inputs {desc} ({type(exc).__name__}: "
                             f"{one_line(exc, 140)}); pass the inputs it expects with --input NAME=SHAPE") from None
    return loaded


# --------------------------------------------------------------------------------------------
# Writing a compacted model
# --------------------------------------------------------------------------------------------


@dataclass
class SavedDirectory:
    path: Path
    layout: str  # "save_pretrained" | "widths"
    config_updates: dict[str, int] = field(default_factory=dict)
    widths_modules: int = 0  # modules listed in deployprune_widths.json
    reload_rel: float = 0.0  # worst relative error of the reloaded model vs the compact one


def _compare(a: nn.Module, b: nn.Module, inputs: list[dict[str, torch.Tensor]], constants: dict[str, Any]) -> float:
    from .parity import compare_outputs

    worst = 0.0
    with torch.no_grad():
        for kw in inputs:
            ref, out = flat_outputs(a(**kw, **constants)), flat_outputs(b(**kw, **constants))
            worst = max(worst, compare_outputs(ref, out).rel)
    return worst


def _check_inputs(example: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    from .finalize import fresh_inputs

    sets = [dict(example)]
    for seed in (11, 12):
        sets.append(fresh_inputs((), dict(example), seed=seed)[1])
    return sets


def _copy_side_files(src: Path | None, dst: Path) -> None:
    if src is None or not src.is_dir():
        return
    for p in sorted(src.iterdir()):
        if _SIDE_FILES.fullmatch(p.name) and p.is_file() and not p.is_symlink() and not (dst / p.name).exists():
            shutil.copyfile(p, dst / p.name)


def save_compacted(
    compact: nn.Module,
    out: str | os.PathLike,
    *,
    example_inputs: Mapping[str, torch.Tensor],
    force: bool = False,
    source_directory: str | os.PathLike | None = None,
    tolerance: float = 1e-5,
) -> SavedDirectory:
    """Write a compacted transformers model as a Hugging Face directory (see the module docstring).

    ``compact``: the compacted library model (``PreTrainedModel``). ``example_inputs``: keyword inputs
    it runs on; the written directory is loaded back (``from_pretrained``, or :func:`load_compacted`
    for per-layer widths) and must reproduce ``compact`` on them and on fresh inputs like them within
    ``tolerance`` (relative to the output scale). Tokenizer and processor files of
    ``source_directory`` are copied along. The output appears complete or not at all.
    """
    from transformers import PreTrainedModel

    from .fsutil import atomic_output

    if not isinstance(compact, PreTrainedModel):
        raise UsageError(f"save_compacted: expected a transformers PreTrainedModel, got {type(compact).__name__}")
    cls = type(compact)
    name = cls.__name__
    resolve_architecture(name, name)  # only transformers' own classes are written (and read back)
    compact.eval()
    constants = _constants(compact)
    checks = _check_inputs(example_inputs)
    shapes = _shapes(compact)
    found = config_for_widths(cls, compact.config, shapes)
    dest = Path(out)
    with atomic_output(dest, force=force) as tmp:
        saved: SavedDirectory | None = None
        if found is not None:
            new_config, updates = found
            saved = _save_pretrained_layout(compact, new_config, updates, tmp, checks, constants, tolerance)
            if saved is None:
                shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            saved = _save_widths_layout(compact, tmp, checks, constants, tolerance)
        _copy_side_files(Path(source_directory) if source_directory else None, tmp)
        saved.path = dest
    return saved


def _save_pretrained_layout(compact: nn.Module, config: Any, updates: dict[str, int], tmp: Path,
                            checks: list[dict[str, torch.Tensor]], constants: dict[str, Any],
                            tolerance: float) -> SavedDirectory | None:
    """``save_pretrained`` with the updated config; None when ``from_pretrained`` does not give the
    compact model back (then the widths layout is written instead)."""
    cls = type(compact)
    original = compact.config
    compact.config = config
    try:
        with quiet_transformers():
            compact.save_pretrained(tmp)
    finally:
        compact.config = original
    try:
        with quiet_transformers():
            again, info = cls.from_pretrained(tmp, local_files_only=True, use_safetensors=True,
                                              output_loading_info=True)
    except Exception as exc:  # noqa: BLE001
        log.info("from_pretrained cannot load the compacted model with the updated config (%s); "
                 "writing per-layer widths instead", one_line(exc, 160))
        return None
    problems = {k: v for k, v in info.items() if v}
    if problems:
        log.info("from_pretrained reports %s for the updated config; writing per-layer widths instead", problems)
        return None
    rel = _compare(compact, again.eval(), checks, constants)
    if not rel <= tolerance:
        log.info("the model from_pretrained builds from the updated config differs from the compact model "
                 "(rel %.3g); writing per-layer widths instead", rel)
        return None
    return SavedDirectory(tmp, "save_pretrained", dict(updates), reload_rel=rel)


def _save_widths_layout(compact: nn.Module, tmp: Path, checks: list[dict[str, torch.Tensor]],
                        constants: dict[str, Any], tolerance: float) -> SavedDirectory:
    cls = type(compact)
    reference = _meta_reference(cls, compact.config)
    spec = widths_spec(reference, compact, cls.__name__)
    config = copy.deepcopy(compact.config)
    config.architectures = [cls.__name__]
    with quiet_transformers():
        config.save_pretrained(tmp)
    save_state(compact, tmp / WEIGHTS_FILE)
    (tmp / WIDTHS_FILE).write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    try:
        again = load_compacted(tmp)
    except DeployPruneError as exc:
        raise UnsupportedError(f"the compacted model does not load back from its widths spec ({exc}); "
                               "write a .pt2 program instead") from None
    try:
        rel = _compare(compact, again, checks, constants)
    except Exception as exc:  # noqa: BLE001 - a rebuilt model that does not even run is the same failure
        raise UnsupportedError(f"the model rebuilt from the widths spec does not run ({one_line(exc, 160)}); "
                               "write a .pt2 program instead") from None
    if not rel <= tolerance:
        raise UnsupportedError(f"the model rebuilt from the widths spec reproduces the compact model only to "
                               f"{rel:.3g} (relative); write a .pt2 program instead")
    return SavedDirectory(tmp, "widths", widths_modules=len(spec["modules"]), reload_rel=rel)


def save_state(model: nn.Module, path: Path) -> None:
    """``model``'s state dict as one safetensors file, keys as the model names them (the layout
    :func:`load_compacted` reads). A tied weight that shares its tensor is left out (tied again on
    load); other tensors sharing storage are stored as copies."""
    from safetensors.torch import save_file

    tied = _tied_keys(model)
    seen: set[tuple] = set()
    storages: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        ident = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen and key in tied:
            continue
        shared = ptr in storages
        seen.add(ident)
        storages.add(ptr)
        out[key] = t.detach().clone().contiguous() if shared else t.detach().contiguous()
    save_file(out, str(path), metadata={"format": "pt", "layout": "state_dict"})


def _meta_reference(cls: type, config: Any) -> nn.Module:
    with quiet_transformers(), torch.device("meta"):
        return cls(copy.deepcopy(config))


# --------------------------------------------------------------------------------------------
# finalize DIR -o OUTDIR
# --------------------------------------------------------------------------------------------


def finalize_directory(
    loaded: HFLoaded,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    strict: bool = False,
    allow_uncompacted: bool = False,
) -> Any:
    """Compact ``loaded`` and write it as a Hugging Face directory (default ``./<name>.compact``).

    Returns a :class:`~deployprune.pipeline.FinalizeOutcome` whose summary names the layout written.
    ``strict`` and ``allow_uncompacted`` are those of :func:`deployprune.pipeline.compact_loaded`.
    """
    from .fsutil import check_writable, remove_stale
    from .pipeline import check_not_input, compact_loaded, module_changes
    from .stats import count_params

    if not isinstance(loaded, HFLoaded) or loaded.hf is None:
        raise UsageError("finalize_directory: expected a model directory loaded by deployprune.hf.load_directory")
    out_path = Path(out) if out is not None else Path(f"{loaded.source.name}.compact")
    check_not_input(out_path, *loaded.files)
    for f in loaded.files:
        if out_path.resolve() in f.resolve().parents:
            raise UsageError(f"{out_path}: the output would replace a directory holding the input {f}; "
                             "choose another -o path")
    remove_stale(out_path)
    check_writable(out_path, force=force)
    comp = compact_loaded(loaded, strict=strict, allow_uncompacted=allow_uncompacted)
    compact = comp.model.model
    saved = save_compacted(compact, out_path, example_inputs=loaded.keyword_inputs, force=force,
                           source_directory=loaded.source)
    outcome = HFFinalizeOutcome(
        path=out_path,
        format="hf",
        params_before=count_params(comp.source),
        params_after=count_params(comp.model),
        blocked=comp.blocked,
        torch_parity=comp.parity_max_abs,
        module_changes=module_changes(loaded.library_model, compact),
        channels=comp.channel_lines() if loaded.masks else [],
        saved=saved,
    )
    return outcome


def _describe(saved: SavedDirectory) -> str:
    if saved.layout == "save_pretrained":
        changed = ", ".join(f"{k}={v}" for k, v in saved.config_updates.items()) or "config unchanged"
        return f"Hugging Face directory, save_pretrained; {changed}; from_pretrained loads it"
    return (f"Hugging Face directory with per-layer widths: {WIDTHS_FILE} lists {saved.widths_modules} module(s); "
            "load it with deployprune.hf.load_compacted")


@dataclass
class HFFinalizeOutcome(FinalizeOutcome):
    saved: SavedDirectory | None = None

    def summary_lines(self) -> list[str]:
        lines = super().summary_lines()
        if self.saved is not None:
            lines[0] = f"compact model: {self.path} ({_describe(self.saved)})"
            lines.insert(3, f"read back:     max rel error {self.saved.reload_rel:.3g} vs the compact model")
        return lines


__all__ = [
    "HFFinalizeOutcome", "HFLoaded", "HFSource", "SavedDirectory", "config_for_widths", "default_inputs",
    "finalize_directory", "forward_inputs", "is_model_directory", "load_compacted", "load_directory",
    "make_inputs", "parse_keyword_input", "read_directory", "save_compacted", "widths_spec",
]
