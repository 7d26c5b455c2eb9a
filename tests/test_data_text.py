"""Language-modelling DataModules: real loading code on tiny local fixtures, downloads disabled."""

import hashlib
import urllib.error
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from astraora.config import compose_entry
from astraora.data import text as text_data
from astraora.data.text import (
    PydocTextDataModule,
    TextFileDataModule,
    TinyShakespeareDataModule,
    WikiText2DataModule,
)
from astraora.errors import ConfigError, DataFileError, DatasetNotFoundError

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"
T = 8


def corpus(n_lines: int = 400, seed: int = 0) -> str:
    """Shakespeare-like text of about 45 characters per line."""
    gen = torch.Generator().manual_seed(seed)
    words = "the king doth wake tonight and bid me speak of love thou art more fair".split()
    lines = []
    for i in range(n_lines):
        picks = torch.randint(len(words), (7,), generator=gen).tolist()
        lines.append(("ROMEO: " if i % 2 else "JULIET: ") + " ".join(words[j] for j in picks) + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def no_data_dir_env(monkeypatch):
    monkeypatch.delenv("ASTRAORA_DATA_DIR", raising=False)


@pytest.fixture
def shakespeare_dir(tmp_path) -> Path:
    path = tmp_path / "tinyshakespeare" / "input.txt"
    path.parent.mkdir()
    path.write_text(corpus(), encoding="utf-8")
    return tmp_path


def write_wikitext(root: Path) -> None:
    folder = root / "wikitext2" / "wikitext-2-raw"
    folder.mkdir(parents=True)
    for i, file in enumerate(("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw")):
        (folder / file).write_text(
            f" = Heading {i} = \n\n" + corpus(60 if i else 200, seed=i) + "Café ✓\n", encoding="utf-8"
        )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_batches(dm, split_tokens: dict[str, torch.Tensor]) -> None:
    """Batches are (B, T) int64, targets are idx shifted by one, eval windows tile the split."""
    idx, targets = next(iter(dm.train_dataloader()))
    assert idx.shape == targets.shape == (dm.batch_size, T)
    assert idx.dtype == targets.dtype == torch.int64
    assert torch.equal(idx[:, 1:], targets[:, :-1])
    train = split_tokens["train"].long()
    offsets = dm.train_dataloader().dataset.offsets
    for row, offset in zip(idx, offsets[: len(idx)], strict=True):  # the first batch: its offsets
        assert torch.equal(row, train[offset : offset + T])
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        windows = torch.cat([x for x, _ in loader])
        assert len(windows) == (len(split_tokens[split]) - 1) // T
        assert torch.equal(windows.flatten(), split_tokens[split][: windows.numel()].long())


# -------------------------------------------------------------------------------------- tinyshakespeare


def test_tinyshakespeare_loads_from_its_real_location(shakespeare_dir):
    path = shakespeare_dir / "tinyshakespeare" / "input.txt"
    dm = TinyShakespeareDataModule(
        data_dir=shakespeare_dir,
        download=False,
        sha256=sha256_of(path),
        block_size=T,
        batch_size=4,
        samples_per_epoch=16,
    )
    dm.prepare_data()
    dm.setup("fit")
    text = path.read_text(encoding="utf-8")
    assert dm.char_level and dm.vocab_size == len(set(text))
    assert dm.model_kwargs() == {"vocab_size": dm.vocab_size}
    # split by position, 90/5/5, nothing lost
    assert dm.decode(torch.cat(list(dm.tokens.values())).tolist()) == text
    assert len(dm.tokens["train"]) == int(0.9 * len(text))
    assert dm.decode(dm.tokens["val"][:20].tolist()) == text[len(dm.tokens["train"]) :][:20]
    check_batches(dm, dm.tokens)


def test_tinyshakespeare_checksum(shakespeare_dir):
    kwargs = dict(data_dir=shakespeare_dir, download=False, block_size=T)
    with pytest.raises(DataFileError, match="input.txt has SHA-256 .* expected"):
        TinyShakespeareDataModule(**kwargs).setup()  # the real digest does not match the fixture
    with pytest.warns(UserWarning, match="not checked"):
        TinyShakespeareDataModule(sha256=None, **kwargs).setup()


def test_tinyshakespeare_missing_offline(tmp_path, monkeypatch):
    dm = TinyShakespeareDataModule(data_dir=tmp_path, download=False)
    dm.prepare_data()
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup()
    message = str(err.value)
    assert "\n" not in message and "tinyshakespeare" in message and str(tmp_path) in message

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(text_data.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="tinyshakespeare"):
        TinyShakespeareDataModule(data_dir=tmp_path, download=True).prepare_data()
    assert not (tmp_path / "tinyshakespeare").exists()  # nothing half-written left behind


def test_tinyshakespeare_download_is_verified(tmp_path, monkeypatch):
    data = corpus().encode()
    monkeypatch.setattr(text_data, "unreachable", lambda url: None)  # the server answers (faked below)

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return data

    monkeypatch.setattr(text_data.urllib.request, "urlopen", lambda url, timeout: Response())
    with pytest.raises(DataFileError, match="downloaded from https://.* has SHA-256"):
        TinyShakespeareDataModule(data_dir=tmp_path).prepare_data()
    assert not (tmp_path / "tinyshakespeare").exists()

    TinyShakespeareDataModule(data_dir=tmp_path, sha256=hashlib.sha256(data).hexdigest()).prepare_data()
    assert (tmp_path / "tinyshakespeare" / "input.txt").read_bytes() == data


# -------------------------------------------------------------------------------------- wikitext2


def test_wikitext2_reads_the_raw_files_byte_level(tmp_path):
    write_wikitext(tmp_path)
    dm = WikiText2DataModule(data_dir=tmp_path, download=False, block_size=T, batch_size=4, samples_per_epoch=8)
    dm.setup()
    assert not dm.char_level and dm.vocab_size == 256
    raw = tmp_path / "wikitext2" / "wikitext-2-raw"
    assert bytes(dm.tokens["val"].tolist()) == (raw / "wiki.valid.raw").read_bytes()
    assert dm.decode(dm.tokens["test"].tolist()) == (raw / "wiki.test.raw").read_text(encoding="utf-8")
    check_batches(dm, dm.tokens)


def test_wikitext2_offline_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as err:
        WikiText2DataModule(data_dir=tmp_path, download=False).setup()
    assert "\n" not in str(err.value) and "wikitext2" in str(err.value) and str(tmp_path) in str(err.value)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetNotFoundError, match="wikitext2"):
        WikiText2DataModule(data_dir=tmp_path, download=True).prepare_data()


