"""The DataModule in a real Lightning fit, built from YAML-style config by jsonargparse."""

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from cologen.data import MixtureDataModule
from data_recipes.shapeworld import shard_patterns


class _Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_tasks, self.val_tasks = [], []

    def training_step(self, batch, batch_idx):
        self.train_tasks.extend(batch["task"])
        if self.global_step == 3:
            self.trainer.datamodule.set_mixture({"editing": 1.0})
        return (self.w - batch["target"].mean()) ** 2

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_tasks.append((dataloader_idx, batch["task"][0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.timeout(180)
def test_fit_with_yaml_config_set_mixture_and_checkpointed_state(shapeworld_dir, tmp_path):
    parser = ArgumentParser()
    parser.add_class_arguments(MixtureDataModule, "data")
    cfg = parser.parse_object({"data": {
        "train_shards": shard_patterns(shapeworld_dir), "val_shards": shard_patterns(shapeworld_dir, "val"),
        "mixture": {"inpainting": 1.0}, "batch_size": 4, "num_workers": 2, "batches_per_epoch": 4,
        "val_samples_per_task": 4, "val_tasks": ["inpainting", "editing"],
        "builder": {"mask_kinds": {"random": 1.0}}}})
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, MixtureDataModule) and dm.builder.mask_kinds == {"random": 1.0}
    model = _Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 4 and len(model.train_tasks) == 2 * 4 * 4
    assert set(model.train_tasks[:8]) == {"inpainting"} and model.train_tasks[-4:] == ["editing"] * 4
    assert {(i, t) for i, t in model.val_tasks} == {(0, "inpainting"), (1, "editing")}
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["MixtureDataModule"]
    # set_mixture at the last batch of epoch 0: the workers have nothing of epoch 1 yet, so it starts there
    assert state["mixture"] == {"editing": 1.0}
    assert state["schedule"] == [[0, {"inpainting": 1.0}], [4, {"editing": 1.0}]]
