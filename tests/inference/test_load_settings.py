"""The load settings are defined once (`conf/load/default.yaml`, `LoadSettings`) and reach every front end; the
cache folder is defined once (`llava_lit.cache`) and every config resolves it the same way."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llava_lit.cache import cache_dir
from llava_lit.chat import ChatConfig
from llava_lit.checkpoint_reader import default_workdir
from llava_lit.inference import load_for_inference
from llava_lit.load_settings import LoadSettings
from llava_lit.predict import PredictConfig
from llava_lit.serve import ServeConfig

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
REQUIRED = {
    "chat": ["checkpoint=c.ckpt"],
    "serve": ["checkpoint=c.ckpt"],
    "predict": ["checkpoint=c.ckpt", "questions_file=q", "image_folder=i", "answers_file=a"],
}
OVERRIDES = ["dtype=bfloat16", "attn_implementation=eager", "template=llama_2", "load_in_8bit=true"]
ASKED = LoadSettings(dtype="bfloat16", attn_implementation="eager", template="llama_2", load_in_8bit=True)


def _compose(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_container(compose(config_name=name, overrides=overrides), resolve=False)


@pytest.mark.parametrize(
    ("name", "settings_class"), [("chat", ChatConfig), ("serve", ServeConfig), ("predict", PredictConfig)]
)
def test_every_front_end_takes_the_same_load_settings(name, settings_class):
    default = settings_class(**_compose(name, REQUIRED[name]))
    assert default.load_settings() == LoadSettings()
    asked = settings_class(**_compose(name, REQUIRED[name] + OVERRIDES))
    assert asked.load_settings() == ASKED


def test_the_evaluation_config_carries_them_too():
    cfg = _compose("eval", OVERRIDES)
    assert {f.name: cfg[f.name] for f in dataclasses.fields(LoadSettings)} == dataclasses.asdict(ASKED)


def test_the_attention_setting_reaches_the_language_model(tiny_checkpoint):
    bundle = load_for_inference(tiny_checkpoint, LoadSettings(attn_implementation="eager"))
    assert bundle.model.language_model.config._attn_implementation == "eager"


def test_the_cache_folder_is_one_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LIT_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    assert default_workdir("owner/name").parent == tmp_path / "cache" / "imported"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        train = compose(config_name="train", overrides=["hydra.job.chdir=false"], return_hydra_config=True)
        evaluation = compose(config_name="eval", return_hydra_config=True)
        assert train.paths.cache_dir == str(tmp_path / "cache")
        assert train.paths.world_dir == evaluation.world_dir == str(tmp_path / "cache" / "world")
    monkeypatch.delenv("LLAVA_LIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "llava_lit"
