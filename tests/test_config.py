"""The real configs compose for every task, data set and preset, and bad values fail before training."""
from __future__ import annotations

import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from hydra_helpers import CONFIG_DIR, REPO_ROOT, compose_config, config_names
from omegaconf import OmegaConf

import xconv
from xconv.lightning import XConvCallback
from experiments.errors import ConfigError
from experiments.config import check_trainer_arguments, xconv_change, xconv_config
from experiments.registry import register
from experiments.tasks import XConvTask
import experiments.build
from experiments.cli import remove_unused_run_dir
from run import build

# The task each data set and model config is for; every config of the two groups must be listed here.
DATA_TASK = {
    "digit_scenes": "segmentation", "folder": "segmentation", "glas": "segmentation", "oxford_pet": "segmentation",
    "digits": "classification", "mnist": "classification", "cifar10": "classification",
    "superres_image": "superres", "inpainting_image": "inpainting",
}
MODEL_TASK = {
    "unet": "segmentation", "small_cnn": "classification", "resnet18_cifar": "classification", "skip_net": "superres",
    "dcgan": "gan",
}


@pytest.mark.parametrize("task", config_names("task"))
def test_every_task_composes_and_builds(task, tmp_path):
    cfg = compose_config(f"task={task}", output_dir=tmp_path)
    assert cfg.task_name == task
    assert issubclass(get_class(cfg.data._target_), L.LightningDataModule)
    module = instantiate(cfg.task)
    assert isinstance(module, XConvTask)
    assert module.metric_name
    # The config names the class's own metric, so a task built in Python (no metric) scores the same.
    assert (module.metric_name, module.metric_mode) == (cfg.task.metric.name, cfg.task.metric.mode)
    assert (type(module).metric_name, type(module).metric_mode) == (cfg.task.metric.name, cfg.task.metric.mode)


@pytest.mark.parametrize("data", config_names("data"))
def test_every_data_config_composes(data, tmp_path):
    cfg = compose_config(f"task={DATA_TASK[data]}", f"data={data}", output_dir=tmp_path)
    assert issubclass(get_class(cfg.data._target_), L.LightningDataModule)
    if "num_classes" in cfg.task:
        assert cfg.task.num_classes == cfg.data.num_classes


@pytest.mark.parametrize("model", config_names("model"))
def test_every_model_config_builds_for_its_task(model, tmp_path):
    # Each task's default data set sets the input shape and the number of classes.
    cfg = compose_config(f"task={MODEL_TASK[model]}", f"model={model}", output_dir=tmp_path)
    net = instantiate(cfg.model)
    if MODEL_TASK[model] == "superres":  # deep image prior: a noise image in, an RGB image of its size out
        assert net(torch.rand(1, cfg.model.in_channels, 40, 44)).shape == (1, 3, 40, 44)
        return
    size = cfg.data.image_size
    if MODEL_TASK[model] == "gan":  # a {generator, discriminator} pair: latent codes -> images -> logits
        images = net["generator"](torch.randn(2, net["generator"].latent_dim))
        assert images.shape == (2, cfg.data.in_channels, size, size)
        assert net["discriminator"](images).shape == (2,)
        return
    out = net(torch.rand(2, cfg.model.in_channels, size, size))
    assert out.shape[:2] == (2, cfg.data.num_classes)


@pytest.mark.parametrize("experiment", config_names("experiment"))
def test_every_experiment_preset_composes(experiment, tmp_path):
    cfg = compose_config(f"experiment={experiment}", output_dir=tmp_path)
    assert get_class(cfg.task._target_)


def test_defaults():
    cfg = compose_config()
    assert cfg.task_name == "segmentation" and cfg.seed == 0
    assert dict(cfg.xconv) == {
        "probes": 8, "mode": "independent", "distribution": "gaussian", "per_sample": False, "contraction": "auto",
        "deflation": None, "deflation_rank": None,
        "relu": "bit", "min_pixels": None, "include": None, "exclude": None, "storage": "sketch", "bits": None,
        "max_compression": None, "batchnorm_bits": None, "maxpool": False, "budget": None,
    }
    assert cfg.checkpointing is None
    assert set(cfg.logger) == {"wandb", "csv"} and cfg.logger.wandb.mode == "offline"


