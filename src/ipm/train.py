"""Training the index: a LoRA adapter that maps questions to memory IDs.

Fast path (Llama-family models, the default): LoRA only in the top `lora_layers` decoder
layers. The frozen layers below see the same input every epoch, so their output is computed
once per example and reused; each step then runs only the top layers, and the loss is taken
over the ID-token vocabulary only, at the ID positions only.

With hard negatives (`Config.hard_negatives`), each example also carries the IDs the
retrievers propose for its question, and a second loss asks, at each token where the right ID
and those candidates part ways, for the right branch among theirs only: the choice hybrid
decoding puts to the adapter, learnt on the confusions the retrievers actually make.

Naive path (`fast=False`, or a model the runner does not know): LoRA on every layer, full
forward with full-vocabulary loss, through the model's own `forward`.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import Config
from .errors import TrainingError
from .model import BaseModel, Runner, id_token_ids, prompt_ids
from .trie import Trie

Progress = Callable[[int, int, float], None]  # (step, total_steps, loss)


@dataclass
class Example:
    question: str
    memory_id: str
    negatives: tuple[str, ...] = ()  # IDs the retrievers confuse with it (hard negatives)


@dataclass
class TrainResult:
    model: object  # the PEFT model with the trained adapter
    metrics: dict = field(default_factory=dict)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def lora_config(config: Config, n_layers: int, fast: bool, model=None):
    """PEFT's LoraConfig for `config`, and the index of the first layer it adapts. With `model`,
    target_modules are checked against its linear layers (see target_modules)."""
    from peft import LoraConfig

    top = config.lora_layers if fast and 0 < config.lora_layers < n_layers else n_layers
    targets = list(config.target_modules) if model is None else target_modules(model, config)
    # GPT-2's Conv1D stores its weight transposed: PEFT sets this itself, with a warning, if not told
    conv1d = model is not None and any(type(m).__name__ == "Conv1D" for m in model.modules())
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets,
        fan_in_fan_out=conv1d,
        layers_to_transform=list(range(n_layers - top, n_layers)) if targets != "all-linear" or top < n_layers else None,
        bias="none", task_type="CAUSAL_LM",
    ), n_layers - top


def target_modules(model, config: Config) -> list[str] | str:
    """The configured target_modules where the model has such linear layers. The default names
    Llama's (q_proj ... down_proj); a model that names its layers otherwise (GPT-2's c_attn,
    c_fc, ...) gets PEFT's "all-linear" instead; target_modules set by hand that name none of
    its layers are an error that lists the names it has."""
    import torch

    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}  # (GPT-2's linear maps)
    wanted = list(config.target_modules)
    if set(wanted) & linear:
        return wanted
    if wanted == Config().target_modules:
        return "all-linear"
    kind = getattr(getattr(model, "config", None), "model_type", "this model")
    raise TrainingError(f"target_modules {wanted} name no linear layer of the base model ({kind}), whose linear layers "
                        f"are {', '.join(sorted(linear - {'lm_head'}))}: set target_modules to some of them")


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_adapter(base: BaseModel, examples: list[Example], config: Config,
                  progress: Progress | None = None, fast: bool | None = None,
                  init_from: Path | None = None) -> TrainResult:
    """Train a LoRA adapter on (question -> ID) examples; returns the PEFT model. The adapter
    starts fresh, or from the weights of the adapter saved in `init_from` (incremental training:
    same LoRA shape required)."""
    import torch
    from peft import get_peft_model
    from peft.helpers import disable_input_dtype_casting

    if not examples:
        raise TrainingError("nothing to train on: add memories first")
    _seed_everything(config.seed)
    tok = base.tokenizer
    model = copy.deepcopy(base.model)  # the shared base stays clean for serving
    n_layers = model.config.num_hidden_layers
    if fast is None:
        fast = Runner.supports(model)
    elif fast and not Runner.supports(model):
        fast = False
    if config.hard_negatives and not fast:
        raise TrainingError("hard negatives need the fast training path (Llama, Mistral or Qwen2 models): "
                            "set hard_negatives = 0 for this base model")
    lcfg, split = lora_config(config, n_layers, fast, model)
    peft_model = get_peft_model(model, lcfg)
    if init_from is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        loaded = set_peft_model_state_dict(peft_model, load_file(Path(init_from) / "adapter_model.safetensors",
                                                                 device=base.device))
        if any("lora_" in k for k in loaded.unexpected_keys):
            raise TrainingError(f"the adapter in {init_from} does not fit this LoRA configuration")
    params = [p for p in peft_model.parameters() if p.requires_grad]

    id_seqs = {mid: id_token_ids(tok, mid) for e in examples for mid in (e.memory_id, *e.negatives)}
    seqs = []  # (input_ids, n_prompt)
    for e in examples:
        p = prompt_ids(tok, e.question)
        seqs.append((p + id_seqs[e.memory_id], len(p)))
    t0 = time.perf_counter()
    device = base.device
    rng = random.Random(config.seed)
    steps_per_epoch = len(_length_bucketed_batches(seqs, config.batch_size, random.Random(0)))
    total = steps_per_epoch * config.epochs
    optim = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _schedule(s, total, max(1, int(total * config.warmup_ratio))))
    losses: list[float] = []
    # bf16 compute on CUDA, and on a bf16 base model on CPU. PEFT keeps the adapter's weights in
    # float32 and casts each LoRA layer's input up to them, a copy of every activation; under
    # autocast that cast is not needed (the matmul casts the small adapter weights down
    # instead), so it is turned off. On CPU, the LoRA path in bf16 trained in x0.90 the time
    # of the float32 one, same losses to 3 decimals (median of 12 paired ratios of alternating
    # trainings on demo questions; scratch A/B). The optimiser still updates float32 weights.
    bf16 = device.startswith("cuda") or model.dtype == torch.bfloat16
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else _null()

    if fast:
        # Its lower layers run once an example, in batches of 64: packed weights (Runner._packed_weight)
        # there cost ~110 MB of peak memory in bf16 (260 in float32) for no measured gain.
        runner = Runner(peft_model, pack_weights=False)
        vocab = sorted({t for s in id_seqs.values() for t in s})
        col = torch.full((len(tok),), -1, dtype=torch.long)
        col[torch.tensor(vocab)] = torch.arange(len(vocab))
        vocab_t = torch.tensor(vocab, device=device)
        cached = _lower_hidden(runner, seqs, split, device)
        choices = [_choices(id_seqs[e.memory_id], [id_seqs[n] for n in e.negatives], col) for e in examples]
        t_cache = time.perf_counter() - t0
    peft_model.train()
    step = 0
    with disable_input_dtype_casting(peft_model, active=bf16):
        for _epoch in range(config.epochs):
            for batch in _length_bucketed_batches(seqs, config.batch_size, rng):
                with autocast:
                    if fast:
                        loss = _fast_loss(runner, [seqs[i] for i in batch], [cached[i] for i in batch], split, vocab_t, col,
                                          device, [choices[i] for i in batch], config.hard_negative_weight)
                    else:
                        loss = _naive_loss(peft_model, [seqs[i] for i in batch], tok, device)
                loss.backward()
                optim.step()
                sched.step()
                optim.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                if progress:
                    progress(step, total, losses[-1])
    peft_model.eval()
    seconds = time.perf_counter() - t0
    metrics = {
        "path": "fast" if fast else "naive", "examples": len(seqs), "epochs": config.epochs, "steps": total,
        "trained_layers": n_layers - split, "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[-5:]) / max(1, len(losses[-5:])), "train_seconds": round(seconds, 2),
        "examples_per_second": round(len(seqs) * config.epochs / seconds, 2) if seconds else None,
    }
    if fast:
        metrics["cache_seconds"] = round(t_cache, 2)
        metrics["hard_negative_choices"] = sum(c is not None for cs in choices for c in cs)
    return TrainResult(peft_model, metrics)


BATCH_TOKENS_PER_EXAMPLE = 320


def _length_bucketed_batches(seqs, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length: padding a batch of short questions to the length
    of one long memory text would multiply the cost of the step."""
    order = list(range(len(seqs)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(seqs[i][0]))
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    # A batch of long inputs (memory texts of hundreds of tokens) is split to a token budget:
    # attention's memory grows with the square of the length. The demo's and LoCoMo's batches
    # are all under it (at most 32 x 286 tokens), and stay as they were.
    budget = batch_size * BATCH_TOKENS_PER_EXAMPLE
    split = []
    for batch in batches:
        longest = max(len(seqs[i][0]) for i in batch)
        size = max(1, min(len(batch), budget // longest))
        split += [batch[b:b + size] for b in range(0, len(batch), size)]
    rng.shuffle(split)
    return split


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _lower_hidden(runner: Runner, seqs, split: int, device: str, batch_size: int = 64):
    """Output of the frozen layers [0, split) for every example, computed once."""
    import torch

    out = [None] * len(seqs)
    if split == 0:
        with torch.no_grad():
            for i, (ids, _) in enumerate(seqs):
                out[i] = runner.embed(torch.tensor(ids, device=device)).detach()
        return out
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            L = max(len(seqs[i][0]) for i in idx)
            ids = torch.tensor([seqs[i][0] + [0] * (L - len(seqs[i][0])) for i in idx], device=device)
            h = runner.hidden(ids, 0, split)
            for row, i in enumerate(idx):
                out[i] = h[row, :len(seqs[i][0])].clone()
    return out


def _targets(seqs):
    """(row, position, token) for every ID token: position t predicts token t+1."""
    rows, pos, toks = [], [], []
    for r, (ids, n_prompt) in enumerate(seqs):
        for t in range(n_prompt - 1, len(ids) - 1):
            rows.append(r)
            pos.append(t)
            toks.append(ids[t + 1])
    return rows, pos, toks


def _choices(gold: list[int], negatives: list[list[int]], col) -> list[list[int] | None]:
    """For each token of the gold ID: the ID-vocabulary columns of its node's children in a
    trie of the gold ID and the negatives, where there is more than one (else None)."""
    node = Trie([("gold", gold), *((str(i), n) for i, n in enumerate(negatives))]).root
    out = []
    for t in gold:
        allowed = node.allowed()
        out.append(sorted(int(col[a]) for a in allowed) if len(allowed) > 1 else None)
        node = node.child(t)
    return out


def _fast_loss(runner: Runner, seqs, hiddens, split, vocab_t, col, device, choices=None, hard_weight: float = 0.0):
    import torch
    import torch.nn.functional as F

    L = max(h.shape[0] for h in hiddens)
    x = torch.zeros(len(hiddens), L, hiddens[0].shape[-1], dtype=hiddens[0].dtype, device=device)
    for r, h in enumerate(hiddens):
        x[r, :h.shape[0]] = h
    h = runner.hidden(None, split, None, x=x)  # right padding is harmless under a causal mask
    rows, pos, toks = _targets(seqs)
    logits = runner.logits(h[rows, pos], vocab_t).float()
    target = col[torch.tensor(toks)].to(device)
    loss = F.cross_entropy(logits, target)
    # _targets walks every example's ID tokens in order, as _choices lists them.
    flat = [c for cs in (choices or []) for c in cs]
    assert not choices or len(flat) == len(toks), "hard-negative choices out of step with the targets"
    picked = [i for i, c in enumerate(flat) if c is not None]
    if hard_weight > 0 and picked:
        mask = torch.ones(len(picked), logits.shape[1], dtype=torch.bool, device=device)
        mask[[r for r, i in enumerate(picked) for _ in flat[i]], [c for i in picked for c in flat[i]]] = False
        restricted = logits[picked].masked_fill(mask, float("-inf"))
        loss = loss + hard_weight * F.cross_entropy(restricted, target[picked])
    return loss


def _naive_loss(model, seqs, tok, device):
    import torch

    L = max(len(ids) for ids, _ in seqs)
    pad = tok.eos_token_id
    ids = torch.tensor([s + [pad] * (L - len(s)) for s, _ in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s, _ in seqs], device=device)
    labels = torch.full_like(ids, -100)
    for r, (s, n_prompt) in enumerate(seqs):
        labels[r, n_prompt:len(s)] = torch.tensor(s[n_prompt:])
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def calibrate(top1: list[tuple[float, bool]], off_topic: list[float], max_refusal: float = 0.05) -> dict:
    """Pick the abstention threshold on the top hit's probability.

    `top1`: (probability, correct) for held-back in-scope questions; `off_topic`: top
    probabilities for questions no memory answers. The threshold maximises correct answers
    kept plus off-topic refused, but refuses at most `max_refusal` of correct in-scope answers.
    """
    correct = sorted(p for p, ok in top1 if ok)
    if not correct:
        return {"threshold": 0.0, "reason": "no correct calibration answers", "n_in_scope": len(top1),
                "n_off_topic": len(off_topic)}
    cap = correct[int(max_refusal * len(correct))] if len(correct) > 1 else correct[0]
    best, best_t = -1.0, 0.0
    for t in sorted(set([0.0] + correct + off_topic)):
        if t > cap:
            break
        kept = sum(p >= t for p in correct) / len(correct)
        refused = sum(p < t for p in off_topic) / max(1, len(off_topic))
        if kept + refused > best:
            best, best_t = kept + refused, t
    return {
        "threshold": best_t,
        "in_scope_refused": sum(p < best_t for p in correct) / len(correct),
        "off_topic_refused": sum(p < best_t for p in off_topic) / max(1, len(off_topic)),
        "calibration_top1": sum(ok for _, ok in top1) / len(top1) if top1 else None,
        "n_in_scope": len(top1), "n_off_topic": len(off_topic),
    }
