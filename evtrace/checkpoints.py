"""Stream files: the stream of an :class:`~evtrace.eventful.EventfulModel` as data.

A stream file holds the state of the current input signature (gate references, region buffers,
attention state, the Python-side flags and counters, the stateful policies' ``state_dict()`` and
the scene-cut detectors' history) as plain data: tensors, numbers, strings, lists and dicts. It is
read with ``torch.load(weights_only=True)``, which builds nothing else, so a file cannot run code.

Everything in the file is checked against the receiving model before anything is written: the
model class, the rewritten graph, the input signature, the transform options that shape the
stream, every gate's policy settings and the detector's settings (a mismatch is an error saying
what differs: a load never changes the receiving model's configuration), and every tensor's
name, shape, dtype and finiteness. Only then is everything copied (validate all, then copy all):
a file that does not fit raises ``ValueError`` and leaves the model bit for bit as it was.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import torch
import torch.fx
from torch import nn

from evtrace.runtime.attention import ExactDeltaAttention, GroupedDeltaAttention, PaperDeltaAttention
from evtrace.runtime.policies import StatefulPolicy
from evtrace.runtime.scene_cut import SceneCutDetector

FORMAT = "evtrace-stream/2"
#: Python-side stream flags of the runtime modules: name -> kind (the rest of the state is tensors)
STREAM_FLAGS = {"fresh": bool, "fresh_streams": list, "_needs_init": bool, "_fresh_streams": list}
#: transform options that shape the stream: a file made under others does not continue it
STREAM_OPTIONS = ("attention", "always_update_prefix", "repair_rows", "refresh_every", "stream_axis")
#: the per-stream counters of the eventful model
COUNTERS = {"frames_since_refresh": int, "refreshes": int, "_frames": int, "_fresh": bool}
_DETECTOR_SETTINGS = ("factor", "min_change", "window", "warmup", "grid", "texture", "min_content")
_DETECTOR_STATE = ("_previous", "_previous_content", "_history", "_count", "_seen", "last_change")
#: state allocated on the first call (None before): checked by how its tensors relate
_LAZY = {
    ExactDeltaAttention: ("k_ref", "v_ref", "m", "n", "z", "mag"),
    PaperDeltaAttention: ("logits", "a_ref", "v_ref", "y"),
}


class StreamFileError(ValueError):
    """A stream file (or :meth:`stream_state` dict) that does not fit the receiving model."""


# ----------------------------------------------------------------------------- what is saved


def stream_modules(graph_module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in graph_module.named_modules() if name}


def _graph_structure(graph: torch.fx.Graph) -> str:
    """The graph's ops and wiring with nodes numbered in order: pickling re-traces a GraphModule
    from its code, which renames nodes but keeps this."""
    index = {node: i for i, node in enumerate(graph.nodes)}
    lines = []
    for node in graph.nodes:
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        target = (
            node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        )
        lines.append(f"{node.op} {target} {args}")
    return "\n".join(lines)


def graph_hash(graph_module: nn.Module) -> str:
    code = hashlib.sha256()
    for module in graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            code.update(_graph_structure(module.graph).encode())
    return code.hexdigest()


def _option(value):
    return str(value) if not isinstance(value, (int, float, bool, type(None))) else value


def _detector(detector: SceneCutDetector | None) -> dict | None:
    if detector is None:
        return None
    state = None
    if detector._previous is not None:
        state = {name: getattr(detector, name).detach().clone() for name in _DETECTOR_STATE}
    return {"settings": {name: getattr(detector, name) for name in _DETECTOR_SETTINGS}, "state": state}


def _live_detectors(emodel) -> dict[str, SceneCutDetector | None]:
    """The model's detector ("") and those of its step loops (by module path)."""
    found = {"": emodel._scene_cut}
    for path, module in stream_modules(emodel.graph_module).items():
        if isinstance(getattr(module, "scene_cut", None), SceneCutDetector):
            found[path] = module.scene_cut
    return found


