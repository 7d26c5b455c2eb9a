"""Vision tasks: the real loading code on tiny datasets in each dataset's on-disk format."""

from __future__ import annotations

import logging

import pytest
import torch
from fixtures_vision_audio import (
    check_classification_task,
    check_forward_backward,
    compose_task,
    first_batch,
    linear_factory,
    train_for,
    write_cifar10,
    write_image_tree,
    write_mnist,
)

from astraora.data.vision import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    read_cifar_batch,
)
from astraora.errors import ConfigError, DataFileError, DatasetNotFoundError
from astraora.models.vision import MLP, CompactCNN

# ---------------------------------------------------------------------------------------- digits


def test_digits_split_standardised_and_seeded():
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    sizes = [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert sum(sizes) == 1797 and sizes[0] == round(0.7 * 1797)
    x_train = dm.train_set.tensors[0]
    assert x_train.shape[1] == 64 and x_train.mean(0).abs().max() < 1e-4
    again = DigitsDataModule(seed=0)
    again.setup("fit")
    other = DigitsDataModule(seed=1)
    other.setup("fit")
    assert torch.equal(again.test_set.tensors[0], dm.test_set.tensors[0])
    assert not torch.equal(other.test_set.tensors[0], dm.test_set.tensors[0])
    x, _ = first_batch(dm.train_dataloader())
    assert x.shape == (64, 64)


def test_digits_mlp_learns_with_a_linear_physical_layer():
    torch.manual_seed(0)
    dm = DigitsDataModule(seed=0, batch_size=64)
    dm.setup("fit")
    names = []
    model = MLP(lambda a, b, name: names.append(name) or linear_factory(a, b, name), **dm.model_kwargs())
    assert names == ["head.physical"] and isinstance(model.get_submodule("head.physical"), torch.nn.Linear)
    train_for(model, dm, epochs=4, lr=3e-3)
    x, y = dm.val_set.tensors
    assert (model(x).argmax(1) == y).float().mean() > 0.9


# ----------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    write_mnist(tmp_path, train=24, test=8, gz=gz)
    dm = MNISTDataModule(tmp_path, seed=0, batch_size=4, val_fraction=0.25, download=False, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [18, 6, 8]
    assert dm.test_set.labels.tolist() == [i % 10 for i in range(8)]
    x, _ = first_batch(dm.train_dataloader())
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    model = CompactCNN(linear_factory, width=0.0625, **dm.model_kwargs())
    check_forward_backward(model, x, 10)


def test_mnist_truncated_file_is_named(tmp_path):
    raw = write_mnist(tmp_path)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    dm = MNISTDataModule(tmp_path, download=False)
    with pytest.raises(DataFileError, match="t10k-images-idx3-ubyte is truncated"):
        dm.setup("fit")


# -------------------------------------------------------------------------------------- CIFAR-10


def test_cifar10_pickle_batches(tmp_path):
    folder = write_cifar10(tmp_path, per_batch=4, test=6)
    dm = CIFAR10DataModule(
        tmp_path, seed=0, batch_size=4, val_fraction=0.1, download=False, verify=False, num_workers=0
    )
    dm.prepare_data()
    dm.setup("fit")
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [18, 2, 6]
    images, labels = read_cifar_batch(folder / "test_batch")
    assert images.shape == (6, 3, 32, 32) and torch.equal(dm.test_set.labels, labels)
    plain, label = dm.test_set[0]
    mean, std = torch.tensor(dm.MEAN)[:, None, None], torch.tensor(dm.STD)[:, None, None]
    assert torch.allclose(plain, (images[0] / 255 - mean) / std, atol=1e-5) and label == labels[0]
    x, _ = first_batch(dm.train_dataloader())
    assert x.shape == (4, 3, 32, 32)
    model = CompactCNN(linear_factory, width=0.0625, **dm.model_kwargs())
    assert model.get_submodule("head.physical").in_features == 32  # 512 · width
    check_forward_backward(model, x, 10)


def test_cifar10_paper_head_at_width_one():
    names = {}
    model = CompactCNN(lambda a, b, name: names.setdefault(name, (a, b)) and linear_factory(a, b, name), num_classes=10)
    assert names == {"head.physical": (512, 1024)}
    assert model.head.classifier.in_features == 1024


def test_missing_datasets_are_one_line(tmp_path):
    for dm in (MNISTDataModule(tmp_path, download=False), CIFAR10DataModule(tmp_path, download=False)):
        with pytest.raises(DatasetNotFoundError) as caught:
            dm.prepare_data()
        message = str(caught.value)
        assert "\n" not in message and str(tmp_path) in message and "download" in message


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore traceback")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    for dm in (MNISTDataModule(tmp_path, download=True), CIFAR10DataModule(tmp_path, download=True)):
        with pytest.raises(DatasetNotFoundError) as caught:
            dm.prepare_data()
        assert "\n" not in str(caught.value) and caught.value.__cause__ is None


# --------------------------------------------------------------------------------- image folders


def test_image_folder_skips_bad_images_and_splits_by_seed(tmp_path, caplog):
    files = write_image_tree(tmp_path / "pets", per_class=6)
    caplog.set_level(logging.WARNING)
    dm = ImageFolderDataModule(
        tmp_path / "pets",
        seed=0,
        batch_size=4,
        image_size=16,
        channels=1,
        val_fraction=0.2,
        test_fraction=0.2,
        num_workers=0,
    )
    dm.setup("fit")
    assert dm.classes == ["cat", "dog", "fox"]
    assert "skipped 2 unreadable" in caplog.text and all(str(p) in caplog.text for p in files["bad"])
    splits = [[str(p) for p, _ in s.items] for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert sum(map(len, splits)) == 19 and len(splits[1]) == 4  # 3·6 + the odd grey image
    again = ImageFolderDataModule(tmp_path / "pets", seed=0, val_fraction=0.2, test_fraction=0.2)
    again.setup("fit")
    other = ImageFolderDataModule(tmp_path / "pets", seed=1, val_fraction=0.2, test_fraction=0.2)
    other.setup("fit")
    assert [str(p) for p, _ in again.val_set.items] == splits[1]
    assert [str(p) for p, _ in other.val_set.items] != splits[1]
    x, _ = first_batch(dm.train_dataloader())
    assert x.shape == (4, 1, 16, 16)
    assert dm.model_kwargs() == {"num_classes": 3, "in_channels": 1}
    check_forward_backward(CompactCNN(linear_factory, width=0.0625, **dm.model_kwargs()), x, 3)


def test_image_folder_odd_grey_image_becomes_rgb(tmp_path):
    files = write_image_tree(tmp_path, per_class=2)
    dm = ImageFolderDataModule(tmp_path, image_size=12, channels=3, val_fraction=0.0, test_fraction=0.0)
    dm.setup("fit")
    index = [p for p, _ in dm.train_set.items].index(files["odd"][0])
    x, label = dm.train_set[index]
    assert x.shape == (3, 12, 12) and label == 0 and -1 <= x.min() <= x.max() <= 1


def test_image_folder_with_train_and_val_folders(tmp_path):
    write_image_tree(tmp_path / "train", per_class=4)
    write_image_tree(tmp_path / "val", per_class=2)
    dm = ImageFolderDataModule(tmp_path, seed=0, image_size=8, test_fraction=0.25)
    dm.setup("fit")
    assert all("/val/" in str(p) for p, _ in dm.val_set.items) and len(dm.val_set) == 7
    assert all("/train/" in str(p) for p, _ in dm.train_set.items + dm.test_set.items)
    assert len(dm.train_set) + len(dm.test_set) == 13 and len(dm.test_set) == 3


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(ConfigError, match="task.root"):
        ImageFolderDataModule(None, data_dir=tmp_path).setup("fit")
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nowhere")):
        ImageFolderDataModule(tmp_path / "nowhere").setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no class folders in " + str(tmp_path / "empty")):
        ImageFolderDataModule(tmp_path / "empty").setup("fit")
    write_image_tree(tmp_path / "tree", per_class=2)
    (tmp_path / "tree" / "wolf").mkdir()
    with pytest.raises(DataFileError, match="class folder " + str(tmp_path / "tree" / "wolf")):
        ImageFolderDataModule(tmp_path / "tree").setup("fit")


# ----------------------------------------------------------------------------------- task YAMLs


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10", "image_folder"])
def test_task_yaml_builds_datamodule_and_model(tmp_path, name):
    write_mnist(tmp_path)
    write_cifar10(tmp_path)
    write_image_tree(tmp_path / "pets", per_class=3)
    overrides = {"root": str(tmp_path / "pets"), "datamodule": {"batch_size": 2}}
    if name == "cifar10":
        overrides = {"datamodule": {"batch_size": 2, "verify": False}}  # the fixture is not the official files
    cfg = compose_task(
        name, tmp_path, overrides if name in ("image_folder", "cifar10") else {"datamodule": {"batch_size": 2}}
    )
    check_classification_task(cfg, name, tmp_path)
