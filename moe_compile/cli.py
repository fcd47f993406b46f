"""`moe-compile`: the command line over `moe_compile.inspect` and `moe_compile.optimize`.

    moe-compile inspect MODEL                       # every MoE block and what it computes
    moe-compile optimize MODEL --dry-run            # the plan: blocks, features, passes, memory; writes nothing
    moe-compile optimize MODEL --output DIR         # optimize, then write the optimized checkpoint (with a report)
    moe-compile export MODEL OUT [--format onnx]    # the same: optimize, then export to OUT
    moe-compile load DIR                            # restore a checkpoint written by export; print what it holds
    moe-compile bench --quality                     # perplexity: bf16 vs FP8 vs 2:4 vs FP8+2:4 (emulated)
    moe-compile list-models | profiles

Exit codes: 0 ok, 1 a handled error (one line on stderr naming the problem and the remedy), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import moe_compile as mc
from moe_compile import cli_parallel
from moe_compile.checkpoint import FORMATS, MANIFEST_NAME, export_for_cli
from moe_compile.errors import MoECompileError
from moe_compile.loading import DTYPES, MODEL_HELP, LoadedModel, load_model, parse_dtype
from moe_compile.plan import Plan, build_plan, feature_rows, features_table, human_bytes, memory_lines
from moe_compile.profiles import BACKENDS, FEATURES, builtin_profiles, load_profile

REPORT_NAME = "moe_compile_report.json"
EXPORT_DOC = "docs/export.md"


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"invalid device {text!r} (use cpu, cuda or cuda:N)") from exc


class _Toggle(argparse.Action):
    """`--enable-X` stores True, `--disable-X` False; unset stays None (the profile decides)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=None, **kwargs)

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: str = "") -> None:
        setattr(namespace, self.dest, option_string.startswith("--enable-"))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype to load and run in (auto: the checkpoint's; float32 for tiny models)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model directory's own Python code (transformers trust_remote_code)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights (config.json, tiny models)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage; tracebacks on errors")


def _optimize_options(parser: argparse.ArgumentParser, output_option: bool = True) -> None:
    parser.add_argument("--profile", default="balanced",
                        help=f"built-in profile ({', '.join(builtin_profiles())}) or a path to a .yaml profile")
    parser.add_argument("--backend", choices=BACKENDS, help="fused_moe kernel backend (default: the profile's)")
    parser.add_argument("--device", type=_device, default="auto",
                        help="target device: cpu, cuda, cuda:N (default: cuda when present, else cpu)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (blocks, features, passes, memory estimate) and write nothing")
    if output_option:
        parser.add_argument("--output", type=Path, metavar="DIR",
                            help=f"write the optimized checkpoint (and {REPORT_NAME}) to the new directory DIR; "
                                 f"see {EXPORT_DOC}")
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="checkpoint format: safetensors (restored by `moe-compile load` / mc.load) or onnx "
                             "(model.onnx, input_ids -> logits, needs moe-compile[onnx]); default safetensors")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    quality = parser.add_argument_group("quality gate", "how fp8 / sparsity-24 are measured and calibrated")
    quality.add_argument("--calibration-text", type=Path, metavar="FILE",
                         help="text the quality gate measures fp8 / sparsity-24 on (SparseGPT calibrates on it too); "
                              "tokenized with MODEL's tokenizer, or read as bytes for byte-level models")
    quality.add_argument("--sparsity-method", choices=["auto", "sparsegpt", "magnitude"], default="auto",
                         help="how 2:4 picks the kept weights (auto: SparseGPT where there is calibration text)")
    quality.add_argument("--fp8-calibration", choices=["auto", "modelopt", "modelopt-mse", "max"], default="auto",
                         help="FP8 weight scales: NVIDIA ModelOpt (auto: when installed) or the built-in max")
    quality.add_argument("--fp8-attention", action=argparse.BooleanOptionalAction, default=False,
                         help="with fp8, also quantize the attention linears (torch._scaled_mm; off by default: "
                              "slower at decode sizes on an H100)")
    quality.add_argument("--sparse-linears", action=argparse.BooleanOptionalAction, default=False,
                         help="with 2:4, also prune the dense linears (attention, dense MLPs) through NVIDIA ModelOpt "
                              "(stored dense with zeros: no speedup here; for sparse deployments, e.g. TensorRT)")
    parallel = parser.add_argument_group("expert parallelism", "shard the experts over several GPUs (torchrun)")
    parallel.add_argument("--gpus", type=int, default=1, metavar="N",
                          help="run N processes, one per GPU, each holding 1/N of the experts (default 1; more than "
                               "the machine has is lowered with a warning; with --device cpu: N gloo processes)")
    parallel.add_argument("--placement", choices=["contiguous", "balanced"], default="contiguous",
                          help="experts to ranks: contiguous ids, or balanced by the routing measured on "
                               "--calibration-tokens random token ids (default contiguous)")
    parallel.add_argument("--calibration-tokens", type=int, default=512, metavar="T",
                          help="token ids per rank to measure routing on for --placement balanced (default 512)")
    group = parser.add_argument_group("features", "force a feature on or off (default: the profile's setting)")
    for name, (what, _, _) in FEATURES.items():
        group.add_argument(f"--enable-{_flag(name)}", f"--disable-{_flag(name)}", dest=f"feature_{name}",
                           action=_Toggle, help=what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-compile", description="A compiler for Mixture-of-Experts models.",
                                     epilog=f"Checkpoints: see {EXPORT_DOC}.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser("inspect", help="list the MoE blocks of MODEL and what each computes")
    _model_options(inspect)
    inspect.add_argument("--no-prove", action="store_true", help="structural detection only (no probe forward)")
    inspect.set_defaults(func=cmd_inspect)
    optimize = commands.add_parser("optimize", help="fuse and compile MoE blocks (or --dry-run for the plan)",
                                   description="Optimize MODEL in memory. With --output DIR, write the optimized "
                                   f"checkpoint (with {REPORT_NAME}) to DIR atomically; see {EXPORT_DOC}.")
    _model_options(optimize)
    _optimize_options(optimize)
    optimize.set_defaults(func=cmd_optimize, output_label="--output")
    export = commands.add_parser("export", help="optimize MODEL, then write the optimized checkpoint to OUT",
                                 description="The same as `optimize MODEL --output OUT`: optimize, then write the "
                                 f"checkpoint (safetensors or onnx, with {REPORT_NAME}) atomically; see {EXPORT_DOC}.")
    _model_options(export)
    export.add_argument("output", type=Path, metavar="OUT", help="the new checkpoint directory")
    _optimize_options(export, output_option=False)
    export.set_defaults(func=cmd_optimize, output_label="OUT")
    load = commands.add_parser("load", help="restore a checkpoint written by export and print what was applied",
                               description="Restore DIR with moe_compile.load (manifest, SHA-256 of every file, "
                               "strict weight keys) and print its fused blocks, features and passes.")
    load.add_argument("directory", type=Path, metavar="DIR", help="a checkpoint directory written by export")
    load.add_argument("--device", type=_device, default="cpu", help="device to load onto (default cpu)")
    load.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                      help="cast after loading (auto: the saved dtypes)")
    load.add_argument("--trust-remote-code", action="store_true",
                      help="allow the config's own Python code (transformers trust_remote_code)")
    load.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    load.set_defaults(func=cmd_load)
    bench = commands.add_parser("bench", help="--speed MODEL: decode speed before / after optimize; --quality: "
                                "perplexity of bf16 / FP8 / 2:4",
                                description="--speed MODEL: greedy generate of MODEL (a built-in tiny model, a "
                                "local checkpoint or config.json) timed per decode step at each batch, before and "
                                "after optimize with --profile, the tokens compared. --quality: perplexity of the "
                                "shipped quality model (a byte-level Qwen3-MoE trained on the Python stdlib) on its "
                                "held-out text, with expert weights in bf16, FP8, 2:4 and FP8+2:4 (emulated here: "
                                "quality, not speed).")
    bench.add_argument("--speed", metavar="MODEL", help="time generate on MODEL before and after optimize")
    bench.add_argument("--quality", action="store_true", help="the perplexity table of the quality model")
    speed = bench.add_argument_group("--speed")
    speed.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    speed.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (default 64)")
    speed.add_argument("--steps", type=int, default=16, help="timed decode steps (default 16)")
    speed.add_argument("--profile", default="balanced", help="the profile to optimize with (default balanced)")
    speed.add_argument("--device", type=_device, default="auto", help="cpu, cuda or cuda:N (default: cuda if any)")
    speed.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="dtype to load and run in (auto: the checkpoint's; float32 for tiny models)")
    speed.add_argument("--trust-remote-code", action="store_true",
                       help="allow a model directory's own Python code (transformers trust_remote_code)")
    speed.add_argument("--seed", type=int, default=0, help="seed for random weights and prompts")
    bench.add_argument("--max-bytes", type=int, default=16384, help="--quality: held-out bytes (default 16384)")
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON to FILE")
    bench.set_defaults(func=cmd_bench)
    commands.add_parser("list-models", help="the built-in tiny models").set_defaults(func=cmd_list_models)
    commands.add_parser("profiles", help="built-in profiles and features").set_defaults(func=cmd_profiles)
    return parser


