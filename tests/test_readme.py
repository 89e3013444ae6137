"""README.md cannot drift from the code: every command of its code blocks (and every inline `python ...`, `make ...`,
`pip ...` command) is either run here or listed in EXCUSED with the reason, and a new command that is neither fails.

The commands run at toy sizes on synthetic stand-ins, exactly as the README's section "Trying these commands on a CPU"
says: its stand-in block first, then every other command in README order, with the placeholders of its first table
replaced and the toy overrides of its second table appended -- both tables are read from the README, so what runs
here is what a user following it types. The tools run in this process (``runpy`` with a patched ``sys.argv``, as
tests/test_methods.py does: importing torch / timm / detectron2 once instead of once per command), from an empty
folder that links ``configs/``, so nothing is written into the checkout. ``--slurm`` commands run in their own test
when a SLURM answers (tools/local_slurm.sh start; CI starts one)."""
import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import traceback

import pytest
import torch

from pretrain.slurm import slurm_answers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SECTION = "## Trying these commands on a CPU"

# README commands that are not run here, as the README prints them, each with the reason and the evidence that what
# they do is covered elsewhere (file, text it must contain). A README command that is neither run nor listed here,
# or an entry here that the README no longer has, fails test_every_readme_command_is_run_or_excused.
EXCUSED = {
    "make setup": ("creates .venv and installs everything (minutes, network); CI (.ci/run) runs it on a clean clone "
                   "before `make test`", [(".ci/run", "make setup")]),
    "make demo": ("tests/test_demo.py runs tools/demo.py, the Makefile's demo recipe, end to end at a toy size",
                  [("Makefile", "tools/demo.py --output-dir $(DEMO_DIR)"), ("tests/test_demo.py", '"demo.py"')]),
    "make demo DEMO_DIR=elsewhere": ("the same recipe as `make demo` with another output folder (tests/test_demo.py "
                                     "passes its own --output-dir)", [("Makefile", "DEMO_DIR ?=")]),
    "make test": ("the test suite this file belongs to", [("Makefile", "pytest -q tests")]),
    "python -m pytest -q tests/test_readme.py": ("this file (README Timings): it would run itself", []),
    "make bench": ("the full benchmark, minutes of CPU by design; the README's `tools/bench_distill.py --quick` "
                   "runs here (toy sizes) through the same code", [("Makefile", "tools/bench_distill.py")]),
    'pip install -e ".[test,detectron2-deps]"': (
        "installs this project into the environment; `make setup` runs the same install (CI), with the optional "
        "DALI data backend added",
        [("Makefile", 'pip install --quiet -e ".[test,detectron2-deps,dali]"')]),
    "pip install --no-deps --python-version 3.10 --target TMP": (
        "describes what tools/install_detectron2.py does (TMP is its temporary folder), not a command to type",
        [("tools/install_detectron2.py", '"--python-version", "3.10"')]),
    "export DETECTRON2_DATASETS=/datasets": ("points detectron2 at real VOC / COCO; on a CPU the synthetic sets are "
                                             "named through DATASETS.SYNTHETIC_ROOT (the README's toy overrides)", []),
    "python tools/pretrain.py --slurm --partition gpu --nodes 2 --gpus-per-node 8 --cpus-per-task 10 --mem 400 "
    "--timeout 4320 [--account A] [--qos Q] [--constraint C] [--comment X] [--job-dir runs/slurm/%j] [--wait] "
    "--config-file configs/pretrain/disco/r50_r18.yaml OUTPUT_DIR runs/disco_r50_r18 MODEL.TEACHER.WEIGHTS ...": (
        "a synopsis ([optional] flags, two 8-GPU nodes); tests/test_slurm.py submits tools/pretrain.py --slurm (two "
        "gloo tasks: completion, preemption + requeue, crash, kill -9) when a SLURM answers",
        [("tests/test_slurm.py", '"pretrain.py"), "--slurm"')]),
    "tools/local_slurm.sh install": ("installs Debian's SLURM with apt as root; .ci/run runs it",
                                     [(".ci/run", "tools/local_slurm.sh install")]),
    "tools/local_slurm.sh start": ("starts the SLURM daemons as root; .ci/run runs it (the --slurm tests skip "
                                   "without it)", [(".ci/run", "tools/local_slurm.sh start")]),
    "python tools/pretrain.py --config-file configs/pretrain/dino_disco/vits16_vit_tiny.yaml --num-gpus 8 "
    "MODEL.TEACHER.WEIGHTS /path/to/dino_deitsmall16_pretrain_full_checkpoint.pth DATA.TRAIN_DIR ... "
    "DATA.VAL_DIR ... OUTPUT_DIR runs/dino_disco_vits16_vit_tiny": (
        "needs a DINO ViT-S training checkpoint with its head, which nothing here can stand in for without a DINO "
        "run of its own; tests/test_dino.py trains DINO + DisCo through the Trainer from a DINO training checkpoint "
        "in main_dino.py's layout (and from a backbone-only file), and test_config.py loads this config",
        [("tests/test_dino.py", "def test_dino_plus_disco_distils_the_chosen_embedding")]),
    "python tools/compare_distillers.py --output-dir runs/study13/swav --teacher "
    "runs/study/teacher/export/convnet_small.pth --seeds 0 1 2 --methods swav swav_disco": (
        "six SwAV pretraining runs of the demo's size (54 minutes, docs/study.md); tests/test_compare_distillers.py "
        "runs the same tool through its command line at toy size, and tests/test_swav.py trains both configs' "
        "testbed and distiller through tools/pretrain.py",
        [("tests/test_compare_distillers.py", '"compare_distillers.py"'),
         ("tests/test_swav.py", "def test_swav_trains_through_the_cli_and_exports_for_timm")]),
    "python tools/compare_distillers.py --output-dir runs/compare LOSS.DISCO.WEIGHT 32 --seeds 0 1 2": (
        "24 pretraining runs (87 minutes, README); tests/test_compare_distillers.py runs the same tool through its "
        "command line at toy size (three rows, one seed, a tiny teacher)",
        [("tests/test_compare_distillers.py", '"compare_distillers.py"')]),
    "python tools/benchmark.py --config-file configs/benchmark/quickstart.yaml": (
        "the whole graph at full quickstart size (minutes, README); tests/test_benchmark.py runs this config through "
        "the same command line end to end at toy size, and again to show that nothing reruns",
        [("tests/test_benchmark.py", 'BENCH / "quickstart.yaml", "OUTPUT_DIR", out, *TOY')]),
    "python tools/benchmark.py --config-file configs/benchmark/table1_r50.yaml --slurm --partition gpu --wait": (
        "ten ImageNet pretrainings on a GPU partition; tests/test_benchmark.py submits a benchmark graph to the local "
        "SLURM with --slurm --wait and checks the afterok order in sacct",
        [("tests/test_benchmark.py", '"--slurm", "--wait"')]),
    "python tools/benchmark.py --config-file configs/benchmark/quickstart.yaml --only disco --skip coco": (
        "the quickstart graph again, in part; tests/test_benchmark.py checks --only / --skip selection (with the "
        "stages they need) on this config and runs the tool with --only",
        [("tests/test_benchmark.py", '["mocov2"], ["coco", "mocov2/voc"]'), ("tests/test_benchmark.py", '"--only"')]),
    "python tools/make_data.py imagefolder OUT": (
        "a synopsis in prose; the CPU section's stand-in block runs `make_data.py imagefolder` with real arguments",
        [("README.md", "python tools/make_data.py imagefolder datasets_synth/")]),
}


