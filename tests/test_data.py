"""Tests of gradiv_lib.data: in-memory batching, synthetic problems, readers of the real file
formats (fake files written into tmp_path; nothing is downloaded), partitions, task streams."""

from __future__ import annotations

import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradiv_lib import data as D
from gradiv_lib.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    InMemoryData,
    augment_batch,
    class_incremental_tasks,
    label_permutation_tasks,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_tiny_imagenet,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    permuted_tasks,
    random_label_tasks,
    synthetic_classification,
    synthetic_regression,
)


def _toy(n: int = 10, classes: int = 3) -> InMemoryData:
    return InMemoryData(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n) % classes)


def _assert_exact_partition(parts: list[torch.Tensor], n: int) -> None:
    assert all(p.dtype == torch.long and p.dim() == 1 for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))


# ------------------------------------------------------------------ InMemoryData


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_visit_every_sample_once_with_ragged_last_batch(shuffle: bool) -> None:
    data = _toy(10)
    batches = list(data.batches(4, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    assert [len(xb) for xb, _ in batches] == [4, 4, 2]
    seen = torch.cat([xb[:, 0] for xb, _ in batches]).long()
    assert torch.equal(seen.sort().values, torch.arange(10))
    for xb, yb in batches:  # pairs stay aligned
        assert torch.equal(xb[:, 0].long() % 3, yb)
    assert data.num_batches(4) == 3 and data.num_batches(4, drop_last=True) == 2


def test_batches_drop_last_and_batch_size_changes_between_epochs() -> None:
    data = _toy(10)
    assert [len(x) for x, _ in data.batches(4, drop_last=True)] == [4, 4]
    assert [len(x) for x, _ in data.batches(3)] == [3, 3, 3, 1]
    assert [len(x) for x, _ in data.batches(10)] == [10]


def test_batches_shuffle_is_reproducible_and_random() -> None:
    data = _toy(50)

    def order(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([x[:, 0] for x, _ in data.batches(7, generator=gen)])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    assert not torch.equal(order(1), torch.arange(50.0))


@pytest.mark.parametrize("bad", [0, -1, 11])
def test_batch_size_outside_range_is_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, N\] = \[1, 10\]"):
        next(_toy(10).batches(bad))


def test_inmemory_data_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="same number of samples"):
        InMemoryData(torch.zeros(3, 2), torch.zeros(4))


def test_split_sizes_disjoint_deterministic_and_stratified() -> None:
    data = _toy(100, classes=4)
    train, test = data.split(0.25, seed=3)
    assert (len(train), len(test)) == (75, 25)
    ids = torch.cat([train.x[:, 0], test.x[:, 0]]).long()
    assert torch.equal(ids.sort().values, torch.arange(100))
    again, _ = data.split(0.25, seed=3)
    assert torch.equal(train.x, again.x)
    strat_train, strat_test = data.split(0.2, seed=0, stratify=True)
    assert torch.bincount(strat_test.y).tolist() == [5, 5, 5, 5]
    assert len(strat_train) + len(strat_test) == 100
    with pytest.raises(ValueError, match="test_fraction"):
        data.split(1.0)


def test_subset_and_to_keep_info() -> None:
    data = InMemoryData(torch.randn(5, 2, dtype=torch.float64), torch.arange(5), {"k": 1})
    converted = data.to("cpu", torch.float32)
    assert converted.x.dtype == torch.float32 and converted.y.dtype == torch.long
    assert converted.subset([0, 2]).info == {"k": 1}
    assert data.num_classes == 5


# ------------------------------------------------------------------ synthetic problems


def _diversity_linear_regression(data: InMemoryData, w: torch.Tensor) -> float:
    """Yin's Δ for the squared loss ½(wᵀx − y)², per-sample gradient (wᵀx_i − y_i) x_i."""
    grads = (data.x @ w - data.y[:, 0])[:, None] * data.x
    return float((grads.pow(2).sum()) / grads.sum(0).pow(2).sum())


def test_regression_duplication_repeats_samples_and_divides_diversity() -> None:
    base = synthetic_regression(200, 5, noise=0.5, seed=1, dtype=torch.float64)
    dup = synthetic_regression(800, 5, noise=0.5, seed=1, duplicates=4, dtype=torch.float64)
    distinct = synthetic_regression(200, 5, noise=0.5, seed=1, dtype=torch.float64)
    assert torch.equal(base.x, distinct.x)
    assert torch.equal(dup.x, base.x.repeat(4, 1)) and torch.equal(dup.y, base.y.repeat(4, 1))
    w = torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratio = _diversity_linear_regression(base, w) / _diversity_linear_regression(dup, w)
    assert ratio == pytest.approx(4.0, rel=1e-10)
    with pytest.raises(ValueError, match="multiple of duplicates"):
        synthetic_regression(10, 2, duplicates=3)


def test_regression_noiseless_targets_and_conditioning() -> None:
    data = synthetic_regression(
        4000, 6, noise=0.0, seed=0, condition_number=100.0, dtype=torch.float64
    )
    assert data.y.shape == (4000, 1)
    assert torch.allclose(data.y, data.x @ data.info["w_star"].T)
    variances = data.x.var(0)
    assert variances[0] / variances[-1] == pytest.approx(100.0, rel=0.15)
    with pytest.raises(ValueError, match="noise"):
        synthetic_regression(10, 2, noise=-1.0)


def test_classification_blobs_and_teacher() -> None:
    blobs = synthetic_classification(300, 10, 3, seed=0, separation=8.0)
    assert torch.bincount(blobs.y).tolist() == [100, 100, 100]
    means = blobs.info["means"]
    nearest = torch.cdist(blobs.x, means).argmin(1)
    assert (nearest == blobs.y).float().mean() > 0.95
    teacher = synthetic_classification(500, 4, 5, seed=2, kind="teacher")
    u, v = teacher.info["teacher"]["U"], teacher.info["teacher"]["V"]
    assert torch.equal((torch.tanh(teacher.x @ u.T) @ v.T).argmax(1), teacher.y)
    noisy = synthetic_classification(2000, 4, 2, seed=0, label_noise=0.5)
    clean = synthetic_classification(2000, 4, 2, seed=0)
    assert 0.15 < (noisy.y != clean.y).float().mean() < 0.35  # half relabelled, half of those kept
    with pytest.raises(ValueError, match="kind must be one of 'blobs', 'teacher'"):
        synthetic_classification(10, 2, 2, kind="moons")


# ------------------------------------------------------------------ digits


def test_digits_split_is_deterministic_scaled_and_sized() -> None:
    train, test = load_digits(seed=0)
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape == (1437, 64) and train.x.dtype == torch.float32
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert train.y.dtype == torch.long and set(train.y.unique().tolist()) == set(range(10))
    train_again, _ = load_digits(seed=0)
    assert torch.equal(train.x, train_again.x) and torch.equal(train.y, train_again.y)
    other, _ = load_digits(seed=1)
    assert not torch.equal(train.y, other.y)
    images, _ = load_digits(seed=0, flat=False, test_fraction=0.5)
    assert images.x.shape == (898, 1, 8, 8)
    assert torch.equal(
        images.x.reshape(898, -1)[:5], load_digits(seed=0, test_fraction=0.5)[0].x[:5]
    )


# ------------------------------------------------------------------ CIFAR readers (fake files)


def _cifar_rows(n: int, offset: int) -> np.ndarray:
    """Rows in the CIFAR layout: 1024 red, 1024 green, 1024 blue values per image."""
    rows = np.empty((n, 3072), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            rows[i, c * 1024 : (c + 1) * 1024] = offset + 10 * i + c
    return rows


def _write_pickle(path, obj, py2_numpy_names: bool = False) -> None:
    payload = pickle.dumps(obj, protocol=2)
    if py2_numpy_names:  # what the real (Python 2) CIFAR files reference
        payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(payload)


def _fake_cifar10(root, per_batch: int = 3) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        batch = {
            b"batch_label": b"training batch %d of 5" % b,
            b"data": _cifar_rows(per_batch, offset=b),
            b"labels": [(b + i) % 10 for i in range(per_batch)],
            b"filenames": [b"f.png"] * per_batch,
        }
        _write_pickle(folder / f"data_batch_{b}", batch, py2_numpy_names=True)
    _write_pickle(folder / "test_batch", {b"data": _cifar_rows(2, offset=100), b"labels": [7, 9]})
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})


