"""α-UMi static (step-level) evaluation: the paper's Table 1 metrics.

A re-implementation of GLPFT's ``inference_utils/toolbench/evaluate-multi_agent.py``
(X-PLUG/Multi-LLM-Agent). Every planner decision point of a test trajectory is one
sample; a *predictions file* is a JSON list of records, each with the sample's
``tools`` (compact docs with a ``Name``), its ``reference`` string and the system's
``predictions`` string (the original pipeline stores more fields; they are kept).

Both strings have one of three shapes::

    assistant: <plan ... Next: caller.></s>caller: Action: <Name>\\nAction Input: <json></s>
    assistant: <plan ... Next: conclusion.></s>conclusion: <final answer></s>
    <plan ... Next: give up.>                        (bare planner text)

(the original inference pipeline writes ``asssitant: `` and no trailing ``</s>``;
parsing does not look at either). :func:`parse_output` reads one string,
:func:`score_predictions` computes the metrics and :func:`metrics_table` prints them
next to the published numbers (:data:`PAPER_TABLE1`).

Metric definitions (the reference code's, with its exact bookkeeping):

- ``plan_acc`` (Plan ACC): exact match of the plan label (call / finish / give up)
  over all samples.
- ``action_em`` (Act. EM): exact match of the action name over the samples whose
  reference plan is ``call``; a prediction without an action counts as ``'none'``.
- ``arg_f1`` (Arg. F1): per reference ``call`` sample (see :func:`arg_f1_sample`):
  0 if the actions differ; a reference input that does not parse as JSON skips the
  sample (unless the actions differ); a prediction that does not parse scores 0;
  a reference ``{}`` scores 1 only against a predicted ``{}``; otherwise each
  reference key present in the prediction counts 1 when the values are equal and 0.5
  when they differ, recall is over the reference keys, precision over the predicted
  keys, and the sample scores their harmonic mean (0 when both are 0).
- ``easy_f1`` / ``hard_f1``: the same scores split by whether the reference input is
  ``{}`` (easy) or not (hard), *as the reference code books them*: a sample whose
  action differs is added as 0 to **both** lists, and one whose reference input
  parses but is not a JSON object lands, as 0, in the hard list.
- ``hallu_rate`` (Hallu.): samples whose predicted action is neither absent nor
  ``'none'`` and not among the sample's tool Names, over **all** samples.
- ``rouge_l`` (R-L): the ``rouge`` package's averaged Rouge-L F between predicted and
  reference answers over the reference ``finish`` samples; a prediction without an
  answer counts as the text ``'none'``.

Choices where the reference code has no answer (it crashes or returns an artefact):

- An average over no samples is ``None`` (the matching ``n_*`` count is 0); the
  reference code raises ``ZeroDivisionError`` (or returns 0 for Rouge-L). No
  ``1e-30`` is added to any metric.
- A ``call`` string without ``</s>`` has an empty caller part: action ``'none'``,
  input ``{}`` (the reference code raises ``IndexError``).
- The ``rouge`` package raises on a text with no words (empty, or only dots).
  Such a pair scores 0 — Rouge-L F of an empty sequence — and still counts in
  the average; with no such pair the value is exactly the package's.
- The ``rouge`` package reconstructs the LCS recursively and raises
  ``RecursionError`` on long sentences; the recursion limit is raised for the
  duration of the call so the score is computed instead (the value is unchanged).

Usage::

    records = load_predictions("predictions.json")
    metrics = score_predictions(records)
    print(metrics_table(metrics, compare=PAPER_TABLE1["alpha-umi-7b/out-of-domain"]))
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from rouge import Rouge

from shared.prompts import STOP_SEQUENCE, NextRole, Speaker, Turn

__all__ = [
    "ArgBucket",
    "ArgScore",
    "PAPER_TABLE1",
    "PaperRow",
    "ParsedOutput",
    "Plan",
    "PredictionRecord",
    "RecordTool",
    "StaticMetrics",
    "arg_f1_sample",
    "format_prediction",
    "is_decision_point",
    "load_predictions",
    "metrics_table",
    "parse_output",
    "reference_for",
    "rouge_l",
    "save_predictions",
    "score_predictions",
]

#: The text a missing action or answer is replaced with (as the reference code does).
NONE_TEXT = "none"
#: Outputs the original pipeline replaces with ``'none'`` (after ``strip()``).
_EMPTY_OUTPUTS = frozenset({"", ".", ","})
_GIVE_UP_MARK = "Next: give up"
_CONCLUSION_MARK = "Next: conclusion"
_ACTION = "Action:"
_ACTION_INPUT = "Action Input:"
_CONCLUSION_PREFIX = "conclusion: "


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


class Plan(StrEnum):
    """The plan label of a sample, as the reference evaluator names it."""

    CALL = "call"
    FINISH = "finish"
    GIVE_UP = "give up"


class ParsedOutput(BaseModel):
    """One reference or prediction string, parsed.

    ``action`` and ``action_input`` are set for ``call`` only, ``answer`` for
    ``finish`` only; everything else is ``None``.
    """

    model_config = ConfigDict(frozen=True)

    plan: Plan
    action: str | None = None
    action_input: str | None = None
    answer: str | None = None


def parse_output(text: str) -> ParsedOutput:
    """Parse a reference or prediction string the way ``evaluate-multi_agent.py`` does.

    ``Next: give up`` anywhere → give up; else ``Next: conclusion`` → finish with the
    text after the last ``conclusion: `` (``</s>`` removed; the whole text when there
    is none); else call, parsed from the text between the first and second ``</s>``.
    """
    if _GIVE_UP_MARK in text:
        return ParsedOutput(plan=Plan.GIVE_UP)
    if _CONCLUSION_MARK in text:
        return ParsedOutput(plan=Plan.FINISH, answer=_answer_of(text))
    action, action_input = _call_of(_caller_part(text))
    return ParsedOutput(plan=Plan.CALL, action=action, action_input=action_input)


def _answer_of(text: str) -> str:
    start = text.rfind(_CONCLUSION_PREFIX)
    answer = text[start + len(_CONCLUSION_PREFIX) :] if start != -1 else text
    return answer.replace(STOP_SEQUENCE, "")


def _caller_part(text: str) -> str:
    """The segment after the first ``</s>`` (up to the next one); empty without ``</s>``."""
    parts = text.split(STOP_SEQUENCE)
    return parts[1] if len(parts) > 1 else ""


def _call_of(caller_text: str) -> tuple[str, str]:
    input_at = caller_text.rfind(_ACTION_INPUT)
    action_input = caller_text[input_at + len(_ACTION_INPUT) :].strip() if input_at != -1 else "{}"
    action_at = caller_text.rfind(_ACTION)
    if action_at == -1:
        return NONE_TEXT, action_input
    action = caller_text[action_at + len(_ACTION) :].strip()
    cut = action.find(_ACTION_INPUT)
    if cut != -1:
        action = action[:cut].strip()
    return action, action_input


# ---------------------------------------------------------------------------
# Records and files
# ---------------------------------------------------------------------------


class RecordTool(BaseModel):
    """A tool doc of a record; only ``Name`` is used, other fields are kept as they are."""

    model_config = ConfigDict(extra="allow")

    Name: str


class PredictionRecord(BaseModel):
    """One sample of a predictions file; extra fields (``history``, ``model_input``, …) are kept."""

    model_config = ConfigDict(extra="allow")

    tools: list[RecordTool] = Field(default_factory=list)
    reference: str
    predictions: str

    @field_validator("tools", mode="before")
    @classmethod
    def _models_to_dicts(cls, value: Any) -> Any:
        # Accept shared.prompts.ToolDoc (or any pydantic model) as well as plain dicts.
        if isinstance(value, list):
            return [item.model_dump() if isinstance(item, BaseModel) else item for item in value]
        return value

    def tool_names(self) -> set[str]:
        """The ``Name`` of every tool of this sample."""
        return {tool.Name for tool in self.tools}


_RECORDS = TypeAdapter(list[PredictionRecord])


def load_predictions(path: str | Path) -> list[PredictionRecord]:
    """Read a predictions file (a JSON list of records)."""
    return _RECORDS.validate_json(Path(path).read_bytes())


def save_predictions(records: Sequence[PredictionRecord], path: str | Path) -> None:
    """Write records as a predictions file that the original evaluator can read too."""
    data = [record.model_dump(mode="json") for record in records]
    Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------
# Building reference and prediction strings
# ---------------------------------------------------------------------------

#: The markers that make an assistant turn a decision point (``build_infer_samples``).
DECISION_MARKERS = tuple(role.marker for role in NextRole)


def is_decision_point(turn_value: str) -> bool:
    """Whether an assistant (planner) turn is a sample: it contains a ``Next: <role>.`` marker."""
    return any(marker in turn_value for marker in DECISION_MARKERS)


def reference_for(turn_value: str, next_turn: Turn | Mapping[str, Any] | None) -> str:
    """The reference string of a decision point: planner turn ``turn_value``, then ``next_turn``.

    Caller and conclusion steps give ``assistant: <v></s><role>: <next value></s>``;
    a give-up step gives the bare planner text. ``next_turn`` is a :class:`Turn` or its
    ``{"from", "value"}`` dict. Raises ``ValueError`` when a caller or conclusion step
    has no following turn.
    """
    if "Next: caller" in turn_value or NextRole.CONCLUSION.marker in turn_value:
        if next_turn is None:
            raise ValueError("a caller or conclusion decision point needs the turn that follows it")
        if not isinstance(next_turn, Turn):
            next_turn = Turn.model_validate(next_turn)
        return (
            f"{Speaker.ASSISTANT.value}: {turn_value}{STOP_SEQUENCE}"
            f"{next_turn.speaker.value}: {next_turn.value}{STOP_SEQUENCE}"
        )
    return turn_value


#: Who acted after the planner, by any of the names the code base uses for it.
_FOLLOWERS: Mapping[str, Speaker] = {
    "caller": Speaker.CALLER,  # NextRole, Speaker, StepRole, LLMRole
    "conclusion": Speaker.CONCLUSION,  # NextRole, Speaker
    "summarizer": Speaker.CONCLUSION,  # StepRole, LLMRole
}


def format_prediction(plan_text: str, role: str | None, output: str | None = None) -> str:
    """The prediction string for a planner decision and the caller's or summarizer's output.

    ``plan_text`` is the planner text kept in the history, used as it is (it should end
    with the marker of ``role``, as :attr:`shared.prompts.PlannerDecision.text` does).
    ``role`` names who acted next: ``caller``, or ``conclusion`` / ``summarizer`` (any of
    :class:`~shared.prompts.NextRole`, :class:`~shared.roles.StepRole`,
    :class:`~shared.roles.LLMRole`); ``give up`` or ``None`` (nobody) gives the bare plan
    text and ignores ``output``. Like the original pipeline, an ``output`` that is
    missing, empty, ``.`` or ``,`` after stripping is written as ``none``.
    """
    if role is None or str(role) == NextRole.GIVE_UP.value:
        return plan_text
    speaker = _FOLLOWERS.get(str(role))
    if speaker is None:
        raise ValueError(f"unknown role {role!r}: expected caller, conclusion, summarizer, give up or None")
    if output is None or output.strip() in _EMPTY_OUTPUTS:
        output = NONE_TEXT
    return f"{Speaker.ASSISTANT.value}: {plan_text}{STOP_SEQUENCE}{speaker.value}: {output}{STOP_SEQUENCE}"


# ---------------------------------------------------------------------------
# Argument F1
# ---------------------------------------------------------------------------


class ArgBucket(StrEnum):
    """Where a sample's argument score is booked (the reference code's lists)."""

    BOTH = "both"  # action differs: 0 in the easy and the hard list
    EASY = "easy"  # reference input is {}
    HARD = "hard"  # reference input is anything else that parses
    SKIPPED = "skipped"  # same action, reference input does not parse: in no list


class ArgScore(BaseModel):
    """One sample's argument score and where it is booked (``score`` is None when skipped)."""

    model_config = ConfigDict(frozen=True)

    score: float | None
    bucket: ArgBucket


