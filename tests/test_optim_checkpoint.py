import math
import os
from pathlib import Path

import pytest
import torch

from segtrain.checkpoint import load_checkpoint, save_checkpoint
from segtrain.training.optim import RunLength, build_scheduler, param_groups, run_length


def _lrs(name, steps=10, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, total_steps=steps, name=name, **kw)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_poly_cosine_and_warmup_follow_their_formulas():
    assert _lrs("poly", power=0.9) == pytest.approx([(1 - s / 10) ** 0.9 for s in range(10)])
    assert _lrs("cosine") == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])
    assert _lrs("none", warmup_steps=4)[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    with pytest.raises(ValueError, match="valid: poly, cosine, none"):
        _lrs("step")


def test_param_groups_exclude_norms_and_biases_from_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3, 3, 3)] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint({"step": 1}, tmp_path / "last.pt")
    assert load_checkpoint(path) == {"step": 1}

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
    # The usual permissions, not the temporary file's 0600: a shared run directory stays readable.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_load_refuses_pickled_objects_and_names_the_file(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"f": print}, path)  # a builtin function: allowed by pickle, refused by weights_only
    with pytest.raises(RuntimeError, match="evil.pt: not a readable segtrain checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_run_length_in_epochs_or_steps():
    assert run_length(3, None, None, steps_per_epoch=4) == RunLength(total_steps=12, epochs=3, stop_at=12)
    assert run_length(None, 10, None, steps_per_epoch=4) == RunLength(10, 3, 10)  # ends 2 steps into epoch 3
    assert run_length(None, 10, 7, steps_per_epoch=4) == RunLength(10, 3, 7)
    with pytest.raises(ValueError, match=r"trainer.epochs=3 and trainer.steps=10: set exactly one of the two"):
        run_length(3, 10, None, steps_per_epoch=4)
    with pytest.raises(ValueError, match="set exactly one"):
        run_length(None, None, None, steps_per_epoch=4)
    with pytest.raises(ValueError, match=r"trainer.steps=0: expected a whole number >= 1"):
        run_length(None, 0, None, steps_per_epoch=4)


def test_trainer_steps_trains_exactly_that_many_steps_to_a_zero_poly_lr(tmp_path, caplog):
    from segtrain.config import compose_config
    from segtrain.train import train

    overrides = ["debug=fast", f"dataset.root={tmp_path / 'data'}", "trainer.max_steps=null", "trainer.epochs=null",
                 "trainer.steps=6", "trainer.min_steps_warning=500", "scheduler=poly"]
    with caplog.at_level("INFO", logger="segtrain.train"):
        train(compose_config(overrides), tmp_path / "run")
    assert "6 optimizer steps in total = 4 per epoch x 1.5 epochs" in caplog.text
    assert ("6 optimizer steps in total: too few for most real datasets; set trainer.steps or trainer.epochs"
            in caplog.text)
    last = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert last["train_state"]["step"] == 6 and last["train_state"]["step_in_epoch"] == 2
    assert last["scheduler"]["last_epoch"] == 6 and all(g["lr"] == 0.0 for g in last["optimizer"]["param_groups"])
    with pytest.raises(ValueError, match="set exactly one of the two"):  # before the run directory exists
        train(compose_config(overrides + ["trainer.epochs=2"]), tmp_path / "both")
    assert not (tmp_path / "both").exists()
