"""The public Python API: load(), LanguageModel.generate/stream/logits, and pipeline()."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch

from .errors import ContextLengthError, InvalidParameterError
from .generation import core
from .generation.drafts import check_draft_vocabulary
from .generation.generator import Generator
from .generation.sampling import SamplingParams
from .generation.speculative import SpeculativeConfig, Speculator
from .quant import on_kernel
from .weights.loader import load_checkpoint, parse_dtype, warn_dtype
from .weights.source import resolve

Prompt = str | Sequence[int]


class LanguageModel:
    """A loaded model with its tokenizer; what gemmarun.load() returns."""

    def __init__(self, model, tokenizer, config, source: str, context: int | None = None, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        limit = config.max_position_embeddings
        if context is not None and (not isinstance(context, int) or context < 2):
            raise InvalidParameterError(f"context must be an integer >= 2, got {context!r}")
        if context is not None and context > limit:
            raise ContextLengthError(f"context {context} exceeds the model's limit of {limit} tokens")
        self.context = context or limit
        if compile and any(on_kernel(m) for m in model.modules()):
            raise InvalidParameterError(
                "compile applies to models that decode through PyTorch; this one's packed or quantised weights "
                "decode in gemmarun's C++ kernels already (load with quantize='none' / --quantize none to compile)"
            )
        self.generator = Generator(model, tokenizer, self.context, compile=compile)
        self.draft: LanguageModel | None = None  # a draft model of the same vocabulary (load(draft=...))
        self.speculation = SpeculativeConfig()  # what generate/stream use unless told otherwise
        self._speculators: dict[SpeculativeConfig, Speculator] = {}

    def speculator(self, speculate: str | SpeculativeConfig | None = None) -> Speculator | None:
        """The Speculator for `speculate` ("ngram", "model", "off", a SpeculativeConfig; None: the
        loaded default), one per setting so its totals (rounds, drafted, accepted) add up."""
        config = self._speculation(speculate)
        if not config.on:
            return None
        if config not in self._speculators:
            self._speculators[config] = self.new_speculator(config)
        return self._speculators[config]

    def new_speculator(self, speculate: str | SpeculativeConfig | None = None) -> Speculator | None:
        """A Speculator of its own (the engine's thread keeps one), or None when speculation is off."""
        config = self._speculation(speculate)
        return Speculator(config, self.draft.model if self.draft is not None else None) if config.on else None

    def _speculation(self, speculate: str | SpeculativeConfig | None) -> SpeculativeConfig:
        if speculate is None:
            return self.speculation
        if isinstance(speculate, str):
            return SpeculativeConfig(speculate, self.speculation.draft_tokens, self.speculation.ngram)
        return speculate

    def __repr__(self) -> str:
        c = self.config
        return f"LanguageModel({self.source!r}, {c.model_type}, {c.num_hidden_layers} layers, {self.model.dtype})"

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InvalidParameterError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def _batch(self, prompt) -> tuple[list[list[int]], bool]:
        if isinstance(prompt, str) or (len(prompt) and isinstance(prompt[0], int)):
            return [self.encode(prompt)], False
        if isinstance(prompt, Sequence) and len(prompt) == 0:
            raise InvalidParameterError("the prompt is empty")
        return [self.encode(p) for p in prompt], True

    def generate(self, prompt: Prompt | Sequence[Prompt], params: SamplingParams | None = None, speculate=None, **kwargs):
        """A GenerationResult for one prompt, a list of them for a list of prompts (decoded as one batch).
        speculate: "ngram", "model", "off" or a SpeculativeConfig; None uses what load() set."""
        params = params or SamplingParams(**kwargs)
        prompts, batched = self._batch(prompt)
        results = self.generator.generate(prompts, params, self.speculator(speculate))
        return results if batched else results[0]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, speculate=None, **kwargs) -> Iterator[str]:
        """Text pieces of one prompt's continuation as they are decoded (speculate: as for generate)."""
        params = params or SamplingParams(**kwargs)
        prompts, batched = self._batch(prompt)
        if batched:
            raise InvalidParameterError("stream() takes one prompt; use generate() for a batch")
        for events in self.generator.run(prompts, params, self.speculator(speculate)):
            for e in events:
                if e.text:
                    yield e.text

    def logits(self, token_ids: Sequence[int] | torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """float32 logits (T, V) of every position, soft-capped: the scoring path. Tokens beyond
        one chunk (the core's policy unless given) go through a KV cache, chunk by chunk."""
        ids = token_ids if isinstance(token_ids, torch.Tensor) else self.encode(token_ids)
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise InvalidParameterError("logits() takes a non-empty 1-D sequence of token ids")
        t = ids.numel()
        core.check_prompt(t, self.context, self.config.max_position_embeddings, room=0)
        chunk = chunk or core.prefill_chunk_for(self.model)
        from .model.cache import KVCache

        cache = KVCache.for_model(self.model, 1, t) if t > chunk else None  # one chunk needs no cache
        with torch.inference_mode():
            return torch.cat([logits for _, logits in core.score(self.model, cache, ids.tolist(), 0, chunk)])


def load(
    source: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    context: int | None = None,
    quantize: str | None = None,
    group_size: int = 32,
    calibration: str | bool | None = None,
    calibration_tokens: int = 2048,
    compile: bool = False,
    cache_dtype: str | torch.dtype | None = None,
    draft: str | os.PathLike | LanguageModel | None = None,
    speculate: str | None = None,
    draft_tokens: int | None = None,
) -> LanguageModel:
    """Load a checkpoint folder, a .gguf file, a Hugging Face repo id (from the local cache) or,
    with no argument, the default Gemma 3 270M model.

    quantize: None keeps weights as stored (a GGUF's blocks stay packed on CPU); "int8" (per
    channel) or "int4" (groups of `group_size`: 32, 64 or 128) quantise at load; "none" decodes
    a packed file to dense `dtype` weights.
    calibration (int4 only): a text, or True for the built-in one, whose first `calibration_tokens`
    tokens' activations weight the rounding (see gemmarun/calibrate.py). The model is loaded dense
    in float32 first to run them.
    compile: decode through torch.compile with a static cache (dense models: dtype float32 or
    bfloat16, or quantize='none'); generate() and stream() use it, chat and the server do not.
    cache_dtype: the KV cache's dtype, "float16" or "bfloat16" to halve a float32 cache's memory
    and the bytes long contexts read a token; None / "auto": the activations' dtype (exact).
    draft: a smaller model of the same vocabulary (a source as above, or a LanguageModel) that
    drafts tokens for speculative decoding; speculate: "ngram" (prompt lookup, no second model),
    "model" (the draft; the default when one is given) or "off" (the default otherwise);
    draft_tokens: drafts per round at most (generation/speculative.py)."""
    spec = _speculation(speculate, draft, draft_tokens)
    if compile and spec.on:
        raise InvalidParameterError("compile traces one-token decoding steps, speculation verifies several: choose one")
    device = _device(device)
    torch_dtype = parse_dtype(dtype, device)
    cache_dtype = None if cache_dtype in (None, "auto") else parse_dtype(cache_dtype, device, "cache_dtype")
    if group_size not in (32, 64, 128):
        raise InvalidParameterError(f"group_size must be 32, 64 or 128, got {group_size!r}")
    if calibration is not None and calibration is not False:
        if quantize != "int4":
            raise InvalidParameterError(f"calibration applies to quantize='int4', not {quantize!r}")
        if not isinstance(calibration, (str, bool)):
            raise InvalidParameterError("calibration must be a text or True (the built-in text)")
        if not isinstance(calibration_tokens, int) or calibration_tokens < 1:
            raise InvalidParameterError(f"calibration_tokens must be a positive integer, got {calibration_tokens!r}")
    else:
        calibration = None
    path = resolve(source)
    if calibration is None:
        config, model, tokenizer = load_checkpoint(path, torch_dtype, device, quantize, group_size)
    else:
        from .quant.calibrate import importance, quantize_model

        config, model, tokenizer = load_checkpoint(path, torch.float32, device, "none", group_size)
        text = None if calibration is True else calibration
        weights = importance(LanguageModel(model, tokenizer, config, str(path)), text, calibration_tokens)
        quantize_model(model, quantize, group_size, weights)
        for p in model.parameters():  # the norms, still float32
            p.data = p.data.to(torch_dtype)
    warn_dtype(config, torch_dtype)
    model.cache_dtype = cache_dtype
    lm = LanguageModel(model, tokenizer, config, str(path), context, compile=compile)
    if draft is not None:
        lm.draft = draft if isinstance(draft, LanguageModel) else load(draft, dtype=dtype, device=device, cache_dtype=cache_dtype)
        check_draft_vocabulary(lm.tokenizer, lm.draft.tokenizer, lm.draft.source)
    lm.speculation = spec
    return lm


def _speculation(speculate: str | None, draft, draft_tokens: int | None) -> SpeculativeConfig:
    """load()'s speculation arguments, checked before anything is read."""
    method = speculate or ("model" if draft is not None else "off")
    if method == "model" and draft is None:
        raise InvalidParameterError("speculate='model' needs a draft model: load(..., draft=PATH) or --draft-model PATH")
    if draft is not None and method != "model":
        raise InvalidParameterError(f"a draft model was given but speculate is {method!r}; use speculate='model'")
    return SpeculativeConfig(method, draft_tokens if draft_tokens is not None else SpeculativeConfig.draft_tokens)


def _device(device: str | torch.device) -> torch.device:
    """A device that exists on this machine and can hold weights (meta tensors hold none)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameterError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":
        raise InvalidParameterError("device 'meta' holds no data, so nothing can run on it; use cpu or cuda")
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise InvalidParameterError(f"device {device.type!r} is not available on this machine (torch {torch.__version__})")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise InvalidParameterError(f"device {device} does not exist: this machine has {count} {device.type} device(s)")
    return device


class TextGenerationPipeline:
    """transformers-style `pipeline("text-generation")`: returns [{"generated_text": ...}]."""

    def __init__(self, model: LanguageModel):
        self.model = model

    def __call__(self, inputs, max_new_tokens: int = 128, do_sample: bool = False, return_full_text: bool = True, **kw):
        if not do_sample:
            kw["temperature"] = 0.0
        elif kw.get("temperature", 0) == 0:
            kw["temperature"] = 1.0
        params = SamplingParams(max_new_tokens=max_new_tokens, **kw)
        if _is_chat(inputs):
            text = self.model.tokenizer.render_chat(list(inputs))
            out = self.model.generate(text, params)
            return [{"generated_text": [*inputs, {"role": "assistant", "content": out.text}]}]
        if isinstance(inputs, str):
            out = self.model.generate(inputs, params)
            return [{"generated_text": (inputs if return_full_text else "") + out.text}]
        outs = self.model.generate(list(inputs), params)
        return [[{"generated_text": (p if return_full_text else "") + o.text}] for p, o in zip(inputs, outs)]


def _is_chat(inputs) -> bool:
    return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and isinstance(inputs[0], dict)


def pipeline(task: str = "text-generation", model: str | LanguageModel | None = None, **load_kwargs) -> TextGenerationPipeline:
    if task != "text-generation":
        raise InvalidParameterError(f"unsupported pipeline task {task!r}; gemmarun provides 'text-generation'")
    lm = model if isinstance(model, LanguageModel) else load(model, **load_kwargs)
    return TextGenerationPipeline(lm)
