"""`cologen.callbacks.EMAWeightAveraging`: a run that ends before the average's first update keeps (and checkpoints)
what it trained, where Lightning's callback puts the starting weights back; once the average has started it
behaves as Lightning's (the average in the model at the end and as the checkpoint's state_dict)."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from cologen.callbacks import EMAWeightAveraging


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, callback, steps, ckpt_path=None, module=None):
    torch.manual_seed(1)
    x = torch.randn(64, 4)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True) + 3.0), batch_size=8)
    module = module or Linear()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1000)
    trainer = L.Trainer(max_steps=steps, callbacks=[callback, checkpoint], accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, torch.load(tmp_path / "last.ckpt", weights_only=False)


def weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def saved(ckpt):
    return torch.cat([v.flatten() for k, v in ckpt["state_dict"].items()])


@pytest.mark.parametrize("callback, keeps_training", [(EMAWeightAveraging, True), (LightningEMA, False)],
                         ids=["ours", "lightnings"])
def test_a_run_ending_before_the_average_starts_keeps_what_it_trained(tmp_path, callback, keeps_training):
    start = weights(Linear())
    module, ckpt = fit(tmp_path, callback(decay=0.9, update_starting_at_step=100), steps=12)
    # Lightning's callback restores the starting weights; ours keeps the trained ones, in the model and checkpoint
    assert torch.equal(weights(module), start) is not keeps_training
    assert torch.equal(saved(ckpt), start) is not keeps_training
    if keeps_training:
        assert torch.equal(saved(ckpt), weights(module))


def test_once_the_average_has_started_it_is_the_models_and_the_checkpoints(tmp_path):
    averaged, ckpt = fit(tmp_path / "a", EMAWeightAveraging(decay=0.5, update_starting_at_step=4), steps=12)
    last_iterate, _ = fit(tmp_path / "b", EMAWeightAveraging(decay=0.5, update_starting_at_step=100), steps=12)
    assert int(ckpt["averaging_state"]["n_averaged"]) > 0
    assert torch.equal(saved(ckpt), weights(averaged)) and not torch.equal(weights(averaged), weights(last_iterate))


def test_resuming_before_the_average_started_restores_the_trained_weights(tmp_path):
    first, _ = fit(tmp_path, EMAWeightAveraging(decay=0.9, update_starting_at_step=100), steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, _ = fit(tmp_path, EMAWeightAveraging(decay=0.9, update_starting_at_step=100), steps=6,
                         ckpt_path=tmp_path / "last.ckpt")
    assert not [w for w in caught if "not created with WeightAveraging" in str(w.message)]
    assert torch.equal(weights(resumed), weights(first))  # 6 steps of 6 were done: nothing more trained
