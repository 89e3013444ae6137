"""The stage graph of a benchmark and how one stage runs (locally or as a SLURM task).

    data (synthetic only) -> <run>/pretrain -> <run>/export -> <run>/{knn, linear, semi_1pct, semi_10pct, cifar10,
                                                                       cifar100, tsne}
                                                            -> <run>/convert -> <run>/{voc, coco}
    every stage -> report

A stage runs a launcher tool of the project in-process (``tools/pretrain.py``, ``eval_knn.py``, ``eval_linear.py``,
``tsne.py``, ``train_net.py``: the same argument parser and run function, so the command a stage prints is exactly
what it runs) or one of the benchmark's own steps (``data``, ``export``, ``convert``, ``report``). A stage is done
when ``<stage>/results.json`` is complete: it parses and holds the stage's result keys (the tools write it last);
``stage.json`` beside it records the wall time. Every tool continues from its own OUTPUT_DIR, so a stage that was
interrupted resumes where it stopped when it runs again.
"""
import argparse
import os
import socket
import time
from typing import Callable, Dict, List, Optional

from pretrain.cfgnode import ConfigError

from .config import PROTOCOLS, Run, builtin_values, expand_runs, resolve
from .stage import DETECTION_STAGES, Stage, is_done, read_results, write_json

LAUNCHER_TOOLS = {  # tool: (module with its run(args), module:function(args) that builds and checks its config)
    "pretrain": ("pretrain.launch", "transfer.benchmark.graph:_pretrain_cfg"),
    "eval_knn": ("transfer.knn", "transfer.benchmark.graph:_eval_cfg"),
    "eval_linear": ("transfer.linear", "transfer.benchmark.graph:_eval_cfg"),
    "tsne": ("transfer.tsne", "transfer.benchmark.graph:_eval_cfg"),
    "train_net": ("transfer.d2.train", "transfer.d2.train:load_cfg"),
}


def _pretrain_cfg(args):
    from pretrain.config import setup_cfg

    return setup_cfg(args.config_file, args.opts)


def _eval_cfg(args):
    from transfer.config import setup_eval_cfg

    return setup_eval_cfg(args.config_file, args.opts)
def _quiet_pretrain_cfg(path: str, opts):
    """The merged pretraining config without its checks (a teacher export may not exist yet): arch, batch, ..."""
    from pretrain.cfgnode import merge_and_freeze
    from pretrain.config import get_cfg

    if not os.path.isfile(path):
        raise ConfigError(f"pretraining config {path!r} does not exist")
    return merge_and_freeze(get_cfg(), path, opts, lambda c: None)


def data_paths(cfg) -> Dict[str, str]:
    """Where every protocol reads its data: DATA.* or, with DATA.SYNTHETIC.ENABLED, OUTPUT_DIR/data/*."""
    if not cfg.DATA.SYNTHETIC.ENABLED:
        return {k: cfg.DATA[k] for k in ("TRAIN_DIR", "VAL_DIR", "SUBSET_1PCT", "SUBSET_10PCT", "CIFAR10", "CIFAR100",
                                         "DETECTRON2_DATASETS")}
    d = os.path.join(os.path.abspath(cfg.OUTPUT_DIR), "data")
    return {"TRAIN_DIR": os.path.join(d, "imagenet", "train"), "VAL_DIR": os.path.join(d, "imagenet", "val"),
            "SUBSET_1PCT": os.path.join(d, "subsets", "1percent.txt"),
            "SUBSET_10PCT": os.path.join(d, "subsets", "10percent.txt"),
            "CIFAR10": os.path.join(d, "cifar10"), "CIFAR100": os.path.join(d, "cifar100"),
            "DETECTRON2_DATASETS": os.path.join(d, "detection")}


def _pairs(**kv) -> List[str]:
    """KEY VALUE overrides for the values that are set."""
    out = []
    for k, v in kv.items():
        if v not in ("", None):
            out += [k.replace("__", "."), str(v)]
    return out