# ----------------------------------------------------------------------------------------------- reading the README
def _norm(cmd: str) -> str:
    return " ".join(cmd.split())


def _strip_comment(line: str) -> str:
    """The line up to a shell comment (a # outside quotes that starts a word)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def code_blocks(text: str):
    """(offset, language, body) of every fenced code block; the body dedented by the fence's indent."""
    for m in re.finditer(r"^([ \t]*)```(\w*)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", text, re.M | re.S):
        indent = m.group(1)
        body = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in m.group(3).splitlines())
        yield m.start(), m.group(2), body


def logical_lines(body: str):
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    out, cur = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cmd = _norm(_strip_comment(cur + line))
        cur = ""
        if cmd:
            out.append(cmd)
    return out


def readme_commands(text: str):
    """[(offset, kind, command)]: every command of the bash blocks ("block") and every inline command ("inline":
    a code span outside blocks that starts with `python `, `make `, `pip ` or is `tools/<x>.sh ARG`), README order."""
    cmds, masked = [], text
    for off, lang, body in code_blocks(text):
        if lang in ("bash", "sh", "shell"):
            cmds += [(off + i, "block", c) for i, c in enumerate(logical_lines(body))]  # (a block is > i chars)
    for m in re.finditer(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", text, re.M | re.S):
        masked = masked[:m.start()] + " " * (m.end() - m.start()) + masked[m.end():]
    for m in re.finditer(r"`([^`\n]+)`", masked):
        span = m.group(1).strip()
        if re.match(r"(python3? |make |pip )", span) or re.match(r"tools/\S+\.sh \S", span):
            cmds.append((m.start(), "inline", _norm(span)))
    return sorted(cmds)


def _section(text: str) -> str:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end >= 0 else len(text)]


