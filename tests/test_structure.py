"""The seams a newcomer extends: the source, strategy and SAE registries, and a lint-clean tree."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
import torch

from pipeline.params.data import DataParams
from pipeline.params.sae import SaeParams

from conftest import REPO_ROOT


def test_every_data_source_module_is_registered_under_the_name_params_accept():
    from pipeline.data import sources

    registry = sources.registry()
    assert set(registry) == set(typing.get_args(DataParams.model_fields["source"].annotation))
    assert set(registry) == {"synthetic", "imagefolder", "cifar100", "huggingface"}


def test_a_new_source_file_is_found_by_its_name(tmp_path, monkeypatch):
    """Adding a source = one module in the sources package (plus its params): the registry
    finds it by NAME with no other edit. Here the package is a copy in a temporary folder."""
    import shutil

    from pipeline.data import sources

    package = tmp_path / "more_sources"
    shutil.copytree(sources.__path__[0], package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "tiny.py").write_text("NAME = 'tiny'\n\n\ndef open_split(data, split, workers):\n    return ('tiny', split)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = sources.registry([str(package)], "more_sources")
    assert set(found) == {"synthetic", "imagefolder", "cifar100", "huggingface", "tiny"}
    assert found["tiny"](None, "train", 1) == ("tiny", "train")
    (package / "twin.py").write_text("NAME = 'tiny'\n\n\ndef open_split(data, split, workers):\n    return None\n")
    with pytest.raises(TypeError, match="source name 'tiny' is taken"):
        sources.registry([str(package)], "more_sources")


def test_the_sae_registry_matches_the_params_and_every_kind_round_trips(tmp_path):
    from pipeline.sae.registry import ARCHITECTURES, load_sae, save_sae

    assert set(ARCHITECTURES) == set(typing.get_args(SaeParams.model_fields["architecture"].annotation))
    for name, cls in ARCHITECTURES.items():
        assert cls.ARCHITECTURE == name
        sae = cls.from_config({"dim": 6, "n_latents": 12, "k": 3, "input_scale": 2.0})
        torch.nn.init.normal_(sae.b_dec)
        save_sae(tmp_path / name, sae, {})
        loaded = load_sae(tmp_path / name)
        assert type(loaded) is cls
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
        assert torch.equal(loaded.encode(x), sae.encode(x))


def test_decoding_is_linear_along_the_decoder_directions():
    """What steering and the latent-to-head attribution rely on, for every SAE kind:
    decode(z + t e_j) - decode(z) = t * decoder_directions()[j], in raw embedding space."""
    from pipeline.sae.registry import ARCHITECTURES

    for cls in ARCHITECTURES.values():
        sae = cls.from_config({"dim": 6, "n_latents": 12, "k": 3, "input_scale": 2.5})
        z = torch.rand(4, 12, generator=torch.Generator().manual_seed(1))
        step = torch.zeros(12)
        step[7] = 1.5
        with torch.no_grad():
            change = sae.decode(z + step) - sae.decode(z)
            assert torch.allclose(change, 1.5 * sae.decoder_directions()[7].expand(4, -1), atol=1e-6)
            dense = sae.encode(torch.randn(3, 6))
            values, indices = sae.encode_sparse(torch.randn(3, 6))
        assert dense.shape == (3, 12) and values.shape == indices.shape


def test_an_sae_of_an_unknown_format_is_refused(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.sae.registry import load_sae, save_sae
    from pipeline.sae.topk import TopKSAE

    save_sae(tmp_path / "sae", TopKSAE(4, 8, 2), {})
    config = tmp_path / "sae" / "config.json"
    config.write_text(config.read_text().replace('"topk_sae"', '"gated_sae"'))
    with pytest.raises(PipelineError, match="not an SAE this pipeline knows .*'gated_sae'"):
        load_sae(tmp_path / "sae")


def test_the_tree_is_clean_under_ruff():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "pipeline", "tests", "bench"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_every_name_the_benchmarks_and_tests_import_from_the_package_exists():
    """bench/ scripts run only under `make bench`: a renamed or moved function must fail here,
    not there (and a test helper that imports a name that no longer exists, too)."""
    import ast
    import importlib

    missing = []
    for path in sorted([*(REPO_ROOT / "bench").glob("*.py"), *(REPO_ROOT / "tests").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ModuleNotFoundError:
                            missing.append(f"{path.name}: {node.module}.{alias.name}")
    assert not missing, missing