def arg_f1_sample(ref_action: str, pred_action: str, ref_input: str, pred_input: str) -> ArgScore:
    """The argument F1 of one reference ``call`` sample (half-match rule, see the module doc)."""
    if ref_action != pred_action:
        return ArgScore(score=0.0, bucket=ArgBucket.BOTH)
    try:
        reference = json.loads(ref_input)
    except ValueError:
        return ArgScore(score=None, bucket=ArgBucket.SKIPPED)
    bucket = ArgBucket.EASY if reference == {} else ArgBucket.HARD
    try:
        predicted = json.loads(pred_input)
    except ValueError:
        return ArgScore(score=0.0, bucket=bucket)
    if bucket is ArgBucket.EASY:
        return ArgScore(score=1.0 if predicted == {} else 0.0, bucket=bucket)
    return ArgScore(score=_half_match_f1(reference, predicted), bucket=bucket)


def _half_match_f1(reference: Any, predicted: Any) -> float:
    # A JSON value that is not an object makes the reference code fail inside its
    # try block, which books 0; the same holds when recall and precision are both 0.
    if not isinstance(reference, dict) or not isinstance(predicted, dict) or not predicted:
        return 0.0
    credit = sum(1.0 if predicted[key] == value else 0.5 for key, value in reference.items() if key in predicted)
    recall = credit / len(reference)
    precision = credit / len(predicted)
    if recall + precision == 0:
        return 0.0
    return 2 * recall * precision / (recall + precision)