def build_graph(cfg) -> List[Stage]:
    """Every stage of the benchmark ``cfg`` in an order that runs each after the stages it needs. Fails (ConfigError
    naming the run) on a pretraining config that does not exist, a TEACHER that is neither a run nor a file, ..."""
    out = os.path.abspath(cfg.OUTPUT_DIR)
    paths = data_paths(cfg)
    synthetic = bool(cfg.DATA.SYNTHETIC.ENABLED)
    stages: List[Stage] = []
    base = ["data"] if synthetic else []
    if synthetic:
        stages.append(Stage("data", "data", os.path.join(out, "data"), cpus=cfg.PRETRAIN.CPUS,
                            info={"what": "write the synthetic datasets", "paths": paths}))
    runs = expand_runs(cfg)
    from .paper import load_paper_numbers, paper_cells

    numbers = load_paper_numbers()
    for run in runs:
        try:
            paper_cells(run.paper, numbers)
        except ValueError as e:
            raise ConfigError(f"run {run.name}: PAPER: {e} (transfer/benchmark/paper_numbers.yaml)") from None
    archs: Dict[str, str] = {}
    exports: Dict[str, str] = {}
    for run in runs:
        rdir = os.path.join(out, run.name)
        if run.pretrain:
            teacher_opts, needs = [], list(base)
            if run.teacher.startswith("run:"):
                parent = run.teacher[4:]
                if parent not in exports:
                    raise ConfigError(f"run {run.name}: its TEACHER run {parent} must come before it in RUNS")
                teacher_opts = ["MODEL.TEACHER.WEIGHTS", exports[parent], "MODEL.TEACHER.ARCH", archs[parent]]
                needs.append(f"{parent}/export")
            elif run.teacher:
                teacher_opts = ["MODEL.TEACHER.WEIGHTS", run.teacher]
            opts = ["OUTPUT_DIR", os.path.join(rdir, "pretrain"),
                    *_pairs(DATA__TRAIN_DIR=paths["TRAIN_DIR"], DATA__VAL_DIR=paths["VAL_DIR"]),
                    *teacher_opts, *run.opts, *map(str, cfg.PRETRAIN.OPTS)]
            config = resolve(run.pretrain)
            pcfg = _quiet_pretrain_cfg(config, opts)
            arch = pcfg.MODEL.STUDENT.ARCH
            stages.append(Stage(f"{run.name}/pretrain", "pretrain", os.path.join(rdir, "pretrain"), run, "pretrain",
                                ["--config-file", config, *opts], needs, cfg.PRETRAIN.GPUS, cfg.PRETRAIN.NODES,
                                cfg.PRETRAIN.TIMEOUT, cfg.PRETRAIN.CPUS,
                                info={"arch": arch, "images_per_iter": pcfg.SOLVER.IMS_PER_BATCH}))
            source, export_needs = os.path.join(rdir, "pretrain", "export", f"{arch}.pth"), [f"{run.name}/pretrain"]
        else:
            source, export_needs = os.path.abspath(resolve(run.weights)), list(base)
            arch = run.arch or _arch_of(source, run)
        archs[run.name] = arch
        exports[run.name] = source
        stages.append(Stage(f"{run.name}/export", "export", os.path.join(rdir, "export"), run, needs=export_needs,
                            cpus=2, timeout=30, info={"what": f"check {source} loads (timm for our exports)",
                                                      "source": source, "arch": run.arch}))
        if run.evaluate:
            stages += _protocol_stages(cfg, run, rdir, source, arch, paths, synthetic)
    stages.append(Stage("report", "report", out, needs=[s.name for s in stages], cpus=2, timeout=30,
                        info={"what": "results.md, results.json and plots"}))
    return stages


