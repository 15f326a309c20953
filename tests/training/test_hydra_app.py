"""The command lines' shared Hydra set-up: configs found from the package, `--help` with each setting's doc."""

from __future__ import annotations

import ast
import dataclasses
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from llava_lit.hydra_app import (
    compose_config,
    config_dir,
    dataclass_field_docs,
    render_settings_help,
    yaml_key_docs,
)

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "llava_lit"
ENTRY_POINTS = {
    "train": "llava_lit.train",
    "predict": "llava_lit.predict",
    "chat": "llava_lit.chat",
    "serve": "llava_lit.serve",
    "eval": "llava_lit.eval.__main__",
    "generate": "llava_lit.generate",
    "export": "llava_lit.export",
    "convert": "llava_lit.convert",
    "world_build": "llava_lit.world.__main__",
    "world_app": "llava_lit.world.evaluate",
}
"""Each primary config and the module whose `hydra_app` declares it."""


def test_the_config_tree_is_the_package_llava_lit_conf():
    assert config_dir() == (ROOT / "conf").resolve()
    assert (config_dir() / "train.yaml").is_file() and (config_dir() / "__init__.py").is_file()
    assert sorted(p.stem for p in config_dir().glob("*.yaml")) == sorted(ENTRY_POINTS)


def test_yaml_key_docs(tmp_path):
    path = tmp_path / "group.yaml"
    path.write_text(
        "# What this file is (not a key's doc).\n"
        "first: 1\n"
        "# Above the key,\n"
        "# in two lines.\n"
        "second: 2\n"
        "nested:\n"
        "  inner: 'a # not a comment'   # the inner value\n"
        "                               # continued here\n"
        "  other: 3\n"
        "plain: 4\n"
    )
    assert yaml_key_docs(path, package="group") == {
        "group.second": "Above the key, in two lines.",
        "group.nested.inner": "the inner value continued here",
    }
    path.write_text("# @package _global_\nlr: 1  # learning rate\n")
    assert yaml_key_docs(path, package="stage") == {"lr": "learning rate"}


def test_dataclass_field_docs_follow_nested_dataclasses():
    from llava_lit.model.llava import LlavaModelConfig

    docs = dataclass_field_docs(LlavaModelConfig, "model.")
    assert docs["model.projector"].startswith("Projector type")
    assert "hub id" in docs["model.vision_tower.name_or_path"]
    assert "causal LM" in docs["model.language_model.name_or_path"]


@pytest.mark.parametrize("name", ["export", "convert"])
def test_cli_configs_are_their_dataclasses(name):
    """`conf/<name>.yaml` holds exactly the fields of the settings dataclass, with the same defaults."""
    module = __import__(ENTRY_POINTS[name], fromlist=["_"])
    schema = {"export": "ExportConfig", "convert": "ConvertConfig"}[name]
    fields = dataclasses.fields(getattr(module, schema))
    cfg = compose_config(name)
    assert list(cfg) == [f.name for f in fields]
    for f in fields:
        expected = "???" if f.default is dataclasses.MISSING else f.default
        assert OmegaConf.to_container(cfg, resolve=False)[f.name] == expected, f.name


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_lists_every_setting_with_a_doc(name):
    __import__(ENTRY_POINTS[name])  # declares the app and its schemas, as `python -m` does
    GlobalHydra.instance().clear()
    cfg = compose_config(name, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    text = cfg.hydra.help.template
    settings = OmegaConf.to_container(cfg, resolve=False)
    settings.pop("hydra")
    lines = text.splitlines()
    for key in leaf_keys(settings):
        assert any(line.startswith(f"  {key}=") for line in lines), (name, key)
    assert any(line.startswith("      ") for line in lines), f"{name}: no setting has a doc"
    assert text == render_settings_help(cfg)  # what the resolver renders


def leaf_keys(node: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves of a config container (an empty mapping is a leaf)."""
    keys = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_help_docs_come_from_the_chosen_group_files():
    __import__("llava_lit.train")
    GlobalHydra.instance().clear()
    cfg = compose_config("train", ["data=mix665k"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    text = render_settings_help(cfg)
    assert "  data=mix665k  (" in text
    lines = text.splitlines()
    at = lines.index("  data.group_by_length=true")  # the chosen file's value, and its doc
    assert lines[at + 1].strip().startswith("sort each optimizer step's samples by length")
    assert "  data.template=vicuna_v1" in lines


@pytest.mark.slow
def test_train_help_from_outside_the_checkout(tmp_path):
    """`python -m llava_lit.train --help` lists `global_batch_size` with its doc, run from another folder."""
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "llava_lit.train", "--help", "stage=finetune"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = lines.index("  global_batch_size=32")
    assert lines[at + 1].strip().startswith("Batch arithmetic as in LLaVA's scripts")
    assert "  stage=finetune  (align, finetune)" in lines
    assert any(line.strip().startswith("Projector type") for line in lines)  # a dataclass field's doc
    assert "--hydra-help" in done.stdout  # Hydra's own flags follow
    assert list(tmp_path.iterdir()) == []  # --help writes nothing


@pytest.mark.slow
def test_the_wheel_ships_the_config_tree(tmp_path):
    """A non-editable install gets every config file inside the package as `llava_lit/conf/...`."""
    project = tmp_path / "project"  # a copy, so the build leaves nothing in the checkout
    project.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, project)
    for name in ["src", "conf"]:
        shutil.copytree(
            ROOT / name, project / name, symlinks=True, ignore=shutil.ignore_patterns("*.egg-info")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            project,
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("llava_lit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"llava_lit/conf/{p.relative_to(ROOT / 'conf')}"
        for p in (ROOT / "conf").rglob("*")
        if p.suffix in {".yaml", ".json", ".py"} and "local" not in p.relative_to(ROOT / "conf").parts
    }
    assert expected <= names, sorted(expected - names)
    assert "llava_lit/hydra_app.py" in names


def test_prediction_owns_the_question_answer_format():
    """`qa_files` and `predict` import nothing from `eval` (the benchmarks import the format from them)."""
    for path in [SRC / "qa_files.py", SRC / "predict.py", *sorted((SRC / "inference").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("llava_lit.eval"), (path, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("llava_lit.eval") for a in node.names), path
    assert not (SRC / "eval" / "jsonl.py").exists()
