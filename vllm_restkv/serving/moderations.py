"""`POST /v1/moderations` in OpenAI's schema, served by `vllm serve` itself (entry point group
`vllm.endpoint_plugins`, name `restkv_moderations`; vLLM loads endpoint plugins only when `VLLM_PLUGINS` names them).

Two ways of scoring, chosen from what the server runs:
- pooling runner with a 2-label sequence classifier (the default moderator, `vllm-restkv model prepare --name
  moderator`): each input goes through vLLM's own `/classify` handler (the template's last token). With a token
  scan in moderator.json (`--name moderator-threads`), each prompt goes to the engine as a `token_classify` request
  (the same checkpoint, vLLM's ALL pooling, chunked prefill kept) and the score is the highest probability of the
  flag label over the scanned positions and the prompt's last token, so an insult buried deep in a long thread
  counts: `"scoring": "max_token"` scans every text position, `"max_line"` only the last token of each line (one
  comment per line in a chat thread: the positions the thread head was trained on).
- generate runner (a generative guard model): each input goes through vLLM's completions handler with one output
  token and top log-probabilities; the score is P(yes) / (P(yes) + P(no)) over the configured answer tokens.
Either way the request runs through the engine with KV eviction (chunked prefill evicts at every chunk boundary).

Configuration comes from `moderator.json` in the model directory (written by `model prepare`); without one, the
generate runner uses `DEFAULT_GENERATE` below. The model judges one thing, insults/harassment: it fills the
`harassment` category; every other standard category is reported as false with score 0.0 (documented in README).

Long inputs are split, never cut: an input longer than fits in one prompt is scored in consecutive segments of the
text (each with the template) and the input's score is the highest segment score. Limits (a 400 beyond them):
`MAX_INPUTS` inputs per request, `MAX_INPUT_CHARS` characters per input, `MAX_SEGMENTS` segments per input.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

logger = logging.getLogger("vllm.restkv")

OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent", "self-harm",
    "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence", "violence/graphic",
)
# moderator.json `scoring`: the template's last token (vLLM's classify); the highest score over every text position;
# over the last token of each line (where the thread head was trained to judge a comment)
SCANS = ("last_token", "max_token", "max_line")
MAX_INPUTS = 64
MAX_INPUT_CHARS = 1_000_000
MAX_SEGMENTS = 16
DEFAULT_GENERATE = {
    "mode": "generate",
    "prompt_template": (
        "Here is a message:\n{text}\n\nDoes this message insult, harass or attack someone? Answer Yes or No.\n"
        "Answer:"
    ),
    "positive_tokens": [" Yes", "Yes", " yes"],
    "negative_tokens": [" No", "No", " no"],
    "threshold": 0.5,
    "categories": {"harassment": "yes"},
}


class ModerationError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def response(self):
        return JSONResponse(status_code=self.status, content={
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}})


def parse_inputs(body: Any) -> tuple[list[str], str | None]:
    """Validate an OpenAI moderation request body; return (texts, model). Raises ModerationError (400)."""
    if not isinstance(body, dict):
        raise ModerationError(400, "the request body must be a JSON object with an `input` field")
    unknown = set(body) - {"input", "model", "vllm_xargs"}
    if unknown:
        raise ModerationError(400, f"unknown field(s): {', '.join(sorted(unknown))}; allowed: input, model, "
                                   "vllm_xargs")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ModerationError(400, "`model` must be a string", "model")
    if "input" not in body:
        raise ModerationError(400, "`input` is required: a string, a list of strings or a list of text parts", "input")
    raw = body["input"]
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise ModerationError(400, f"`input` must be a string or a list, not {type(raw).__name__}", "input")
    if not items:
        raise ModerationError(400, "`input` must not be empty", "input")
    if len(items) > MAX_INPUTS:
        raise ModerationError(400, f"`input` has {len(items)} items; at most {MAX_INPUTS} per request", "input")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if item.get("type") == "image_url":
                raise ModerationError(400, f"input[{i}]: image inputs are not supported by this text moderator",
                                      f"input[{i}]")
            if item.get("type") != "text" or not isinstance(item.get("text"), str):
                raise ModerationError(400, f"input[{i}]: a part must be {{\"type\": \"text\", \"text\": \"...\"}}",
                                      f"input[{i}]")
            item = item["text"]
        if not isinstance(item, str):
            raise ModerationError(400, f"input[{i}] must be a string, not {type(item).__name__}", f"input[{i}]")
        if not item.strip():
            raise ModerationError(400, f"input[{i}] is empty", f"input[{i}]")
        if len(item) > MAX_INPUT_CHARS:
            raise ModerationError(400, f"input[{i}] has {len(item)} characters; at most {MAX_INPUT_CHARS}",
                                  f"input[{i}]")
        texts.append(item)
    return texts, model


def parse_eviction_args(body: dict) -> dict | None:
    """The request's `vllm_xargs` (vLLM's name for per-request extension settings): only the per-request eviction
    keys, checked as vLLM's own endpoints check them (config.validate_request_args). Raises ModerationError (400)."""
    from vllm_restkv.config import REQUEST_KEYS, KVEvictionConfigError, validate_request_args

    xargs = body.get("vllm_xargs")
    if xargs is None:
        return None
    if not isinstance(xargs, dict):
        raise ModerationError(400, f"`vllm_xargs` must be an object, not {type(xargs).__name__}", "vllm_xargs")
    unknown = sorted(str(key) for key in xargs if key not in REQUEST_KEYS)
    if unknown:
        raise ModerationError(400, f"vllm_xargs: unknown key(s) {', '.join(unknown)}; /v1/moderations takes "
                                   f"{', '.join(REQUEST_KEYS)}", "vllm_xargs")
    try:
        validate_request_args(xargs)
    except KVEvictionConfigError as e:
        raise ModerationError(400, str(e), "vllm_xargs") from None
    return dict(xargs) or None


