"""hf.apps.attribute on a tiny randomly initialised Llama (built from a config, no download),
checked against a plain autograd loop over the checkpoints, with its own tokenisation."""

import json

import numpy as np
import pytest
import torch

import hessfree as hf
from hessfree.apps import attribution as attr
from hessfree.store import GradientStore

transformers = pytest.importorskip("transformers")

VOCAB = 40
LRS = [0.3, 0.2, 0.1]


class CharTokenizer:
    """One id per character (ids 3..), BOS 1, EOS 2, PAD 0."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + chars(text)}


def chars(text):
    return [3 + (ord(c) % (VOCAB - 3)) for c in text]


def word_tokenizer():
    """A real transformers tokenizer over the words w0..w35 (WordLevel, whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")  # fmt: skip


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).to(torch.float64).eval()


TRAIN = [
    {"prompt": "ab", "response": "xy"},
    {"text": "hello"},
    {"instruction": "cd", "input": "e", "output": "z"},
    {"prompt": "abc", "response": "xyz"},
    {"instruction": "fg", "output": "yx"},
    {"prompt": "ba", "response": "yy"},
    {"text": "xyzzy"},
    {"prompt": "h", "response": "zzx"},
]
QUERIES = [{"prompt": "ab", "response": "xz"}, {"instruction": "cd", "output": "zy"}, {"text": "yxz"}]


def expected_tokens(row):
    """The ids and labels attribute should build for a row (CharTokenizer, no chat template)."""
    if "text" in row:
        prompt, response = [1], chars(row["text"]) + [2]
    elif "instruction" in row:
        head = f"### Instruction:\n{row['instruction']}\n\n"
        head += f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
        prompt, response = [1] + chars(head + "### Response:\n"), chars(row["output"]) + [2]
    else:
        prompt, response = [1] + chars(row["prompt"]), chars(row["response"]) + [2]
    return torch.tensor(prompt + response), torch.tensor([-100] * len(prompt) + response)


def token_losses(model, row):
    """Per-response-token negative log-likelihoods (nats), with a plain forward pass."""
    ids, labels = expected_tokens(row)
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], -1)
    target = labels[1:]
    keep = target != -100
    return -logp[torch.arange(len(target)), target.clamp_min(0)][keep]


def grad_of(model, loss, retain=False):
    params = [p for _, p in model.named_parameters()]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=retain)])


def grads_by_name(model, loss):
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, [p for _, p in model.named_parameters()])))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attr")
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    gen = torch.Generator().manual_seed(5)
    for c in range(3):  # three "checkpoints": the model with different perturbations
        sd = {k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
              for k, v in base.items()}
        torch.save(sd, folder / f"ckpt{c}.pt")
        paths.append(folder / f"ckpt{c}.pt")
    write(folder / "train.jsonl", TRAIN)
    write(folder / "queries.jsonl", QUERIES)
    write(folder / "more.jsonl", [QUERIES[1], {"prompt": "zz", "response": "ab"}])
    return {"folder": folder, "model": model, "paths": paths, "tok": CharTokenizer()}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def at_checkpoint(setup, c):
    m = tiny_llama()
    m.load_state_dict(torch.load(setup["paths"][c], weights_only=True))
    return m


def direct(setup, queries, reduction="mean", project=None):
    """terms[c, j, i] = lr_c * g_train_i(theta_c) . g_query_j(theta_c), by a plain loop."""
    reduce = (lambda v: v.mean()) if reduction == "mean" else (lambda v: v.sum())
    terms = np.zeros((3, len(queries), len(TRAIN)))
    for c in range(3):
        m = at_checkpoint(setup, c)
        flat = (lambda loss: grad_of(m, loss)) if project is None else (lambda loss: project(c, grads_by_name(m, loss)))
        gt = torch.stack([flat(reduce(token_losses(m, r))) for r in TRAIN])
        gq = torch.stack([flat(reduce(token_losses(m, r))) for r in queries])
        terms[c] = LRS[c] * (gq.double() @ gt.double().T).numpy()
    return terms


