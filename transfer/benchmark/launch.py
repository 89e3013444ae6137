"""Running the stage graph: here, one stage after another in dependency order (each in its own process), or on SLURM,
each stage its own submitit job with ``afterok`` dependencies on the stages it needs.

Both are resumable: a stage that is done (its results.json complete) is not run again, and a stage that was
interrupted continues from its own folder. A stage that fails is reported with its log; the stages that need it are
skipped and every other stage still runs.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

from .graph import toposort
from .stage import Stage, is_done

JOBS_FILE = "slurm_jobs.json"  # OUTPUT_DIR/slurm_jobs.json: {stage: SLURM job id} of the last submission


def _stage_process(stage: Stage, cfg, log_path: str) -> None:
    """The body of a stage's process: its output to ``log_path``, SIGTERM when the benchmark dies, the stage."""
    import traceback

    from .graph import run_stage

    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _die_with_parent()
    code = 0
    try:
        run_stage(stage, cfg)
    except SystemExit as e:  # a tool's user error (exit status 2, its error line printed)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_process(stage: Stage, cfg, log_path: str) -> int:
    """Run ``stage`` in a child process and return its exit status. The child is forked from this process, which
    has imported torch, timm and detectron2 (to build the graph) and run no tensor operation: on a small machine
    that saves the ~8 s of imports a fresh interpreter pays per stage; a crash or leak stays in the child."""
    import multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    proc = ctx.Process(target=_stage_process, args=(stage, cfg, log_path), name=f"stage {stage.name}")
    proc.start()
    proc.join()
    return proc.exitcode


def _die_with_parent() -> None:
    """In the stage's process (Linux): receive SIGTERM when the benchmark process dies, even by SIGKILL. The tools
    treat SIGTERM as a preemption: checkpoint, stop; the rerun continues from there."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def plan(stages: List[Stage], selected: List[Stage]) -> Dict[str, str]:
    """{stage: "done" | "run" | "not selected"} before anything runs."""
    chosen = {s.name for s in selected}
    return {s.name: "done" if is_done(s) else ("run" if s.name in chosen else "not selected") for s in stages}


def run_local(stages: List[Stage], selected: List[Stage], cfg, log=print) -> Dict[str, str]:
    """Run the selected stages that are not done, in dependency order, each as its own process whose output goes to
    ``<stage>/stage.log``. Returns {stage: "done", "ran", "failed", "skipped" or "not selected"}."""
    status = plan(stages, selected)
    todo = [s for s in toposort(stages) if status[s.name] == "run"]
    for i, stage in enumerate(todo, 1):
        missing = [n for n in stage.needs if status[n] not in ("done", "ran")]
        if missing and stage.kind != "report":
            status[stage.name] = "skipped"
            why = ", ".join(f"{n} ({status[n]})" for n in missing)
            log(f"[benchmark] {i}/{len(todo)} {stage.name}: skipped, it needs {why}")
            continue
        os.makedirs(stage.out, exist_ok=True)
        path = os.path.join(stage.out, "stage.log")
        log(f"[benchmark] {i}/{len(todo)} {stage.name} ... (log: {path})")
        t0 = time.perf_counter()
        with open(path, "a") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage.command()}\n")
            f.flush()
        rc = run_process(stage, cfg, path)
        seconds = time.perf_counter() - t0
        if rc == 0 and (stage.kind == "report" or is_done(stage)):
            status[stage.name] = "ran"
            log(f"[benchmark] {i}/{len(todo)} {stage.name}: done in {seconds:.1f} s")
        else:
            status[stage.name] = "failed"
            why = f"exit status {rc}" if rc else "it stopped before writing its results (rerun to continue)"
            log(f"[benchmark] {i}/{len(todo)} {stage.name}: FAILED ({why}) after {seconds:.1f} s; log: {path}\n"
                + _tail(path))
    return status


def failures(status: Dict[str, str], stages: List[Stage]) -> List[str]:
    return [s.name for s in stages if status.get(s.name) == "failed"]


# ---------------------------------------------------------------------------------------------------------------
# SLURM

def _stage_slurm_args(args: argparse.Namespace, stage: Stage) -> argparse.Namespace:
    """The SLURM flags of the command line, with the stage's own resources and log folder."""
    ns = argparse.Namespace(**vars(args))
    ns.nodes, ns.gpus_per_node, ns.timeout = stage.nodes, stage.gpus, stage.timeout
    ns.tasks_per_node = stage.gpus or 1
    ns.cpus_per_task = stage.cpus
    ns.job_dir = os.path.join(stage.out, "slurm", "%j")
    return ns