SR4 = {"storage": "quantized", "bits": 4, "batchnorm_bits": 4, "maxpool": True}
SKETCH = {"storage": "sketch", "bits": None, "batchnorm_bits": None, "maxpool": False}


@pytest.mark.parametrize("task", config_names("task"))
def test_each_task_s_xconv_default(task):
    """Segmentation keeps the paper's sketch (``task=segmentation xconv.probes=8`` is the paper's XConv;
    ``make run`` names ``xconv=plan25``); the other tasks default to SR 4-bit storage (``xconv=sr4``);
    ``xconv=default`` gives every task the sketch."""
    default = compose_config(f"task={task}").xconv
    assert {key: default[key] for key in SR4} == (SKETCH if task == "segmentation" else SR4)
    sketch = compose_config(f"task={task}", "xconv=default").xconv
    assert {key: sketch[key] for key in SKETCH} == SKETCH


XCONV_PRESETS = {  # what each xconv group option stores, as (storage, bits, probes, max_compression, budget, relu)
    "default": ("sketch", None, 8, None, None, "bit"), "exact": ("sketch", None, 0, None, None, "exact"),
    "r32": ("sketch", None, 32, None, None, "bit"), "cap16": ("sketch", None, 8, 16, None, "bit"),
    "sr8": ("quantized", 8, 8, None, None, "bit"), "sr4": ("quantized", 4, 8, None, None, "bit"),
    "sr2": ("quantized", 2, 8, None, None, "bit"), "plan50": ("sketch", None, 8, None, 0.5, "bit"),
    "plan25": ("sketch", None, 8, None, 0.25, "bit"),
}


def test_every_xconv_option_is_listed_and_checked():
    assert sorted(XCONV_PRESETS) == config_names("xconv")
    for name, expected in XCONV_PRESETS.items():
        options = xconv_config(compose_config("task=segmentation", f"xconv={name}"), overrides=[])
        assert (options.storage, options.bits, options.probes, options.max_compression, options.budget,
                options.relu) == expected, name
        if options.storage == "quantized":
            assert options.batchnorm_bits == options.bits and options.maxpool
        assert (options.batchnorm_bits, options.maxpool) == ((4, True) if options.budget else
                                                             (options.bits, options.storage == "quantized"))


@pytest.mark.parametrize("experiment", [name for name in config_names("experiment") if name.startswith("paper_")])
def test_paper_presets_run_the_paper_s_sketch(experiment):
    assert compose_config(f"experiment={experiment}").xconv.storage == "sketch"


@pytest.mark.parametrize("overrides, refused", [
    (["task=classification", "xconv.probes=8"], "xconv.probes"),
    (["task=gan", "xconv.distribution=rademacher"], "xconv.distribution"),
    (["task=inpainting", "xconv.probes=0"], "xconv.probes"),
    (["xconv=sr4", "xconv.contraction=probes"], "xconv.contraction"),
    (["task=classification", "xconv=default", "xconv.probes=8"], None),
    (["task=superres", "xconv.bits=8", "xconv.relu=exact"], None),
    (["xconv=plan25", "xconv.probes=16"], None),  # the planner may give a conv the sketch
])
def test_a_sketch_option_named_with_sr_storage_is_refused(overrides, refused):
    """It would change nothing; the user meant the paper's sketch, which ``xconv=default`` selects."""
    cfg = compose_config(*overrides)
    if refused is None:
        assert xconv_config(cfg, overrides) is not None
    else:
        with pytest.raises(ConfigError, match=rf"^{re.escape(refused)}: a sketch option, .*add xconv=default"):
            xconv_config(cfg, overrides)


