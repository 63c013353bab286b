"""Sharded datasets: ``python -m segtrain.shard`` writes WebDataset-format tars and an index; training and
evaluation stream them (segtrain/data/shards.py). Oracles: the folder run of the same data, WebDataset and
braceexpand reading the same shards and patterns, the source files' own bytes."""

import json
import tarfile
from collections import Counter
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import torch
from PIL import Image

from segtrain import distributed
from segtrain.checkpoint import load_checkpoint
from segtrain.config import compose_config
from segtrain.data import ensure_synthetic, make_dataset
from segtrain.data.scan import image_class_counts
from segtrain.data.shard_files import ShardError, expand_urls
from segtrain.data.shard_index import read_index
from segtrain.data.shards import ShardDataset
from segtrain.distributed import parameters_digest
from segtrain.metrics import flatten_metrics
from segtrain.shard import write_shards
from segtrain.train import train


def _shard(overrides: list[str], out: Path, max_count: int = 1000) -> list[str]:
    cfg = compose_config(overrides)
    return write_shards(cfg, out, [cfg.dataset.train_split, cfg.dataset.val_split], max_count, 2**30)


def _weights(path: Path) -> str:
    model = torch.nn.Module()
    for name, value in load_checkpoint(path)["model"].items():
        model.register_parameter(name.replace(".", "_"), torch.nn.Parameter(value, requires_grad=False))
    return parameters_digest(model)


def test_one_shard_trains_exactly_as_the_folder(trained, tmp_path):
    """The same 4 steps and evaluation as the shared folder run: one shard's draws are the folder sampler's."""
    _shard(["debug=fast", f"dataset.root={trained / 'data'}"], tmp_path / "shards")
    overrides = ["debug=fast", "dataset=shards", f"dataset.root={tmp_path / 'shards'}", "dataset.batch_size_val=4",
                 "trainer.max_steps=4"]
    train(compose_config(overrides), tmp_path / "run", overrides=overrides)
    assert _weights(tmp_path / "run/checkpoints/last.pt") == _weights(trained / "run/checkpoints/last.pt")
    ours, folder = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "run", trained / "run"))
    for key in ("final", "best", "class_pixels", "class_images", "split_sizes"):
        assert ours[key] == folder[key], key


@pytest.fixture(scope="module")
def split24(tmp_path_factory):
    """24 train / 5 val synthetic images of 16 px as shards of 5 samples (5, 5, 5, 5, 4)."""
    tmp = tmp_path_factory.mktemp("shards24")
    ensure_synthetic(tmp / "data", num_train=24, num_val=5, size=16, seed=3)
    overrides = ["debug=fast", f"dataset.root={tmp / 'data'}", "dataset.generate.num_train=24",
                 "dataset.generate.num_val=5", "dataset.generate.size=16", "dataset.generate.seed=3"]
    _shard(overrides, tmp / "shards", max_count=5)
    return tmp


def test_the_index_holds_the_folder_pass_statistics(split24):
    index = read_index(str(split24 / "shards"), "train")
    assert index.sizes == [5, 5, 5, 5, 4]
    folder = make_dataset("folder", split24 / "data", "train", num_classes=3)
    counts = image_class_counts(folder, 3, 255, cache=False)
    from segtrain.data.class_stats import ClassStats
    assert index.stats() == ClassStats.from_counts(counts)
    assert [n for names in index.names for n in names] == [p.relative_to(split24 / "data").as_posix()
                                                           for p in folder.image_paths]


