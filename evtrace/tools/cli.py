"""evtrace's command line: ``evtrace SUBCOMMAND ...`` (or ``python -m evtrace.tools.cli ...``).

Subcommands live in a registry. Adding one takes a few lines:

    def _bench_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--frames", type=int, default=8, help="...")

    @subcommand("bench", "time dense vs eventful inference", _bench_args)
    def _bench(args: argparse.Namespace) -> int:
        if args.frames <= 0:
            raise UsageError("--frames", f"must be positive, got {args.frames}")
        ...
        return 0

A ``UsageError(argument, message)`` raised by a subcommand (or by argparse itself) is reported as
one line on stderr, ``evtrace NAME: error: ARGUMENT: MESSAGE``, with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evtrace.graph.plan import ATTENTION_MODES

PROG = "evtrace"


class UsageError(Exception):
    """Bad command-line input: reported as ``PROG NAME: error: ARGUMENT: MESSAGE``, exit 2."""

    def __init__(self, argument: str | None, message: str, *, hint: bool = False):
        super().__init__(f"{argument}: {message}" if argument else message)
        self.argument = argument
        self.message = message
        self.hint = hint  # add "(see PROG NAME --help)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (one line, no usage dump, no exit)."""

    def error(self, message: str):
        m = re.match(r"argument (\S+?): (.*)", message, re.S)
        if m:  # "argument --frames: invalid ..." -> UsageError("--frames", "invalid ...")
            raise UsageError(m.group(1), m.group(2), hint=True)
        raise UsageError(None, message, hint=True)


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: name -> Subcommand, in registration order (the order ``--help`` lists them).
SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> exit code`` as subcommand ``name``; ``configure(parser)`` adds its
    arguments."""

    def register(fn: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = Subcommand(name, help, configure, fn)
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Eventful (delta-updated) vision Transformers for video.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    for cmd in SUBCOMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_subcommand=cmd)
    return parser


def _quiet_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    Measured here, DINOv2-S/14 at 224 on 2 threads, median per frame: on 2 cores shared with
    other busy processes, 0.45 to 3.6 s with spinning threads and 0.13 to 0.18 s with passive
    ones; on idle cores, 91 ms either way.
    Only effective before torch is first imported (so: for the command line, not in a process
    that already imported torch)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input)."""
    _quiet_openmp()
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = PROG
    if argv and argv[0] in SUBCOMMANDS:
        prog = f"{PROG} {argv[0]}"
    try:
        parser = build_parser()  # imports the subcommands' modules: a missing optional package shows here
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, or argparse giving up on its own
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        cmd: Subcommand | None = getattr(args, "_subcommand", None)
        if cmd is None:
            parser.print_help(sys.stderr)
            return 2
        return int(cmd.run(args) or 0)
    except UsageError as e:
        hint = f" (see {prog} --help)" if e.hint else ""
        print(f"{prog}: error: {e}{hint}", file=sys.stderr)
        return 2
    except (ImportError, FileNotFoundError) as e:
        missing = _missing_package(e)
        if missing is None:
            raise
        print(f"{prog}: error: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (``| head``): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not raise again
        return 0


# ---------------------------------------------------------------------------------- helpers

#: The optional packages of the commands and the extra that installs each (pyproject.toml).
_EXTRA_OF = {"av": "video", "matplotlib": "demo", "tqdm": "demo", "onnx": "demo", "onnxruntime": "onnx"}


def _missing_package(error: BaseException) -> str | None:
    """One line for a missing optional or data package (None: another error, left to raise)."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        top = error.name.split(".")[0]
        if top in _EXTRA_OF:
            extra = _EXTRA_OF[top]
            return f"this command needs the '{top}' package, not installed: pip install 'evtrace[{extra}]'"
    message = str(error)
    if "pip install" in message and ("not installed" in message or "needs" in message):
        return message.splitlines()[0] if message else None
    return None


#: Largest --size in pixels: inspect only traces (its token-flow analysis grows about as N^1.5:
#: 9 s and 0.7 GB at 1792 px), demo and fidelity run DINOv2-S/14 densely (dense attention at
#: 1024 px, N = 5,330 tokens: 0.7 GB per layer's logits; 14,000 px would need 270 TB).
MAX_SIZE = {"inspect": 2048, "demo": 1024, "fidelity": 1024}


def check_size(command: str, size: int | None) -> None:
    """--size at most MAX_SIZE[command] pixels, else a one-line UsageError."""
    limit = MAX_SIZE[command]
    if size is not None and size > limit:
        raise UsageError(
            "--size",
            f"must be at most {limit} px for {command} (the tokens, and attention's memory, grow with "
            f"the square and the fourth power of the size), got {size}",
        )


def positive_int(text: str) -> int:
    """argparse ``type=`` for integers >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_clip(argument: str, clip: str) -> Path:
    """A clip name or video file that PyAV can read, else UsageError naming ``argument``."""
    from evtrace.tools.video import probe

    try:
        return probe(clip).path
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(argument, str(e)) from None


def check_out_dir(argument: str, out: str) -> Path:
    """Create ``out`` (with parents) and check that a file can be written in it."""
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".evtrace-write-test-"):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(argument, f"cannot write output folder {out!r}: {reason}") from None
    return path


