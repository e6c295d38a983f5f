"""Per-example LoRA gradients of a tiny Llama-style model (built from a config, no download)."""

import pytest
import torch

import hessfree as hf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 48


def tiny_lora_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    base = transformers.LlamaForCausalLM(config).double()
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():  # LoRA B starts at zero; move it so that A also gets gradients
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def make_examples(seed=1, n=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen, rlen = 2 + i % 3, 2 + (i * 2) % 5
        ids = torch.randint(1, VOCAB, (plen + rlen,), generator=g)
        labels = ids.clone()
        labels[:plen] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def loop_grad(model, task, example, names):
    one = {k: v.unsqueeze(0) for k, v in example.items()}
    params = dict(model.named_parameters())
    loss = task.per_example_loss(model, one).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [params[n] for n in names])])


def test_lora_per_example_gradients_with_padding_equal_unpadded_loop():
    model = tiny_lora_llama()
    model.eval()
    task = hf.LanguageModelTask(model)
    examples = make_examples()
    batch = hf.llm.collate(examples, pad_id=0)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    grads = hf.gradients.per_example_gradients(task, batch)
    names = list(grads)
    assert names and all("lora_" in n for n in names)  # only the adapter is trainable
    flat = torch.cat([grads[n].reshape(len(examples), -1) for n in names], 1)
    ref = torch.stack([loop_grad(model, task, e, names) for e in examples])
    torch.testing.assert_close(flat, ref, rtol=1e-9, atol=1e-12)


def test_loss_is_mean_nll_over_response_tokens_and_ignores_padding_and_prompt_labels():
    model = tiny_lora_llama()
    model.eval()
    task = hf.LanguageModelTask(model)
    ex = make_examples(n=3)
    batch = hf.llm.collate(ex, pad_id=0)
    with torch.no_grad():
        losses = task.per_example_loss(model, batch)
        for i, e in enumerate(ex):
            logits = model(input_ids=e["input_ids"].unsqueeze(0)).logits[0]
            logp = torch.log_softmax(logits[:-1], -1)
            target = e["input_ids"][1:]
            keep = e["labels"][1:] != -100
            by_hand = -logp[torch.arange(len(target)), target][keep].mean()
            torch.testing.assert_close(losses[i], by_hand)
    # other padding ids, longer padding and changed (masked) prompt labels change nothing
    est = hf.Influence(task).fit(batch)
    padded = hf.llm.collate(ex + [{**ex[0], "input_ids": torch.cat([ex[0]["input_ids"], ex[0]["input_ids"]]),
                                   "attention_mask": torch.ones(2 * len(ex[0]["input_ids"]), dtype=torch.long),
                                   "labels": torch.cat([ex[0]["labels"], ex[0]["labels"]])}], pad_id=7)
    longer = {k: v[:3] for k, v in padded.items()}
    est2 = hf.Influence(task).fit(longer)
    torch.testing.assert_close(torch.from_numpy(est2.self_influence()), torch.from_numpy(est.self_influence()), rtol=1e-9, atol=0)
    target = hf.targets.Utility(batch)
    torch.testing.assert_close(torch.from_numpy(est2.influence(target)), torch.from_numpy(est.influence(target)), rtol=1e-9, atol=1e-12)


def test_sum_reduction_and_bad_batches():
    model = tiny_lora_llama()
    ex = make_examples(n=2)
    batch = hf.llm.collate(ex)
    mean_task, sum_task = hf.LanguageModelTask(model), hf.LanguageModelTask(model, reduction="sum")
    with torch.no_grad():
        n_tokens = (batch["labels"][:, 1:] != -100).sum(1).double()
        torch.testing.assert_close(sum_task.per_example_loss(model, batch), mean_task.per_example_loss(model, batch) * n_tokens)
    left = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="padded on the left"):
        hf.Influence(mean_task).fit(left)
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    with pytest.raises(ValueError, match="^training example 0 has no target token"):
        hf.Influence(mean_task).fit(empty)