def test_cifar10_reads_pickled_batches_with_layout_labels_and_normalisation(tmp_path) -> None:
    _fake_cifar10(tmp_path)
    train = load_cifar10(tmp_path)
    assert train.x.shape == (15, 3, 32, 32) and train.x.dtype == torch.float32
    assert train.y.tolist() == [(b + i) % 10 for b in range(1, 6) for i in range(3)]
    assert train.info["classes"][0] == "airplane" and len(train.info["classes"]) == 10
    raw = load_cifar10(tmp_path, normalize=False)
    # image i of batch 1 has value 1 + 10 i + c in channel c everywhere
    assert torch.allclose(raw.x[1, :, 5, 7], torch.tensor([11.0, 12.0, 13.0]) / 255)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(train.x, (raw.x - mean) / std, atol=1e-6)
    test = load_cifar10(tmp_path, train=False)
    assert test.x.shape == (2, 3, 32, 32) and test.y.tolist() == [7, 9]


def test_cifar100_fine_and_coarse_labels(tmp_path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 4), ("test", 2)):
        _write_pickle(
            folder / split,
            {
                b"data": _cifar_rows(n, offset=0),
                b"fine_labels": list(range(90, 90 + n)),
                b"coarse_labels": list(range(n)),
            },
            py2_numpy_names=True,
        )
    _write_pickle(
        folder / "meta",
        {
            b"fine_label_names": [b"f%d" % i for i in range(100)],
            b"coarse_label_names": [b"c%d" % i for i in range(20)],
        },
    )
    fine = load_cifar100(tmp_path)
    assert fine.x.shape == (4, 3, 32, 32) and fine.y.tolist() == [90, 91, 92, 93]
    assert len(fine.info["classes"]) == 100
    coarse = load_cifar100(tmp_path, train=False, labels="coarse")
    assert coarse.y.tolist() == [0, 1] and coarse.info["classes"][1] == "c1"
    expected = (torch.tensor([0.0, 1.0, 2.0]) / 255 - torch.tensor(CIFAR100_MEAN)) / torch.tensor(
        CIFAR100_STD
    )
    assert torch.allclose(coarse.x[0, :, 0, 0], expected, atol=1e-6)