def run(setup, out, queries="queries.jsonl", **kw):
    kw = {"tokenizer": setup["tok"], "checkpoints": setup["paths"], "lrs": LRS, "k": 3, "projection_dim": None,
          "batch_size": 4, "hessian": "identity", **kw}
    f = setup["folder"]
    return attr.attribute(setup["model"], f / "train.jsonl", [f / q for q in np.atleast_1d(queries)], out, **kw)


def test_exact_top_k_scores_member_terms_and_order_equal_a_direct_loop(setup, tmp_path):
    # the training file mixes prompt/response, text and Alpaca rows, tokenised independently above
    (report,) = run(setup, tmp_path / "out")
    terms = direct(setup, QUERIES)
    total = terms.sum(0)
    assert len(report.records) == len(QUERIES)
    for j, rec in enumerate(report.records):
        order = np.argsort(-total[j], kind="stable")[:3]
        assert [t["train_index"] for t in rec["top"]] == order.tolist()
        assert [t["rank"] for t in rec["top"]] == [1, 2, 3]
        for t in rec["top"]:
            i = t["train_index"]
            assert t["score"] == pytest.approx(total[j, i], rel=1e-4, abs=1e-9)
            np.testing.assert_allclose(t["member_scores"], terms[:, j, i], rtol=1e-4, atol=1e-9)
            assert t["std"] == pytest.approx(np.std(terms[:, j, i], ddof=1), rel=1e-4, abs=1e-9)
            assert t["train_line"] == i + 1
        assert rec["query_index"] == j and rec["k"] == 3 and rec["hessian"] is None
    assert report.records[2]["query_text"] == "yxz"
    assert report.records[1]["top"][0]["train_text"] in {"ab\nxy", "hello", "cd\n\ne\nz", "abc\nxyz", "fg\nyx", "ba\nyy",
                                                         "xyzzy", "h\nzzx"}  # fmt: skip
    # the files hold the same records; the markdown names each query and the top rows
    lines = [json.loads(x) for x in report.jsonl.read_text().splitlines()]
    assert lines == report.records and report.jsonl.name == "queries.attribution.jsonl"
    md = report.markdown.read_text()
    assert "## Query 2 (line 3)" in md and f"| 1 | {report.records[0]['top'][0]['train_index']} |" in md


def test_projected_scores_equal_the_loop_projected_with_the_same_matrices(setup, tmp_path):
    out = tmp_path / "out"
    (report,) = run(setup, out, projection_dim=24, k=len(TRAIN), reduction="sum", per_token=True)
    members = hf.members.Checkpoints(setup["paths"], lrs=LRS)
    task = hf.LanguageModelTask(setup["model"], reduction="sum")
    est = hf.Influence(task, members=members, projection=hf.projections.Factorized(24, seed=0), store=out / "store").fit()
    maps = [est.feature_map(c) for c in range(3)]
    assert maps[0].dim < sum(p.numel() for p in setup["model"].parameters())  # really projected

    def project(c, grads):
        names = est.param_names(c)
        return maps[c].project_flat(torch.cat([grads[n].reshape(-1) for n in names]).float()).double()

    terms = direct(setup, QUERIES, reduction="sum", project=project)
    for j, rec in enumerate(report.records):
        assert [t["train_index"] for t in rec["top"]] == np.argsort(-terms.sum(0)[j], kind="stable").tolist()
        got = {t["train_index"]: t for t in rec["top"]}
        for i in range(len(TRAIN)):
            assert got[i]["score"] == pytest.approx(terms[:, j, i].sum(), rel=1e-4, abs=1e-8)
            np.testing.assert_allclose(got[i]["member_scores"], terms[:, j, i], rtol=1e-4, atol=1e-8)
            # reduction="sum": each token weighs 1 in the query loss, and the token scores add up to the score
            assert sum(x["score"] for x in got[i]["tokens"]) == pytest.approx(got[i]["score"], rel=1e-4, abs=1e-8)