@pytest.mark.parametrize("overrides, message", [
    # refused before the dataclass's own check of a non-default sketch value, whose message gives no way out
    (["task=gan", "xconv.mode=multi"], "xconv.mode: a sketch option, unused with xconv.storage=quantized (xconv=sr4; add "
                                       "xconv=default for the paper's sketch)"),
    (["xconv.storage=quantized", "xconv.bits=4", "xconv.probes=8"],
     "xconv.probes: a sketch option, unused with xconv.storage=quantized (drop xconv.storage=quantized for the paper's sketch)"),
])
def test_the_refusal_names_the_xconv_config_that_stores_sr_inputs(overrides, message):
    """With Hydra's runtime config (as run.py and the sweep launcher have it): the xconv choice and the overrides."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        xconv_config(cfg)


@pytest.mark.parametrize("args", [["task=classification", "xconv.probes=8"],
                                  ["-m", "task=classification", "xconv=default,sr4", "xconv.probes=8"]],
                         ids=["run", "sweep"])  # the sweep: its second job
def test_a_sketch_option_with_sr_storage_exits_2_before_training(args, tmp_path):
    out = tmp_path / "out"
    where = f"hydra.sweep.dir={out}" if "-m" in args else f"hydra.run.dir={out}"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), *args, "debug=tiny", where],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: xconv.probes: a sketch option, unused with "
                                                      "xconv.storage=quantized (xconv=sr4; add xconv=default for the paper's sketch)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, name", [
    ([], "probes8"), (["xconv=exact"], "probes0"), (["task=gan"], "sr4"), (["xconv=sr2"], "sr2"),
    (["xconv=plan50"], "plan0.5"), (["task=superres", "xconv=default", "xconv.probes=32"], "probes32"),
])
def test_runs_are_named_by_their_xconv_options(overrides, name):
    """Run directories (configs/hydra/default.yaml) and W&B runs: an SR or planned run is not named after its unused probes."""
    cfg = compose_config(*overrides)
    assert cfg.logger.wandb.name == f"{cfg.task_name}-{name}"
    hydra = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "hydra" / "default.yaml"))  # unresolved
    assert hydra["run"]["dir"].endswith("_${xconv_name:${xconv}}")
    assert hydra["sweep"]["subdir"].endswith("_${xconv_name:${xconv}}")


def test_wandb_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_config().logger.wandb.mode == "disabled"


def test_wandb_logger_starts_without_deprecation_warnings(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    instantiate(compose_config(output_dir=tmp_path).logger.wandb).experiment.finish()
    assert "anonymous" not in capfd.readouterr().err


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_slurm_launchers_compose_and_follow_the_trainer(launcher):
    overrides = [f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu", "trainer.devices=4", "trainer.num_nodes=2"]
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    options = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert get_class(options["_target_"]).__name__ == "SlurmLauncher" and options["partition"] == "gpu"
    if launcher == "slurm":  # one SLURM task per device, as Lightning's SLURMEnvironment requires
        assert (options["nodes"], options["tasks_per_node"], options["gpus_per_node"]) == (2, 4, 4)
        assert options["submitit_folder"].startswith(f"multirun/{cfg.task_name}/")


def test_xconv_group_is_the_convert_options_schema_in_one_vocabulary():
    """configs/xconv/ lists every option of xconv.convert, in the API's own words (relu: bit | exact)."""
    options = xconv_config(compose_config("xconv.relu=exact", "xconv.mode=gaussian", "xconv.contraction=probes"))
    assert isinstance(options, xconv.ConvertOptions)
    assert set(compose_config().xconv) == {*xconv.ConvertOptions().to_dict(), "budget"}
    assert (options.relu, options.mode, options.contraction) == ("exact", "multi", "probes")
    assert xconv_config(compose_config()).to_dict() == xconv.ConvertOptions().to_dict()


