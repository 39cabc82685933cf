import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier

from eval.knn import KNNConfig, knn_top1


def test_weighted_knn_matches_sklearn_with_the_same_weights():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=gen)
    train_labels = torch.randint(0, 5, (600,), generator=gen)
    test_labels = torch.randint(0, 5, (300,), generator=gen)
    train = centres[train_labels] + 1.2 * torch.randn(600, 16, generator=gen)
    test = centres[test_labels] + 1.2 * torch.randn(300, 16, generator=gen)
    cfg = KNNConfig(k=20, temperature=0.07, chunk_size=64)

    ours = knn_top1(train, train_labels, test, test_labels, cfg)
    reference = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                                     weights=lambda dist: np.exp((1 - dist) / 0.07))
    reference.fit(train.numpy(), train_labels.numpy())
    expected = 100 * (reference.predict(test.numpy()) == test_labels.numpy()).mean()
    assert abs(ours - expected) <= 100 / 300 + 1e-9     # at most one tie broken differently
    assert 40 < ours < 100


def test_knn_is_perfect_on_separated_classes_and_chance_on_noise():
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(10).repeat(50)
    separated = torch.nn.functional.one_hot(labels, 10).float() + 0.01 * torch.randn(500, 10, generator=gen)
    assert knn_top1(separated, labels, separated, labels) == 100.0
    noise = torch.randn(500, 32, generator=gen)
    assert knn_top1(noise, labels, torch.randn(500, 32, generator=gen), labels) < 25