def _table(section: str, first_header: str):
    """Rows (list of cells) of the markdown table whose first header cell is ``first_header``."""
    lines = section.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("|") and
             ln.strip("|").split("|")[0].strip() == first_header)
    rows = []
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def _spans(cell: str):
    return re.findall(r"`([^`]+)`", cell)


def cpu_tables(text: str):
    """(placeholders [(placeholder, replacement)], toy [(patterns, overrides)], stand-in commands) of the section."""
    section = _section(text)
    subs = []
    for row in _table(section, "in the commands"):
        (ph,), (rep,) = _spans(row[0]), _spans(row[1])
        subs.append((ph, rep))
    toy = [(_spans(row[0]), _spans(row[1])[0]) for row in _table(section, "commands containing")]
    standins = next(logical_lines(body) for _, lang, body in code_blocks(section) if lang == "bash")
    return subs, toy, standins


def apply_tables(cmd: str, subs, toy) -> str:
    """What a user types on a CPU for the README command ``cmd``: placeholders replaced (as whole words, in table
    order), then the toy overrides of every row whose pattern the command contains, appended in table order."""
    for ph, rep in subs:
        cmd = re.sub(r"(?<![\w./-])" + re.escape(ph) + r"(?![\w./-])", lambda _m: rep, cmd)
    extra = [over for patterns, over in toy if any(p in cmd for p in patterns)]
    return _norm(" ".join([cmd, *extra]))


def plan(text: str):
    """(local, slurm, excused, unhandled): the commands to run here / on SLURM, as (README command, command to type),
    in the order of the README's CPU section: its stand-in block first, then the README from the top."""
    subs, toy, standins = cpu_tables(text)
    ordered = list(dict.fromkeys(standins + [c for _, _, c in readme_commands(text)]))  # each distinct command once
    excused = {_norm(k) for k in EXCUSED}
    local, slurm, skipped, unhandled = [], [], [], []
    for cmd in ordered:
        if cmd in excused:
            skipped.append(cmd)
            continue
        argv = shlex.split(cmd)
        if len(argv) >= 2 and argv[0] == "python" and re.fullmatch(r"tools/\w+\.py", argv[1]):
            (slurm if "--slurm" in argv else local).append((cmd, apply_tables(cmd, subs, toy)))
        else:
            unhandled.append(cmd)
    return local, slurm, skipped, unhandled