# ---------------------------------------------------------------------------------- demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    from evtrace.tools import demo

    p.add_argument(
        "--clip",
        default=demo.DEFAULT_CLIP,
        metavar="NAME|PATH",
        help=f"a clip name (bigbuckbunny, carphone, bikes) or a video file (default: {demo.DEFAULT_CLIP})",
    )
    p.add_argument(
        "--frames",
        type=positive_int,
        default=demo.DEFAULT_FRAMES,
        metavar="N",
        help=f"number of frames from the start of the clip (default: {demo.DEFAULT_FRAMES})",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=None,
        metavar="S",
        help=f"square model input size, a multiple of {demo.PATCH_SIZE} "
        f"(default: the model's native size, 224)",
    )
    policy = p.add_mutually_exclusive_group()
    policy.add_argument(
        "--budget",
        type=int,
        default=None,
        metavar="R",
        help="tokens recomputed per gate per frame, TopK(R), 1..N where N = (S/14)^2 + 1 "
        "(default: N/4, 64 at 224 px)",
    )
    policy.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="TAU",
        help="instead of a budget: recompute every token whose accumulated error norm exceeds "
        "TAU times its norm (relative Threshold, e.g. 0.1)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION_MODES,
        default=demo.DEFAULT_ATTENTION,
        help=f"attention update: exact delta attention, the paper's approximation, or dense "
        f"(default: {demo.DEFAULT_ATTENTION})",
    )
    p.add_argument(
        "--out",
        default=demo.DEFAULT_OUT,
        metavar="DIR",
        help=f"output folder for the PNGs (default: {demo.DEFAULT_OUT})",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=demo.DEFAULT_THREADS,
        metavar="T",
        help=f"torch intra-op threads (default: {demo.DEFAULT_THREADS})",
    )
    p.add_argument("--no-sweep", action="store_true", help="skip the short TopK sweep behind fidelity.png")


def check_policy(args: argparse.Namespace, size: int | None) -> None:
    """--budget within [1, N] for the input size; --threshold finite and >= 0."""
    from evtrace.tools.demo import token_count

    n = token_count(size)
    if args.budget is not None and not 1 <= args.budget <= n:
        raise UsageError(
            "--budget",
            f"must be in [1, {n}] (N = {n} tokens per gate at {size or 224} px), got {args.budget}",
        )
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise UsageError("--threshold", f"must be a finite number >= 0, got {args.threshold}")


@subcommand(
    "demo",
    "eventful DINOv2-S/14 saliency (real weights, real clip) against the dense model: report, FLOPs, "
    "speed, fidelity and pictures",
    _demo_args,
)
def _demo(args: argparse.Namespace) -> int:
    from evtrace.tools import demo

    check_size("demo", args.size)
    if args.size is not None and args.size % demo.PATCH_SIZE:
        raise UsageError("--size", f"must be a multiple of the patch size {demo.PATCH_SIZE}, got {args.size}")
    check_policy(args, args.size)
    clip = check_clip("--clip", args.clip)
    out = check_out_dir("--out", args.out)
    demo.run_demo(
        clip=clip,
        frames=args.frames,
        size=args.size,
        out=out,
        threads=args.threads,
        budget=args.budget,
        threshold=args.threshold,
        attention=args.attention,
        sweep=not args.no_sweep,
    )
    return 0


