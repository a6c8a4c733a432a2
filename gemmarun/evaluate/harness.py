"""A model for EleutherAI's lm-evaluation-harness, so any of its tasks runs on gemmarun.

    import lm_eval
    from gemmarun.evaluate.harness import GemmarunLM   # also registers the name "gemmarun"
    lm_eval.simple_evaluate(model=GemmarunLM(pretrained="path/to/model"), tasks=["hellaswag"])

The three request kinds map onto gemmarun's Scorer: `loglikelihood` to its batched
(context, continuation) scoring, `loglikelihood_rolling` to its sliding-window scoring, and
`generate_until` to greedy decoding with the request's stop strings. lm-eval is optional: the
class subclasses its `LM` when it is installed and otherwise works on any request object with
lm-eval's `.args` tuple.
"""

from __future__ import annotations

from .scorer import Request, Scorer

try:
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model
except ImportError:  # lm-eval absent: the adapter still serves `.args` requests
    _Base, register_model = object, None


class GemmarunLM(_Base):
    def __init__(self, pretrained=None, model=None, dtype=None, device="cpu", context=None, batch_size=8,
                 max_gen_toks: int = 256, **unused):  # fmt: skip
        super().__init__()
        from ..lm import LanguageModel, load

        if isinstance(model, LanguageModel):
            self.lm = model
        else:
            self.lm = load(pretrained, dtype=dtype, device=device, context=int(context) if context else None)
        self.scorer = Scorer(self.lm, batch_size=int(batch_size) if str(batch_size).isdigit() else 8)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        return self.lm.source

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self.scorer.loglikelihood([Request(*r.args[:2]) for r in requests])
        return [(ll.logprob, ll.greedy) for ll in results]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            ids = self.lm.tokenizer.encode(r.args[0], add_bos=False)
            out.append(self.scorer.rolling(ids)[0] if ids else 0.0)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Requests with the same stop strings and length limit are decoded as batches.
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1]) if len(r.args) > 1 else {}
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError("gemmarun's lm-eval adapter decodes greedily; sampling was requested")
            until = kwargs.get("until") or []
            until = tuple(u for u in ([until] if isinstance(until, str) else until) if u)
            groups.setdefault((until, int(kwargs.get("max_gen_toks", self.max_gen_toks))), []).append(i)
        out = [""] * len(requests)
        for (until, n), rows in groups.items():
            for i, text in zip(rows, self.scorer.generate([requests[i].args[0] for i in rows], until, n)):
                out[i] = text
        return out


if register_model is not None:
    register_model("gemmarun")(GemmarunLM)
