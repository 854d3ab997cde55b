"""Features for the Fréchet distance (FID) of generated images: Inception-v3 where it can be loaded,
otherwise a classifier trained by this project on the same data, trained once and cached on disk.

FID compares the mean and covariance of a network's features on real and on generated images
(torchmetrics' ``FrechetInceptionDistance``). The standard network is Inception-v3 with
torch-fidelity's weights; offline (or without torch-fidelity) those cannot be had, so, as the
XConv paper does for MNIST with a ResNet-18, the features are those of a domain classifier: the
64-d penultimate layer of a :class:`~experiments.models.SmallCNN` trained to classify the data
set's training split. FIDs in different feature spaces are not comparable: a run records which
it used (``fid_feature``).
"""
from __future__ import annotations

import logging
import os
from itertools import chain, islice, repeat
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.image.fid import FrechetInceptionDistance

from ..data.base import ClassificationDataModule
from ..errors import ConfigError
from ..models import SmallCNN

log = logging.getLogger(__name__)

FEATURE_CHOICES = ("auto", "classifier", "inception")
CLASSIFIER_FEATURES = 64
# Part of every cache file name: change it whenever the classifier or its training changes, so
# that files made by older code are not loaded.
CLASSIFIER_VERSION = 1


class InceptionFeatures(nn.Module):
    """Images [B, C, H, W] in [0, 1], C = 1 or 3 -> Inception-v3 pool features [B, 2048] (torch-fidelity's FID network).

    Grey images are repeated to three channels. Never leaves evaluation mode.

    Raises:
        ModuleNotFoundError: torch-fidelity is not installed.
        Exception: whatever torch-fidelity raises when its weights cannot be downloaded or read.
    """

    num_features = 2048

    def __init__(self):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return self.inception((images * 255).round().byte())


def feature_classifier(in_channels: int, image_size: int, num_classes: int) -> nn.Sequential:
    """Images [B, in_channels, image_size, image_size] -> logits [B, num_classes]; layer ``[0]`` gives the features.

    ``[0]`` is a :class:`~experiments.models.SmallCNN` whose dense layer has
    ``CLASSIFIER_FEATURES`` outputs (the features); ``[1:]`` is a ReLU and a dense layer to the
    classes. A narrow feature layer keeps the FID's covariances well estimated from a few
    hundred images.
    """
    trunk = SmallCNN(in_channels, num_classes=CLASSIFIER_FEATURES, image_size=image_size)
    return nn.Sequential(trunk, nn.ReLU(), nn.Linear(CLASSIFIER_FEATURES, num_classes))


class ClassifierFeatures(nn.Module):
    """Images [B, C, H, W] in [0, 1] -> features [B, CLASSIFIER_FEATURES] of a :func:`feature_classifier`.

    Frozen and always in evaluation mode: it measures, it is never trained by the task.
    """

    num_features = CLASSIFIER_FEATURES

    def __init__(self, classifier: nn.Sequential):
        super().__init__()
        self.trunk = classifier[0].requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)


