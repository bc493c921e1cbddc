"""hm3_jax as an lm-evaluation-harness model: ``--model hm3_jax`` (registered when this module is imported).

    python -m experiments.harness_eval --model hm3_jax --model_args pretrained=out/merged --tasks gsm8k
    python -m experiments.harness_eval --model hm3_jax --model_args run=runs/x,preference=0.6:0.3:0.1 \\
        --tasks my_task --include_path my_tasks/

    import lm_eval
    from hm3_jax.evaluation.lm_eval_model import HM3JaxLM
    lm_eval.simple_evaluate(model=HM3JaxLM(pretrained="out/merged"), tasks=[...])
    lm_eval.simple_evaluate(model="hm3_jax", model_args="pretrained=out/merged", tasks=[...])  # after the import

`model_args` (`hm3_jax.evaluation.sources`): one of ``pretrained=DIR``, ``run=DIR,preference=a:b:c``,
``path_model=DIR``; optional ``dtype`` (float32 / bfloat16), ``batch_size`` (default 16; the harness's
``--batch_size``), ``max_length`` (default: the model's max_position_embeddings, as the harness's hf backend),
``mesh`` (e.g. ``mesh=data:2,model:4``, the axes of run_hm3's ``--mesh``, `distributed.make_mesh`, over all the
process's devices; "paths" must be 1): the model placed as the path engine places it, tensor parallel over
"model", each batch's rows split over "data" (`batch_size` a multiple of its size; one process only). On the
harness's command line quote the spec's commas: ``--model_args "pretrained=DIR,mesh='data:2,model:4'"``.

Every request is answered as lm-eval's ``hf`` backend (`lm_eval.models.huggingface.HFLM`) answers it on the
same checkpoint, on hm3_jax's own forward and KV-cache decoder (`hm3_jax.evaluation.token_requests`):

* tokenisation: the tokenizer's own special-token rule (`tok_encode`: BOS for Llama, none for GPT-2 / Qwen2;
  none added to a string that already starts with the BOS text); (context, continuation) split by the
  harness's `TemplateLM._encode_pair` (trailing context spaces move to the continuation; continuation ids =
  ids(context + continuation) after ids(context)); an empty context is the prefix token (BOS, else EOS);
* ``loglikelihood``: (sum of continuation log-probabilities, whether greedy decoding reproduces it), rows
  left-truncated to the context length; ``loglikelihood_rolling``: the harness's disjoint rolling windows
  (`lm_eval.utils.get_rolling_token_windows`, context 1), summed;
* ``generate_until``: greedy decoding (``do_sample=True`` is refused) of at most ``max_gen_toks`` tokens
  (default 256) from the context left-truncated to ``max_length - max_gen_toks`` tokens, the text of the
  tokens up to and including the first EOS id decoded without special tokens, cut before the first stop
  string of ``until`` + the EOS token's text. Not stripped: the task's filters and metric do that.

Requests are sorted by length and padded to a few bucket shapes, so each jitted program compiles a handful of
times per model, not once per request.
"""

from __future__ import annotations

import json
import logging
import re

import jax
import numpy as np
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from hm3_jax import distributed
from hm3_jax.evaluation import token_requests
from hm3_jax.evaluation.sources import ModelArgsError, load_model
from hm3_jax.tasks import harness_task

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
_MESH_AXIS = re.compile(r"\s*(paths|data|model)\s*:\s*-?\d+\s*['\"]?\s*")  # one "axis:size" of a mesh spec


def _batch_size(value) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        if value is not None:
            log.info("hm3_jax: batch_size=%s -> %d (no automatic batch size)", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError) as e:
        raise ModelArgsError(f"batch_size={value!r}: expected a positive integer") from e
    if size < 1:
        raise ModelArgsError(f"batch_size={value!r}: expected a positive integer")
    return size


def _mesh(spec, batch_size: int):
    """The ("paths", "data", "model") mesh of a ``mesh=`` model_arg over this process's devices."""
    if jax.process_count() > 1:
        raise ModelArgsError(
            f"mesh={spec}: the hm3_jax lm-eval model runs in one process; this is one of "
            f"{jax.process_count()}"
        )
    try:
        mesh = distributed.make_mesh(str(spec))
    except ValueError as e:
        raise ModelArgsError(f"mesh={spec}: {e}") from e
    sizes = dict(mesh.shape)
    if sizes["paths"] != 1:
        raise ModelArgsError(
            f"mesh={spec}: the adapter evaluates one model; put the devices on 'data' and "
            f"'model' (got paths:{sizes['paths']})"
        )
    if batch_size % sizes["data"]:
        raise ModelArgsError(
            f"mesh={spec}: batch_size={batch_size} is not a multiple of data:{sizes['data']} "
            "(each batch's rows are split over it)"
        )
    return mesh