def _ids(dataset: ShardDataset, workers: int, batch: int) -> list[int]:
    """The index-order numbers of the samples a DataLoader over ``dataset`` yields, in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=list)
    return [i for b in loader for i in b]


@pytest.fixture
def numbered(split24, monkeypatch):
    """A ShardDataset whose samples decode to their index-order number (what was read is what is counted)."""
    def decode(self, shard, sample, entry, seed):
        key, fields = entry
        assert fields, "a sample that was yielded must have been kept"
        return int(self.offsets[shard]) + sample

    monkeypatch.setattr(ShardDataset, "_decode", decode)
    return lambda: ShardDataset(str(split24 / "shards"), "train", 3, 255)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_see_every_sample_once_per_epoch_and_resume_exactly(numbered, monkeypatch, workers):
    epochs = []
    for epoch in range(2):
        seen = {}
        for rank in range(2):
            monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
            monkeypatch.setattr(distributed, "world_size", lambda: 2)
            dataset = numbered()
            dataset.train, dataset.seed = True, 7
            assert dataset.plan(2, workers, 4) == 12  # 24 samples, 2 ranks: 12 draws each
            dataset.set_epoch(epoch)
            seen[rank] = _ids(dataset, workers, 2)
            for start in (2, 6):  # a resume after 1 and 3 steps of 2 samples goes on exactly
                dataset.set_epoch(epoch, start)
                assert _ids(dataset, workers, 2) == seen[rank][start:]
        assert len(seen[0]) == len(seen[1]) == 12
        assert Counter(seen[0] + seen[1]) == Counter(range(24))
        epochs.append(seen[0] + seen[1])
    assert epochs[0] != epochs[1]  # shards and samples are drawn again each epoch


def test_an_epoch_is_cut_to_whole_steps_over_ranks(numbered, monkeypatch):
    """24 samples, 2 ranks x batch 2 x grad_accum 4: 16 draws an epoch, 8 dropped, none twice."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        dataset = numbered()
        dataset.train = True
        assert dataset.plan(2, 2, 8) == 8
        seen += _ids(dataset, 2, 2)
    assert len(seen) == len(set(seen)) == 16


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_reads_each_sample_once_in_the_order_it_reports(numbered, monkeypatch, workers):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        dataset = numbered()
        dataset.plan(3, workers)
        ids = _ids(dataset, workers, 3)
        assert ids == dataset.sample_order()  # per-image reports name images by this order
        seen += ids
    assert sorted(seen) == list(range(24))


def test_one_sample_by_number_for_the_galleries(split24):
    shards = ShardDataset(str(split24 / "shards"), "train", 3, 255)
    folder = make_dataset("folder", split24 / "data", "train", num_classes=3)
    for i in (0, 7, 23):
        for ours, theirs in zip(shards[i], folder[i]):
            assert torch.equal(ours, theirs)
    with pytest.raises(IndexError):
        shards[24]


def _write_png(path: Path, array: np.ndarray, mode: str, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, mode=mode) if mode != "I;16" else Image.fromarray(array.astype(np.uint16))
    if palette is not None:
        img.putpalette(palette)
    img.save(path)


@pytest.mark.parametrize("kind", ["palette", "uint16"])
def test_palette_and_16_bit_masks_round_trip_bit_exact(tmp_path, kind):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split in ("train", "val"):
        for i in range(2):
            _write_png(root / f"images/{split}/{i}.png", rng.integers(0, 255, (6, 7, 3), dtype=np.uint8), "RGB")
            if kind == "palette":  # indices 0..2 and 255, with colours that are not the indices
                labels = rng.choice([0, 1, 2, 255], (6, 7)).astype(np.uint8)
                _write_png(root / f"masks/{split}/{i}.png", labels, "P", [9, 8, 7] * 256)
            else:  # 16-bit stored values that a label mapping turns into classes
                labels = rng.choice([0, 700, 40000, 65535], (6, 7)).astype(np.uint16)
                _write_png(root / f"masks/{split}/{i}.png", labels, "I;16")
    mapping = [] if kind == "palette" else ["+dataset.label_mapping={0:0,700:1,40000:2}"]
    overrides = ["debug=fast", "dataset=folder", f"dataset.root={root}", "dataset.num_classes=3", *mapping]
    _shard(overrides, tmp_path / "shards")
    with tarfile.open(tmp_path / "shards/train-000000.tar") as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar}
    for i in range(2):
        assert stored[f"{i:08d}.mask.png"] == (root / f"masks/train/{i}.png").read_bytes()
        assert stored[f"{i:08d}.png"] == (root / f"images/train/{i}.png").read_bytes()
    folder = make_dataset("folder", root, "train", num_classes=3, **({} if kind == "palette" else
                                                                     {"label_mapping": {0: 0, 700: 1, 40000: 2}}))
    shards = ShardDataset(str(tmp_path / "shards"), "train", 3, 255)
    for i in range(2):
        assert np.array_equal(shards[i][1].numpy(), folder.load_mask(i))