def _console() -> Console:
    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal else max(probe.width, 140))


def _quiet_transformers() -> None:
    """transformers' own warnings and progress bars, unless --verbose: our output says what matters."""
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _load(args: argparse.Namespace, console: Console, allow_meta: bool = False) -> LoadedModel:
    if (Path(args.model) / MANIFEST_NAME).is_file():
        raise MoECompileError(f"{args.model} is a moe_compile checkpoint (written by export), not a model to "
                              f"{args.command}; restore it with `moe-compile load {args.model}`")
    with console.status(f"loading {args.model}", spinner="dots") if console.is_terminal else nullcontext():
        loaded = load_model(args.model, args.dtype, args.trust_remote_code, args.seed, allow_meta=allow_meta)
    for note in loaded.notes:
        console.print(f"[bold]note:[/bold] {escape(note)}")
    return loaded


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    loaded = _load(args, console, allow_meta=True)
    console.print(mc.inspect(loaded.model, prove_blocks=loaded.materialized and not args.no_prove).table())
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {name: getattr(args, f"feature_{name}") for name in FEATURES
                 if getattr(args, f"feature_{name}") is not None}
    if args.backend:
        overrides["backend"] = args.backend
    return overrides


def cmd_optimize(args: argparse.Namespace, console: Console) -> int:
    overrides = _overrides(args)
    profile = load_profile(args.profile).with_overrides(overrides)
    feature_rows(profile, args.device)  # a feature forced on that the device lacks fails here, before any loading
    if args.output is not None and not args.dry_run:
        _check_output(args.output, args.force, Path(args.model), args.output_label)
    if not args.dry_run and args.device.type == "cuda" and not torch.cuda.is_available():
        raise MoECompileError("--device cuda, but CUDA is not available here; use --device cpu, or --dry-run for a "
                              "plan against an H100")
    if args.gpus != 1 and not cli_parallel.is_worker():
        processes = cli_parallel.gpus_to_use(args.gpus, args.device)  # checks the number, lowers it to what exists
        if processes > 1 and not args.dry_run:
            return cli_parallel.launch(args.argv, processes)
    worker = cli_parallel.is_worker()
    if worker:
        args.device = cli_parallel.worker_device(args.device)
        if cli_parallel.rank() != 0:  # one rank speaks for the job
            console = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (lives as long as the process)
            os.environ["MOE_COMPILE_QUIET"] = "1"
    loaded = _load(args, console, allow_meta=args.dry_run)
    plan = build_plan(loaded.model, profile, args.device, parse_dtype(args.dtype))
    if args.dry_run:
        report = mc.inspect(loaded.model, prove_blocks=loaded.materialized)
        console.print(report.table())
        _print_plan(console, plan)
        written = f" ({args.output_label} {args.output} was not written)" if args.output else ""
        console.print(f"[bold]dry run:[/bold] nothing was changed or written{escape(written)}")
        return 0
    model = loaded.model.to(args.device)
    overrides.update(sparsity_method=args.sparsity_method, fp8_calibration=args.fp8_calibration,
                     fp8_attention=args.fp8_attention, sparse_linears=args.sparse_linears)
    if args.calibration_text is not None:
        from moe_compile.calibration_text import calibration_ids

        overrides["calibration_text"] = calibration_ids(args.calibration_text, model, loaded.path,
                                                        args.trust_remote_code)
    if worker:
        overrides["expert_parallel"] = cli_parallel.expert_parallel_config(
            int(os.environ["WORLD_SIZE"]), args.placement, model, args.calibration_tokens, args.seed)
    mc.optimize(model, args.profile, **overrides)
    result = model.moe_compile
    console.print(result.table())
    if worker:
        from moe_compile.parallel import placement_report

        console.print(placement_report(model).table())
    _print_plan(console, plan)
    console.print(f"fused {len(result.fused)} of {len(result.fused) + len(result.skipped)} MoE blocks; max relative "
                  f"error vs the original {result.max_error:.1e}; passes: {', '.join(result.passes)}")
    if args.output is not None:
        report = {"moe_compile_version": mc.__version__, "model": {"source": loaded.source, "kind": loaded.kind,
                  "notes": loaded.notes}, "result": result.to_dict(), "plan": plan.to_dict()}
        with console.status(f"exporting to {args.output}", spinner="dots") if console.is_terminal else nullcontext():
            target = export_for_cli(model, args.output, format=args.format, force=args.force, report=report,
                                    report_name=REPORT_NAME)
        files = ", ".join(sorted(p.name for p in target.iterdir()))
        then = f"restore it with `moe-compile load {target}` or mc.load" if args.format == "safetensors" else \
            "run model.onnx with onnxruntime"
        console.print(escape(f"wrote the optimized checkpoint ({args.format}) to {target}: {files}; {then}"))
    return 0


