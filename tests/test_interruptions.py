"""What gets in a run's way from outside: a full disk, a second training in the same run directory, SIGTERM
during predict and export. Each stops with one clear line and the documented exit status, and what was on
disk before is intact."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain import atomic, calibrate, export
from segtrain.atomic import NoSpaceLeft, atomic_write
from segtrain.checkpoint import save_checkpoint
from segtrain.config import compose_config
from segtrain.train import train
from segtrain.training import run_lock
from segtrain.training.signals import STOPPED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
# The classic U-Net at width 4: checkpoints of a few hundred kB, so a small file system fills quickly.
TINY = ["model.encoder=null", "model.base_width=4", "model.decoder_channels=null"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """``(folder, fill, mounted)``: a 16 MiB tmpfs where this machine lets the test mount one, else a plain folder whose free
    space segtrain is told is what ``fill(free)`` leaves (an injected ENOSPC). ``fill(free)`` leaves about
    ``free`` bytes."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    if mounted:
        def fill(free: int) -> None:
            left = atomic._free_bytes(folder) - free
            if left > 0:
                (folder / "filler").write_bytes(b"\0" * left)
    else:
        real = atomic._free_bytes
        def fill(free: int) -> None:
            monkeypatch.setattr(atomic, "_free_bytes", lambda f: free if Path(f).is_relative_to(folder) else real(f))
    yield folder, fill, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_mid_write_is_named_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Python's ENOSPC and torch's short write ("unexpected pos") become NoSpaceLeft; a short write on a folder with
    room is another failure and is reported as it is."""
    def fails_with(err):
        def write(tmp: Path) -> None:
            tmp.write_bytes(b"x" * 1000)
            raise err
        return write

    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 512)
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    for err in (OSError(errno.ENOSPC, "No space left on device"), short):
        with pytest.raises(NoSpaceLeft, match=rf"no space left on {tmp_path} \(512 bytes free, ~1000 bytes needed\)"):
            atomic_write(tmp_path / "x.pt", fails_with(err))
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 10 << 30)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(tmp_path / "x.pt", fails_with(short))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NoSpaceLeft, match=r"\(10.0 GiB free, ~20.0 GiB needed\)"):  # before anything is written
        atomic_write(tmp_path / "x.pt", fails_with(short), size_hint=20 << 30)


def test_a_checkpoint_on_a_full_disk_fails_cleanly_and_keeps_the_older_one(small_disk):
    folder, fill, mounted = small_disk
    state = {"w": torch.randn(300_000)}  # 1.2 MB
    path = save_checkpoint(state, folder / "last.pt")
    before = _sha(path)
    fill(600_000)
    state["w"] += 1
    with pytest.raises(NoSpaceLeft, match=rf"no space left on {folder} \(.* free, ~1.1 MiB needed\)"):
        save_checkpoint(state, path)
    assert _sha(path) == before and sorted(p.name for p in folder.iterdir()) == ["filler", "last.pt"][1 - mounted:]


def test_export_and_calibrate_on_a_full_disk_stop_with_status_2(trained, small_disk, capsys):
    folder, fill, mounted = small_disk
    ckpt = trained / "run/checkpoints/last.pt"
    fill(1 << 20)  # the trained UNet-R18 is ~50 MB of weights
    if mounted:  # torch.export's own writer aborted the process at exit on a full disk: run it as users do
        proc = subprocess.run([sys.executable, "-m", "segtrain.export", f"checkpoint={ckpt}", "format=torch_export",
                               f"output={folder / 'model.pt2'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        code, err = proc.returncode, proc.stderr
        assert "Expect archive file to be a file ending in .pt2" not in err
    else:
        code, err = export.main([f"checkpoint={ckpt}", "format=torch_export", f"output={folder / 'model.pt2'}"]), \
            capsys.readouterr().err
    assert code == 2 and f"error: no space left on {folder} (" in err and "needed); files written before" in err, err
    assert calibrate.main([f"checkpoint={ckpt}", f"output={folder / 'cal.pt'}"]) == 2
    assert f"error: no space left on {folder} (" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == (["filler"] if mounted else [])


@pytest.mark.parametrize("free", [1_200_000, 50_000], ids=["checkpoint", "tensorboard"])
def test_training_on_a_full_disk_says_so_in_train_log_and_keeps_its_checkpoint(small_disk, tmp_path, free):
    """With room for the logs but not a checkpoint (1.5 MB), segtrain's write stops it; with less, TensorBoard's
    own writer meets the full disk first, and its bare ENOSPC is named the same way."""
    folder, fill, mounted = small_disk
    if free < 100_000 and not mounted:
        pytest.skip("TensorBoard's writer meets a full disk only on a real one: no tmpfs can be mounted here")
    run = folder / "run"
    common = ["debug=fast", f"dataset.root={tmp_path / 'data'}", *TINY, "trainer.log_every=1"]
    train(compose_config(common), run)
    last = run / "checkpoints/last.pt"
    before = _sha(last)
    fill(free)
    more = common + ["trainer.resume=auto", "trainer.max_steps=4", "trainer.epochs=2"]
    if mounted:
        proc = subprocess.run([sys.executable, "-m", "segtrain", *more, f"hydra.run.dir={run}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        log = (run / "train.log").read_text()
        assert f"the run stopped on an error: NoSpaceLeft: no space left on {run}" in log, log[-2000:]
    else:
        with pytest.raises(NoSpaceLeft, match=rf"no space left on {run}"):
            train(compose_config(more), run)
    assert _sha(last) == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt", "model_card.md"]  # no temp file


_HOLD = """
import sys, time
from segtrain.training import run_lock
run_lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_training_in_a_run_directory_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        overrides = ["debug=fast", f"dataset.root={tmp_path / 'data'}", *TINY]
        with pytest.raises(run_lock.RunDirLocked, match=rf"{run}: another training is writing there \(pid "
                                                        rf"{holder.pid} on .*; wait for it to end"):
            train(compose_config(overrides), run)
        proc = subprocess.run([sys.executable, "-m", "segtrain", *overrides, f"hydra.run.dir={run}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and f"another training is writing there (pid {holder.pid}" in proc.stderr
        assert sorted(p.name for p in run.iterdir()) == [".segtrain.lock"]  # no .hydra/, no train.log, no config
    finally:
        holder.kill()
        holder.wait()
    train(compose_config(overrides), run)  # the holder died: its lock is stale
    assert f"taking over the lock of pid {holder.pid} on " in caplog.text
    assert (run / "checkpoints/last.pt").is_file() and (run / ".segtrain.lock").read_text() == ""


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_sigterm_stops_predict_between_images_and_skip_existing_resumes(trained, tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (192, 192, 3), dtype=np.uint8)).save(images / f"im_{i:03d}.png")
    command = [sys.executable, "-m", "segtrain.predict", f"checkpoint={trained / 'run/checkpoints/last.pt'}",
               f"input={images}", f"output={out}", "save.probabilities=true", "progress=false"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "im_001.png").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED_EXIT_CODE, stderr[-2000:]
    done = len(list(out.glob("im_*[0-9].png")))
    assert 2 <= done < 40 and f"{done} images predicted, 0 skipped" in stdout
    assert "stopped by SIGTERM: run it again with save.skip_existing=true" in stdout
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert all((out / f"im_{i:03d}_prob.npz").is_file() for i in range(done))
    proc = subprocess.run(command + ["save.skip_existing=true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"{40 - done} images predicted, 0 skipped, {done} already done" in proc.stdout


def test_sigterm_stops_an_export_without_leaving_files(trained, tmp_path):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"an older export")
    proc = subprocess.Popen([sys.executable, "-m", "segtrain.export", f"checkpoint={trained / 'run/checkpoints/last.pt'}",
                             "format=torch_export", f"output={out}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the trace takes seconds: the signal arrives inside torch.export
        if "tracing" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED_EXIT_CODE, stderr[-2000:]
    assert "stopped by SIGTERM: nothing written, an older output left as it was" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"] and out.read_bytes() == b"an older export"
