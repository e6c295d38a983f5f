"""Tiny models with random weights (built from configs, nothing downloaded) and the
data each one is fed, for the per-example gradient conformance tests.

Every case holds:

* ``examples``: each training example alone, at its real length, as a batch of one
  (the reference gradients are taken on these);
* ``train``: the same examples as users pass them to ``fit`` (padded dict batches
  with an attention mask where lengths differ, ``(x, y)`` tensors otherwise);
* ``engines``: what each forced engine must do on this model: ``"equal"`` (the
  numbers of the reference loop), ``"refuse"`` (raise ``EngineError``) or
  ``"equal_or_refuse"`` (either, never a wrong number). Engines not listed must
  give the reference numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hessfree as hf

IGNORE = -100
LM_PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE}
CLS_PAD = {"input_ids": 0, "attention_mask": 0}
EQUAL, REFUSE, EITHER = "equal", "refuse", "equal_or_refuse"


@dataclass
class Case:
    model: nn.Module
    task: hf.Task
    examples: list
    train: Any
    params: Any = None
    engines: dict[str, str] = field(default_factory=dict)
    refusal_names: dict[str, str] = field(default_factory=dict)  # engine -> a module its refusal must name
    pad: dict[str, int] | None = None  # dict cases: the padding value of each key (a collator pads each batch)

    def expectation(self, engine: str) -> str:
        return self.engines.get(engine, EQUAL)

    @property
    def names(self) -> list[str]:
        """The parameter names the estimator must select, in ``named_parameters`` order."""
        if self.params == "all":
            return [n for n, _ in self.model.named_parameters()]
        return [n for n, p in self.model.named_parameters() if p.requires_grad]


# ---- helpers ---------------------------------------------------------------------------------------------


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tuple_examples(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))]


def pad_dict(rows: list[dict[str, torch.Tensor]], pad: dict[str, int]) -> dict[str, torch.Tensor]:
    """Stack 1-D/0-D example tensors into one batch, right-padding 1-D ones with ``pad[key]``."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if values[0].dim() == 0:
            out[key] = torch.stack(values)
            continue
        longest = max(v.shape[0] for v in values)
        out[key] = torch.stack([F.pad(v, (0, longest - v.shape[0]), value=pad.get(key, 0)) for v in values])
    return out


def _dict_examples(rows: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.unsqueeze(0) for k, v in r.items()} for r in rows]


def _lm_rows(vocab: int, lengths: list[int], seed: int) -> list[dict[str, torch.Tensor]]:
    """Prompt/response token rows (ids >= 1; prompt labels -100) of the given lengths."""
    g = _seeded(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 2] = IGNORE
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def _lm_case(model: nn.Module, vocab: int, seed: int, **kw) -> Case:
    model.eval()
    rows = _lm_rows(vocab, [5, 3, 9, 4, 7, 6], seed)
    train = hf.llm.collate(rows, pad_id=0)
    assert (train["attention_mask"] == 0).any()
    return Case(model, hf.LanguageModelTask(model), _dict_examples(rows), train, pad=LM_PAD, **kw)


def _classification_rows(vocab: int, lengths: list[int], n_classes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = _seeded(seed)
    return [
        {
            "input_ids": torch.randint(1, vocab, (n,), generator=g),
            "attention_mask": torch.ones(n, dtype=torch.long),
            "labels": torch.randint(0, n_classes, (), generator=g),
        }
        for n in lengths
    ]


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Move normalisation weights, biases and running statistics away from their
    neutral initial values so that each of them really takes part."""
    g = _seeded(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, RMSNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


# ---- hand-written models --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Weight-only RMS normalisation, written like Llama's."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))


class NormMLP(nn.Module):
    """Linear -> LayerNorm (with bias) -> tanh -> Linear -> RMSNorm -> GroupNorm -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln = nn.Linear(6, 8), nn.LayerNorm(8)
        self.fc2, self.rms, self.gn = nn.Linear(8, 8), RMSNorm(8), nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.ln(self.fc1(x)))
        return self.head(torch.relu(self.gn(self.rms(self.fc2(h)))))


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Stem conv + BatchNorm, one residual block, a strided conv + GroupNorm, pooling, a linear head."""

    def __init__(self, n_classes: int = 3):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.block = Block(4)
        self.down, self.gn = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.GroupNorm(2, 6)
        self.head = nn.Linear(6, n_classes)

    def forward(self, x):
        h = self.block(torch.relu(self.bn(self.stem(x))))
        h = torch.relu(self.gn(self.down(h)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Recurrent(nn.Module):
    """A GRU or LSTM over (B, T, 3) sequences, a linear head on the last hidden state."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TiedToy(nn.Module):
    """An embedding and an output layer that share one weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


class BroadcastToy(nn.Module):
    """A learned position embedding looked up with a batch dimension of 1 and
    broadcast over the batch (as GPT-2 does with its position ids)."""

    def __init__(self, vocab: int = 12, length: int = 5, d: int = 6):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)[None]
        return self.head((self.tok(x) + self.pos(positions)).mean(1))


class InPlaceToy(nn.Module):
    """Writes activations into a preallocated buffer in place."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        buf = torch.zeros(x.shape[0], 16, dtype=h.dtype, device=h.device)
        buf[:, :8] = h
        buf[:, 8:] = torch.tanh(h)
        return self.fc2(buf)