def _arch_of(path: str, run: Run) -> str:
    from pretrain.formats import read_backbone

    if not os.path.isfile(path):
        raise ConfigError(f"run {run.name}: WEIGHTS {path!r} does not exist")
    return read_backbone(path, None, f"run {run.name} WEIGHTS").arch


def _protocol_stages(cfg, run: Run, rdir: str, export: str, arch: str, paths: dict, synthetic: bool) -> List[Stage]:
    stages = []
    values = {**run.values, **builtin_values(arch)}
    weights = ["MODEL.WEIGHTS", export, *(["MODEL.ARCH", run.arch] if run.arch else [])]
    image_data = _pairs(DATA__TRAIN_DIR=paths["TRAIN_DIR"], DATA__VAL_DIR=paths["VAL_DIR"])
    data_opts = {"knn": image_data, "linear": image_data, "tsne": image_data,
                 "semi_1pct": image_data + _pairs(DATA__SUBSET_FILE=paths["SUBSET_1PCT"]),
                 "semi_10pct": image_data + _pairs(DATA__SUBSET_FILE=paths["SUBSET_10PCT"]),
                 "cifar10": _pairs(DATA__ROOT=paths["CIFAR10"]), "cifar100": _pairs(DATA__ROOT=paths["CIFAR100"])}
    convert_name = f"{run.name}/convert"
    detection = [p for p in DETECTION_STAGES if cfg[p.upper()].ENABLED]
    for proto, (tool, _, _, _) in PROTOCOLS.items():
        node, kind = cfg[proto], proto.lower()
        if not node.ENABLED:
            continue
        sout = os.path.join(rdir, kind)
        config = resolve(run.fill(node.CONFIG, values))
        proto_opts = [run.fill(str(o), values) for o in node.OPTS]
        needs = [f"{run.name}/export"]
        env = {}
        if kind in DETECTION_STAGES:
            if convert_name not in [s.name for s in stages]:  # one conversion serves VOC and COCO
                first = cfg[detection[0].upper()]
                stages.append(Stage(convert_name, "convert", os.path.join(rdir, "convert"), run, needs=needs,
                                     cpus=2, timeout=30,
                                     info={"what": f"tools/convert_to_d2.py {export} -> model.pkl",
                                           "source": export, "arch": arch,
                                           "config": resolve(run.fill(first.CONFIG, values)),
                                           "opts": [run.fill(str(o), values) for o in first.OPTS]}))
            argv = ["--config-file", config, "--resume", "MODEL.WEIGHTS", os.path.join(rdir, "convert", "model.pkl"),
                    "OUTPUT_DIR", sout,
                    *(_pairs(DATASETS__SYNTHETIC_ROOT=paths["DETECTRON2_DATASETS"]) if synthetic else []),
                    *proto_opts]
            if paths["DETECTRON2_DATASETS"] and not synthetic:
                env["DETECTRON2_DATASETS"] = paths["DETECTRON2_DATASETS"]
            needs = [convert_name]
        else:
            argv = ["--config-file", config, "OUTPUT_DIR", sout, *weights, *data_opts[kind], *proto_opts]
        stages.append(Stage(f"{run.name}/{kind}", kind, sout, run, tool, argv, needs, node.GPUS, node.NODES,
                            node.TIMEOUT, node.CPUS, env))
    return stages


def toposort(stages: List[Stage]) -> List[Stage]:
    """``stages`` with each after everything it needs (a stage naming one that does not exist is an error)."""
    by_name = {s.name: s for s in stages}
    order, state = [], {}

    def visit(s: Stage):
        if state.get(s.name) == 2:
            return
        if state.get(s.name) == 1:
            raise ConfigError(f"the stage graph has a cycle through {s.name}")
        state[s.name] = 1
        for n in s.needs:
            if n not in by_name:
                raise ConfigError(f"stage {s.name} needs {n}, which is not a stage")
            visit(by_name[n])
        state[s.name] = 2
        order.append(s)

    for s in stages:
        visit(s)
    return order


