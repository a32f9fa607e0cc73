"""Every user mistake on the command line of train.pretrain, train.finetune and
train.evaluate ends in one `error: ...` line naming the value, exit code 2, no traceback,
and no output folder (it is made only once the inputs are validated)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrfast.models import classifier
from cxrfast.synthetic import FINDINGS, ensure_demo_dataset
from train import config, evaluate, finetune, pretrain

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"pretrain": pretrain.main, "finetune": finetune.main, "evaluate": evaluate.main}
SMALL = ["--model", "vit_tiny", "--img_size", "64", "--device", "cpu", "--num_workers", "0", "--max_steps", "1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = ensure_demo_dataset(root / "cxr", count=12, size=64)
    (root / "empty").mkdir()
    (root / "no_path.csv").write_text("file_name,Effusion\ncxr_000.dcm,1\n")
    (root / "bad.toml").write_text("epochs = [\n")
    (root / "bad.json").write_text("{\"epochs\": 1,,}")
    (root / "list.json").write_text("[1, 2]")
    (root / "nan.json").write_text('{"lr": NaN}')  # json reads NaN
    (root / "all_test.csv").write_text("path,split,Effusion\n" + "".join(
        f"cxr_{i:03d}.dcm,test,{i % 2}\n" for i in range(12)))
    from cxrfast.prepare import prepare

    prepare(str(data), str(root / "old_prepared"), size=64, workers=1)
    meta = root / "old_prepared" / "meta.json"
    meta.write_text(meta.read_text().replace('"format_version": 2', '"format_version": 1'))
    model = classifier("vit_tiny", img_size=64, in_chans=1, num_classes=len(FINDINGS))
    torch.save({"model": model.state_dict(), "label_names": list(FINDINGS), "kind": "cxrfast-classifier",
                "config": {"model": "vit_tiny", "img_size": 64, "data": str(data), "labels": str(data / "labels.csv")}},
               root / "model.pth")
    return root, data


def _base(job, root, data):
    if job == "pretrain":
        return ["--data", str(data), *SMALL]
    if job == "finetune":
        return ["--data", str(data), "--labels", str(data / "labels.csv"), *SMALL]
    return ["--checkpoint", str(root / "model.pth"), "--device", "cpu"]


# (job, options replacing or added to a valid command line, text the one error line must contain)
CASES = [
    (job, args, expect) for job in ("pretrain", "finetune", "evaluate") for args, expect in [
        (["--data", "{root}/missing"], "missing: no such"),
        (["--data", "{root}/empty"], "empty: no image files"),
        (["--config", "{root}/none.toml"], "none.toml"),
        (["--config", "{root}/bad.toml"], "bad.toml"),
        (["--config", "{root}/bad.json"], "bad.json"),
        (["--config", "{root}/list.json"], "list.json"),
        (["--device", "tpu"], "--device tpu"),
        (["--model", "vit_gigantic"], "--model vit_gigantic"),
        (["--img_size", "100"], "--img_size 100"),
        (["--batch_size", "0"], "--batch_size 0"),
        (["--batch_size", "-4"], "--batch_size -4"),
        (["--num_workers", "-1"], "--num_workers -1"),
        (["--no_such_option", "1"], "no_such_option"),
    ]
] + [
    (job, args, expect) for job in ("pretrain", "finetune") for args, expect in [
        (["--loader", "foo"], "--loader foo"),
        (["--accum_iter", "0"], "--accum_iter 0"),
        (["--save_every", "0"], "--save_every 0"),
        (["--log_every", "0"], "--log_every 0"),
        (["--log_every", "-3"], "--log_every -3"),
        (["--epochs", "0"], "--epochs 0"),
        (["--crop_scale", "0.5,2"], "--crop_scale 2.0"),
        (["--data", "{root}/no_path.csv"], "no_path.csv"),
        (["--data", "{root}/old_prepared"], "old_prepared"),
        # NaN passes `v < lo` (every comparison with NaN is false); no float option takes NaN or inf
        (["--lr", "nan"], "--lr nan"),
        (["--lr", "inf"], "--lr inf"),
        (["--blr", "nan"], "--blr nan"),
        (["--warmup_epochs", "nan"], "--warmup_epochs nan"),
        (["--betas", "nan,0.999"], "--betas nan"),
        (["--weight_decay=-inf"], "--weight_decay -inf"),
        (["--clip_grad", "nan"], "--clip_grad nan"),
        (["--config", "{root}/nan.json"], "--lr nan"),
    ]
] + [
    (job, args, expect) for job in ("finetune", "evaluate") for args, expect in [
        (["--uncertain", "maybe"], "--uncertain maybe"),
        (["--label_format", "xml"], "--label_format xml"),
        (["--labels", "{root}/no_path.csv"], "found columns ['file_name', 'Effusion']"),
        (["--labels", "{root}/nothing.csv"], "nothing.csv"),
    ]
] + [
    ("finetune", ["--label_fraction", "0"], "--label_fraction 0"),
    ("finetune", ["--split_fractions", "0.5,0.2"], "--split_fractions 0.5,0.2"),
    ("pretrain", ["--mask_ratio", "1.5"], "--mask_ratio 1.5"),
    ("pretrain", ["--mask_ratio", "nan"], "--mask_ratio nan"),
    ("finetune", ["--label_fraction", "nan"], "--label_fraction nan"),
    ("finetune", ["--split_fractions", "nan,0.5,0.5"], "--split_fractions nan"),
    ("evaluate", ["--probe_l2", "nan"], "--probe_l2 nan"),
    ("evaluate", ["--split_fractions", "0.5,0.2"], "--split_fractions 0.5,0.2"),
    ("evaluate", ["--split", "holdout"], "--split holdout"),
    ("evaluate", ["--split", "val", "--labels", "{root}/all_test.csv"], "--split val"),
    ("evaluate", ["--checkpoint", "{root}/none.pth"], "none.pth"),
]


def _argv(job, args, root, data):
    args = [a.format(root=root) for a in args]
    base = _base(job, root, data)
    if job == "evaluate" and "--labels" in args:  # evaluate takes --labels with --data
        base += ["--data", str(data)]
    return base + args  # an option given twice: argparse keeps the last one


@pytest.mark.parametrize("job,args,expect", CASES, ids=[f"{j}:{' '.join(a)}" for j, a, _ in CASES])
def test_user_mistake_is_one_error_line(inputs, tmp_path, capsys, job, args, expect):
    root, data = inputs
    out = tmp_path / "out"
    argv = _argv(job, args, root, data) + ["--output_dir", str(out)]
    with pytest.raises(SystemExit) as info:
        MAINS[job](argv)
    captured = capsys.readouterr()
    assert info.value.code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expect in lines[0], lines[0]
    assert not out.exists(), "nothing may be written for a user mistake"


@pytest.mark.parametrize("job", ["pretrain", "finetune", "evaluate"])
def test_process_exit_and_no_traceback(inputs, tmp_path, job):
    root, data = inputs
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", f"train.{job}", *_base(job, root, data), "--batch_size", "0",
                           "--output_dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --batch_size 0: must be at least 1"]
    assert not out.exists()


def test_toml_falls_back_to_tomli(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: the tomli backport (a runtime dependency there) is used."""
    import types

    real = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    calls = []
    fake = types.ModuleType("tomli")
    fake.load = lambda f: calls.append(f.name) or real.load(f)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now fails as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", fake)
    path = tmp_path / "c.toml"
    path.write_text('epochs = 3\nmodel = "vit_tiny"\n')
    assert config.load_file(path) == {"epochs": 3, "model": "vit_tiny"}
    assert calls == [str(path)]


