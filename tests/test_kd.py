"""Knowledge distillation at the linear stage (paper §4.4, Table 2 "KD" / "KD + DisCo"): the loss against a hand
computation and an independent re-derivation of DisCo-pytorch's kd_ce_loss.py, and the linear evaluator with a
teacher (its backbone + its own trained classifier) end to end, cached and uncached, with the errors of the KD keys."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses.kd import kd_loss
from transfer.common import end_run
from transfer.config import setup_eval_cfg
from transfer.linear import LinearEvaluator, build_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# the loss


def test_kd_loss_by_hand():
    """2 samples, 3 classes, T 2, alpha 0.5, worked out with math (no torch)."""
    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
    t = [[2.0, 0.0, 0.0], [0.0, 0.0, 4.0]]
    y = [1, 2]
    T, alpha = 2.0, 0.5

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    kl = []
    for si, ti in zip(s, t):
        p, q = softmax([x / T for x in ti]), softmax([x / T for x in si])
        kl.append(sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q)))
    ce = sum(-math.log(softmax(si)[yi]) for si, yi in zip(s, y)) / 2
    batchmean = alpha * T * T * sum(kl) / 2 + (1 - alpha) * ce
    mean = alpha * T * T * sum(kl) / (2 * 3) + (1 - alpha) * ce
    args = torch.tensor(s), torch.tensor(t), torch.tensor(y)
    assert kd_loss(*args).item() == pytest.approx(batchmean, rel=1e-6)
    assert kd_loss(*args, reduction="mean").item() == pytest.approx(mean, rel=1e-6)
    assert kd_loss(*args, alpha=1.0, temperature=1.0).item() == pytest.approx(
        sum(sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(softmax(ti), softmax(si)))
            for si, ti in zip(s, t)) / 2, rel=1e-6)


def _official_kd_ce(outputs, labels, teacher_outputs, alpha, T):
    """DisCo-pytorch's loss_fn_kd re-derived by hand: nn.KLDivLoss() (elementwise mean over N x C of
    target * (log target - input)) of log_softmax(s / T) against softmax(t / T), times alpha * T * T, plus
    (1 - alpha) * cross-entropy; written with exp / log / sums only."""
    n, c = outputs.shape
    t = teacher_outputs.double() / T
    p = t.exp() / t.exp().sum(1, keepdim=True)
    s = outputs.double() / T
    log_q = s - s.exp().sum(1, keepdim=True).log()
    kl_elementwise_mean = (p * (p.log() - log_q)).sum() / (n * c)
    z = outputs.double()
    ce = -(z.gather(1, labels.view(-1, 1)).squeeze(1) - z.exp().sum(1).log()).mean()
    return kl_elementwise_mean * (alpha * T * T) + ce * (1.0 - alpha)


@pytest.mark.parametrize("alpha, T", [(0.5, 2.0), (0.9, 4.0), (0.2, 1.0)])
def test_kd_loss_matches_the_official_formula(alpha, T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    ours = kd_loss(s, t, y, alpha, T, reduction="mean")
    assert ours.dtype == torch.float32
    assert abs(ours.item() - _official_kd_ce(s, y, t, alpha, T).item()) < 1e-6
    # the KL part: Hinton's batchmean = the official elementwise mean x the number of classes
    kl = {r: kd_loss(s, t, y, alpha=1.0, temperature=T, reduction=r) for r in ("batchmean", "mean")}
    assert kl["batchmean"].item() == pytest.approx(kl["mean"].item() * 10, rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_only_the_student_gets_gradients():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    for r in ("batchmean", "mean"):
        assert torch.equal(kd_loss(s, t, y, alpha=0.0, reduction=r), F.cross_entropy(s, y))
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t, y).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reduction must be one of .*'batchmean', 'mean'.*got 'sum'"):
        kd_loss(s, t, y, reduction="sum")


def test_kd_config_keys_are_checked():
    cfg = setup_eval_cfg("", [])
    assert (cfg.KD.TEACHER_CLASSIFIER, cfg.KD.ALPHA, cfg.KD.TEMPERATURE, cfg.KD.REDUCTION) == ("", 0.5, 2.0,
                                                                                                "batchmean")
    for key, value, msg in [("KD.REDUCTION", "sum", r"KD\.REDUCTION must be 'batchmean' .* or 'mean' .*got 'sum'"),
                            ("KD.ALPHA", "1.5", r"KD\.ALPHA 1\.5 is out of range: must be in \[0, 1\]"),
                            ("KD.TEMPERATURE", "0.0", r"KD\.TEMPERATURE 0\.0 is out of range: must be > 0"),
                            ("KD.TEACHER_WEIGHTS", "t.pth", r"KD\.TEACHER_CLASSIFIER is empty")]:
        with pytest.raises(ValueError, match=msg):
            setup_eval_cfg("", [key, value])
    for name in ("table2_kd_resnet.yaml", "table2_kd_mobile.yaml"):
        cfg = setup_eval_cfg(os.path.join(ROOT, "configs", "eval", name))
        assert (cfg.KD.ALPHA, cfg.KD.TEMPERATURE, cfg.KD.REDUCTION) == (0.5, 2.0, "mean") and cfg.KD.TEACHER_CLASSIFIER
        assert cfg.SOLVER.BASE_LR == (30.0 if "resnet" in name else 3.0)


# ---------------------------------------------------------------------------------------------------------------
# the linear evaluator with a teacher


def _opts(out, data, weights, **over):
    opts = {"OUTPUT_DIR": out, "MODEL.WEIGHTS": weights, "DATA.TRAIN_DIR": data / "train",
            "DATA.VAL_DIR": data / "val", "DATA.IMAGE_SIZE": 32, "DATA.VAL_RESIZE": 36, "DATA.NUM_WORKERS": 0,
            "SOLVER.EPOCHS": 2, "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.5, "TEST.IMS_PER_BATCH": 32}
    opts.update(over)
    return [str(x) for kv in opts.items() for x in kv]


def _run(out, data, weights, **over):
    return LinearEvaluator(setup_eval_cfg("", _opts(out, data, weights, **over))).run()


def _classifier(out, epoch=2):
    return torch.load(os.path.join(out, "checkpoints", f"model_{epoch:07d}.pth"), weights_only=True)["classifier"]


CACHED = {"DATA.TRAIN_AUGMENT": False, "SOLVER.CACHE_FEATURES": True, "DATA.VAL_RESIZE": 32}


@pytest.fixture(scope="module")
def teacher_probe(tmp_path_factory, imagefolder, teacher_export):
    """The teacher's own linear evaluation (resnet18 fixture backbone, 3 epochs): its OUTPUT_DIR."""
    out = tmp_path_factory.mktemp("teacher_probe")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(out, imagefolder, teacher_export, **{"SOLVER.EPOCHS": 3})
    finally:
        torch.set_num_threads(n)
    return out


