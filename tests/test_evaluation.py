"""Static-evaluation metrics (evaluation.metrics) against independently computed values.

The samples are the planner decision points of the bundled trajectories. Every
expected value below is computed in this file from the raw conversation turns and
the metric definitions, never by calling evaluation.metrics's scoring helpers.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from rouge import Rouge

from evaluation.metrics import (
    PAPER_TABLE1,
    ParsedOutput,
    Plan,
    PredictionRecord,
    StaticMetrics,
    format_prediction,
    is_decision_point,
    load_predictions,
    metrics_table,
    parse_output,
    reference_for,
    rouge_l,
    save_predictions,
    score_predictions,
)
from shared.prompts import NextRole, Speaker, ToolDoc, Turn
from shared.roles import LLMRole, StepRole
from tests.conftest import load_trajectories

MARKERS = ("Next: caller.", "Next: conclusion.", "Next: give up.")
METRIC_KEYS = {"plan_acc", "action_em", "arg_f1", "easy_f1", "hard_f1", "hallu_rate", "rouge_l"}


# ---------------------------------------------------------------------------
# Samples built straight from the data (independent of evaluation.metrics)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One decision point with its ground truth, read directly from the turns."""

    tools: tuple[ToolDoc, ...]
    plan_text: str
    kind: str  # "call" | "finish" | "give up"
    reference: str
    action: str | None = None
    args: dict[str, Any] | None = None
    answer: str | None = None
    predictions: str = ""

    @property
    def names(self) -> set[str]:
        return {tool.Name for tool in self.tools}

    def record(self) -> PredictionRecord:
        return PredictionRecord(tools=list(self.tools), reference=self.reference, predictions=self.predictions)


def _build_samples() -> list[Sample]:
    samples = []
    for raw in load_trajectories():
        tools = tuple(ToolDoc.model_validate(t) for t in raw["tools"])
        turns = [Turn.model_validate(t) for t in raw["conversations"]]
        for i, turn in enumerate(turns):
            if turn.speaker is not Speaker.ASSISTANT or not any(m in turn.value for m in MARKERS):
                continue
            if "Next: give up." in turn.value:
                samples.append(Sample(tools, turn.value, "give up", reference=turn.value))
                continue
            nxt = turns[i + 1]
            reference = f"assistant: {turn.value}</s>{nxt.speaker.value}: {nxt.value}</s>"
            if nxt.speaker is Speaker.CALLER:
                head, _, args = nxt.value.partition("\nAction Input: ")
                action = head.removeprefix("Action: ")
                samples.append(Sample(tools, turn.value, "call", reference, action=action, args=json.loads(args)))
            else:
                samples.append(Sample(tools, turn.value, "finish", reference, answer=nxt.value))
    return [replace(s, predictions=s.reference) for s in samples]


SAMPLES = _build_samples()
N = len(SAMPLES)
CALLS = [i for i, s in enumerate(SAMPLES) if s.kind == "call"]
FINISHES = [i for i, s in enumerate(SAMPLES) if s.kind == "finish"]
GIVE_UPS = [i for i, s in enumerate(SAMPLES) if s.kind == "give up"]
EASY = [i for i in CALLS if SAMPLES[i].args == {}]
HARD = [i for i in CALLS if SAMPLES[i].args != {}]


def call_text(plan: str, action: str, args: str) -> str:
    return f"assistant: {plan}</s>caller: Action: {action}\nAction Input: {args}</s>"


def finish_text(plan: str, answer: str) -> str:
    return f"assistant: {plan}</s>conclusion: {answer}</s>"


def score(samples: list[Sample]) -> StaticMetrics:
    return score_predictions([s.record() for s in samples])


def damaged(changes: dict[int, str]) -> list[Sample]:
    return [replace(s, predictions=changes.get(i, s.predictions)) for i, s in enumerate(SAMPLES)]


def assert_unchanged(metrics: StaticMetrics, baseline: StaticMetrics, *moved: str) -> None:
    for key in METRIC_KEYS - set(moved):
        assert getattr(metrics, key) == getattr(baseline, key), key


