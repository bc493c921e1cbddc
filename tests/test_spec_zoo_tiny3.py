"""The built-in tiny3 zoo is a producer of the spec format (`zoo.write_spec`): a run reads its spec, and the spec
scores exactly what the zoo's own objectives score (same padded arrays, same kernels, same numbers) on the whole
splits. On a capped search split (`engine.search_examples`) the spec's translation decodes as many tokens as on
the whole split (the zoo's own capped objective decoded the subset's longest target only)."""

import os

import jax
import numpy as np
import yaml

from hm3_jax.search import problem as problem_lib
from hm3_jax.tasks import scoring, spec_zoo
from hm3_jax.tasks import zoo as zoo_lib


def _same_arrays(a, b) -> bool:
    same = jax.tree.map(lambda x, y: x.shape == y.shape and bool(np.array_equal(x, y)), a, b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


def test_tiny3_spec_scores_what_the_zoo_scores(smoke_zoo_dir):
    path = zoo_lib.write_spec(smoke_zoo_dir)
    assert zoo_lib.write_spec(smoke_zoo_dir) == path  # written once
    spec = yaml.safe_load(open(path))
    assert list(spec["experts"]) == ["translation", "math", "code"]
    assert spec["tasks"]["translation"]["metric"] == "chrf"
    assert spec["tasks"]["math"]["metric"] == "exact_match_teacher_forced"
    for task in spec["tasks"].values():
        assert os.path.isfile(os.path.join(smoke_zoo_dir, task["data"]))
    old = zoo_lib.load(smoke_zoo_dir)
    new = spec_zoo.load(path)
    # the tokenizer beside the checkpoints encodes a prompt as the zoo's objectives do: BOS + its tokens
    prompt = old.data["math"]["search"][0]["prompt"]
    assert new.tokenizer(prompt)["input_ids"] == [old.tokenizer.bos_token_id, *old.tokenizer.encode(prompt)]
    for split in ("search", "heldout"):
        assert [r["prompt"] for r in new.data["code"][split]] == [
            e["prompt"] for e in old.data["code"][split]
        ]
        for task, o in old.objectives[split].items():
            n = new.objectives[split][task]
            assert (n.name, n.metric, n.num_examples, n.batch_size) == (
                o.name,
                o.metric,
                o.num_examples,
                o.batch_size,
            )
            assert _same_arrays(o.arrays.tree, n.arrays.tree), (split, task)
    capped_old = problem_lib.capped_search_objectives(old, old.tasks, 10)
    capped_new = problem_lib.capped_search_objectives(new, new.tasks, 10)
    for o, n in zip(capped_old, capped_new, strict=True):
        if (
            o.metric == "chrf"
        ):  # a spec's task generates alike on every split: the whole split's longest target
            assert n.arrays.tree["new_tokens"].shape == (spec["tasks"]["translation"]["max_new_tokens"],)
            o_tree, n_tree = ({k: v for k, v in x.arrays.tree.items() if k != "new_tokens"} for x in (o, n))
            assert _same_arrays(o_tree, n_tree), o.name
        else:
            assert _same_arrays(o.arrays.tree, n.arrays.tree), o.name
    expert = old.experts["translation"]
    for task in ("translation", "code"):
        a = scoring.score_model(expert.config, expert.params, old.objectives["heldout"][task])
        b = scoring.score_model(expert.config, expert.params, new.objectives["heldout"][task])
        assert a == b
