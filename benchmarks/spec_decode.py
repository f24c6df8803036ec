"""Speculative decoding benchmark: tokens/s at batch 1 of each kuberft speculator against plain
greedy decoding and against Hugging Face assisted generation with the same draft model, in one
run, on models trained here on Python source files from the standard library.

    .venv/bin/python benchmarks/spec_decode.py            # trains (a few minutes), then measures
    .venv/bin/python benchmarks/spec_decode.py --quick    # smaller models, fewer prompts (a smoke run)

What it builds (cached in --work-dir, reused by later runs unless --retrain; --retrain-heads
trains only the heads again):
- target: a character-level Llama (hidden 512, 8 layers, ~25M parameters), trained briefly
  on the standard library's source;
- draft: a small Llama (hidden 128, 2 layers, ~0.4M parameters), trained on the same text and
  then on the target's own greedy continuations (so it learns to agree with the target);
- heads: a chain of 6 speculation heads (EAGLE-style: the target's last hidden state and the
  token it emits), self-distilled on the target's greedy continuations of 512 training prompts
  (`kuberft_serve.heads.train_heads`).

Measured: each method decodes the same held-out prompts greedily (temperature 0); methods take
turns prompt by prompt so machine noise hits them alike. Output of every method is compared
token for token with plain decoding. Printed: tokens/s, speedup over plain decoding and over HF
assisted generation, acceptance rate, mean tokens per verification step, the cost ratio c of a
draft step to a target step (for transformers' forward, which HF assisted generation runs, and
for kuberft's own), the measured verify cost v = T(k+1 tokens)/T(1 token) of kuberft's target
pass, and the theoretical speedup for the observed acceptance (Leviathan et al. 2023, Thm 3.8:
(1 - a^(k+1)) / ((1 - a)(k c + 1)), and the same with the measured verify cost in place of 1).
On the CPU kuberft runs its own lean forward of the target and the draft (`lean_llama.py`), so
its plain decoding is faster than transformers' too; the ratios "vs plain" are against it.

On a CPU, decode is dominated by reading the weights and by per-pass overhead, so speculation
pays off through fewer target passes; the target is large enough that its pass costs clearly
more than the draft's. Goal (issue 6): >= 2x over plain decoding, >= 1.2x over HF assisted
generation, 100 % equal outputs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for folder in ("operator", "trainer_image", "serve_image"):
    sys.path.insert(0, str(ROOT / folder))

from kuberft_core.api import ModelSpec, SpeculatorSpec  # noqa: E402
from kuberft_core.models import DEFAULT_ALPHABET, build_tiny_model  # noqa: E402
from kuberft_serve.config import ServeConfig  # noqa: E402
from kuberft_serve.heads import HEADS_FORMAT, train_heads  # noqa: E402
from kuberft_serve.loading import build_engine  # noqa: E402
from kuberft_serve.sampling import SamplingParams  # noqa: E402

SIZES = {
    "full": {"target": dict(hidden_size=512, num_layers=8, intermediate_size=1536, num_heads=8, num_kv_heads=4),
             "draft": dict(hidden_size=128, num_layers=2, intermediate_size=384, num_heads=4, num_kv_heads=2)},
    "quick": {"target": dict(hidden_size=256, num_layers=4, intermediate_size=768, num_heads=4, num_kv_heads=2),
              "draft": dict(hidden_size=64, num_layers=1, intermediate_size=192, num_heads=4, num_kv_heads=2)},
}


# --------------------------------------------------------------------------- data
def stdlib_corpus() -> tuple[str, str]:
    """(training text, held-out text) from the standard library's top-level modules."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    allowed = set(DEFAULT_ALPHABET)
    train, held_out = [], []
    for index, path in enumerate(files):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = "".join(c for c in text if c in allowed)
        (held_out if index % 10 == 0 else train).append(text)
    return "\n".join(train), "\n".join(held_out)


def windows(ids: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def train_lm(model, batches, steps: int, lr: float, label: str) -> None:
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    started = time.monotonic()
    for step in range(steps):
        batch = batches()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"  {label} step {step + 1}/{steps}: loss {loss.item():.3f} ({time.monotonic() - started:.0f}s)", flush=True)
    model.eval().requires_grad_(False)