def test_per_token_scores_sum_to_the_score_and_equal_token_gradients(setup, tmp_path):
    reduction = "mean"  # ("sum": the projected test below checks the token sums)
    (report,) = run(setup, tmp_path / "out", k=2, per_token=True, reduction=reduction)
    # direct, per checkpoint: the gradient of each training loss and of each query token's loss l_t
    agg = (lambda v: v.mean()) if reduction == "mean" else (lambda v: v.sum())
    g_train, g_tok = [], []
    for c in range(3):
        m = at_checkpoint(setup, c)
        g_train.append(torch.stack([grad_of(m, agg(token_losses(m, r))) for r in TRAIN]))
        g_tok.append([torch.stack([grad_of(m, loss, retain=True) for loss in token_losses(m, q)]) for q in QUERIES])
    for j, rec in enumerate(report.records):
        ids, labels = expected_tokens(QUERIES[j])
        n_tok = int((labels[1:] != -100).sum())
        w = 1.0 / n_tok if reduction == "mean" else 1.0  # the token's weight in the query loss
        for t in rec["top"]:
            toks = t["tokens"]
            assert [x["position"] for x in toks] == [p for p in range(1, len(ids)) if labels[p] != -100]
            assert [x["token_id"] for x in toks] == [int(ids[x["position"]]) for x in toks]
            assert sum(x["score"] for x in toks) == pytest.approx(t["score"], rel=1e-4, abs=1e-9)
            # sum_c lr_c g_train(theta_c) . grad(w_t l_t)(theta_c)
            want = sum(LRS[c] * w * (g_tok[c][j] @ g_train[c][t["train_index"]]).numpy() for c in range(3))
            np.testing.assert_allclose([x["score"] for x in toks], want, rtol=1e-4, atol=1e-9)
    assert "per response token" in report.markdown.read_text()


