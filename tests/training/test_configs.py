"""Every config file composes, and what can be built without downloads or GPUs is built.

Mirrors lightning-hydra-template's config tests: compose the real `conf/train.yaml` with each choice of each
group and with every experiment file, then instantiate trainers, strategies, loggers, callbacks and data modules.
Real-size models are built on the meta device from the configs held in `conf/hf_configs/`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import OmegaConf, open_dict

import llava_lit.world.__main__  # noqa: F401  (stores the schema that conf/world_build.yaml extends)
from llava_lit.hydra_app import config_dir
from llava_lit.train import fit_micro_batch, num_processes, run_accumulation

CONF = config_dir()
HF_CONFIGS = CONF / "hf_configs"
GROUPS = ["model", "data", "trainer", "logger", "callbacks", "stage", "launcher"]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))


def _compose(config_name: str, overrides: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        if "paths" in cfg:
            cfg.paths.output_dir = str(tmp_path)
    return cfg


def _resolve(cfg) -> dict:
    """Resolve every interpolation of the run (the hydra node is launcher state and is left out)."""
    return {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k != "hydra"
    }


def _choices() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml")) if p.stem != "default"]


@pytest.mark.parametrize(("group", "choice"), _choices(), ids=lambda x: str(x))
def test_every_group_choice_composes_and_resolves(group, choice, tmp_path):
    cfg = _compose("train", [f"{group}={choice}"], tmp_path)
    _resolve(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_consistent_batch_arithmetic(experiment, tmp_path):
    cfg = _compose("train", [f"experiment={experiment}"], tmp_path)
    _resolve(cfg)
    assert cfg.run_name in experiment
    if experiment.endswith(("_align", "_finetune")):  # a recipe of one stage; the world's serve both
        assert cfg.stage.name in experiment
    assert cfg.global_batch_size % (cfg.micro_batch_size * num_processes(cfg.trainer)) == 0


@pytest.mark.parametrize("name", PRIMARY)
def test_every_primary_config_composes(name, tmp_path):
    cfg = _compose(name, [], tmp_path)
    # Values a user must give (`???`, e.g. the checkpoint to chat with) get a stand-in; the rest must resolve.
    with open_dict(cfg):
        for key in OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])):
            OmegaConf.update(cfg, key, "given-by-user")
    _resolve(cfg)


@pytest.mark.parametrize("trainer", ["cpu", "fsdp_cpu"])
def test_cpu_trainers_instantiate(trainer, tmp_path):
    cfg = _compose("train", [f"trainer={trainer}"], tmp_path)
    built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert built.world_size == num_processes(cfg.trainer)


@pytest.mark.parametrize("trainer", ["fsdp_8gpu", "multi_node"])
def test_gpu_strategies_instantiate(trainer, tmp_path):
    cfg = _compose("train", [f"trainer={trainer}"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(
        strategy, ModelParallelStrategy
    )  # Lightning's FSDP2 strategy, with atomic sharded saves
    assert strategy._data_parallel_size == num_processes(cfg.trainer)
    assert cfg.module.sharding.param_dtype == "bfloat16" and cfg.module.sharding.activation_checkpointing


def test_loggers_and_callbacks_instantiate(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _compose("train", ["logger=wandb"], tmp_path)
    for node in list(cfg.logger.values()) + list(cfg.callbacks.values()):
        instantiate(node)


@pytest.mark.parametrize("data", ["world_align", "world_finetune", "lcs558k", "mix665k"])
def test_data_modules_instantiate(data, tmp_path, llama_tokenizer):
    from transformers import CLIPImageProcessor

    cfg = _compose("train", [f"data={data}"], tmp_path)
    dm = instantiate(
        cfg.data, tokenizer=llama_tokenizer, image_processor=CLIPImageProcessor(), num_image_tokens=576
    )
    assert dm.micro_batch_size == cfg.micro_batch_size


@pytest.mark.parametrize(
    ("model", "vision", "llm", "projector_params", "image_tokens"),
    [
        ("llava_v15_7b", "clip-vit-large-patch14-336", "vicuna-7b-v1.5", 20_979_712, 576),
        ("llava_v15_13b", "clip-vit-large-patch14-336", "vicuna-13b-v1.5", 31_467_520, 576),
        ("llava_v1_7b", "clip-vit-large-patch14", "vicuna-7b-v1.3", 4_198_400, 256),
        ("llava_v1_13b", "clip-vit-large-patch14", "vicuna-13b-v1.3", 5_248_000, 256),
    ],
)
def test_real_model_configs_build_on_meta(
    model, vision, llm, projector_params, image_tokens, tmp_path, llama_tokenizer
):
    cfg = _compose(
        "train",
        [
            f"model={model}",
            f"model.vision_tower.config_path={HF_CONFIGS / (vision + '.json')}",
            f"model.language_model.config_path={HF_CONFIGS / (llm + '.json')}",
        ],
        tmp_path,
    )
    built = instantiate(cfg.model, tokenizer=llama_tokenizer, device="meta")
    assert sum(p.numel() for p in built.projector.parameters()) == projector_params
    assert built.num_image_tokens == image_tokens


@pytest.mark.parametrize(
    ("experiment", "gbs", "lr", "epochs"),
    [
        ("llava_v15_7b_align", 256, 1e-3, 1),
        ("llava_v15_13b_finetune", 128, 2e-5, 1),
        ("llava_v1_7b_align", 128, 2e-3, 1),
        ("llava_v1_13b_finetune", 32, 2e-5, 3),
    ],
)
def test_experiments_carry_the_official_hyperparameters(experiment, gbs, lr, epochs, tmp_path):
    cfg = _compose("train", [f"experiment={experiment}"], tmp_path)
    assert (cfg.global_batch_size, cfg.optimizer.lr, cfg.trainer.max_epochs) == (gbs, lr, epochs)
    assert cfg.module.weight_decay == 0.0 and cfg.module.warmup_ratio == 0.03 and cfg.data.max_length == 2048


def test_the_default_recipe_on_an_8gpu_node_keeps_its_global_batch(tmp_path):
    cfg = _compose("train", ["stage=finetune", "trainer=fsdp_8gpu"], tmp_path)
    assert (cfg.global_batch_size, cfg.micro_batch_size, num_processes(cfg.trainer)) == (32, 32, 8)
    fit_micro_batch(cfg)
    assert cfg.micro_batch_size == cfg.data.micro_batch_size == 4 and run_accumulation(cfg) == 1


@pytest.mark.parametrize(
    "recipe",
    [
        "llava_v15_{}_align",
        "llava_v15_{}_finetune",
        "llava_v1_{}_align",
        "llava_next_{}_align",
        "llava_next_{}_finetune",
    ],
)
def test_13b_recipes_are_their_7b_twins_with_another_model(recipe, tmp_path):
    small, big = (
        OmegaConf.to_container(_compose("train", [f"experiment={recipe.format(size)}"], tmp_path))
        for size in ("7b", "13b")
    )
    for cfg in (small, big):
        for key in ("model", "run_name", "hydra"):
            cfg.pop(key, None)
    assert small == big


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_lora_experiments_are_the_finetune_recipe_with_the_official_lora_settings(size, tmp_path):
    full = _compose("train", [f"experiment=llava_v15_{size}_finetune"], tmp_path)
    lora = _compose("train", [f"experiment=llava_v15_{size}_lora_finetune"], tmp_path)
    qlora = _compose("train", [f"experiment=llava_v15_{size}_qlora_finetune"], tmp_path)
    settings = lora.module.lora
    assert (settings.enabled, settings.r, settings.alpha, settings.dropout) == (True, 128, 256, 0.05)
    assert (lora.optimizer.lr, lora.module.projector_lr, lora.global_batch_size) == (2e-4, 2e-5, 128)
    assert lora.trainer.strategy == "ddp" and lora.model.language_model.dtype == "bfloat16"
    same_data = {k: v for k, v in full.data.items() if k != "micro_batch_size"}
    assert {k: v for k, v in lora.data.items() if k != "micro_batch_size"} == same_data
    assert lora.model.vision_tower.name_or_path == full.model.vision_tower.name_or_path
    assert lora.init_projector.endswith(f"llava_v15_{size}/align/checkpoints/projector.safetensors")
    assert qlora.module.lora.quantize == "nf4" and qlora.optimizer.name == "paged_adamw_8bit"
    assert qlora.module.lora.r == 128 and qlora.optimizer.lr == 2e-4


def test_world_lora_experiments_change_only_the_adapters_and_learning_rates(tmp_path):
    """The world's LoRA and QLoRA finetunes differ from its full finetune in the LoRA settings, the learning rates,
    the run name and the shared stage-1 projector only, so the three are comparable on the same data."""
    full, lora, qlora = (
        OmegaConf.to_container(_compose("train", ["stage=finetune", *extra], tmp_path), resolve=False)
        for extra in ([], ["experiment=world_lora"], ["experiment=world_qlora"])
    )
    settings = lora["module"]["lora"]
    assert (settings["enabled"], settings["r"], settings["alpha"]) == (True, 16, 32)
    assert qlora["module"]["lora"] == {**lora["module"]["lora"], "quantize": "nf4"}
    assert lora["init_projector"] == "${paths.output_root}/world/align/checkpoints/projector.safetensors"
    for cfg in (full, lora, qlora):
        for key in ("lora", "projector_lr"):
            cfg["module"].pop(key)
        for key in ("learning_rate", "run_name", "init_projector", "hydra"):
            cfg.pop(key, None)
    assert full == lora == qlora


def test_the_stage_alone_trains_on_the_world(tmp_path):
    """Without `data=`, each stage takes the world's data of that stage; the finetune adds its sample answers."""
    align = _compose("train", [], tmp_path)
    assert align.data._target_ == "llava_lit.world.data.WorldDataModule"
    assert align.data.template == "plain" and align.data.world.preset == "default"
    assert "sample_answers" not in align.callbacks
    finetune = _compose("train", ["stage=finetune"], tmp_path)
    assert finetune.data._target_ == "llava_lit.world.data.WorldDataModule"
    assert finetune.data.template == "vicuna_v1"
    assert list(finetune.callbacks)[-1] == "sample_answers"
    assert finetune.callbacks.sample_answers.benchmark._target_ == "llava_lit.world.benchmark.WorldBenchmark"
    assert _compose("train", ["stage=finetune", "world.preset=ci"], tmp_path).data.world.preset == "ci"


