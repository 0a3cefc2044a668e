"""Fine-tune a Hugging Face transformers model with ``Trainer`` on 2 CPU workers.

Run:  pip install transformers accelerate
      python examples/transformers_trainer.py [--workers 2] [--steps 4] [--output-dir hf-output]

The model is a tiny GPT-2 initialised at random from a config (nothing is downloaded), trained
on random tokens for a few steps: the point is the wiring, not the model. ``Trainer`` runs in
the launched function as it would under torchrun: it finds ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` in the environment and uses the process group torchrunx already made (gloo).
Rank 0 saves the model and returns the folder; the launcher loads it with ``from_pretrained``.
"""

from __future__ import annotations

import argparse

import torch

import torchrunx

VOCAB, LENGTH = 128, 32


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415 -- in the worker

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def random_tokens(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(VOCAB, (n, LENGTH), generator=g)
    ]


def quiet() -> None:
    """Hide transformers' progress bars and notes about the random config."""
    from transformers.utils import logging  # noqa: PLC0415

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def train(output_dir: str, steps: int) -> str:
    from transformers import Trainer, TrainingArguments  # noqa: PLC0415

    quiet()

    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=random_tokens(64, seed=0))
    trainer.train()
    trainer.save_model(output_dir)  # rank 0 writes, the other ranks skip
    return output_dir  # run() returns once every rank has returned: the folder is complete


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--steps", type=int, default=4, help="training steps (default: 4)")
    parser.add_argument("--output-dir", default="hf-output", help="(default: hf-output)")
    args = parser.parse_args()

    with torchrunx.Launcher(
        hostnames=["localhost"],
        workers_per_host=args.workers,
        backend="gloo",
        extra_env_vars={"OMP_NUM_THREADS": "1"},  # one thread per worker on a small CPU
    ) as launcher:
        output_dir = launcher.run(train, output_dir=args.output_dir, steps=args.steps).rank(0)

    from transformers import GPT2LMHeadModel

    quiet()
    model = GPT2LMHeadModel.from_pretrained(output_dir)
    batch = torch.stack([b["input_ids"] for b in random_tokens(8, seed=1)])
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    print(f"loaded the fine-tuned model from {output_dir}: loss {loss:.3f} on held-out tokens")
