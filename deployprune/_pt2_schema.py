"""A strict allowlist check of a torch.export archive's JSON, run before torch reads the archive.

``torch.export.load`` turns strings from the archive into code in several places (measured on
torch 2.13, ``torch/_export/serde/serialize.py`` and ``torch/export/_unlift.py``):

* symbolic size expressions (``SymInt.as_expr.expr_str``) go through ``sympy.sympify``, which
  ``eval``s them;
* ``guards_code`` lines are pasted into a function that ``ExportedProgram.module()`` ``exec``s;
* tensor names become the parameters of the generated ``forward`` (``def forward(self, <name>)``)
  and ``forward_arg_names`` its signature, both ``exec``ed by ``torch.fx``; parameter and buffer
  names are pasted into ``getattr(self, "<name>")`` in the same generated code;
* a treespec context is decoded with a JSON hook that imports any module named in an
  ``{"__enum__": ...}`` object;
* a constant string input is pasted into a guard (``x == '<value>'``);
* graph nodes may call any operator, and some aten operators touch files
  (``aten.from_file(..., shared=True)`` maps a file writable).

So the check admits plain data only: aten operator calls with static integer shapes, names that
are Python identifiers (dotted paths of plain atoms for parameters), no guards, no symbolic values,
no custom objects, no higher-order operators or sub-graphs, treespecs of builtin containers whose
contexts hold no JSON objects. Anything else is refused with a one-line
:class:`~deployprune.errors.UnsafeFileError`; the user may opt in with ``--trust-pickle``
(``allow_pickle=True``) for a file they trust.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InputError, UnsafeFileError

#: Flag named in the refusals (the same opt-in as for pickled files: "this file may run code").
TRUST_HINT = "pass --trust-pickle (allow_pickle=True) if you trust the file"
STATIC_HINT = ("re-export it with static shapes (torch.export.export(model, args) without dynamic_shapes) "
               "and save it with torch.export.save, or " + TRUST_HINT)
GENERIC_HINT = ("deployprune loads only aten-operator programs with static shapes and plain names: "
                "re-export it with torch.export.export and torch.export.save, or " + TRUST_HINT)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FQN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_OP_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
#: Control characters other than tab and newline (Python source treats \r, \f, \v ... specially).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029\x85]")

#: aten operators with effects outside the tensors they are given (files, global RNG, printing).
DENIED_ATEN_OPS = frozenset({
    "from_file", "save", "_print", "warn", "_test_warn_in_autograd", "manual_seed", "seed", "initial_seed",
    "wait", "record_stream", "set_", "set_data",
})
#: Builtin pytree containers a treespec may name (contexts are plain JSON data or a type name).
TREESPEC_TYPES = frozenset({"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
                            "collections.namedtuple"})
#: Higher-order operators a program may call: context managers around a sub-graph of aten calls
#: (``with torch.no_grad()`` / ``torch.autocast`` inside ``forward``). Their sub-graphs are checked too.
HIGHER_ORDER_OPS = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast"})
_HOP_PREFIX = "torch.ops.higher_order."
VERIFIERS = frozenset({"ATEN", "TRAINING"})
DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})
METADATA_KEYS = frozenset({"stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "from_node"})
MAX_DIM = 2**62
_MAX_DEPTH = 64


class _Refusal(Exception):
    def __init__(self, where: str, problem: str, hint: str = GENERIC_HINT) -> None:
        super().__init__(problem)
        self.where, self.problem, self.hint = where, problem, hint


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse(where: str, problem: str, hint: str = GENERIC_HINT) -> _Refusal:
    return _Refusal(where, problem, hint)


def _obj(value: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _refuse(where, f"expected an object, got {type(value).__name__}")
    for key in value:
        if key not in required and key not in optional:
            raise _refuse(where, f"unknown field {_short(key)}")
    for key in required:
        if key not in value:
            raise _refuse(where, f"missing field {key!r}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _refuse(where, f"expected a list, got {type(value).__name__}")
    return value


def _int(value: Any, where: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if type(value) is not int:
        raise _refuse(where, f"expected an integer, got {_short(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _refuse(where, f"integer {value} is out of range")
    return value


def _bool(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise _refuse(where, f"expected true/false, got {_short(value)}")
    return value


def _float(value: Any, where: str) -> float:
    if type(value) not in (float, int):
        raise _refuse(where, f"expected a number, got {_short(value)}")
    return float(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _refuse(where, f"expected a string, got {type(value).__name__}")
    if _CONTROL.search(value):
        raise _refuse(where, "string holds control characters")
    return value


def _ident(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise _refuse(where, f"name {_short(value)} is not a plain identifier (torch pastes it into generated code)")
    return value


def _fqn(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _FQN.fullmatch(value):
        raise _refuse(where, f"name {_short(value)} is not a dotted path of plain names "
                             "(torch pastes it into generated code)")
    return value


# --------------------------------------------------------------------------------------------
# Values


def _sym_int(value: Any, where: str) -> int:
    """A size, stride or offset: ``{"as_int": n}``; a symbolic expression is refused."""
    obj = _obj(value, where, (), ("as_int", "as_expr"))
    if "as_expr" in obj or len(obj) != 1:
        expr = obj.get("as_expr")
        text = expr.get("expr_str") if isinstance(expr, dict) else None
        raise _refuse(where, f"the program has a symbolic (dynamic) size {_short(text)}, an expression torch "
                             "evaluates as code", STATIC_HINT)
    return _int(obj["as_int"], f"{where}.as_int", minimum=-MAX_DIM, maximum=MAX_DIM)


def _device(value: Any, where: str) -> None:
    obj = _obj(value, where, ("type",), ("index",))
    if obj["type"] not in DEVICE_TYPES:
        raise _refuse(f"{where}.type", f"unknown device type {_short(obj['type'])}")
    if obj.get("index") is not None:
        _int(obj["index"], f"{where}.index", minimum=0, maximum=1024)


def tensor_meta(value: Any, where: str) -> tuple[int, ...]:
    """Check a ``TensorMeta``; returns its (static) sizes."""
    obj = _obj(value, where, ("dtype", "sizes", "requires_grad", "device", "strides", "storage_offset", "layout"))
    _int(obj["dtype"], f"{where}.dtype", minimum=0, maximum=255)
    _int(obj["layout"], f"{where}.layout", minimum=0, maximum=255)
    _bool(obj["requires_grad"], f"{where}.requires_grad")
    _device(obj["device"], f"{where}.device")
    sizes = tuple(_sym_int(s, f"{where}.sizes[{i}]") for i, s in enumerate(_list(obj["sizes"], f"{where}.sizes")))
    strides = _list(obj["strides"], f"{where}.strides")
    for i, s in enumerate(strides):
        _sym_int(s, f"{where}.strides[{i}]")
    if len(strides) != len(sizes):
        raise _refuse(where, f"{len(sizes)} sizes but {len(strides)} strides")
    if any(d < 0 for d in sizes):
        raise _refuse(f"{where}.sizes", f"negative size in {list(sizes)}")
    if _sym_int(obj["storage_offset"], f"{where}.storage_offset") < 0:
        raise _refuse(f"{where}.storage_offset", "negative storage offset")
    return sizes


def _sym_argument(value: Any, where: str, literal: str, check: Callable[[Any, str], Any]) -> None:
    obj = _obj(value, where, (), ("as_name", literal))
    if len(obj) != 1 or literal not in obj:
        raise _refuse(where, "the program passes a symbolic (dynamic) value, which torch evaluates as code",
                      STATIC_HINT)
    check(obj[literal], f"{where}.{literal}")


def _tensor_ref(value: Any, where: str) -> None:
    _ident(_obj(value, where, ("name",))["name"], f"{where}.name")


def _optional_tensor(value: Any, where: str) -> None:
    obj = _obj(value, where, (), ("as_tensor", "as_none"))
    if len(obj) != 1:
        raise _refuse(where, "expected one of as_tensor / as_none")
    if "as_tensor" in obj:
        _tensor_ref(obj["as_tensor"], f"{where}.as_tensor")
    else:
        _bool(obj["as_none"], f"{where}.as_none")


def _each(check: Callable[[Any, str], Any]) -> Callable[[Any, str], None]:
    def run(value: Any, where: str) -> None:
        for i, item in enumerate(_list(value, where)):
            check(item, f"{where}[{i}]")
    return run


def _sym_int_arg(v: Any, w: str) -> None:
    _sym_argument(v, w, "as_int", _int)


def _sym_bool_arg(v: Any, w: str) -> None:
    _sym_argument(v, w, "as_bool", _bool)


def _sym_float_arg(v: Any, w: str) -> None:
    _sym_argument(v, w, "as_float", _float)


def _complex(v: Any, w: str) -> None:
    obj = _obj(v, w, ("real", "imag"))
    _float(obj["real"], f"{w}.real")
    _float(obj["imag"], f"{w}.imag")


def _string_to_argument(v: Any, w: str) -> None:
    if not isinstance(v, dict):
        raise _refuse(w, f"expected an object, got {type(v).__name__}")
    for key, arg in v.items():
        _ident(key, f"{w} key")
        argument(arg, f"{w}.{key}")


#: Argument kinds that carry plain data, and how to check each payload.
_ARGUMENTS: dict[str, Callable[[Any, str], Any]] = {
    "as_none": _bool,
    "as_tensor": _tensor_ref,
    "as_tensors": _each(_tensor_ref),
    "as_int": _int,
    "as_ints": _each(_int),
    "as_float": _float,
    "as_floats": _each(_float),
    "as_string": _text,
    "as_strings": _each(_text),
    "as_sym_int": _sym_int_arg,
    "as_sym_ints": _each(_sym_int_arg),
    "as_sym_bool": _sym_bool_arg,
    "as_sym_bools": _each(_sym_bool_arg),
    "as_sym_float": _sym_float_arg,
    "as_sym_floats": _each(_sym_float_arg),
    "as_scalar_type": lambda v, w: _int(v, w, minimum=0, maximum=255),
    "as_memory_format": lambda v, w: _int(v, w, minimum=0, maximum=255),
    "as_layout": lambda v, w: _int(v, w, minimum=0, maximum=255),
    "as_device": _device,
    "as_bool": _bool,
    "as_bools": _each(_bool),
    "as_optional_tensors": _each(_optional_tensor),
    "as_optional_tensor": _optional_tensor,
    "as_complex": _complex,
    "as_nested_tensors": _each(_each(_tensor_ref)),
    "as_int_lists": _each(_each(_int)),
    "as_float_lists": _each(_each(_float)),
    "as_string_to_argument": _string_to_argument,
}
_REFUSED_ARGUMENTS = {
    "as_graph": "a sub-graph (higher-order operator)",
    "as_custom_obj": "a custom object (a TorchBind class whose code would run)",
    "as_operator": "an operator passed as a value",
}


def argument(value: Any, where: str, *, graphs: bool = False) -> None:
    """One ``Argument``; ``graphs``: a sub-graph is allowed (the body of an allowed higher-order op)."""
    if not isinstance(value, dict) or len(value) != 1:
        raise _refuse(where, "expected an argument object with exactly one field")
    (kind, payload), = value.items()
    if kind == "as_graph" and graphs:
        sub = _obj(payload, f"{where}.as_graph", ("name", "graph"))
        _ident(sub["name"], f"{where}.as_graph.name")
        _graph(sub["graph"], f"{where}.as_graph.graph")
        return
    if kind in _REFUSED_ARGUMENTS:
        raise _refuse(where, f"the program passes {_REFUSED_ARGUMENTS[kind]}")
    check = _ARGUMENTS.get(kind)
    if check is None:
        raise _refuse(where, f"unknown argument kind {_short(kind)}")
    check(payload, f"{where}.{kind}")


def _input_argument(value: Any, where: str) -> None:
    """A graph input: a tensor, or a plain number/bool/None (never a string: torch pastes it into a guard)."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) not in (
            "as_tensor", "as_int", "as_float", "as_bool", "as_none"):
        raise _refuse(where, f"graph input of kind {_short(next(iter(value)))}; only tensors and numbers are "
                             "loaded (torch pastes other constants into generated guard code)")
    argument(value, where)