def select(stages: List[Stage], only=(), skip=()) -> List[Stage]:
    """The stages to run: those matching ``only`` (a stage name, a run name or a kind; default all) and not ``skip``,
    with every stage they need that is not done yet (and not skipped); the report always runs."""
    def match(s: Stage, words) -> bool:
        return any(w in (s.name, s.kind) or (s.run is not None and w in (s.run.name, s.run.template))
                   for w in words)

    for w in list(only) + list(skip):
        if not any(match(s, [w]) for s in stages):
            raise ConfigError(f"--only / --skip {w!r} matches no stage, run or kind; stages: "
                              f"{', '.join(s.name for s in stages[:12])}{' ...' if len(stages) > 12 else ''}")
    chosen = {s.name for s in stages if s.kind == "report" or ((not only or match(s, only)) and not match(s, skip))}
    by_name = {s.name: s for s in stages}
    todo = [n for n in chosen if by_name[n].kind != "report"]  # the report takes whatever is done
    while todo:  # and what they need that is not done yet (unless skipped): --only disco/voc pretrains first
        for need in by_name[todo.pop()].needs:
            dep = by_name[need]
            if need not in chosen and not match(dep, skip) and not is_done(dep):
                chosen.add(need)
                todo.append(need)
    return [s for s in stages if s.name in chosen]


# ---------------------------------------------------------------------------------------------------------------
# Running one stage (in this process: a local stage subprocess, or a SLURM task)

def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _tool_entry(tool: str):
    import importlib

    module, check = LAUNCHER_TOOLS[tool]
    check_module, check_fn = check.split(":")
    return importlib.import_module(module).run, getattr(importlib.import_module(check_module), check_fn)


def tool_args(stage: Stage, num_gpus: int = 1) -> argparse.Namespace:
    from pretrain.cli import argument_parser

    return argument_parser(stage.tool, "").parse_args([*stage.argv, "--num-gpus", str(num_gpus)])


