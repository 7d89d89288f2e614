"""The ``recopt`` command line.

    recopt optimize path/to/model.py:build_fn --target h100 [--passes a,b] [--out report.html]
    recopt explain  path/to/model.py:build_fn [--passes ...]     # what each pass would do, and why not
    recopt bench    path/to/model.py:build_fn [--repeats N]      # eager vs torch.compile vs recopt
    recopt export   path/to/model.py:build_fn model.onnx         # ONNX / pt2 with parity check
    recopt passes | targets                                      # what is registered

A factory ``build_fn()`` returns ``(model, example_inputs)``; it may also be
a bundled model: ``recopt:interformer``, ``recopt:kunlun``, ``recopt:dlrm``.

Also ``python -m recopt ...``.

Exit codes: 0 success, 1 the work failed (capture, a strict pass, export
parity), 2 bad arguments (missing file, bad factory, unknown target/pass/
format, an output path that cannot be written, a flag out of range).
Every argument is checked before the long work starts (:func:`preflight`).
Errors print one line on stderr, naming the flag at fault; ``--debug``
prints the traceback.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
from typing import Any, Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``recopt <command>: error: ...``) and exit 2."""

    def error(self, message):
        prog = self.prog if self.prog.startswith("recopt") else "recopt"
        print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def check_output_path(flag: str, path: Optional[str], protect: Optional[str] = None) -> None:
    """Raise UsageError unless ``path`` can be written (its folder exists or can be made, it is not a
    folder, it is not the model file ``protect``). Leaves no file behind."""
    if path is None:
        return
    if not str(path).strip():
        raise UsageError(f"{flag} is empty; give a file path")
    full = os.path.abspath(path)
    if protect and os.path.exists(protect) and os.path.exists(full) and os.path.samefile(full, protect):
        raise UsageError(f"{flag} {path!r} is the model file itself; writing there would overwrite it")
    if os.path.isdir(full):
        raise UsageError(f"{flag} {path!r} is a folder; give a file path inside it")
    folder = os.path.dirname(full)
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{flag} {path!r}: {probe!r} is a file, so no folder can be made under it")
    existed = os.path.exists(full)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(full, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path!r} cannot be written: {e.strerror or e}") from None
    if not existed:
        os.remove(full)


