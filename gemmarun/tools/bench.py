"""Speed benchmark: prefill, time to first token, decode, load time and peak memory, side by side
with transformers and llama.cpp (llama-cpp-python) on the same weights, in one run.

Each engine runs in its own subprocess so load time and peak RSS are its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Measurement:
    engine: str
    weights: str  # what is stored: fp32, bf16, int8, int4, Q8_0, ...
    weight_mb: float  # bytes read per decoded token (every weight once)
    load_s: float
    peak_rss_mb: float
    prefill_tok_s: float  # a prompt of `prefill` tokens
    ttft_s: float  # first token of the decode run's prompt (spec["decode_after"] tokens, 32 by default)
    decode_tok_s: float  # tokens after the first, in that run


def memory_bandwidth_gbs(threads: int, mb: int = 1024) -> float:
    """Read bandwidth: the faster of summing a buffer far larger than the caches and a float32
    matrix-vector product over it (a single-thread sum alone is compute-bound here), best of 5."""
    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4)
    w, v = x.view(-1, 4096), torch.ones(4096)
    best = float("inf")
    for op in (x.sum, lambda: w @ v):
        for _ in range(6):
            t = time.perf_counter()
            op()
            best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent
    across fork + exec, so a worker would report the orchestrator's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(1000, min(vocab, 200000), (n - 1,), generator=g).tolist()


# ----------------------------------------------------------------------------------- workers


def run_gemmarun(spec: dict) -> Measurement:
    import gemmarun
    from gemmarun.quant import packed_bytes

    t = time.perf_counter()
    lm = gemmarun.load(spec["model"], dtype=spec.get("dtype"), quantize=spec.get("quantize"), context=spec["context"],
                       compile=spec.get("compile", False), cache_dtype=spec.get("cache_dtype"))  # fmt: skip
    load_s = time.perf_counter() - t
    vocab = lm.config.vocab_size
    long = _ids(spec["prefill"], vocab, 1)
    t = time.perf_counter()
    lm.generate(long[:16], max_new_tokens=2, ignore_eos=True)  # warm up the kernels and caches
    if spec.get("compile"):
        load_s += time.perf_counter() - t  # compiling is part of getting ready (the decode run below reuses the graph)
    t = time.perf_counter()
    lm.generate(long, max_new_tokens=1, ignore_eos=True)
    prefill = len(long) / (time.perf_counter() - t)
    short = _ids(spec.get("decode_after", 32), vocab, 2)
    t = time.perf_counter()
    stamps = []
    for _ in lm.generator.run([short], gemmarun.SamplingParams(max_new_tokens=spec["decode"] + 1, ignore_eos=True)):
        stamps.append(time.perf_counter())
    ttft = stamps[0] - t
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    label = spec.get("label") or spec.get("quantize") or str(lm.model.dtype).removeprefix("torch.")
    if spec.get("cache_dtype"):
        label += f", {spec['cache_dtype']} cache"
    return Measurement("gemmarun", label, packed_bytes(lm.model) / 2**20, load_s, _peak_rss_mb(), prefill, ttft, decode)


def run_transformers(spec: dict) -> Measurement:
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="eager").eval()
    load_s = time.perf_counter() - t
    vocab = model.config.vocab_size
    long = torch.tensor([_ids(spec["prefill"], vocab, 1)])
    short = torch.tensor([_ids(32, vocab, 2)])
    kw = dict(do_sample=False, eos_token_id=[], pad_token_id=0)
    with torch.no_grad():
        model.generate(short[:, :8], max_new_tokens=2, **kw)
        t = time.perf_counter()
        model(long)
        prefill = long.shape[1] / (time.perf_counter() - t)
        t = time.perf_counter()
        model.generate(short, max_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(short, max_new_tokens=spec["decode"] + 1, **kw)
        decode = spec["decode"] / (time.perf_counter() - t - ttft)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return Measurement("transformers", spec["dtype"], nbytes / 2**20, load_s, _peak_rss_mb(), prefill, ttft, decode)


def _last_logits(llm):
    """The last evaluated token's logits. `Llama.scores` is only written with logits_all=True (and
    has n_batch rows), so they are read from the context's output buffer, as llama.cpp's sampler does."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def run_llamacpp(spec: dict) -> Measurement:
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=spec["model"], n_ctx=spec["context"], n_threads=spec["threads"], n_batch=512,
                n_threads_batch=spec["threads"], verbose=False)  # fmt: skip
    load_s = time.perf_counter() - t
    vocab = llm.n_vocab()
    long = _ids(spec["prefill"], vocab, 1)
    short = _ids(spec.get("decode_after", 32), vocab, 2)
    llm.eval(long[:16])
    llm.reset()
    t = time.perf_counter()
    llm.eval(long)
    prefill = len(long) / (time.perf_counter() - t)
    llm.reset()
    t = time.perf_counter()
    llm.eval(short)
    tok = int(_last_logits(llm).argmax())
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(spec["decode"]):
        llm.eval([tok])
        tok = int(_last_logits(llm).argmax())
    decode = spec["decode"] / (time.perf_counter() - t)
    return Measurement("llama.cpp", spec["label"], os.path.getsize(spec["model"]) / 2**20, load_s, _peak_rss_mb(), prefill, ttft, decode)


