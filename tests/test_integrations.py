"""From a transformers.Trainer run to TracIn-CP members: checkpoint-N folders (a tied-embedding
Llama and a peft LoRA adapter), the learning rates the callback records, and the trainer_state.json
fallback, against checkpoints loaded by hand and rates computed from the schedule's formula."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import hessfree as hf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
load_file = pytest.importorskip("safetensors.torch").load_file

VOCAB, LR, STEPS, SAVE = 48, 0.05, 6, 2


def llama(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=tie)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def lora_llama(alpha: int = 4):
    lora = peft.LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(llama(tie=False, seed=1), lora)


def rows(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (6,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 3] = -100  # a prompt of 1-3 tokens carries no loss
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


TRAIN, TEST = rows(8, seed=1), rows(3, seed=2)


def schedule_rate(step: int) -> float:
    """The rate optimizer step ``step`` (1-based) uses under lr_scheduler_type="linear" without
    warm-up: LR * (1 - (step - 1) / STEPS), the scheduler having moved step - 1 times."""
    return LR * (STEPS - (step - 1)) / STEPS


def interval_mean(n: int) -> float:
    return sum(schedule_rate(s) for s in range(n - SAVE + 1, n + 1)) / SAVE


def train(model, out, callback: bool = True, **kw):
    settings = dict(
        output_dir=str(out), use_cpu=True, report_to=[], save_strategy="steps", save_steps=SAVE, max_steps=STEPS,
        per_device_train_batch_size=4, learning_rate=LR, lr_scheduler_type="linear", logging_steps=1,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    args = transformers.TrainingArguments(**{**settings, **kw})
    callbacks = [hf.integrations.TrainerCallback()] if callback else []
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TRAIN, callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tied")
    model = llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return out, train(model, out)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return out, train(lora_llama(), out)


def reference_pairwise(models_and_rates) -> torch.Tensor:
    """sum_c lr_c g_test(theta_c) . g_train(theta_c), with gradients of the mean next-token NLL over
    the labelled tokens (written out here in float64) from a plain autograd loop, one example at a time."""
    total = torch.zeros(len(TEST), len(TRAIN), dtype=torch.float64)
    for model, lr in models_and_rates:
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]

        def grad(row):
            logits = model(input_ids=row["input_ids"].unsqueeze(0)).logits[0, :-1]
            target, keep = row["input_ids"][1:], row["labels"][1:] != -100
            loss = -torch.log_softmax(logits, -1)[torch.arange(len(target)), target][keep].mean()
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

        g_train = torch.stack([grad(r) for r in TRAIN])
        g_test = torch.stack([grad(r) for r in TEST])
        total += lr * g_test @ g_train.T
    return total


def pairwise(model, members) -> torch.Tensor:
    est = hf.Influence(hf.LanguageModelTask(model), members=members).fit(hf.llm.collate(TRAIN))
    return torch.from_numpy(est.pairwise(hf.llm.collate(TEST)))


def by_hand_tied(folder):
    model = llama(tie=True, seed=5).double()  # other initial weights: every value must come from the file
    result = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys  # tied, saved once
    return model


def by_hand_lora(folder):
    model = lora_llama().double()
    result = peft.set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    return model


def test_callback_records_the_rate_of_every_step_and_their_mean_per_checkpoint(tied_run):
    out, trainer = tied_run
    for n in (2, 4, 6):
        rec = json.loads((out / f"checkpoint-{n}" / "hessfree_lr.json").read_text())
        assert rec["steps"] == [n - 1, n] and rec["checkpoint_step"] == n and rec["problem"] is None
        assert rec["learning_rates"] == pytest.approx([schedule_rate(n - 1), schedule_rate(n)], rel=1e-12)
        assert rec["learning_rate"] == pytest.approx(interval_mean(n), rel=1e-12)
    # the rate transformers logs at each step (logging_steps=1) is the same rate
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert [logged[s] for s in range(1, STEPS + 1)] == pytest.approx([schedule_rate(s) for s in range(1, STEPS + 1)])
    ck = hf.members.Checkpoints.from_trainer(out)
    assert ck.steps == [2, 4, 6] and ck.lr_sources == ["hessfree_lr.json"] * 3
    assert ck.lrs == pytest.approx([interval_mean(n) for n in (2, 4, 6)], rel=1e-12)


def test_from_trainer_tied_llama_equals_checkpoints_loaded_by_hand(tied_run):
    out, _ = tied_run
    hand = [(by_hand_tied(out / f"checkpoint-{n}"), interval_mean(n)) for n in (2, 4, 6)]
    expected = reference_pairwise(hand)
    live = llama(tie=True, seed=7).double()
    got = pairwise(live, hf.members.Checkpoints.from_trainer(out))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the tied model's own state_dict() names the embedding twice (model.embed_tokens.weight, lm_head.weight):
    # read as the same values as the folder, one entry per parameter
    for n, (model, _) in zip((2, 4, 6), hand):
        state = model.state_dict()
        assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
        got = hf.members.load_checkpoint(state, live)
        params = dict(model.named_parameters())
        assert set(got) == set(params) and all(torch.equal(got[k], params[k]) for k in params)
        from_folder = hf.members.load_checkpoint(out / f"checkpoint-{n}", live)
        assert set(from_folder) == set(params) and all(torch.equal(from_folder[k].double(), params[k]) for k in params)


def test_from_trainer_lora_adapters_equal_adapters_loaded_with_peft(lora_run):
    out, _ = lora_run
    files = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    lrs = [interval_mean(n) for n in (2, 4, 6)]
    expected = reference_pairwise([(by_hand_lora(out / f"checkpoint-{n}"), lr) for n, lr in zip((2, 4, 6), lrs)])
    assert expected.abs().max() > 0
    live = lora_llama().double()
    got = pairwise(live, hf.members.Checkpoints.from_trainer(out))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the folder, the adapter file itself and its tensors as a state dict (peft's saved keys) all give the
    # adapter values peft loads, under the model's own names (with the adapter name), and nothing else
    for n in (2, 4, 6):
        folder = out / f"checkpoint-{n}"
        adapter = {k: p for k, p in by_hand_lora(folder).named_parameters() if p.requires_grad}
        assert adapter and all(".default." in k for k in adapter)
        for source in (folder, folder / "adapter_model.safetensors", load_file(str(folder / "adapter_model.safetensors"))):
            got = hf.members.load_checkpoint(source, live)
            assert set(got) == set(adapter) and all(torch.equal(got[k].double(), adapter[k]) for k in adapter)


def test_adapter_trained_with_another_lora_alpha_or_on_a_plain_model_is_refused(lora_run):
    out, _ = lora_run
    folder = out / "checkpoint-2"
    other = lora_llama(alpha=8).double()  # same keys and shapes, twice the adapter's scale
    with pytest.raises(ValueError, match=r"lora_alpha=4 but the model's adapter 'default' has lora_alpha=8"):
        pairwise(other, hf.members.Checkpoints([folder]))
    with pytest.raises(ValueError, match="is a peft adapter but the model is a LlamaForCausalLM, not a peft.PeftModel"):
        pairwise(llama(tie=False, seed=1).double(), hf.members.Checkpoints([folder]))


def test_trainer_state_log_history_gives_the_same_rates_and_a_gap_is_refused(tied_run, tmp_path):
    out, _ = tied_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for n in (2, 4, 6):
        (copy / f"checkpoint-{n}" / "hessfree_lr.json").unlink()
    ck = hf.members.Checkpoints.from_trainer(copy)
    assert ck.lr_sources == ["trainer_state.json"] * 3
    assert ck.lrs == pytest.approx([interval_mean(n) for n in (2, 4, 6)], rel=1e-12)
    # logged every other step only: the mean over steps 3..4 is unknown
    state_file = copy / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"] = [e for e in state["log_history"] if e.get("step") != 3]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"checkpoint-4: .* 1 of the 2 steps 3..4 \(missing e.g. step 3\).*TrainerCallback.*lrs="):
        hf.members.Checkpoints.from_trainer(copy)
    # transformers before 4.51 logged the rate of the step after the logged one: not used
    config_file = copy / "checkpoint-2" / "config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), transformers_version="4.50.3")))
    with pytest.raises(ValueError, match=r"checkpoint-2: trainer_state.json comes from transformers 4.50, .*fixed in 4.51"):
        hf.members.Checkpoints.from_trainer(copy)
    given = hf.members.Checkpoints.from_trainer(copy, lrs=[0.3, 0.2, 0.1])
    assert given.lrs == [0.3, 0.2, 0.1] and given.steps == [2, 4, 6]
    with pytest.raises(FileNotFoundError, match="holds no checkpoint-N folder"):
        hf.members.Checkpoints.from_trainer(tmp_path / "run" / "checkpoint-2")


def test_callback_refuses_to_average_parameter_groups_with_different_rates(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    cb = hf.integrations.TrainerCallback()
    p, q = torch.zeros(1), torch.zeros(1)
    opt = SimpleNamespace(param_groups=[{"lr": 0.1, "params": [p]}, {"lr": 0.1, "params": [q]}])
    args, control = SimpleNamespace(output_dir=str(tmp_path)), None
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    cb.on_train_begin(args, state, control)
    for step, lrs in ((1, (0.1, 0.1)), (2, (0.1, 0.01))):
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lrs
        cb.on_step_begin(args, state, control, optimizer=opt)
        state.global_step = step
        cb.on_step_end(args, state, control, optimizer=opt)
    cb.on_save(args, state, control)
    rec = json.loads((folder / "hessfree_lr.json").read_text())
    assert rec["learning_rate"] is None and rec["learning_rates"] == [0.1, None]
    assert rec["group_learning_rates"] == {"2": [0.1, 0.01]}
    with pytest.raises(ValueError, match=r"checkpoint-2: no single learning rate .* different learning rates at step 2.*lrs="):
        hf.members.Checkpoints.from_trainer(tmp_path)


def test_callback_with_gradient_accumulation_records_one_rate_per_optimizer_step(tmp_path):
    train(llama(tie=True), tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ck = hf.members.Checkpoints.from_trainer(tmp_path)
    assert ck.steps == [2, 4, 6] and ck.lrs == pytest.approx([interval_mean(n) for n in (2, 4, 6)], rel=1e-12)
    rec = json.loads((tmp_path / "checkpoint-6" / "hessfree_lr.json").read_text())
    assert rec["steps"] == [5, 6] and rec["learning_rates"] == pytest.approx([schedule_rate(5), schedule_rate(6)])