def test_missing_cifar_files_name_the_path_and_the_fix(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert "download=True" in message and "cifar-10-python.tar.gz" in message
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar100(tmp_path, train=False)
    with pytest.raises(FileNotFoundError, match=r"wnids\.txt"):
        load_tiny_imagenet(tmp_path)


def test_download_without_network_gives_a_clear_error(tmp_path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match="could not download CIFAR-10 from https://"):
        load_cifar10(tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []  # no partial archive left behind


def test_pickles_that_would_run_code_are_refused(tmp_path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    _write_pickle(folder / "test", {b"data": Exploit(), b"fine_labels": [0]})
    with pytest.raises(
        pickle.UnpicklingError, match=r"refusing to load (__builtin__|builtins)\.print"
    ):
        load_cifar100(tmp_path, train=False)


# ------------------------------------------------------------------ Tiny-ImageNet (fake JPEGs)


def _fake_tiny_imagenet(root) -> list[str]:
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    wnids = ["n03000000", "n01000000", "n02000000"]  # deliberately unsorted
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    colours = {"n01000000": (200, 30, 30), "n02000000": (30, 200, 30), "n03000000": (30, 30, 200)}
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), colours[wnid]).save(images / f"{wnid}_{i}.JPEG", quality=95)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    Image.new("L", (64, 64), 128).save(folder / "val" / "images" / "val_0.JPEG", quality=95)
    Image.new("RGB", (64, 64), colours["n01000000"]).save(
        folder / "val" / "images" / "val_1.JPEG", quality=95
    )
    (folder / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02000000\t0\t0\t63\t63\nval_1.JPEG\tn01000000\t1\t2\t60\t61\n"
    )
    return sorted(wnids)


def test_tiny_imagenet_reads_folder_layout_labels_and_caches(tmp_path, monkeypatch) -> None:
    sorted_wnids = _fake_tiny_imagenet(tmp_path)
    train = load_tiny_imagenet(tmp_path, "train", normalize=False)
    assert train.x.shape == (6, 3, 64, 64)
    assert train.y.tolist() == [0, 0, 1, 1, 2, 2] and train.info["classes"] == sorted_wnids
    assert torch.allclose(train.x[0, :, 10, 10], torch.tensor([200, 30, 30]) / 255, atol=3 / 255)
    val = load_tiny_imagenet(tmp_path, "val", cache=False)
    assert val.y.tolist() == [1, 0]
    gray = (torch.full((3,), 128 / 255) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(val.x[0, :, 32, 32], gray, atol=0.03)  # grayscale → RGB, normalised
    assert (tmp_path / "tiny-imagenet-200" / "gradiv_cache_train.pt").exists()

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(D.image_files, "_decode_tiny_imagenet", no_decoding)
    cached = load_tiny_imagenet(tmp_path, "train", normalize=False)
    assert torch.equal(cached.x, train.x) and torch.equal(cached.y, train.y)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        load_tiny_imagenet(tmp_path, "test")


# ------------------------------------------------------------------ augmentation


def _crop(image: torch.Tensor, dy: int, dx: int, size: int, flip: bool) -> torch.Tensor:
    crop = image[:, dy : dy + size, dx : dx + size]
    return crop.flip(-1) if flip else crop


def test_augment_batch_is_a_padded_crop_possibly_mirrored() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=gen)
    out = augment_batch(x, torch.Generator().manual_seed(1), padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flipped_any = False
    for i in range(len(x)):
        candidates = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal(out[i], _crop(padded[i], dy, dx, 8, flip))
        ]
        assert candidates, f"image {i} is not a crop of its padded (mirrored) input"
        flipped_any |= any(flip for _, _, flip in candidates)
    assert flipped_any
    assert torch.equal(augment_batch(x, padding=0, flip=False), x)
    again = augment_batch(x, torch.Generator().manual_seed(1), padding=2)
    assert torch.equal(out, again)


def test_augment_batch_fills_the_border_per_channel() -> None:
    x = torch.zeros(32, 3, 4, 4)
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=4, fill=(1.0, 2.0, 3.0))
    for c, value in enumerate((1.0, 2.0, 3.0)):
        assert set(out[:, c].unique().tolist()) <= {0.0, value}
    assert (out != 0).any()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        augment_batch(torch.zeros(3, 4, 4))