def test_a_second_query_file_reuses_the_stored_training_gradients(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (first,) = run(setup, out)
    writes, featurized = [], []
    real_write, real_featurize = GradientStore.write, hf.Influence._featurize
    monkeypatch.setattr(GradientStore, "write", lambda self, *a, **k: writes.append(1) or real_write(self, *a, **k))

    def counting(self, view, names, source, what, *a, **k):
        featurized.append(what)
        return real_featurize(self, view, names, source, what, *a, **k)

    monkeypatch.setattr(hf.Influence, "_featurize", counting)
    (second,) = run(setup, out, queries="more.jsonl")
    assert writes == [] and "training" not in featurized  # no training gradient computed again
    assert featurized  # (the counter does see the query features)
    assert second.jsonl.name == "more.attribution.jsonl" and first.jsonl.exists()
    assert second.records[0]["top"] == first.records[1]["top"]  # the shared query: the same result
    terms = direct(setup, [{"prompt": "zz", "response": "ab"}])
    top = second.records[1]["top"]
    assert [t["train_index"] for t in top] == np.argsort(-terms.sum(0)[0], kind="stable")[:3].tolist()
    assert [t["score"] for t in top] == pytest.approx([terms.sum(0)[0, t["train_index"]] for t in top], rel=1e-4)
    # another k or per_token is not refused and reads the same store
    (third,) = run(setup, out, k=5, per_token=True)
    assert writes == [] and "training" not in featurized and len(third.records[0]["top"]) == 5


def test_changed_settings_are_refused_by_name_before_any_work(setup, tmp_path, monkeypatch):
    out, f = tmp_path / "out", setup["folder"]
    run(setup, out)
    edited = tmp_path / "train.jsonl"
    write(edited, [*TRAIN[:-1], {"prompt": "h", "response": "zzy"}])
    featurized, real_fit = [], hf.Influence.fit
    monkeypatch.setattr(hf.Influence, "fit", lambda self, *a, **k: featurized.append(1) or real_fit(self, *a, **k))
    for change, named in [
        ({"projection_dim": 16}, "projection_dim"),
        ({"lrs": [0.3, 0.2, 0.2]}, "lrs"),
        ({"reduction": "sum"}, "reduction"),
        ({"max_length": 60}, "max_length"),
        ({"seed": 1}, "seed"),
        ({"model": tiny_llama(seed=1)}, "model"),
        ({"checkpoints": setup["paths"][:2], "lrs": LRS[:2]}, "checkpoints"),
        ({"train": edited}, "train_file_sha256"),
    ]:
        args = {"tokenizer": setup["tok"], "checkpoints": setup["paths"], "lrs": LRS, "k": 3, "projection_dim": None,
                "batch_size": 4, **change}
        model, train = args.pop("model", setup["model"]), args.pop("train", f / "train.jsonl")
        with pytest.raises(attr.AttributionSettingsError, match=rf"{named}: saved .* vs now .*use a new out_dir"):
            attr.attribute(model, train, f / "queries.jsonl", out, **args)
    assert featurized == []  # (k, per_token and the query files may change: see the store-reuse test)


def test_chat_template_formats_prompts_as_a_user_turn(setup):
    class Templated(CharTokenizer):
        chat_template = "<user>{}</user>"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            assert messages[0]["role"] == "user" and not tokenize and add_generation_prompt
            return f"<u>{messages[0]['content']}<a>"

    tok = Templated()
    template = attr.chat_template(tok)
    rows = attr.read_examples(setup["folder"] / "train.jsonl", template)
    assert [r.kind for r in rows[:3]] == ["prompt/response", "text", "alpaca"]
    assert rows[0].prompt == "<u>ab<a>" and rows[2].prompt == "<u>cd\n\ne<a>" and rows[1].prompt == ""
    enc = attr.encode_example(tok, rows[0], "train.jsonl", 64, templated=True)
    assert enc["input_ids"].tolist() == chars("<u>ab<a>") + chars("xy") + [2]  # the template brings its own specials
    assert enc["labels"].tolist() == [-100] * len("<u>ab<a>") + chars("xy") + [2]
    text = attr.encode_example(tok, rows[1], "train.jsonl", 64, templated=True)
    assert text["input_ids"].tolist() == [1] + chars("hello") + [2]  # plain text: no template, BOS kept
    assert attr.chat_template(CharTokenizer()) is None


def test_bad_inputs_are_named_before_any_work(setup, tmp_path, monkeypatch):
    f = setup["folder"]
    monkeypatch.setattr(hf.Influence, "fit", lambda *a, **k: pytest.fail("work started"))

    def call(**kw):
        args = {"model": setup["model"], "train_file": f / "train.jsonl", "query_files": f / "queries.jsonl",
                "out_dir": tmp_path / "out", "tokenizer": setup["tok"], "checkpoints": setup["paths"], "lrs": LRS, **kw}
        return attr.attribute(**args)

    for kw, match in [
        ({"k": 0}, "k must be a positive integer, got 0"),
        ({"projection_dim": -4}, "projection_dim must be a positive integer, got -4"),
        ({"reduction": "max"}, "reduction must be 'mean' or 'sum', got 'max'"),
        ({"lrs": None}, "lrs= is missing"),
        ({"lrs": [0.1]}, "3 checkpoints but 1 learning rates"),
        ({"tokenizer": None}, "tokenizer= is needed"),
        ({"query_files": [f / "queries.jsonl", tmp_path / "queries.jsonl"]}, "share the name 'queries'"),
        ({"query_files": []}, "query_files is empty"),
        ({"damping_ratio": 0}, "damping_ratio must be a finite number > 0, got 0"),
        ({"damping_ratio": True}, "damping_ratio must be a finite number > 0, got True"),
        ({"damping_ratio": float("inf")}, "damping_ratio must be a finite number > 0, got inf"),
        ({"damping_ratio": 1.0, "hessian": "identity"}, "applies to hessian='fisher' only"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        call(train_file=tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        call(model=tmp_path / "no-model")
    bad = tmp_path / "bad.jsonl"
    for rows, match in [('{"prompt": "a"}\n', r"bad.jsonl:1 has none of the accepted"), ('{"text": "ok"}\nnot json\n', r"bad.jsonl:2 is not valid JSON"),
                        ('{"prompt": "%s", "response": "b"}\n' % ("a" * 300), r"bad.jsonl:1: the prompt has 301 tokens, max_length=256"), ("\n", "has no rows")]:  # fmt: skip
        bad.write_text(rows)
        with pytest.raises(ValueError, match=match):
            call(query_files=bad)
    assert not (tmp_path / "out" / "store").exists()


def test_model_folder_with_an_adapter_and_trainer_checkpoint_folders_equal_a_direct_loop(tmp_path):
    peft = pytest.importorskip("peft")
    tok = word_tokenizer()
    tok.save_pretrained(tmp_path / "base")
    tiny_llama().float().save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    gen = torch.Generator().manual_seed(3)
    for step in (2, 4):  # a Trainer output_dir: checkpoint-N adapter folders
        pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), lora)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        pm.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    rows = [{"prompt": f"w{i} w{i + 1}", "response": f"w{20 + i} w{30 - i}"} for i in range(6)]
    query = [{"prompt": "w1 w2", "response": "w21 w29"}]
    write(tmp_path / "train.jsonl", rows)
    write(tmp_path / "q.jsonl", query)
    lrs = [0.2, 0.05]
    (report,) = attr.attribute(tmp_path / "base", tmp_path / "train.jsonl", tmp_path / "q.jsonl", tmp_path / "out",
                               adapter=tmp_path / "run" / "checkpoint-4", checkpoints=tmp_path / "run", lrs=lrs,
                               k=6, projection_dim=None, batch_size=4, hessian="identity")  # fmt: skip
    # direct: peft's own loading of each adapter, float64 autograd over the LoRA parameters
    total = np.zeros(len(rows))
    for c, step in enumerate((2, 4)):
        base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").double()
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "run" / f"checkpoint-{step}", is_trainable=True).double()
        params = [p for p in pm.parameters() if p.requires_grad]

        def grad(row):
            p_ids = tok(row["prompt"])["input_ids"]
            r_ids = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor(p_ids + r_ids)
            logp = torch.log_softmax(pm(input_ids=ids[None]).logits[0, :-1], -1)
            nll = -logp[torch.arange(len(r_ids)) + len(p_ids) - 1, torch.tensor(r_ids)].mean()
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(nll, params)])

        gq = grad(query[0])
        total += lrs[c] * torch.stack([grad(r) for r in rows]).matmul(gq).detach().numpy()
    top = report.records[0]["top"]
    assert [t["train_index"] for t in top] == np.argsort(-total, kind="stable").tolist()
    np.testing.assert_allclose([t["score"] for t in top], total[[t["train_index"] for t in top]], rtol=2e-4, atol=1e-8)
    with pytest.raises(FileNotFoundError, match="is a peft adapter whose base model"):
        (tmp_path / "run" / "checkpoint-4" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "nowhere"}))
        attr.attribute(tmp_path / "run" / "checkpoint-4", tmp_path / "train.jsonl", tmp_path / "q.jsonl", tmp_path / "o2")