@pytest.fixture(scope="module")
def baseline() -> StaticMetrics:
    return score(SAMPLES)


def test_the_data_has_every_kind_of_sample() -> None:
    assert len(CALLS) >= 20 and len(FINISHES) >= 5 and len(GIVE_UPS) >= 3
    assert len(EASY) >= 5 and len(HARD) >= 5
    assert N == len(CALLS) + len(FINISHES) + len(GIVE_UPS)


def test_reference_for_matches_the_data() -> None:
    built = []
    for raw in load_trajectories():
        turns = [Turn.model_validate(t) for t in raw["conversations"]]
        for i, turn in enumerate(turns):
            if turn.speaker is Speaker.ASSISTANT and is_decision_point(turn.value):
                built.append(reference_for(turn.value, turns[i + 1] if i + 1 < len(turns) else None))
    assert built == [s.reference for s in SAMPLES]


# ---------------------------------------------------------------------------
# Perfect predictions
# ---------------------------------------------------------------------------


def test_perfect_predictions_score_one(baseline: StaticMetrics) -> None:
    own_hallucinations = sum(1 for s in SAMPLES if s.kind == "call" and s.action not in s.names)
    assert baseline.plan_acc == 1.0
    assert baseline.action_em == 1.0
    assert baseline.arg_f1 == 1.0
    assert baseline.easy_f1 == 1.0
    assert baseline.hard_f1 == 1.0
    assert baseline.hallu_rate == own_hallucinations / N
    assert baseline.rouge_l == pytest.approx(1.0, abs=1e-6)
    refs = [SAMPLES[i].answer for i in FINISHES]
    assert baseline.rouge_l == Rouge().get_scores(refs, refs, avg=True)["rouge-l"]["f"]
    assert (baseline.n, baseline.n_call, baseline.n_finish, baseline.n_give_up) == (
        N,
        len(CALLS),
        len(FINISHES),
        len(GIVE_UPS),
    )
    assert (baseline.n_arg, baseline.n_easy, baseline.n_hard) == (len(CALLS), len(EASY), len(HARD))
    assert baseline.n_hallucinated == own_hallucinations


def test_dumped_keys_are_the_metrics_and_counts(baseline: StaticMetrics) -> None:
    counts = {"n", "n_call", "n_finish", "n_give_up", "n_arg", "n_easy", "n_hard", "n_hallucinated"}
    assert set(baseline.model_dump()) == METRIC_KEYS | counts


# ---------------------------------------------------------------------------
# Damaged predictions: each metric moves by exactly its definition
# ---------------------------------------------------------------------------


def test_wrong_plan_moves_only_plan_acc(baseline: StaticMetrics) -> None:
    # Give-up samples predicted as conclusions: no action, no answer list entry.
    changes = {i: finish_text("Done. Next: conclusion.", "an answer") for i in GIVE_UPS[:3]}
    metrics = score(damaged(changes))
    assert metrics.plan_acc == (N - 3) / N
    assert_unchanged(metrics, baseline, "plan_acc")


def test_give_up_instead_of_a_call_misses_the_action(baseline: StaticMetrics) -> None:
    easy, hard = EASY[:1], HARD[:2]
    metrics = score(damaged({i: "I cannot do it. Next: give up." for i in easy + hard}))
    k = len(easy) + len(hard)
    assert metrics.plan_acc == (N - k) / N
    assert metrics.action_em == (len(CALLS) - k) / len(CALLS)
    assert metrics.arg_f1 == (len(CALLS) - k) / len(CALLS)
    assert metrics.hallu_rate == baseline.hallu_rate  # a missing action is not a hallucination