def test_webdataset_reads_the_shards_as_written(split24):
    import webdataset

    url = str(split24 / "shards/train-000001.tar")
    ours = ShardDataset(str(split24 / "shards"), "train", 3, 255)._read(1, set(range(5)))
    theirs = list(webdataset.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [key for key, _ in ours.values()]
    for sample, (key, fields) in zip(theirs, ours.values()):
        assert {f: sample[f] for f in fields} == fields
        assert json.loads(sample["json"])["image"] == read_index(str(split24 / "shards"), "train").names[1][
            int(key) - 5]


@pytest.mark.parametrize("pattern", ["a-{000..011}.tar", "s3://b/{train,val}-{8..10}.tar", "plain.tar",
                                     "pipe:cat /x/{0..2}-{a,b}.tar"])
def test_brace_patterns_expand_as_braceexpand(pattern):
    assert expand_urls(pattern) == list(braceexpand.braceexpand(pattern))


def test_missing_and_corrupt_shards_are_named(split24, tmp_path):
    with pytest.raises(OSError, match=str(tmp_path / "nowhere" / "train.json")):
        ShardDataset(str(tmp_path / "nowhere"), "train", 3, 255)
    missing = str(tmp_path / "gone-{0..4}.tar")
    dataset = ShardDataset(str(split24 / "shards"), "train", 3, 255, urls=missing)
    with pytest.raises(ShardError, match="gone-0.tar: cannot open the shard"):
        dataset[0]
    data = (split24 / "shards/train-000000.tar").read_bytes()
    for name, broken in (("truncated", data[: len(data) // 2 + 100]), ("garbled", data[:600] + b"\x17" * 3000)):
        (tmp_path / f"{name}.tar").write_bytes(broken)
        urls = [str(tmp_path / f"{name}.tar")] + [str(split24 / f"shards/train-{i:06d}.tar") for i in range(1, 5)]
        with pytest.raises(ShardError, match=f"{name}.tar: corrupt or truncated tar"):
            ShardDataset(str(split24 / "shards"), "train", 3, 255, urls=urls)[0]
    failing = [f"pipe:cat {tmp_path}/absent.tar"] * 5
    with pytest.raises(ShardError, match="absent.tar: the command exited with status 1"):
        ShardDataset(str(split24 / "shards"), "train", 3, 255, urls=failing)[0]


def test_piped_and_fsspec_shards_read_as_the_files(split24):
    import fsspec

    memory = fsspec.filesystem("memory")  # fsspec's in-process store stands in for an object store
    for i in range(5):
        memory.pipe(f"/bucket/train-{i:06d}.tar", (split24 / f"shards/train-{i:06d}.tar").read_bytes())
    local = ShardDataset(str(split24 / "shards"), "train", 3, 255)
    pattern = "train-{000000..000004}.tar"
    for urls in (f"pipe:cat {split24}/shards/{pattern}", f"memory://bucket/{pattern}"):
        streamed = ShardDataset(str(split24 / "shards"), "train", 3, 255, urls=urls)
        assert all(torch.equal(a, b) for a, b in zip(streamed[13], local[13]))
    with pytest.raises(ShardError, match="memory://bucket/none.tar: cannot open the shard"):
        ShardDataset(str(split24 / "shards"), "train", 3, 255, urls=["memory://bucket/none.tar"] * 5)[0]


def test_settings_that_differ_from_the_index_are_refused(split24):
    with pytest.raises(ValueError, match="dataset.num_classes=4, but the shards of .*train.json were written with "
                                         "num_classes=3"):
        ShardDataset(str(split24 / "shards"), "train", 4, 255)
    cfg = compose_config(["debug=fast", "dataset=shards", f"dataset.root={split24 / 'shards'}",
                          "dataset.sampling.repeat_thresh=0.3"])
    from segtrain.build import build_data
    with pytest.raises(ValueError, match="repeat_thresh with dataset.layout=shards"):
        build_data(cfg.dataset)


def test_evaluation_from_shards_equals_the_folder_and_names_the_same_images(trained, tmp_path):
    """Two loader workers and batches of one: the loader yields 0, 2, 1, 3, and the per-image report must still
    name each image with its own scores."""
    from segtrain.evaluate import evaluate_checkpoint

    _shard(["debug=fast", f"dataset.root={trained / 'data'}"], tmp_path / "shards")
    checkpoint, one = trained / "run/checkpoints/last.pt", ["dataset.batch_size_val=1"]
    folder, names = evaluate_checkpoint(checkpoint, [*one, f"report.dir={tmp_path / 'folder'}"])
    shards, _ = evaluate_checkpoint(checkpoint, [*one, "dataset=shards", f"dataset.root={tmp_path / 'shards'}",
                                                 "trainer.num_workers=2", f"report.dir={tmp_path / 'sh'}"])
    np.testing.assert_equal(flatten_metrics(shards, names, "val"), flatten_metrics(folder, names, "val"))  # NaN == NaN
    for name in ("report.md", "per_image.csv", "gallery_spot.jpg"):  # shards name images relative to the source root
        ours, theirs = (tmp_path / "sh" / name).read_bytes(), (tmp_path / "folder" / name).read_bytes()
        assert ours == theirs.replace(f"{trained / 'data'}/".encode(), b""), name
