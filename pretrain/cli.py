"""The command line of the launcher tools (``tools/pretrain.py``, ``train_net.py``, ``eval_linear.py``,
``eval_knn.py``, ``tsne.py``), light enough that ``--help`` and a wrong flag never import torch or detectron2.

:func:`argument_parser` has detectron2's ``default_argument_parser`` flags, names and defaults (``--config-file``,
``--resume``, ``--eval-only``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, ``KEY VALUE``
overrides) with help that is true for the tool (:data:`TOOLS`), plus the SLURM flags of :mod:`pretrain.slurm`. Flags
and overrides mix in any order. :func:`user_errors` turns a mistake of the user (a config key that does not exist, a
value out of range, a missing file, ...) into one ``error:`` line and exit status 2, argparse's convention for a
wrong command line; anything else is a bug and keeps its traceback.
"""
import argparse
import contextlib
import os
import re
import sys
import textwrap
import traceback
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

from .slurm import add_slurm_args

USER_ERROR_STATUS = 2  # argparse's exit status for a wrong command line; a config or data mistake is one too

_KEYS_PRETRAIN = ("every key is listed with a comment in pretrain/config.py (a method part's own keys, e.g. "
                  "MODEL.MOCO.* and LOSS.DISCO.*, in its add_config in pretrain/testbeds/ and pretrain/distillers/)")
_KEYS_EVAL = "every key is listed with a comment in transfer/config.py"
_KEYS_D2 = "detectron2's keys are listed in detectron2/config/defaults.py, this project's in transfer/d2/config.py"
_NL = " \\\n      "  # a shell line continuation in the examples
_DEMO_DATA = ("DATA.TRAIN_DIR runs/demo/data/train DATA.VAL_DIR runs/demo/data/val" + _NL +
              "DATA.IMAGE_SIZE 32 DATA.VAL_RESIZE 32 DATA.NUM_WORKERS 0")
_DEMO_STUDENT = "runs/demo/quickstart/export/convnet_tiny.pth"  # the DisCo student of `make demo`
_VOC_INSTANT = "configs/detection/quick_schedules/voc_r18_C4_instant_test.yaml"


class Tool(NamedTuple):
    """What the help of one launcher tool says beyond its description (the tool's docstring)."""

    keys: str  # where its config keys are listed (the epilog; appended to an unknown-key error)
    examples: Tuple[str, ...]  # command lines that work as written (tests/test_cli.py checks their configs)
    resume: Optional[str]  # help of --resume; None: the tool has no --resume
    eval_only: Optional[str]  # help of --eval-only; None: the tool has no --eval-only
    num_gpus: str = "processes per machine: one per GPU, or gloo CPU processes without GPUs"
    examples_need: str = "`make demo`, which writes runs/demo"  # what the examples run after