def _gate_policies(emodel) -> tuple[dict[str, dict], list[tuple[list[str], StatefulPolicy]]]:
    """Every gate's policy settings, and the distinct stateful policies with the gates using each."""
    settings, stateful = {}, {}
    for name, region in emodel._variant.regions.items():
        policy = region.gate.policy
        settings[name] = policy.settings()
        if isinstance(policy, StatefulPolicy):
            stateful.setdefault(id(policy), ([], policy))[0].append(name)
    return settings, list(stateful.values())


def stream_state(emodel) -> dict:
    """The stream of ``emodel``'s current input signature as plain data (tensors cloned)."""
    modules = stream_modules(emodel.graph_module)
    tensors, flags = {}, {}
    for path, module in modules.items():
        for name, value in module._buffers.items():
            tensors[f"{path}.{name}"] = None if value is None else value.detach().clone()
        kept = {k: getattr(module, k) for k in STREAM_FLAGS if hasattr(module, k)}
        if kept:
            flags[path] = {k: list(v) if isinstance(v, tuple) else v for k, v in kept.items()}
    settings, stateful = _gate_policies(emodel)
    options = emodel._options
    return {
        "format": FORMAT,
        "model": type(emodel._model_ref[0]).__qualname__,
        "signature": repr(emodel._signature),
        "graph": graph_hash(emodel.graph_module),
        "options": {name: _option(getattr(options, name)) for name in STREAM_OPTIONS},
        "gate_policies": settings,
        "policies": [{"gates": gates, "state": policy.state_dict()} for gates, policy in stateful],
        "detectors": {path: _detector(d) for path, d in _live_detectors(emodel).items()},
        "tensors": tensors,
        "flags": flags,
        "counters": {name: getattr(emodel, name) for name in COUNTERS},
    }


def save_stream(emodel, path) -> None:
    torch.save(stream_state(emodel), path)


