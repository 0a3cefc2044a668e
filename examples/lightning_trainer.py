"""Train with Lightning's ``Trainer(strategy="ddp")`` on 2 CPU workers, options from tyro.

Run:  pip install lightning transformers tyro
      python examples/lightning_trainer.py [--steps 8] [--checkpoint lightning.ckpt]
      python examples/lightning_trainer.py --launcher.hostnames node1 node2 --launcher.backend nccl
      python examples/lightning_trainer.py --help         # every option, launcher's included

The model is a tiny GPT-2 made from a config (nothing is downloaded), trained on sequences
that count up. ``TorchrunxClusterEnvironment`` tells Lightning that torchrunx has started the
processes and which rank each is; ``devices`` and ``num_nodes`` come from the variables
torchrunx sets. Rank 0 saves a checkpoint and returns its path; the launcher loads it.
``main`` takes a nested ``launcher: torchrunx.Launcher``, as torchrunx 0.4's examples do, so
every launcher field is an option (``--launcher.workers-per-host``, ...).
"""

from __future__ import annotations

import os

import torch
import tyro

import torchrunx

VOCAB, LENGTH = 128, 32


def tiny_causal_lm() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 -- in the worker
    from transformers.utils import logging  # noqa: PLC0415

    logging.set_verbosity_error()  # no notes about a config made at random
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt2",
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config)


def token_batches(n: int, seed: int) -> torch.Tensor:
    """Sequences that count up from a random start: learnable in a few steps."""
    starts = torch.randint(VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(LENGTH)) % VOCAB


def train(steps: int, checkpoint: str) -> str:
    import lightning as L  # noqa: N812, PLC0415 -- Lightning's own spelling

    from torchrunx.integrations.lightning import TorchrunxClusterEnvironment  # noqa: PLC0415

    class CausalLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_causal_lm()

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            (ids,) = batch
            loss = self.model(input_ids=ids, labels=ids).loss
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    data = torch.utils.data.TensorDataset(token_batches(64, seed=0))
    local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
    trainer = L.Trainer(
        accelerator="auto",  # the GPUs torchrunx gave this worker, else the CPU
        strategy="ddp",
        devices=local_world_size,
        num_nodes=int(os.environ["WORLD_SIZE"]) // local_world_size,
        plugins=[TorchrunxClusterEnvironment()],
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = CausalLM()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(checkpoint)  # rank 0 writes; every rank takes part
    print(f"rank {trainer.global_rank} of {trainer.world_size}: {trainer.global_step} steps")
    return checkpoint


def main(
    launcher: torchrunx.Launcher = torchrunx.Launcher(  # noqa: B008 -- tyro's default
        hostnames=["localhost"], workers_per_host=2, backend="gloo", live_ranks="all"
    ),
    steps: int = 8,
    checkpoint: str = "lightning.ckpt",
) -> None:
    """Train on the launcher's workers, then load the checkpoint here.

    Args:
        launcher: Where and how to run.
        steps: Training steps.
        checkpoint: Where rank 0 saves the trained model.
    """
    with launcher:
        path = launcher.run(train, steps, os.path.abspath(checkpoint)).rank(0)  # noqa: PTH100

    state = torch.load(path, weights_only=False, map_location="cpu")
    model = tiny_causal_lm()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()})
    ids = token_batches(8, seed=1)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    print(f"loaded {checkpoint} (step {state['global_step']}): loss {loss:.3f} on held-out tokens")


if __name__ == "__main__":
    tyro.cli(main)