def test_a_stage_plus_a_data_choice_leaves_the_world_out(tmp_path):
    cfg = _compose("train", ["stage=finetune", "data=mix665k"], tmp_path)
    assert cfg.stage.name == "finetune"
    assert cfg.data._target_ == "llava_lit.datamodule.LlavaDataModule"
    assert cfg.data.template == "vicuna_v1"
    assert set(cfg.callbacks) == {"model_checkpoint", "preemption", "projector_export"}
    assert "world" not in cfg and "evaluate" not in cfg
    _resolve(cfg)


def test_llava_next_finetune_is_anyres_over_the_llava_v15_recipe(tmp_path):
    """Stage 2 of LLaVA-NeXT: the LLaVA-1.5 finetune plus AnyRes (both switches), the tower at its own lr, 4096
    tokens; stage 1 is LLaVA-1.5's at base resolution."""
    v15 = _compose("train", ["experiment=llava_v15_7b_finetune"], tmp_path)
    nxt = _compose("train", ["experiment=llava_next_7b_finetune"], tmp_path)
    assert nxt.data.image_aspect == "anyres" and v15.data.image_aspect == "pad"
    assert nxt.model.anyres.grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert nxt.model.anyres.unpad and nxt.model.anyres.newline and v15.model.anyres is None
    assert nxt.stage.train_vision_tower and nxt.module.vision_tower_lr == 2e-6
    assert nxt.data.max_length == 4096
    align = _compose("train", ["experiment=llava_next_7b_align"], tmp_path)
    assert align.model.anyres is None and align.data.image_aspect != "anyres"
    assert nxt.init_projector.endswith("llava_next_7b/align/checkpoints/projector.safetensors")