def test_kd_trains_on_the_teachers_logits_and_resumes(tmp_path, imagefolder, teacher_export, teacher_probe):
    kd = {"KD.TEACHER_CLASSIFIER": teacher_probe}
    plain = _run(tmp_path / "plain", imagefolder, teacher_export)
    assert plain["kd"] is None
    res = _run(tmp_path / "kd", imagefolder, teacher_export, **kd)
    ckpt = os.path.join(teacher_probe, "checkpoints", "model_0000003.pth")
    assert res["kd"] == {"teacher_classifier": ckpt, "teacher_classifier_epoch": 3, "teacher_weights": teacher_export,
                         "teacher_arch": "resnet18", "alpha": 0.5, "temperature": 2.0, "reduction": "batchmean"}
    assert json.loads((tmp_path / "kd/results.json").read_text())["kd"] == res["kd"]
    a, b = _classifier(tmp_path / "plain"), _classifier(tmp_path / "kd")
    assert not torch.equal(a["weight"], b["weight"])
    # alpha 0: the KD path computes plain cross-entropy, bit for bit (and the teacher leaves the RNG stream alone)
    _run(tmp_path / "a0", imagefolder, teacher_export, **kd, **{"KD.ALPHA": 0.0})
    c = _classifier(tmp_path / "a0")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # interrupted after epoch 1 and resumed (the teacher is rebuilt from the config): the same classifier
    assert _run(tmp_path / "cut", imagefolder, teacher_export, **kd, **{"SOLVER.STOP_AT_EPOCH": 1}) is None
    resumed = _run(tmp_path / "cut", imagefolder, teacher_export, **kd)
    d = _classifier(tmp_path / "cut")
    assert all(torch.equal(b[k], d[k]) for k in b) and resumed["top1"] == res["top1"]