WORKERS = {"gemmarun": run_gemmarun, "transformers": run_transformers, "llama.cpp": run_llamacpp}


def measure(engine: str, spec: dict, timeout: float = 1800) -> Measurement | str:
    """Run one engine in a fresh process; a string says why it could not be measured."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    cmd = [sys.executable, "-m", "gemmarun.tools.bench", "--worker", engine, json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if r.returncode != 0:
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        return lines[-1][:160] if lines else f"exit code {r.returncode}"
    return Measurement(**json.loads(r.stdout.strip().splitlines()[-1]))


def table(rows: list[Measurement], bandwidth_gbs: float, baseline: Measurement | None) -> str:
    head = ("| engine | weights | MB/token | load s | peak RSS MB | prefill tok/s | TTFT s | decode tok/s "
            "| % of ceiling | vs transformers bf16 |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for m in rows:
        ceiling = bandwidth_gbs * 1e9 / (m.weight_mb * 2**20)
        ratio = f"{m.decode_tok_s / baseline.decode_tok_s:.1f}x" if baseline else "-"
        lines.append(
            f"| {m.engine} | {m.weights} | {m.weight_mb:.0f} | {m.load_s:.1f} | {m.peak_rss_mb:.0f} | "
            f"{m.prefill_tok_s:.1f} | {m.ttft_s:.2f} | {m.decode_tok_s:.2f} | {100 * m.decode_tok_s / ceiling:.0f}% | {ratio} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ suites


# GGUF types made by llama.cpp's own quantizer (llama-quantize's code, through llama-cpp-python)
# from the F16 file: the tensor mix llama.cpp users get, e.g. the tied embedding kept at Q6_K in Q4_0.
LLAMA_QUANTIZE = {"Q4_0 (llama-quantize)": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def _gguf_name(gguf_type: str) -> str:
    return f"gemma-2-2b-{gguf_type.replace(' (llama-quantize)', '-llama-quantize')}.gguf"


def _llama_quantize(src: Path, path: Path, ftype: str, log) -> Path | None:
    """llama.cpp's own quantization of `src`, or None (logged) without llama-cpp-python or on failure."""
    import importlib.util

    if path.exists():
        return path
    if importlib.util.find_spec("llama_cpp") is None:
        log(f"skipping {path.name}: llama-cpp-python is not installed (pip install -e '.[bench]')")
        return None
    log(f"quantizing {src.name} to {path.name} with llama.cpp (once)")
    code = ("import ctypes, sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); "
            f"p.ftype = l.{ftype}; p.nthread = 2; "
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))")  # fmt: skip
    partial = path.with_suffix(".partial")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(partial)], capture_output=True, text=True)
    if r.returncode != 0:  # the row is skipped, as a failed measurement is
        log(f"  skipped: llama.cpp could not quantize {src.name}: {(r.stderr.strip().splitlines() or ['?'])[-1][:160]}")
        return None
    partial.rename(path)
    return path


def _current_layout(path: Path, scheme: str) -> bool:
    """Whether a cached `gemmarun quantize` copy has the tensor layout quantising gives today."""
    import json

    from safetensors import safe_open

    from ..quant import METADATA_KEY, scheme_for

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        schemes = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    bits = {"int8": 8, "int6": 6, "int4": 4}[scheme_for("model.embed_tokens.weight", scheme)]
    return schemes.get("model.embed_tokens", {}).get("bits") == bits