# --------------------------------------------------------------------------------------------
# Graph


def _operator(target: Any, where: str) -> bool:
    """Check a node's target; True for an allowed higher-order operator (its inputs may be sub-graphs)."""
    if target == "_operator.getitem":
        return False
    if isinstance(target, str) and target.startswith(_HOP_PREFIX):
        if target[len(_HOP_PREFIX):] in HIGHER_ORDER_OPS:
            return True
        raise _refuse(where, f"the program calls the higher-order operator {_short(target[len(_HOP_PREFIX):])}; "
                             f"deployprune loads only {', '.join(sorted(HIGHER_ORDER_OPS))} from a file")
    m = _OP_TARGET.fullmatch(target) if isinstance(target, str) else None
    if m is None:
        raise _refuse(where, f"the program calls operator {_short(target)}, outside the aten operators "
                             "deployprune loads from a file")
    op, overload = m.groups()
    if op in DENIED_ATEN_OPS:
        raise _refuse(where, f"the program calls aten.{op}, which reaches outside its tensors (files, global state)")
    import torch

    try:
        resolved = getattr(getattr(torch.ops.aten, op), overload)
    except (AttributeError, RuntimeError):
        raise _refuse(where, f"unknown operator aten.{op}.{overload}") from None
    if not isinstance(resolved, torch._ops.OpOverload) or resolved._schema.name != f"aten::{op}":
        raise _refuse(where, f"{target} is not an aten operator")
    return False


