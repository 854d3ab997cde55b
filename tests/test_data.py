"""The data modules: digit-texture scenes, your own folder of images and masks, Oxford-IIIT Pet's layout,
the digits for classification and MNIST's layout."""
from __future__ import annotations

from urllib.error import URLError

import numpy as np
import pytest
import torch
from hydra_helpers import compose_config
from PIL import Image
from torchvision.datasets import MNIST

from experiments.data import (
    DigitScenesDataModule,
    DigitsDataModule,
    FolderDataModule,
    MNISTDataModule,
    OxfordPetDataModule,
)
from experiments.errors import ConfigError
from experiments.data.base import ResizePair
from experiments.data.digit_scenes import compose_scene, load_texture
from run import build


def small_scenes(seed: int) -> DigitScenesDataModule:
    dm = DigitScenesDataModule(train_scenes=6, val_scenes=4, batch_size=3, seed=seed, image_size=32, digit_size=(12, 20))
    dm.setup("fit")
    return dm


def test_digit_scenes_are_a_function_of_the_seed():
    a, b, c = small_scenes(0), small_scenes(0), small_scenes(1)
    for x, y in zip(a.train_set.tensors, b.train_set.tensors):
        assert torch.equal(x, y)
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])


def test_digit_scenes_batches_and_disjoint_source_digits():
    dm = small_scenes(0)
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert masks.shape == (3, 32, 32) and masks.dtype == torch.int64
    assert 0 <= masks.min() and masks.max() <= 10 and (masks > 0).any()
    train, val = dm.source_indices["train"], dm.source_indices["val"]
    assert not set(train) & set(val) and len(train) + len(val) == 1797


def test_scene_mask_labels_the_pasted_digit_strokes():
    digit = np.zeros((8, 8))
    digit[1:7, 3:5] = 16  # a vertical bar, pasted as the digit "7"
    rng = np.random.default_rng(0)
    image, mask = compose_scene(digit[None], np.array([7]), [load_texture("grass")], 32, (1, 1), (16, 16), rng)
    assert image.shape == (3, 32, 32) and image.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 8}
    rows, cols = np.nonzero(mask)
    assert np.ptp(rows) > 2 * np.ptp(cols)  # the bar stays a vertical bar