def test_wrong_action_name(baseline: StaticMetrics) -> None:
    picked = [i for i in CALLS if len(SAMPLES[i].tools) >= 2]
    easy = [i for i in picked if i in EASY][:3]
    hard = [i for i in picked if i in HARD][:4]
    changes = {}
    for i in easy + hard:
        s = SAMPLES[i]
        other = next(name for name in sorted(s.names) if name != s.action)
        changes[i] = call_text(s.plan_text, other, json.dumps(s.args))
    metrics = score(damaged(changes))
    k, c, e, h = len(changes), len(CALLS), len(EASY), len(HARD)
    assert metrics.action_em == (c - k) / c
    assert metrics.arg_f1 == (c - k) / c
    # The reference code books an action mismatch as 0 in BOTH the easy and the hard list.
    assert metrics.easy_f1 == (e - len(easy)) / (e - len(easy) + k)
    assert metrics.hard_f1 == (h - len(hard)) / (h - len(hard) + k)
    assert (metrics.n_arg, metrics.n_easy, metrics.n_hard) == (c, e - len(easy) + k, h - len(hard) + k)
    assert metrics.hallu_rate == baseline.hallu_rate  # the other name is one of the sample's tools
    assert_unchanged(metrics, baseline, "action_em", "arg_f1", "easy_f1", "hard_f1")


def _changed(value: Any) -> Any:
    return f"{value}-changed" if isinstance(value, str) else "__changed__"