@pytest.mark.parametrize(
    "override, key, message",
    [
        ("xconv.probes=1.5", "xconv.probes", "could not be converted to Integer"),
        ("xconv.probes=abc", "xconv.probes", "could not be converted to Integer"),
        ("xconv.mode=bogus", "xconv.mode", "Invalid value 'bogus', expected one of [independent, multi, orthogonal"),
        ("xconv.distribution=uniform", "xconv.distribution", "expected one of [gaussian, rademacher]"),
        ("xconv.relu=maybe", "xconv.relu", "expected one of [bit, exact]"),
        ("xconv.relu=true", "xconv.relu", "expected one of [bit, exact]"),
        ("xconv.deflation=bogus", "xconv.deflation", "expected one of [dct, pca]"),
        ("xconv.contraction=fast", "xconv.contraction", "expected one of [auto, probes, decompress]"),
        ("xconv.maxpool=sometimes", "xconv.maxpool", "is not a valid bool"),
        ("xconv.storage=packed", "xconv.storage", "expected one of [sketch, quantized]"),
        ("xconv.budget=half", "xconv.budget", "could not be converted to Float"),
        ("xconv.include=encoder.*", "xconv.include", "is not a ListConfig"),
        ("xconv.bogus=1", "xconv.bogus", "Key 'bogus' not in 'XConvConfig'"),
    ],
)
def test_bad_xconv_types_and_choices_fail_at_compose_time_naming_the_key(override, key, message):
    with pytest.raises(ConfigCompositionException) as raised:
        compose_config(override)
    assert raised.value.__cause__.full_key == key
    assert message in str(raised.value.__cause__)


def test_exclude_patterns_reach_convert(tmp_path):
    _, task, _ = build(compose_config("debug=tiny", "xconv.exclude=[encoder.conv1]", output_dir=tmp_path))
    assert type(task.net.encoder.conv1) is torch.nn.Conv2d
    assert isinstance(task.net.encoder.layer1[0].conv1, xconv.XConv2d)


