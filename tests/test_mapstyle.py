"""train() and evaluate() on ordinary map-style torch Datasets."""
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import gradiv_lib as gl
from gradiv_lib.data import InMemoryData
from gradiv_lib.mapstyle import MapStyleData


class Pairs(Dataset):
    """A user's own Dataset: items (tensor, python int), as torchvision's are."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def _run(data, schedule):
    net = gl.models.mlp(5, 8, 1, 2, seed=0)
    return gl.train(net, data, schedule=schedule, epochs=4, lr=0.1, seed=3, progress=False,
                    measure_diversity=True, test_data=data), net


@pytest.mark.parametrize("wrap", [lambda x, y: TensorDataset(x, y), Pairs, lambda x, y: MapStyleData(Pairs(x, y))])
def test_dataset_run_equals_in_memory_run(wrap):
    x, y = _problem()
    ref, ref_net = _run(InMemoryData(x, y), gl.AdaBatch(8, 64, factor=2, resize_every=2))
    got, got_net = _run(wrap(x, y), gl.AdaBatch(8, 64, factor=2, resize_every=2))
    assert got.batch_size == ref.batch_size == [8, 8, 16, 16]       # the schedule's sizes reach the loader
    assert got.steps == ref.steps
    assert got.train_loss == pytest.approx(ref.train_loss, rel=1e-6)
    assert got.diversity == pytest.approx(ref.diversity, rel=1e-5)
    for a, b in zip(got_net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b)


def test_batches_follow_the_generator_and_cover_every_sample():
    x, y = _problem()
    data = MapStyleData(Pairs(x, y))
    sizes = [len(xb) for xb, _ in data.batches(40, generator=torch.Generator().manual_seed(1))]
    assert sizes == [40, 40, 16]
    assert [len(xb) for xb, _ in data.batches(40, drop_last=True)] == [40, 40]
    seen = torch.cat([xb for xb, _ in data.batches(40, generator=torch.Generator().manual_seed(1))])
    assert sorted(seen[:, 0].tolist()) == sorted(x[:, 0].tolist())
    mem = [xb for xb, _ in InMemoryData(x, y).batches(40, generator=torch.Generator().manual_seed(1))]
    torch.testing.assert_close(seen, torch.cat(mem))
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 96\]"):
        next(data.batches(97))


def test_evaluate_on_a_dataset():
    x, y = _problem()
    net = gl.models.mlp(5, 8, 1, 2, seed=0)
    assert gl.evaluate(net, Pairs(x, y), batch_size=10) == pytest.approx(gl.evaluate(net, (x, y)))


def test_bad_datasets_are_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2), 0

    with pytest.raises(TypeError, match="map-style torch Dataset"):
        MapStyleData(Stream())
    with pytest.raises(TypeError, match="map-style torch Dataset"):
        gl.train(gl.models.mlp(2, 4, 1, 2), Stream(), schedule=4, epochs=1, lr=0.1, progress=False)

    class Singles(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(2)

    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair"):
        next(MapStyleData(Singles()).batches(2))
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        MapStyleData(Pairs(*_problem()), num_workers=-1)