def _identity_teacher(path, backbone, num_classes=4, **over):
    """A classifier checkpoint whose classifier is the student's own initialisation (seed 0) on the same backbone:
    on the same images the teacher's logits are the student's, so with alpha 1 the KL gradient is ~0."""
    state = {"classifier": build_classifier(512, num_classes, 0).state_dict(), "arch": "resnet18",
             "weights": str(backbone), "num_classes": num_classes, "feature_dim": 512, "epoch": 3}
    state.update(over)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("cached", [False, True])
def test_teacher_sees_the_same_images_in_the_same_order(tmp_path, imagefolder, teacher_export, cached):
    """Uncached: the same random crops / flips as the student's batch; cached (on a class-balanced subset, as a
    semi-supervised run): the teacher's cached logits in the order of the student's cached features. Either way the
    student's logits equal the teacher's at the start, and with alpha 1 the classifier stays where it started (to
    ~1e-9), while the teacher logits of other images (each batch's rolled by one) pull it by ~1e-3."""
    over = {**CACHED, "DATA.SUBSET_PER_CLASS": 8, "SOLVER.EPOCHS": 1} if cached else {}
    over.update({"KD.TEACHER_CLASSIFIER": _identity_teacher(tmp_path / "teacher.pth", teacher_export),
                 "KD.ALPHA": 1.0, "SOLVER.BASE_LR": 0.02})  # a stable lr: nothing amplifies rounding noise
    moved = {}
    for rolled in (False, True):
        ev = LinearEvaluator(setup_eval_cfg("", _opts(tmp_path / str(rolled), imagefolder, teacher_export, **over)))
        if rolled:
            batches = ev._train_batches
            ev._train_batches = lambda: ((f, y, t.roll(1, 0)) for f, y, t in batches())
        res = ev.run()
        trained, init = _classifier(tmp_path / str(rolled), 1 if cached else 2), build_classifier(512, 4, 0)
        moved[rolled] = max((trained[k] - v).abs().max().item() for k, v in init.state_dict().items())
    assert res["kd"]["teacher_classifier"] == str(tmp_path / "teacher.pth") and res["kd"]["alpha"] == 1.0
    assert res["cached_features"] is cached and res["train_images"] == (32 if cached else 64)
    assert moved[False] < 1e-7 and moved[True] > 1e-4, moved


def _setup(out, data, weights, **over):
    cfg = setup_eval_cfg("", _opts(out, data, weights, **over))
    try:
        LinearEvaluator(cfg).setup()
    finally:
        end_run(cfg)


def test_kd_mistakes_are_clear_errors(tmp_path, imagefolder, teacher_export):
    def setup(name, teacher, **over):
        _setup(tmp_path / name, imagefolder, teacher_export, **{"KD.TEACHER_CLASSIFIER": teacher}, **over)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"KD\.TEACHER_CLASSIFIER .*empty has no readable classifier "
                                                r"checkpoint \(checkpoints/model_\*\.pth\): run the teacher's linear"):
        setup("e1", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"KD\.TEACHER_CLASSIFIER .*nowhere' does not exist: set KD\."
                                                r"TEACHER_CLASSIFIER to the teacher's linear-evaluation OUTPUT_DIR"):
        setup("e2", tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"KD\.TEACHER_CLASSIFIER .* is a classifier for 10 classes, but shapes has "
                                         r"4: .*point KD\.TEACHER_CLASSIFIER at the teacher's linear evaluation"):
        setup("e3", _identity_teacher(tmp_path / "c10.pth", teacher_export, num_classes=10))
    with pytest.raises(FileNotFoundError, match=r"the KD teacher backbone '.*gone\.pth' does not exist \(KD\."
                                                r"TEACHER_WEIGHTS is empty, so the backbone named by .*\): set "
                                                r"KD\.TEACHER_WEIGHTS"):
        setup("e4", _identity_teacher(tmp_path / "moved.pth", teacher_export, weights=str(tmp_path / "gone.pth")))
    with pytest.raises(ValueError, match=r"KD\.TEACHER_CLASSIFIER .*resnet18\.pth is not a linear classifier "
                                         r"checkpoint of tools/eval_linear\.py"):
        setup("e5", teacher_export)
    with pytest.raises(ValueError, match=r"but the teacher architecture resnet50 has 2048-d features: clear "
                                         r"KD\.TEACHER_ARCH"):
        setup("e6", _identity_teacher(tmp_path / "ok.pth", teacher_export), **{"KD.TEACHER_ARCH": "resnet50"})