def prompt_at_line(text: str, rng: random.Random, length: int) -> str:
    start = rng.randrange(0, len(text) - length)
    start = text.index("\n", start) + 1
    return text[start : start + length]


# --------------------------------------------------------------------------- models
def build_models(args, work: Path) -> tuple[Path, Path, Path, list[str]]:
    sizes = SIZES["quick" if args.quick else "full"]
    train_text, held_out = stdlib_corpus()
    target_dir, draft_dir, heads_dir = work / "target", work / "draft", work / "heads"
    rng = random.Random(0)
    eval_prompts = [prompt_at_line(held_out, rng, args.prompt_chars) for _ in range(args.prompts)]
    models_cached = (draft_dir / "config.json").is_file() and not args.retrain
    heads_cached = models_cached and heads_current(heads_dir) and not args.retrain_heads
    if heads_cached:
        print(f"reusing trained models in {work} (--retrain to train all again, --retrain-heads the heads)")
        return target_dir, draft_dir, heads_dir, eval_prompts

    from transformers import AutoTokenizer

    if not models_cached:
        train_target_and_draft(args, sizes, train_text, target_dir, draft_dir)
    else:
        print(f"reusing the trained target and draft in {work}; training the heads")
    # the heads learn from the target's own greedy continuations of training prompts
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    rng = random.Random(2)
    head_prompts = [tokenizer.encode(prompt_at_line(train_text, rng, args.prompt_chars)) for _ in range(args.head_prompts)]
    plain = build_engine(ServeConfig(model=ModelSpec(name=str(target_dir), dtype="float32"), speculator=SpeculatorSpec(type="none"),
                                     device="cpu", max_batch_size=64))
    started = time.monotonic()
    heads = train_heads(plain, head_prompts, num_heads=args.heads, max_new_tokens=args.max_new_tokens, epochs=args.head_epochs)
    heads.save(heads_dir, base_model=str(target_dir))
    print(f"  heads trained on {len(head_prompts)} prompts ({time.monotonic() - started:.0f}s)")
    return target_dir, draft_dir, heads_dir, eval_prompts


def heads_current(heads_dir: Path) -> bool:
    """Whether heads_dir holds heads in the format kuberft loads now (older ones are retrained)."""
    meta = heads_dir / "heads.json"
    return meta.is_file() and json.loads(meta.read_text()).get("format") == HEADS_FORMAT


def train_target_and_draft(args, sizes: dict, train_text: str, target_dir: Path, draft_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_model(target_dir, **sizes["target"], seed=0, max_positions=2048)
    build_tiny_model(draft_dir, **sizes["draft"], seed=1, max_positions=2048)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    print(f"corpus: {ids.numel():,} characters of standard-library Python for training")
    generator = torch.Generator().manual_seed(0)

    target = AutoModelForCausalLM.from_pretrained(target_dir)
    train_lm(target, lambda: windows(ids, 8, 128, generator), args.target_steps, 2e-3, "target")
    target.save_pretrained(target_dir)

    # the target's own greedy continuations of training prompts: what the draft learns to agree with
    rng = random.Random(1)
    distill_prompts = [tokenizer.encode(prompt_at_line(train_text, rng, args.prompt_chars)) for _ in range(args.distill_prompts)]
    plain = build_engine(ServeConfig(model=ModelSpec(name=str(target_dir), dtype="float32"), speculator=SpeculatorSpec(type="none"),
                                     device="cpu", max_batch_size=32))
    started = time.monotonic()
    continuations = plain.generate_batch(distill_prompts, [SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)] * len(distill_prompts))
    print(f"  target wrote {sum(map(len, continuations)):,} tokens for distillation ({time.monotonic() - started:.0f}s)")
    distilled = [torch.tensor(p + c) for p, c in zip(distill_prompts, continuations)]

    draft = AutoModelForCausalLM.from_pretrained(draft_dir)
    train_lm(draft, lambda: windows(ids, 16, 128, generator), args.draft_steps, 3e-3, "draft (corpus)")

    def distill_batch():
        picks = torch.randint(0, len(distilled), (16,), generator=generator).tolist()
        width = min(len(distilled[i]) for i in picks)
        return torch.stack([distilled[i][:width] for i in picks])

    train_lm(draft, distill_batch, args.draft_steps, 2e-3, "draft (target's outputs)")
    draft.save_pretrained(draft_dir)