def gemma2_2b_files(folder: Path, gguf_types: tuple[str, ...], log=print, schemes: tuple[str, ...] = ()) -> dict[str, Path]:
    """The random-weight gemma-2-2b checkpoint (bf16 safetensors + tokenizer), GGUF copies of the
    same weights and `gemmarun quantize` copies (int8, int4), made once and cached. The tokenizer is
    Gemma 3's vocabulary cut to Gemma 2's size (speed does not depend on which pieces the ids stand for)."""
    from ..model.config import PRESETS
    from ..tokenizer import Tokenizer
    from ..weights.gguf import read_gguf
    from ..weights.source import default_model_path
    from .random_checkpoint import write_random_checkpoint

    config = PRESETS["gemma-2-2b"]
    hf = folder / "gemma-2-2b-random"
    fields = None
    if not (hf / "model.safetensors.index.json").exists():
        log(f"creating a random-weight gemma-2-2b checkpoint in {hf} (once)")
        write_random_checkpoint(config, hf, dtype=torch.bfloat16)
    if not (hf / "tokenizer.model").exists() or any(not (folder / _gguf_name(t)).exists() for t in gguf_types):
        meta = read_gguf(default_model_path()).metadata
        fields = {k: (v[: config.vocab_size] if isinstance(v, list) and len(v) > config.vocab_size else v)
                  for k, v in meta.items() if k.startswith("tokenizer.ggml.")}  # fmt: skip
        fields.pop("tokenizer.ggml.eot_token_id", None)
        tok = Tokenizer.from_gguf_fields(fields)
        (hf / "tokenizer.model").write_bytes(tok._engine.sp.serialized_model_proto())
    paths = {"hf": hf}
    for t in gguf_types:
        path = folder / _gguf_name(t)
        if t in LLAMA_QUANTIZE:
            made = _llama_quantize(paths["F16"], path, LLAMA_QUANTIZE[t], log)
            if made is not None:
                paths[t] = made
            continue
        if not path.exists():
            from ..weights.gguf.writer import write_gguf
            from ..weights.loader import load_folder_weights

            log(f"writing {path.name} (once)")
            _, model = load_folder_weights(hf, torch.float32, torch.device("cpu"))
            state = {k: v for k, v in model.state_dict().items()}
            write_gguf(path.with_suffix(".partial"), config, state, tokenizer_fields=fields, qtype=t)
            path.with_suffix(".partial").rename(path)
            del model, state
        paths[t] = path
    # Loaded as users would after `gemmarun quantize`, like llama.cpp's GGUF files (not calibrated:
    # speed does not depend on the values).
    for scheme in schemes:
        path = folder / f"gemma-2-2b-{scheme}"
        if not (path / "model.safetensors").exists() or not _current_layout(path, scheme):
            import shutil

            from ..lm import load
            from ..quant import save_quantized

            log(f"writing {path.name} (once)")
            shutil.rmtree(path.with_suffix(".partial"), ignore_errors=True)
            save_quantized(load(hf, quantize=scheme), path.with_suffix(".partial"))
            shutil.rmtree(path, ignore_errors=True)
            path.with_suffix(".partial").rename(path)
        paths[scheme] = path
    return paths


def run_suite(specs: list[tuple[str, dict]], threads: int, log=print) -> tuple[list[Measurement], float]:
    bandwidth = memory_bandwidth_gbs(threads)
    log(f"memory read bandwidth with {threads} threads: {bandwidth:.1f} GB/s")
    rows = []
    for engine, spec in specs:
        spec = dict(spec, threads=threads)
        log(f"measuring {engine} {spec.get('label') or spec.get('quantize') or spec.get('dtype')} ...")
        m = measure(engine, spec)
        if isinstance(m, str):
            log(f"  skipped: {m}")
        else:
            log(f"  prefill {m.prefill_tok_s:.1f} tok/s, decode {m.decode_tok_s:.2f} tok/s, peak {m.peak_rss_mb:.0f} MB")
            rows.append(m)
    return rows, bandwidth