def test_half_the_arguments_wrong(baseline: StaticMetrics) -> None:
    changes, expected = {}, {}
    for i in HARD:
        s = SAMPLES[i]
        m = len(s.args)
        wrong = max(1, m // 2)
        args = {k: (_changed(v) if j < wrong else v) for j, (k, v) in enumerate(s.args.items())}
        changes[i] = call_text(s.plan_text, s.action, json.dumps(args))
        expected[i] = (m - wrong + 0.5 * wrong) / m  # same keys: precision == recall
    metrics = score(damaged(changes))
    hard_scores = [expected[i] for i in HARD]
    assert metrics.hard_f1 == pytest.approx(sum(hard_scores) / len(HARD), abs=1e-12)
    assert metrics.arg_f1 == pytest.approx((len(EASY) + sum(hard_scores)) / len(CALLS), abs=1e-12)
    assert metrics.easy_f1 == 1.0
    assert_unchanged(metrics, baseline, "arg_f1", "hard_f1")


def test_missing_and_extra_keys_use_recall_and_precision() -> None:
    multi = [i for i in HARD if len(SAMPLES[i].args) >= 2]
    single = [i for i in HARD if len(SAMPLES[i].args) == 1]
    dropped, extra = multi[0], single[0]
    s_drop, s_extra = SAMPLES[dropped], SAMPLES[extra]
    first = next(iter(s_drop.args))
    fewer = {k: v for k, v in s_drop.args.items() if k != first}
    more = {**s_extra.args, "an_extra_key": 1}
    changes = {
        dropped: call_text(s_drop.plan_text, s_drop.action, json.dumps(fewer)),
        extra: call_text(s_extra.plan_text, s_extra.action, json.dumps(more)),
    }
    metrics = score(damaged(changes))
    m = len(s_drop.args)
    f_drop = 2 * ((m - 1) / m) * 1.0 / ((m - 1) / m + 1.0)  # recall (m-1)/m, precision 1
    f_extra = 2 * 1.0 * (1 / 2) / (1.0 + 1 / 2)  # recall 1, precision 1/2
    expected = (len(HARD) - 2 + f_drop + f_extra) / len(HARD)
    assert metrics.hard_f1 == pytest.approx(expected, abs=1e-12)


def test_unparseable_arguments(baseline: StaticMetrics) -> None:
    easy, hard = EASY[:2], HARD[:3]
    changes = {i: call_text(SAMPLES[i].plan_text, SAMPLES[i].action, '{"broken": ') for i in easy + hard}
    # A reference {} scores 0 against any non-{} prediction, even a valid one.
    easy_nonempty = EASY[2]
    s = SAMPLES[easy_nonempty]
    changes[easy_nonempty] = call_text(s.plan_text, s.action, '{"page": 1}')
    metrics = score(damaged(changes))
    c, e, h = len(CALLS), len(EASY), len(HARD)
    assert metrics.arg_f1 == (c - len(changes)) / c
    # An unparseable prediction stays in its reference's list (as 0): no list grows.
    assert metrics.easy_f1 == (e - len(easy) - 1) / e
    assert metrics.hard_f1 == (h - len(hard)) / h
    assert (metrics.n_arg, metrics.n_easy, metrics.n_hard) == (c, e, h)
    assert_unchanged(metrics, baseline, "arg_f1", "easy_f1", "hard_f1")


def test_unparseable_reference_arguments_are_skipped() -> None:
    i = HARD[0]
    samples = damaged({})
    s = samples[i]
    broken = call_text(s.plan_text, s.action, "{not json")
    samples[i] = replace(s, reference=broken, predictions=broken)
    metrics = score(samples)
    assert (metrics.n_arg, metrics.n_hard) == (len(CALLS) - 1, len(HARD) - 1)
    assert metrics.arg_f1 == 1.0 and metrics.action_em == 1.0


def test_hallucinated_tool_names(baseline: StaticMetrics) -> None:
    k_call, k_give_up = 4, 2
    changes = {i: call_text(SAMPLES[i].plan_text, "made_up_tool_for_tests", "{}") for i in CALLS[:k_call]}
    for i in GIVE_UPS[:k_give_up]:  # counted over ALL samples, not only reference calls
        changes[i] = call_text("Let me try. Next: caller.", "another_made_up_tool", "{}")
    # No Action: at all → action 'none', which is a miss but not a hallucination.
    no_action = CALLS[k_call]
    changes[no_action] = f"assistant: {SAMPLES[no_action].plan_text}</s>caller: Action Input: {{}}</s>"
    metrics = score(damaged(changes))
    own = sum(1 for s in SAMPLES if s.kind == "call" and s.action not in s.names)
    assert metrics.n_hallucinated == own + k_call + k_give_up
    assert metrics.hallu_rate == (own + k_call + k_give_up) / N
    assert metrics.action_em == (len(CALLS) - k_call - 1) / len(CALLS)
    assert metrics.plan_acc == (N - k_give_up) / N


def test_changed_answers_follow_the_rouge_package(baseline: StaticMetrics) -> None:
    first, second, as_call = FINISHES[0], FINISHES[1], FINISHES[2]
    changes = {
        first: finish_text(SAMPLES[first].plan_text, "I could not find the information you asked for."),
        second: finish_text(SAMPLES[second].plan_text, SAMPLES[second].answer.upper()),
        as_call: call_text("Call more. Next: caller.", sorted(SAMPLES[as_call].names)[0], "{}"),
    }
    metrics = score(damaged(changes))
    refs = [SAMPLES[i].answer for i in FINISHES]
    hyps = list(refs)
    hyps[0] = "I could not find the information you asked for."
    hyps[1] = SAMPLES[second].answer.upper()
    hyps[2] = "none"  # a prediction without an answer counts as 'none'
    expected = Rouge().get_scores(hyps, refs, avg=True)["rouge-l"]["f"]
    assert metrics.rouge_l == expected
    assert metrics.rouge_l < baseline.rouge_l
    assert metrics.plan_acc == (N - 1) / N
    assert_unchanged(metrics, baseline, "rouge_l", "plan_acc")


def test_an_empty_answer_scores_zero_for_its_pair() -> None:
    empty, dots = FINISHES[0], FINISHES[1]
    changes = {empty: finish_text(SAMPLES[empty].plan_text, ""), dots: finish_text(SAMPLES[dots].plan_text, "...")}
    with pytest.raises(ValueError):  # why the pair needs a definition
        Rouge().get_scores([""], [SAMPLES[empty].answer])
    metrics = score(damaged(changes))
    rest = [SAMPLES[i].answer for i in FINISHES[2:]]
    per_pair = [p["rouge-l"]["f"] for p in Rouge().get_scores(rest, rest)]
    assert metrics.rouge_l == pytest.approx(sum(per_pair) / len(FINISHES), rel=1e-12)


def test_rouge_l_survives_long_sentences() -> None:
    # One sentence each, few common words: the LCS walk is about 1,200 steps deep.
    hyp = " ".join(f"h{i}" if i % 10 else f"w{i}" for i in range(600))
    ref = " ".join(f"r{i}" if i % 10 else f"w{i}" for i in range(600))
    limit = sys.getrecursionlimit()
    if limit < 1200:  # the package recurses once per LCS step (up to 1,200 here)
        with pytest.raises(RecursionError):
            Rouge().get_scores([hyp], [ref])
    value = rouge_l([hyp], [ref])
    assert sys.getrecursionlimit() == limit
    sys.setrecursionlimit(limit + 2000)
    try:
        expected = Rouge().get_scores([hyp], [ref], avg=True)["rouge-l"]["f"]
    finally:
        sys.setrecursionlimit(limit)
    assert value == expected > 0


# ---------------------------------------------------------------------------
# Empty cases, the original file format, parsing and string builders
# ---------------------------------------------------------------------------


def test_empty_denominators_are_none() -> None:
    assert score_predictions([]).model_dump() == {
        **dict.fromkeys(METRIC_KEYS),
        **dict.fromkeys(("n", "n_call", "n_finish", "n_give_up", "n_arg", "n_easy", "n_hard", "n_hallucinated"), 0),
    }
    only_give_up = score([SAMPLES[i] for i in GIVE_UPS])
    assert only_give_up.plan_acc == 1.0 and only_give_up.hallu_rate == 0.0
    assert only_give_up.action_em is None and only_give_up.arg_f1 is None and only_give_up.rouge_l is None
    assert "n/a" in metrics_table(only_give_up)


def test_scores_a_file_in_the_original_pipeline_format(tmp_path: Path, baseline: StaticMetrics) -> None:
    # infer_pipeline.py: "asssitant: " typo, no trailing </s>, bare plan text for give up.
    records = []
    for raw in load_trajectories():
        turns = raw["conversations"]
        for j, turn in enumerate(turns):
            if turn["from"] != "assistant" or not any(m in turn["value"] for m in MARKERS):
                continue
            value = turn["value"]
            if "Next: give up." in value:
                reference, predictions = value, value
            else:
                nxt = turns[j + 1]
                reference = f"assistant: {value}</s>{nxt['from']}: {nxt['value']}</s>"
                predictions = f"asssitant: {value}</s>{nxt['from']}: {nxt['value']}"
            records.append(
                {
                    "tools": raw["tools"],
                    "instruction": raw["instruction"],
                    "history": turns[:j],
                    "dispath": "user: ...</s>",
                    "model_input": "... assistant: ",
                    "reference": reference,
                    "predictions": predictions,
                    "planner_prediction": value,
                }
            )
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(records))
    loaded = load_predictions(path)
    assert loaded[0].model_dump()["dispath"] == "user: ...</s>"  # extra fields are kept
    assert loaded[0].model_dump()["history"] == records[0]["history"]
    metrics = score_predictions(loaded)
    assert metrics.model_dump() == baseline.model_dump()
    assert score_predictions(records) == metrics  # plain dicts are accepted as well
    with pytest.raises(ValidationError):
        score_predictions([{"reference": "no predictions field"}])
    again = tmp_path / "again.json"
    save_predictions(loaded, again)
    assert json.loads(again.read_text()) == records


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("think. Next: give up.", ParsedOutput(plan=Plan.GIVE_UP)),
        ("x Next: conclusion. Next: give up.", ParsedOutput(plan=Plan.GIVE_UP)),
        ("asssitant: x Next: conclusion.</s>conclusion: the answer</s>", ParsedOutput(plan=Plan.FINISH, answer="the answer")),
        ("x Next: conclusion.</s>", ParsedOutput(plan=Plan.FINISH, answer="x Next: conclusion.")),
        (
            "assistant: x Next: caller.</s>caller: Action: a_tool\nAction Input: {\"q\": 1}</s>",
            ParsedOutput(plan=Plan.CALL, action="a_tool", action_input='{"q": 1}'),
        ),
        (  # only the segment between the first two </s> counts
            "assistant: x</s>caller: Action: first\nAction Input: {}</s>caller: Action: second</s>",
            ParsedOutput(plan=Plan.CALL, action="first", action_input="{}"),
        ),
        (  # last Action: wins; no Action Input: → {}
            "a</s>caller: Action: one Action: two",
            ParsedOutput(plan=Plan.CALL, action="two", action_input="{}"),
        ),
        ("a</s>caller: nothing", ParsedOutput(plan=Plan.CALL, action="none", action_input="{}")),
        ("no stop sequence at all", ParsedOutput(plan=Plan.CALL, action="none", action_input="{}")),
    ],
)
def test_parse_output(text: str, expected: ParsedOutput) -> None:
    assert parse_output(text) == expected