def cmd_load(args: argparse.Namespace, console: Console) -> int:
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise MoECompileError("--device cuda, but CUDA is not available here; use --device cpu")
    directory = args.directory
    with console.status(f"loading {directory}", spinner="dots") if console.is_terminal else nullcontext():
        model = mc.load(directory, device=args.device, dtype=parse_dtype(args.dtype),
                        trust_remote_code=args.trust_remote_code)
    result = model.moe_compile
    console.print(result.table())
    console.print(escape(f"loaded {type(model).__name__} from {directory} on {args.device}: {len(result.fused)} fused "
                         f"MoE blocks; every file matched its SHA-256 in {MANIFEST_NAME}; passes: "
                         f"{', '.join(result.passes)}"))
    return 0


def _print_plan(console: Console, plan: Plan) -> None:
    console.print(features_table(plan.features, f"features: profile {plan.profile!r} on {plan.device}, "
                                                f"backend {plan.backend}"))
    console.print(f"[bold]passes:[/bold] {' -> '.join(plan.passes)}")
    console.print("[bold]memory estimate:[/bold]\n  " + escape("\n  ".join(memory_lines(plan.memory))))


def _check_output(output: Path, force: bool, model_path: Path, label: str = "--output") -> None:
    """Refuse, before loading anything, an output that overlaps the model or exists (without --force)."""
    target = output.resolve()
    if model_path.exists():
        source = model_path.resolve()
        if target == source or target in source.parents or (source.is_dir() and source in target.parents):
            raise MoECompileError(f"{label} {output} overlaps the model at {model_path}; choose another directory")
    if output.exists() and not force:
        raise MoECompileError(f"{label} {output} already exists; pass --force to replace it or choose another")
    if output.exists() and not output.is_dir():
        raise MoECompileError(f"{label} {output} exists and is not a directory; remove it or choose another")


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    if bool(args.quality) == bool(args.speed):
        raise MoECompileError("bench: choose one benchmark: --speed MODEL or --quality (kernel benchmarks live in "
                              "benchmarks/)")
    rows = _bench_speed(args, console) if args.speed else _bench_quality(args, console)
    if args.json is not None:
        args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    return 0