def _load_factory(spec: str):
    """Resolve ``file.py:function`` or ``recopt:<model>`` to a zero-argument factory."""
    if ":" not in spec:
        raise UsageError(f"model spec {spec!r} must look like path/to/model.py:build_fn or recopt:<model>")
    path, _, fn_name = spec.rpartition(":")
    if path == "recopt":
        from .examples_factory import bundled_factory

        try:
            return bundled_factory(fn_name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not path:
        raise UsageError(f"model spec {spec!r} has no file before ':'; use path/to/model.py:build_fn")
    if not fn_name or not fn_name.isidentifier():
        raise UsageError(f"model spec {spec!r}: {fn_name!r} is not a function name; use path/to/model.py:build_fn")
    if os.path.isdir(path):
        raise UsageError(f"model file {path!r} is a folder; give the .py file that defines {fn_name}()")
    if not os.path.isfile(path):
        raise UsageError(f"model file {path!r} does not exist")
    if not path.endswith(".py"):
        raise UsageError(f"model file {path!r} is not a .py file")
    mod_name = "_recopt_user_model_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        module_spec.loader.exec_module(module)
    except SystemExit as e:
        raise UsageError(f"importing {path} called sys.exit({e.code!r}); a model file must not exit") from None
    except Exception as e:
        raise UsageError(f"importing {path} failed: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        sys.path.pop(0)
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        names = sorted(n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_"))
        raise UsageError(f"{path} has no function {fn_name!r}; callables there: {', '.join(names) or '(none)'}")
    return fn


def _build(spec: str):
    fn = _load_factory(spec)
    try:
        out = fn()
    except SystemExit as e:
        raise UsageError(f"factory {spec} called sys.exit({e.code!r}) instead of returning "
                         "(model, example_inputs)") from None
    except Exception as e:
        raise UsageError(f"factory {spec} raised {type(e).__name__}: {_first_line(e)}") from e
    if not (isinstance(out, tuple) and len(out) == 2):
        raise UsageError(f"factory {spec} must return (model, example_inputs), got {type(out).__name__}")
    model, inputs = out
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"factory {spec} returned a {type(model).__name__} as the model, expected an nn.Module")
    return model, inputs


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _split(values: Optional[str]) -> Optional[list]:
    if values is None:
        return None
    return [v.strip() for v in values.split(",") if v.strip()]


def _optimize(args, **extra):
    import recopt

    model, inputs = _build(args.model)
    configs = args.config_dict
    return model, inputs, recopt.optimize(
        model, inputs, target=args.target, passes=_split(args.passes), configs=configs,
        backend=getattr(args, "backend", None) or "eager", strict=getattr(args, "strict", False),
        progress=not args.quiet, **extra,
    )


def cmd_optimize(args) -> int:
    _, _, opt = _optimize(args)
    if not args.quiet:
        print(opt.report)
    if args.json:
        opt.report.to_json(args.json)
    if args.out:
        from .report_html import write_html

        write_html(opt.report, args.out)
        if not args.quiet:
            print(f"\nHTML report: {args.out}")
    failed = [p.name for p in opt.report.passes if p.status == "failed"]
    return EXIT_FAILED if (failed and args.strict) else EXIT_OK


def cmd_explain(args) -> int:
    _, _, opt = _optimize(args)
    report = opt.report
    print(f"target {report.target.get('name')}, capture {report.capture_method}")
    for d in report.capture_diagnostics:
        print(f"  capture note: {d}")
    for p in report.passes:
        sites = report.sites_for(p.name)
        print(f"\n{p.name} ({p.semantics}): {p.status}" + (f" — {p.message}" if p.message else ""))
        if not sites:
            print("  no candidate sites")
        for s in sites:
            where = f"{s.node}" + (f" [{s.module_path}]" if s.module_path else "")
            if s.status == "rewritten":
                print(f"  would rewrite {where}: {s.reason}")
            else:
                print(f"  would leave   {where}: [{s.reason_code}] {s.reason}")
    if args.json:
        report.to_json(args.json)
    return EXIT_OK


def cmd_bench(args) -> int:
    import torch

    import recopt
    from .bench import Variant, compare

    model, inputs = _build(args.model)
    model.eval()
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    opt = recopt.optimize(model, inputs, target=args.target, passes=_split(args.passes), backend="eager",
                          progress=not args.quiet)
    variants = [Variant("eager", lambda: model(*inputs))]
    if not args.no_compile:
        compiled = torch.compile(model)
        recopt_compiled = torch.compile(opt.graph_module)
        variants += [Variant("torch.compile", lambda: compiled(*inputs)),
                     Variant("recopt+inductor", lambda: recopt_compiled(*inputs))]
    variants.append(Variant("recopt eager", lambda: opt(*inputs)))  # what optimize() returns
    with torch.no_grad():
        res = compare(variants, repeats=args.repeats, warmup=args.warmup, flops=opt.report.flops_before,
                      target=args.target, progress=not args.quiet)
    print(res.table())
    from .measure import measure_speedup  # measured beside predicted, with a noise band (issue 18)

    measure_speedup(opt, inputs, repeats=args.repeats, warmup=args.warmup)
    print(opt.report.speedup_line())
    if args.json:
        res.to_json(args.json)
    return EXIT_OK


def cmd_export(args) -> int:
    import recopt

    _, inputs, opt = _optimize(args)
    recopt.export(opt, inputs, args.path, format=args.format)
    if not args.quiet:
        print(f"exported to {args.path} (parity verified)")
    return EXIT_OK


def cmd_passes(args) -> int:
    import recopt

    for name, cls in recopt.available_passes().items():
        targets = ",".join(cls.default_targets) or "-"
        print(f"{name:<20} {cls.semantics.value:<13} default on: {targets:<10} {cls.description}")
    return EXIT_OK


def cmd_targets(args) -> int:
    from .targets import PROFILES

    for name, t in PROFILES.items():
        print(f"{name:<6} {t.device:<5} bf16 {t.peak_bf16_tflops or '-'} TF/s, fp8 {t.peak_fp8_tflops or '-'} TF/s, "
              f"{t.hbm_gbps or '-'} GB/s, features {','.join(sorted(t.features)) or '-'}  ({t.source})")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="recopt", description="Graph optimizer for recommendation models.")
    ap.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, backend=True):
        p.add_argument("model", help="path/to/model.py:build_fn returning (model, example_inputs), or recopt:<model>")
        p.add_argument("--target", default="cpu", help="b200, h100, h200, a100, cpu or auto (default: cpu)")
        p.add_argument("--passes", default=None, help="comma-separated pass names ('default' = target's pipeline)")
        p.add_argument("--config", default=None, help='JSON: {"pass": {option: value}}')
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
        if backend:
            p.add_argument("--backend", default=None, choices=["eager", "inductor"])
        p.add_argument("--strict", action="store_true", help="fail when a pass fails or is rolled back")

    p = sub.add_parser("optimize", help="optimize a model and print/write the report")
    common(p)
    p.add_argument("--out", default=None, help="write a self-contained HTML report here")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("explain", help="list every candidate site each pass sees and its decision")
    common(p, backend=False)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("bench", help="eager vs torch.compile vs recopt, side by side")
    common(p, backend=False)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per variant (>= 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (>= 0)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="export the optimized model (ONNX or pt2) with a parity check")
    common(p)
    p.add_argument("path", help="output file: .onnx or .pt2")
    p.add_argument("--format", default=None, choices=["onnx", "pt2", "aoti"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("passes", help="list registered passes")
    p.set_defaults(func=cmd_passes)
    p = sub.add_parser("targets", help="list target profiles")
    p.set_defaults(func=cmd_targets)
    return ap


def preflight(args) -> None:
    """Check every argument before any model is built: flags in range, names known, paths writable."""
    import recopt
    from .targets import get_target

    if getattr(args, "model", None) is not None:
        spec = args.model
        if ":" not in spec:
            raise UsageError(f"model spec {spec!r} must look like path/to/model.py:build_fn or recopt:<model>")
        path, _, fn = spec.rpartition(":")
        if path == "recopt":
            from .models import MODELS

            if fn not in MODELS:
                raise UsageError(f"unknown bundled model {fn!r}; choose one of {', '.join(sorted(MODELS))}")
        elif not os.path.isfile(path):
            _load_factory(spec)  # raises the precise message (missing, folder, not .py, bad name)
    if getattr(args, "target", None) is not None:
        try:
            get_target(args.target)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--target: {_first_line(e)}") from None
    if getattr(args, "passes", None) is not None:
        names = _split(args.passes)
        if not names:
            raise UsageError("--passes is empty; give comma-separated pass names (see `recopt passes`)")
        known = recopt.available_passes()
        for n in names:
            if n != "default" and n not in known:
                raise UsageError(f"--passes: unknown pass {n!r}; registered passes: {', '.join(known)}")
    args.config_dict = None
    if getattr(args, "config", None) is not None:
        try:
            cfg = json.loads(args.config)
        except ValueError as e:
            raise UsageError(f"--config is not valid JSON ({e})") from None
        if not isinstance(cfg, dict) or not all(isinstance(v, dict) for v in cfg.values()):
            raise UsageError('--config must be a JSON object {"pass name": {"option": value}}')
        known = recopt.available_passes()
        for n in cfg:
            if n not in known:
                raise UsageError(f"--config: unknown pass {n!r}; registered passes: {', '.join(known)}")
        args.config_dict = cfg
    if getattr(args, "repeats", None) is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if getattr(args, "warmup", None) is not None and args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    model_file = None
    if getattr(args, "model", None) and not args.model.startswith("recopt:"):
        model_file = args.model.rpartition(":")[0]
    if args.command == "export":
        import importlib

        try:
            importlib.import_module("recopt.export")._format_for(args.path, args.format)
        except ValueError as e:
            raise UsageError(f"export path {args.path!r}: {_first_line(e)}") from None
        check_output_path("the export path", args.path, model_file)
    for flag in ("out", "json"):
        check_output_path(f"--{flag}", getattr(args, flag, None), model_file)
    if getattr(args, "out", None) and getattr(args, "json", None) and \
            os.path.abspath(args.out) == os.path.abspath(args.json):
        raise UsageError("--out and --json name the same file; give two paths")


def main(argv: Optional[list] = None) -> int:
    ap = _parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error already printed as one line (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    from .errors import CaptureError, InputError, PassError, RecoptError, VerificationError

    try:
        preflight(args)
        return args.func(args)
    except (UsageError, InputError, ValueError, KeyError) as e:
        code, err = EXIT_USAGE, e
    except (CaptureError, PassError, VerificationError, RecoptError) as e:
        code, err = EXIT_FAILED, e
    except KeyboardInterrupt:
        print(f"recopt {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # something inside the work called sys.exit: an error, never a silent success
        code, err = EXIT_FAILED, RuntimeError(f"sys.exit({e.code!r}) was called during {args.command}")
    except Exception as e:  # an unexpected failure: still one line unless --debug
        code, err = EXIT_FAILED, e
    if args.debug:
        traceback.print_exception(err)
    msg = " ".join(str(err).split()) if str(err).strip() else type(err).__name__
    print(f"recopt {args.command}: error: {msg[:2000]}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
