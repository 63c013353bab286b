"""torchvision imports cleanly after segtrain, whether or not its compiled ops can load."""

import subprocess
import sys

import pytest
import torch

from segtrain.compat import torchvision_ops_available


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_segtrain_makes_torchvision_importable_in_a_fresh_interpreter():
    proc = _python("import segtrain, torchvision, torch; "
                   "print(torchvision.models.resnet18(num_classes=3).eval()(torch.zeros(1, 3, 32, 32)).shape)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.Size([1, 3])" in proc.stdout


def test_without_compiled_ops_nms_fails_with_torchvisions_own_message():
    import torchvision

    if torchvision_ops_available():
        pytest.skip("torchvision's compiled ops load here (matching builds): the fix changes nothing")
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
    # The failure the fix prevents: the same import without segtrain first.
    proc = _python("import torchvision")
    assert proc.returncode != 0 and "operator torchvision::nms does not exist" in proc.stderr
