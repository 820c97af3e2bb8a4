"""The digits evaluation classifier: bundled artifacts (accuracy, ONNX parity, real stats) and training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")
ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(1)

import anchorflow  # noqa: E402
from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.trainers.checkpoint import load_checkpoint  # noqa: E402
from anchorflow.trainers.classifier import ONNX_TOL, accuracy, feature_stats, train_classifier  # noqa: E402
from anchorflow.trainers.data import load_dataset  # noqa: E402

BUNDLED = Path(anchorflow.__file__).parent / "bundled" / "digits" / "classifier"


@pytest.fixture(scope="module")
def bundled():
    net, cfg = load_checkpoint(BUNDLED, kind="classifier")
    x, y = (torch.from_numpy(a) for a in load_dataset("digits", "test"))
    return net, cfg, x, y


def test_bundled_classifier_reaches_95_percent_on_held_out_digits(bundled) -> None:
    net, cfg, x, y = bundled
    acc = accuracy(net, x, y)  # recomputed here, not read from the config
    assert acc >= 0.95
    assert cfg["metrics"]["test_accuracy"] == pytest.approx(acc, abs=1e-6)


def test_bundled_onnx_matches_torch_for_any_batch(bundled) -> None:
    net, _, x, _ = bundled
    sess = ort.InferenceSession(str(BUNDLED / "classifier.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "features"]
    for rows in (1, 9, 360):
        logits, feats = sess.run(None, {"x": x[:rows].numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, net(x[:rows]).numpy(), atol=ONNX_TOL, rtol=0)
            np.testing.assert_allclose(feats, net.features(x[:rows]).numpy(), atol=ONNX_TOL, rtol=0)
    assert feats.shape == (360, 64)


def test_bundled_real_stats_are_the_test_digits_feature_moments(bundled) -> None:
    net, _, x, _ = bundled
    stats = np.load(BUNDLED / "real_stats.npz")
    with torch.no_grad():
        f = net.features(x).double().numpy()
    assert int(stats["n"]) == 360
    # Same float32 features, float64 moments: differences are float32 rounding of features.
    np.testing.assert_allclose(stats["mu"], f.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], np.cov(f, rowvar=False), atol=1e-6)
    assert np.allclose(stats["sigma"], stats["sigma"].T)
    assert np.linalg.eigvalsh(stats["sigma"]).min() > -1e-9


def test_feature_stats_match_numpy_on_a_fresh_net() -> None:
    from anchorflow.trainers.classifier import DigitsCNN

    net = DigitsCNN().eval()
    x = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    stats = feature_stats(net, x)
    with torch.no_grad():
        f = net.features(x).double().numpy()
    np.testing.assert_allclose(stats["sigma"], np.cov(f.T), atol=1e-12)


def test_train_classifier_writes_checkpoint_onnx_and_stats(tmp_path) -> None:
    cfg = train_classifier(tmp_path / "clf", epochs=1, command="test", progress=False)
    assert {p.name for p in (tmp_path / "clf").iterdir()} == {
        "config.json", "model.safetensors", "classifier.onnx", "real_stats.npz"}
    # One epoch already beats chance (10 %) by far; the bundled 40-epoch net is checked above.
    assert cfg["metrics"]["test_accuracy"] > 0.5
    assert cfg["training"]["command"] == "test"


def test_classifier_refuses_non_image_data(tmp_path) -> None:
    with pytest.raises(ConfigError, match="image data set"):
        train_classifier(tmp_path / "c", data="gaussians8", progress=False)