def load_moderator_config(model_dir: str, runner: str) -> dict:
    path = Path(model_dir) / "moderator.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config.setdefault("mode", "classify")
    elif runner == "pooling":
        raise RuntimeError(
            f"vllm-restkv /v1/moderations: {path} is missing; serve the default moderator "
            f"(`vllm-restkv model prepare --name moderator`) or add a moderator.json to the model directory")
    else:
        config = dict(DEFAULT_GENERATE)
    if "{text}" not in config["prompt_template"]:
        raise RuntimeError(f"vllm-restkv: moderator prompt_template must contain {{text}}: {config['prompt_template']!r}")
    return config


def build_results(scores: list[float], config: dict) -> list[dict]:
    threshold = float(config.get("threshold", 0.5))
    judged = config.get("categories", {"harassment": None})
    results = []
    for score in scores:
        categories, category_scores, applied = {}, {}, {}
        for name in OPENAI_CATEGORIES:
            value = float(score) if name in judged else 0.0
            category_scores[name] = value
            categories[name] = value >= threshold if name in judged else False
            applied[name] = ["text"] if name in judged else []
        results.append({"flagged": any(categories.values()), "categories": categories,
                        "category_scores": category_scores, "category_applied_input_types": applied})
    return results


class Moderator:
    """Per-app state: tokenizer, template, limits, and how to score a batch of prompts through the engine."""

    def __init__(self, state, args, engine_client):
        from transformers import AutoTokenizer

        from vllm_restkv.moderator import template_parts

        vllm_config = state.vllm_config
        model_config = vllm_config.model_config
        self.runner = model_config.runner_type
        self.config = load_moderator_config(model_config.model, self.runner)
        if self.config["mode"] == "classify" and self.runner != "pooling":
            raise RuntimeError("vllm-restkv: this moderator is a classifier; serve it with --runner pooling")
        self.served_names = list(state.openai_serving_models.base_model_paths[i].name
                                 for i in range(len(state.openai_serving_models.base_model_paths)))
        self.tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer)
        self.prefix, self.tail_ids = template_parts(self.tokenizer, self.config["prompt_template"])
        reserve = len(self.prefix) + len(self.tail_ids) + (1 if self.runner == "generate" else 0)
        self.segment_tokens = model_config.max_model_len - reserve
        if self.segment_tokens < 16:
            raise RuntimeError(f"vllm-restkv: --max-model-len {model_config.max_model_len} leaves no room for text "
                               f"after the moderation template ({reserve} tokens)")
        self.engine_client, self.model_config = engine_client, model_config
        self.scan = self.config.get("scoring", "last_token")
        if self.scan not in SCANS:
            raise RuntimeError(f"vllm-restkv: moderator.json `scoring` must be one of {', '.join(SCANS)}, "
                               f"not {self.scan!r}")
        # vLLM's request classes, imported here so that a moved module fails at start-up, not per request
        if self.runner == "pooling":
            from vllm.entrypoints.pooling.classify.protocol import ClassificationCompletionRequest

            class ClassificationWithEvictionArgs(ClassificationCompletionRequest):
                """vLLM's classify request whose PoolingParams carry the moderation request's eviction settings
                (in PoolingParams.extra_kwargs, where the engine reads a pooling request's: worker_state.extra_args)."""

                restkv_xargs: dict | None = None

                def to_pooling_params(self):
                    params = super().to_pooling_params()
                    params.extra_kwargs = self.restkv_xargs
                    return params

            self.request_class = ClassificationWithEvictionArgs
        else:
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest
            from vllm.entrypoints.serve.engine.protocol import ErrorResponse

            self.request_class, self.error_class = CompletionRequest, ErrorResponse
        if self.runner == "generate":
            self.positive = self._answer_ids(self.config["positive_tokens"])
            self.negative = self._answer_ids(self.config["negative_tokens"])
        from vllm_restkv.config import KVEvictionConfig

        self.eviction = KVEvictionConfig.from_vllm_config(vllm_config)

    def _answer_ids(self, words: list[str]) -> set[str]:
        # compared as decoded token strings, the form vLLM's top logprobs come in
        out = set()
        for w in words:
            ids = self.tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                out.add(self.tokenizer.decode(ids))
        if not out:
            raise RuntimeError(f"vllm-restkv: none of the answer words {words} is a single token for this tokenizer")
        return out

    def segments(self, text: str, index: int) -> tuple[list[list[int]], int, list[list[int]]]:
        """Token-id prompts for one input (one per segment), the input's token count, and per prompt the positions
        a token scan reads (`max_line`: the last token of each line and of the segment; else none)."""
        from vllm_restkv.moderator import line_ends

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=self.scan == "max_line")
        ids = enc["input_ids"]
        n = max(1, math.ceil(len(ids) / self.segment_tokens))
        if n > MAX_SEGMENTS:
            raise ModerationError(
                400, f"input[{index}] has {len(ids)} tokens; at most {MAX_SEGMENTS * self.segment_tokens} "
                     f"({MAX_SEGMENTS} segments of {self.segment_tokens})", f"input[{index}]")
        size = math.ceil(len(ids) / n)
        starts = range(0, max(len(ids), 1), size)
        prompts = [self.prefix + ids[i: i + size] + self.tail_ids for i in starts]
        if self.scan != "max_line":
            return prompts, len(ids), [[] for _ in prompts]
        ends = line_ends(enc["offset_mapping"], text)
        reads = []
        for i in starts:
            inside = [len(self.prefix) + e - i for e in ends if i <= e < i + size]
            last = len(self.prefix) + min(size, len(ids) - i) - 1  # a segment may cut a line: its end counts too
            reads.append(sorted(set(inside + [last])) if len(ids) else [])
        return prompts, len(ids), reads

    async def check_engine(self) -> None:
        if self.runner == "pooling" and self.scan != "last_token":
            tasks = await self.engine_client.get_supported_tasks()
            if "token_classify" not in tasks:
                raise RuntimeError(f"vllm-restkv: this moderator scores token positions (moderator.json scoring "
                                   f"{self.scan}) but the engine offers only {tasks}; serve it with --runner pooling "
                                   f"and without --pooler-config overrides of the pooling type")

    async def scan_tokens(self, prompts: list[list[int]], reads: list[list[int]], xargs: dict | None) -> list[float]:
        """Highest flag-label probability over each prompt's scanned positions (`max_token`: every text position;
        `max_line`: `reads`) and its last token (token_classify, one engine request per prompt; a cancelled HTTP
        request cancels these and vLLM aborts them)."""
        from vllm.pooling_params import PoolingParams

        k = self.config.get("labels", ["benign", "insult"]).index(self.config.get("flag_label", "insult"))
        base_id = f"modr-{uuid.uuid4().hex}"

        async def one(i: int, ids: list[int], read: list[int]) -> float:
            params = PoolingParams(task="token_classify", extra_kwargs=xargs)
            params.verify(self.model_config)
            final = None
            try:
                async for out in self.engine_client.encode({"prompt_token_ids": ids}, params, f"{base_id}-{i}"):
                    final = out
            except ValueError as e:  # vLLM's request validation (VLLMValidationError is one)
                raise ModerationError(400, f"the engine refused the request: {e}") from e
            probs = final.outputs.data[:, k]  # softmax per position
            # the head was trained on comment ends inside threads and on the template's last token; the tail's
            # other positions (" insult or attack", " Answer") were never trained and are left out
            if self.scan == "max_line":
                text = probs[read]
            else:
                text = probs[len(self.prefix): len(ids) - len(self.tail_ids)]
            return max(float(text.max()) if len(text) else 0.0, float(probs[-1]))

        tasks = [asyncio.ensure_future(one(i, ids, read)) for i, (ids, read) in enumerate(zip(prompts, reads))]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # on an error or a cancellation, stop the other segments too (gather leaves them running)
            for task in tasks:
                task.cancel()

    async def score(self, state, raw_request, prompts: list[list[int]], reads: list[list[int]],
                    model: str, xargs: dict | None = None) -> list[float]:
        """One score per prompt; `xargs`: the request's per-request eviction settings (parse_eviction_args)."""
        if self.runner == "pooling" and self.scan != "last_token":
            return await self.scan_tokens(prompts, reads, xargs)
        if self.runner == "pooling":
            request = self.request_class(model=model, input=prompts, add_special_tokens=False, restkv_xargs=xargs)
            response = await state.serving_classification(request, raw_request)
            body = json.loads(response.body)
            if response.status_code != 200:
                raise ModerationError(response.status_code, body.get("error", {}).get("message", str(body)),
                                      type_=body.get("error", {}).get("type", "server_error"))
            label = self.config.get("flag_label", "insult")
            labels = self.config.get("labels", ["benign", "insult"])
            k = labels.index(label)
            return [float(item["probs"][k]) for item in sorted(body["data"], key=lambda d: d["index"])]
        request = self.request_class(model=model, prompt=prompts, max_tokens=1, temperature=0.0, logprobs=20,
                                     vllm_xargs=xargs)
        response = await state.openai_serving_completion.create_completion(request, raw_request)
        if isinstance(response, self.error_class):
            raise ModerationError(response.error.code, response.error.message, type_=response.error.type)
        scores = []
        for choice in sorted(response.choices, key=lambda c: c.index):
            top = choice.logprobs.top_logprobs[0] if choice.logprobs and choice.logprobs.top_logprobs else {}
            yes = sum(math.exp(lp) for tok, lp in top.items() if tok in self.positive)
            no = sum(math.exp(lp) for tok, lp in top.items() if tok in self.negative)
            scores.append(yes / (yes + no) if yes + no > 0 else 0.0)
        return scores


