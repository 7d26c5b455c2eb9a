"""Seeded augmentation: a training item's random transform depends on (seed, epoch, index) alone."""

from __future__ import annotations

import pytest
import torch
from fixtures_vision_audio import write_cifar10, write_image_tree

from astraora.data.audio import SyntheticAudioDataModule
from astraora.data.common import ResumableSampler, SeededItems
from astraora.data.vision import CIFAR10DataModule, ImageFolderDataModule


def cifar(tmp_path, seed=0):
    write_cifar10(tmp_path, per_batch=4, test=2)  # 20 training images, 16 after the val split
    return CIFAR10DataModule(
        tmp_path, seed=seed, batch_size=4, val_fraction=0.2, download=False, num_workers=0, verify=False
    )  # the official format, not the official files


def image_folder(tmp_path, seed=0):
    write_image_tree(tmp_path / "pets", per_class=6)
    return ImageFolderDataModule(tmp_path / "pets", seed=seed, batch_size=4, image_size=8, num_workers=0)


def synthetic_audio(tmp_path, seed=0):
    return SyntheticAudioDataModule(seed=seed, batch_size=4, clips_per_class=4, n_mels=16, num_workers=0)


MODULES = {"cifar10": cifar, "image_folder": image_folder, "synthetic_audio": synthetic_audio}


def stack(items) -> torch.Tensor:
    return torch.stack([x for x, _ in items])


def epoch_of(loader, epoch: int) -> tuple[list[int], torch.Tensor]:
    """The indices the loader's sampler serves in ``epoch`` and the items the loader gives for them."""
    loader.sampler.set_epoch(epoch)
    order = [i for _, i in loader.sampler]
    x = torch.cat([x for x, _ in loader])
    return order[: len(x)], x


@pytest.mark.parametrize("name", list(MODULES))
def test_augmented_items_depend_on_seed_epoch_and_index_only(tmp_path, name):
    dm = MODULES[name](tmp_path)
    dm.setup("fit")
    items = dm.train_dataloader().dataset
    assert isinstance(items, SeededItems)
    n = len(items)
    state = torch.get_rng_state()
    in_order = stack(items[(3, i)] for i in range(n))
    backwards = stack(items[(3, i)] for i in reversed(range(n))).flip(0)
    torch.manual_seed(1234)  # whatever the global generator holds
    again = stack(items[(3, i)] for i in range(n))
    assert torch.equal(in_order, backwards) and torch.equal(in_order, again)
    torch.set_rng_state(state)
    stack(items[(3, i)] for i in range(n))
    assert torch.equal(torch.get_rng_state(), state)  # nothing else's randomness moves
    other_epoch = stack(items[(4, i)] for i in range(n))
    other_seed = stack(SeededItems(dm.train_set, seed=1)[(3, i)] for i in range(n))
    assert not torch.equal(in_order, other_epoch) and not torch.equal(in_order, other_seed)


@pytest.mark.parametrize("name", ["cifar10", "synthetic_audio"])
def test_loader_items_are_the_same_with_any_number_of_workers(tmp_path, name):
    dm = MODULES[name](tmp_path)
    dm.setup("fit")
    seen = {}
    for workers in (0, 2):  # 2: persistent workers, which learn the epoch from the sampler's keys
        dm.num_workers = workers
        loader = dm.train_dataloader()
        seen[workers] = [epoch_of(loader, epoch) for epoch in (0, 1)]
    items = dm.train_dataloader().dataset
    for epoch, (order, x) in enumerate(seen[0]):
        assert order == seen[2][epoch][0] and torch.equal(x, seen[2][epoch][1])
        assert torch.equal(x, stack(items[(epoch, i)] for i in order))


def test_sharded_and_skipping_samplers_yield_the_same_keys():
    whole = ResumableSampler(12, seed=5, keys=True)
    whole.set_epoch(2)
    keys = list(whole)
    assert {epoch for epoch, _ in keys} == {2} and sorted(i for _, i in keys) == list(range(12))
    shards = [ResumableSampler(12, seed=5, keys=True) for _ in range(2)]
    for rank, shard in enumerate(shards):
        shard.shard(rank, 2, global_batch=4)
        shard.set_epoch(2)
    assert sorted(k for shard in shards for k in shard) == sorted(keys)
    whole.skip(4)
    assert list(whole) == keys[4:]


def test_only_augmenting_training_sets_are_seeded_per_item(tmp_path):
    """Per-item seeding costs ~16 µs an item: data without augmentation (digits, augment=false)
    is served plainly; augmenting sets are wrapped."""
    from astraora.data.vision import DigitsDataModule

    digits = DigitsDataModule(seed=0)
    digits.setup()
    assert not isinstance(digits.train_dataloader().dataset, SeededItems)
    augmented = cifar(tmp_path)
    augmented.setup()
    assert isinstance(augmented.train_dataloader().dataset, SeededItems)
    plain = CIFAR10DataModule(
        tmp_path, seed=0, batch_size=4, val_fraction=0.2, augment=False, download=False, num_workers=0, verify=False
    )
    plain.setup()
    assert not isinstance(plain.train_dataloader().dataset, SeededItems)