def read_stream_file(source) -> dict:
    """A stream file's content as data: ``torch.load(weights_only=True)``, which refuses (without
    running it) anything that is not tensors and plain containers."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StreamFileError(
            f"{source}: not loaded as data: the file holds objects other than tensors and plain "
            f"containers, which a stream file never does (refused without running them: {first}). "
            "Nothing was loaded; only load stream files from sources you trust"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise StreamFileError(
            f"{source}: not a readable stream file ({type(error).__name__}: {error})"
        ) from None


# ----------------------------------------------------------------------------- checks


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _lazy_problems(module: nn.Module, path: str, saved: dict, dtype: torch.dtype | None) -> list[str]:
    """Attention state the receiving module has not allocated yet: all of it or none, of the
    traced dtype, with the shapes its allocation gives each tensor from the others."""
    names = next((n for cls, n in _LAZY.items() if isinstance(module, cls)), None)
    if names is None:
        return []
    values = [saved.get(f"{path}.{n}") for n in names]
    if all(v is None for v in values):
        return []
    if any(v is None for v in values) or any(v.dim() < 3 for v in values):
        return [f"{path}: attention state is partial or has too few dims"]
    shapes = dict(zip(names, (tuple(v.shape) for v in values), strict=False))
    dtypes = dict(zip(names, (v.dtype for v in values), strict=True))
    if isinstance(module, ExactDeltaAttention):
        k, v, m = shapes["k_ref"], shapes["v_ref"], shapes["m"]
        want = {
            "k_ref": k if len(k) == 4 else None,
            "v_ref": k[:3] + v[3:] if len(v) == 4 else None,
            "m": k[:2] + m[2:3] if len(m) == 3 else None,
            "z": m,
            "mag": m,
            "n": m + v[3:],
        }
        want_dtype = {n: (dtype if n in ("k_ref", "v_ref") else _acc(dtype)) for n in names}
    else:
        logits, v = shapes["logits"], shapes["v_ref"]
        want = {
            "logits": logits if len(logits) == 4 else None,
            "a_ref": logits,
            "v_ref": logits[:2] + logits[3:4] + v[3:] if len(v) == 4 else None,
            "y": logits[:3] + v[3:],
        }
        want_dtype = dict.fromkeys(names, dtype)
    problems = []
    for name in names:
        if want[name] is None or shapes[name] != want[name]:
            problems.append(f"{path}.{name}: shape {shapes[name]} does not fit the site's other state")
        if dtype is not None and dtypes[name] != want_dtype[name]:
            problems.append(f"{path}.{name}: dtype {dtypes[name]}, this model's is {want_dtype[name]}")
    return problems


def _tensor_problems(emodel, saved: dict) -> list[str]:
    modules = stream_modules(emodel.graph_module)
    ours = {}
    for path, module in modules.items():
        for name, value in module._buffers.items():
            ours[f"{path}.{name}"] = (module, path, name, value)
    problems = []
    missing = sorted(set(ours) - set(saved))
    extra = sorted(set(saved) - set(ours))
    if missing:
        problems.append(f"state tensors missing from the file: {missing[:3]}")
    if extra:
        problems.append(f"unexpected state tensors in the file (saved only): {extra[:3]}")
    dtype = emodel._signature_dtype()
    dtype = dtype if isinstance(dtype, torch.dtype) else None
    lazy_checked = set()
    for key in sorted(set(ours) & set(saved)):
        module, path, name, current = ours[key]
        value = saved[key]
        lazy = any(isinstance(module, cls) and name in names for cls, names in _LAZY.items()) or (
            isinstance(module, GroupedDeltaAttention) and name == "_group_out"
        )
        if value is None:
            if not lazy:
                problems.append(f"{key}: None in the file, this model holds a {tuple(current.shape)} tensor")
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: a {type(value).__name__} in the file, not a tensor")
            continue
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            problems.append(f"{key}: holds NaN or Inf")
        if current is not None:
            if tuple(value.shape) != tuple(current.shape):
                problems.append(
                    f"{key}: shape {tuple(value.shape)} in the file, this model's is {tuple(current.shape)}"
                )
            if value.dtype != current.dtype:
                problems.append(f"{key}: dtype {value.dtype} in the file, this model's is {current.dtype}")
        elif not lazy:
            problems.append(f"{key}: a tensor in the file, this model holds none there")
        elif name == "_group_out":
            if value.dim() != 4 or (dtype is not None and value.dtype != dtype):
                problems.append(f"{key}: shape {tuple(value.shape)}, dtype {value.dtype} is no group output")
        elif path not in lazy_checked:
            lazy_checked.add(path)
            problems += _lazy_problems(module, path, saved, dtype)
    return problems


def _flag_problems(emodel, flags) -> list[str]:
    if not isinstance(flags, dict):
        return ["'flags' is not a dict"]
    modules = stream_modules(emodel.graph_module)
    ours = {path: {k for k in STREAM_FLAGS if hasattr(m, k)} for path, m in modules.items()}
    ours = {path: keys for path, keys in ours.items() if keys}
    if set(flags) != set(ours):
        return [f"stream flags for other modules (saved {sorted(flags)[:3]}, this model {sorted(ours)[:3]})"]
    problems = []
    for path, kept in flags.items():
        if not isinstance(kept, dict) or set(kept) != ours[path]:
            problems.append(
                f"{path}: flags {sorted(kept) if isinstance(kept, dict) else kept!r}, "
                f"expected {sorted(ours[path])}"
            )
            continue
        for key, value in kept.items():
            kind = STREAM_FLAGS[key]
            if kind is bool and not isinstance(value, bool):
                problems.append(f"{path}.{key}: {value!r} is not a bool")
            elif kind is list and not (
                isinstance(value, list)
                and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in value)
            ):
                problems.append(f"{path}.{key}: {value!r} is not a list of stream rows")
    return problems


def _settings_diff(saved: dict, ours: dict) -> str:
    if not isinstance(saved, dict):
        return f"{saved!r} in the file"
    if saved.get("type") != ours.get("type"):
        return f"the file's policy is a {saved.get('type')}, this model's a {ours.get('type')}"
    keys = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    theirs = ", ".join(f"{k}={saved.get(k)!r}" for k in keys)
    mine = ", ".join(f"{k}={ours.get(k)!r}" for k in keys)
    return f"the file's {ours['type']} has {theirs}, this model's has {mine}"


def _policy_problems(emodel, saved: dict) -> list[str]:
    settings, stateful = _gate_policies(emodel)
    problems = []
    gates = saved.get("gate_policies")
    if not isinstance(gates, dict) or set(gates) != set(settings):
        return ["the file's gates differ from this model's"]
    for name in sorted(settings):
        if gates[name] != settings[name]:
            problems.append(f"gate {name}: {_settings_diff(gates[name], settings[name])}")
    entries = saved.get("policies")
    if not isinstance(entries, list) or len(entries) != len(stateful):
        return problems + ["the file's stateful policies differ from this model's"]
    for entry, (names, policy) in zip(entries, stateful, strict=True):
        if not isinstance(entry, dict) or entry.get("gates") != names:
            problems.append(f"{policy!r} serves gates {names}, the file's policy other gates")
            continue
        problems += [f"{policy!r}: {p}" for p in policy.check_state_dict(entry.get("state"))]
    return problems


def _detector_problems(emodel, saved) -> list[str]:
    ours = {path: _detector(d) for path, d in _live_detectors(emodel).items()}
    if not isinstance(saved, dict) or set(saved) != set(ours):
        return ["scene-cut detectors differ (a detector in one model and not in the other)"]
    problems = []
    for path, mine in ours.items():
        theirs = saved[path]
        where = "the model's scene-cut detector" if path == "" else f"the scene-cut detector of {path}"
        if (mine is None) != (theirs is None):
            state = "with" if theirs is not None else "without"
            problems.append(
                f"{where}: the stream was saved {state} scene-cut detection and this model was built "
                f"{'without' if mine is None else 'with'} it (transform(..., scene_cut=...))"
            )
            continue
        if mine is None:
            continue
        if not isinstance(theirs, dict) or theirs.get("settings") != mine["settings"]:
            problems.append(
                f"{where}: settings {theirs.get('settings') if isinstance(theirs, dict) else theirs!r} "
                f"in the file, this model's are {mine['settings']}"
            )
            continue
        problems += _detector_state_problems(where, theirs.get("state"), mine["settings"]["window"])
    return problems


def _detector_state_problems(where: str, state, window: int) -> list[str]:
    if state is None:
        return []
    if not isinstance(state, dict) or set(state) != set(_DETECTOR_STATE):
        return [f"{where}: its state holds {sorted(state) if isinstance(state, dict) else state!r}"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return [f"{where}: its state is not all tensors"]
    previous = state["_previous"]
    if previous.dim() != 3 or previous.dtype != torch.float32 or not bool(torch.isfinite(previous).all()):
        return [
            f"{where}: previous picture {tuple(previous.shape)} {previous.dtype} is not a finite "
            "(B, C, cells) map"
        ]
    b, cells = previous.shape[0], previous.shape[2]
    want = {
        "_previous_content": ((b, cells), torch.bool),
        "_history": ((b, window), torch.float32),
        "_count": ((b,), torch.long),
        "_seen": ((b,), torch.bool),
        "last_change": ((b,), torch.float32),
    }
    problems = []
    for name, (shape, dtype) in want.items():
        value = state[name]
        if tuple(value.shape) != shape or value.dtype != dtype:
            problems.append(
                f"{where}: {name} is {tuple(value.shape)} {value.dtype}, expected {shape} {dtype}"
            )
    if problems:
        return problems
    if bool(torch.isinf(state["_history"]).any()) or not bool(torch.isfinite(state["last_change"]).all()):
        problems.append(
            f"{where}: its history holds Inf (NaN marks unfilled entries) or its last change is not finite"
        )
    if bool(((state["_count"] < 0) | (state["_count"] > window)).any()):
        problems.append(f"{where}: counts outside [0, {window}]")
    return problems


def _header_problems(emodel, saved: dict) -> list[str]:
    problems = []
    current = {
        "model": type(emodel._model_ref[0]).__qualname__,
        "signature": repr(emodel._signature),
        "graph": graph_hash(emodel.graph_module),
    }
    for key, mine in current.items():
        if saved.get(key) != mine:
            what = {"graph": "rewritten graph (architecture)", "signature": "input signature"}.get(key, key)
            problems.append(f"{what}: the file's {saved.get(key)!r}, this model's {mine!r}")
    options = {name: _option(getattr(emodel._options, name)) for name in STREAM_OPTIONS}
    theirs = saved.get("options")
    if not isinstance(theirs, dict):
        problems.append("no transform options in the file")
    else:
        for name, mine in options.items():
            if theirs.get(name) != mine:
                problems.append(
                    f"transform option {name}: the file's {theirs.get(name)!r}, this model's {mine!r}"
                )
    counters = saved.get("counters")
    if not isinstance(counters, dict) or set(counters) != set(COUNTERS):
        problems.append("the file's counters are not the stream counters")
    else:
        for name, kind in COUNTERS.items():
            value = counters[name]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                problems.append(f"counter {name}: {value!r} is not an int >= 0")
            if kind is bool and not isinstance(value, bool):
                problems.append(f"counter {name}: {value!r} is not a bool")
    return problems


def check_stream(emodel, saved) -> list[str]:
    """Everything that keeps ``saved`` from loading into ``emodel`` (empty when it fits)."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        return [f"not an evtrace stream checkpoint (expected format {FORMAT!r}, found {found!r})"]
    problems = _header_problems(emodel, saved)
    if problems and any(p.startswith(("rewritten graph", "model", "input signature")) for p in problems):
        return problems  # another model: the per-tensor list would only repeat it
    tensors = saved.get("tensors")
    if not isinstance(tensors, dict):
        return problems + ["'tensors' is not a dict"]
    problems += _tensor_problems(emodel, tensors)
    problems += _flag_problems(emodel, saved.get("flags"))
    problems += _policy_problems(emodel, saved)
    problems += _detector_problems(emodel, saved.get("detectors"))
    return problems


