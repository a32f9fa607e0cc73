"""--help of every train entry point: sections, real metavars, every choice list (issue 11)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import config, evaluate, finetune, pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"train.pretrain": pretrain.PretrainConfig, "train.finetune": finetune.FinetuneConfig,
           "train.evaluate": evaluate.EvaluateConfig}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def helped(request):
    proc = subprocess.run([sys.executable, "-m", request.param, "--help"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return CONFIGS[request.param], proc.stdout


def _section(text: str, title: str) -> str:
    """The lines of one --help section (up to the next blank line)."""
    start = text.index(f"\n{title} options:\n")
    end = text.find("\n\n", start + 1)
    return text[start:end if end >= 0 else None]


def test_help_has_the_sections_in_order(helped):
    cls, text = helped
    starts = [text.find(f"\n{g} options:\n") for g in config.GROUPS]
    assert all(s >= 0 for s in starts) and starts == sorted(starts), starts
    for f in dataclasses.fields(cls):  # each option in its own section
        assert f"--{f.name} " in _section(text, config.group_of(f)), f.name


def test_help_shows_real_metavars(helped):
    _, text = helped
    assert "OPTIONAL" not in text and "TUPLE" not in text and " STR" not in text
    assert "--data PATH" in text and "--seed N" in text and "--batch_size N" in text
    if "--split_fractions" in text:
        assert "--split_fractions A,B,C" in text or "--split_fractions A,B,..." in text


def test_help_lists_every_choice(helped):
    cls, text = helped
    flat = " ".join(text.split())  # argparse wraps the lines
    limited = [f for f in dataclasses.fields(cls) if f.metadata.get("choices")]
    assert limited
    for f in limited:
        assert f"(choices: {', '.join(map(str, f.metadata['choices']))})" in flat, f.name


def test_metavars_by_type():
    from typing import Optional

    assert config.metavar("betas", tuple[float, ...], (0.9, 0.95)) == "A,B"
    assert config.metavar("split_fractions", Optional[tuple[float, ...]], None) == "A,B,..."
    assert config.metavar("clip_grad", Optional[float], None) == "X"
    assert config.metavar("max_steps", Optional[int], None) == "N"
    assert config.metavar("resume", Optional[str], None) == "PATH"
    assert config.metavar("device", str, "auto") == "NAME"
    assert config.metavar("compile", bool, False) == "true|false"


def test_a_field_can_name_its_section_and_a_wrong_one_is_refused():
    @dataclasses.dataclass
    class C:
        seed: int = config.opt(0, "a seed", group="data")
        other: int = config.opt(1, "something else")

    a, b = dataclasses.fields(C)
    assert config.group_of(a) == "data" and config.group_of(b) == "other"
    with pytest.raises(ValueError, match="group"):
        config.opt(0, "x", group="misc")
