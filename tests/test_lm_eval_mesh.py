"""The lm-eval adapter on a device mesh (`model_args` ``mesh=data:2,model:4``) answers as on one device.

A child process with 8 simulated CPU devices (`subprocess_env(8)`) builds a tiny random Llama checkpoint and two
adapters on it: one on one device, one placed on a ("data": 2, "model": 4) mesh as the path engine places a
model (tensor parallel over "model", each batch's rows over "data"). Log-likelihoods agree to 1e-5 with the same
greedy flags, generations token for token; the pool is really split over "model"; a batch size the data axis
does not divide, a "paths" axis and a spec the devices do not fit are ModelArgsErrors naming ``mesh=``.
"""

import numpy as np
import pytest

from tests._subprocess_util import child_result

_CHILD = r"""
import json, sys
import jax
import numpy as np
from lm_eval.api.instance import Instance
from hm3_jax.evaluation import token_requests
from hm3_jax.evaluation.lm_eval_model import HM3JaxLM
from hm3_jax.evaluation.sources import ModelArgsError
from tests import hf_fixtures

corpus = ["the quick brown fox jumps over the lazy dog", "hello world, merging models is fun", "a b c 1 2 3"]
tok = hf_fixtures.tiny_tokenizer(corpus, add_bos=True)
ckpt = sys.argv[1] + "/model"
hf_fixtures.make_checkpoint(ckpt, "LlamaForCausalLM", seed=5, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
                            num_hidden_layers=2, num_key_value_heads=4)
tok.save_pretrained(ckpt)
one = HM3JaxLM.create_from_arg_string(f"pretrained={ckpt}", {"batch_size": 4})
sharded = HM3JaxLM.create_from_arg_string(f"pretrained={ckpt},mesh=data:2,model:4", {"batch_size": 4})
out = {"mesh_shape": {k: int(v) for k, v in dict(sharded.mesh.shape).items()}}
out["pool_leaf_shapes"] = [list(jax.tree.leaves(sharded.model.pool)[i].addressable_shards[0].data.shape) for i in range(len(jax.tree.leaves(sharded.model.pool)))]
out["pool_leaf_full"] = [list(x.shape) for x in jax.tree.leaves(sharded.model.pool)]
def reqs(kind, args):
    return [Instance(kind, {}, a, i, ("t", i, 1)) for i, a in enumerate(args)]
ll_args = [("the quick", " brown fox"), ("hello", " world"), ("", "a b c"), ("merging ", "models"), ("a b", " c 1 2"),
           ("the lazy dog jumps over the quick brown", " fox")]
gen_args = [(p, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False})
            for p in ["the quick", "hello world", "a b c 1", "fun", "lazy dog"]]
for name, lm in (("one", one), ("mesh", sharded)):
    out[name] = {"ll": lm.loglikelihood(reqs("loglikelihood", ll_args)),
                 "gen": lm.generate_until(reqs("generate_until", gen_args)),
                 "tokens": token_requests.generate(lm.model, [lm.tok_encode(p) for p, _ in gen_args], 6, 4, 64,
                                                   lm.pad_id).tolist()}
errors = {}
for args, extra in [(f"pretrained={ckpt},mesh=data:2,model:4", {"batch_size": 3}),
                    (f"pretrained={ckpt},mesh=paths:2,data:4", {}), (f"pretrained={ckpt},mesh=data:3", {})]:
    try:
        HM3JaxLM.create_from_arg_string(args, extra)
        errors[args.split(",", 1)[1]] = None
    except ModelArgsError as e:
        errors[args.split(",", 1)[1]] = str(e)
out["errors"] = errors
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_mesh")
    # timeout: a hang bound, XLA:CPU collectives deadlock rather than fail
    return child_result(_CHILD, str(root), timeout=600)


def test_mesh_answers_equal_one_device(child):
    assert child["mesh_shape"] == {"paths": 1, "data": 2, "model": 4}
    split = [s != f for s, f in zip(child["pool_leaf_shapes"], child["pool_leaf_full"], strict=True)]
    assert sum(split) >= 4, child["pool_leaf_shapes"]  # attention and MLP matrices split over "model"
    one, mesh = child["one"], child["mesh"]
    np.testing.assert_allclose([x for x, _ in mesh["ll"]], [x for x, _ in one["ll"]], rtol=0, atol=1e-5)
    assert [g for _, g in mesh["ll"]] == [g for _, g in one["ll"]]
    assert mesh["tokens"] == one["tokens"] and mesh["gen"] == one["gen"]
    assert len(set(map(tuple, one["tokens"]))) > 1  # not a degenerate model


def test_mesh_errors(child):
    errors = child["errors"]
    assert "batch_size=3 is not a multiple of data:2" in errors["mesh=data:2,model:4"]
    assert "paths:2" in errors["mesh=paths:2,data:4"] and errors["mesh=paths:2,data:4"].startswith("mesh=")
    assert "mesh=data:3" in errors["mesh=data:3"] and "8 devices" in errors["mesh=data:3"]