TOOLS: Dict[str, Tool] = {
    "pretrain": Tool(
        keys=_KEYS_PRETRAIN,
        examples=(
            "python tools/pretrain.py --config-file configs/pretrain/quickstart_teacher.yaml" + _NL +
            "OUTPUT_DIR runs/try/teacher SOLVER.EPOCHS 2 DATA.CROP_SCALE \"(0.2, 1.0)\" --num-gpus 2",
            "python tools/pretrain.py --config-file configs/pretrain/quickstart_teacher.yaml" + _NL +
            "OUTPUT_DIR runs/try/teacher SOLVER.EPOCHS 2 --eval-only"),
        resume="insist on continuing: fail unless OUTPUT_DIR holds a checkpoint (every run continues from the "
               "newest good checkpoint in OUTPUT_DIR anyway)",
        eval_only="no training: log the kNN top-1 / top-5 (TEST.KNN.*) of the newest checkpoint in OUTPUT_DIR "
                  "on DATA.VAL_DIR (both required)"),
    "eval_linear": Tool(
        keys=_KEYS_EVAL,
        examples=(
            "python tools/eval_linear.py --config-file configs/eval/quick_linear.yaml" + _NL +
            f"MODEL.WEIGHTS {_DEMO_STUDENT} OUTPUT_DIR runs/try/linear SOLVER.EPOCHS 20",
            "python tools/eval_linear.py --config-file configs/eval/quick_linear.yaml" + _NL +
            f"MODEL.WEIGHTS {_DEMO_STUDENT} OUTPUT_DIR runs/try/linear SOLVER.EPOCHS 20 --eval-only"),
        resume="insist on continuing: fail unless OUTPUT_DIR holds a classifier checkpoint (every run continues "
               "from the newest one anyway)",
        eval_only="no training: evaluate the classifier saved in OUTPUT_DIR (required) on the evaluation split "
                  "and write OUTPUT_DIR/results.json"),
    "eval_knn": Tool(
        keys=_KEYS_EVAL,
        examples=(
            "python tools/eval_knn.py --config-file configs/eval/knn_imagenet.yaml" + _NL +
            f"MODEL.WEIGHTS {_DEMO_STUDENT}" + _NL + _DEMO_DATA + _NL +
            "KNN.K 10 OUTPUT_DIR runs/try/knn --num-gpus 2",),
        resume=None, eval_only=None),  # a kNN evaluation trains nothing: nothing to resume, nothing to skip
    "tsne": Tool(
        keys=_KEYS_EVAL,
        examples=(
            "python tools/tsne.py --config-file configs/eval/tsne_imagenet.yaml" + _NL +
            "MODEL.WEIGHTS runs/demo/quickstart_moco/export/convnet_tiny.pth" + _NL +
            f"TSNE.COMPARE_WEIGHTS \"['{_DEMO_STUDENT}']\"" + _NL + _DEMO_DATA + _NL +
            "TSNE.PER_CLASS 20 OUTPUT_DIR runs/try/tsne",),
        resume=None, eval_only=None),
    "train_net": Tool(
        keys=_KEYS_D2,
        examples=(
            "python tools/make_data.py voc datasets_synth/VOC2007 --num-classes 4 --trainval-images 200 "
            "--test-images 100",
            f"python tools/train_net.py --config-file {_VOC_INSTANT}" + _NL +
            "DATASETS.SYNTHETIC_ROOT datasets_synth MODEL.WEIGHTS \"\" OUTPUT_DIR runs/try/det --num-gpus 1",
            f"python tools/train_net.py --config-file {_VOC_INSTANT} --eval-only" + _NL +
            "DATASETS.SYNTHETIC_ROOT datasets_synth MODEL.WEIGHTS runs/try/det/model_final.pth" + _NL +
            "OUTPUT_DIR runs/try/det_eval"),
        resume="continue from OUTPUT_DIR's last checkpoint (last_checkpoint) if there is one instead of starting "
               "from MODEL.WEIGHTS (detectron2's resume_or_load); --slurm runs always resume",
        eval_only="no training: evaluate MODEL.WEIGHTS (with --resume: OUTPUT_DIR's last checkpoint if there is "
                  "one) on DATASETS.TEST and write OUTPUT_DIR/results.json",
        num_gpus="GPUs per machine, one process each (detectron2 needs CUDA for more than one process)",
        examples_need="the synthetic VOC set of the first line; CPU, minutes"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Description and epilog as written (their example commands keep their lines), and ``(default: X)`` after
    every option whose help does not already say what its default is."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if "default" in text or default is None or default is False or default is argparse.SUPPRESS or (
                isinstance(default, (str, list, tuple)) and not default):
            return text
        return super()._get_help_string(action)


def _epilog(tool: Tool) -> str:
    prose = ("KEY VALUE overrides go before, between or after the flags. A value is read as a Python literal (quote "
             "lists and tuples for the shell: DATA.CROP_SCALE \"(0.2, 1.0)\"; an empty string is \"\"), anything "
             f"else is a string. Config keys: {tool.keys}.")
    examples = "\n".join("  " + c for c in tool.examples)
    return f"{textwrap.fill(prose, 110)}\n\nexamples (after {tool.examples_need}):\n{examples}"


class LauncherParser(argparse.ArgumentParser):
    """``parse_args`` takes flags and ``KEY VALUE`` overrides intermixed (``parse_intermixed_args``) and refuses an
    odd number of override tokens, naming the one without a value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a negative number is an override value, not a flag: -1, -0.5, -.5, -1e-4, -2.5E+3 (argparse: no exponent)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace=None) -> argparse.Namespace:
        ns = self.parse_intermixed_args(args, namespace)
        if len(ns.opts) % 2:
            key = dangling_override(ns.opts)
            self.error(f"KEY VALUE overrides come in pairs, but {key!r} has no value (the {len(ns.opts)} override "
                       f"words were: {' '.join(map(repr, ns.opts))})")
        return ns


def _looks_like_key(word: str) -> bool:
    return re.fullmatch(r"[A-Z_][A-Z0-9_]*(\.[A-Z0-9_]+)*", word) is not None


def dangling_override(opts: Sequence[str]) -> str:
    """In an odd number of override words, the key that most likely lost its value: the first key directly
    followed by another key where the pairing then goes wrong (a value in a key's place), else the last word."""
    for i in range(0, len(opts) - 2, 2):
        if _looks_like_key(opts[i]) and _looks_like_key(opts[i + 1]) and not _looks_like_key(opts[i + 2]):
            return opts[i]
    return opts[-1]


def default_dist_url() -> str:
    """detectron2's default: a port fixed per user, so that orphaned processes show up as a port in use."""
    port = 2 ** 15 + 2 ** 14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2 ** 14
    return f"tcp://127.0.0.1:{port}"


def argument_parser(tool: str = "pretrain", description: str = "") -> LauncherParser:
    """The parser of ``tools/<tool>.py`` (a key of :data:`TOOLS`); ``description`` is its docstring. The flags keep
    detectron2's names, destinations and defaults; a tool without --resume / --eval-only gets them as False."""
    spec = TOOLS[tool]
    parser = LauncherParser(prog=f"tools/{tool}.py", description=description, epilog=_epilog(spec),
                            formatter_class=HelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="yaml config (its _BASE_ files are merged first); default: the built-in defaults")
    if spec.resume is not None:
        parser.add_argument("--resume", action="store_true", help=spec.resume)
    if spec.eval_only is not None:
        parser.add_argument("--eval-only", action="store_true", help=spec.eval_only)
    parser.set_defaults(**{k: False for k, h in (("resume", spec.resume), ("eval_only", spec.eval_only)) if h is None})
    parser.add_argument("--num-gpus", type=int, default=1, help=spec.num_gpus)
    parser.add_argument("--num-machines", type=int, default=1, help="machines taking part in the run")
    parser.add_argument("--machine-rank", type=int, default=0,
                        help="the rank of this machine (0 .. --num-machines - 1)")
    parser.add_argument("--dist-url", default=default_dist_url(),
                        help="where the processes meet: tcp://HOST:PORT of machine 0 (needed with --num-machines > "
                             "1), or auto (a free port, one machine only); default: a port fixed per user, "
                             "%(default)s")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. OUTPUT_DIR runs/x SOLVER.BASE_LR 0.1 (see below)")
    return add_slurm_args(parser)


# ---------------------------------------------------------------------------------------------------------------
# user errors: one line, no traceback

_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                      for d in ("pretrain", "transfer"))
# a missing / misplaced file or folder (config, dataset, weights, OUTPUT_DIR): the message names the path
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
# what the project raises on purpose, with a message naming the fix (``raise ValueError(...)`` and the like)
_REFUSALS = (ValueError, LookupError, ArithmeticError, RuntimeError, OSError)


def _raised_by_project(exc: BaseException) -> bool:
    """True if ``exc`` comes from a ``raise`` statement in the project's own code (pretrain/, transfer/): a
    deliberate refusal. An exception from a library, or from an expression in our code (``int(x)``), is not."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    return (os.path.abspath(last.filename).startswith(_PROJECT_DIRS)
            and (last.line or "").lstrip().startswith("raise "))


def user_error_message(exc: BaseException) -> Optional[str]:
    """The message to show for a mistake of the user, or None for a bug (which keeps its traceback): an exception
    of a class the project defines (``ConfigError``, ``CheckpointError``, ``OutputDirInUse``, ...), a file error, or
    an exception the project's code raises on purpose."""
    module = type(exc).__module__.split(".")[0]
    if not (module in ("pretrain", "transfer") or isinstance(exc, _FILE_ERRORS)
            or (isinstance(exc, _REFUSALS) and _raised_by_project(exc))):
        return None
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]  # str(KeyError) would quote the message
    return str(exc) or type(exc).__name__