@pytest.mark.parametrize(
    "override, key",
    [
        ("xconv.probes=-1", "xconv.probes"),
        ("xconv.min_pixels=-1", "xconv.min_pixels"),
        ("data=folder", "data.root"),
        ("data=folder data.root=/nonexistent/xconv-data", "data.root"),
        ("data=oxford_pet data.download=false data.data_dir=/nonexistent/xconv-data", "data.data_dir"),
        ("task=classification data=mnist data.download=false data.data_dir=/nonexistent/xconv-data", "data.data_dir"),
        ("task=classification data=cifar10 data.download=false data.data_dir=/nonexistent/xconv-data", "data.data_dir"),
        ("task=classification data.val_fraction=0.9", "data.val_fraction"),
        ("task=classification data.num_classes=5", "data.num_classes"),
        ("data.textures=[brick,nonexistent]", "data.textures"),
        ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path"),
        ("model.encoder_name=nonsense", "model: Wrong encoder name `nonsense`"),
        ("task=superres model.channels=[]", "model.channels: need at least one scale"),
        ("task=gan model.image_size=33", "model.image_size: DCGAN needs a power of two"),
        ("xconv.deflation_rank=2", "xconv.deflation_rank=2 needs deflation="),
        ("xconv.bits=3", "xconv.bits"),
        ("xconv.budget=2", "xconv.budget"),
        ("+xconv.bogus=1", "xconv.bogus: no such option"),
        ("task=classification data=digit_scenes", "model.in_channels: Interpolation key 'data.in_channels' not found"),
        ("trainer.max_epochs=-3", "trainer: `max_epochs` must be a non-negative integer"),
        ("trainer.strategy=ddp_spawn trainer.devices=2", "trainer.strategy: a DDPStrategy whose processes"),
        ("+trainer.precision=fp8", "trainer.precision must be 64, 32, 16, 'transformer-engine', "),
        # Lightning's own checks do not catch these before fit, or ever: the Trainer's type annotations do.
        ("trainer.max_epochs=abc", r"^trainer.max_epochs must be int or None \(lightning.Trainer's type\), got 'abc'$"),
        ("+trainer.enable_checkpointing=yes", "^trainer.enable_checkpointing must be bool or None"),
        ("trainer.devices=1.5", r"^trainer.devices must be list\[int\], str or int"),
        ("task.metric.mode=up", "task.metric.mode: must be 'min' or 'max'"),
        ("~task.metric.mode", "task.metric: needs exactly the keys name and mode"),
        ("xconv.include=[nonexistent.*]", "xconv.include: no conv or ReLU matches"),
        ("xconv.exclude=[nonexistent]", r"xconv.exclude: no module matches \['nonexistent'\]"),
        ("data.batch_size=0", "data.batch_size: must be an int >= 1, got 0"),
        ("seed=abc", "seed must be an int, got 'abc'"),
        ("checkpointing=[nonexistent.*]", r"^checkpointing: no module matches \['nonexistent.\*'\]; the model's modules: encoder"),
        ("checkpointing=3", "^checkpointing must be null or a list of module-name patterns"),
    ],
)
def test_bad_values_raise_config_errors_naming_the_key(override, key, tmp_path):
    cfg = compose_config("debug=tiny", *override.split(), output_dir=tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(cfg)


@pytest.mark.parametrize(
    "override", ["xconv.probes=-1", "xconv.min_pixels=-1", "xconv.storage=quantized", "+xconv.bogus=1"]
)
def test_xconv_options_are_checked_before_data_and_model_are_built(override, monkeypatch, tmp_path):
    monkeypatch.setattr(experiments.build, "instantiate_node", lambda cfg, key, **_: pytest.fail(f"built {key} first"))
    with pytest.raises(ConfigError, match=r"^xconv\."):
        build(compose_config(override, output_dir=tmp_path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("xconv.probes=-3", "error: xconv.probes must be >= 0"),
        ("xconv.mode=bogus", "error: xconv.mode: Invalid value 'bogus', expected one of [independent, multi, orthogonal"),
        ("xconv.storage=quantized", "error: xconv.bits must be one of 2, 4, 8, 16; got None"),
        ("trainer.precision=bf16-mixed", "error: Could not override 'trainer.precision'. To append to your config use +trainer"),
        ("task=nonexistent", f"error: task must be one of {config_names('task')}, got 'nonexistent'"),
    ],
)
def test_bad_command_line_exits_2_with_one_line_and_leaves_no_run_dir(override, message, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "debug=tiny", override, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not run_dir.exists()


def test_a_new_run_into_an_earlier_run_s_dir_exits_2_and_changes_nothing(tmp_path):
    """Without ckpt_path, a run directory holding an earlier run's summary or checkpoints is refused
    before Hydra writes its .hydra/ files: nothing of the earlier run is overwritten."""
    run_dir = tmp_path / "run"
    for name, content in {".hydra/overrides.yaml": "- seed=1\n", "summary.json": "{}", "checkpoints/last.ckpt": "x"}.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(content)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "debug=tiny", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: hydra.run.dir: '{run_dir}' holds an earlier run (summary.json and checkpoints), which a new run "
        f"would overwrite: resume it with ckpt_path={run_dir}/checkpoints/last.ckpt, or give another hydra.run.dir")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("case, extra, error", [
    ("checkpoint that does not load", [], "ckpt_path: cannot load '{ckpt}'"),
    ("checkpoint of another model", [], "ckpt_path: '{ckpt}' does not fit the task's network"),
    ("bad value", ["xconv.probes=-1"], "xconv.probes must be >= 0"),
    ("bad value, no .hydra/ before", ["xconv.probes=-1"], "xconv.probes must be >= 0"),
])
def test_resuming_into_its_run_dir_and_stopping_changes_nothing_there(case, extra, error, tmp_path):
    """A ckpt_path that does not load is refused before Hydra writes .hydra/ over the run it resumes;
    after a later one-line stop (a checkpoint that does not fit, a bad value), .hydra/ is written back."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    files = {".hydra/overrides.yaml": "- seed=1\n", ".hydra/config.yaml": "seed: 1\n", "summary.json": "{}"}
    for name, content in files.items():
        if not (name.startswith(".hydra/") and "no .hydra/" in case):
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / name).write_text(content)
    ckpt.parent.mkdir()
    if case == "checkpoint that does not load":
        ckpt.write_text("x")
    else:
        torch.save({"state_dict": {"net.weight": torch.zeros(3)}, "global_step": 2}, ckpt)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "debug=tiny", f"hydra.run.dir={run_dir}", f"ckpt_path={ckpt}", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines[-1].startswith("error: " + error.format(ckpt=ckpt)), lines
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.log"} == before
    assert (run_dir / ".hydra").is_dir() == ("no .hydra/" not in case)


@pytest.mark.parametrize("subdir, job_dir", [
    ("file/job", "file/job"), ("file/${hydra.job.num}", "file/0"), ("s${seed}/job", "s2/job"),
], ids=["constant", "job number", "second job only"])
def test_an_uncreatable_job_dir_in_a_sweep_exits_2_with_one_line_and_leaves_nothing(subdir, job_dir, tmp_path):
    """Hydra creates a job's directory (hydra.sweep.subdir) just before the job, outside any callback:
    the launcher tries every job's first, so no job runs."""
    for blocker in ("file", "s2"):
        (tmp_path / blocker).write_text("not a directory")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "-m", "debug=tiny", "seed=1,2", f"hydra.sweep.dir={tmp_path}/multirun/sweep",
         f"hydra.sweep.subdir={tmp_path}/{subdir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [f"error: hydra.sweep.subdir: cannot create the directory '{tmp_path}/{job_dir}': Not a directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "s2"]


