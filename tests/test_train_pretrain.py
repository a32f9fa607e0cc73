"""python -m train.pretrain: CLI, exact resume after a kill, DDP on 2 CPU processes,
non-finite loss handling, bad files skipped."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cxrfast.synthetic import ensure_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_tiny", "--img_size", "64", "--decoder_dim", "64", "--decoder_depth", "1",
        "--decoder_heads", "2", "--batch_size", "4", "--num_workers", "0", "--epochs", "50",
        "--warmup_epochs", "1", "--lr", "1e-3", "--log_every", "1", "--eval_every", "1000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("cxr"), count=12, size=64)


def run(args, cwd=ROOT, check=True, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(folder: Path) -> dict[int, float]:
    out = {}
    for line in open(folder / "metrics.jsonl"):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.parametrize("module", ["train.pretrain", "train.finetune", "train.evaluate"])
def test_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "--output_dir" in proc.stdout and "(default:" in proc.stdout


def test_unknown_keys_are_rejected(tmp_path, data):
    proc = run(["--data", str(data), "--no_such_key", "1"], check=False)
    assert proc.returncode == 2 and "no_such_key" in proc.stderr
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochs": 1, "epoch": 2}))
    proc = run(["--data", str(data), "--config", str(cfg)], check=False)
    assert proc.returncode == 2 and "unknown keys ['epoch']" in proc.stderr


def test_killed_run_resumes_bit_identically(tmp_path, data):
    ref = tmp_path / "ref"
    run(["--data", str(data), "--output_dir", str(ref), "--max_steps", "10", "--save_every", "2", *TINY])
    expected = losses(ref)
    assert len(expected) == 10
    saved = json.loads((ref / "config.json").read_text())
    assert saved["max_steps"] == 10 and saved["model"] == "vit_tiny"

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", "--data", str(data), "--output_dir", str(out),
                             "--max_steps", "10", "--save_every", "2", *TINY], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-00000004.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    for ckpt in out.glob("checkpoint-*.pth"):  # whatever the moment of the kill, every checkpoint is whole
        assert torch.load(ckpt, weights_only=True)["global_step"] > 0
    resumed_from = max(int(p.stem.split("-")[1]) for p in out.glob("checkpoint-*.pth"))
    assert resumed_from < 10
    r = run(["--data", str(data), "--output_dir", str(out), "--max_steps", "10", "--save_every", "2",
             "--resume", "auto", *TINY])
    assert f"step {resumed_from}" in r.stdout
    got = losses(out)
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats steps after the resume: {steps}"
    for step in range(resumed_from + 1, 11):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"


def test_two_process_ddp_ranks_agree(tmp_path, data):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "train.pretrain", "--data", str(data), "--output_dir", str(out),
                           "--max_steps", "3", "--device", "cpu", *TINY],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["ranks_agree"] and len(summary["param_checksums"]) == 2
    assert summary["param_checksums"][0] == summary["param_checksums"][1]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    """lr 1e30: step 1 (lr 0 in warmup) is good, step 2's update explodes. Its checkpoint must
    not be written, and the message must name the step-1 checkpoint, which resumes."""
    out = tmp_path / "nan"
    args = ["--data", str(data), "--output_dir", str(out), "--save_every", "1", "--max_steps", "20", *TINY]
    args[args.index("--lr") + 1] = "1e30"
    proc = run(args, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    good = out / "checkpoint-00000001.pth"
    assert "not finite" in proc.stderr and f"last good checkpoint is {good}" in proc.stderr
    assert [p.name for p in out.glob("checkpoint-*.pth")] == [good.name]
    state = torch.load(good, weights_only=True)
    assert all(v.abs().max() < 1e3 for v in state["model"].values() if v.is_floating_point())
    r = run(["--data", str(data), "--output_dir", str(out), "--max_steps", "2", "--resume", str(good), *TINY])
    assert "step 1" in r.stdout


def test_non_finite_before_any_checkpoint_says_so(tmp_path, data):
    out = tmp_path / "nan"
    args = ["--data", str(data), "--output_dir", str(out), "--max_steps", "20", *TINY]
    args[args.index("--lr") + 1] = "1e30"
    proc = run(args, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "No checkpoint has been written yet" in proc.stderr and "None" not in proc.stderr
    assert not list(out.glob("checkpoint-*.pth"))


def test_ddp_non_finite_loss_on_one_rank_stops_every_rank(tmp_path, data):
    """Rank 1's loss turns NaN at step 2: both ranks exit 3 with the same message, neither
    waits for the other in a collective (launched without torchrun, so no agent kills them)."""
    import re
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp_nan"
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                   CXRFAST_TEST_NAN_LOSS="1:2")
        procs.append(subprocess.Popen([sys.executable, "-m", "train.pretrain", "--data", str(data), "--output_dir",
                                       str(out), "--max_steps", "5", "--device", "cpu", *TINY], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    codes, errors = [], []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=300)  # a rank left waiting would hang for gloo's 30 minutes
            codes.append(proc.returncode)
            errors.append(re.findall(r"error: .*", err))  # the progress bar may precede it on its line
    finally:
        for proc in procs:
            proc.kill()
    assert codes == [3, 3], errors
    assert len(errors[0]) == 1 and errors[0] == errors[1]
    assert "not finite" in errors[0][0] and "step 2" in errors[0][0] and "checkpoint-00000001.pth" in errors[0][0]


def test_unreadable_files_are_logged_and_skipped(tmp_path, data):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(data.glob("*.dcm"))[:8]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.dcm").write_bytes((data / "cxr_000.dcm").read_bytes()[:300])
    out = tmp_path / "out"
    run(["--data", str(folder), "--output_dir", str(out), "--max_steps", "3", *TINY])
    with open(out / "errors.csv", newline="") as f:
        rows = list(csv.DictReader(f))  # the layout of prepare's and evaluate's errors.csv
    assert [(Path(r["source"]).name, r["error"]) for r in rows] == [("broken.dcm", "TruncatedError")]
    assert not (out / "errors.tsv").exists()


def test_shipped_configs_parse():
    from train import config, finetune, pretrain

    cfg, keys = config.parse(pretrain.PretrainConfig, ["--config", str(ROOT / "configs/pretrain_vit_base.toml")], "p", "")
    assert cfg.model == "vit_base" and cfg.betas == (0.9, 0.95) and "decoder_depth" in keys
    cfg, _ = config.parse(finetune.FinetuneConfig, ["--config", str(ROOT / "configs/finetune_vit_base.toml"),
                                                    "--epochs", "3"], "f", "")
    assert cfg.layer_decay == 0.75 and cfg.crop_scale == (0.5, 1.0) and cfg.epochs == 3


@pytest.mark.parametrize("loader", ["cpu", "torch"])
def test_pretrain_and_finetune_read_a_prepared_folder(tmp_path, data, loader):
    from cxrfast.prepare import prepare

    prepared = tmp_path / "prepared"
    prepare(str(data), str(prepared), size=64, labels=str(data / "labels.csv"), workers=1,
            split_fractions=(0.5, 0.25, 0.25))
    out = tmp_path / "pt"
    r = run(["--data", str(prepared), "--output_dir", str(out), "--max_steps", "2", "--loader", loader, *TINY])
    assert f"loader {loader}" in r.stdout and len(losses(out)) == 2
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ft = subprocess.run([sys.executable, "-m", "train.finetune", "--data", str(prepared), "--output_dir",
                         str(tmp_path / "ft"), "--pretrained", json.loads((out / "summary.json").read_text())["checkpoint"],
                         "--model", "vit_tiny", "--img_size", "64", "--batch_size", "2", "--epochs", "1",
                         "--num_workers", "0", "--loader", loader], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
    assert ft.returncode == 0, ft.stderr[-2000:]
    assert "3 labels ['Effusion', 'Nodule', 'Cardiomegaly']" in ft.stdout


def test_resume_on_a_prepared_folder_repeats_the_crops(tmp_path, data):
    """The CPU loader draws crops from (seed, epoch, sample): a run stopped at a checkpoint and
    resumed gives the losses of the uninterrupted run."""
    from cxrfast.prepare import prepare

    prepared = tmp_path / "prepared"
    prepare(str(data), str(prepared), size=64, workers=1)
    ref, part = tmp_path / "ref", tmp_path / "part"
    common = ["--data", str(prepared), "--loader", "cpu", "--save_every", "3", *TINY]
    run([*common, "--output_dir", str(ref), "--max_steps", "6"])
    run([*common, "--output_dir", str(part), "--max_steps", "3"])
    r = run([*common, "--output_dir", str(part), "--max_steps", "6", "--resume", "auto"])
    assert "step 3" in r.stdout
    expected, got = losses(ref), losses(part)
    assert len(expected) == 6 and len(set(expected.values())) == 6
    assert all(got[s] == expected[s] for s in range(1, 7)), (got, expected)


def _main_error(job, argv, capsys, warnings=False):
    """The one `error:` line of a user mistake (exit 2); ``warnings``: `warning:` lines may precede it."""
    from train import finetune, pretrain

    with pytest.raises(SystemExit) as info:
        {"pretrain": pretrain.main, "finetune": finetune.main}[job](argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not (warnings and line.startswith("warning: "))]
    assert info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("option", ["--init", "--resume"])
def test_bad_checkpoint_path_is_refused_before_anything_is_written(tmp_path, data, capsys, option):
    missing = tmp_path / "missing.pth"
    out = tmp_path / "new"
    line = _main_error("pretrain", ["--data", str(data), "--output_dir", str(out), "--max_steps", "1",
                                    option, str(missing), *TINY], capsys)
    assert f"{option} {missing}" in line
    assert not out.exists()
    # an existing run's folder keeps its config.json as it was
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text('{"epochs": 7}')
    _main_error("pretrain", ["--data", str(data), "--output_dir", str(old), "--max_steps", "1",
                             option, str(missing), *TINY], capsys)
    assert (old / "config.json").read_text() == '{"epochs": 7}' and sorted(os.listdir(old)) == ["config.json"]


def test_resume_auto_with_only_unreadable_checkpoints_writes_nothing(tmp_path, data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-00000002.pth").write_bytes(b"garbage")
    line = _main_error("pretrain", ["--data", str(data), "--output_dir", str(out), "--max_steps", "1",
                                    "--resume", "auto", *TINY], capsys, warnings=True)
    assert "none of the 1 checkpoints" in line
    assert sorted(os.listdir(out)) == ["checkpoint-00000002.pth"]


def test_init_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, data, capsys):
    from cxrfast.models import mae

    ckpt = tmp_path / "small.pth"
    torch.save({"model": mae("vit_small", img_size=64).state_dict()}, ckpt)
    out = tmp_path / "out"
    line = _main_error("pretrain", ["--data", str(data), "--output_dir", str(out), "--max_steps", "1",
                                    "--init", str(ckpt), *TINY], capsys)
    assert str(ckpt) in line and "do not fit" in line
    assert not out.exists()
    # one that fits is read before the folder exists and loaded after the model is built
    from train import pretrain

    fits = tmp_path / "tiny.pth"
    src = mae("vit_tiny", img_size=64, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    torch.save({"model": src.state_dict()}, fits)
    pretrain.main(["--data", str(data), "--output_dir", str(out), "--max_steps", "1", "--init", str(fits), *TINY,
                   "--lr", "0", "--device", "cpu"])  # lr 0: the saved weights are the loaded ones
    assert f"initialised from {fits}" in capsys.readouterr().out
    saved = torch.load(out / "checkpoint-00000001.pth", weights_only=True)["model"]
    assert torch.equal(saved["blocks.0.mlp.fc1.weight"], src.state_dict()["blocks.0.mlp.fc1.weight"])


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_batch_larger_than_the_data_is_a_usage_error(tmp_path, data, capsys, job):
    out = tmp_path / "out"
    argv = ["--data", str(data), "--output_dir", str(out), "--max_steps", "1", *TINY]
    if job == "finetune":
        argv = ["--data", str(data), "--labels", str(data / "labels.csv"), "--output_dir", str(out),
                "--model", "vit_tiny", "--img_size", "64", "--num_workers", "0", "--max_steps", "1"]
    argv += ["--batch_size", "64"]
    line = _main_error(job, argv, capsys)
    assert "--batch_size 64" in line and "too few" in line
    assert not out.exists()
    argv[-1] = "4"
    line = _main_error(job, argv + ["--accum_iter", "5"], capsys)  # 4 x 5 > 12 images
    assert "--batch_size 4" in line and "--accum_iter 5" in line
    assert not out.exists()


def test_demo_finetune_without_pretraining_checkpoint_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no outputs/pretrain_demo here
    line = _main_error("finetune", [], capsys)
    assert "no demo pretraining checkpoint" in line and "train.pretrain" in line
    assert not (tmp_path / "outputs").exists()


def test_summary_is_replaced_atomically(tmp_path, data):
    """summary.json is written to a temporary file and renamed: a file that shares the old
    summary's inode (a hard link, or a reader holding it open) keeps the old content whole."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "kept.json").write_text('{"old": true}')
    os.link(tmp_path / "kept.json", out / "summary.json")
    run(["--data", str(data), "--output_dir", str(out), "--max_steps", "1", *TINY])
    assert (tmp_path / "kept.json").read_text() == '{"old": true}'
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
