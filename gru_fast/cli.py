"""The ``gru-fast`` command line (also ``python -m gru_fast``).

    gru-fast demo                                   the shipped model: accuracy, parity, timing vs peers
    gru-fast info MODEL                             layers, sizes, variant, activations, dtype, provenance
    gru-fast convert SRC -o OUT.npz                 .onnx / .pt / .pth / .npz -> gru_fast engine file
    gru-fast run MODEL --input x.npy --output y.npz batch inference over a large .npy, in chunks
    gru-fast bench [--quick] [--cases NAME ...]     the benchmark report (from a source checkout)

Model files (MODEL, SRC) are recognised by their suffix:

- ``.npz``: a gru_fast engine file (:func:`gru_fast.save`); otherwise a numpy state dict of an
  ``nn.GRU`` (``np.savez(path, **state_dict)``), read with ``--prefix`` / ``--batch-first``;
- ``.onnx``: every GRU node of the graph (one single-layer model each), ``--node NAME`` picks one;
  ``info`` and ``run`` join a chain of nodes that is exactly a stacked GRU (``torch.onnx.export`` of
  ``nn.GRU(num_layers=L)``) into one L-layer model, keyed by its first node, unless ``--no-stack``;
- ``.pt`` / ``.pth``: a PyTorch checkpoint, read with ``torch.load(weights_only=True)`` (needs torch): a
  state dict, bare or anywhere inside the checkpoint's dicts (``{"model": sd, "epoch": 3}``, Lightning,
  DataParallel); ``--prefix`` picks one GRU when it holds several.  Without ``--batch-first`` /
  ``--no-batch-first`` the layout comes from a ``batch_first`` entry the checkpoint records, else it is
  assumed time-major and ``info`` / ``convert`` say so.
- ``.keras`` / ``.h5``: every GRU layer of a Keras model or weights file (:func:`converters.from_keras.load`,
  needs h5py), ``--node NAME`` picks one by layer name.

Exit codes: 0 success; 1 bad input (a missing, unreadable or invalid file, data that does not fit the
model); 2 usage error (unknown command or option, missing argument, ``bench`` outside a source
checkout); 3 an optional package the command needs is not installed; 4 ``demo``: a check against an
authority failed; 130 interrupted.  Errors are one line on stderr, ``gru-fast: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from .extras import install_hint

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_MISSING, EXIT_CHECK, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class CliError(Exception):
    """A user-facing failure: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_INPUT):
        super().__init__(message)
        self.code = code