def _metadata(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise _refuse(where, f"expected an object, got {type(value).__name__}")
    for key, text in value.items():
        if key not in METADATA_KEYS:
            raise _refuse(where, f"unknown metadata field {_short(key)}")
        _text(text, f"{where}.{key}")
        if key in ("custom", "from_node"):
            _plain_json(text, f"{where}.{key}", allow_objects=True)


def _node(value: Any, where: str) -> None:
    obj = _obj(value, where, ("target", "inputs", "outputs"), ("metadata", "is_hop_single_tensor_return", "name"))
    hop = _operator(obj["target"], f"{where}.target")
    for i, named in enumerate(_list(obj["inputs"], f"{where}.inputs")):
        w = f"{where}.inputs[{i}]"
        na = _obj(named, w, ("name", "arg"), ("kind",))
        if not (hop and na["name"] == ""):  # higher-order operators take positional, unnamed inputs
            _ident(na["name"], f"{w}.name")
        argument(na["arg"], f"{w}.arg", graphs=hop)
        if na.get("kind") is not None:
            _int(na["kind"], f"{w}.kind", minimum=0, maximum=16)
    for i, out in enumerate(_list(obj["outputs"], f"{where}.outputs")):
        argument(out, f"{where}.outputs[{i}]")
    _metadata(obj.get("metadata", {}), f"{where}.metadata")
    if obj.get("is_hop_single_tensor_return") is not None:
        _bool(obj["is_hop_single_tensor_return"], f"{where}.is_hop_single_tensor_return")
    if obj.get("name") is not None:
        _ident(obj["name"], f"{where}.name")


def _empty(value: Any, where: str, problem: str, hint: str = GENERIC_HINT) -> None:
    if value not in ({}, [], None):
        raise _refuse(where, problem, hint)


def _graph(value: Any, where: str) -> dict[str, tuple[int, ...]]:
    obj = _obj(value, where, ("inputs", "outputs", "nodes", "tensor_values"),
               ("sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values",
                "is_single_tensor_return"))
    for key in ("sym_int_values", "sym_bool_values", "sym_float_values"):
        _empty(obj.get(key), f"{where}.{key}", "the program has symbolic (dynamic) values, which torch "
                                                "evaluates as code", STATIC_HINT)
    _empty(obj.get("custom_obj_values"), f"{where}.custom_obj_values",
           "the program holds custom objects (TorchBind classes whose code would run)")
    if obj.get("is_single_tensor_return") is not None:
        _bool(obj["is_single_tensor_return"], f"{where}.is_single_tensor_return")
    values = obj["tensor_values"]
    if not isinstance(values, dict):
        raise _refuse(f"{where}.tensor_values", "expected an object")
    shapes = {}
    for name, meta in values.items():
        _ident(name, f"{where}.tensor_values key")
        shapes[name] = tensor_meta(meta, f"{where}.tensor_values.{name}")
    for i, arg in enumerate(_list(obj["inputs"], f"{where}.inputs")):
        _input_argument(arg, f"{where}.inputs[{i}]")
    for i, arg in enumerate(_list(obj["outputs"], f"{where}.outputs")):
        argument(arg, f"{where}.outputs[{i}]")
    for i, node in enumerate(_list(obj["nodes"], f"{where}.nodes")):
        _node(node, f"{where}.nodes[{i}]")
    return shapes


# --------------------------------------------------------------------------------------------
# Signature, module call graph, treespecs

_INPUT_SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {
    # kind: (required fields, optional fields, the field holding a parameter/buffer path)
    "user_input": (("arg",), (), None),
    "parameter": (("arg", "parameter_name"), (), "parameter_name"),
    "buffer": (("arg", "buffer_name"), ("persistent",), "buffer_name"),
    "tensor_constant": (("arg", "tensor_constant_name"), (), "tensor_constant_name"),
    "constant_input": (("name", "value"), (), None),
}
_OUTPUT_SPECS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "user_output": (("arg",), None),
    "loss_output": (("arg",), None),
    "buffer_mutation": (("arg", "buffer_name"), "buffer_name"),
    "parameter_mutation": (("arg", "parameter_name"), "parameter_name"),
    "gradient_to_parameter": (("arg", "parameter_name"), "parameter_name"),
    "gradient_to_user_input": (("arg", "user_input_name"), "user_input_name"),
    "user_input_mutation": (("arg", "user_input_name"), "user_input_name"),
}


