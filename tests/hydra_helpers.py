"""Compose the real configs (configs/) for tests, with small overrides instead of test-only configs.

Every run here uses ``debug=tiny`` (configs/debug/tiny.yaml: two training steps, one validation and one
test batch, CPU, CSV logs); the lists below add the small data (and network) sizes of each task."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from experiments.registry import register

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"

# A segmentation run small enough for a test: a few 32x32 digit-texture scenes.
TINY_SEGMENTATION = [
    "task=segmentation",
    "data.image_size=32",
    "data.digit_size=[12,20]",
    "data.train_scenes=8",
    "data.val_scenes=4",
    "data.batch_size=4",
    "debug=tiny",
]

# A classification run small enough for a test: the digits at 16x16, in batches of 4.
TINY_CLASSIFICATION = [
    "task=classification",
    "data.image_size=16",
    "data.batch_size=4",
    "debug=tiny",
]


# A deep-image-prior run (task=superres or inpainting) small enough for a test: a 32x32 image
# and a two-scale network of 8 channels; a few steps take seconds.
TINY_IMAGE = ["data.resize=32", "data.crop=32", "data.steps_per_epoch=2", "model.channels=[8,8]", "debug=tiny"]

# A GAN run small enough for a test: 16x16 digits, narrow networks, a briefly trained feature classifier.
TINY_GAN = [
    "task=gan",
    "data.image_size=16",
    "data.batch_size=8",
    "model.latent_dim=16",
    "model.generator_width=8",
    "model.discriminator_width=8",
    "task.fid_feature=classifier",
    "task.fid_classifier_steps=20",
    "debug=tiny",
]

# Every task's tiny run (a GAN run also wants task.fid_cache_dir, where its feature classifier is cached).
TINY = {
    "segmentation": TINY_SEGMENTATION,
    "classification": TINY_CLASSIFICATION,
    "gan": TINY_GAN,
    "superres": ["task=superres", *TINY_IMAGE],
    "inpainting": ["task=inpainting", *TINY_IMAGE],
}


def compose_config(*overrides: str, output_dir: Path | None = None) -> DictConfig:
    """``configs/config.yaml`` composed with ``overrides``; ``output_dir`` replaces Hydra's run directory."""
    register()  # as run.py does before Hydra composes
    extra = [f"output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, *extra])


def config_names(group: str) -> list[str]:
    """Every config in a group directory, e.g. ``config_names("task")``."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
