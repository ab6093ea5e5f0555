"""fit(), determinism, early stopping, divergence, augmentation, and saving without pickle."""

import json

import numpy as np
import pytest

import nn


def blobs(n=600, seed=0):
    """Three well-separated Gaussian classes in 20 dimensions."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, 20)) * 3
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.standard_normal((n, 20))).astype(np.float32)
    return x, y


def small_model(seed=0, dropout=0.0):
    layers = [nn.Dense(20, 16), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Dense(16, 3)]
    return nn.Sequential(*layers, seed=seed)


def train(seed=0, dropout=0.2, epochs=3, **kw):
    x, y = blobs()
    model = small_model(seed, dropout)
    history = nn.fit(model, x, y, optimizer=nn.SGD(model.parameters(), lr=0.05, momentum=0.9),
                     epochs=epochs, batch_size=32, seed=seed, **kw)
    return model, history


def test_readme_api_surface():
    rng = np.random.default_rng(0)
    x = rng.random((32, 784), dtype=np.float32)
    labels = rng.integers(0, 10, 32)
    model = nn.Sequential(nn.Dense(784, 256), nn.ReLU(), nn.Dense(256, 10))
    logits = model.forward(x, training=False)
    assert logits.shape == (32, 10) and logits.dtype == np.float32
    loss, dlogits = nn.softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(np.log(10), abs=1.0) and dlogits.shape == (32, 10)
    model.backward(dlogits)
    assert model.layers[0].params["W"].shape == (784, 256) and model.layers[0].params["b"].shape == (256,)
    assert model.layers[0].grads["W"].shape == (784, 256) and np.abs(model.layers[0].grads["W"]).sum() > 0
    opt = nn.SGD(model.parameters(), lr=0.1)
    before = model.layers[0].params["W"].copy()
    opt.step()
    assert not np.array_equal(before, model.layers[0].params["W"])


def test_fit_learns_and_records_history():
    model, history = train(epochs=5, val_fraction=0.2)
    assert len(history.epochs) == 5
    last = history.epochs[-1]
    assert set(last) == {"epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"}
    assert last["val_accuracy"] > 0.95 and last["train_loss"] < history.epochs[0]["train_loss"]


def test_same_seed_bit_identical_other_seed_differs():
    a, ha = train(seed=3)
    b, hb = train(seed=3)
    c, _ = train(seed=4)
    for (_, va, _), (_, vb, _), (_, vc, _) in zip(a.parameters(), b.parameters(), c.parameters()):
        assert va.tobytes() == vb.tobytes()
    assert ha.column("train_loss") == hb.column("train_loss")
    assert any(va.tobytes() != vc.tobytes() for (_, va, _), (_, vc, _) in zip(a.parameters(), c.parameters()))


def test_validation_split_is_seeded_and_disjoint():
    tr, va = nn.split_validation(100, 0.2, seed=1)
    assert len(va) == 20 and len(set(tr) | set(va)) == 100 and not set(tr) & set(va)
    assert np.array_equal(va, nn.split_validation(100, 0.2, seed=1)[1])
    assert not np.array_equal(va, nn.split_validation(100, 0.2, seed=2)[1])


def test_divergence_raises_instead_of_returning_nan_model():
    x, y = blobs()
    x = x * 1e3
    model = small_model()
    with pytest.raises(nn.NonFiniteLossError, match=r"loss became (nan|inf) at epoch 1, batch \d+"):
        with np.errstate(all="ignore"):
            nn.fit(model, x, y, optimizer=nn.SGD(model.parameters(), lr=1e3), epochs=3, batch_size=32)


def test_early_stopping_restores_best_weights():
    x, y = blobs(400)
    noise = np.random.default_rng(1).integers(0, 3, 400)  # labels the model cannot learn
    model = small_model()
    xv, yv = blobs(200, seed=5)
    seen = []

    def remember(record):
        seen.append([v.copy() for _, v, _ in model.parameters()])

    history = nn.fit(model, x, noise, optimizer=nn.SGD(model.parameters(), lr=0.1, momentum=0.9),
                     epochs=40, batch_size=32, validation=(xv, yv), patience=3, on_epoch=remember)
    assert history.stopped_early and len(history.epochs) < 40
    assert len(history.epochs) == history.best_epoch + 3
    for (_, value, _), best in zip(model.parameters(), seen[history.best_epoch - 1]):
        np.testing.assert_array_equal(value, best)


def test_preprocessing_is_applied_in_fit_and_predict():
    x, y = blobs()
    model = small_model(dropout=0)
    model.preprocessing = {"mean": float(x.mean()), "std": float(x.std())}
    nn.fit(model, x, y, optimizer=nn.Adam(model.parameters(), lr=1e-2), epochs=5, batch_size=32)
    proba = model.predict_proba(x)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    assert (model.predict(x) == y).mean() > 0.95
    loss, acc = nn.evaluate(model, x, y)
    assert acc == pytest.approx((model.predict(x) == y).mean())


def test_random_shift_moves_ink_and_keeps_it():
    img = np.zeros((1, 28, 28), np.float32)
    img[0, 10:14, 10:14] = 1
    batch = np.repeat(img.reshape(1, 784), 500, axis=0)
    nn.random_shift(batch, np.random.default_rng(0), max_shift=2)
    imgs = batch.reshape(-1, 28, 28)
    assert np.all(imgs.sum(axis=(1, 2)) == 16)  # the ink stays whole (it is far from the border)
    rows = {int(np.argmax(i.sum(axis=1) > 0)) for i in imgs}
    cols = {int(np.argmax(i.sum(axis=0) > 0)) for i in imgs}
    assert rows == set(range(8, 13)) and cols == set(range(8, 13))


# ---- saving without pickle ------------------------------------------------------------

def trained_mnist_like():
    model = nn.Sequential(nn.Dense(784, 32), nn.ReLU(), nn.Dropout(0.1), nn.Dense(32, 16), nn.Tanh(),
                          nn.Dense(16, 10), seed=0)
    model.preprocessing = {"mean": 0.1307, "std": 0.3081}
    return model


def test_save_load_round_trip(tmp_path):
    model = trained_mnist_like()
    spec = nn.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.npz"]
    assert json.loads((tmp_path / "model.json").read_text()) == spec
    assert spec["layers"] == [{"units": 32, "activation": "relu"}, {"units": 16, "activation": "tanh"},
                              {"units": 10, "activation": "softmax"}]
    assert spec["preprocessing"] == {"mean": 0.1307, "std": 0.3081}
    with np.load(tmp_path / "model.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["W0", "W1", "W2", "b0", "b1", "b2"]
    loaded = nn.load(tmp_path)
    x = np.random.default_rng(0).random((50, 784), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


def test_inference_with_numpy_alone(tmp_path):
    """The README's dozen lines: model.json + model.npz and NumPy, nothing else."""
    model = trained_mnist_like()
    nn.save(model, tmp_path)
    x = np.random.default_rng(0).random((20, 784), dtype=np.float32)

    spec = json.loads((tmp_path / "model.json").read_text())
    weights = np.load(tmp_path / "model.npz", allow_pickle=False)
    a = (x - spec["preprocessing"]["mean"]) / spec["preprocessing"]["std"]
    for i, layer in enumerate(spec["layers"]):
        a = a @ weights[f"W{i}"] + weights[f"b{i}"]
        act = layer["activation"]
        a = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
             "linear": lambda z: z, "softmax": lambda z: np.exp(z - z.max(1, keepdims=True))
             / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)}[act](a)
    np.testing.assert_allclose(a, model.predict_proba(x), rtol=1e-5, atol=1e-6)