class DictOutput(nn.Module):
    """An MLP whose forward returns ``{"logits": ...}``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return {"logits": self.fc2(torch.tanh(self.fc1(x)))}


# ---- the cases -------------------------------------------------------------------------------------------


def _tensor_case(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> Case:
    model.eval()
    return Case(model, hf.ClassificationTask(model), _tuple_examples(x, y), (x, y), **kw)


def gpt2_lm() -> Case:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                                     eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied input/output embeddings
    return _lm_case(model, 64, seed=1, engines={"hooks": EITHER})


def bert_classifier() -> Case:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    rows = _classification_rows(64, [5, 3, 8, 4, 6, 7], 3, seed=2)
    train = pad_dict(rows, CLS_PAD)
    # vmap cannot run BERT's attention-mask construction per example: a named refusal is required
    return Case(model, hf.ClassificationTask(model), _dict_examples(rows), train,
                engines={"hooks": EITHER, "vmap": REFUSE}, pad=CLS_PAD)  # fmt: skip


def _llama(tie: bool, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=tie)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def llama_lora() -> Case:
    import peft

    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(_llama(tie=False), lora)
    g = _seeded(5)
    with torch.no_grad():  # LoRA B starts at zero; move it so that A also gets gradients
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    case = _lm_case(model, 48, seed=3)
    assert case.names and all("lora_" in n for n in case.names)
    return case


def llama_tied() -> Case:
    model = _llama(tie=True, seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return _lm_case(model, 48, seed=4, params="all", engines={"hooks": EITHER})


def gpt2_classifier() -> Case:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=3,
                                     bos_token_id=1, eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)  # fmt: skip
    model = transformers.GPT2ForSequenceClassification(config).eval()
    rows = _classification_rows(64, [4, 7, 3, 9, 5, 6], 3, seed=5)  # token ids >= 1: only padding is 0
    train = pad_dict(rows, CLS_PAD)
    return Case(model, hf.ClassificationTask(model), _dict_examples(rows), train,
                engines={"hooks": EITHER, "vmap": EITHER}, pad=CLS_PAD)  # fmt: skip


def vit_classifier() -> Case:
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = transformers.ViTForImageClassification(config)
    g = _seeded(6)
    with torch.no_grad():  # the CLS token and position embeddings start at (near) zero
        model.vit.embeddings.cls_token.normal_(0, 0.5, generator=g)
        model.vit.embeddings.position_embeddings.normal_(0, 0.5, generator=g)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    return _tensor_case(model, x, y, engines={"hooks": EITHER})


def seq2seq_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of the labels (``-100`` = no loss), one value per example."""
    logits = outputs if isinstance(outputs, torch.Tensor) else outputs["logits"]  # or a ModelOutput / dict
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return nll.sum(1) / (labels != IGNORE).sum(1)