def test_attribute_command_end_to_end_equals_the_library_call(tmp_path):
    """`hessfree attribute` on a model folder with Trainer-style checkpoint folders writes
    the same top-k as hf.apps.attribute (itself checked against a loop above); bad flags
    fail in one line with exit code 2 before any work."""
    from typer.testing import CliRunner

    from hessfree.cli import app

    tok = word_tokenizer()
    tok.save_pretrained(tmp_path / "model")
    base = tiny_llama().float()
    base.save_pretrained(tmp_path / "model")
    gen = torch.Generator().manual_seed(5)
    for step in (1, 2):  # checkpoint-N folders holding full weights
        ck = tiny_llama().float()
        with torch.no_grad():
            for p in ck.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        ck.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    rows = [{"prompt": f"w{i} w{i + 1}", "response": f"w{20 + i} w{30 - i}"} for i in range(6)]
    write(tmp_path / "train.jsonl", rows)
    write(tmp_path / "q.jsonl", [{"prompt": "w1 w2", "response": "w21 w29"}, {"text": "w3 w4 w5"}])
    args = ["attribute", "--model", tmp_path / "model", "--train", tmp_path / "train.jsonl", "--query", tmp_path / "q.jsonl",
            "--checkpoints", tmp_path / "run", "--lr", "0.1", "--k", "4", "--dim", "64", "--out", tmp_path / "cli"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in (tmp_path / "cli" / "q.attribution.jsonl").read_text().splitlines()]
    (ref,) = attr.attribute(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "q.jsonl", tmp_path / "lib",
                            checkpoints=tmp_path / "run", lrs=0.1, k=4, projection_dim=64)  # fmt: skip
    assert len(got) == 2
    for g, r in zip(got, ref.records):
        assert [t["train_index"] for t in g["top"]] == [t["train_index"] for t in r["top"]]
        np.testing.assert_allclose([t["score"] for t in g["top"]], [t["score"] for t in r["top"]], rtol=1e-6)
    again = runner.invoke(app, [str(a) for a in args] + ["--trust"])  # the same store, and the verdict printed
    assert again.exit_code == 0, again.output
    assert "trust, q.jsonl:" in again.output and "Verdict: " in again.output and "retrains nothing" in again.output
    assert (tmp_path / "cli" / "q.trust" / "trust.json").is_file()
    bad = runner.invoke(app, [str(a) for a in args[:-4]] + ["--k", "0"])
    assert bad.exit_code == 2 and "--k" in bad.output
    bad = runner.invoke(app, [str(a) for a in args] + ["--hessian", "Fisher"])
    assert bad.exit_code == 2 and "--hessian 'Fisher' is not one of fisher, identity" in bad.output
    bad = runner.invoke(app, [str(a) for a in args] + ["--hessian", "identity", "--damping-ratio", "1"])
    assert bad.exit_code != 0 and "--damping-ratio 1 applies to --hessian fisher only" in bad.output
    bad = runner.invoke(app, [str(a) for a in args] + ["--exact", "--seed", "3"])  # args hold --dim 64
    assert bad.exit_code != 0 and "--dim --seed sets the projection, and --exact uses exact gradients" in bad.output


