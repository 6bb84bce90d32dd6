"""Train the small GPT-2-style demo model on the tokenized corpus, on a CPU, in about a minute.

The model must be calibrated rather than clever: sampled at temperature 1 it should name a wrong
capital about as often as the corpus does, so training runs long enough to fit the corpus's
next-token distribution (the loss flattens at the corpus entropy) and stops there. Windows start
at a sentence start without a leading EOS, as prompts sent to the policy server do; sentences
inside a window are separated by EOS, so the model also learns that EOS ends a fact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # torch and batch sampling seed
    steps: int = 1000  # optimizer steps (capitals are learned by ~300, the invented currencies by ~800; the rest calibrates)
    batch_size: int = 16  # windows per step (more steps of smaller batches learn the facts sooner)
    block_size: int = 64  # tokens per window (and the model's context length n_positions)
    n_layer: int = 2  # transformer blocks (2 learn the facts in fewer steps than 4 here, at half the cost)
    n_embd: int = 128  # model width
    n_head: int = 4  # attention heads
    lr: float = 6e-3  # peak AdamW learning rate, after linear warm-up
    warmup: int = 20  # warm-up steps
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio (small: calibrated at the end)
    weight_decay: float = 0.01  # AdamW decay on matrices (not on biases, norms, embeddings)
    threads: int = 1  # torch intra-op threads: 2 OpenMP threads on a shared 2-core box ran 17x slower
    log_every: int = 50  # print progress every this many steps


def model_config(cfg: TrainConfig, vocab_size: int, eos_id: int) -> GPT2Config:
    """A GPT-2 shape, small; no dropout: the corpus is the distribution we want, not a sample of it."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
    )


class WindowSampler:
    """Random training windows: consecutive random sentences, each followed by EOS, cut to
    block_size + 1 tokens (inputs and shifted targets)."""

    def __init__(self, sentences: list[list[int]], eos_id: int, block_size: int, seed: int):
        self.block_size = block_size
        lens = [len(s) + 1 for s in sentences]  # with its EOS
        assert max(lens) <= block_size + 1, (
            f"a sentence of {max(lens)} tokens does not fit block_size + 1 = {block_size + 1}"
        )
        self.flat = np.concatenate([np.array(s + [eos_id], dtype=np.int64) for s in sentences])
        self.starts = np.cumsum([0] + lens[:-1])  # where each sentence starts in `flat`
        self.lens = np.array(lens)
        self.rng = np.random.default_rng(seed)
        self.mean_sentences = math.ceil((block_size + 1) / float(np.mean(lens))) + 2

    def batch(self, batch_size: int) -> torch.Tensor:
        n = self.block_size + 1
        out = np.empty((batch_size, n), dtype=np.int64)  # (B, T+1)
        for b in range(batch_size):
            pieces, total = [], 0
            while total < n:
                picks = self.rng.integers(0, len(self.starts), self.mean_sentences)
                for i in picks:
                    pieces.append(self.flat[self.starts[i]:self.starts[i] + self.lens[i]])
                    total += self.lens[i]
            out[b] = np.concatenate(pieces)[:n]
        return torch.from_numpy(out)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    cfg: TrainConfig,
    sentences: list[list[int]],
    vocab_size: int,
    eos_id: int,
    log: Callable[[str], None] = print,
) -> tuple[GPT2LMHeadModel, dict]:
    """Train a fresh model on `sentences` (token ids, without EOS). Returns the model (eval mode)
    and a summary (final loss averaged over the last steps, seconds, tokens seen)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = GPT2LMHeadModel(model_config(cfg, vocab_size, eos_id))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: GPT-2, {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads, context {cfg.block_size}, "
        f"vocab {vocab_size}, {n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    sampler = WindowSampler(sentences, eos_id, cfg.block_size, cfg.seed)
    model.train()
    t0 = time.perf_counter()
    recent: list[float] = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        xy = sampler.batch(cfg.batch_size)  # (B, T+1)
        x = xy[:, :-1]  # (B, T)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1:5d}/{cfg.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {lr_at(step, cfg):.2e}  elapsed {time.perf_counter() - t0:6.1f}s")
    model.eval()
    seconds = time.perf_counter() - t0
    summary = {
        "final_loss": sum(recent) / len(recent),
        "train_seconds": round(seconds, 2),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.block_size,
        "parameters": n_params,
    }
    return model, summary
