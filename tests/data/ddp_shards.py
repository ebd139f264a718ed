"""Run by test_datamodule.py: a 2-process CPU DDP fit that records what each rank's batches hold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.data.plugins import load_plugins


class Recorder(L.LightningModule):
    """Records case ids and regions of every training batch; trains nothing."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({"case": list(batch["case"]), "region": batch["region"].tolist()})
        return self.weight * batch["image"].mean()

    def on_train_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    load_plugins()
    data = MultiRegionDataModule(
        ["demo_brain_cls", "demo_thorax_cls", "demo_abdomen_cls"], batch_size=8, samples_per_epoch=96
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(Recorder(sys.argv[1]), data)
