"""The MNIST embedding study's parts: the pair loss against its definition, the small CNN's
shapes, and training in segments (``Trainer.fit(until=...)``, one epoch at a time) ending where
one uninterrupted ``fit()`` ends."""

import pytest
import torch

from mmsys.embedding import SmallCNN, pair_loss
from mmsys.train import Trainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pair_loss_is_its_definition():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 2, 1, 0])
    loss, m = pair_loss(z, y)
    u = z / z.norm(dim=1, keepdim=True)
    terms = [(float(u[i] @ u[j]) - float(y[i] == y[j])) ** 2 for i in range(6) for j in range(6) if i != j]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    perfect = torch.eye(3, dtype=torch.float64)[y]  # one orthogonal direction per digit
    assert pair_loss(perfect, y)[0].item() == pytest.approx(0.0, abs=1e-12)


def test_small_cnn_gives_unit_vectors():
    z = SmallCNN()(torch.randn(4, 3, 28, 28))
    assert z.shape == (4, 64)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


def test_fit_in_segments_equals_one_fit():
    X, Y = torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), torch.randn(32)

    def run(segments):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        t = Trainer(model, TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, progress=False),
                    loss_fn=lambda m, b: (((m(b[0]).squeeze(-1) - b[1]) ** 2).mean(), {}), data_size=32,
                    get_batch=lambda idx, g: (X[idx], Y[idx]))
        for until in segments:
            summary = t.fit(until=until)
        return model, summary, t

    whole, _, _ = run([None])
    parts, summary, trainer = run([2, 4, None])
    assert summary["steps"] == 6 and summary["start_step"] == 4 and trainer.time_total()["segments"] == 3
    for a, b in zip(whole.parameters(), parts.parameters()):
        assert torch.equal(a, b)