def test_reference_for_and_format_prediction() -> None:
    caller = Turn(speaker=Speaker.CALLER, value='Action: t\nAction Input: {"a": 1}')
    conclusion = Turn(speaker=Speaker.CONCLUSION, value="The answer.")
    assert reference_for("go Next: caller.", caller) == 'assistant: go Next: caller.</s>caller: Action: t\nAction Input: {"a": 1}</s>'
    assert reference_for("done Next: conclusion.", conclusion) == "assistant: done Next: conclusion.</s>conclusion: The answer.</s>"
    assert reference_for("stuck Next: give up.", None) == "stuck Next: give up."
    with pytest.raises(ValueError):
        reference_for("go Next: caller.", None)
    assert format_prediction("go Next: caller.", NextRole.CALLER, "Action: t\nAction Input: {}") == (
        "assistant: go Next: caller.</s>caller: Action: t\nAction Input: {}</s>"
    )
    assert format_prediction("done Next: conclusion.", "conclusion", "Fine.") == (
        "assistant: done Next: conclusion.</s>conclusion: Fine.</s>"
    )
    assert format_prediction("done Next: conclusion.", "conclusion", " . ") == (
        "assistant: done Next: conclusion.</s>conclusion: none</s>"
    )
    assert format_prediction("stuck Next: give up.", NextRole.GIVE_UP, "ignored") == "stuck Next: give up."
    # The role names of the rest of the code base work too; None means nobody followed.
    assert format_prediction("done Next: conclusion.", StepRole.SUMMARIZER, "Fine.") == (
        "assistant: done Next: conclusion.</s>conclusion: Fine.</s>"
    )
    assert format_prediction("go Next: caller.", LLMRole.CALLER, None) == "assistant: go Next: caller.</s>caller: none</s>"
    assert format_prediction("stuck Next: give up.", None, None) == "stuck Next: give up."
    with pytest.raises(ValueError):
        format_prediction("go Next: caller.", "observation", "x")
    assert reference_for("go Next: caller.", caller.model_dump(by_alias=True)) == reference_for("go Next: caller.", caller)
    assert is_decision_point("a Next: caller.") and not is_decision_point("just thinking")