# ----------------------------------------------------------------------------------------------------- running them
def _as_in_a_fresh_process() -> None:
    """Forget what an earlier command registered in this process and a fresh one would not know: the synthetic
    detection sets (tools/train_net.py checks NUM_CLASSES against registered sets before registering its own
    DATASETS.SYNTHETIC_ROOT, so another root's sets of the same name must not linger)."""
    if "detectron2.data" in sys.modules:
        from detectron2.data import DatasetCatalog, MetadataCatalog

        for name in [n for n in DatasetCatalog.list() if n.startswith("shapes_")]:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def run_tool(typed: str):
    """Run ``python tools/X.py ARGS`` in this process (cwd is the caller's). Returns (ok, seconds, output)."""
    _as_in_a_fresh_process()
    argv = shlex.split(typed)
    script = os.path.join(ROOT, argv[1])
    buf = io.StringIO()
    old_argv, ok, t0 = sys.argv, True, time.time()
    sys.argv = [script, *argv[2:]]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:  # the tools' sys.exit(main()) / argparse errors
                if e.code not in (None, 0):
                    ok = False
                    print(f"SystemExit: {e.code}")
            except BaseException:  # noqa: B902  (report any failure of a command, keep running the others)
                ok = False
                traceback.print_exc(file=buf)
    finally:
        sys.argv = old_argv
    return ok, time.time() - t0, buf.getvalue()


def _workspace(path):
    os.makedirs(path, exist_ok=True)
    os.symlink(os.path.join(ROOT, "configs"), os.path.join(path, "configs"))
    return path


def _report(results) -> str:
    lines = []
    for typed, ok, dt, out in results:
        lines.append(f"{'ok  ' if ok else 'FAIL'} {dt:6.1f} s  {typed}")
    fails = [(t, out) for t, ok, _, out in results if not ok]
    for typed, out in fails:
        lines += ["", f"=== FAILED: {typed}", *out.strip().splitlines()[-30:]]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def readme_text():
    with open(README) as f:
        return f.read()


@contextlib.contextmanager
def _one_thread_in(work):
    """cwd ``work``; one intra-op thread here and OMP_NUM_THREADS=1 for the processes the commands start (the
    benchmark's variants, SLURM jobs): at toy sizes, 2 OpenMP threads on a small shared CPU are several times slower
    than 1 (the README says so next to the tables)."""
    cwd, threads, omp = os.getcwd(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.chdir(work)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, readme_text):
    """Runs every local README command once, in README order, in one workspace; [(typed, ok, seconds, output)]."""
    local, _, _, _ = plan(readme_text)
    work = _workspace(str(tmp_path_factory.mktemp("readme") / "try"))
    results = []
    with _one_thread_in(work):
        for _, typed in local:
            ok, dt, out = run_tool(typed)
            results.append((typed, ok, dt, out))
    print("\n" + _report(results))
    return work, results


# ---------------------------------------------------------------------------------------------------------- tests
def test_every_readme_command_is_run_or_excused(readme_text):
    local, slurm, skipped, unhandled = plan(readme_text)
    assert not unhandled, ("README commands that this test neither runs nor excuses (run them as `python tools/...`, "
                           f"or add them to EXCUSED with the reason): {unhandled}")
    present = {c for _, _, c in readme_commands(readme_text)}
    stale = [k for k in EXCUSED if _norm(k) not in present]
    assert not stale, f"EXCUSED lists commands the README no longer has: {stale}"
    for cmd, (reason, evidence) in EXCUSED.items():
        assert reason
        for path, needle in evidence:
            with open(os.path.join(ROOT, path)) as f:
                assert needle in f.read(), f"excuse of {cmd!r}: {path} no longer contains {needle!r}"
    assert len(local) >= 30 and slurm, (len(local), slurm)
    tools = {shlex.split(c)[1] for c, _ in local}
    for tool in ("tools/make_data.py", "tools/pretrain.py", "tools/convert_to_d2.py", "tools/train_net.py",
                 "tools/eval_linear.py", "tools/eval_knn.py", "tools/tsne.py", "tools/plot_curves.py",
                 "tools/export.py"):
        assert tool in tools, f"no README command runs {tool}"


