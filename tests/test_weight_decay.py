"""AdamW weight-decay groups by parameter name (cxrfast/models/vit.py param_groups): MAE
pretraining as facebookresearch/mae main_pretrain (only 1-D parameters and biases exempt),
fine-tuning as BEiT / MAE main_finetune (tokens and position embeddings exempt too), and the
groups train.pretrain / train.finetune actually hand to the optimizer."""
from __future__ import annotations

import pytest
import torch

from cxrfast.models import classifier, mae
from cxrfast.models.vit import PRETRAIN_NO_DECAY, param_groups
from cxrfast.synthetic import ensure_demo_dataset
from train import engine, finetune, pretrain


def _tiny_mae():
    return mae("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=24,
               decoder_depth=1, decoder_num_heads=2)


def _by_name(model: torch.nn.Module, groups: list[dict]) -> dict[str, float]:
    """Each grouped parameter's name -> its weight decay; a parameter in two groups fails."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, float] = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} is in two groups"
            out[names[id(p)]] = g["weight_decay"]
    return out


def _check_pretrain_groups(model: torch.nn.Module, groups: list[dict], wd: float) -> None:
    decay = _by_name(model, groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trainable
    assert "pos_embed" not in decay and "decoder_pos_embed" not in decay  # fixed sin-cos: not trained at all
    for name in ("cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                 "decoder_embed.weight", "decoder_blocks.0.mlp.fc2.weight", "decoder_pred.weight"):
        assert decay[name] == wd, name
    for name in ("patch_embed.proj.bias", "blocks.1.norm2.weight", "blocks.1.norm2.bias", "norm.weight",
                 "decoder_norm.weight", "decoder_pred.bias", "blocks.0.attn.qkv.bias"):
        assert decay[name] == 0.0, name
    exempt = {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))}
    assert {n for n, d in decay.items() if d == 0.0} == exempt


def _check_finetune_groups(model: torch.nn.Module, groups: list[dict], wd: float) -> None:
    decay = _by_name(model, groups)
    assert set(decay) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ("cls_token", "pos_embed", "fc_norm.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
                 "patch_embed.proj.bias", "head.bias"):
        assert decay[name] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "head.weight"):
        assert decay[name] == wd, name


def test_pretraining_groups_follow_mae_main_pretrain():
    model = _tiny_mae()
    _check_pretrain_groups(model, param_groups(model, 0.05, no_decay=PRETRAIN_NO_DECAY), 0.05)


def test_finetuning_groups_keep_the_beit_exemptions():
    model = classifier("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    assert model.pos_embed.requires_grad  # fine-tuning learns it, and does not decay it
    _check_finetune_groups(model, param_groups(model, 0.05, layer_decay=0.75), 0.05)


class _Captured(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """engine.run replaced by one that keeps the job and stops: the groups an entry point builds."""
    jobs = []

    def fake_run(cfg, rt, job, resumed):
        jobs.append(job)
        raise _Captured

    monkeypatch.setattr(engine, "run", fake_run)
    return jobs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("cxr"), count=8, size=32)


TINY = ["--model", "vit_tiny", "--img_size", "32", "--batch_size", "2", "--num_workers", "0",
        "--weight_decay", "0.07"]


def test_train_pretrain_hands_the_mae_groups_to_the_optimizer(tmp_path, data, captured):
    with pytest.raises(_Captured):
        pretrain.main(["--data", str(data), "--output_dir", str(tmp_path / "pt"), "--decoder_dim", "32",
                       "--decoder_depth", "1", "--decoder_heads", "2", *TINY])
    _check_pretrain_groups(captured[0].model, captured[0].param_groups, 0.07)


def test_train_finetune_hands_the_finetuning_groups_to_the_optimizer(tmp_path, data, captured):
    with pytest.raises(_Captured):
        finetune.main(["--data", str(data), "--labels", str(data / "labels.csv"), "--output_dir",
                       str(tmp_path / "ft"), *TINY])
    _check_finetune_groups(captured[0].model, captured[0].param_groups, 0.07)