# ---------------------------------------------------------------------------
# Rouge-L
# ---------------------------------------------------------------------------


def _has_words(text: str) -> bool:
    """Whether the ``rouge`` package sees a sentence in ``text`` (it splits on ``.``)."""
    return any(part for part in text.split("."))


@contextmanager
def _recursion_room(extra: int) -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(old + extra)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float | None:
    """Averaged Rouge-L F of the ``rouge`` package; a pair with an empty side scores 0.

    ``None`` for no pairs. Equal to ``Rouge().get_scores(hyps, refs, avg=True)
    ["rouge-l"]["f"]`` whenever that call does not raise.
    """
    if len(hyps) != len(refs):
        raise ValueError("hyps and refs differ in length")
    if not refs:
        return None
    scored = [i for i, (h, r) in enumerate(zip(hyps, refs, strict=True)) if _has_words(h) and _has_words(r)]
    per_pair = [0.0] * len(refs)
    if scored:
        words = max(len(hyps[i].split()) + len(refs[i].split()) for i in scored)
        with _recursion_room(words + 100):
            scores = Rouge(metrics=["rouge-l"]).get_scores([hyps[i] for i in scored], [refs[i] for i in scored])
        for i, score in zip(scored, scores, strict=True):
            per_pair[i] = score["rouge-l"]["f"]
    # Summed in order from 0 and divided by the count, as the package averages.
    return sum(per_pair) / len(per_pair)


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


