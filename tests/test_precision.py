"""Precision and layout chosen for the hardware (issue 16): the True / False / auto config keys, what ``auto`` resolves
to, the Trainer's resolved config.yaml and resumes, and the benchmark's peak / MFU formatting."""
import json
from pathlib import Path

import pytest
import torch

from conftest import load_tool, tiny_cfg
from pretrain import precision
from pretrain.cfgnode import CfgNode, ConfigError
from pretrain.checkpoint import Checkpointer
from pretrain.config import get_cfg, setup_cfg
from pretrain.safeload import load_torch
from pretrain.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("TRAIN.AMP.ENABLED", "TRAIN.AMP.TEACHER", "MODEL.CHANNELS_LAST")
AUTO = {k: "auto" for k in KEYS}  # tiny_cfg may pin them to False; these tests ask for auto explicitly
NO_TEACHER = ["METHOD.DISTILLERS", "[]"]


def _value(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


# ---------------------------------------------------------------------------------------------------------------- keys
def test_auto_is_the_default():
    cfg = setup_cfg("", NO_TEACHER)
    assert [_value(cfg, k) for k in KEYS] == ["auto"] * 3
    assert all(get_cfg().choices(k) == (True, False, "auto") for k in KEYS)


@pytest.mark.parametrize("typed, value", [("True", True), ("False", False), ("auto", "auto")])
@pytest.mark.parametrize("key", KEYS)
def test_command_line_takes_true_false_auto(key, typed, value):
    got = _value(setup_cfg("", NO_TEACHER + [key, typed]), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("typed, value", [("True", True), ("false", False), ("auto", "auto")])
def test_yaml_takes_true_false_auto_and_the_command_line_overrides_it(tmp_path, typed, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"TRAIN:\n  AMP:\n    ENABLED: {typed}\n    TEACHER: {typed}\nMODEL:\n  CHANNELS_LAST: {typed}\n")
    cfg = setup_cfg(str(path), NO_TEACHER)
    assert [_value(cfg, k) for k in KEYS] == [value] * 3
    # the command line after the yaml, in either direction between bool and auto
    other = "auto" if value != "auto" else "True"
    cfg = setup_cfg(str(path), NO_TEACHER + ["TRAIN.AMP.ENABLED", other])
    assert cfg.TRAIN.AMP.ENABLED == (True if other == "True" else "auto")


@pytest.mark.parametrize("bad", ["yes", "1", "0", "true", "Auto", "bf16", "[True]"])
@pytest.mark.parametrize("key", KEYS)
def test_other_values_on_the_command_line_are_refused_naming_the_key(key, bad):
    with pytest.raises(ConfigError) as e:
        setup_cfg("", NO_TEACHER + [key, bad])
    msg = str(e.value)
    assert msg.startswith(f"{key} ") and "(on the command line)" in msg
    assert msg.endswith("allowed values are True, False, auto") and "\n" not in msg


@pytest.mark.parametrize("bad", ["1", "fast", "'True'", "null"])
def test_other_values_in_a_yaml_file_are_refused_naming_key_and_file(tmp_path, bad):
    path = tmp_path / "c.yaml"
    path.write_text(f"MODEL:\n  CHANNELS_LAST: {bad}\n")
    with pytest.raises(ConfigError, match=rf"^MODEL\.CHANNELS_LAST .* \(set in {path} or a _BASE_ file it inherits\): "
                                          r"allowed values are True, False, auto$"):
        setup_cfg(str(path), NO_TEACHER)


def test_base_chain_and_direct_merge_take_the_choices(tmp_path):
    """``merge_from_file`` without setup_cfg (as test_config's shipped-configs test does) and a _BASE_ chain."""
    (tmp_path / "base.yaml").write_text("TRAIN:\n  AMP:\n    ENABLED: False\n")
    (tmp_path / "leaf.yaml").write_text("_BASE_: base.yaml\nMODEL:\n  CHANNELS_LAST: True\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(tmp_path / "leaf.yaml"))
    assert (cfg.TRAIN.AMP.ENABLED, cfg.TRAIN.AMP.TEACHER, cfg.MODEL.CHANNELS_LAST) == (False, "auto", True)


def test_a_dumped_config_loads_back(tmp_path):
    """config.yaml holds True / False: loading it as a config file gives the same values."""
    cfg = setup_cfg("", NO_TEACHER + ["TRAIN.AMP.ENABLED", "True", "MODEL.CHANNELS_LAST", "False"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    again = setup_cfg(str(path), [])
    assert (again.TRAIN.AMP.ENABLED, again.TRAIN.AMP.TEACHER, again.MODEL.CHANNELS_LAST) == (True, "auto", False)


def test_choices_survive_clone_and_do_not_touch_other_nodes():
    cfg = get_cfg().clone()
    assert cfg.choices("MODEL.CHANNELS_LAST") == (True, False, "auto")
    plain = CfgNode({"MODEL": {"CHANNELS_LAST": False}})  # e.g. the eval config: an ordinary bool key
    with pytest.raises(ConfigError, match="type bool"):
        from pretrain.cfgnode import merge_and_freeze
        merge_and_freeze(plain, "", ["MODEL.CHANNELS_LAST", "auto"], lambda c: None)


# ---------------------------------------------------------------------------------------------------- resolve_auto
def test_resolve_auto_on_this_cpu_follows_onednn_and_says_why():
    choice = precision.resolve_auto("cpu")
    native = precision.native_bf16(torch.device("cpu"))
    assert choice["amp"] is choice["teacher_amp"] is native
    assert choice["channels_last"] is torch.backends.mkldnn.is_available()
    assert choice["reason"].startswith("cpu ") and "channels_last: oneDNN" in choice["reason"]
    if not native:  # the AVX2 machines of this project
        assert "no native bf16" in choice["reason"] and "emulated" in choice["reason"]


@pytest.mark.parametrize("bf16, onednn, expected, fragments, suffix", [
    # channels_last pays on CPUs without bf16 too: 1.1-1.45x the contiguous fp32 step on this project's AVX2 CPU
    (False, True, (False, False, True), ("has no native bf16", "so fp32; channels_last"), None),
    (False, False, (False, False, False), (), "; contiguous layout"),
    (True, True, (True, True, True), ("runs bf16 natively",), None),
], ids=["no-bf16", "no-onednn", "native-bf16"])
def test_auto_on_a_cpu_follows_its_bf16_and_onednn(monkeypatch, bf16, onednn, expected, fragments, suffix):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)
    assert precision.native_bf16(torch.device("cpu")) is bf16
    choice = precision.resolve_auto(torch.device("cpu"))
    assert (choice["amp"], choice["teacher_amp"], choice["channels_last"]) == expected
    assert all(f in choice["reason"] for f in fragments)
    assert suffix is None or choice["reason"].endswith(suffix)


def test_float16_auto_on_the_cpu_is_fp32_not_an_error(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    choice = precision.resolve_auto("cpu", "float16")
    assert not choice["amp"] and "float16 needs a GPU" in choice["reason"]


def test_resolve_cfg_replaces_only_auto(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    cfg = setup_cfg("", NO_TEACHER + ["TRAIN.AMP.TEACHER", "False"])
    resolved, auto, line = precision.resolve_cfg(cfg, torch.device("cpu"))
    assert (resolved.TRAIN.AMP.ENABLED, resolved.TRAIN.AMP.TEACHER, resolved.MODEL.CHANNELS_LAST) == (True, False, True)
    assert auto == ["TRAIN.AMP.ENABLED", "MODEL.CHANNELS_LAST"] and resolved.is_frozen()
    assert cfg.TRAIN.AMP.ENABLED == "auto"  # the caller's config is left as it was
    assert line.startswith("precision: TRAIN.AMP.ENABLED True (auto), TRAIN.AMP.TEACHER False (set), "
                           "MODEL.CHANNELS_LAST True (auto), autocast dtype bfloat16; auto because cpu ")
    same, auto, line = precision.resolve_cfg(resolved, torch.device("cpu"))
    assert same is resolved and auto == [] and "auto because" not in line


# --------------------------------------------------------------------------------------------------------- trainer
def _saved_cfg(output_dir):
    state, _ = Checkpointer(str(output_dir)).load_latest()
    return CfgNode.load_cfg(state["cfg"])


def test_trainer_writes_resolved_values_and_resumes(tmp_path, imagefolder):
    out = tmp_path / "run"
    choice = precision.resolve_auto("cpu")
    expected = [choice["amp"], choice["teacher_amp"], choice["channels_last"]]
    Trainer(tiny_cfg(out, imagefolder, **AUTO, **{"TRAIN.STOP_AT_ITER": 1})).run()
    text = (out / "config.yaml").read_text()
    assert "auto" not in text
    written = CfgNode.load_cfg(text)
    for cfg in (written, _saved_cfg(out)):
        assert [_value(cfg, k) for k in KEYS] == expected
    log = (out / "log.txt").read_text()
    assert "precision: TRAIN.AMP.ENABLED {} (auto), TRAIN.AMP.TEACHER {} (auto), MODEL.CHANNELS_LAST {} (auto)".format(
        *expected) in log
    # the same yaml (auto) resumes the run whose checkpoint holds the resolved values: nothing differs
    t = Trainer(tiny_cfg(out, imagefolder, **AUTO, **{"TRAIN.STOP_AT_ITER": 2}), require_checkpoint=True)
    t.run()
    assert t.iter == 2
    changes = [json.loads(x) for x in open(out / "config_changes.jsonl")]
    assert [set(c["changes"]) for c in changes] == [{"TRAIN.STOP_AT_ITER"}]  # no precision key differs


def test_a_bf16_cpu_trains_in_bf16_with_channels_last(tmp_path, imagefolder, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    t = Trainer(tiny_cfg(tmp_path, imagefolder, **AUTO, **{"TRAIN.STOP_AT_ITER": 1}))
    t.run()
    assert t.amp_dtype == torch.bfloat16
    assert t.model.student.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    written = CfgNode.load_cfg((tmp_path / "config.yaml").read_text())
    assert [_value(written, k) for k in KEYS] == [True] * 3 and [_value(_saved_cfg(tmp_path), k) for k in KEYS] == [
        True] * 3


def _rewrite_checkpoint_cfg(output_dir, **values):
    """The checkpoint as if written on another machine, where auto resolved to ``values``."""
    path = Checkpointer(str(output_dir)).list()[0]
    state = load_torch(path)
    cfg = CfgNode.load_cfg(state["cfg"])
    for key, value in values.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    state["cfg"] = cfg.dump()
    torch.save(state, path)


def test_auto_resolved_otherwise_on_other_hardware_resumes_and_is_recorded(tmp_path, imagefolder, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    Trainer(tiny_cfg(tmp_path, imagefolder, **AUTO, **{"TRAIN.STOP_AT_ITER": 1})).run()
    _rewrite_checkpoint_cfg(tmp_path, **{"TRAIN.AMP.ENABLED": True, "TRAIN.AMP.TEACHER": True})
    # a value set explicitly that differs from the checkpoint's still stops the resume, naming the key
    explicit = tiny_cfg(tmp_path, imagefolder, **{**AUTO, "TRAIN.AMP.ENABLED": False, "TRAIN.STOP_AT_ITER": 2})
    with pytest.raises(ValueError, match=r"TRAIN\.AMP\.ENABLED: True in the checkpoint, False now"):
        Trainer(explicit).run()
    # left to auto, the hardware's choice wins; the change is recorded
    t = Trainer(tiny_cfg(tmp_path, imagefolder, **AUTO, **{"TRAIN.STOP_AT_ITER": 2}), require_checkpoint=True)
    t.run()
    assert t.iter == 2 and t.amp_dtype is None
    changes = [json.loads(x) for x in open(tmp_path / "config_changes.jsonl")]
    assert changes[-1]["iter"] == 1
    assert changes[-1]["changes"] == {"TRAIN.AMP.ENABLED": ["True", "False"], "TRAIN.AMP.TEACHER": ["True", "False"],
                                      "TRAIN.STOP_AT_ITER": ["1", "2"]}


def test_float16_set_explicitly_still_needs_a_gpu(tmp_path, imagefolder):
    cfg = tiny_cfg(tmp_path, imagefolder, **{**AUTO, "TRAIN.AMP.ENABLED": True, "TRAIN.AMP.DTYPE": "float16"})
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        Trainer(cfg).run()


# ------------------------------------------------------------------------------------------------------- benchmark
@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_distill")


def test_bench_uses_the_one_native_bf16_check(bench):
    assert bench.native_bf16 is precision.native_bf16 and bench.resolve_auto is precision.resolve_auto


@pytest.mark.parametrize("tflops, native, usable", [(0.52, True, True), (0.004, True, False), (0.0, True, False),
                                                    (0.9, False, False), (0.001, False, False)])
def test_peak_usable(bench, tflops, native, usable):
    assert bench.peak_usable(tflops, native) is usable


def test_mfu_never_divides_by_an_unusable_or_zero_peak(bench):
    emulated = {"dtype": "bf16", "tflops": 0.0011, "native": False, "usable": False, "n": 512}
    zero = {"dtype": "bf16", "tflops": 0.0, "native": True, "usable": False, "n": 2048}
    inconsistent = {"dtype": "fp32", "tflops": 0.0, "native": True, "usable": True, "n": 2048}
    good = {"dtype": "fp32", "tflops": 0.5, "native": True, "usable": True, "n": 2048}
    for peak in (emulated, zero, inconsistent, None):
        assert bench.mfu(0.137, peak) is None
        assert bench.format_mfu(bench.mfu(0.137, peak)) == "n/a"
    assert bench.mfu(0.3, good) == pytest.approx(0.6) and bench.format_mfu(0.6) == "60%"
    assert bench.format_peak(good) == "fp32 0.50 TFLOP/s"
    assert bench.format_peak(emulated) == "bf16 unusable (emulated on this device: 0.0011 TFLOP/s)"
    assert bench.format_peak(zero) == "bf16 unusable (rounds to 0.00 TFLOP/s: 0 TFLOP/s)"


def test_bench_auto_variant_and_memory_breakdown(bench):
    assert bench.auto_variant({"amp": False, "teacher_amp": False, "channels_last": False}) == "ours-fp32"
    assert bench.auto_variant({"amp": True, "teacher_amp": True, "channels_last": True}) == "ours-bf16-cl"
    assert bench.auto_variant({"amp": False, "teacher_amp": False, "channels_last": True}) == "ours-fp32-cl"
    assert bench.auto_variant(precision.resolve_auto("cpu")) in bench.VARIANTS
    r = {"peak_gib": 2.0, "base_gib": 0.5, "tensors_peak_gib": 1.25, "parts_gib": {"student": 0.25, "queue": 0.25}}
    text = bench.memory_breakdown(r)
    assert text.startswith("2.00 GiB = libraries (torch, torchvision, timm; before any model) 0.500 + student 0.250 "
                           "+ queue 0.250 + the step's transient tensors at their peak")
    assert text.endswith(" 0.750 + allocator caches, library workspaces (the rest of the peak RSS) 0.250")
    gpu = {"peak_gib": 1.25, "base_gib": 0.0, "tensors_peak_gib": 1.25, "parts_gib": {"student": 0.25}}
    assert bench.memory_breakdown(gpu).endswith(" 1.000") and "allocator" not in bench.memory_breakdown(gpu)


def test_bench_step_tensor_peak_counts_the_step_s_tensors(bench):
    """The profiler-based peak sees a step's transient tensors: 4 MiB held at once, freed by the step's end."""
    def step(x):
        a = torch.empty(2 ** 20)  # 4 MiB
        b = torch.empty(2 ** 19)  # 2 MiB, alive with a
        del a, b
        c = torch.empty(2 ** 19)  # 2 MiB, after a and b are freed
        return c.sum()

    peak = bench.step_tensor_peak(step, [torch.zeros(1)])
    assert 6 * 2 ** 20 <= peak < 7 * 2 ** 20


def test_bench_matmul_peak_of_an_emulated_dtype_is_unusable(bench, monkeypatch):
    monkeypatch.setattr(bench, "native_bf16", lambda device: False)
    peak = bench.matmul_peak(torch.device("cpu"), torch.bfloat16, quick=True)
    assert peak["n"] == 512 and not peak["usable"] and peak["dtype"] == "bf16"
    assert "unusable" in bench.format_peak(peak)
