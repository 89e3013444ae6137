"""The command line of the tools (pretrain.cli): flags anywhere among the KEY VALUE overrides, help that is true for
each tool and comes back without importing torch, and a user's mistake as one ``error:`` line (exit status 2)."""
import os
import shlex
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from pretrain.cli import TOOLS, failed_output_note, user_error_message
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ["pretrain", "train_net", "eval_linear", "eval_knn", "tsne"]
ALL_TOOLS = LAUNCHERS + ["convert_to_d2", "make_data"]


def _tool(name: str) -> types.ModuleType:
    """tools/<name>.py as a module (its __main__ block does not run)."""
    return load_tool(name)


def _run(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


# ---------------------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("tool", LAUNCHERS)
def test_flags_go_anywhere_among_the_overrides(tool):
    overrides = ["MODEL.WEIGHTS", "['a.pth']", "DATA.CROP_SCALE", "(96,)", "TRAIN.STOP_AT_ITER", "-1",
                 "DATA.VAL_DIR", "", "SOLVER.BASE_LR", "-1e-3", "SOLVER.MOMENTUM", "-.5"]
    argv = ["--config-file", "c.yaml", *overrides[:4], "--num-gpus", "8", *overrides[4:8], "--dist-url", "auto",
            *overrides[8:], "--num-machines", "2"]
    has_resume = TOOLS[tool].resume is not None
    args = _tool(tool).build_parser().parse_args(argv + (["--resume"] if has_resume else []))
    assert args.opts == overrides
    assert (args.config_file, args.num_gpus, args.dist_url, args.num_machines) == ("c.yaml", 8, "auto", 2)
    assert args.resume is has_resume and args.eval_only is False and args.slurm is False


def test_same_flags_and_defaults_as_detectron2():
    from detectron2.engine import default_argument_parser

    theirs = vars(default_argument_parser().parse_args([]))
    ours = vars(_tool("train_net").build_parser().parse_args([]))
    assert {k: ours[k] for k in theirs if k != "opts"} == {k: v for k, v in theirs.items() if k != "opts"}
    assert ours["opts"] == []


def test_odd_override_count_names_the_key_without_value(capsys):
    parser = _tool("pretrain").build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["MODEL.WEIGHTS", "SOLVER.BASE_LR", "0.1", "--num-gpus", "2"])
    assert e.value.code == 2
    assert "overrides come in pairs, but 'MODEL.WEIGHTS' has no value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["OUTPUT_DIR", "runs/x", "SOLVER.EPOCHS"])
    assert "'SOLVER.EPOCHS' has no value" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["eval_knn", "tsne"])
def test_evaluators_that_train_nothing_have_no_resume_or_eval_only(tool, capsys):
    parser = _tool(tool).build_parser()
    for flag in ("--eval-only", "--resume"):
        with pytest.raises(SystemExit):
            parser.parse_args([flag])
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
        assert flag not in parser.format_usage()
    args = parser.parse_args([])
    assert args.eval_only is False and args.resume is False  # what transfer.knn / transfer.tsne read