def test_pickle_inside_is_refused(tmp_path):
    nn.save(trained_mnist_like(), tmp_path)
    with np.load(tmp_path / "model.npz") as npz:
        arrays = dict(npz)
    arrays["W1"] = np.array([{"evil": 1}], dtype=object)
    np.savez(tmp_path / "model.npz", **arrays)
    with pytest.raises(nn.ModelFormatError, match=r"model.npz: array W1 needs pickle to load; refused"):
        nn.load(tmp_path)


def test_missing_and_mismatched_arrays(tmp_path):
    nn.save(trained_mnist_like(), tmp_path)
    with np.load(tmp_path / "model.npz") as npz:
        arrays = dict(npz)
    np.savez(tmp_path / "model.npz", **{k: v for k, v in arrays.items() if k != "b2"})
    with pytest.raises(nn.ModelFormatError, match=r"arrays \['b2'\] missing"):
        nn.load(tmp_path)
    np.savez(tmp_path / "model.npz", **{**arrays, "W1": np.zeros((32, 17), np.float32)})
    with pytest.raises(nn.ModelFormatError, match=r"W1 has shape \(32, 17\), model.json needs \(32, 16\)"):
        nn.load(tmp_path)
    (tmp_path / "model.npz").unlink()
    with pytest.raises(nn.ModelFormatError, match="model.npz: missing"):
        nn.load(tmp_path)


