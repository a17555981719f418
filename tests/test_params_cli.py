"""Typed parameters and the CLI: every bad value exits 2 with one message naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ParamsError
from pipeline.params.file import Params, load_params, parse_params

from conftest import PARAMS_COMMANDS, REPO_ROOT

runner = CliRunner()


def test_the_real_params_file_parses():
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "synthetic"  # the offline demo is the default


def test_every_section_forbids_unknown_keys_and_documents_its_fields():
    for name, field in Params.model_fields.items():
        section = field.annotation
        assert section.model_config["extra"] == "forbid", name
        for key, sub in section.model_fields.items():
            assert sub.description, f"{name}.{key} has no docstring"


BAD = [
    # (mutation of the tiny params, key path expected in the message, fragment of the reason)
    ({"sae": {"k": "many"}}, "sae.k", "valid integer"),
    ({"sae": {"k": 0}}, "sae.k", "greater than or equal to 1"),
    ({"data": {"colour": "red"}}, "data.colour", "unknown key"),
    ({"data": {"source": "imagenet"}}, "data.source", "synthetic"),
    ({"data": {"source": "imagefolder", "path": None}}, "data", "needs `path`"),
    ({"model": {"img_size": 30, "patch_size": 4}}, "model", "not divisible"),
    ({"model": {"pretrained": True, "checkpoint": "w.safetensors"}}, "model", "exclusive"),
    ({"sae": {"n_latents": 8, "k": 16}}, "sae", "k 16 must be <= n_latents 8"),
    ({"steer": {"alphas": []}}, "steer", "at least one"),
    ({"steer": {"mode": "scale", "alphas": [-2.0, 0.0]}}, "steer", ">= -1"),
    ({"finetune": {"batch_size": 10, "nproc": 3}}, "finetune", "divisible by nproc"),
    ({"finetune": {"lr": -1}}, "finetune.lr", "greater than 0"),
    ({"sae": {"architecture": "gated"}}, "sae.architecture", "'topk', 'batchtopk', 'jumprelu', 'matryoshka' or 'frozen_random'"),
    ({"sae": {"jumprelu": {"bandwidth": 0}}}, "sae.jumprelu.bandwidth", "greater than 0"),
    ({"sae": {"jumprelu": {"l0": 0.1}}}, "sae.jumprelu.l0", "unknown key"),
    ({"sae": {"matryoshka": {"prefixes": [0.5, 1.5]}}}, "sae.matryoshka.prefixes.1", "less than or equal to 1"),
    ({"sae": {"batchtopk": {"threshold_momentum": 1.0}}}, "sae.batchtopk.threshold_momentum", "less than 1"),
    ({"sae": {"architecture": "jumprelu", "trainer": "fast"}}, "sae", "trains only topk"),
]


@pytest.mark.parametrize(("mutation", "key", "reason"), BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_invalid_values_fail_with_a_message_naming_the_key(tiny_params_dict, mutation, key, reason):
    with pytest.raises(ParamsError) as info:
        parse_params(tiny_params_dict(**mutation), "p.yaml")
    message = str(info.value)
    assert key in message and reason in message, message
    assert "\n" not in message


def test_missing_section_is_named(tiny_params_dict):
    raw = tiny_params_dict()
    del raw["steer"]
    with pytest.raises(ParamsError, match=r"steer: missing"):
        parse_params(raw)


@pytest.mark.parametrize("command", PARAMS_COMMANDS)
def test_every_command_exits_2_without_traceback_or_output(in_tmp, tiny_params_dict, command):
    Path("bad.yaml").write_text(yaml.safe_dump(tiny_params_dict(sae={"k": -3})))
    result = runner.invoke(app, [*command.split(), "--params", "bad.yaml"])
    assert result.exit_code == 2
    assert "sae.k = -3" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in in_tmp.iterdir()) == ["bad.yaml"]  # nothing written


@pytest.mark.parametrize("command", PARAMS_COMMANDS)
def test_every_command_refuses_an_unregistered_strategy_with_exit_2(in_tmp, tiny_params_dict, command):
    """Strategy names come from the registry in pipeline/steering/strategies.py, checked by the CLI for
    every command (not by pipeline/params/, which would make every stage depend on the registry)."""
    Path("bad.yaml").write_text(yaml.safe_dump(tiny_params_dict(steer={"strategies": ["global", "oracle"]})))
    result = runner.invoke(app, [*command.split(), "--params", "bad.yaml"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "steer.strategies.1 = 'oracle': unknown strategy (known: per_class, per_class_predicted, global, random, random_per_class, random_direction, class_direction, gate_direction)" in result.output
    assert sorted(p.name for p in in_tmp.iterdir()) == ["bad.yaml"]  # nothing written


def test_unreadable_and_non_yaml_files(in_tmp):
    assert runner.invoke(app, ["validate", "--params", "nope.yaml"]).exit_code == 2
    Path("x.yaml").write_text("data: [unclosed")
    result = runner.invoke(app, ["validate", "--params", "x.yaml"])
    assert result.exit_code == 2 and "not valid YAML" in result.output


def test_validate_accepts_a_good_file(in_tmp, tiny_params_dict):
    Path("p.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    result = runner.invoke(app, ["validate", "--params", "p.yaml"])
    assert result.exit_code == 0 and "valid" in result.output


def test_python_dash_m_entry_point_works():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    for command in PARAMS_COMMANDS:
        assert command.split()[0] in out.stdout


def test_parameter_reference_is_current():
    """docs/PARAMS.md is generated by `pipeline params-doc`; regenerate it after editing a module of pipeline/params."""
    from pipeline.params.file import describe_params

    assert (REPO_ROOT / "docs/PARAMS.md").read_text() == describe_params() + "\n"