@pytest.mark.parametrize("sweep, message", [
    ("xconv.probes=-1,8", "error: xconv.probes must be >= 0"),
    ("xconv.probes=8,-1", "error: xconv.probes must be >= 0"),  # refused before the first job trains
    ("xconv.mode=independent,bogus", "error: xconv.mode: Invalid value 'bogus', expected one of"),
    ("equal_memory={fraction:0.5,batch_size:4},{fraction:2,batch_size:4}", "error: equal_memory.fraction must be"),
    ("trainer.max_epochs=2,abc", "error: trainer.max_epochs must be int or None"),
])
def test_bad_value_in_a_sweep_exits_2_and_leaves_no_sweep_dir(sweep, message, tmp_path):
    sweep_dir = tmp_path / "multirun" / "sweep"  # as Hydra's default multirun/<task>/<time>
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "-m", "debug=tiny", sweep, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert list(tmp_path.iterdir()) == []  # nor the parent the sweep created for it


def test_failed_run_removes_its_run_dir_only_when_nothing_but_hydra_wrote_there(tmp_path):
    for name in ("unused", "used"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "run.log").touch()
    (tmp_path / "used" / "checkpoints").mkdir()
    remove_unused_run_dir(tmp_path / "unused", job_name="run")
    remove_unused_run_dir(tmp_path / "used", job_name="run")
    assert not (tmp_path / "unused").exists()
    assert (tmp_path / "used" / "checkpoints").is_dir()


@pytest.mark.parametrize("override", [
    "+trainer.precision=bf16-mixed", "trainer.devices=[0]", "trainer.devices=auto", "+trainer.max_time=00:01:00:00",
    "+trainer.max_time={hours:1}", "+trainer.max_time={_target_:datetime.timedelta,hours:1}",
    "+trainer.limit_train_batches=0.5", "+trainer.gradient_clip_val=1", "+trainer.deterministic=warn",
    "+trainer.plugins=[{_target_:lightning.pytorch.plugins.environments.LightningEnvironment}]",
    "trainer.strategy={_target_:lightning.pytorch.strategies.DDPStrategy}", "trainer=gpu",
])
def test_valid_trainer_arguments_pass_the_type_check(override):
    """Values of lightning.Trainer's types pass, and so do objects Hydra builds (_target_ nodes, in lists too)."""
    check_trainer_arguments(compose_config(override).trainer)


def test_a_resumed_run_names_each_xconv_setting_that_changed():
    def record(**kwargs):
        return XConvCallback(modules="net", **kwargs).record()

    planned = record(budget=0.25, batchnorm_bits=4, maxpool=True)
    assert xconv_change("last.ckpt", planned, record(budget=0.25, batchnorm_bits=4, maxpool=True)) is None
    assert xconv_change("last.ckpt", planned, record(budget=0.5, batchnorm_bits=4, maxpool=True)) == (
        "ckpt_path: this run goes on with other XConv settings than the run that saved 'last.ckpt': xconv.budget 0.25 -> 0.5")
    assert xconv_change("last.ckpt", record(probes=8), record(probes=8, checkpointing=["encoder.*"])).endswith(
        ": checkpointing None -> ['encoder.*']")
    older = {key: value for key, value in planned.items() if key != "budget"}  # a record written before budgets were
    assert xconv_change("last.ckpt", older, record(budget=0.5, batchnorm_bits=4, maxpool=True)) is None
    assert xconv_change("last.ckpt", None, record(probes=8)) is None  # a checkpoint of an unconverted run