def test_bad_model_json(tmp_path):
    nn.save(trained_mnist_like(), tmp_path)
    spec = json.loads((tmp_path / "model.json").read_text())
    spec["layers"][0]["activation"] = "swish"
    (tmp_path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(nn.ModelFormatError, match="layer 0 has unknown activation 'swish'"):
        nn.load(tmp_path)


@pytest.mark.parametrize("optimizer, dropout", [("momentum", 0.0), ("adam", 0.3), ("rmsprop", 0.2)])
def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path, optimizer, dropout):
    """Weights, optimizer state, schedule position, every random stream (shuffles, dropout,
    augmentation) and the early-stopping memory are in the checkpoint."""
    rng = np.random.default_rng(0)
    x = rng.random((600, 784), dtype=np.float32)
    y = rng.integers(0, 10, 600)
    hp = nn.presets.get("fast", epochs=5, optimizer=optimizer, dropout=dropout, shift=1, val_fraction=0.1,
                        lr=0.01, patience=10)
    straight, history = nn.presets.train(hp, x, y)

    def save_after_two(state):
        if state.epoch == 2:
            nn.save_checkpoint(tmp_path / "ck.npz", state)

    nn.presets.train(hp, x, y, checkpoint=save_after_two)
    state = nn.load_checkpoint(tmp_path / "ck.npz")
    assert state.epoch == 2 and len(state.history) == 2
    resumed, resumed_history = nn.presets.train(hp, x, y, resume=state)
    assert nn.digest(resumed) == nn.digest(straight)
    assert [e["val_loss"] for e in resumed_history.epochs] == [e["val_loss"] for e in history.epochs]
    (tmp_path / "bad.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(nn.ModelFormatError, match="unreadable checkpoint"):
        nn.load_checkpoint(tmp_path / "bad.npz")


def test_random_distort_shapes_determinism_and_identity():
    rng = np.random.default_rng(0)
    x = (rng.random((64, 16 * 12)) < 0.2).astype(np.float32)
    a, b, c = x.copy(), x.copy(), x.copy()
    nn.random_distort(a, np.random.default_rng(5), elastic=34, rotate=10, scale=0.1, shape=(16, 12))
    nn.random_distort(b, np.random.default_rng(5), elastic=34, rotate=10, scale=0.1, shape=(16, 12))
    nn.random_distort(c, np.random.default_rng(6), elastic=34, rotate=10, scale=0.1, shape=(16, 12))
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)   # seeded: same seed, same distortion
    assert 0.0 <= a.min() and a.max() <= 1.0 and np.abs(a - x).mean() > 0.05
    same = x.copy()
    nn.random_distort(same, np.random.default_rng(5), shape=(16, 12))  # no distortion asked: unchanged
    assert np.array_equal(same, x)


def test_distorted_digits_are_still_recognised(first_run, mnist_dir):
    """Elastic + affine distortions change the pixels but keep the digit: a model trained
    without them still recognises most distorted test digits."""
    import gzip

    home, _ = first_run
    with gzip.open(mnist_dir / "t10k-images-idx3-ubyte.gz") as f:
        f.read(16)
        x = np.frombuffer(f.read(1000 * 784), np.uint8).reshape(1000, 784).astype(np.float32) / 255
    with gzip.open(mnist_dir / "t10k-labels-idx1-ubyte.gz") as f:
        f.read(8)
        y = np.frombuffer(f.read(1000), np.uint8)
    model = nn.load(home / "models/mnist-mlp/v1")
    distorted = x.copy()
    nn.random_distort(distorted, np.random.default_rng(1), elastic=34, rotate=10, scale=0.1)
    assert np.abs(distorted - x).mean() > 0.05
    assert (model.predict(x) == y).mean() > 0.95
    assert (model.predict(distorted) == y).mean() > 0.6  # measured 0.72 for this seed


def test_on_batch_reports_progress_without_changing_the_result():
    rng = np.random.default_rng(0)
    x, y = rng.random((1000, 16), np.float32), rng.integers(0, 3, 1000)
    hp = nn.presets.get("fast", hidden=(8,), epochs=2, batch_size=16, val_fraction=0.0)
    seen = []
    a, _ = nn.presets.train(hp, x, y, n_classes=3, image_shape=(4, 4), on_batch=lambda *r: seen.append(r))
    b, _ = nn.presets.train(hp, x, y, n_classes=3, image_shape=(4, 4))
    assert nn.digest(a) == nn.digest(b)
    batches = -(-1000 // 16)  # 63 per epoch: reported at batches 16, 32, 48 of each epoch
    assert [(e, k, n) for e, k, n, _, _ in seen] == [(e, k, batches) for e in (1, 2) for k in (16, 32, 48)]
    assert all(0 < loss < 5 and 0 <= acc <= 1 for *_, loss, acc in seen)