@pytest.mark.parametrize("hessian", ["identity", "fisher"])
def test_trust_compares_the_scores_with_the_damped_empirical_fisher_of_a_direct_loop(setup, tmp_path, hessian):
    """``trust=True``: identity and Fisher scores of each query file's mean loss, each equal to numpy
    on loop gradients (F_c = G_c^T G_c / n + lambda_c I, lambda_c = r * trace(G_c^T G_c / n) / D), whichever
    ``hessian`` the attribution itself uses: r = 1, the attribution's damping, with the Fisher, and the
    estimator's default 0.1 when the attribution is plain."""
    from scipy.stats import spearmanr

    (report,) = run(setup, tmp_path / "out", trust=True, hessian=hessian)
    ident, fisher = np.zeros(len(TRAIN)), np.zeros(len(TRAIN))
    for c in range(3):
        m = at_checkpoint(setup, c)
        g = torch.stack([grad_of(m, token_losses(m, r).mean()) for r in TRAIN]).double().numpy()
        q = torch.stack([grad_of(m, token_losses(m, r).mean()) for r in QUERIES]).double().numpy().mean(0)
        gram = g.T @ g / len(TRAIN)
        lam = (1.0 if hessian == "fisher" else 0.1) * np.trace(gram) / gram.shape[0]
        ident += LRS[c] * g @ q
        fisher += LRS[c] * g @ np.linalg.solve(gram + lam * np.eye(gram.shape[0]), q)
    t = report.trust
    np.testing.assert_allclose(t.scores_identity, ident, rtol=1e-5, atol=1e-9 * np.abs(ident).max())
    np.testing.assert_allclose(t.scores_hessian, fisher, rtol=1e-5, atol=1e-9 * np.abs(fisher).max())
    assert t.spearman == pytest.approx(spearmanr(ident, fisher).statistic, abs=1e-9)
    assert t.hessian == "fisher" and t.n_train == len(TRAIN)
    saved = json.loads((tmp_path / "out" / "queries.trust" / "trust.json").read_text())
    assert saved["verdict"] == t.verdict and saved["spearman"] == pytest.approx(t.spearman)
    run(setup, tmp_path / "out", hessian=hessian)  # without the check: no verdict about other scores is left behind
    assert not (tmp_path / "out" / "queries.trust" / "trust.json").exists()


def test_fisher_on_exact_gradients_of_a_large_model_is_refused_before_any_file(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(attr, "FISHER_MAX_DIM", 100)
    with pytest.raises(ValueError, match=r"needs a [\d,]+ x [\d,]+ matrix per checkpoint .*--dim.*--hessian identity"):
        run(setup, tmp_path / "out", hessian="fisher")
    assert not (tmp_path / "out" / "settings.json").exists()
    monkeypatch.setattr(hf.Influence, "fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped")))
    with pytest.raises(RuntimeError, match="stopped"):  # any failure before the store exists frees the folder too
        run(setup, tmp_path / "out", hessian="fisher", projection_dim=24)
    assert not (tmp_path / "out" / "settings.json").exists()
    monkeypatch.undo()
    run(setup, tmp_path / "out", hessian="identity", projection_dim=24)  # the folder is free for other settings