def test_wikitext2_download_writes_the_raw_files(tmp_path, monkeypatch):
    import datasets

    rows = {split: {"text": [" = Title = \n", "", f" {split} text \n"]} for split in ("train", "validation", "test")}
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: rows)
    monkeypatch.setattr(text_data, "unreachable", lambda url: None)  # the Hub answers
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    WikiText2DataModule(data_dir=tmp_path).prepare_data()
    valid = tmp_path / "wikitext2" / "wikitext-2-raw" / "wiki.valid.raw"
    assert valid.read_text(encoding="utf-8") == " = Title = \n\n validation text \n"


# -------------------------------------------------------------------------------------- text_file


def text_file_dm(path, **kwargs):
    kwargs = dict(block_size=T, batch_size=4, samples_per_epoch=16, chunk_size=256) | kwargs
    dm = TextFileDataModule(path=path, **kwargs)
    dm.setup()
    return dm


def test_text_file_char_and_byte(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(corpus() + "naïve café ✓\n", encoding="utf-8")
    char = text_file_dm(path)
    assert char.char_level and char.vocab_size == len(set(path.read_text(encoding="utf-8")))
    assert sum(len(t) for t in char.tokens.values()) == len(path.read_text(encoding="utf-8"))
    check_batches(char, char.tokens)

    byte = text_file_dm(str(path), tokenizer="byte")
    assert not byte.char_level and byte.vocab_size == 256
    assert sum(len(t) for t in byte.tokens.values()) == len(path.read_bytes())
    check_batches(byte, byte.tokens)


def test_text_file_list_and_directory(tmp_path):
    (tmp_path / "books" / "more").mkdir(parents=True)
    first, second = tmp_path / "books" / "a.txt", tmp_path / "books" / "more" / "b.txt"
    first.write_text(corpus(200, seed=1), encoding="utf-8")
    second.write_text(corpus(200, seed=2), encoding="utf-8")
    (tmp_path / "books" / "notes.md").write_text("ignored", encoding="utf-8")
    from_dir = text_file_dm(tmp_path / "books")
    from_list = text_file_dm([str(first), str(second)])
    assert from_dir.files() == [first, second]
    for split in ("train", "val", "test"):
        assert torch.equal(from_dir.tokens[split], from_list.tokens[split])


def test_text_file_split_is_determined_by_the_seed(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(corpus(), encoding="utf-8")
    a, b, c = text_file_dm(path, seed=0), text_file_dm(path, seed=0), text_file_dm(path, seed=1)
    assert all(torch.equal(a.tokens[s], b.tokens[s]) for s in ("train", "val", "test"))
    assert not torch.equal(a.tokens["val"], c.tokens["val"])
    sizes = [len(a.tokens[s]) for s in ("train", "val", "test")]
    assert sizes[0] > 10 * sizes[1] > 0 and sizes[2] > 0


def test_text_file_bad_inputs(tmp_path):
    latin1, empty = tmp_path / "latin1.txt", tmp_path / "empty.txt"
    latin1.write_bytes(corpus().encode() + "déjà vu\n".encode("latin-1"))
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataFileError, match="latin1.txt is not valid UTF-8.*tokenizer=byte"):
        text_file_dm(latin1)
    assert text_file_dm(latin1, tokenizer="byte").vocab_size == 256
    with pytest.raises(DataFileError, match="empty.txt is empty"):
        text_file_dm(empty)
    with pytest.raises(DatasetNotFoundError, match="nowhere.txt not found"):
        text_file_dm(tmp_path / "nowhere.txt")
    (tmp_path / "no_text").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no .txt files"):
        text_file_dm(tmp_path / "no_text")
    with pytest.raises(ConfigError, match="task.path"):
        TextFileDataModule(path=None)
    with pytest.raises(ConfigError, match="tokenizer"):
        TextFileDataModule(path=latin1, tokenizer="bpe")
    with pytest.raises(ConfigError, match="splits"):
        TextFileDataModule(path=latin1, splits=[0.9, 0.1])
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="too few"):
        text_file_dm(short)


