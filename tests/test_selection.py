"""LLM data selection on a tiny randomly initialised Llama (built from a config, no download)."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import hessfree as hf
from hessfree import selection as sel
from hessfree.store import GradientStore

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 40


class CharTokenizer:
    """A minimal tokenizer: one id per character (ids 3..), BOS 1, EOS 2, PAD 0."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def tiny_llama(seed=0, dtype=torch.float64, tie=False):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def lora_model(seed=0):
    model = sel.add_lora(tiny_llama(seed), sel.SelectionConfig(lora_r=2, lora_alpha=4, seed=seed))
    with torch.no_grad():  # LoRA B starts at zero; move it so that A also gets gradients
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.eval()


def rows(n, seed=0, task=None):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = "".join(rng.choice(list("abcdefgh"), size=2 + i % 4))
        r = "".join(rng.choice(list("xyz"), size=1 + (i * 3) % 5))
        out.append({"prompt": p, "response": r, **({"task": task} if task else {})})
    return out


def loop_grads(model, task, examples):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    out = []
    for e in examples:
        one = {k: v.unsqueeze(0) for k, v in e.items()}
        loss = task.per_example_loss(model, one).sum()
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [params[n] for n in names])]))
    return torch.stack(out), names



def select_killed_at_third_store_write(monkeypatch, tok, pool, targets, workdir):
    """Run a selection that is killed on its third store batch write."""
    real_write, calls = GradientStore.write, {"n": 0}

    def dying_write(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_write(self, *a, **k)

    monkeypatch.setattr(GradientStore, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        sel.select(tiny_llama(dtype=torch.float32), tok, pool, targets, workdir, _config())
    monkeypatch.setattr(GradientStore, "write", real_write)

def test_projected_lora_features_of_a_padded_batch_equal_projecting_a_plain_loop():
    model = lora_model()
    task = hf.LanguageModelTask(model)
    tok = CharTokenizer()
    examples = sel.EncodedExamples(tok, rows(6), max_length=32).items
    batch = hf.llm.collate(examples, pad_id=0)
    assert (batch["attention_mask"] == 0).any()
    est = hf.Influence(task, projection=hf.projections.Factorized(48, seed=3)).fit(batch)
    units = est._engines[0].units
    assert {u.kind for u in units} == {"linear"}  # every LoRA matrix takes the hook path
    assert any(u.k < u.numel for u in units)  # and some are really projected
    ref, names = loop_grads(model, task, examples)
    assert names == est._names[0]
    with torch.no_grad():
        projected_ref = est._engines[0].project_flat(ref.float())
    torch.testing.assert_close(est._cache[0].float(), projected_ref, rtol=1e-4, atol=1e-6)
    # the same through the scores: pairwise with a padded test batch == projected loop inner products
    test = examples[:3]
    pair = est.pairwise(hf.llm.collate(test, pad_id=5))
    torch.testing.assert_close(torch.from_numpy(pair), (projected_ref[:3] @ projected_ref.T).double(), rtol=1e-4, atol=1e-8)


def test_padding_and_prompt_token_labels_do_not_change_a_score():
    model = lora_model()
    task = hf.LanguageModelTask(model)
    tok = CharTokenizer()
    examples = sel.EncodedExamples(tok, rows(4), max_length=32).items
    target = hf.llm.collate(sel.EncodedExamples(tok, rows(2, seed=9), max_length=32).items)
    proj = hf.projections.Factorized(32, seed=1)
    base = hf.Influence(task, projection=proj).fit(hf.llm.collate(examples, pad_id=0))
    # a longer, differently padded batch, and prompt labels that are masked anyway
    long = {**examples[0], "input_ids": torch.cat([examples[0]["input_ids"]] * 3),
            "attention_mask": torch.ones(3 * len(examples[0]["input_ids"]), dtype=torch.long),
            "labels": torch.cat([examples[0]["labels"]] * 3)}
    padded = {k: v[:4] for k, v in hf.llm.collate(examples + [long], pad_id=7).items()}
    assert padded["input_ids"].shape[1] > hf.llm.collate(examples)["input_ids"].shape[1]
    other = hf.Influence(task, projection=proj).fit(padded)
    s0, s1 = base.influence(hf.targets.Utility(target)), other.influence(hf.targets.Utility(target))
    torch.testing.assert_close(torch.from_numpy(s1), torch.from_numpy(s0), rtol=1e-6, atol=1e-12)
    # the prompt tokens' ids DO matter (they are the context) but prompt labels do not: labels are -100 there
    assert (padded["labels"][:, :2] == -100).all()


def _config(**kw):
    return sel.SelectionConfig(**{"fraction": 0.25, "warmup_fraction": 0.5, "warmup_epochs": 2, "lr": 1e-2, "lora_r": 2,
                                  "lora_alpha": 4, "projection_dim": 32, "batch_size": 4, "max_length": 32, "seed": 0, **kw})


def test_resumed_selection_equals_uninterrupted(tmp_path, monkeypatch):
    tok = CharTokenizer()
    pool, targets = rows(16, seed=1), rows(3, seed=2, task="a") + rows(3, seed=3, task="b")
    full = sel.select(tiny_llama(dtype=torch.float32), tok, pool, targets, tmp_path / "full", _config())
    assert len(full.indices) == 4 and set(full.task_scores) == {"a", "b"}
    np.testing.assert_array_equal(full.scores, np.maximum(full.task_scores["a"], full.task_scores["b"]))
    assert full.scores[full.indices].min() >= np.delete(full.scores, full.indices).max()
    # simulate a kill during featurization: fail after two store batches, then rerun the same call
    select_killed_at_third_store_write(monkeypatch, tok, pool, targets, tmp_path / "resumed")
    meta = json.loads((tmp_path / "resumed" / "store" / "meta.json").read_text())
    assert meta["complete"] is False
    # and lose the last warm-up checkpoint too: the warm-up resumes from epoch 0's file
    (tmp_path / "resumed" / "warmup" / "ckpt1.pt").unlink()
    shutil.rmtree(tmp_path / "resumed" / "store")
    again = sel.select(tiny_llama(dtype=torch.float32), tok, pool, targets, tmp_path / "resumed", _config())
    np.testing.assert_array_equal(again.indices, full.indices)
    np.testing.assert_allclose(again.scores, full.scores, rtol=1e-5)


def test_resumed_store_equals_uninterrupted(tmp_path, monkeypatch):
    tok = CharTokenizer()
    pool, targets = rows(16, seed=1), rows(3, seed=2, task="a")
    full = sel.select(tiny_llama(dtype=torch.float32), tok, pool, targets, tmp_path / "full", _config())
    select_killed_at_third_store_write(monkeypatch, tok, pool, targets, tmp_path / "resumed")
    again = sel.select(tiny_llama(dtype=torch.float32), tok, pool, targets, tmp_path / "resumed", _config())
    a = GradientStore.open_existing(tmp_path / "full" / "store")
    b = GradientStore.open_existing(tmp_path / "resumed" / "store")
    for m in range(len(a.dims)):
        torch.testing.assert_close(b.rows(m, 0, b.n), a.rows(m, 0, a.n), rtol=0, atol=0)
    np.testing.assert_array_equal(again.indices, full.indices)


def test_cosine_and_dot_scores_match_a_direct_computation(tmp_path):
    tok = CharTokenizer()
    pool, targets = rows(12, seed=1), rows(3, seed=2, task="a")
    cfg = _config(similarity="dot", projection_dim=10_000)  # large enough: nothing projected, exact gradients
    model = sel.add_lora(tiny_llama(dtype=torch.float64), cfg)
    result = sel.select(model, tok, pool, targets, tmp_path / "dot", cfg)
    # independent: load each checkpoint's adapter, loop over examples with autograd
    task = hf.LanguageModelTask(model)
    pool_ex = sel.EncodedExamples(tok, pool, 32).items
    val_ex = sel.EncodedExamples(tok, targets, 32).items
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    dot, cos = np.zeros(len(pool)), np.zeros(len(pool))
    for path, lr in zip(result.checkpoints, result.lrs):
        with torch.no_grad():
            for k, v in torch.load(path, weights_only=True)["adapter"].items():
                named[k].copy_(v)
        g, _ = loop_grads(model, task, pool_ex)
        v, _ = loop_grads(model, task, val_ex)
        dot += lr * (g @ v.T).mean(1).numpy()
        cos += lr * ((g / g.norm(dim=1, keepdim=True)) @ (v / v.norm(dim=1, keepdim=True)).T).mean(1).numpy()
    np.testing.assert_allclose(result.task_scores["a"], dot, rtol=1e-6)
    cos_result = sel.select(tiny_llama(dtype=torch.float64), tok, pool, targets, tmp_path / "cos", _config(projection_dim=10_000))
    np.testing.assert_allclose(cos_result.task_scores["a"], cos, rtol=1e-6)


def test_a_work_folder_is_bound_to_its_pool_and_model(tmp_path):
    """Warm-up checkpoints are never reused for another pool or base model, and a model whose
    adapter a selection trained in place is not the start of another one."""
    tok = CharTokenizer()
    pool, targets = rows(12, seed=1), rows(3, seed=2, task="a")
    first = tiny_llama(dtype=torch.float32)
    sel.select(first, tok, pool, targets, tmp_path / "w", _config())
    (tmp_path / "w" / "store").rename(tmp_path / "old-store")  # as if killed after the warm-up
    fixed = [dict(r) for r in pool]
    fixed[3]["response"] = "changed"
    with pytest.raises(ValueError, match="pool: saved .* the pool or the model changed"):
        sel.select(tiny_llama(dtype=torch.float32), tok, fixed, targets, tmp_path / "w", _config())
    with pytest.raises(ValueError, match="model: saved"):
        sel.select(tiny_llama(seed=1, dtype=torch.float32), tok, pool, targets, tmp_path / "w", _config())
    with pytest.raises(ValueError, match="trained in place by an earlier selection"):
        sel.select(first, tok, pool, targets, tmp_path / "other", _config())
    with pytest.raises(ValueError, match="adapter of rank 2, and lora_r is 4"):
        sel.select(first, tok, pool, targets, tmp_path / "other", _config(lora_r=4))
    again = sel.select(first, tok, pool, targets, tmp_path / "w", _config())  # the same folder: resumed
    assert len(again.indices) == 3


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="fraction must be in"):
        sel.SelectionConfig(fraction=5).validate()
    bad = tmp_path / "pool.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="pool.jsonl:1 has no string field"):
        sel.read_jsonl(bad)
    with pytest.raises(ValueError, match="target row 0 has no string 'task'"):
        sel.select(tiny_llama(), CharTokenizer(), rows(4), rows(1), tmp_path / "w", _config())


def test_balanced_selection_gives_each_task_its_share_of_its_best_examples():
    rng = np.random.default_rng(0)
    scores = {"b": rng.normal(size=40), "a": rng.normal(size=40) + 5.0}  # "a" dominates every max
    picked = sel.balanced_top(scores, 0.25)
    assert len(picked) == 10 and len(set(picked.tolist())) == 10
    assert set(sel.top_fraction(np.maximum(scores["a"], scores["b"]), 0.25).tolist()) == set(np.argsort(-scores["a"])[:10].tolist())
    # independent rule: a greedy loop over the two tasks in name order
    taken = []
    for turn in range(10):
        t = ("a", "b")[turn % 2]
        taken.append(next(int(i) for i in np.argsort(-scores[t], kind="stable") if int(i) not in taken))
    assert picked.tolist() == taken
    with pytest.raises(ValueError, match="combine must be one of"):
        sel.SelectionConfig(combine="mean").validate()


def _save_tiny_model(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    tiny_llama(dtype=torch.float32, tie=True).save_pretrained(folder)  # tied LM head, as SmolLM2


def _word_rows(n, seed, task=None):
    rng = np.random.default_rng(seed)
    return [{"prompt": " ".join(f"w{j}" for j in rng.integers(0, 20, 3)), "response": " ".join(f"w{j}" for j in rng.integers(20, 36, 2)),
             **({"task": task} if task else {})} for _ in range(n)]


def test_select_command_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from hessfree.cli import app

    _save_tiny_model(tmp_path / "model")
    pool, targets = _word_rows(20, 1), _word_rows(3, 2, "t1") + _word_rows(2, 3, "t2")
    for name, rs in (("pool", pool), ("target", targets)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    args = ["select", "--pool", str(tmp_path / "pool.jsonl"), "--target", str(tmp_path / "target.jsonl"),
            "--model", str(tmp_path / "model"), "--fraction", "0.2", "--out", str(tmp_path / "selected.jsonl"),
            "--warmup-fraction", "0.5", "--warmup-epochs", "2", "--dim", "64", "--batch-size", "4", "--lr", "0.01"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "selected 4 of 20 pool examples" in result.output
    out = [json.loads(line) for line in (tmp_path / "selected.jsonl").read_text().splitlines()]
    assert len(out) == 4
    # the same in Python, from the same work folder (reused, not recomputed): same rows and scores
    model, tok = sel.load_model(tmp_path / "model")
    py = sel.select(model, tok, pool, targets, tmp_path / "selected.jsonl.work",
                    sel.SelectionConfig(fraction=0.2, warmup_fraction=0.5, warmup_epochs=2, projection_dim=64, batch_size=4, lr=0.01))
    assert [r["hessfree_index"] for r in out] == py.indices.tolist()
    for r in out:
        assert {k: r[k] for k in ("prompt", "response")} == {k: pool[r["hessfree_index"]][k] for k in ("prompt", "response")}
        assert r["hessfree_score"] == pytest.approx(py.scores[r["hessfree_index"]])
    bad = CliRunner().invoke(app, args[:6] + [str(tmp_path / "nope"), *args[7:]])
    assert bad.exit_code == 2 and "is not a folder" in bad.output
    # the LoRA options: another rank and targets in a new folder; targets the model lacks are named
    other = args[:10] + [str(tmp_path / "r4.jsonl"), *args[11:], "--lora-r", "4", "--lora-targets", "q_proj,k_proj"]
    assert CliRunner().invoke(app, other).exit_code == 0
    assert json.loads((tmp_path / "r4.jsonl.work" / "config.json").read_text())["lora_targets"] == ["q_proj", "k_proj"]
    bad = CliRunner().invoke(app, args[:10] + [str(tmp_path / "c.jsonl"), *args[11:], "--lora-targets", "c_attn"])
    assert bad.exit_code != 0 and "lora_targets ['c_attn'] name no layer of this model" in bad.output


def test_optimizer_aware_scores_equal_a_direct_adam_computation(tmp_path):
    tok = CharTokenizer()
    pool, targets = rows(12, seed=1), rows(3, seed=2, task="a")
    cfg = _config(similarity="dot", projection_dim=10_000, optimizer_aware=True)  # nothing projected: exact
    model = sel.add_lora(tiny_llama(dtype=torch.float64), cfg)
    result = sel.select(model, tok, pool, targets, tmp_path / "adam", cfg)
    task = hf.LanguageModelTask(model)
    pool_ex = sel.EncodedExamples(tok, pool, 32).items
    val_ex = sel.EncodedExamples(tok, targets, 32).items
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = np.zeros(len(pool))
    for path, lr in zip(result.checkpoints, result.lrs):
        saved = torch.load(path, weights_only=True)
        with torch.no_grad():
            for k, v in saved["adapter"].items():
                named[k].copy_(v)
        g, names = loop_grads(model, task, pool_ex)
        v, _ = loop_grads(model, task, val_ex)
        # AdamW's own next step on a copy, one example at a time: its update / lr is the direction
        dirs = []
        for i in range(len(pool_ex)):
            params = [torch.nn.Parameter(named[n].detach().clone()) for n in names]
            opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)
            opt.load_state_dict(copy.deepcopy(saved["optimizer"]))  # step() updates the moments in place
            opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"] = 1.0, 0.0
            start = 0
            for p in params:
                p.grad = g[i, start : start + p.numel()].reshape(p.shape).clone()
                start += p.numel()
            before = [p.detach().clone() for p in params]
            opt.step()
            dirs.append(torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, params)]))
        expected += lr * (torch.stack(dirs) @ v.T).mean(1).numpy()
    np.testing.assert_allclose(result.task_scores["a"], expected, rtol=1e-6)
    plain = sel.select(sel.add_lora(tiny_llama(dtype=torch.float64), cfg), tok, pool, targets, tmp_path / "plain",
                       _config(similarity="dot", projection_dim=10_000))
    assert not np.allclose(plain.task_scores["a"], expected, rtol=1e-3)  # the preconditioning changes the scores