class StaticMetrics(BaseModel):
    """Table 1 metrics as fractions in [0, 1] (``None`` where no sample applies), with counts.

    ``n_arg`` is the number of samples in the Arg. F1 average; ``n_easy`` and
    ``n_hard`` the sizes of the easy and hard lists (action mismatches are in both).
    """

    plan_acc: float | None
    action_em: float | None
    arg_f1: float | None
    easy_f1: float | None
    hard_f1: float | None
    hallu_rate: float | None
    rouge_l: float | None
    n: int
    n_call: int
    n_finish: int
    n_give_up: int
    n_arg: int
    n_easy: int
    n_hard: int
    n_hallucinated: int


def _as_record(record: PredictionRecord | Mapping[str, Any]) -> PredictionRecord:
    return record if isinstance(record, PredictionRecord) else PredictionRecord.model_validate(record)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _is_hallucinated(predicted: ParsedOutput, tool_names: set[str]) -> bool:
    action = predicted.action
    return action is not None and action != NONE_TEXT and action not in tool_names


def score_predictions(records: Sequence[PredictionRecord | Mapping[str, Any]]) -> StaticMetrics:
    """Compute the Table 1 metrics of a list of samples.

    Plain dicts (records read from a predictions file) are validated as
    :class:`PredictionRecord`; a malformed one raises ``pydantic.ValidationError``.
    """
    plan_hits = 0
    hallucinated = 0
    plans = {plan: 0 for plan in Plan}
    action_hits: list[float] = []
    f1: list[float] = []
    easy: list[float] = []
    hard: list[float] = []
    answer_hyps: list[str] = []
    answer_refs: list[str] = []
    for record in map(_as_record, records):
        ref = parse_output(record.reference)
        pred = parse_output(record.predictions)
        plans[ref.plan] += 1
        plan_hits += ref.plan == pred.plan
        hallucinated += _is_hallucinated(pred, record.tool_names())
        if ref.plan is Plan.FINISH:
            answer_refs.append(ref.answer if ref.answer is not None else "")
            answer_hyps.append(NONE_TEXT if pred.answer is None else pred.answer)
        elif ref.plan is Plan.CALL:
            pred_action = NONE_TEXT if pred.action is None else pred.action
            pred_input = "{}" if pred.action_input is None else pred.action_input
            action_hits.append(1.0 if pred_action == ref.action else 0.0)
            _book(_arg_score(ref, pred_action, pred_input), f1, easy, hard)
    n = len(records)
    return StaticMetrics(
        plan_acc=plan_hits / n if n else None,
        action_em=_mean(action_hits),
        arg_f1=_mean(f1),
        easy_f1=_mean(easy),
        hard_f1=_mean(hard),
        hallu_rate=hallucinated / n if n else None,
        rouge_l=rouge_l(answer_hyps, answer_refs),
        n=n,
        n_call=plans[Plan.CALL],
        n_finish=plans[Plan.FINISH],
        n_give_up=plans[Plan.GIVE_UP],
        n_arg=len(f1),
        n_easy=len(easy),
        n_hard=len(hard),
        n_hallucinated=hallucinated,
    )