@pytest.mark.parametrize("damping_ratio", [None, 0.3])
def test_fisher_terms_equal_numpy_on_loop_gradients_and_tokens_still_sum(setup, tmp_path, damping_ratio):
    """``hessian="fisher"`` (the default): term_c = lr_c g_i^T F_c^-1 g_q with F_c = G_c^T G_c / n + lambda_c I,
    lambda_c = r * trace(G_c^T G_c / n) / D (r = 1 by default, or ``damping_ratio``), from a plain autograd
    loop; the per-token scores sum to the score."""
    extra = {} if damping_ratio is None else {"damping_ratio": damping_ratio}
    (report,) = run(setup, tmp_path / "out", hessian="fisher", per_token=True, **extra)
    terms, lams = np.zeros((3, len(QUERIES), len(TRAIN))), []
    for c in range(3):
        m = at_checkpoint(setup, c)
        g = torch.stack([grad_of(m, token_losses(m, r).mean()) for r in TRAIN]).double().numpy()
        q = torch.stack([grad_of(m, token_losses(m, r).mean()) for r in QUERIES]).double().numpy()
        gram = g.T @ g / len(TRAIN)
        lam = (damping_ratio or 1.0) * np.trace(gram) / gram.shape[0]
        terms[c] = LRS[c] * q @ np.linalg.solve(gram + lam * np.eye(gram.shape[0]), g.T)
        lams.append(lam)
    total = terms.sum(0)
    plain = direct(setup, QUERIES).sum(0)
    for rec in report.records:  # the settings of the curvature are in every record
        assert rec["hessian"]["method"] == "fisher" and rec["hessian"]["damping_ratio"] == (damping_ratio or 1.0)
        np.testing.assert_allclose(rec["hessian"]["damping"], lams, rtol=1e-5)
    assert f"{lams[0]:.3g} ({damping_ratio or 1.0:g} x mean eigenvalue)" in report.markdown.read_text()
    assert not np.allclose(total, plain, rtol=0.05)  # the curvature changes the scores: the check can fail
    for j, rec in enumerate(report.records):
        assert [t["train_index"] for t in rec["top"]] == np.argsort(-total[j], kind="stable")[:3].tolist()
        for t in rec["top"]:
            i = t["train_index"]
            # the store holds fp32 features and F^-1 amplifies their rounding by up to its condition
            # number: 1e-3 relative, far below the >5% the curvature moves the scores (checked above)
            assert t["score"] == pytest.approx(total[j, i], rel=1e-3, abs=1e-5 * np.abs(total).max())
            np.testing.assert_allclose(t["member_scores"], terms[:, j, i], rtol=1e-3, atol=1e-5 * np.abs(terms).max())
            tokens = [tok["score"] for tok in t["tokens"]]  # fp32 store and F^-1 in fp32: error ~ the terms' size
            assert sum(tokens) == pytest.approx(t["score"], rel=1e-3, abs=1e-4 * sum(abs(x) for x in tokens))
    assert "empirical Fisher" in report.markdown.read_text()


def test_the_consistency_check_allows_float32_rounding_and_finds_other_features(setup, tmp_path, monkeypatch):
    """top_k's float32 products of cancelling terms may miss the float64 member terms by about
    eps * |g| |q| (seen with an ill-conditioned Fisher); a store of other features misses by
    about |g| |q|. The first passes, the second is refused."""
    real = hf.Influence.top_k
    for shift, ok in ((1e-7, True), (1e-2, False)):
        def shifted(self, test, k, largest=True, shift=shift):
            top = real(self, test, k, largest)
            q = self.query_features(test, 0).double().norm(dim=1)
            size = float(q.max()) * float(np.sqrt(self._sqnorms.max())) * float(np.abs(self.member_weights).sum())
            return type(top)(top.indices, top.scores + shift * size)

        monkeypatch.setattr(hf.Influence, "top_k", shifted)
        if ok:
            run(setup, tmp_path / f"ok{shift}")
        else:
            with pytest.raises(RuntimeError, match="the store does not match the model's features"):
                run(setup, tmp_path / f"bad{shift}")