def test_predictions_built_with_format_prediction_score_perfectly(baseline: StaticMetrics) -> None:
    role = {"call": NextRole.CALLER, "finish": NextRole.CONCLUSION, "give up": NextRole.GIVE_UP}
    built = []
    for s in SAMPLES:
        output = "" if s.kind == "give up" else s.reference.split("</s>")[1].split(": ", 1)[1]
        built.append(replace(s, predictions=format_prediction(s.plan_text, role[s.kind], output)))
    assert score(built).model_dump() == baseline.model_dump()


def test_paper_numbers_and_table(baseline: StaticMetrics) -> None:
    ood = PAPER_TABLE1["alpha-umi-7b/out-of-domain"]
    assert (ood.plan_acc, ood.action_em, ood.hallu_rate, ood.arg_f1, ood.rouge_l) == (89.72, 60.47, 0.45, 53.60, 46.26)
    ind = PAPER_TABLE1["alpha-umi-7b/in-domain"]
    assert (ind.plan_acc, ind.action_em, ind.hallu_rate, ind.arg_f1, ind.rouge_l) == (88.92, 58.94, 0.57, 52.24, 43.17)
    table = metrics_table(baseline, compare=ood)
    for label in ("Plan ACC", "Act. EM", "Hallu.", "Arg. F1", "R-L"):
        assert label in table
    plan_row = next(line for line in table.splitlines() if line.startswith("Plan ACC"))
    assert plan_row.split() == ["Plan", "ACC", "100.00", "89.72", "+10.28", str(N)]
    assert math.isclose(float(next(line for line in table.splitlines() if line.startswith("R-L")).split()[1]), 100.0)
