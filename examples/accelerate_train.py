"""Train with Hugging Face Accelerate's ``Accelerator`` on 2 CPU workers.

Run:  pip install accelerate transformers
      python examples/accelerate_train.py [--workers 2] [--steps 8] [--batch-size 4]

The function is an ordinary Accelerate training loop (``prepare``, ``backward``, ``gather``),
as it would run under ``accelerate launch``: ``Accelerator()`` finds the ranks and the process
group that torchrunx made. The model is a tiny Llama made from a config (nothing is
downloaded), trained on sequences that count up. The main process returns the trained
weights; the launcher loads them into a fresh model and evaluates it.
"""

from __future__ import annotations

import argparse

import torch

import torchrunx

VOCAB, LENGTH = 128, 32


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 -- in the worker

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=LENGTH,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config)


def tokens(n: int, seed: int) -> torch.Tensor:
    """Sequences that count up from a random start: learnable in a few steps."""
    starts = torch.randint(VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(LENGTH)) % VOCAB


def train(steps: int, batch_size: int) -> dict[str, torch.Tensor] | None:
    from accelerate import Accelerator  # noqa: PLC0415

    # a GPU per worker when there are GPUs; on CPUs, Accelerate is distributed only if told so
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tokens(steps * batch_size * accelerator.num_processes, 0)),
        batch_size=batch_size,
    )
    model, optimizer, data = accelerator.prepare(model, optimizer, data)  # shards the data

    model.train()
    for step, (ids,) in enumerate(data):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)  # gradients averaged over the workers
        optimizer.step()
        optimizer.zero_grad()
        losses = accelerator.gather(loss.detach().reshape(1))  # one per worker
        accelerator.print(f"step {step}: mean loss over {len(losses)} workers {losses.mean():.3f}")

    if not accelerator.is_main_process:
        return None
    return {k: v.cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--steps", type=int, default=8, help="training steps (default: 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="per worker (default: 4)")
    args = parser.parse_args()

    launcher = torchrunx.Launcher(
        hostnames=["localhost"],
        workers_per_host=args.workers,
        backend="gloo",
        extra_env_vars={"OMP_NUM_THREADS": "1"},  # one thread per worker on a small CPU
    )
    with launcher:
        weights = launcher.run(train, args.steps, args.batch_size).rank(0)

    model = tiny_llama()
    ids = tokens(8, seed=1)
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()
        model.load_state_dict(weights)
        after = model(input_ids=ids, labels=ids).loss.item()
    print(f"held-out loss: {before:.3f} untrained, {after:.3f} after {args.steps} steps")