# --------------------------------------------------------------------------- measuring
def theoretical_speedup(alpha: float, k: float, c: float, verify_cost: float = 1.0) -> float:
    if alpha >= 1.0:
        return (k + 1) / (k * c + verify_cost)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + verify_cost))


def forward_ms(model, n: int, context: int = 160, reps: int = 20) -> float:
    """Median time of one cached forward pass of n tokens after `context` tokens."""
    from transformers import DynamicCache

    ids = torch.randint(4, 90, (1, context + n))
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            cache = DynamicCache(config=model.config)
            model(ids[:, :context], cache=cache, use_cache=True)
            start = time.perf_counter()
            model(ids[:, context:], cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def runner_ms(runner, n: int, context: int = 160, reps: int = 20) -> float:
    """The same for an engine's model runner (the kuberft draft runs its own lean forward)."""
    from kuberft_serve.kv_batch import SequenceBatch

    ids = torch.randint(4, 90, (1, context + n))
    times = []
    for _ in range(reps):
        batch = SequenceBatch(runner)
        batch.prefill([ids[0, :context].tolist()], pad_id=0)
        start = time.perf_counter()
        batch.extend(ids[:, context:])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and few prompts: a smoke run, not the goal")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kuberft-spec-bench"), help="where trained models are cached")
    parser.add_argument("--retrain", action="store_true", help="train the models again even if cached (target, draft and heads)")
    parser.add_argument("--retrain-heads", action="store_true", help="train only the heads again (reusing the cached target and draft)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings on a shared machine)")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts decoded per method")
    parser.add_argument("--prompt-chars", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=16, help="most tokens proposed per step (kuberft speculators)")
    parser.add_argument("--heads", type=int, default=6, help="links of the heads chain to train (tokens proposed per step)")
    parser.add_argument("--target-steps", type=int, default=120)
    parser.add_argument("--draft-steps", type=int, default=300)
    parser.add_argument("--distill-prompts", type=int, default=64)
    parser.add_argument("--head-prompts", type=int, default=512, help="training prompts the target continues for the heads")
    parser.add_argument("--head-epochs", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.target_steps, args.draft_steps, args.distill_prompts, args.head_prompts = 3, 40, 60, 16, 32
        args.work_dir = args.work_dir.with_name(args.work_dir.name + "-quick")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir, draft_dir, heads_dir, prompts_text = build_models(args, args.work_dir)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompts = [tokenizer.encode(p) for p in prompts_text]
    greedy = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)

    def engine(speculator: str):
        return build_engine(ServeConfig(
            model=ModelSpec(name=str(target_dir), dtype="float32"),
            speculator=SpeculatorSpec(type=speculator, draft_model=str(draft_dir), heads_path=str(heads_dir),
                                      num_speculative_tokens=args.heads if speculator == "heads" else args.k),
            device="cpu", max_batch_size=1,
        ))

    engines = {"plain (kuberft, no speculator)": engine("none"), "kuberft ngram": engine("ngram"),
               "kuberft draft": engine("draft"), "kuberft heads": engine("heads")}
    hf_target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()

    def run_engine(e, ids):
        return e.generate(ids, greedy)

    def run_hf(ids, assistant=None):
        kwargs = {"assistant_model": assistant} if assistant is not None else {}
        out = hf_target.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **kwargs)
        tokens = out[0, len(ids):].tolist()
        return tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_token_id else tokens

    methods = {name: (lambda ids, e=e: run_engine(e, ids)) for name, e in engines.items()}
    methods["HF generate (plain greedy)"] = lambda ids: run_hf(ids)
    methods["HF assisted generation (same draft)"] = lambda ids: run_hf(ids, hf_draft)

    print(f"\ntransformers {transformers.__version__}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{len(prompts)} held-out prompts x {args.max_new_tokens} new tokens, greedy, batch 1")
    for fn in methods.values():  # warm-up
        fn(prompts[0][:32])
    for e in engines.values():
        e.stats = dict.fromkeys(e.stats, 0)
    seconds = dict.fromkeys(methods, 0.0)
    tokens = dict.fromkeys(methods, 0)
    equal = dict.fromkeys(methods, 0)
    for ids in prompts:
        reference = None
        for name, fn in methods.items():
            start = time.perf_counter()
            out = fn(ids)
            seconds[name] += time.perf_counter() - start
            tokens[name] += len(out)
            reference = out if reference is None else reference
            equal[name] += out == reference

    rate = {name: tokens[name] / seconds[name] for name in methods}
    plain_rate = rate["plain (kuberft, no speculator)"]
    hf_assisted = rate["HF assisted generation (same draft)"]
    target_1 = forward_ms(hf_target, 1)
    draft_1 = forward_ms(hf_draft, 1)
    c = draft_1 / target_1
    # what kuberft runs (its own lean forward on the CPU), measured the same way
    target_runner = engines["kuberft draft"].target_runner
    draft_runner = engines["kuberft draft"].speculator.runner
    kuberft_target_1 = runner_ms(target_runner, 1)
    kuberft_draft_1 = runner_ms(draft_runner, 1)
    c_kuberft = kuberft_draft_1 / kuberft_target_1
    print(f"\ntransformers (HF): target pass {target_1:.2f} ms, draft pass {draft_1:.2f} ms: c = {c:.3f}")
    print(f"kuberft ({type(target_runner).__name__} / {type(draft_runner).__name__}): target pass {kuberft_target_1:.2f} ms, "
          f"draft pass {kuberft_draft_1:.2f} ms: c = {c_kuberft:.3f}")
    print(f"\n{'method':38s} {'tok/s':>8s} {'vs plain':>9s} {'vs HF-assist':>12s} {'equal':>6s} {'accept':>7s} {'tok/step':>8s} {'k':>5s} {'theory':>7s} {'theory(v)':>9s}")
    for name in methods:
        line = f"{name:38s} {rate[name]:8.1f} {rate[name] / plain_rate:8.2f}x {rate[name] / hf_assisted:11.2f}x {equal[name]:>3d}/{len(prompts):<2d}"
        e = engines.get(name)
        if e is not None and e.speculating and e.stats["spec_steps"]:
            s = e.stats
            alpha = s["accepted"] / s["proposed"] if s["proposed"] else 0.0
            k = s["proposed"] / s["spec_steps"]
            per_step = s["emitted"] / s["steps"]
            cost = c_kuberft if name == "kuberft draft" else 0.0
            verify = runner_ms(target_runner, round(k) + 1) / kuberft_target_1
            # acceptance per proposed token of a geometric model that gives the observed tokens per step
            a_geo = geometric_alpha(per_step, k)
            line += f" {alpha:6.1%} {per_step:8.2f} {k:5.2f} {theoretical_speedup(a_geo, k, cost):6.2f}x {theoretical_speedup(a_geo, k, cost, verify):8.2f}x"
            line += f"   (v={verify:.2f})"
        print(line)
    best = max((n for n in engines if n != "plain (kuberft, no speculator)"), key=rate.get)
    print(f"\nbest kuberft speculator: {best}: {rate[best] / plain_rate:.2f}x plain decoding (goal 2x), "
          f"{rate[best] / hf_assisted:.2f}x HF assisted generation (goal 1.2x)")
    draft_rate = rate["kuberft draft"]
    print(f"same draft model: kuberft draft {draft_rate / hf_assisted:.2f}x HF assisted generation")
    all_equal = all(equal[n] == len(prompts) for n in methods)
    print(f"outputs equal to plain greedy decoding: {'all' if all_equal else 'NOT all'} "
          f"({sum(equal.values())}/{len(prompts) * len(methods)} runs)")
    return 0


def geometric_alpha(tokens_per_step: float, k: float) -> float:
    """The per-token acceptance a with (1 - a^(k+1)) / (1 - a) = tokens_per_step (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        expected = (k + 1) if mid >= 1 else (1 - mid ** (k + 1)) / (1 - mid)
        low, high = (mid, high) if expected < tokens_per_step else (low, mid)
    return (low + high) / 2


if __name__ == "__main__":
    sys.exit(main())