def _one_of(value: Any, where: str, kinds: Mapping[str, Any], refused: Mapping[str, str]) -> tuple[str, Any]:
    if not isinstance(value, dict) or len(value) != 1:
        raise _refuse(where, "expected an object with exactly one field")
    (kind, payload), = value.items()
    if kind in refused:
        raise _refuse(where, refused[kind])
    if kind not in kinds:
        raise _refuse(where, f"unknown kind {_short(kind)}")
    return kind, payload


def _signature(value: Any, where: str) -> list[str]:
    """Check the graph signature; returns the names of the user inputs, in order."""
    obj = _obj(value, where, ("input_specs", "output_specs"))
    user_inputs = []
    refused_in = {"custom_obj": "the program takes a custom object (a TorchBind class whose code would run)",
                  "token": "the program threads effect tokens (operators with side effects)"}
    for i, spec in enumerate(_list(obj["input_specs"], f"{where}.input_specs")):
        w = f"{where}.input_specs[{i}]"
        kind, payload = _one_of(spec, w, _INPUT_SPECS, refused_in)
        required, optional, path_field = _INPUT_SPECS[kind]
        fields = _obj(payload, f"{w}.{kind}", required, optional)
        if kind == "user_input":
            _input_argument(fields["arg"], f"{w}.{kind}.arg")
            arg = fields["arg"]
            if "as_tensor" in arg:
                user_inputs.append(arg["as_tensor"]["name"])
        elif kind == "constant_input":
            _ident(fields["name"], f"{w}.{kind}.name")
            const_kind, const = _one_of(fields["value"], f"{w}.{kind}.value",
                                        {"as_none": _bool, "as_int": _int, "as_float": _float, "as_bool": _bool},
                                        {"as_string": "a constant string input (torch pastes it into guard code)"})
            {"as_none": _bool, "as_int": _int, "as_float": _float, "as_bool": _bool}[const_kind](
                const, f"{w}.{kind}.value.{const_kind}")
        else:
            _tensor_ref(fields["arg"], f"{w}.{kind}.arg")
            _fqn(fields[path_field], f"{w}.{kind}.{path_field}")
            if "persistent" in fields:
                _bool(fields["persistent"], f"{w}.{kind}.persistent")
    for i, spec in enumerate(_list(obj["output_specs"], f"{where}.output_specs")):
        w = f"{where}.output_specs[{i}]"
        kind, payload = _one_of(spec, w, _OUTPUT_SPECS,
                                {"token": "the program threads effect tokens (operators with side effects)"})
        required, path_field = _OUTPUT_SPECS[kind]
        fields = _obj(payload, f"{w}.{kind}", required)
        if kind == "user_output":
            argument(fields["arg"], f"{w}.{kind}.arg")
        else:
            _tensor_ref(fields["arg"], f"{w}.{kind}.arg")
        if path_field is not None:
            _fqn(fields[path_field], f"{w}.{kind}.{path_field}")
    return user_inputs