# -------------------------------------------------------------------------------------- shared behaviour


def test_pydoc_corpus_loads_offline(tmp_path):
    dm = PydocTextDataModule(data_dir=tmp_path, block_size=T)
    dm.prepare_data()
    dm.setup()
    assert dm.char_level and 60 < dm.vocab_size < 200
    assert len(dm.tokens["train"]) > 300_000
    assert " the " in dm.decode(dm.tokens["val"][:2000].tolist())


def test_encode_decode_round_trip(tmp_path):
    pydoc = PydocTextDataModule(data_dir=tmp_path)
    pydoc.setup()
    sample = "The import statement (see also: Python)."
    assert pydoc.decode(pydoc.encode(sample)) == sample
    with pytest.raises(ConfigError, match="generate.prompt"):
        pydoc.encode("\x00")
    write_wikitext(tmp_path)
    wiki = WikiText2DataModule(data_dir=tmp_path, download=False)
    wiki.setup()
    assert wiki.decode(wiki.encode("naïve ✓")) == "naïve ✓"
    with pytest.raises(RuntimeError, match="setup"):
        _ = PydocTextDataModule(data_dir=tmp_path).vocab_size


def test_training_windows_depend_on_seed_and_epoch_only(tmp_path):
    def offsets(seed, epoch):
        dm = PydocTextDataModule(data_dir=tmp_path, seed=seed, block_size=T, samples_per_epoch=64)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(offsets(0, 3), offsets(0, 3))
    assert not torch.equal(offsets(0, 3), offsets(0, 4))
    assert not torch.equal(offsets(0, 3), offsets(1, 3))


def test_lightning_sets_the_epoch_of_the_training_windows(tmp_path):
    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch[0].clone()))
            return self.weight.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = PydocTextDataModule(data_dir=tmp_path, block_size=T, batch_size=4, samples_per_epoch=8)
    module = Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    reference = dm.train_dataloader()
    for epoch in (0, 1):
        reference.sampler.set_epoch(epoch)
        expected = torch.cat([x for x, _ in reference])
        assert torch.equal(torch.cat([x for e, x in module.seen if e == epoch]), expected)


# -------------------------------------------------------------------------------------- task YAMLs


@pytest.mark.parametrize("task", ["pydoc_text", "tinyshakespeare", "wikitext2", "text_file"])
def test_task_yaml_instantiates(task, tmp_path, shakespeare_dir):
    write_wikitext(shakespeare_dir)
    book = tmp_path / "book.txt"
    book.write_text(corpus(), encoding="utf-8")
    overrides = {
        "tinyshakespeare": {
            "datamodule": {"download": False, "sha256": sha256_of(shakespeare_dir / "tinyshakespeare" / "input.txt")}
        },
        "wikitext2": {"datamodule": {"download": False}},
        "text_file": {"path": str(book)},
    }
    cfg = OmegaConf.merge(
        {"paths": {"data_dir": str(shakespeare_dir)}, "seed": 0},
        {"task": compose_entry("task", task)},
        {"task": overrides.get(task, {})},
    )
    assert cfg.task.name == task and cfg.task.kind == "language_model"
    assert cfg.task.optimizer.name == "adamw"
    assert set(cfg.task.generate) == {"max_new_tokens", "temperature", "prompt"}
    dm = instantiate(cfg.task.datamodule)
    dm.prepare_data()
    dm.setup("fit")
    model = instantiate(
        cfg.task.model, layer_factory=lambda d_in, d_out, name: torch.nn.Linear(d_in, d_out), **dm.model_kwargs()
    )
    idx, targets = next(iter(dm.train_dataloader()))
    assert idx.shape == (cfg.task.datamodule.batch_size, cfg.task.model.block_size)
    with torch.no_grad():
        logits = model(idx[:2, :16])
    assert logits.shape == (2, 16, dm.vocab_size)
    prompt = torch.tensor([dm.encode(cfg.task.generate.prompt)])
    assert model.generate(prompt, 3, temperature=cfg.task.generate.temperature).shape == (1, prompt.shape[1] + 3)