def test_the_readme_example_is_what_the_tables_give(readme_text):
    """The worked example of the CPU section is exactly what the tables make of the Pretraining command."""
    subs, toy, _ = cpu_tables(readme_text)
    example = next(logical_lines(body) for _, lang, body in code_blocks(_section(readme_text)) if lang == "text")
    pretraining = next(c for _, _, c in readme_commands(readme_text)
                       if c.startswith("python tools/pretrain.py --config-file configs/pretrain/disco/r50_r18.yaml"))
    assert shlex.split(example[0]) == shlex.split(apply_tables(pretraining, subs, toy))


# What some README commands must have written (beyond exiting with status 0), relative to the folder they ran in.
OUTPUTS = ("runs/disco_r50_r18/export/resnet18.pth", "runs/disco_r50_r18/export_5000/resnet18.pth", "r18_disco.pkl",
           "r50_moco.pkl", "runs/det/voc_r18_disco/model_final.pth", "runs/det/coco_r18_disco/model_final.pth",
           "runs/det_exp/voc_disco/model_final.pth", "runs/eval/linear_r18/results.json",
           "runs/eval/linear_effb0/results.json", "runs/eval/semi_1pct/results.json", "runs/eval/cifar10/results.json",
           "runs/eval/knn_imagenet/results.json", "runs/eval/tsne_imagenet/tsne.png", "curves.png")


@pytest.mark.slow
def test_readme_commands_run(local_run):
    work, results = local_run
    assert all(ok for _, ok, _, _ in results), _report(results)
    missing = [p for p in OUTPUTS if not os.path.exists(os.path.join(work, p))]
    assert not missing, f"README commands exited 0 but did not write {missing}"
    # every stand-in path of the placeholder table exists: the README commands made what the table says they make
    subs, _, _ = cpu_tables(open(README).read())
    for _, rep in subs:
        for word in shlex.split(rep):
            if "/" in word:
                assert os.path.exists(os.path.join(work, word)), f"the README's stand-in {word} was not made"


@pytest.mark.slow
def test_readme_commands_write_only_git_ignored_files(local_run):
    """Run from the repository root, the README's commands leave nothing that git would pick up."""
    work, _ = local_run
    if not shutil.which("git") or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("no git checkout")
    written = [n + ("/" if os.path.isdir(os.path.join(work, n)) else "") for n in sorted(os.listdir(work))
               if n != "configs"]
    proc = subprocess.run(["git", "-C", ROOT, "check-ignore", "--no-index", *written], capture_output=True, text=True)
    ignored = set(proc.stdout.split())
    assert set(written) <= ignored, f"written at the top level but not git-ignored: {sorted(set(written) - ignored)}"


@pytest.mark.slow
@pytest.mark.skipif(not slurm_answers(), reason="no local SLURM: run `tools/local_slurm.sh install && "
                                            "tools/local_slurm.sh start` as root (CI does)")
def test_readme_slurm_commands_run(local_run, readme_text):
    """The README's --slurm commands that are not synopses, submitted to the local SLURM with --wait, in the
    workspace of the local commands (their inputs: the converted weights, the synthetic sets)."""
    work, _ = local_run
    _, slurm, _, _ = plan(readme_text)
    results = []
    with _one_thread_in(work):  # sbatch passes this environment (OMP_NUM_THREADS=1) on to the job
        for _, typed in slurm:
            ok, dt, out = run_tool(typed)
            results.append((typed, ok, dt, out))
    print("\n" + _report(results))
    assert all(ok for _, ok, _, _ in results), _report(results)