def write_folder(root, count: int, mask_values=(0, 1)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.jpg")
        Image.fromarray(rng.choice(mask_values, (40, 48)).astype(np.uint8)).save(root / "masks" / f"im{i}.png")


def test_folder_pairs_images_and_masks(tmp_path):
    write_folder(tmp_path, 5, mask_values=(0, 1, 2))
    dm = FolderDataModule(str(tmp_path), num_classes=3, image_size=32, val_fraction=0.4, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (3, 2)
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    assert set(masks.unique().tolist()) <= {0, 1, 2}


def test_folder_binary_masks(tmp_path):
    write_folder(tmp_path, 2, mask_values=(0, 7, 255))
    dm = FolderDataModule(str(tmp_path), num_classes=2, binary=True, image_size=32, num_workers=0)
    dm.setup("fit")
    assert set(dm.train_set[0][1].unique().tolist()) == {0, 1}


def test_folder_test_root_is_the_test_split(tmp_path):
    write_folder(tmp_path / "train", 4)
    write_folder(tmp_path / "test", 3)
    dm = FolderDataModule(str(tmp_path / "train"), num_classes=2, image_size=32, val_fraction=0.25,
                          num_workers=0, test_root=str(tmp_path / "test"))
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (3, 1, 3)
    assert dm.test_set.pairs[0][0].parent == tmp_path / "test" / "images"
    without = FolderDataModule(str(tmp_path / "train"), num_classes=2, num_workers=0)
    without.setup("fit")
    assert without.test_set is None


def test_folder_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="root: .* has no images/"):
        FolderDataModule(str(tmp_path / "absent"), num_classes=2)
    write_folder(tmp_path, 2)
    (tmp_path / "masks" / "im1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"root: images without a mask .*im1\.jpg"):
        FolderDataModule(str(tmp_path), num_classes=2)
    write_folder(tmp_path / "valid", 2)
    with pytest.raises(FileNotFoundError, match="^test_root: .* has no images/"):
        FolderDataModule(str(tmp_path / "valid"), num_classes=2, test_root=str(tmp_path / "absent"))


def test_folder_mask_labels_beyond_num_classes_fail_at_build_naming_the_file(tmp_path):
    write_folder(tmp_path, 3, mask_values=(0, 1, 2))
    Image.fromarray(np.full((40, 48), 3, np.uint8)).save(tmp_path / "masks" / "im1.png")
    with pytest.raises(ValueError, match=r"^num_classes: mask '.*im1\.png' holds label 3"):
        FolderDataModule(str(tmp_path), num_classes=3)
    FolderDataModule(str(tmp_path), num_classes=2, binary=True)  # binary masks: any non-zero label is foreground
    cfg = compose_config("debug=tiny", "data=folder", f"data.root={tmp_path}", "data.num_classes=3", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.num_classes: mask .*im1\.png"):
        build(cfg)


def test_folder_mask_of_another_size_than_its_image_fails_naming_the_file(tmp_path):
    write_folder(tmp_path / "train", 3)
    write_folder(tmp_path / "test", 2)
    for root in ("train", "test"):
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / root / "masks" / "im1.png")  # half size
    with pytest.raises(ValueError, match=r"^root: mask '.*im1\.png' is 24x20 but its image '.*im1\.jpg' is 48x40"):
        FolderDataModule(str(tmp_path / "train"), num_classes=2)
    write_folder(tmp_path / "valid", 2)
    with pytest.raises(ValueError, match=r"^test_root: mask '.*test/masks/im1\.png' is 24x20"):
        FolderDataModule(str(tmp_path / "valid"), num_classes=2, test_root=str(tmp_path / "test"))
    with pytest.raises(ValueError, match="image is 48x40 but its mask 24x20"):  # the transform checks too
        ResizePair(32)(Image.new("RGB", (48, 40)), Image.new("L", (24, 20)))


def test_folder_reads_16_bit_masks(tmp_path):
    write_folder(tmp_path, 2)
    Image.fromarray(np.full((40, 48), 2, np.uint16)).save(tmp_path / "masks" / "im1.png")  # PIL mode I;16
    dm = FolderDataModule(str(tmp_path), num_classes=3, image_size=32, val_fraction=0.5, num_workers=0)
    assert Image.open(tmp_path / "masks" / "im1.png").mode == "I;16"
    assert [int(mask.max()) for _, mask in dm.dataset] == [1, 2]
    Image.fromarray(np.full((40, 48), 300, np.uint16)).save(tmp_path / "masks" / "im1.png")
    with pytest.raises(ValueError, match=r"^num_classes: mask '.*im1\.png' holds label 300"):
        FolderDataModule(str(tmp_path), num_classes=3)


def test_folder_unreadable_file_fails_at_build_naming_the_file_and_the_key(tmp_path):
    write_folder(tmp_path / "train", 3)
    write_folder(tmp_path / "test", 2)
    (tmp_path / "train" / "images" / "im1.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"^root: '.*train/images/im1\.jpg' is no image PIL can read"):
        FolderDataModule(str(tmp_path / "train"), num_classes=2)
    (tmp_path / "test" / "masks" / "im0.png").write_bytes(b"")
    cfg = compose_config("debug=tiny", "data=folder", f"data.root={tmp_path / 'test'}", output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^data\.root: '.*test/masks/im0\.png' is no image PIL can read"):
        build(cfg)
    write_folder(tmp_path / "valid", 2)
    with pytest.raises(ValueError, match=r"^test_root: '.*test/masks/im0\.png' is no image"):
        FolderDataModule(str(tmp_path / "valid"), num_classes=2, test_root=str(tmp_path / "test"))
    truncated = tmp_path / "valid" / "masks" / "im1.png"  # a valid header, its pixel data cut off
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"^root: cannot read mask '.*valid/masks/im1\.png' \(image file is truncated"):
        FolderDataModule(str(tmp_path / "valid"), num_classes=2)


def test_folder_too_few_pairs_to_train_on_fails_naming_val_fraction(tmp_path):
    write_folder(tmp_path, 3)
    FolderDataModule(str(tmp_path), num_classes=2, val_fraction=0.5)  # 2 train, 1 validates
    with pytest.raises(ValueError, match=r"^val_fraction: 0\.9 of 3 pairs in .* leaves no pair to train on"):
        FolderDataModule(str(tmp_path), num_classes=2, val_fraction=0.9)
    one = tmp_path / "one"
    write_folder(one, 1)
    cfg = compose_config("debug=tiny", "data=folder", f"data.root={one}", output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^data\.val_fraction: 0\.2 of 1 pair in .* leaves no pair"):
        build(cfg)


@pytest.mark.parametrize("batch_size, sizes", [(2, [2]), (3, [3]), (4, [3])])
def test_a_last_training_batch_of_one_sample_is_dropped(tmp_path, batch_size, sizes):
    """BatchNorm cannot train on one sample where a map is 1x1 (a U-Net at image_size < 64):
    3 training pairs at batch 2 would end with a batch of 1."""
    write_folder(tmp_path, 4)
    data = FolderDataModule(str(tmp_path), num_classes=2, val_fraction=0.25, batch_size=batch_size, num_workers=0)
    data.setup("fit")
    assert len(data.train_set) == 3
    assert [len(images) for images, _ in data.train_dataloader()] == sizes


def test_oxford_pet_trimaps_become_background_pet_border(tmp_path):
    # The on-disk layout torchvision's OxfordIIITPet reads, with one tiny fake sample per split.
    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations" / "trimaps").mkdir(parents=True)
    trimap = np.array([[1, 2], [3, 1]], dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    for split, name in [("trainval", "Abyssinian_1"), ("test", "Abyssinian_2")]:
        (base / "annotations" / f"{split}.txt").write_text(f"{name} 1 1 1\n")
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(base / "images" / f"{name}.jpg")
        Image.fromarray(trimap).save(base / "annotations" / "trimaps" / f"{name}.png")
    dm = OxfordPetDataModule(str(tmp_path), download=False, image_size=32, batch_size=1, num_workers=0)
    dm.setup("fit")
    image, mask = dm.val_set[0]
    assert image.shape == (3, 32, 32)
    assert mask[0, 0] == 1 and mask[0, 31] == 0 and mask[31, 0] == 2  # pet, background, border


def test_digits_splits_are_disjoint_stratified_and_a_function_of_the_seed():
    a, b, c = (DigitsDataModule(image_size=16, seed=seed) for seed in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup("fit")
    assert all(np.array_equal(a.indices[split], b.indices[split]) for split in ("train", "val", "test"))
    assert not np.array_equal(a.indices["test"], c.indices["test"])
    train, val, test = (set(a.indices[split]) for split in ("train", "val", "test"))
    assert not (train & val or train & test or val & test) and len(train | val | test) == 1797
    for dataset in (a.train_set, a.val_set, a.test_set):
        assert set(dataset.tensors[1].tolist()) == set(range(10))
    images, labels = next(iter(a.test_dataloader()))
    assert images.shape == (32, 1, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert 0 <= images.min() and images.max() <= 1


def write_idx(path, array: np.ndarray) -> None:
    """MNIST's IDX file format: magic bytes (0, 0, 8 = uint8, ndim), the shape as big-endian int32, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_splits_the_official_training_set_into_train_and_val(tmp_path):
    # The on-disk layout torchvision's MNIST reads, with 10 fake training and 4 fake test images.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in [("train", 10), ("t10k", 4)]:
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    dm = MNISTDataModule(str(tmp_path), download=False, image_size=32, val_size=3, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (7, 3, 4)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 1, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert 0 <= images.min() and images.max() <= 1


def test_a_failed_download_is_a_config_error_naming_data_dir(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(MNIST, "download", offline)
    dm = MNISTDataModule(str(tmp_path), download=True)
    with pytest.raises(ConfigError, match=r"^data\.data_dir: no MNIST under .* downloading it failed \(<urlopen error"):
        dm.prepare_data()