class ModerationsPlugin:
    """vLLM endpoint plugin (see vllm/plugins/endpoint_plugins/interface.py)."""

    name = "restkv_moderations"
    required_tasks = ("classify", "generate")

    def attach_router(self, app) -> None:
        router = APIRouter()

        @router.post("/v1/moderations")
        async def create_moderation(raw_request: Request):
            from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect

            try:
                body = await raw_request.body()
            except Exception:  # the client went away while sending
                _count(raw_request, None, outcome="cancelled")
                raise
            # score while watching for a disconnect (vLLM's with_cancellation pattern, after the body is read): a
            # client that gives up cancels the scoring, and vLLM aborts its engine requests and frees their blocks
            work = asyncio.create_task(_handle(raw_request, body))
            watch = asyncio.create_task(listen_for_disconnect(raw_request))
            done, pending = await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if work not in done:
                _count(raw_request, None, outcome="cancelled")
                return None
            try:
                return work.result()
            except ModerationError as e:
                _count(raw_request, None, outcome="error")
                return e.response()

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            return
        moderator = Moderator(state, args, engine_client)
        await moderator.check_engine()
        state.restkv_moderator = moderator


async def _handle(raw_request: Request, raw_body: bytes) -> Any:
    try:
        body = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModerationError(400, f"the request body is not valid JSON: {e}") from e
    except RecursionError:
        raise ModerationError(400, "the request body is nested too deeply") from None
    texts, model = parse_inputs(body)
    xargs = parse_eviction_args(body)
    state = raw_request.app.state
    moderator: Moderator | None = getattr(state, "restkv_moderator", None)
    if moderator is None:
        raise ModerationError(503, "the moderation endpoint is not initialised", type_="server_error")
    if model is None or model in ("omni-moderation-latest", "text-moderation-latest", "text-moderation-stable"):
        model = moderator.served_names[0]  # OpenAI's model aliases map to the served moderator
    elif model not in moderator.served_names:
        raise ModerationError(404, f"The model `{model}` does not exist; served: {', '.join(moderator.served_names)}",
                              "model", "NotFoundError")
    started = time.perf_counter()
    # tokenising a long input takes a while: keep the event loop (and other requests) going meanwhile
    split = await asyncio.to_thread(lambda: [moderator.segments(t, i) for i, t in enumerate(texts)])
    prompts, reads, owner = [], [], []
    for i, (segs, _, seg_reads) in enumerate(split):
        prompts.extend(segs)
        reads.extend(seg_reads)
        owner.extend([i] * len(segs))
    seg_scores = await moderator.score(state, raw_request, prompts, reads, model, xargs)
    scores = [0.0] * len(texts)
    for i, s in zip(owner, seg_scores):
        scores[i] = max(scores[i], s)
    results = build_results(scores, moderator.config)
    from vllm_restkv.config import NO_EVICTION, evicts_during_prefill
    from vllm_restkv.engine.worker_state import request_overrides

    policy, budget = request_overrides(xargs, moderator.eviction)  # what the engine applies to these requests
    during_prefill = evicts_during_prefill(xargs, moderator.eviction)
    extension = {
        "policy": policy,
        "scoring": moderator.scan if moderator.runner == "pooling" else "answer_logprobs",
        "budget": budget if policy != NO_EVICTION else None,
        "evict_during_prefill": during_prefill if policy != NO_EVICTION else None,
        "inputs": [{"prompt_tokens": sum(len(p) for p in segs), "input_tokens": n, "segments": len(segs)}
                   for segs, n, _ in split],
        "seconds": round(time.perf_counter() - started, 4),
    }
    for result in results:
        _count(raw_request, result["flagged"])
    # (a verdict is read at the prompt's end: without eviction during prefill, it is the full cache's already)
    rate = moderator.eviction.shadow_rate
    if policy != NO_EVICTION and during_prefill and rate > 0 and random.random() < rate:
        start_shadow_check(moderator, lambda: shadow_check(moderator, state, prompts, reads, owner, model, scores),
                           len(scores))
    return JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": model, "results": results,
                         "restkv": extension})