def _arg_score(ref: ParsedOutput, pred_action: str, pred_input: str) -> ArgScore:
    # A parsed ``call`` always has both fields; the fallbacks only satisfy the type checker.
    ref_action = ref.action if ref.action is not None else NONE_TEXT
    ref_input = ref.action_input if ref.action_input is not None else "{}"
    return arg_f1_sample(ref_action, pred_action, ref_input, pred_input)


def _book(arg: ArgScore, f1: list[float], easy: list[float], hard: list[float]) -> None:
    if arg.score is None:
        return
    f1.append(arg.score)
    if arg.bucket in (ArgBucket.BOTH, ArgBucket.EASY):
        easy.append(arg.score)
    if arg.bucket in (ArgBucket.BOTH, ArgBucket.HARD):
        hard.append(arg.score)


# ---------------------------------------------------------------------------
# Published numbers and the table
# ---------------------------------------------------------------------------


class PaperRow(BaseModel):
    """One row of the α-UMi paper's Table 1, in percent as published."""

    model_config = ConfigDict(frozen=True)

    system: str
    split: str
    plan_acc: float
    action_em: float
    hallu_rate: float
    arg_f1: float
    rouge_l: float


def _row(system: str, split: str, *values: float) -> tuple[str, PaperRow]:
    plan_acc, action_em, hallu_rate, arg_f1, rouge = values
    key = f"{system.lower().replace(' ', '-')}/{split}"
    row = PaperRow(
        system=system,
        split=split,
        plan_acc=plan_acc,
        action_em=action_em,
        hallu_rate=hallu_rate,
        arg_f1=arg_f1,
        rouge_l=rouge,
    )
    return key, row


#: Table 1 of the α-UMi paper (static evaluation, percent); α-UMi rows are "w/ reuse".
PAPER_TABLE1: Mapping[str, PaperRow] = dict(
    [
        _row("alpha-UMi 7B", "in-domain", 88.92, 58.94, 0.57, 52.24, 43.17),
        _row("alpha-UMi 7B", "out-of-domain", 89.72, 60.47, 0.45, 53.60, 46.26),
        _row("alpha-UMi 13B", "in-domain", 87.87, 63.03, 0.37, 57.65, 43.46),
        _row("alpha-UMi 13B", "out-of-domain", 88.73, 64.21, 0.24, 57.38, 42.50),
        _row("Single-LLM 7B", "out-of-domain", 84.61, 56.54, 2.26, 50.09, 47.99),
        _row("ChatGPT 0-shot", "out-of-domain", 81.62, 54.67, 8.19, 40.08, 22.85),
    ]
)

# (label, StaticMetrics field, PaperRow field or None, count field)
_TABLE_ROWS: tuple[tuple[str, str, str | None, str], ...] = (
    ("Plan ACC", "plan_acc", "plan_acc", "n"),
    ("Act. EM", "action_em", "action_em", "n_call"),
    ("Hallu.", "hallu_rate", "hallu_rate", "n"),
    ("Arg. F1", "arg_f1", "arg_f1", "n_arg"),
    ("  easy", "easy_f1", None, "n_easy"),
    ("  hard", "hard_f1", None, "n_hard"),
    ("R-L", "rouge_l", "rouge_l", "n_finish"),
)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def metrics_table(metrics: StaticMetrics, compare: PaperRow | None = None) -> str:
    """A text table of the metrics in percent, optionally next to a published row."""
    header = ["metric", "ours %", "samples"]
    if compare is not None:
        header[2:2] = ["paper %", "diff"]
    rows = [header]
    for label, field, paper_field, count_field in _TABLE_ROWS:
        value = getattr(metrics, field)
        row = [label, _percent(value), str(getattr(metrics, count_field))]
        if compare is not None:
            paper = getattr(compare, paper_field) if paper_field else None
            diff = "" if paper is None or value is None else f"{100 * value - paper:+.2f}"
            row[2:2] = ["" if paper is None else f"{paper:.2f}", diff]
        rows.append(row)
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    lines = [_table_line(row, widths) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if compare is not None:
        lines.insert(0, f"paper: {compare.system}, {compare.split} (alpha-UMi Table 1)")
    return "\n".join(lines)


def _table_line(row: Sequence[str], widths: Sequence[int]) -> str:
    cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
    return "  ".join(cells).rstrip()