def run_stage(stage: Stage, cfg, in_slurm_task: bool = False) -> Optional[dict]:
    """Do ``stage`` here. Locally a launcher tool starts its ``--num-gpus`` processes (stage.gpus, or one on a
    machine without GPUs); in a SLURM task (the distributed environment exported) its run function runs directly,
    so a preempted task raises :class:`pretrain.preemption.Preempted` and the job is requeued. Writes
    ``stage.json`` (wall time) on success; returns the stage's results (None when stopped early)."""
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S")
    os.environ.update(stage.env)
    resumed = os.path.isdir(os.path.join(stage.out, "checkpoints")) and bool(os.listdir(os.path.join(stage.out,
                                                                                                   "checkpoints")))
    if stage.tool:
        run_fn, check = _tool_entry(stage.tool)
        if in_slurm_task:
            out = run_fn(tool_args(stage))
        else:
            import torch

            from pretrain.launch import launch_main

            gpus = min(stage.gpus, torch.cuda.device_count()) or 1
            args = tool_args(stage, gpus)
            out = launch_main(run_fn, args, stage.tool, check)
        if stage.kind == "pretrain" and out and _rank() == 0:
            from pretrain.formats import read_backbone

            meta = read_backbone(out["backbone"], what="the run's export").metadata
            write_json(stage.results, {"export": out["backbone"], "head": out["head"], "arch": stage.info["arch"],
                                        "iterations": meta.get("iteration"), "epochs": meta.get("epoch"),
                                        "minutes": round((time.perf_counter() - t0) / 60, 2)})
    elif _rank() == 0:
        STEPS[stage.kind](stage, cfg)
    if _rank() != 0:
        return None
    results = read_results(stage)
    if results is None:
        return None  # stopped early (preempted, TRAIN.STOP_AT_ITER): rerunning continues
    write_json(os.path.join(stage.out, "stage.json"), {
        "stage": stage.name, "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": round(time.perf_counter() - t0, 2), "resumed": resumed, "host": socket.gethostname(),
        "slurm_job": os.environ.get("SLURM_JOB_ID", ""), "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        "command": stage.command()})
    return results


def _step_data(stage: Stage, cfg) -> None:
    from pretrain.synthetic import write_cifar, write_coco, write_imagefolder, write_subset_list, write_voc

    s, p = cfg.DATA.SYNTHETIC, stage.info["paths"]
    imagenet = os.path.dirname(p["TRAIN_DIR"])
    info = {"imagenet": write_imagefolder(imagenet, num_classes=s.NUM_CLASSES, train_per_class=s.TRAIN_PER_CLASS,
                                          val_per_class=s.VAL_PER_CLASS, image_size=s.IMAGE_SIZE, seed=0)}
    for key, percent in (("SUBSET_1PCT", 1.0), ("SUBSET_10PCT", 10.0)):
        info[key.lower()] = len(write_subset_list(imagenet, p[key], percent=percent, seed=0))
    for key in ("CIFAR10", "CIFAR100"):
        info[key.lower()] = write_cifar(p[key], variant=key.lower(), train_per_class=s.CIFAR_TRAIN_PER_CLASS,
                                        test_per_class=s.CIFAR_TEST_PER_CLASS, seed=0)
    det = p["DETECTRON2_DATASETS"]
    info["voc"] = write_voc(os.path.join(det, "VOC2007"), trainval_images=s.DET_TRAIN_IMAGES,
                            test_images=s.DET_TEST_IMAGES, image_size=64, seed=0)
    info["coco"] = write_coco(os.path.join(det, "coco"), train_images=s.DET_TRAIN_IMAGES,
                              val_images=s.DET_TEST_IMAGES, image_size=64, seed=0)
    info = {k: ({kk: vv for kk, vv in v.items() if kk not in ("seconds", "generated")} if isinstance(v, dict) else v)
            for k, v in info.items()}
    write_json(stage.results, {"paths": p, "datasets": info})


def _step_export(stage: Stage, cfg) -> None:
    """Check the run's backbone loads: our export strictly into ``timm.create_model`` (no surgery), any other
    format through the project's reader; record arch, parameters, format and method."""
    from pretrain.backbones import build_backbone, get_spec
    from pretrain.checkpoint import load_strict
    from pretrain.formats import read_backbone

    source = stage.info["source"]
    ckpt = read_backbone(source, stage.info["arch"] or None, f"{stage.name} source")
    model = build_backbone(ckpt.arch)
    load_strict(model, ckpt.state_dict, f"{stage.name} {source}")
    timm_loaded = False
    if ckpt.format == "export" and get_spec(ckpt.arch).timm_arch:
        import timm

        timm.create_model(get_spec(ckpt.arch).timm_arch, num_classes=0, checkpoint_path=source)
        timm_loaded = True
    write_json(stage.results, {"export": source, "arch": ckpt.arch, "format": ckpt.format,
                                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                                "method": ckpt.metadata.get("method", ""), "head": ckpt.metadata.get("head"),
                                "loads_in_timm": timm_loaded})


def _step_convert(stage: Stage, cfg) -> None:
    from transfer.d2.weights import convert_to_d2

    pkl = os.path.join(stage.out, "model.pkl")
    os.makedirs(stage.out, exist_ok=True)
    report, conv, config = convert_to_d2(stage.info["source"], pkl, stage.info["arch"], stage.info["config"],
                                         stage.info["opts"], True)
    write_json(stage.results, {"pkl": pkl, "source": stage.info["source"], "arch": conv.arch,
                                "checked_against": config, "summary": report.summary()})


def _step_report(stage: Stage, cfg) -> None:
    from .results import write_report

    write_report(cfg, build_graph(cfg))


STEPS: Dict[str, Callable] = {"data": _step_data, "export": _step_export, "convert": _step_convert,
                              "report": _step_report}
