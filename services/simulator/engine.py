"""The SGLang **simulator**'s request engine: validate, answer, schedule, time and report.

One :class:`SimulatorEngine` is one simulated SGLang server (one replica). For
each prompt it picks the answer — the recorded continuation for exactly this
prompt, else a synthetic one — checks it against the request's constraint,
shapes it with ``stop``/``max_new_tokens`` (:mod:`.decoding`), waits for a
running slot (:mod:`.scheduler`), looks the prompt up in the replica's prefix
cache (:mod:`.prefix_cache`) and sleeps the modelled latency:
``ttft_s + prefill_s_per_token * uncached_prompt_tokens + decode_s_per_token *
completion_tokens``. Outputs are SGLang's ``/generate`` dicts, with
``meta_info.simulator.source`` telling ``"recorded"`` from ``"synthetic"``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from services.simulator.config import SimulatorConfig
from services.simulator.constraints import (
    Constraint,
    ConstraintCompileError,
    compile_constraint,
    constraint_accepts,
)
from services.simulator.decoding import Completion, DecodeOptions, decode_continuation
from services.simulator.errors import RequestValueError, SchedulerAbort
from services.simulator.metrics import SimulatorMetrics
from services.simulator.prefix_cache import RadixCache
from services.simulator.protocol import GenerateItem, GenerateRequest, SamplingParams, resolve_sampling_params
from services.simulator.replay import Recording, ReplayIndex
from services.simulator.scheduler import Admission, QueueFull, pause
from services.simulator.synthetic import SyntheticUnavailable, synthesize
from services.simulator.tokenizer import PseudoTokenizer
from shared.roles import LLMRole

__all__ = ["Answer", "PreparedItem", "SimulatorEngine"]

QUEUE_FULL_MESSAGE = "The request queue is full."
ABORTED_MESSAGE = "Aborted by /abort_request."


@dataclass(frozen=True)
class Answer:
    """What the simulated model says, and whether it was recorded or synthesized."""

    text: str
    source: str  # "recorded" | "synthetic"


#: SGLang's abort for any grammar request on a server started with ``--grammar-backend none``.
GRAMMAR_BACKEND_NONE_MESSAGE = (
    "Grammar-based generation (json_schema, regex, ebnf, structural_tag) is not supported when the server is "
    "launched with --grammar-backend none"
)


@dataclass
class PreparedItem:
    """A validated prompt, ready to run."""

    item: GenerateItem
    prompt_text: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    created: float = field(default_factory=time.monotonic)
    cached_tokens: int = 0
    source: str | None = None

    @property
    def rid(self) -> str:
        return self.item.rid


class SimulatorEngine:
    """State and behaviour of one simulated SGLang server."""

    def __init__(self, config: SimulatorConfig, index: ReplayIndex | None = None) -> None:
        self.config = config
        self.tokenizer = PseudoTokenizer()
        self.index = index if index is not None else ReplayIndex.from_files(config.data_files, config.role)
        self.cache = RadixCache(config.prefix_cache_tokens)
        self.admission = Admission(config.max_running_requests, config.max_queued_requests)
        self.metrics = SimulatorMetrics(
            config.resolved_served_model_name,
            running=lambda: self.admission.running,
            queued=lambda: self.admission.waiting,
        )
        self.inflight: dict[str, PreparedItem] = {}
        #: How often each prompt was asked (``checkpoint_shapes``: only a first ask may be blank).
        self._asks: collections.Counter[str] = collections.Counter()
        self._asks_lock = threading.Lock()

    # --- validation ---------------------------------------------------------------

    def prepare(self, request: GenerateRequest) -> list[PreparedItem]:
        """Register the request's rids and validate each prompt; raises :class:`RequestValueError`."""
        for item in request.items:
            if item.rid in self.inflight:
                raise RequestValueError(f"Duplicate request ID detected: {item.rid}")
        prepared: list[PreparedItem] = []
        try:
            for item in request.items:
                prepared.append(self._prepare_item(item))
                self.inflight[item.rid] = prepared[-1]
        except RequestValueError:
            self.release(prepared)
            raise
        return prepared

    def _prepare_item(self, item: GenerateItem) -> PreparedItem:
        if item.text is not None:
            prompt_text, prompt_ids = item.text, self.tokenizer.encode(item.text)
        else:
            prompt_ids = list(item.input_ids or [])
            prompt_text = self.tokenizer.decode(prompt_ids)
        self._check_context_length(len(prompt_ids), item.sampling_params.get("max_new_tokens"))
        params = resolve_sampling_params(item.sampling_params)
        budget = params.max_new_tokens
        max_new_tokens = budget if budget is not None else max(0, self.config.context_length - len(prompt_ids))
        return PreparedItem(item, prompt_text, prompt_ids, params, max_new_tokens)

    def _check_context_length(self, input_tokens: int, max_new_tokens: int | None) -> None:
        """SGLang's ``_validate_one_request`` messages (no ``--allow-auto-truncate``)."""
        context = self.config.context_length
        if input_tokens >= context:
            raise RequestValueError(
                f"The input ({input_tokens} tokens) is longer than the model's context length ({context} tokens)."
            )
        if max_new_tokens is not None and input_tokens + max_new_tokens > context:
            raise RequestValueError(
                f"Requested token count exceeds the model's maximum context length of {context} tokens. "
                f"You requested a total of {input_tokens + max_new_tokens} tokens: {input_tokens} tokens from "
                f"the input messages and {max_new_tokens} tokens for the completion. Please reduce the number "
                f"of tokens in the input messages or the completion to fit within the limit."
            )

    def release(self, prepared: Iterable[PreparedItem]) -> None:
        """Forget the rids of finished (or failed) prompts."""
        for item in prepared:
            if self.inflight.get(item.rid) is item:
                del self.inflight[item.rid]

    # --- answering ----------------------------------------------------------------

    def answer(self, prepared: PreparedItem) -> Answer:
        """The continuation for this prompt; raises :class:`SchedulerAbort` (400) on constraint problems."""
        constraint = self._constraint(prepared.params)
        recording = self.index.lookup(prepared.prompt_text)
        if recording is not None:
            spec = prepared.params.constraint
            if constraint is not None and spec is not None and not constraint_accepts(*spec, recording.continuation):
                raise SchedulerAbort(
                    f"SGLang simulator: the recorded continuation for this prompt ({recording.source}) violates "
                    f"the request's {constraint.kind} constraint, so a real server could not have produced it."
                )
            text = recording.continuation
            if self.config.checkpoint_shapes:
                text = self._checkpoint_shape(prepared, recording, constraint)
            return Answer(text, "recorded")
        try:
            return Answer(synthesize(prepared.prompt_text, constraint), "synthetic")
        except SyntheticUnavailable as exc:
            raise SchedulerAbort(str(exc)) from exc

    def _checkpoint_shape(self, prepared: PreparedItem, recording: Recording, constraint: Constraint | None) -> str:
        """The recorded continuation as a real checkpoint on SGLang tends to return it.

        A deterministic choice per prompt, so tests replay the same way every run: every
        answer gets a leading space and a trailing newline, and about one planner prompt in
        three is answered blank the first time it is asked (``" "``, ``" ."`` or ``",\\n"``:
        one token at least, as ``min_new_tokens: 1`` demands). A
        shape the request's constraint would not let a real server produce is not used.
        """
        with self._asks_lock:
            self._asks[prepared.prompt_text] += 1
            first_ask = self._asks[prepared.prompt_text] == 1
        digest = hashlib.blake2b(prepared.prompt_text.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        pick = int.from_bytes(digest, "big")
        candidates = [" " + recording.continuation + "\n", " " + recording.continuation, recording.continuation]
        if recording.role is LLMRole.PLANNER and first_ask and pick % 3 == 0:
            candidates.insert(0, (" ", " .", ",\n")[pick // 3 % 3])
        spec = prepared.params.constraint
        for text in candidates:
            if constraint is None or spec is None or constraint_accepts(*spec, text):
                return text
        return recording.continuation

    def _constraint(self, params: SamplingParams) -> Constraint | None:
        spec = params.constraint
        if spec is None:
            return None
        backend = self.config.grammar_backend
        if backend == "none":
            raise SchedulerAbort(GRAMMAR_BACKEND_NONE_MESSAGE)
        if backend == "outlines" and spec[0] == "ebnf":
            # SGLang's outlines backend "skips" EBNF into an invalid grammar, which aborts the request.
            raise SchedulerAbort("Failed to compile ebnf grammar: Unknown grammar error")
        try:
            return compile_constraint(*spec)
        except ConstraintCompileError as exc:
            raise SchedulerAbort(str(exc)) from exc

    def decode(self, prepared: PreparedItem, answer: Answer) -> Completion:
        """Apply ``stop``, stop tokens and ``max_new_tokens`` to the answer."""
        params = prepared.params
        options = DecodeOptions(
            max_new_tokens=prepared.max_new_tokens,
            stop=params.stop,
            stop_token_ids=params.stop_token_ids,
            stop_regex=params.stop_regex,
            no_stop_trim=params.no_stop_trim,
            ignore_eos=params.ignore_eos,
        )
        return decode_continuation(answer.text, options, self.tokenizer)

    # --- running ------------------------------------------------------------------

    async def run(self, prepared: PreparedItem, *, stream: bool) -> AsyncIterator[dict[str, Any]]:
        """SGLang output dicts for one prompt: partial chunks when streaming, then the final one.

        Raises :class:`SchedulerAbort` before the first output when the request is refused.
        """
        try:
            answer = self.answer(prepared)
        except SchedulerAbort:
            self.metrics.observe_rejected()
            raise
        prepared.source = answer.source
        completion = self.decode(prepared, answer)
        try:
            admitted = await self.admission.acquire(prepared.aborted)
        except QueueFull:
            self.metrics.observe_rejected()
            raise SchedulerAbort(QUEUE_FULL_MESSAGE, status_code=503) from None
        queue_time = time.monotonic() - prepared.created
        done, ttft = 0, None
        if admitted:
            try:
                async for done, ttft, partial in self._generate(prepared, completion, stream=stream):
                    if partial:
                        yield self._payload(prepared, completion, done, final=False)
            finally:
                self.admission.release()
            self.cache.insert(prepared.prompt_ids + completion.output_ids[:done])
        aborted = prepared.aborted.is_set() and done < completion.completion_tokens
        final = self._final_payload(prepared, completion, done, aborted)
        self._observe(prepared, final, ttft=ttft, queue_time=queue_time, aborted=aborted)
        yield final

    async def _generate(
        self, prepared: PreparedItem, completion: Completion, *, stream: bool
    ) -> AsyncIterator[tuple[int, float | None, bool]]:
        """Prefill then decode; yields ``(tokens done, ttft, is a partial chunk)``."""
        profile = self.config
        prompt_len = len(prepared.prompt_ids)
        prepared.cached_tokens = min(self.cache.match_prefix(prepared.prompt_ids), max(prompt_len - 1, 0))
        prefill = profile.ttft_s + profile.prefill_s_per_token * (prompt_len - prepared.cached_tokens)
        if await pause(prefill, prepared.aborted):
            return
        self.cache.insert(prepared.prompt_ids)
        total = completion.completion_tokens
        ttft = time.monotonic() - prepared.created + (profile.decode_s_per_token if total else 0.0)
        interval = max(1, prepared.params.stream_interval or self.config.stream_interval) if stream else max(total, 1)
        done = 0
        while done < total:
            step = min(interval, total - done)
            started = time.monotonic()
            if await pause(profile.decode_s_per_token * step, prepared.aborted):
                elapsed = time.monotonic() - started
                done += min(step, int(elapsed / profile.decode_s_per_token)) if profile.decode_s_per_token else 0
                yield done, ttft, False
                return
            done += step
            yield done, ttft, stream and done < total
        if total == 0:
            yield 0, ttft, False

    # --- output shapes --------------------------------------------------------------

    def _meta_info(self, prepared: PreparedItem, finish_reason: dict[str, Any] | None, tokens: int) -> dict[str, Any]:
        return {
            "id": prepared.rid,
            "finish_reason": finish_reason,
            "prompt_tokens": len(prepared.prompt_ids),
            "weight_version": "default",
            "num_retractions": 0,
            "reasoning_tokens": 0,
            "completion_tokens": tokens,
            "cached_tokens": prepared.cached_tokens,
            "simulator": {"source": prepared.source},
        }

    def _payload(self, prepared: PreparedItem, completion: Completion, tokens: int, *, final: bool) -> dict[str, Any]:
        text, ids = completion.prefix(tokens)
        finish = completion.finish_reason if final else None
        payload = {"text": text, "output_ids": ids, "meta_info": self._meta_info(prepared, finish, len(ids))}
        if final:
            self._add_final_times(prepared, payload)
        return payload

    def _final_payload(
        self, prepared: PreparedItem, completion: Completion, done: int, aborted: bool
    ) -> dict[str, Any]:
        if not aborted:
            return self._payload(prepared, completion, completion.completion_tokens, final=True)
        text, ids = completion.prefix(done)
        finish = {"type": "abort", "message": ABORTED_MESSAGE, "status_code": None, "err_type": None}
        payload = {"text": text, "output_ids": ids, "meta_info": self._meta_info(prepared, finish, len(ids))}
        self._add_final_times(prepared, payload)
        return payload

    def abort_payload(self, prepared: PreparedItem, abort: SchedulerAbort) -> dict[str, Any]:
        """The in-band chunk a streaming request gets when the scheduler aborts it."""
        payload = {"text": "", "output_ids": [], "meta_info": self._meta_info(prepared, abort.finish_reason(), 0)}
        self._add_final_times(prepared, payload)
        return payload

    @staticmethod
    def _add_final_times(prepared: PreparedItem, payload: dict[str, Any]) -> None:
        payload["meta_info"]["e2e_latency"] = time.monotonic() - prepared.created
        payload["meta_info"]["response_sent_to_client_ts"] = time.time()

    def _observe(
        self, prepared: PreparedItem, final: dict[str, Any], *, ttft: float | None, queue_time: float, aborted: bool
    ) -> None:
        meta = final["meta_info"]
        self.metrics.observe_finished(
            prompt_tokens=meta["prompt_tokens"],
            completion_tokens=meta["completion_tokens"],
            cached_tokens=meta["cached_tokens"],
            e2e_latency=meta["e2e_latency"],
            ttft=ttft,
            queue_time=queue_time,
            structured=prepared.params.constraint is not None,
            aborted=aborted,
        )

    # --- control ------------------------------------------------------------------

    def abort(self, rid: str | None = None, *, abort_all: bool = False) -> int:
        """Abort in-flight requests by rid (or all); returns how many were signalled."""
        targets = list(self.inflight.values()) if abort_all else [p for r, p in self.inflight.items() if r == rid]
        for prepared in targets:
            prepared.aborted.set()
        return len(targets)

    async def flush_cache(self, timeout_s: float = 0.0) -> bool:
        """Clear the prefix cache once no request runs or waits (waiting up to ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while self.inflight or not self.admission.idle:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        self.cache.reset()
        return True