def _plain_json(text: str, where: str, *, allow_objects: bool = False) -> Any:
    """Decode JSON that torch decodes too; without ``allow_objects``, no JSON object may appear
    (torch's treespec decoder imports the module an ``{"__enum__": ...}`` object names)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise _refuse(where, "not valid JSON") from None

    def walk(v: Any, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _refuse(where, "JSON nested too deeply")
        if isinstance(v, dict):
            if not allow_objects or "__enum__" in v:
                raise _refuse(where, "a JSON object where torch decodes (and may import) a Python type")
            for item in v.values():
                walk(item, depth + 1)
        elif isinstance(v, list):
            for item in v:
                walk(item, depth + 1)
        elif isinstance(v, str) and _CONTROL.search(v):
            raise _refuse(where, "string holds control characters")

    walk(value, 0)
    return value


def _treespec_type_ok(typ: Any) -> bool:
    """A builtin container, or a pytree type registered in this process (looked up, never imported)
    whose context torch decodes as plain JSON (no custom decoder: defaultdict's imports a module)."""
    if typ in TREESPEC_TYPES:
        return True
    if not isinstance(typ, str) or not _TYPE_NAME.fullmatch(typ) or typ == "NO_SERIALIZED_TYPE_NAME_FOUND":
        return False
    from torch.utils import _pytree

    cls = _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(typ)
    node = _pytree.SUPPORTED_SERIALIZED_TYPES.get(cls) if cls is not None else None
    return node is not None and node.from_dumpable_context is None


def _treespec_node(node: Any, where: str, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise _refuse(where, "treespec nested too deeply")
    obj = _obj(node, where, ("type", "context", "children_spec"))
    typ, context = obj["type"], obj["context"]
    if typ is not None and not _treespec_type_ok(typ):
        raise _refuse(f"{where}.type", f"treespec container {_short(typ)} is neither a builtin container nor a "
                                       "pytree type registered in this process")
    if context is not None:
        if not isinstance(context, str):
            raise _refuse(f"{where}.context", "expected a JSON string")
        _plain_json(context, f"{where}.context")
    for i, child in enumerate(_list(obj["children_spec"], f"{where}.children_spec")):
        _treespec_node(child, f"{where}.children_spec[{i}]", depth + 1)


def treespec(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise _refuse(where, "expected a serialized treespec string")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise _refuse(where, "not valid JSON") from None
    if not (isinstance(value, list) and len(value) == 2 and value[0] == 1):
        raise _refuse(where, "expected [1, {...}] (treespec protocol 1)")
    _treespec_node(value[1], f"{where}[1]")


def _module_call_graph(value: Any, where: str) -> None:
    for i, entry in enumerate(_list(value, where)):
        w = f"{where}[{i}]"
        obj = _obj(entry, w, ("fqn",), ("signature",))
        if obj["fqn"] != "":
            _fqn(obj["fqn"], f"{w}.fqn")
        sig = obj.get("signature")
        if sig is None:
            continue
        s = _obj(sig, f"{w}.signature", ("inputs", "outputs", "in_spec", "out_spec"), ("forward_arg_names",))
        for key in ("inputs", "outputs"):
            for j, arg in enumerate(_list(s[key], f"{w}.signature.{key}")):
                argument(arg, f"{w}.signature.{key}[{j}]")
        treespec(s["in_spec"], f"{w}.signature.in_spec")
        treespec(s["out_spec"], f"{w}.signature.out_spec")
        if s.get("forward_arg_names") is not None:
            for j, name in enumerate(_list(s["forward_arg_names"], f"{w}.signature.forward_arg_names")):
                _ident(name, f"{w}.signature.forward_arg_names[{j}]")


def _namedtuple_fields(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise _refuse(where, "expected an object")
    for type_name, fields in value.items():
        if not isinstance(type_name, str) or not _TYPE_NAME.fullmatch(type_name):
            raise _refuse(where, f"namedtuple type name {_short(type_name)} is not a dotted name")
        names = _obj(fields, f"{where}.{type_name}", ("field_names",))["field_names"]
        for j, name in enumerate(_list(names, f"{where}.{type_name}.field_names")):
            _ident(name, f"{where}.{type_name}.field_names[{j}]")


# --------------------------------------------------------------------------------------------
# Entry points


@dataclass(frozen=True)
class ProgramInfo:
    """What the check learnt: the user inputs' names and static shapes, in order."""

    user_inputs: tuple[tuple[str, tuple[int, ...]], ...]


_PROGRAM_FIELDS = ("graph_module", "opset_version", "range_constraints", "schema_version")
_PROGRAM_OPTIONAL = ("verifiers", "torch_version", "guards_code")


def _program(value: Any) -> ProgramInfo:
    obj = _obj(value, "program", _PROGRAM_FIELDS, _PROGRAM_OPTIONAL)
    guards = obj.get("guards_code")
    if guards not in (None, []):
        n = len(guards) if isinstance(guards, list) else 1
        raise _refuse("program.guards_code", f"the program carries {n} line(s) of guard code, which torch "
                                             "executes when it builds the module", STATIC_HINT)
    _empty(obj["range_constraints"], "program.range_constraints",
           "the program has symbolic (dynamic) dimensions, whose size expressions torch evaluates as code",
           STATIC_HINT)
    version = _obj(obj["schema_version"], "program.schema_version", ("major", "minor"))
    _int(version["major"], "program.schema_version.major", minimum=0)
    _int(version["minor"], "program.schema_version.minor", minimum=0)
    opsets = obj["opset_version"]
    if not isinstance(opsets, dict):
        raise _refuse("program.opset_version", "expected an object")
    for name, number in opsets.items():
        _ident(name, "program.opset_version key")
        _int(number, f"program.opset_version.{name}")
    for i, verifier in enumerate(_list(obj.get("verifiers", []), "program.verifiers")):
        if verifier not in VERIFIERS:
            raise _refuse(f"program.verifiers[{i}]", f"unknown verifier {_short(verifier)}")
    if "torch_version" in obj:
        _text(obj["torch_version"], "program.torch_version")

    gm = _obj(obj["graph_module"], "program.graph_module", ("graph", "signature", "module_call_graph"),
              ("metadata", "treespec_namedtuple_fields"))
    meta = gm.get("metadata", {})
    if not isinstance(meta, dict) or any(k != "custom" for k in meta):
        raise _refuse("program.graph_module.metadata", "unknown module metadata (only 'custom' is loaded)")
    if "custom" in meta:
        _text(meta["custom"], "program.graph_module.metadata.custom")
        _plain_json(meta["custom"], "program.graph_module.metadata.custom", allow_objects=True)
    _namedtuple_fields(gm.get("treespec_namedtuple_fields", {}), "program.graph_module.treespec_namedtuple_fields")
    shapes = _graph(gm["graph"], "program.graph_module.graph")
    user_inputs = _signature(gm["signature"], "program.graph_module.signature")
    _module_call_graph(gm["module_call_graph"], "program.graph_module.module_call_graph")
    missing = [n for n in user_inputs if n not in shapes]
    if missing:
        raise _refuse("program.graph_module.signature", f"user input {missing[0]!r} has no tensor metadata")
    return ProgramInfo(tuple((n, shapes[n]) for n in user_inputs))


def _fail(path: str, entry: str, refusal: _Refusal) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: {refusal.problem} ({entry}: {refusal.where}); {refusal.hint}")


def check_program_json(data: bytes, *, path: str, entry: str) -> ProgramInfo:
    """Check ``models/<name>.json`` of a ``.pt2`` archive; raise a one-line UnsafeFileError if it
    holds anything torch would turn into code (or anything this check does not know)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise InputError(f"{path}: cannot load the torch.export program ({entry} is not valid JSON); "
                         "the file is corrupt, re-export or re-copy it") from None
    try:
        return _program(value)
    except _Refusal as refusal:
        raise _fail(path, entry, refusal) from None
    except RecursionError:
        raise UnsafeFileError(f"{path}: {entry} is nested too deeply; {GENERIC_HINT}") from None


_PAYLOAD_NAMES = {"weights": re.compile(r"weight_\d+"), "constants": re.compile(r"tensor_\d+")}


def check_payload_config(data: bytes, *, path: str, entry: str, kind: str,
                         record_size: Callable[[str], int | None]) -> None:
    """Check ``data/<kind>/<model>_<kind>_config.json``: plain (unpickled) tensors only, each naming an
    existing ``weight_<n>`` / ``tensor_<n>`` record, with static shapes; an empty record must
    describe an empty tensor (torch would allocate the declared size from nothing)."""
    pattern = _PAYLOAD_NAMES[kind]
    try:
        value = json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise InputError(f"{path}: cannot load the torch.export program ({entry} is not valid JSON); "
                         "the file is corrupt, re-export or re-copy it") from None
    try:
        config = _obj(value, "config", ("config",))["config"]
        if not isinstance(config, dict):
            raise _refuse("config.config", "expected an object")
        for fqn, meta in config.items():
            w = f"config.{_short(fqn, 40)}"
            _fqn(fqn, f"{w} (key)")
            m = _obj(meta, w, ("path_name", "is_param", "use_pickle", "tensor_meta"))
            if m["use_pickle"] is not False:
                raise _refuse(f"{w}.use_pickle", f"tensor {fqn!r} in the torch.export archive is pickled; loading "
                                                 "it would run code from the file", "re-export with plain tensors")
            _bool(m["is_param"], f"{w}.is_param")
            name = m["path_name"]
            if not isinstance(name, str) or not pattern.fullmatch(name):
                raise _refuse(f"{w}.path_name", f"record name {_short(name)} is not a plain {kind} record")
            size = record_size(name)
            if size is None:
                raise _refuse(f"{w}.path_name", f"record {name!r} is not in the archive")
            sizes = tensor_meta(m["tensor_meta"], f"{w}.tensor_meta")
            if size == 0 and all(d > 0 for d in sizes):
                raise _refuse(f"{w}.tensor_meta", f"an empty record declared as a {list(sizes)} tensor")
    except _Refusal as refusal:
        raise _fail(path, entry, refusal) from None