def train_feature_classifier(
    train_set: Dataset, val_set: Dataset, num_classes: int, steps: int, seed: int, batch_size: int = 64,
) -> tuple[nn.Sequential, float]:
    """Train a :func:`feature_classifier` on ``(image [C, S, S], label)`` pairs with Adam for ``steps`` batches.

    Runs on the CPU under its own seed, inside ``torch.random.fork_rng``: the result depends on
    ``seed`` only, and the caller's random stream is the same whether the classifier was
    trained or loaded from the cache. Returns the classifier (eval mode) and its top-1 accuracy
    on ``val_set``.
    """
    in_channels, image_size = train_set[0][0].shape[:2]  # images are [C, S, S]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = feature_classifier(in_channels, image_size, num_classes)
        loader = DataLoader(train_set, batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        # Epoch after epoch, each reshuffled, until ``steps`` batches.
        for images, labels in islice(chain.from_iterable(repeat(loader)), steps):
            loss = nn.functional.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        # Still inside fork_rng: even an unshuffled DataLoader draws a seed from the global generator.
        with torch.no_grad():
            correct = sum((net(images).argmax(1) == labels).sum().item() for images, labels in DataLoader(val_set, 256))
    return net, correct / len(val_set)


def cached_feature_classifier(
    datamodule: ClassificationDataModule, cache_dir: str | Path, steps: int
) -> ClassifierFeatures:
    """Features of a classifier of ``datamodule``'s training split: loaded from ``cache_dir``, or trained and saved.

    The cache file is named by the data module's class, image shape, split size, ``seed`` and
    ``steps``, so a change of any of them trains a new classifier; it is written atomically
    (a crash leaves no partial file) with the classifier's validation accuracy, for inspection.
    ``datamodule`` must be set up.
    """
    train_set, val_set = datamodule.train_set, datamodule.val_set
    shape = "x".join(map(str, train_set[0][0].shape))
    name = (f"fid_classifier_{type(datamodule).__name__}_{shape}_n{len(train_set)}_seed{datamodule.seed}"
            f"_steps{steps}_v{CLASSIFIER_VERSION}.pt")
    path = Path(cache_dir).expanduser() / name
    if path.is_file():
        # Built on the meta device, which draws no random numbers: loading from the cache
        # leaves the caller's random stream as training would (see train_feature_classifier).
        with torch.device("meta"):
            classifier = feature_classifier(*train_set[0][0].shape[:2], datamodule.NUM_CLASSES)
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        classifier.load_state_dict(state, assign=True)
        log.info("FID features: classifier loaded from %s", path)
        return ClassifierFeatures(classifier)
    classifier, accuracy = train_feature_classifier(train_set, val_set, datamodule.NUM_CLASSES, steps, datamodule.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"state_dict": classifier.state_dict(), "val_acc": accuracy}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("FID features: classifier trained (validation accuracy %.3f), cached at %s", accuracy, path)
    return ClassifierFeatures(classifier)


def check_fid_options(feature: str, classifier_steps: int) -> None:
    """ValueError naming the argument unless ``feature`` is in :data:`FEATURE_CHOICES` and ``classifier_steps`` >= 1."""
    if feature not in FEATURE_CHOICES:
        raise ValueError(f"fid_feature: must be one of {list(FEATURE_CHOICES)}, got {feature!r}")
    if not (isinstance(classifier_steps, int) and not isinstance(classifier_steps, bool) and classifier_steps >= 1):
        raise ValueError(f"fid_classifier_steps: must be an int >= 1, got {classifier_steps!r}")


def fid_metric(
    feature: str, datamodule, cache_dir: str | Path, classifier_steps: int
) -> tuple[FrechetInceptionDistance, str]:
    """A ``FrechetInceptionDistance`` over images [B, C, H, W] in [0, 1], and which features it uses.

    ``feature``: ``"inception"`` (Inception-v3; needs torch-fidelity and its weights),
    ``"classifier"`` (:func:`cached_feature_classifier`) or ``"auto"`` (Inception if it loads,
    else the classifier, with a warning). Returns the metric and ``"inception"`` or
    ``"classifier"``.

    Raises:
        ValueError: a bad ``feature`` or ``classifier_steps`` (:func:`check_fid_options`).
        ConfigError: ``"inception"`` was asked for and cannot be loaded, or the classifier is
            needed and ``datamodule`` is not a set-up
            :class:`~experiments.data.base.ClassificationDataModule` (its labels train it).
    """
    check_fid_options(feature, classifier_steps)
    if feature != "classifier":
        try:
            return FrechetInceptionDistance(InceptionFeatures()), "inception"
        # Any failure of this optional network (no torch-fidelity, weights not downloadable or
        # unreadable) means: use the classifier instead, unless Inception was asked for by name.
        except Exception as err:  # noqa: BLE001
            if feature == "inception":
                raise ConfigError(
                    f"task.fid_feature: 'inception' cannot be loaded ({err}); use 'auto' or 'classifier'"
                ) from err
            log.warning("FID features: Inception-v3 unavailable (%s); using a classifier trained on the data", err)
    if not isinstance(datamodule, ClassificationDataModule) or datamodule.train_set is None:
        raise ConfigError(
            f"task.fid_feature: classifier features need a set-up labelled data module (digits, mnist, cifar10), "
            f"got {type(datamodule).__name__}"
        )
    return FrechetInceptionDistance(cached_feature_classifier(datamodule, cache_dir, classifier_steps)), "classifier"
