#!/usr/bin/env python
"""One command from a teacher to the paper's tables: pretrain -> export -> kNN / linear / semi 1 % and 10 % / CIFAR /
t-SNE, and -> convert_to_d2 -> VOC / COCO detection, for every run of a benchmark config, then one results table.

    python tools/benchmark.py --config-file configs/benchmark/quickstart.yaml [KEY VALUE ...]
    python tools/benchmark.py --config-file configs/benchmark/table1_r50.yaml --dry-run
    python tools/benchmark.py --config-file configs/benchmark/table1_r50.yaml --slurm --partition P [--wait]
    python tools/benchmark.py --config-file ... --only disco_r18 --skip coco

Locally the stages run one after another in dependency order, each in its own process (output in
<stage>/stage.log). With --slurm every stage is its own job (its GPUs and time limit from the benchmark config) with
afterok dependencies on the stages it needs, and the same requeue-on-preemption as every tool; --wait follows the
graph. Rerunning the same command continues: a stage whose results.json is complete is skipped, an interrupted one
resumes from its folder. A failed stage is named with its log; the stages that need it are skipped, the others run,
and the command exits with status 1. OUTPUT_DIR/results.md and results.json hold the table (ours beside the paper's
numbers) and per-stage wall time and images/s; protocols.png, hidden_dim.png and curves.png the plots.
Logic: transfer.benchmark.
"""
import os
import sys

_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.cli import HelpFormatter, LauncherParser, user_errors  # noqa: E402  (light: no torch for --help)
from pretrain.slurm import add_slurm_args  # noqa: E402


def build_parser() -> LauncherParser:
    p = LauncherParser(prog="tools/benchmark.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="a benchmark config (configs/benchmark/)")
    p.add_argument("--only", nargs="+", default=[], metavar="STAGE",
                   help="run only these stages: a stage (disco_r18/linear), a run (disco_r18), a run template "
                        "(disco) or a kind (linear); the report always runs")
    p.add_argument("--skip", nargs="+", default=[], metavar="STAGE", help="do not run these (same words as --only)")
    p.add_argument("--dry-run", action="store_true", help="print the graph, each stage's status and command; run "
                                                          "nothing")
    p.add_argument("--run-stage", default="", metavar="STAGE",
                   help="run this one stage here and now (what every stage's process or SLURM job runs)")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE",
                   help="benchmark config overrides (transfer/benchmark/config.py), e.g. PRETRAIN.OPTS "
                        "\"['SOLVER.EPOCHS', 1]\"; put them before --only / --skip, which take every word that follows")
    add_slurm_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors("benchmark"):
        from transfer.benchmark.config import setup_benchmark_cfg
        from transfer.benchmark.graph import build_graph, run_stage, select, toposort
        from transfer.benchmark.launch import failures, follow_graph, plan, run_local, submit_graph

        cfg = setup_benchmark_cfg(args.config_file, args.opts)
        stages = toposort(build_graph(cfg))
        if args.run_stage:
            by_name = {s.name: s for s in stages}
            if args.run_stage not in by_name:
                raise ValueError(f"--run-stage {args.run_stage!r} is not a stage of {args.config_file}")
            run_stage(by_name[args.run_stage], cfg)
            return 0
        selected = select(stages, args.only, args.skip)
        if args.dry_run:
            status = plan(stages, selected)
            for s in stages:
                res = f"{s.gpus} GPU(s) x {s.nodes} node(s), {s.timeout} min" if s.tool else "CPU"
                print(f"{s.name:40s} {status[s.name]:12s} needs: {', '.join(s.needs[:4]) or '-'}"
                      f"{' ...' if len(s.needs) > 4 else ''}  [{res}]\n    {s.command()}")
            print(f"{sum(v == 'run' for v in status.values())} stage(s) to run, "
                  f"{sum(v == 'done' for v in status.values())} done")
            return 0
        out = os.path.abspath(cfg.OUTPUT_DIR)
        os.makedirs(out, exist_ok=True)
        if args.slurm:
            jobs = submit_graph(stages, selected, args, out)
            if not args.wait:
                print(f"[benchmark] {len(jobs)} job(s) submitted; the report job writes {out}/results.md")
                return 0
            states = follow_graph(jobs, stages)
            failed = [n for n, state in states.items() if state not in ("COMPLETED",)]
        else:
            status = run_local(stages, selected, cfg)
            failed = failures(status, stages)
        table = os.path.join(out, "results.md")
        print(f"[benchmark] {table}")
        if os.path.isfile(table):
            with open(table) as f:
                print(f.read())
        if failed:
            print(f"error: {len(failed)} stage(s) failed: {', '.join(failed)} (their logs: <stage>/stage.log; the "
                  f"stages that need them were skipped). Fix and rerun the same command: done stages are not rerun.",
                  file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