@register_model("hm3_jax")
class HM3JaxLM(TemplateLM):
    """lm-eval's model interface on an hm3_jax model (module docstring)."""

    def __init__(
        self,
        pretrained: str | None = None,
        run: str | None = None,
        preference=None,
        path_model: str | None = None,
        dtype: str = "float32",
        batch_size=None,
        max_length: int | None = None,
        mesh: str | None = None,
        max_batch_size=None,
        device=None,
        **unknown,
    ) -> None:
        """Args as the module docstring's `model_args`; `max_batch_size` and `device` (the harness's own
        arguments) are accepted and unused (JAX places the model). Raises ModelArgsError on unknown keys."""
        super().__init__()
        if unknown:
            known = "pretrained, run, preference, path_model, dtype, batch_size, max_length, mesh"
            raise ModelArgsError(f"unknown model_args {sorted(unknown)} for --model hm3_jax (known: {known})")
        loaded = load_model(
            pretrained=pretrained, run=run, preference=preference, path_model=path_model, dtype=dtype
        )
        self.model, self.tokenizer, self.eos_ids = loaded.model, loaded.tokenizer, loaded.eos_ids
        self.source = loaded.source
        self.directory = loaded.directory
        self.batch_size = _batch_size(batch_size)
        context = int(self.model.config.max_position_embeddings)
        self.max_length = context if max_length is None else int(max_length)
        if not 1 <= self.max_length <= context:
            raise ModelArgsError(f"max_length={max_length}: must lie in [1, {context}] (the model's context)")
        self.mesh = None if mesh is None else _mesh(mesh, self.batch_size)
        if self.mesh is not None:
            self.model = token_requests.place_on_mesh(self.model, self.mesh)
        self.pad_id = next(
            (int(t) for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HM3JaxLM:
        """The harness's ``key=value,...`` parsing (`simple_parse_args_string`), except that ``mesh=data:2,model:4``
        keeps its comma-separated axes (an ``axis:size`` part after ``mesh=...`` continues the spec)."""
        parts: list[str] = []
        for part in (arg_string or "").split(","):
            if parts and parts[-1].strip().startswith("mesh=") and _MESH_AXIS.fullmatch(part):
                parts[-1] += "," + part
            elif part.strip():
                parts.append(part)
        args = {}
        for part in parts:
            key, _, value = part.strip().partition("=")
            args |= (
                {"mesh": value.strip().strip("'\"")}
                if key == "mesh"
                else lm_eval_utils.simple_parse_args_string(part)
            )
        return cls(**args, **{k: v for k, v in (additional_config or {}).items() if v is not None})

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: BOS, else EOS (as the hf backend)."""
        return harness_task.prefix_token_id(self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return harness_task.DEFAULT_MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs,
    ) -> list[int]:
        """The harness's ids of `string` (`harness_task.encode`)."""
        return harness_task.encode(self.tokenizer, string, add_special_tokens, left_truncate_len)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (ll, greedy) each."""
        ll, greedy = token_requests.loglikelihoods(
            self.model, [(r[1], r[2]) for r in requests], self.batch_size, self.max_length, self.pad_id
        )
        out = [(float(a), bool(g)) for a, g in zip(ll, greedy, strict=True)]
        for (key, _, _), answer in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-probability over the harness's disjoint rolling windows (all windows of all
        requests batched together)."""
        windows, owner = [], []
        for i, (string,) in enumerate(r.args for r in requests):
            for context, continuation in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = np.zeros(len(requests), np.float64)
        np.add.at(totals, np.asarray(owner, np.int64), [s for s, _ in scores])
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generations, one batched call per distinct generation kwargs (module docstring)."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for idx in groups.values():
            first = requests[idx[0]]
            until, max_gen_toks = harness_task.generation_settings(
                first.args[1], self.tokenizer, f"task {first.task_name!r}"
            )
            room = self.max_length - max_gen_toks
            if room < 1:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for a context in the model's "
                    f"{self.max_length} positions"
                )
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in idx]
            tokens = token_requests.generate(
                self.model, prompts, max_gen_toks, self.batch_size, self.max_length, self.pad_id
            )
            for i, row in zip(idx, tokens, strict=True):
                out[i] = harness_task.continuation_text(self.tokenizer, row, self.eos_ids, until)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out