def test_checks_come_from_field_metadata():
    """Limits live on the fields, so every job that has a field checks it the same way."""
    from train.engine import LoopConfig

    meta = {f.name: f.metadata for f in __import__("dataclasses").fields(LoopConfig)}
    for name in ("batch_size", "accum_iter", "save_every", "log_every"):
        assert meta[name]["minimum"] == 1
    assert meta["device"]["choices"] == ("auto", "cuda", "cpu")


def test_nan_fails_every_range_check():
    """`not v >= lo` / `not v <= hi`: a NaN is outside every range, also with only a maximum."""
    from dataclasses import dataclass

    @dataclass
    class C:
        a: float = config.opt(0.5, "a", maximum=1)
        b: float = config.opt(0.5, "b", allow_nonfinite=True)

    with pytest.raises(config.UsageError, match="--a nan: must be a finite number"):
        config.check(C(a=float("nan")))
    config.check(C(b=float("inf")))  # a field may allow it explicitly


def test_one_usage_error_for_prepare_and_train():
    """train.config re-uses cxrfast.cli (cxrfast never imports train)."""
    import cxrfast.cli as cli
    from cxrfast import prepare
    import importlib.util

    from train import labelled

    assert config.UsageError is cli.UsageError and config.fail is cli.fail and config.Parser is cli.Parser
    assert all(job.cli is cli for job in (labelled, pretrain, finetune, evaluate))  # the input checks' one home
    assert importlib.util.find_spec("train.inputs") is None
    assert issubclass(prepare.PrepareError, ValueError)
    assert not hasattr(prepare, "_Parser") and not hasattr(prepare, "_read_labels") and not hasattr(prepare, "_find")