def one_line(message: str, limit: int = 600) -> str:
    """An error message as one terminal line: whitespace runs (newlines from wrapped library messages,
    e.g. torch.load's) collapsed, ANSI escapes dropped, very long messages cut."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _missing(exc: ImportError, what: str) -> CliError:
    name = (exc.name or str(exc)).split(".")[0]
    return CliError(f"{what} needs the '{name}' package, which is not installed ({install_hint(name)})",
                    EXIT_MISSING)


# --------------------------------------------------------------------------------------------------
# reading models
# --------------------------------------------------------------------------------------------------

def _existing_file(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{path}: no such file")
    if not p.is_file():
        raise CliError(f"{path}: not a regular file")
    return p


def _unnamed(message: str, path: str) -> str:
    """``message`` without the file name it starts with (for a message that quotes it inside another)."""
    for form in (f"{path}: ", f"{path!r}: ", f"{path} ", f"{path!r} "):
        if message.startswith(form):
            return message[len(form):]
    return message


def read_models(path: str, *, node: str | None = None, prefix: str | None = None,
                batch_first: bool | None = None, stack: bool = False) -> tuple[str, dict]:
    """-> (kind of file, {name: gru_fast.GRU}) for any model file the CLI accepts (see the module doc).

    ``stack``: ONNX chains of GRU nodes that are exactly a stacked GRU become one model (from_onnx.load's
    ``stack``); why connected nodes stay separate is printed on stderr as ``gru-fast: note: ...``."""
    import gru_fast
    from gru_fast._files import name_file, sniff

    source = _existing_file(path)
    suffix = source.suffix.lower()
    if node is not None and suffix not in (".onnx", ".keras", ".h5"):
        raise CliError(f"--node applies to .onnx files only (and Keras .keras / .h5 files), {path} is a "
                       f"{suffix or 'suffix-less'} file",
                       EXIT_USAGE)
    if suffix == ".onnx":
        if prefix is not None:
            raise CliError("--prefix applies to PyTorch state dicts (.pt, .pth, .npz), not to .onnx files",
                           EXIT_USAGE)
        try:
            import warnings

            from converters import from_onnx

            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always", from_onnx.StackWarning)
                models = from_onnx.load(source, stack=stack)
        except ImportError as exc:
            raise _missing(exc, "reading .onnx files") from None
        except (ValueError, TypeError, OSError) as exc:
            raise CliError(name_file(str(exc), path)) from None
        for note in notes:
            if issubclass(note.category, from_onnx.StackWarning):
                print(f"gru-fast: note: {one_line(str(note.message))}", file=sys.stderr)
            else:
                warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
        if node is not None:
            if node not in models:
                stacks = [k for k, m in models.items() if node in m.provenance.get("stacked_nodes", ())]
                if stacks:
                    raise CliError(f"{path}: GRU node {node!r} is a layer of the stacked model {stacks[0]!r}; "
                                   "add --no-stack to use it alone")
                raise CliError(f"{path}: no GRU node named {node!r}; the graph's GRU nodes are: "
                               f"{', '.join(repr(k) for k in models)}")
            models = {node: models[node]}
        return "ONNX model", models
    if suffix in (".pt", ".pth"):
        return "PyTorch state dict", {source.stem: _read_torch(source, prefix, batch_first)}
    if suffix in (".keras", ".h5"):
        if prefix is not None or batch_first is not None:
            raise CliError("--prefix and --batch-first apply to PyTorch state dicts, not to Keras files "
                           "(Keras files record their layer names and layout)", EXIT_USAGE)
        try:
            from converters import from_keras

            models = from_keras.load(source)
        except ImportError as exc:
            raise _missing(exc, f"reading {suffix} files") from None
        except (ValueError, TypeError, OSError) as exc:
            raise CliError(name_file(str(exc), path)) from None
        if node is not None:
            if node not in models:
                raise CliError(f"{path}: no GRU layer named {node!r}; the model's GRU layers are: "
                               f"{', '.join(repr(k) for k in models)}")
            models = {node: models[node]}
        return "Keras model", models
    if suffix == ".npz":
        kind = sniff(source)  # the members tell an engine file from a numpy state dict
        if prefix is not None or batch_first is not None or kind == "torch":
            return "numpy state dict", {source.stem: _read_torch(source, prefix, batch_first)}
        try:
            return "gru_fast engine file", {source.stem: gru_fast.load(source)}
        except (ValueError, OSError) as engine_error:
            if kind == "gru_fast":
                raise CliError(name_file(str(engine_error), path)) from None
            try:
                return "numpy state dict", {source.stem: _read_torch(source, None, None)}
            except CliError as torch_error:
                raise CliError(f"{path} is neither a gru_fast engine file ({_unnamed(str(engine_error), path)}) "
                               f"nor a numpy state dict of an nn.GRU ({_unnamed(str(torch_error), path)})") from None
    raise CliError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected a gru_fast engine file "
                   "(.npz), an ONNX model (.onnx), a PyTorch state dict (.pt, .pth, .npz) or a Keras model "
                   "(.keras, .h5)")


def _read_torch(source: Path, prefix, batch_first):
    from converters import from_torch

    from ._files import name_file

    try:
        return from_torch.load(source, prefix=prefix, batch_first=batch_first)
    except ImportError as exc:
        raise _missing(exc, f"reading {source.suffix} files") from None
    except (ValueError, TypeError, OSError) as exc:
        raise CliError(name_file(str(exc), source)) from None


def _stack_line(model) -> str | None:
    """The sentence saying that ``model`` is several ONNX GRU nodes stacked, or None."""
    nodes = model.provenance.get("stacked_nodes")
    if not nodes:
        return None
    return (f"{len(nodes)} GRU nodes stacked as one {model.num_layers}-layer model "
            f"({', '.join(map(repr, nodes))}; --no-stack for one model per node)")


def _single_model(path, args):
    _, models = read_models(path, node=getattr(args, "node", None), prefix=getattr(args, "prefix", None),
                            batch_first=getattr(args, "batch_first", None),
                            stack=not getattr(args, "no_stack", True))
    if len(models) > 1:
        raise CliError(f"{path} holds {len(models)} GRU models ({', '.join(repr(k) for k in models)}); pick one "
                       "with --node NAME")
    return next(iter(models.values()))


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------

def describe(model) -> dict:
    """The facts ``info`` prints, as JSON values."""
    weights = model.onnx_weights()
    parameters = sum(a.size for layer in weights for a in layer if a is not None)
    acts = []
    for a in model.activations:
        params = [f"alpha={a.alpha:g}"] * a.takes_alpha + [f"beta={a.beta:g}"] * a.takes_beta
        acts.append(a.name + (f"({', '.join(params)})" if params else ""))
    return {
        "num_layers": model.num_layers, "direction": model.direction, "num_directions": model.num_directions,
        "input_size": model.input_size, "hidden_size": model.hidden_size,
        "output_size": model.num_directions * model.hidden_size,
        "linear_before_reset": model.linear_before_reset, "activations": acts, "clip": model.clip,
        "bias": model.has_bias, "dtype": model.dtype.name, "batch_first": model.batch_first,
        "parameters": int(parameters), "parameter_bytes": int(parameters * model.dtype.itemsize),
        "provenance": model.provenance,
    }


def _info_text(name: str, facts: dict) -> list[str]:
    d = facts
    variant = ("linear_before_reset=1: reset gate applied after the recurrent product (PyTorch, Keras "
               "reset_after=True)" if d["linear_before_reset"] else
               "linear_before_reset=0: reset gate applied before the recurrent product (ONNX default, Keras "
               "reset_after=False)")
    x_layout = "(B, T, I)" if d["batch_first"] else "(T, B, I)"
    f_g = d["activations"]
    per_direction = ["f=" + f_g[2 * i] + ", g=" + f_g[2 * i + 1] for i in range(len(f_g) // 2)]
    lines = [
        ("layers", f"{d['num_layers']}, {d['direction']}"),
        ("sizes", f"input {d['input_size']}, hidden {d['hidden_size']}, output {d['output_size']} per step"),
        ("variant", variant),
        ("activations", "; ".join(per_direction)),
        ("clip", "none" if d["clip"] is None else f"{d['clip']:g}"),
        ("bias", "yes" if d["bias"] else "no"),
        ("dtype", d["dtype"]),
        ("batch_first", f"{d['batch_first']}: x is {x_layout}, h0 and h_n are (L*D, B, H)"),
        ("parameters", f"{d['parameters']:,} ({d['parameter_bytes'] / 1024:,.1f} KiB)"),
        ("provenance", json.dumps(d["provenance"], sort_keys=True) if d["provenance"] else "none recorded"),
    ]
    if isinstance(d["provenance"], dict) and "layout" in d["provenance"]:  # a converted state dict's layout
        lines.insert(-2, ("layout", d["provenance"]["layout"]))
    if isinstance(d["provenance"], dict) and d["provenance"].get("stacked_nodes"):
        nodes = d["provenance"]["stacked_nodes"]
        lines.insert(0, ("stacked", f"{len(nodes)} ONNX GRU nodes as one model: {', '.join(map(repr, nodes))} "
                                    "(--no-stack for one model per node)"))
    return [f"{name}:"] + [f"  {key:<12s} {value}" for key, value in lines]


def cmd_info(args) -> int:
    kind, models = read_models(args.file, node=args.node, prefix=args.prefix, batch_first=args.batch_first,
                               stack=not args.no_stack)
    if args.json:
        print(json.dumps({"file": args.file, "kind": kind, "models": {k: describe(m) for k, m in models.items()}},
                         indent=1))
        return EXIT_OK
    size = Path(args.file).stat().st_size
    print(f"{args.file}: {kind}, {size / 1024:,.1f} KiB, {len(models)} GRU model{'s' * (len(models) > 1)}")
    for index, (name, model) in enumerate(models.items()):
        print(("\n" if index else "") + "\n".join(_info_text(name, describe(model))))
        provenance = model.provenance or {}
        if provenance.get("source") == "scripts/train_default_model.py" and "test_accuracy" in provenance:
            from ._demo import accuracy_sets  # the shipped demo model: which set test_accuracy is on

            print(f"  {'accuracy':<12s} {accuracy_sets()}")
    return EXIT_OK


def _note_assumed_layouts(models) -> None:
    """``convert``: a state dict whose layout was guessed (time-major) says so on stderr (``info`` prints
    it on its ``layout`` line)."""
    for name, model in models.items():
        if model.provenance.get("layout_assumed"):
            print(f"gru-fast: note: {name}: layout {model.provenance.get('layout')}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------

def _safe_name(name: str, index: int) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return cleaned or f"gru{index}"


def output_paths(out: str, names: list[str], source: Path) -> list[Path]:
    """Where ``convert`` writes each model (documented in ``gru-fast convert --help``)."""
    target = Path(out)
    if target.is_dir() or out.endswith(("/", os.sep)):
        stems = [source.stem] if len(names) == 1 and source.suffix.lower() != ".onnx" else names
        return [target / f"{_safe_name(stem, i)}.npz" for i, stem in enumerate(stems)]
    if target.suffix.lower() != ".npz":
        raise CliError(f"-o {out}: the output must be a .npz file or a directory", EXIT_USAGE)
    if len(names) == 1:
        return [target]
    return [target.with_name(f"{target.stem}.{_safe_name(n, i)}.npz") for i, n in enumerate(names)]


def cmd_convert(args) -> int:
    import gru_fast

    if args.weights == "bfloat16" and args.dtype == "float64":
        raise CliError("--weights bfloat16 computes in float32: drop --dtype float64", EXIT_USAGE)
    _, models = read_models(args.src, node=args.node, prefix=args.prefix, batch_first=args.batch_first)
    paths = output_paths(args.output, list(models), Path(args.src))
    if args.output.endswith(("/", os.sep)):  # -o DIR/ names a directory to write into: made when missing
        try:
            Path(args.output).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"-o {args.output}: cannot create the directory ({exc.strerror or exc})") from None
    for path, (name, model) in zip(paths, models.items()):
        if args.dtype is not None:
            model = model.astype(args.dtype)
        if args.weights is not None:
            model = model.with_weights(args.weights)
        if not path.parent.exists():
            raise CliError(f"-o {args.output}: directory {path.parent} does not exist")
        try:
            gru_fast.save(model, path)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
        print(f"wrote {path}  ({name}: {model})")
    _note_assumed_layouts(models)
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------

def _open_input(path: str, model) -> np.ndarray:
    source = _existing_file(path)
    try:
        x = np.load(source, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CliError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(x, np.ndarray):  # np.load returned an NpzFile
        x.close()
        raise CliError(f"{path}: expected a .npy array file, got a .npz archive")
    layout = f"(N, T, {model.input_size}): N sequences of T steps of {model.input_size} features"
    if x.dtype.kind != "f":
        raise CliError(f"{path}: x must hold floating-point numbers (float16/32/64), got dtype {x.dtype}")
    if x.ndim != 3 or x.shape[2] != model.input_size:
        raise CliError(f"{path}: x must have shape {layout}, got {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise CliError(f"{path}: x must hold at least one sequence of at least one step, got shape {x.shape}")
    return x


def _open_lengths(path: str, count: int, steps: int) -> np.ndarray:
    source = _existing_file(path)
    try:
        lengths = np.load(source, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CliError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(lengths, np.ndarray):
        lengths.close()
        raise CliError(f"{path}: expected a .npy array file, got a .npz archive")
    if lengths.dtype.kind not in "iu":
        raise CliError(f"{path}: lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.shape != (count,):
        raise CliError(f"{path}: lengths must have shape ({count},), one per sequence of the input, "
                       f"got {lengths.shape}")
    if count and (lengths.min() < 0 or lengths.max() > steps):
        bad = int(np.flatnonzero((lengths < 0) | (lengths > steps))[0])
        raise CliError(f"{path}: lengths must lie in [0, {steps}] (the input's T), got {int(lengths[bad])} "
                       f"at index {bad}")
    return lengths.astype(np.int64)


def _write_npz(final: Path, members: dict[str, Path]) -> None:
    """Zip the finished .npy files (stored, not compressed: np.load reads them as they are)."""
    with zipfile.ZipFile(final, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, path in members.items():
            archive.write(path, arcname=f"{name}.npy")


def cmd_run(args) -> int:
    model = _single_model(args.model, args)
    stacked = _stack_line(model)
    x = _open_input(args.input, model)
    N, T = x.shape[:2]
    lengths = None if args.lengths is None else _open_lengths(args.lengths, N, T)
    output = Path(args.output)
    suffix = output.suffix.lower()
    wanted = args.outputs or (["y", "h_n"] if suffix == ".npz" else ["y"])
    if suffix not in (".npz", ".npy"):
        raise CliError(f"--output {args.output}: must end in .npz (y and h_n) or .npy (one array)", EXIT_USAGE)
    if suffix == ".npy" and len(wanted) != 1:
        raise CliError("--output .npy holds one array: pass --outputs y or --outputs h_n, or write a .npz",
                       EXIT_USAGE)
    if not output.parent.is_dir():
        raise CliError(f"--output {args.output}: directory {output.parent} does not exist")
    if output.resolve() in {Path(args.input).resolve(), Path(args.model).resolve()} or (
            args.lengths and output.resolve() == Path(args.lengths).resolve()):
        raise CliError(f"--output {args.output} would overwrite an input file")

    L, D, H = model.num_layers, model.num_directions, model.hidden_size
    shapes = {"y": (N, T, D * H), "h_n": (N, L * D, H)}
    started = time.perf_counter()
    try:
        _run_chunks(model, x, lengths, output, wanted, shapes, args)
    except OSError as exc:  # a full disk, a read-only directory: the user's to fix, not a bug
        raise CliError(f"cannot write {output}: {exc.strerror or exc}") from None
    seconds = time.perf_counter() - started
    written = ", ".join(f"{name} {shapes[name]} {model.dtype.name}" for name in wanted)
    if stacked:
        print(f"{args.model}: {stacked}")
    print(f"wrote {output}: {written}; {N} sequences in {seconds:.2f} s ({N / max(seconds, 1e-9):,.0f} seq/s)")
    return EXIT_OK


def _run_chunks(model, x, lengths, output, wanted, shapes, args):
    from tqdm import tqdm

    N, suffix = len(x), output.suffix.lower()
    # Results go to .npy files beside the output (same file system), memory-mapped so that only one
    # chunk is in memory at a time, and are moved into place only when complete.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        parts = {name: Path(tmp) / f"{name}.npy" for name in wanted}
        arrays = {name: np.lib.format.open_memmap(parts[name], mode="w+", dtype=model.dtype, shape=shapes[name])
                  for name in wanted}
        progress = tqdm(total=N, unit="seq", desc="gru-fast run", file=sys.stderr,
                        disable=True if args.no_progress else None, dynamic_ncols=True)
        with progress:
            for start in range(0, N, args.batch_size):
                stop = min(N, start + args.batch_size)
                chunk = np.asarray(x[start:stop], dtype=model.dtype)
                if not model.batch_first:
                    chunk = chunk.transpose(1, 0, 2)  # the file is (N, T, I); this model takes (T, B, I)
                try:
                    y, h_n = model(chunk, lengths=None if lengths is None else lengths[start:stop])
                except (ValueError, TypeError) as exc:
                    raise CliError(f"{args.input}: sequences {start}-{stop - 1}: {exc}") from None
                if "y" in arrays:
                    arrays["y"][start:stop] = y if model.batch_first else y.transpose(1, 0, 2)
                if "h_n" in arrays:
                    arrays["h_n"][start:stop] = h_n.transpose(1, 0, 2)
                progress.update(stop - start)
        for array in arrays.values():
            array.flush()
        del arrays
        if suffix == ".npy":
            os.replace(parts[wanted[0]], output)
        else:
            staged = Path(tmp) / "out.npz"
            _write_npz(staged, parts)
            os.replace(staged, output)


# --------------------------------------------------------------------------------------------------
# demo and bench
# --------------------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from . import _demo

    peers = _demo.PEERS if args.peers is None else [_demo.PEER_OPTIONS[p] for p in args.peers]
    return _demo.run(timing=not args.no_timing, rounds=args.rounds, threads=args.threads, peers=peers)


def cmd_warmup(args) -> int:
    import gru_fast

    model = None if args.model is None else _single_model(args.model, args)
    print("gru-fast warmup: " + ("compiling the kernels " + ("this model needs" if model is not None else
                                                              "of every weight type (float32, float64, bfloat16)")),
          flush=True)
    for entry in gru_fast.warmup(model):
        mode = "parallel" if entry["parallel"] else "serial"
        print(f"  {entry['weights']} {mode}: {entry['seconds']:.1f} s ({entry['source']})", flush=True)
    return EXIT_OK


def bench_root() -> Path | None:
    """The source checkout holding the ``bench`` package, if gru_fast runs from one."""
    for candidate in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (candidate / "bench" / "__main__.py").is_file() and (candidate / "gru_fast").is_dir():
            return candidate
    return None


def cmd_bench(args) -> int:
    root = bench_root()
    if root is None:
        raise CliError("bench runs from a source checkout of gru_fast (the bench/ harness is not installed "
                       "with the package): clone the repository and run 'gru-fast bench' or "
                       "'python -m bench' there", EXIT_USAGE)
    command = [sys.executable, "-m", "bench"]
    if args.quick:
        command.append("--quick")
    if args.cases:
        command += ["--cases", *args.cases]
    if args.out_dir:
        command += ["--out-dir", args.out_dir]
    return subprocess.call(command, cwd=root)


# --------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of the rest of the CLI (exit code 2)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _model_options(parser, *, onnx_node=True):
    if onnx_node:
        parser.add_argument("--node", metavar="NAME", help="ONNX: use only the GRU node called NAME; "
                            "Keras: the GRU layer called NAME")
    parser.add_argument("--prefix", metavar="PREFIX",
                        help="PyTorch checkpoint: the GRU's dotted path, e.g. 'model.encoder.gru.' or a unique "
                             "ending of it such as 'encoder.gru' (needed when the file holds several GRUs)")
    parser.add_argument("--batch-first", action=argparse.BooleanOptionalAction, default=None,
                        help="PyTorch checkpoint: the module was built with batch_first=True (or, with "
                             "--no-batch-first, False); default: the checkpoint's recorded 'batch_first' if "
                             "any, else time-major, with a note")


def _no_stack_option(parser):
    parser.add_argument("--no-stack", action="store_true",
                        help="ONNX: one model per GRU node; by default a chain of GRU nodes that is exactly a "
                             "stacked GRU (as torch.onnx.export writes nn.GRU(num_layers=L)) is one L-layer model")


def build_parser() -> argparse.ArgumentParser:
    import gru_fast

    formatter = argparse.HelpFormatter  # wraps descriptions and epilogs to the terminal
    parser = _Parser(prog="gru-fast", formatter_class=formatter,
                     description="Fast, exact CPU inference for GRU networks.",
                     epilog="Exit codes: 0 ok; 1 bad input file or data; 2 usage error; 3 optional package "
                            "missing; 4 demo check failed; 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"gru-fast {gru_fast.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo", formatter_class=formatter, help="run the shipped model: accuracy, parity, timing vs peers",
        description="Load the GRU classifier shipped with gru_fast, classify 512 held-out sequences, check "
                    "the outputs against PyTorch's recorded output, the ONNX reference evaluator and ONNX "
                    "Runtime, and time it against the installed peers (PyTorch, ONNX Runtime, OpenVINO).",
        epilog="Without the onnx package the ONNX checks and the ONNX Runtime / OpenVINO timings are skipped "
               "with a note (exit 0). Exit 4 when a check fails.")
    demo.add_argument("--no-timing", action="store_true", help="skip the timing table")
    demo.add_argument("--peers", nargs="+", choices=["pytorch", "onnxruntime", "openvino"], metavar="NAME",
                      help="peers to time: pytorch, onnxruntime, openvino (default: every one installed)")
    demo.add_argument("--rounds", type=_positive_int, default=7,
                      help="timing rounds (default 7; fewer, at least 3, when a case would exceed ~2.5 s); rounds "
                           "during which other processes used the CPUs are left out, and more are run in their "
                           "place")
    demo.add_argument("--threads", type=_positive_int, default=2, help="threads per engine (default 2)")
    demo.set_defaults(handler=cmd_demo)

    info = commands.add_parser(
        "info", formatter_class=formatter, help="describe a model file",
        description="Print layers, sizes, variant (linear_before_reset), activations, clip, dtype, "
                    "batch_first and provenance of a gru_fast engine file, of every GRU node of an ONNX "
                    "model, or of a PyTorch state dict (converted in memory).")
    info.add_argument("file", metavar="FILE", help="model file: .npz, .onnx, .pt, .pth, .keras or .h5")
    _model_options(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    _no_stack_option(info)
    info.set_defaults(handler=cmd_info)

    convert = commands.add_parser(
        "convert", formatter_class=formatter, help="convert a model to a gru_fast engine file",
        description="Convert an ONNX model (.onnx), a PyTorch state dict (.pt, .pth, or a numpy .npz "
                    "state dict) or a gru_fast engine file (.npz, e.g. to change --dtype) to the engine "
                    "format.",
        epilog="Output paths: with -o FILE.npz a single model is written to FILE.npz; several (an ONNX "
               "graph with several GRU nodes, one per stacked layer as torch.onnx.export writes them) go "
               "to FILE.<node>.npz beside it. With -o DIR/ (an existing directory, or a path ending in /, "
               "created with its parents when missing) each model goes to DIR/<node>.npz (ONNX) or "
               "DIR/<source name>.npz. Node names are reduced to letters, digits, '_', '-' and '.'.")
    convert.add_argument("src", metavar="SRC", help="model file: .onnx, .pt, .pth, .npz, .keras or .h5")
    convert.add_argument("-o", "--output", required=True, metavar="OUT", help="output .npz file or directory")
    _model_options(convert)
    convert.add_argument("--dtype", choices=["float32", "float64"], help="compute precision of the written "
                         "model (default: the source's)")
    convert.add_argument("--weights", choices=["bfloat16"], help="store W and R as bfloat16 (rounded to "
                         "nearest even; biases, state and arithmetic stay float32): half the bytes per step, "
                         "errors about 1e-2 instead of 1e-6")
    convert.set_defaults(handler=cmd_convert)

    run = commands.add_parser(
        "run", formatter_class=formatter, help="batch inference over a .npy file",
        description="Run a model over every sequence of a .npy file, in chunks of --batch-size sequences. "
                    "The input is memory-mapped and the outputs are written through memory maps, so files "
                    "larger than memory work; the output appears only once complete.",
        epilog="File layouts (whatever the model's batch_first): --input x.npy is (N, T, I) float16/32/64, "
               "sequence-major; --lengths l.npy is (N,) integers in [0, T] (steps past a sequence's length "
               "are padding: y is 0 there, h_n is the state after its last valid step); the output .npz "
               "holds y (N, T, D*H) and h_n (N, L*D, H), sequence-major too (the engine's own h_n is "
               "(L*D, N, H)), in the model's dtype; a .npy output holds the one array named by --outputs. "
               "The initial state is zero. A progress bar is drawn on stderr when it is a terminal.")
    run.add_argument("model", metavar="MODEL", help="model file: .npz, .onnx (one GRU node, or one stack of "
                     "them), .pt, .pth, .keras or .h5 (one GRU layer)")
    run.add_argument("--input", required=True, metavar="X.npy", help="input sequences (N, T, I)")
    run.add_argument("--lengths", metavar="L.npy", help="valid steps per sequence (N,) (default: all T)")
    run.add_argument("--output", required=True, metavar="OUT", help="output .npz (y and h_n) or .npy (one array)")
    run.add_argument("--outputs", nargs="+", choices=["y", "h_n"], metavar="NAME",
                     help="which outputs to write: y, h_n (default: both for .npz, y for .npy)")
    run.add_argument("--batch-size", type=_positive_int, default=256, metavar="N",
                     help="sequences per chunk (default 256)")
    run.add_argument("--no-progress", action="store_true", help="never draw the progress bar")
    _model_options(run)
    _no_stack_option(run)
    run.set_defaults(handler=cmd_run)

    warmup = commands.add_parser(
        "warmup", formatter_class=formatter, help="compile the kernels ahead of time (Dockerfiles, CI)",
        description="Compile gru_fast's kernels for this machine into the kernel cache, so that the first "
                    "call of every later process loads them instead of compiling (seconds, once per machine "
                    "and gru_fast version). With MODEL, only the kernels that model needs.")
    warmup.add_argument("model", nargs="?", metavar="MODEL", help="a model file (as for 'gru-fast info')")
    _model_options(warmup)
    warmup.set_defaults(handler=cmd_warmup)

    bench = commands.add_parser(
        "bench", formatter_class=formatter, help="benchmark report vs PyTorch / ONNX Runtime / OpenVINO",
        description="Run the benchmark harness (python -m bench) of a source checkout: every case against "
                    "the installed peers, written to bench/results/report*.{md,json,png}.",
        epilog="Needs a source checkout (exit 2 otherwise). The exit code is the harness's.")
    bench.add_argument("--quick", action="store_true",
                       help="smoke-test run, about two minutes on a quiet machine (no B=256 case, no isolated-engine "
                            "table, no empty-kernel-cache rows: those are the full run's)")
    bench.add_argument("--cases", nargs="+", metavar="NAME", help="cases to run (default: all)")
    bench.add_argument("--out-dir", metavar="DIR", help="where the report goes (default bench/results)")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CliError as exc:
        print(f"gru-fast: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("gru-fast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `gru-fast info x | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