# ------------------------------------------------------------------ partitions


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    clients=st.integers(1, 20),
    classes=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_partitions_are_exact(n: int, clients: int, classes: int, seed: int) -> None:
    clients = min(clients, n)
    labels = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))
    _assert_exact_partition(partition_iid(n, clients, seed), n)
    if n >= clients:
        _assert_exact_partition(partition_dirichlet(labels, clients, 0.5, seed, min_size=0), n)
    shards = max(1, min(3, n // clients))
    _assert_exact_partition(partition_shards(labels, clients, shards, seed), n)


def test_iid_sizes_differ_by_at_most_one_and_are_reproducible() -> None:
    parts = partition_iid(103, 10, seed=4)
    assert {len(p) for p in parts} == {10, 11}
    assert all(torch.equal(a, b) for a, b in zip(parts, partition_iid(103, 10, seed=4)))


def _label_skew(labels: torch.Tensor, parts: list[torch.Tensor]) -> float:
    """Mean total-variation distance between a client's label distribution and the global one."""
    classes = int(labels.max()) + 1
    overall = torch.bincount(labels, minlength=classes).float() / len(labels)
    tv = [
        0.5 * (torch.bincount(labels[p], minlength=classes).float() / len(p) - overall).abs().sum()
        for p in parts
    ]
    return float(torch.stack(tv).mean())


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    labels = torch.arange(2000) % 10
    skew = {
        alpha: np.mean(
            [_label_skew(labels, partition_dirichlet(labels, 20, alpha, seed=s)) for s in range(3)]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5 and skew[100.0] < 0.15
    parts = partition_dirichlet(labels, 20, 0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    assert all(
        torch.equal(a, b) for a, b in zip(parts, partition_dirichlet(labels, 20, 0.1, seed=0))
    )


def test_shards_give_each_client_at_most_shards_per_client_labels() -> None:
    labels = torch.arange(300) % 10  # 30 per class; 30 shards of 10 never straddle a class
    parts = partition_shards(labels, 15, 2, seed=0)
    _assert_exact_partition(parts, 300)
    assert all(len(labels[p].unique()) <= 2 for p in parts)
    assert all(len(p) == 20 for p in parts)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0.*got"):
        partition_dirichlet(torch.arange(20) % 2, 2, alpha)


def test_partition_validation_messages() -> None:
    labels = torch.arange(10) % 2
    with pytest.raises(ValueError, match=r"n_clients=11 .* n_clients <= 10"):
        partition_iid(10, 11)
    with pytest.raises(ValueError, match="n_clients=11"):
        partition_dirichlet(labels, 11, 1.0)
    with pytest.raises(ValueError, match=r"4 \* 3 = 12 shards"):
        partition_shards(labels, 4, 3)
    with pytest.raises(ValueError, match=r"min_size=6 .* min_size <= 5"):
        partition_dirichlet(labels, 2, 1.0, min_size=6)
    with pytest.raises(ValueError, match="labels must be a 1-D tensor of integer"):
        partition_shards(torch.rand(10), 2, 1)
    with pytest.raises(RuntimeError, match="max_tries=2"):
        partition_dirichlet(torch.arange(100) % 10, 10, 0.001, min_size=10, max_tries=2)


# ------------------------------------------------------------------ task streams


def test_permuted_tasks_are_distinct_permutations_applied_to_train_and_test() -> None:
    train, test = _toy_images(40), _toy_images(10)
    tasks = permuted_tasks(train, 4, seed=0, test=test)
    perms = [t.info["permutation"] for t in tasks]
    assert len({tuple(p.tolist()) for p in perms}) == 4
    assert all(torch.equal(p.sort().values, torch.arange(12)) for p in perms)
    for task, perm in zip(tasks, perms):
        assert torch.equal(task.train.x.reshape(40, -1), train.x.reshape(40, -1)[:, perm])
        assert torch.equal(task.test.x.reshape(10, -1), test.x.reshape(10, -1)[:, perm])
        assert torch.equal(task.train.y, train.y) and task.train.x.shape == train.x.shape
    assert not torch.equal(perms[0], torch.arange(12))
    first = permuted_tasks(train, 2, seed=0, identity_first=True)[0]
    assert torch.equal(first.train.x, train.x)


def _toy_images(n: int) -> InMemoryData:
    gen = torch.Generator().manual_seed(n)
    return InMemoryData(torch.randn(n, 3, 2, 2, generator=gen), torch.arange(n) % 4)


def test_random_label_tasks_differ_from_true_labels_and_each_other() -> None:
    x, y = torch.randn(1000, 5), torch.arange(1000) % 10
    tasks = random_label_tasks((x, y), 3, seed=0)  # a user's own tensors
    for task in tasks:
        assert torch.equal(task.train.x, x) and task.test is None
        assert 0.05 < (task.train.y == y).float().mean() < 0.15  # chance level 1/10
        assert set(task.train.y.unique().tolist()) == set(range(10))
    assert not torch.equal(tasks[0].train.y, tasks[1].train.y)


def test_label_permutation_tasks_rename_classes_consistently() -> None:
    train, test = _toy_images(40), _toy_images(12)
    tasks = label_permutation_tasks(train, 3, seed=1, test=test)
    for task in tasks:
        label_map = task.info["label_map"]
        assert torch.equal(label_map.sort().values, torch.arange(4))
        assert torch.equal(task.train.y, label_map[train.y])
        assert torch.equal(task.test.y, label_map[test.y])
    assert len({tuple(t.info["label_map"].tolist()) for t in tasks}) > 1


def test_class_incremental_tasks_hold_disjoint_class_groups() -> None:
    train, test = _toy_images(40), _toy_images(12)
    tasks = class_incremental_tasks(train, 2, test=test)
    assert [t.info["classes"] for t in tasks] == [[0, 1], [2, 3]]
    for task in tasks:
        assert set(task.train.y.unique().tolist()) == set(task.info["classes"])
        assert set(task.test.y.unique().tolist()) == set(task.info["classes"])
    assert sum(len(t.train) for t in tasks) == 40
    shuffled = class_incremental_tasks(train, 1, seed=5)
    assert sorted(c for t in shuffled for c in t.info["classes"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="classes_per_task=3 does not divide the 4 classes"):
        class_incremental_tasks(train, 3)


# ---------------------------------------------------------------------------------------------
# MNIST-1D: generated offline
# ---------------------------------------------------------------------------------------------


def test_mnist1d_is_generated_offline_deterministic_and_leaves_global_rngs_alone(monkeypatch) -> None:
    import random
    import socket

    import numpy as np
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("load_mnist1d touched the network")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    D.mnist1d._generate.cache_clear()
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    train, test = D.load_mnist1d(200, seed=3)
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert train.x.shape == (160, 1, 40) and test.x.shape == (40, 1, 40)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.long
    assert torch.bincount(torch.cat([train.y, test.y]), minlength=10).tolist() == [20] * 10
    # Standardised over the whole set, as the package does.
    everything = torch.cat([train.x, test.x]).double()
    assert abs(everything.mean().item()) < 1e-6 and abs(everything.std(unbiased=False).item() - 1) < 1e-6
    D.mnist1d._generate.cache_clear()
    again, _ = D.load_mnist1d(200, seed=3, channels=False)
    assert again.x.shape == (160, 40) and torch.equal(again.x, train.x.squeeze(1))
    other, _ = D.load_mnist1d(200, seed=4)
    assert not torch.equal(other.x, train.x)


def test_mnist1d_shuffled_variant_is_one_fixed_permutation_of_positions() -> None:
    plain, _ = D.load_mnist1d(100, seed=0, channels=False)
    shuffled, _ = D.load_mnist1d(100, seed=0, channels=False, shuffle_seq=True)
    # The same signals with the 40 positions permuted by one permutation: sorting each row agrees.
    assert not torch.equal(plain.x, shuffled.x)
    torch.testing.assert_close(plain.x.sort(dim=1).values, shuffled.x.sort(dim=1).values)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_samples": 105}, "multiple of 10"), ({"num_samples": 10}, "num_samples"), ({"train_split": 1.0}, "train_split")],
)
def test_mnist1d_rejects_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        D.load_mnist1d(**kwargs)