# ---------------------------------------------------------------------------------- inspect


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "factory",
        metavar="MODULE:FACTORY",
        help="an importable callable that returns the model, e.g. models_zoo:deit_tiny "
        "(the current folder is importable)",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=None,
        metavar="S",
        help="square image size: the example input is (1, 3, S, S) and, when the factory takes "
        "img_size, it is built for S (default: the model's img_size, else 224)",
    )
    p.add_argument(
        "--input-shape",
        default=None,
        metavar="B,C,...",
        help="the example input's full shape instead, e.g. 1,3,4,224,224 for a video model",
    )
    p.add_argument(
        "--frontend",
        choices=("auto", "fx", "export"),
        default="auto",
        help="tracer front end (default: auto)",
    )
    p.add_argument(
        "--budget",
        type=positive_int,
        default=None,
        metavar="R",
        help="show FLOPs and state of the eventful model at TopK(R) tokens per gate, and the savings",
    )


def load_factory(argument: str, spec: str) -> Callable:
    """``module:attr`` -> the callable, else UsageError naming ``argument``."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(argument, f"expected MODULE:FACTORY (e.g. models_zoo:deit_tiny), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # last, not first: the user's module is found here when nothing installed has its name,
        # and a local file never shadows an installed package (a ./sympy.py is not executed)
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's input
        raise UsageError(argument, f"cannot import module {module_name!r}: {type(e).__name__}: {e}") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(argument, f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(argument, f"{spec!r} is not callable")
    return target


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(
            "--input-shape", f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if not shape or min(shape) <= 0:
        raise UsageError("--input-shape", f"expected comma-separated positive integers, got {text!r}")
    return shape


@subcommand(
    "inspect", "trace a model built by MODULE:FACTORY and print what evtrace would rewrite", _inspect_args
)
def _inspect(args: argparse.Namespace) -> int:
    import inspect as pyinspect

    check_size("inspect", args.size)
    factory = load_factory("MODULE:FACTORY", args.factory)
    shape = _input_shape(args.input_shape) if args.input_shape else None
    if shape is not None and len(shape) >= 3 and max(shape[-2:]) > MAX_SIZE["inspect"]:
        raise UsageError(
            "--input-shape",
            f"height and width must be at most {MAX_SIZE['inspect']} px, got {args.input_shape}",
        )
    kwargs = {}
    if args.size is not None:
        try:
            takes_size = "img_size" in pyinspect.signature(factory).parameters
        except (TypeError, ValueError):
            takes_size = False
        if takes_size:
            kwargs["img_size"] = args.size
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise UsageError(
            "MODULE:FACTORY",
            f"calling {args.factory}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) "
            f"failed: {type(e).__name__}: {e}",
        ) from None
    import torch
    from torch import nn

    if not isinstance(model, nn.Module):
        raise UsageError(
            "MODULE:FACTORY", f"{args.factory} returned a {type(model).__name__}, not an nn.Module"
        )
    model.eval()
    if shape is None:
        size = args.size or getattr(model, "img_size", None) or 224
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = (1, 3, int(h), int(w))
    from evtrace.api import inspect as ev_inspect
    from evtrace.graph.errors import BudgetError, EvtraceError

    try:
        report = ev_inspect(model, torch.randn(shape), frontend=args.frontend, policy=args.budget)
    except BudgetError as e:
        raise UsageError("--budget", str(e).strip().splitlines()[0]) from None
    except ValueError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError("MODULE:FACTORY", f"cannot trace {args.factory} on input {shape}: {first}") from None
    except (EvtraceError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError("MODULE:FACTORY", f"cannot trace {args.factory} on input {shape}: {first}") from None
    print(report)
    return 0


# ---------------------------------------------------------------------------------- fidelity


def _fidelity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--clip",
        default="bigbuckbunny",
        metavar="NAME|PATH",
        help="a clip name or a video file (default: bigbuckbunny)",
    )
    p.add_argument(
        "--frames",
        type=positive_int,
        default=32,
        metavar="N",
        help="frames from the start of the clip (default: 32)",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=224,
        metavar="S",
        help="square input size, a multiple of 14 (default: 224)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION_MODES,
        action="append",
        default=None,
        help="attention mode to sweep; repeat for several (default: all three)",
    )
    p.add_argument(
        "--no-second-view",
        action="store_true",
        help="skip ViT-B/16 and ViTDet-B with random weights (feature cosine only)",
    )
    p.add_argument(
        "--suite",
        choices=("clip", "hard"),
        default="clip",
        help="clip: the sweeps on --clip (default); hard: every stream of the hard-video harness (cuts, "
        "fast motion, pan, fade, static; --frames per stream, exact attention), per stream mean and "
        "worst frame, tokens per gate, GFLOPs, refreshes (fidelity_hard.md/.png/.json)",
    )
    p.add_argument(
        "--out",
        default="out/fidelity",
        metavar="DIR",
        help="output folder for fidelity.md, fidelity.png, fidelity.json (default: out/fidelity)",
    )
    p.add_argument(
        "--threads", type=positive_int, default=2, metavar="T", help="torch intra-op threads (default: 2)"
    )


@subcommand(
    "fidelity",
    "FLOPs against fidelity to the dense model: TopK and Threshold sweeps x attention modes, DINOv2-S/14 "
    "saliency on a real clip (table + plot)",
    _fidelity_args,
)
def _fidelity(args: argparse.Namespace) -> int:
    check_size("fidelity", args.size)
    if args.size % 14:
        raise UsageError("--size", f"must be a multiple of the patch size 14, got {args.size}")
    clip = check_clip("--clip", args.clip)
    out = check_out_dir("--out", args.out)
    import torch

    from evtrace.tools import fidelity

    torch.set_num_threads(args.threads)
    if args.suite == "hard":
        fidelity.run_hard(out, frames=args.frames, size=args.size, attention=(args.attention or ["exact"])[0])
        return 0
    fidelity.run(
        out,
        clip=str(clip) if args.clip not in _clip_names() else args.clip,
        frames=args.frames,
        size=args.size,
        attentions=tuple(args.attention or ATTENTION_MODES),
        second_view=not args.no_second_view,
    )
    return 0


def _clip_names() -> tuple[str, ...]:
    from evtrace.tools.video import CLIPS

    return tuple(CLIPS)


# ---------------------------------------------------------------------------------- bench


def _bench_args(p: argparse.ArgumentParser) -> None:
    from evtrace.tools import bench

    def names(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    p.add_argument(
        "--models",
        type=names,
        default=None,
        metavar="A,B",
        help=f"models, comma-separated, from {', '.join(bench.MODELS)} "
        f"(default: {','.join(bench.DEFAULT_MODELS)}; --quick: {','.join(bench.QUICK_MODELS)})",
    )
    p.add_argument(
        "--modes",
        type=names,
        default=None,
        metavar="A,B",
        help=f"attention modes from {', '.join(bench.MODES)} (default: all)",
    )
    p.add_argument(
        "--r",
        type=names,
        default=None,
        metavar="R,R",
        help="token budgets: counts (256), N/k (N/4) or fractions of N (0.25) "
        "(default: N/8,N/4,N/2; ViTDet: 256,512,1024 as in the paper)",
    )
    p.add_argument(
        "--policies",
        type=names,
        default=None,
        metavar="A,B",
        help="eager policies: topk, fct (FixedCapacityThreshold, capacity r) (default: topk)",
    )
    p.add_argument(
        "--compile-policies",
        type=names,
        default=None,
        metavar="A,B",
        help="policies under torch.compile (default: topk,fct; --quick: topk)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile(fullgraph=True) of both models (default: on; --quick: off)",
    )
    p.add_argument(
        "--freeze",
        action="store_true",
        help="compile with inductor freezing (weights become constants, packed for oneDNN) on both "
        "sides: faster, but weight changes after compiling are not seen",
    )
    p.add_argument(
        "--compile-models",
        type=names,
        default=None,
        metavar="A,B",
        help="models timed under torch.compile (default: all but ViTDet, whose compiles take minutes)",
    )
    p.add_argument(
        "--frames",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"steady-state frames after the first (default: {bench.DEFAULT_FRAMES}; --quick: 4)",
    )
    p.add_argument(
        "--clip",
        default=bench.DEFAULT_CLIP,
        metavar="NAME|PATH",
        help=f"clip name or video file (default: {bench.DEFAULT_CLIP})",
    )
    p.add_argument(
        "--tau",
        type=float,
        default=bench.DEFAULT_TAU,
        help=f"FixedCapacityThreshold's relative threshold (default: {bench.DEFAULT_TAU})",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=bench.DEFAULT_THREADS,
        metavar="T",
        help=f"torch intra-op threads (default: {bench.DEFAULT_THREADS})",
    )
    p.add_argument(
        "--out",
        default=bench.DEFAULT_OUT,
        metavar="DIR",
        help=f"output folder: bench.md, bench.json, bench.png (default: {bench.DEFAULT_OUT})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small run (DeiT-Ti, r=N/4, 4 frames, eager TopK) in under 2 minutes",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile one eager configuration instead (the first model, r and mode given; "
        "default vit_b16, N/4, exact): top ops and the share of time outside ATen",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


@subcommand(
    "bench", "time the original against the eventful model on a real clip (table + plot)", _bench_args
)
def _bench(args: argparse.Namespace) -> int:
    import math

    from evtrace.tools import bench

    for arg, values, known in (
        ("--models", args.models, bench.MODELS),
        ("--compile-models", args.compile_models, bench.MODELS),
        ("--modes", args.modes, bench.MODES),
        ("--policies", args.policies, bench.POLICIES),
        ("--compile-policies", args.compile_policies, bench.POLICIES),
    ):
        for value in values or ():
            if value not in known:
                raise UsageError(arg, f"unknown value {value!r}; choose from {', '.join(known)}")
        if values is not None and not values and arg in ("--models", "--modes"):
            raise UsageError(arg, "must name at least one")
    for value in args.r or ():
        try:
            bench.parse_r(value)
        except ValueError as e:
            raise UsageError("--r", str(e)) from None
    if not math.isfinite(args.tau) or args.tau < 0:
        raise UsageError("--tau", f"must be a finite number >= 0, got {args.tau}")
    check_clip("--clip", args.clip)
    clip = args.clip
    out = check_out_dir("--out", args.out)
    if args.profile:
        model = (args.models or ["vit_b16"])[0]
        r = (args.r or ["N/4"])[0]
        try:
            bench.resolve_r(r, bench.MODELS[model].tokens)
        except ValueError as e:
            raise UsageError("--r", f"{e} for {model}") from None
        result = bench.run_profile(
            model,
            r=r,
            mode=(args.modes or ["exact"])[0],
            policy=(args.policies or ["topk"])[0],
            frames=args.frames or 8,
            clip=clip,
            tau=args.tau,
            threads=args.threads,
            out=out,
        )
        print(result.table)
        print(result.summary())
        print(f"wrote {out / 'profile.txt'}")
        return 0
    fields = dict(
        models=args.models,
        modes=args.modes,
        r=args.r,
        eager_policies=args.policies,
        compile_policies=args.compile_policies,
        compile_models=args.compile_models,
        frames=args.frames,
    )
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if v is not None}
    common = dict(
        compile=args.compile if args.compile is not None else not args.quick,
        freeze=args.freeze,
        clip=clip,
        tau=args.tau,
        threads=args.threads,
        out=out,
        progress=args.progress,
    )
    config = bench.quick_config(**fields, **common) if args.quick else bench.BenchConfig(**fields, **common)
    for model in config.models:
        for r in config.r_values(model):
            try:
                bench.resolve_r(r, bench.MODELS[model].tokens)
            except ValueError as e:
                raise UsageError("--r", f"{e} for {model}") from None
    try:
        config.check()
    except ValueError as e:
        raise UsageError(None, str(e)) from None
    result = bench.run_bench(config)
    print(result.table)
    print("wrote " + ", ".join(str(f) for f in result.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
