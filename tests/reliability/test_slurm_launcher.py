"""`launcher=slurm` composes into the SLURM job a cluster run needs (checked on the sbatch script submitit would
submit; the submission itself needs a cluster). Its requeue-and-resume path runs for real through submitit's
local executor in `test_preemption.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from llava_lit.hydra_app import config_dir

CONF_DIR = str(config_dir())


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


def _sbatch(cfg, folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sbatch script hydra-submitit-launcher would submit for `cfg`, built as its `launch` builds it."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import SlurmExecutor

    # The one probe of a real cluster (is `srun` on the PATH?); everything after it is submitit's own code.
    monkeypatch.setattr(SlurmExecutor, "affinity", staticmethod(lambda: 1))
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=folder, slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m llava_lit.train", "uid")


@pytest.mark.parametrize(("trainer", "nodes"), [("fsdp_8gpu", 1), ("multi_node", 2)])
def test_slurm_jobs_ask_for_the_trainers_gpus_and_a_notice_before_the_time_limit(
    trainer, nodes, tmp_path, monkeypatch
):
    cfg = _compose("launcher=slurm", f"trainer={trainer}", "hydra.launcher.partition=gpu")
    assert cfg.ckpt_path == "last"  # every (re)start of the job continues from its last checkpoint
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    # The job's folder is the local run's: outputs/<run_name>/<stage>.
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == "world/align"
    script = _sbatch(cfg, tmp_path, monkeypatch)
    assert f"#SBATCH --nodes={nodes}" in script
    assert "#SBATCH --ntasks-per-node=8" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --signal=USR2@120" in script  # the notice the preemption callback saves and requeues on
    assert "#SBATCH --partition=gpu" in script
    assert "#SBATCH --time=1440" in script


def test_the_local_launcher_is_the_same_path_on_this_machine():
    cfg = _compose("launcher=local")
    assert cfg.ckpt_path == "last" and cfg.hydra.launcher._target_.endswith("LocalLauncher")
    assert OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["tasks_per_node"] == 1
