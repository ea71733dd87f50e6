"""Downstream accuracy: the classifiers reach the papers' level on real data, and the test split is read last."""

import pytest
import torch

from privdiff.data import load_dataset
from privdiff.evaluation import downstream
from privdiff.evaluation.classifiers import LogisticRegression, SmallCNN, fit_classifier, holdout_split


@pytest.fixture(scope="module")
def mnist16():
    train = load_dataset("mnist5k", split="train", resolution=16)
    test = load_dataset("mnist5k", split="test", resolution=16)
    return (train.images + 1) / 2, train.labels, (test.images + 1) / 2, test.labels


def test_trained_on_real_data_the_cnn_beats_90_percent_and_reads_the_test_split_last(mnist16, monkeypatch):
    x, y, x_test, y_test = mnist16
    events = []
    real_fit = downstream.fit_classifier

    def fit_and_log(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        events.append(("fit", kwargs.get("desc")))
        return result

    def test_split():
        events.append(("test", None))
        return x_test, y_test

    monkeypatch.setattr(downstream, "fit_classifier", fit_and_log)
    scores = downstream.downstream_accuracy(
        x, y, test=test_split, num_classes=10, epochs=5, lr=3e-3, progress=False, source="real"
    )
    # every classifier was trained and selected before the test split was opened, and it was opened once
    assert [e[0] for e in events] == ["fit", "fit", "test"]
    assert scores["cnn"]["accuracy"] > 0.90
    assert scores["logreg"]["accuracy"] > 0.80
    assert 1 <= scores["cnn"]["selected_epoch"] <= 5
    assert "held-out real" in scores["cnn"]["selection"]


def test_selection_uses_only_held_out_training_data():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(60, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    fit = fit_classifier("logreg", x, y, num_classes=3, holdout=0.25, epochs=5, progress=False, seed=4)
    fit_idx, held_idx = holdout_split(60, fraction=0.25, seed=4)
    assert len(held_idx) == 15 and not set(fit_idx.tolist()) & set(held_idx.tolist())
    # the reported held-out accuracy is the selected model's accuracy on exactly those examples
    with torch.no_grad():
        acc = (fit.model(x[held_idx]).argmax(1) == y[held_idx]).double().mean().item()
    assert fit.val_accuracy == pytest.approx(acc)
    assert fit.val_accuracy == max(fit.history) and fit.history[fit.selected_epoch - 1] == fit.val_accuracy


def test_classifier_shapes_and_bad_input():
    x = torch.rand(4, 3, 16, 16)
    assert SmallCNN(in_channels=3, num_classes=7, resolution=16)(x).shape == (4, 7)
    assert SmallCNN(in_channels=3, num_classes=7, resolution=16).embed(x).shape == (4, 128)
    assert LogisticRegression(in_channels=3, num_classes=7, resolution=16)(x).shape == (4, 7)
    with pytest.raises(ValueError, match="at least 8x8"):
        SmallCNN(in_channels=1, num_classes=2, resolution=4)
    with pytest.raises(ValueError, match="unknown classifier"):
        fit_classifier("svm", x, torch.zeros(4, dtype=torch.long), num_classes=2)


def test_class_consistency_is_the_classifier_argmax_against_the_intended_labels():
    class_consistency = downstream.class_consistency
    torch.manual_seed(3)
    cnn = SmallCNN(in_channels=1, num_classes=10, resolution=8).eval()
    images, labels = torch.rand(50, 1, 8, 8), torch.randint(0, 10, (50,))
    with torch.no_grad():
        predicted = cnn(images).argmax(1)
    assert class_consistency(cnn, images, labels) == int((predicted == labels).sum()) / 50
    labels[:25] = predicted[:25]  # half of them as the classifier sees them
    assert class_consistency(cnn, images, labels) == int((predicted == labels).sum()) / 50 >= 0.5
    assert class_consistency(cnn, images, predicted) == 1.0
    assert class_consistency(cnn, images, torch.zeros(0, dtype=torch.long)) is None  # unlabelled (unconditional)
    with pytest.raises(ValueError, match="50 images but 3 labels"):
        class_consistency(cnn, images, labels[:3])