def _bench_quality(args: argparse.Namespace, console: Console) -> list:
    from moe_compile.quality.bench import quality_table

    rows = quality_table(max_bytes=args.max_bytes)
    table = Table(title=f"quality model: held-out perplexity ({args.max_bytes} bytes of stdlib text)")
    for column in ("experts", "perplexity", "vs bf16", "bits/byte", "expert weights", "eval s"):
        table.add_column(column, justify="left" if column == "experts" else "right")
    for row in rows:
        table.add_row(row.variant, f"{row.perplexity:.4f}", f"{row.increase:+.2%}", f"{row.bits_per_byte:.4f}",
                      human_bytes(row.expert_bytes), f"{row.seconds:.1f}")
    console.print(table)
    console.print("FP8 and 2:4 run emulated (dequantize / decompress, then a bf16 matmul): these are quality numbers, "
                  "not speedups.")
    return rows


def _bench_speed(args: argparse.Namespace, console: Console) -> list:
    from moe_compile.speed import speed_table

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError as exc:
        raise MoECompileError(f"--batches {args.batches!r}: expected comma-separated integers, e.g. 1,8") from exc
    if min(batches) < 1 or args.prompt < 1 or args.steps < 2:
        raise MoECompileError("bench --speed needs batches and --prompt of at least 1 and --steps of at least 2")
    args.model = args.speed
    model = _load(args, console).model.to(args.device)
    with console.status("timing generate before and after optimize", spinner="dots") if console.is_terminal \
            else nullcontext():
        rows, result = speed_table(model.eval(), batches, args.prompt, args.steps, args.profile, seed=args.seed)
    table = Table(title=f"{args.speed}: greedy generate, prompt {args.prompt}, {args.steps} timed steps, "
                        f"{args.device}")
    for column in ("batch", "model", "decode step", "vs floor", "tokens/s", "speedup", "prefill", "first call",
                   "peak memory", "same tokens"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        floor = "" if r.floor_ms is None else f"{r.decode_step_ms / r.floor_ms:.2f}x of {r.floor_ms:.2f} ms"
        table.add_row(str(r.batch), r.model, f"{r.decode_step_ms:.2f} ms", floor, f"{r.decode_tok_s:.1f}",
                      "" if r.speedup is None else f"{r.speedup:.2f}x", f"{r.prefill_ms:.1f} ms", f"{r.warmup_s:.1f} s",
                      "" if r.peak_mem_gb is None else f"{r.peak_mem_gb:.1f} GiB",
                      "" if r.tokens_match is None else f"{r.tokens_match:.0%}")
    console.print(table)
    applied = sorted(name for name, on in result.features.items() if on)
    console.print(f"optimize applied: {', '.join(applied) or 'nothing'}; decode step = median gap between tokens of "
                  "one call, after a warm-up call (first call: compile and capture included)")
    if args.device.type == "cuda":
        console.print("floor: the bytes a step reads (weights, activated experts, KV cache in use) over this GPU's "
                      "copy bandwidth, measured in this run")
    else:
        console.print("on the CPU the fused op runs its torch reference (no GPU kernels, no CUDA graphs): expect no "
                      "speedup here; run on a CUDA GPU for the real numbers")
    return rows


def cmd_list_models(args: argparse.Namespace, console: Console) -> int:
    from moe_compile.models import TINY_MODELS, tiny_model_names

    table = Table(title="built-in tiny models (random weights, built offline from a config)")
    for column in ("name", "family", "MoE layers", "what it covers"):
        table.add_column(column, overflow="fold")
    for name in tiny_model_names():
        tiny = TINY_MODELS[name]
        table.add_row(name, tiny.model_type, str(tiny.moe_layers), escape(tiny.description))
    console.print(table)
    return 0


def cmd_profiles(args: argparse.Namespace, console: Console) -> int:
    profiles = [load_profile(name) for name in builtin_profiles()]
    summary = Table(title="built-in profiles (--profile NAME, or a path to your own .yaml)")
    for column in ("profile", "backend", "description"):
        summary.add_column(column, overflow="fold")
    for profile in profiles:
        summary.add_row(profile.name, profile.backend, escape(profile.description))
    console.print(summary)
    features = Table(title="features (--enable-X / --disable-X; auto = on where available and useful)")
    for column in ("feature", *(p.name for p in profiles), "in this version", "what it does"):
        features.add_column(column, overflow="fold")
    for name, (what, why_not, _) in FEATURES.items():
        values = [str(p.features[name]).lower() for p in profiles]
        reason = why_not(torch.device("cuda"))
        features.add_row(_flag(name), *values, "yes" if reason is None else escape(f"no: {reason}"), escape(what))
    console.print(features)
    return 0


def _fail(message: str) -> None:
    print(f"moe-compile: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --gpus re-launches under torchrun
    verbose = bool(getattr(args, "verbose", False))
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    else:
        _quiet_transformers()
    try:
        return args.func(args, _console())
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001  (every error ends as one line; a traceback with --verbose)
        if verbose:
            traceback.print_exc()
        if isinstance(exc, MoECompileError):
            _fail(str(exc))
            return 1
        _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --verbose for the traceback; please report it)")
        return 1
    finally:
        if cli_parallel.is_worker():
            cli_parallel.leave_group()


if __name__ == "__main__":
    sys.exit(main())