_SHADOW_TASKS: set = set()
SHADOW_XARGS = {"kv_eviction": "none"}
SHADOW_DIFF_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# Shadow checks in flight per API server at most: each holds the KV blocks of whole prompts, so under a burst they
# must not add up and take the cache from the traffic they check (a sampled request beyond it counts as `busy`)
MAX_SHADOW_CHECKS = 1


def start_shadow_check(moderator: Moderator, check, inputs: int) -> asyncio.Task | None:
    """Start `check()` (a shadow_check coroutine) in the background unless MAX_SHADOW_CHECKS are running already;
    the answer never waits for it. The task stays referenced until it ends."""
    if len(_SHADOW_TASKS) >= MAX_SHADOW_CHECKS:
        _record_shadow(moderator, "busy", inputs)
        return None
    task = asyncio.create_task(check())
    _SHADOW_TASKS.add(task)
    task.add_done_callback(_SHADOW_TASKS.discard)
    return task


async def shadow_check(moderator: Moderator, state, prompts: list[list[int]], reads: list[list[int]],
                       owner: list[int], model: str, scores: list[float]) -> None:
    """Score the same prompts again with eviction off for them and record, per input, whether the verdict agrees
    with the answered one and by how much the score differs (shadow_rate). Never raises: on a server whose KV cache
    is smaller than --max-model-len (where no request may turn eviction off) the inputs are `skipped`, anything
    else that fails is an `error`; the answer has gone already."""
    from vllm_restkv.config import KVEvictionConfigError, validate_request_args

    try:
        validate_request_args(SHADOW_XARGS)  # refused where the cache is smaller than --max-model-len
    except KVEvictionConfigError:
        _record_shadow(moderator, "skipped", len(scores))
        return
    try:
        seg_scores = await moderator.score(state, None, prompts, reads, model, SHADOW_XARGS)
    except Exception:  # noqa: BLE001 (a shadow check must not disturb anything; counted and logged)
        logger.exception("vllm-restkv: shadow check failed")
        _record_shadow(moderator, "error", len(scores))
        return
    full = [0.0] * len(scores)
    for i, score in zip(owner, seg_scores):
        full[i] = max(full[i], score)
    threshold = float(moderator.config.get("threshold", 0.5))
    for evicted, reference in zip(scores, full):
        agree = (evicted >= threshold) == (reference >= threshold)
        _record_shadow(moderator, "agree" if agree else "disagree", 1, abs(evicted - reference))


