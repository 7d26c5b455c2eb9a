"""One real training step for every task, with a hybrid device and with the digital baseline, on
tiny fixtures written in each dataset's real on-disk format and read by the real loading code."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fixtures_vision_audio import (
    write_audio_tree,
    write_cifar10,
    write_image_tree,
    write_mnist,
    write_speech_commands,
    write_urbansound8k,
)

from astraora.train import run

TEXT = "\n".join(f"ROMEO: line {i}, the quick brown fox jumps over the lazy dog." for i in range(400)) + "\n"
STEP = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.diagnostics.every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=1",
    "zo.samples=2",
    "integrator.samples=2",
    "surrogate.rank=2",
]
SMALL_AUDIO = [
    "task.model.channels=8",
    "task.model.embedding_dim=8",
    "++task.model.attention_channels=4",
    "task.datamodule.batch_size=4",
    "task.datamodule.num_workers=0",
]
SMALL_GPT = [
    "task.model.n_layer=1",
    "task.model.n_head=2",
    "task.model.n_embd=16",
    "task.model.block_size=16",
    "task.datamodule.batch_size=4",
    "task.datamodule.samples_per_epoch=16",
    "task.generate.max_new_tokens=8",
]


def prepare(task: str, data: Path) -> list[str]:
    """Write the task's fixture under ``data`` and return the overrides that point the task at it."""
    if task == "mnist":
        write_mnist(data)
        return [
            "task.datamodule.download=false",
            "task.datamodule.batch_size=4",
            "task.datamodule.num_workers=0",
            "task.model.width=0.0625",
        ]
    if task == "cifar10":
        write_cifar10(data)  # the official format, not the official files: no checksums to match
        return [
            "task.datamodule.download=false",
            "task.datamodule.verify=false",
            "task.datamodule.batch_size=4",
            "task.datamodule.num_workers=0",
            "task.model.width=0.0625",
        ]
    if task == "image_folder":
        write_image_tree(data / "images")
        return [
            f"task.root={data / 'images'}",
            "task.datamodule.batch_size=4",
            "task.datamodule.num_workers=0",
            "task.model.width=0.0625",
            "task.datamodule.image_size=16",
        ]
    if task == "speechcommands":
        write_speech_commands(data)
        return ["task.datamodule.download=false", *SMALL_AUDIO]
    if task == "urbansound8k":
        write_urbansound8k(data)
        return [*SMALL_AUDIO, "task.datamodule.duration=0.5"]
    if task == "audio_folder":
        write_audio_tree(data / "sounds")
        return [f"task.root={data / 'sounds'}", *SMALL_AUDIO, "task.datamodule.duration=0.5"]
    if task == "synthetic_audio":
        return SMALL_AUDIO
    if task == "tinyshakespeare":
        path = data / "tinyshakespeare" / "input.txt"
        path.parent.mkdir(parents=True)
        path.write_text(TEXT, encoding="utf-8")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return ["task.datamodule.download=false", f"task.datamodule.sha256={digest}", *SMALL_GPT]
    if task == "wikitext2":
        folder = data / "wikitext2" / "wikitext-2-raw"
        folder.mkdir(parents=True)
        for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
            (folder / name).write_text(" = Heading = \n\n" + TEXT, encoding="utf-8")
        return ["task.datamodule.download=false", *SMALL_GPT]
    if task == "text_file":
        (data / "book.txt").write_text(TEXT, encoding="utf-8")
        return [f"task.path={data / 'book.txt'}", *SMALL_GPT]
    if task == "pydoc_text":
        return SMALL_GPT
    return ["task.model.hidden=8"]  # digits


TASKS = [
    "digits",
    "mnist",
    "cifar10",
    "image_folder",
    "speechcommands",
    "urbansound8k",
    "audio_folder",
    "synthetic_audio",
    "pydoc_text",
    "tinyshakespeare",
    "wikitext2",
    "text_file",
]


@pytest.mark.slow
@pytest.mark.parametrize("device", ["slm", "digital"])
@pytest.mark.parametrize("task", TASKS)
def test_one_training_step_per_task(task, device, make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("ASTRAORA_DATA_DIR", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    cfg = make_cfg(f"task={task}", f"device={device}", f"paths.data_dir={data}", *STEP, *prepare(task, data))
    summary = run(cfg)
    assert summary["status"] == "completed" and summary["steps"] == 1
    metric = "test/acc" if cfg.task.kind == "classification" else "test/ppl"
    assert metric in summary["metrics"]
    if device == "digital":
        assert summary["queries"]["total"] == 0
    else:
        assert summary["queries"]["zo"] > 0 and summary["surrogate"]["rel_error"] is not None