def test_parsers_import_neither_torch_nor_detectron2():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(ROOT)!r})
        for name in {ALL_TOOLS!r}:
            spec = importlib.util.spec_from_file_location("tool_" + name, {str(ROOT / "tools")!r} + "/" + name + ".py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            parser = module.build_parser()
            parser.format_help()
            if name in {LAUNCHERS!r}:
                parser.parse_args(["OUTPUT_DIR", "x", "--num-gpus", "2"])
        print(sorted(m for m in ("torch", "torchvision", "timm", "detectron2", "fvcore") if m in sys.modules))
    """)
    proc = _run("-c", code, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("tool", ALL_TOOLS)
def test_help_is_quiet_true_and_keeps_the_examples_as_written(tool):
    proc = _run(f"tools/{tool}.py", "--help", timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""  # no FutureWarning / UserWarning of an import
    text = proc.stdout
    for wrong in ("DefaultTrainer", "a.b=c", "path.key=value", "LazyConfig", "MODEL.WEIGHTS /path/to/weight.pth"):
        assert wrong not in text
    doc = _tool(tool).__doc__
    assert all(line.rstrip() in text for line in doc.splitlines())  # usage examples line by line, not re-wrapped
    if tool in TOOLS:
        spec = TOOLS[tool]
        assert all(example in text for example in spec.examples)
        assert " ".join(spec.keys.split()) in " ".join(text.split())  # where the config keys are listed
        usage = text.split("\n\n", 1)[0]
        assert ("[--resume]" in usage) is (spec.resume is not None)
        assert ("[--eval-only]" in usage) is (spec.eval_only is not None)
        if spec.eval_only:
            assert spec.eval_only.split(":")[0] in text
    if tool == "make_data":
        sub = _run("tools/make_data.py", "imagefolder", "--help", timeout=120)
        assert sub.returncode == 0 and "training images per class (default: 300)" in " ".join(sub.stdout.split())


def test_help_examples_pass_the_config_check(monkeypatch):
    """Every command of the tools' help parses and its config validates (what the tool checks before starting)."""
    from pretrain.config import setup_cfg
    from transfer.config import setup_eval_cfg
    from transfer.d2.train import load_cfg

    checks = {"pretrain": lambda a: setup_cfg(a.config_file, a.opts), "train_net": load_cfg,
              **{t: (lambda a: setup_eval_cfg(a.config_file, a.opts)) for t in ("eval_linear", "eval_knn", "tsne")}}
    monkeypatch.chdir(ROOT)
    seen = set()
    for tool, spec in TOOLS.items():
        for example in spec.examples:
            words = shlex.split(example.replace("\\\n", " "))
            assert words[0] == "python" and words[1].startswith("tools/")
            name = Path(words[1]).stem
            args = _tool(name).build_parser().parse_args(words[2:])
            if name == tool:
                assert os.path.isfile(args.config_file)
                cfg = checks[tool](args)
                assert cfg.OUTPUT_DIR.startswith("runs/try/")
                seen.add(tool)
    assert seen == set(LAUNCHERS)


def test_third_party_import_warnings_are_silenced_by_importing_pretrain():
    imports = "import detectron2.engine, detectron2.model_zoo"
    without = _run("-c", imports, timeout=300)
    assert "FutureWarning: `torch.jit.script` is deprecated" in without.stderr  # what there is to silence
    assert "pkg_resources is deprecated" in without.stderr
    proc = _run("-c", "import pretrain; " + imports, timeout=300)
    assert proc.returncode == 0 and proc.stderr == ""


# ---------------------------------------------------------------------------------------------------------------
# user errors


@pytest.mark.parametrize("tool,argv,expect", [
    ("pretrain", ["--config-file", "configs/pretrain/quickstart.yaml", "NOT.A.KEY", "1"],
     ["NOT.A.KEY (on the command line) is not a config key", "pretrain/config.py"]),
    ("eval_knn", ["--config-file", "configs/eval/knn_imagenet.yaml", "KNN.KK", "10", "--num-gpus", "2"],
     ["did you mean KNN.K?", "transfer/config.py"]),
    ("train_net", ["--config-file", "configs/detection/quick_schedules/voc_r18_C4_instant_test.yaml", "SOLVER.MAX_ITR",
                   "1"], ["did you mean SOLVER.MAX_ITER?", "transfer/d2/config.py"]),
    ("eval_linear", ["--config-file", "{tmp}/bad.yaml", "OUTPUT_DIR", "{tmp}/out"],
     ["DATA.TRAIN_DIRR (set in {tmp}/bad.yaml or a _BASE_ file it inherits) is not a config key (did you mean "
      "DATA.TRAIN_DIR?)", "transfer/config.py"]),
    # refused by transfer.d2.train.main before launch_main: the tool's own user_errors
    pytest.param("train_net", ["--config-file", "configs/detection/quick_schedules/voc_r18_C4_instant_test.yaml",
                               "--num-gpus", "2"], ["--num-gpus 2 needs CUDA devices"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, --num-gpus 2 is allowed")),
])
def test_config_mistakes_end_in_one_error_line(tool, argv, expect, tmp_path):
    (tmp_path / "bad.yaml").write_text("_BASE_: " + str(ROOT / "configs/eval/quick_linear.yaml") +
                                       "\nDATA:\n  TRAIN_DIRR: x\n")
    proc = _run(f"tools/{tool}.py", *[a.format(tmp=tmp_path) for a in argv])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(e.format(tmp=tmp_path) in lines[0] for e in expect), lines[0]
    assert not (tmp_path / "out").exists()


def test_config_error_classes_name_the_key():
    from pretrain.cfgnode import ConfigError, UnknownKeyError
    from pretrain.config import setup_cfg
    from transfer.config import setup_eval_cfg

    with pytest.raises(UnknownKeyError, match=r"SOLVER\.EPOCH \(on the command line\) is not a config key \(did you "
                                              r"mean SOLVER\.EPOCHS or SOLVER\.WARMUP_EPOCHS\?\)"):
        setup_cfg("", ["SOLVER.EPOCH", "3"])
    with pytest.raises(UnknownKeyError, match=r"SOLVER\.EPOCHS\.X \(on the command line\) is not a config key"):
        setup_cfg("", ["SOLVER.EPOCHS.X", "3"])  # yacs itself fails with a TypeError here
    with pytest.raises(UnknownKeyError, match=r"SOLVER \(on the command line\) is a group of keys, not a key: set "
                                              r"one of SOLVER\.EPOCHS, "):
        setup_eval_cfg("", ["SOLVER", "3"])
    with pytest.raises(ConfigError, match=r"SOLVER\.EPOCHS abc \(on the command line\): the key takes a value of "
                                          r"type int \(default 100\), got a str"):
        setup_eval_cfg("", ["SOLVER.EPOCHS", "abc"])
    with pytest.raises(ValueError, match=r"SOLVER\.EPOCHS 0 is out of range"):  # a ConfigError is a ValueError
        setup_eval_cfg("", ["SOLVER.EPOCHS", "0"])


def test_config_file_mistakes_name_the_file(tmp_path):
    from pretrain.cfgnode import ConfigError, UnknownKeyError
    from pretrain.config import setup_cfg

    (tmp_path / "unknown.yaml").write_text("SOLVER:\n  EPOCHZ: 3\n")
    with pytest.raises(UnknownKeyError, match=rf"SOLVER\.EPOCHZ \(set in {tmp_path}/unknown\.yaml or a _BASE_ file"):
        setup_cfg(str(tmp_path / "unknown.yaml"))
    (tmp_path / "type.yaml").write_text("SOLVER:\n  EPOCHS: many\n")
    with pytest.raises(ConfigError, match=rf"SOLVER\.EPOCHS many \(set in {tmp_path}/type\.yaml .*type int"):
        setup_cfg(str(tmp_path / "type.yaml"))


def _raise_in_library():
    import json

    json.loads("{")  # a ValueError raised by a raise statement, but in a library


def test_user_errors_are_told_from_bugs():
    from pretrain.backbones import build_backbone
    from pretrain.cfgnode import ConfigError
    from pretrain.distributed import launch

    def caught(fn):
        try:
            fn()
        except Exception as e:  # what the CLI would see
            return e
        raise AssertionError("no exception")

    assert user_error_message(ConfigError("SOLVER.EPOCHS 0 is out of range")) == "SOLVER.EPOCHS 0 is out of range"
    assert user_error_message(FileNotFoundError("config file 'x.yaml' does not exist")) == \
        "config file 'x.yaml' does not exist"
    # a refusal raised by the project's code: a plain ValueError / a KeyError (shown unquoted)
    assert "--dist-url must be 'auto' or tcp://HOST:PORT" in user_error_message(
        caught(lambda: launch(print, 2, 1, 0, "bogus")))
    assert user_error_message(caught(lambda: build_backbone("resnet19"))).startswith("unknown backbone 'resnet19'")
    # bugs: an exception from a library, from an expression of ours, an assert, a raise outside the project
    assert user_error_message(caught(_raise_in_library)) is None
    assert user_error_message(caught(lambda: int("x"))) is None
    assert user_error_message(caught(lambda: {}["key"])) is None
    assert user_error_message(AssertionError("invariant")) is None

    def ours():
        raise ValueError("raised by a test, not by the project")
    assert user_error_message(caught(ours)) is None


# ---------------------------------------------------------------------------------------------------------------
# launch_main: one place for all of it


def _args(*argv):
    return _tool("pretrain").build_parser().parse_args(list(argv))


def _failing_run(out: Path, exc: BaseException, *files):
    def run(args):
        for name in files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("x")
        raise exc
    return run


def test_a_failed_run_says_its_output_dir_holds_nothing_to_keep(tmp_path, capsys):
    from pretrain.launch import launch_main

    out = tmp_path / "run"
    out.mkdir()
    check = lambda a: types.SimpleNamespace(OUTPUT_DIR=str(out))  # noqa: E731
    run = _failing_run(out, FileNotFoundError("dataset folder '/data' does not exist"), "config.yaml", "log.txt")
    with pytest.raises(SystemExit) as e:
        launch_main(run, _args(), "pretrain", check)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: dataset folder '/data' does not exist",
        f"OUTPUT_DIR {out} holds only config.yaml, log.txt of this failed run, no checkpoint or result: fix the "
        f"cause and rerun (the folder is reused), or delete it"]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "log.txt"]  # nothing deleted

    # a bug keeps its traceback, with the same note
    with pytest.raises(ZeroDivisionError) as e:
        launch_main(_failing_run(out, ZeroDivisionError("a bug"), "tb/events.out.tfevents.1"), _args(), "pretrain",
                    check)
    assert e.value.__notes__ == [f"OUTPUT_DIR {out} holds only config.yaml, log.txt, tb/events.out.tfevents.1 of "
                                 f"this failed run, no checkpoint or result: fix the cause and rerun (the folder is "
                                 f"reused), or delete it"]

    # once a checkpoint is there, there is nothing to say about the folder
    with pytest.raises(SystemExit):
        launch_main(_failing_run(out, FileNotFoundError("gone"), "checkpoints/model_0000010.pth"), _args(),
                    "pretrain", check)
    assert capsys.readouterr().err.splitlines() == ["error: gone"]


def test_failed_output_note_counts_only_bookkeeping(tmp_path):
    assert failed_output_note(str(tmp_path / "missing")) is None
    (tmp_path / ".lock").write_text("{}")
    assert "holds nothing but the lock file of this failed run" in failed_output_note(str(tmp_path))
    for name in ("log.txt", "log.rank1.txt", "log.txt.rank1", "metrics.jsonl", "metrics.json", "config.yaml"):
        (tmp_path / name).write_text("")
    assert "holds only config.yaml, log.rank1.txt, log.txt, log.txt.rank1, metrics.json, metrics.jsonl of" in \
        failed_output_note(str(tmp_path))
    for result in ("results.json", "export/resnet18.pth", "model_final.pth", "tsne.png"):
        (tmp_path / result).parent.mkdir(exist_ok=True)
        (tmp_path / result).write_text("")
        assert failed_output_note(str(tmp_path)) is None
        (tmp_path / result).unlink()


def test_a_config_error_stops_before_the_run(capsys):
    from pretrain.config import setup_cfg
    from pretrain.launch import launch_main

    def run(args):
        raise AssertionError("must not run")

    with pytest.raises(SystemExit) as e:
        launch_main(run, _args("SOLVER.EPOCHS", "0"), "pretrain", lambda a: setup_cfg(a.config_file, a.opts))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: SOLVER.EPOCHS 0 is out of range: must be >= 1"]


def _missing_data(args):
    raise FileNotFoundError(f"dataset folder {args.opts[1]!r} does not exist")


def test_local_processes_report_a_user_error_once(tmp_path, capfd, monkeypatch):
    """--num-gpus 2: both processes fail the same way; one error line, the note, exit status 2."""
    from pretrain.launch import launch_main

    monkeypatch.setenv("MASTER_ADDR", "")  # launch() exports them; restored after the test
    monkeypatch.setenv("MASTER_PORT", "")
    (tmp_path / "log.txt").write_text("")
    with pytest.raises(SystemExit) as e:
        launch_main(_missing_data, _args("DATA.TRAIN_DIR", "/nowhere", "--num-gpus", "2", "--dist-url", "auto"),
                    "pretrain", lambda a: types.SimpleNamespace(OUTPUT_DIR=str(tmp_path)))
    assert e.value.code == 2
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: dataset folder '/nowhere' does not exist"]
    assert f"OUTPUT_DIR {tmp_path} holds only log.txt of this failed run" in err and "Traceback" not in err