def t5_seq2seq() -> Case:
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).eval()
    g = _seeded(7)
    rows = []
    for n_in, n_out in [(5, 3), (3, 4), (7, 2), (4, 5), (6, 3), (2, 4)]:
        src, tgt = torch.randint(2, 50, (n_in,), generator=g), torch.randint(2, 50, (n_out,), generator=g)
        rows.append({"input_ids": src, "attention_mask": torch.ones(n_in, dtype=torch.long),
                     "decoder_input_ids": torch.cat([torch.zeros(1, dtype=torch.long), tgt[:-1]]),
                     "labels": tgt})  # fmt: skip
    pad = {"input_ids": 0, "attention_mask": 0, "decoder_input_ids": 0, "labels": IGNORE}
    task = hf.Task(model, loss_fn=seq2seq_loss)
    return Case(model, task, _dict_examples(rows), pad_dict(rows, pad), engines={"hooks": EITHER, "vmap": EITHER},
                pad=pad)  # fmt: skip


def resnet_cnn() -> Case:
    torch.manual_seed(0)
    model = _randomize_norms(TinyResNet(), seed=8)
    g = _seeded(8)
    return _tensor_case(model, torch.randn(6, 3, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g),
                        engines={"hooks": EITHER})  # fmt: skip


def norm_mlp() -> Case:
    torch.manual_seed(0)
    model = _randomize_norms(NormMLP(), seed=9)
    g = _seeded(9)
    return _tensor_case(model, torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g),
                        engines={"hooks": EITHER})  # fmt: skip


def _recurrent(cell: type[nn.Module], seed: int, vmap: str) -> Case:
    torch.manual_seed(seed)
    g = _seeded(seed)
    x, y = torch.randn(6, 4, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    # no per-example rule for recurrent layers: forcing the hook engine must name the module
    return _tensor_case(Recurrent(cell), x, y, engines={"hooks": REFUSE, "vmap": vmap}, refusal_names={"hooks": "rnn"})


def gru() -> Case:
    return _recurrent(nn.GRU, seed=10, vmap=EITHER)  # torch.func has no working batching of the GRU kernel


def lstm() -> Case:
    return _recurrent(nn.LSTM, seed=11, vmap=EQUAL)


def tied_toy() -> Case:
    torch.manual_seed(0)
    g = _seeded(12)
    return _tensor_case(TiedToy(), torch.randint(0, 10, (6, 5), generator=g), torch.randint(0, 10, (6,), generator=g))


def broadcast_toy() -> Case:
    torch.manual_seed(0)
    g = _seeded(13)
    x, y = torch.randint(0, 12, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
    return _tensor_case(BroadcastToy(), x, y, engines={"hooks": EITHER})


def in_place_toy() -> Case:
    torch.manual_seed(0)
    g = _seeded(14)
    x, y = torch.randn(6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)
    # an in-place write of a per-example value into a fresh buffer cannot run under vmap
    return _tensor_case(InPlaceToy(), x, y, engines={"vmap": REFUSE})


def dict_output() -> Case:
    torch.manual_seed(0)
    g = _seeded(15)
    return _tensor_case(DictOutput(), torch.randn(6, 6, generator=g), torch.randint(0, 3, (6,), generator=g))


BUILDERS: dict[str, Callable[[], Case]] = {
    "gpt2_lm": gpt2_lm,
    "bert_cls": bert_classifier,
    "llama_lora": llama_lora,
    "llama_tied": llama_tied,
    "gpt2_cls": gpt2_classifier,
    "vit": vit_classifier,
    "t5": t5_seq2seq,
    "resnet": resnet_cnn,
    "norm_mlp": norm_mlp,
    "gru": gru,
    "lstm": lstm,
    "tied_toy": tied_toy,
    "broadcast_toy": broadcast_toy,
    "in_place": in_place_toy,
    "dict_output": dict_output,
}
HF_CASES = {"gpt2_lm", "bert_cls", "llama_lora", "llama_tied", "gpt2_cls", "vit", "t5"}


@functools.cache
def case(name: str) -> Case:
    """The case ``name``, built once per session (tests only read it)."""
    return BUILDERS[name]()


@functools.cache
def reference(name: str) -> torch.Tensor:
    """Per-example gradients by a plain autograd loop: each example alone, unpadded,
    as a batch of one; zeros for parameters the loss does not use; ``(n, D)`` in
    :attr:`Case.names` order."""
    c = case(name)
    params = dict(c.model.named_parameters())
    chosen = [params[n] for n in c.names]
    rows = []
    with torch.enable_grad():
        for example in c.examples:
            loss = c.task.per_example_loss(c.model, example).sum()
            grads = torch.autograd.grad(loss, chosen, allow_unused=True)
            rows.append(
                torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, chosen)])
            )
    return torch.stack(rows).detach()