def specs_for(shape: str | None, model: str | None, engines: set[str], prefill: int, decode: int, cache: Path, log=print,
              compile: bool = False, cache_dtype: str | None = None):  # fmt: skip
    """The engine runs of one suite: the gemma-2-2b shape, or one model file against llama.cpp.
    compile adds gemmarun in bfloat16 decoding through torch.compile (dense weights only; a packed
    file is decoded to bfloat16 for it). cache_dtype: every gemmarun row's KV cache dtype."""
    specs = _suite(shape, model, engines, dict(prefill=prefill, decode=decode, context=max(prefill, 32 + decode) + 8), cache, log, compile)
    if cache_dtype in (None, "auto"):
        return specs
    return [(e, dict(s, cache_dtype=cache_dtype) if e == "gemmarun" else s) for e, s in specs]


def _suite(shape: str | None, model: str | None, engines: set[str], run: dict, cache: Path, log, compile: bool):
    """specs_for's runs, each engine's as it comes (`run`: the lengths every run shares)."""
    eager = dict(dtype="bfloat16", quantize="none", label="bfloat16")
    compiled = dict(eager, compile=True, label="bfloat16 compiled")
    specs = []
    if shape == "gemma-2-2b":
        # Q4_0 from gguf-py: every matrix at Q4_0; llama-quantize's Q4_0 keeps the tied embedding / LM
        # head at Q6_K, as gemmarun's int4 keeps it at 6 bits.
        gguf_types = ("F16", "Q8_0", "Q4_0", "Q4_0 (llama-quantize)") if "llama.cpp" in engines else ()
        schemes = ("int8", "int4") if "gemmarun" in engines else ()
        files = gemma2_2b_files(cache, gguf_types, log, schemes)
        hf = str(files["hf"])
        if "gemmarun" in engines:
            specs += [("gemmarun", dict(run, model=hf, dtype="float32")), ("gemmarun", dict(run, model=hf, dtype="bfloat16")),
                      ("gemmarun", dict(run, model=str(files["int8"]), label="int8")),
                      ("gemmarun", dict(run, model=str(files["int4"]), label="int4 g32"))]  # fmt: skip
            if compile:
                specs.insert(2, ("gemmarun", dict(run, model=hf, **compiled)))
        if "transformers" in engines:
            specs += [("transformers", dict(run, model=hf, dtype="bfloat16")), ("transformers", dict(run, model=hf, dtype="float32"))]
        for t in gguf_types:
            if t in files:
                specs.append(("llama.cpp", dict(run, model=str(files[t]), label=t)))
        return specs
    if shape is not None:
        raise ValueError(f"unknown shape {shape!r}; the benchmark knows gemma-2-2b")
    from ..weights.source import resolve

    path = resolve(model)
    if "gemmarun" in engines:
        specs.append(("gemmarun", dict(run, model=str(path), label="as stored" if path.suffix == ".gguf" else None)))
        if compile:  # beside its eager twin, which a packed file's own row is not
            specs.append(("gemmarun", dict(run, model=str(path), **eager)))
            specs.append(("gemmarun", dict(run, model=str(path), **compiled)))
    if "llama.cpp" in engines and path.suffix == ".gguf":
        specs.append(("llama.cpp", dict(run, model=str(path), label=path.name)))
    return specs


def report(title: str, shape: str | None, model: str | None, engines: set[str], threads: int, prefill: int, decode: int,
           compile: bool = False, cache_dtype: str | None = None) -> str:  # fmt: skip
    """Run one suite and return its markdown section (progress goes to stderr)."""
    from ..weights.source import cache_dir
    from .host import describe

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    specs = specs_for(shape, model, engines, prefill, decode, cache_dir() / "bench", log, compile, cache_dtype)
    rows, bandwidth = run_suite(specs, threads, log)
    base = next((m for m in rows if m.engine == "transformers" and m.weights == "bfloat16"), None)
    return (f"### {title}\n{describe(engines)}\nmemory read bandwidth {bandwidth:.1f} GB/s, {threads} threads; prefill {prefill} tokens; "
            f"decode {decode} tokens after a 32-token prompt\n\n{table(rows, bandwidth, base)}")  # fmt: skip


def _worker_main(engine: str, spec: str) -> None:
    torch.set_num_threads(json.loads(spec)["threads"])
    print(json.dumps(asdict(WORKERS[engine](json.loads(spec)))))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m gemmarun.tools.bench --worker ENGINE SPEC (use `gemmarun bench` or benchmarks/speed.py)")