def stage_task(ns: argparse.Namespace):
    """What a stage's SLURM task runs: rebuild the graph from the benchmark config and run that stage here."""
    from .config import setup_benchmark_cfg
    from .graph import build_graph, run_stage

    cfg = setup_benchmark_cfg(ns.config_file, ns.opts)
    stage = {s.name: s for s in build_graph(cfg)}[ns.run_stage]
    return run_stage(stage, cfg, in_slurm_task=True)


def _active(job_id: str) -> bool:
    """Whether SLURM still has the job queued or running (it may start, or is being requeued)."""
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True).stdout
    return any(state in out for state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "SUSPENDED", "COMPLETING"))


def submit_graph(stages: List[Stage], selected: List[Stage], args: argparse.Namespace, output_dir: str,
                 log=print) -> Dict[str, str]:
    """Submit every selected stage that is not done as a SLURM job depending (``afterok``; the report
    ``afterany``) on the jobs of the stages it needs. A stage whose job from an earlier submission is still queued or
    running is not submitted again: its job id is reused. Returns {stage: job id}; also written to
    OUTPUT_DIR/slurm_jobs.json."""
    from pretrain.slurm import SlurmTask, submit

    path = os.path.join(output_dir, JOBS_FILE)
    previous = {}
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
    status = plan(stages, selected)
    jobs: Dict[str, str] = {}
    for stage in toposort(stages):
        if status[stage.name] != "run":
            continue
        missing = [n for n in stage.needs if n not in jobs and status[n] != "done"]
        if missing and stage.kind != "report":
            status[stage.name] = "skipped"
            log(f"[benchmark] {stage.name}: not submitted, it needs {', '.join(missing)} (not done, not selected)")
            continue
        if stage.name in previous and _active(previous[stage.name]):
            jobs[stage.name] = previous[stage.name]
            log(f"[benchmark] {stage.name}: job {jobs[stage.name]} of the earlier submission is still queued")
            continue
        deps = [jobs[n] for n in stage.needs if n in jobs]
        dependency = (f"{'afterany' if stage.kind == 'report' else 'afterok'}:{':'.join(deps)}" if deps else "")
        ns = argparse.Namespace(config_file=args.config_file, opts=list(args.opts), run_stage=stage.name)
        job = submit(stage_task, _stage_slurm_args(args, stage), name=f"bench:{stage.name}", dependency=dependency,
                     task=SlurmTask(stage_task, ns), quiet=True)
        jobs[stage.name] = job.job_id
        log(f"[benchmark] {stage.name}: job {job.job_id}{' after ' + dependency if dependency else ''} "
            f"({stage.nodes} node(s), {stage.gpus} GPU(s) each, {stage.timeout} min); logs {stage.out}/slurm/")
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({**previous, **jobs}, f, indent=1)
    return jobs


def follow_graph(jobs: Dict[str, str], stages: List[Stage], poll_s: float = 2.0, log=print) -> Dict[str, str]:
    """Wait for every job of ``jobs`` to end, printing each state change; {stage: final SLURM state}."""
    import submitit

    by_name = {s.name: s for s in stages}
    handles = {n: submitit.SlurmJob(folder=os.path.join(by_name[n].out, "slurm", "%j"), job_id=j)
               for n, j in jobs.items()}
    shown: Dict[str, str] = {}
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
             "DEADLINE")
    while True:
        for name, job in handles.items():
            state = job.state
            if shown.get(name) != state and state != "UNKNOWN":  # UNKNOWN: not yet in SLURM's accounting
                shown[name] = state
                log(f"[benchmark] {name} (job {job.job_id}): {state}")
        if all(shown.get(n, "").split()[0] in ended for n in handles if shown.get(n)) and len(shown) == len(handles):
            break
        time.sleep(poll_s)
    return {n: shown[n].split()[0] for n in handles}