_SHADOW_METRICS = None


def _record_shadow(moderator: Moderator, outcome: str, count: int, diff: float | None = None) -> None:
    global _SHADOW_METRICS
    import prometheus_client as prom

    if _SHADOW_METRICS is None:
        _SHADOW_METRICS = (
            prom.Counter("restkv_moderation_shadow_checks", "Inputs of /v1/moderations scored again with eviction "
                         "off (shadow_rate), by outcome: agree / disagree (same verdict as the answered score or "
                         "not), skipped (the KV cache is smaller than --max-model-len: eviction cannot be turned "
                         "off), busy (another check was running), error",
                         ["model_name", "outcome"]),
            prom.Histogram("restkv_moderation_shadow_score_diff", "|answered score - score with eviction off| of "
                           "the shadow-checked inputs", ["model_name"], buckets=SHADOW_DIFF_BUCKETS))
    checks, diffs = _SHADOW_METRICS
    name = moderator.served_names[0]
    checks.labels(model_name=name, outcome=outcome).inc(count)
    if diff is not None:
        diffs.labels(model_name=name).observe(diff)


_COUNTER = None


def _count(raw_request, flagged: bool | None, outcome: str | None = None) -> None:
    global _COUNTER
    import prometheus_client as prom

    if _COUNTER is None:
        _COUNTER = prom.Counter("restkv_moderation_results", "Inputs judged by /v1/moderations, by outcome",
                                ["model_name", "outcome"])
    state = raw_request.app.state
    moderator = getattr(state, "restkv_moderator", None)
    name = moderator.served_names[0] if moderator else "unknown"
    outcome = outcome or ("flagged" if flagged else "not_flagged")
    _COUNTER.labels(model_name=name, outcome=outcome).inc()