def _is_unknown_key(exc: BaseException) -> bool:
    cfgnode = sys.modules.get("pretrain.cfgnode")  # not loaded: the exception cannot be one of its classes
    return cfgnode is not None and isinstance(exc, cfgnode.UnknownKeyError)


def format_user_error(exc: BaseException, tool: str) -> Optional[str]:
    """``error: <message>`` for a user's mistake (an unknown key also says where the keys of ``tool`` are listed;
    notes such as :func:`failed_output_note` follow on their own lines), or None for a bug."""
    message = user_error_message(exc)
    if message is None:
        return None
    if _is_unknown_key(exc):
        message = f"{message}; {TOOLS[tool].keys}"
    return "\n".join([f"error: {message}", *getattr(exc, "__notes__", ())])


@contextlib.contextmanager
def user_errors(tool: str) -> Iterator[None]:
    """Inside: a user's mistake ends the process with :func:`format_user_error` on stderr and exit status 2; any
    other exception propagates with its traceback."""
    try:
        yield
    except Exception as e:
        text = format_user_error(e, tool)
        if text is None:
            raise
        print(text, file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS) from None


# ---------------------------------------------------------------------------------------------------------------
# what a failed run leaves behind

# what a run writes before it has anything to keep: its resolved config, logs (log.txt of rank 0, log.rank1.txt /
# detectron2's log.txt.rank1 of the others), metrics, TensorBoard events, its lock
_BOOKKEEPING = {"config.yaml", "metrics.jsonl", "metrics.json", ".lock", "config_changes.jsonl"}
_LOG = re.compile(r"log(\.rank\d+)?\.txt(\.rank\d+)?")


def _bookkeeping(rel: str) -> bool:
    name = os.path.basename(rel)
    return (rel in _BOOKKEEPING or _LOG.fullmatch(rel) is not None or name.startswith("events.out.tfevents.")
            or rel.startswith("tb" + os.sep))


def failed_output_note(output_dir: str) -> Optional[str]:
    """For a run that failed: if ``output_dir`` holds no checkpoint or result (only the config, logs and metrics a
    run writes first), a note saying so and what to do with it; else None. Nothing is deleted."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    files = []
    for root, _, names in os.walk(output_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), output_dir)
            if not _bookkeeping(rel):
                return None
            if rel != ".lock":
                files.append(rel)
    held = f"only {', '.join(sorted(files))} of" if files else "nothing but the lock file of"
    return (f"OUTPUT_DIR {output_dir} holds {held} this failed run, no checkpoint or result: fix the cause and rerun "
            f"(the folder is reused), or delete it")
