"""The user's model comes back as it was (each submodule's train / eval mode, the
running statistics), and parameter selections find tied weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import hessfree as hf


def test_each_submodule_keeps_its_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Linear(6, 3))
    model.train()
    model[1].eval()  # a frozen BatchNorm while the rest trains
    modes = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    est = hf.Influence(hf.ClassificationTask(model), members=hf.members.Dropout(n=2), progress=False).fit((x, y))
    assert [m.training for m in model.modules()] == modes
    est.influence(hf.targets.Utility((x[:3], y[:3])))
    est.pairwise((x[:2], y[:2]))
    hf.training.predict(model, x)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, stats)


def _tiny_gpt2():
    transformers = __import__("pytest").importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def test_last_and_prefix_select_a_tied_output_weight():
    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(1, 50, (3, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    task = hf.LanguageModelTask(model)
    ref = []
    model.eval()
    for i in range(3):
        model.zero_grad()
        task.per_example_loss(model, {k: v[i : i + 1] for k, v in batch.items()}).sum().backward()
        ref.append(model.transformer.wte.weight.grad.flatten().clone())
    ref = torch.stack(ref).double()
    for spec in ("last", "lm_head"):
        est = hf.Influence(task, params=spec, progress=False).fit(batch)
        assert est.param_names() == ["transformer.wte.weight"]
        np.testing.assert_allclose(est.self_influence(), (ref * ref).sum(1).numpy(), rtol=1e-4)