# ----------------------------------------------------------------------------- the load


def load_stream(emodel, source) -> None:
    """Validate all of ``source`` (a path, a file object or a :func:`stream_state` dict) against
    ``emodel``, then copy all of it. Raises :class:`StreamFileError` (a ValueError) with nothing
    changed when anything does not fit."""
    saved = source if isinstance(source, dict) else read_stream_file(_readable(source))
    problems = check_stream(emodel, saved)
    if problems:
        raise StreamFileError(
            "the stream checkpoint does not fit this eventful model: "
            + "; ".join(problems[:6])
            + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
            + ". Nothing was loaded: build the model the way the saved one was built (same model, "
            "transform options, policies, scene-cut detection and frame size)"
        )
    _apply(emodel, saved)


def _readable(source):
    return source if isinstance(source, (io.IOBase, str, Path)) or hasattr(source, "read") else str(source)


def _device(emodel) -> torch.device:
    for buffer in emodel.graph_module.buffers():
        return buffer.device
    return torch.device("cpu")


def _apply(emodel, saved: dict) -> None:
    """Copy a checked stream in. Nothing here can fail on a checked stream."""
    modules = stream_modules(emodel.graph_module)
    device = _device(emodel)
    for key, value in saved["tensors"].items():
        path, name = key.rsplit(".", 1)
        module = modules[path]
        current = module._buffers[name]
        if value is None:  # not allocated in the saved stream (a cache not yet filled)
            module._buffers[name] = None
        elif current is None:
            module._buffers[name] = value.to(device, copy=True)
        else:
            current.copy_(value)
    for path, kept in saved["flags"].items():
        module = modules[path]
        for key, value in kept.items():
            setattr(module, key, tuple(value) if STREAM_FLAGS[key] is list else value)
        module.__dict__.pop("_scratch_tensor", None)
        if isinstance(module.__dict__.get("checksum"), torch.Tensor):
            module.checksum = None
    _, stateful = _gate_policies(emodel)
    for entry, (_, policy) in zip(saved["policies"], stateful, strict=True):
        policy.load_state_dict(entry["state"], device)
    for path, detector in _live_detectors(emodel).items():
        state = saved["detectors"][path]["state"] if detector is not None else None
        if detector is None:
            continue
        if state is None:
            detector.reset()
        else:
            for name in _DETECTOR_STATE:
                setattr(detector, name, state[name].to(device, copy=True))
    for name, value in saved["counters"].items():
        setattr(emodel, name, value)
    emodel._inference_state = torch.is_inference_mode_enabled()
