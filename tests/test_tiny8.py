"""tiny8 (issues 8, 19): data generators, the accuracy objective, the smoke zoo with its frozen heads (Task
Arithmetic's protocol) and ViT paths in the engine."""

import hashlib
import os

import jax
import numpy as np
import pytest

from hm3_jax import models
from hm3_jax.models import ModelConfig
from hm3_jax.paths import engine as engine_lib
from hm3_jax.tasks import accuracy, scoring
from hm3_jax.tasks.tiny8 import data, images

_CACHE = os.environ.get(
    "HM3_TEST_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "hm3"),
)


@pytest.fixture(scope="module")
def tiny8_smoke_zoo():
    """The tiny8 smoke zoo, built once per machine under .pytest_cache (file-locked) and reused while its
    config fingerprint is unchanged."""
    from filelock import FileLock

    from experiments.configs import tiny8
    from hm3_jax.tasks import zoo as zoo_lib

    os.makedirs(_CACHE, exist_ok=True)
    path = os.path.join(_CACHE, "tiny8_zoo_smoke")
    with FileLock(path + ".lock"):
        return zoo_lib.build_or_load(tiny8.get_config("smoke").zoo, path, progress=False)


def _digest(images: np.ndarray) -> set:
    return {hashlib.sha1(x.tobytes()).hexdigest() for x in images}


@pytest.fixture(scope="module")
def small_data():
    return data.generate_all(seed=3, num_eval=20, num_train=60, image_size=16)


def test_generators_deterministic_with_label_spaces_and_disjoint_splits(small_data):
    again = data.generate_all(seed=3, num_eval=20, num_train=60, image_size=16)
    other = data.generate_task("shapes", seed=4, num_eval=20, num_train=60)
    assert not np.array_equal(other["train"]["pixel_values"], small_data["shapes"]["train"]["pixel_values"])
    assert list(small_data) == list(images.TASKS)
    for task, parts in small_data.items():
        for split, arrays in parts.items():
            np.testing.assert_array_equal(arrays["pixel_values"], again[task][split]["pixel_values"])
            np.testing.assert_array_equal(arrays["labels"], again[task][split]["labels"])
            assert arrays["pixel_values"].dtype == np.uint8 and arrays["labels"].dtype == np.int32
            assert arrays["pixel_values"].shape[1:] == (3, 16, 16)
            assert arrays["labels"].min() >= 0 and arrays["labels"].max() < images.NUM_CLASSES[task], (
                task,
                split,
            )
        assert {s: len(p["labels"]) for s, p in parts.items()} == {"train": 60, "search": 14, "heldout": 6}
        # every class occurs in the train part (60 draws), and no image is shared between splits
        assert set(parts["train"]["labels"].tolist()) == set(range(images.NUM_CLASSES[task])), task
        digests = [_digest(parts[s]["pixel_values"]) for s in data.SPLITS]
        assert sum(len(d) for d in digests) == len(set.union(*digests)), task


def test_digit_sources_are_disjoint_and_bad_arguments_are_named():
    train_idx, eval_idx = images.digits_partition(0, 300)
    assert len(set(train_idx) & set(eval_idx)) == 0 and len(train_idx) + len(eval_idx) == 1797
    with pytest.raises(ValueError, match="unknown tiny8 task"):
        data.generate_task("svhn", 0, 10, 10)
    with pytest.raises(ValueError, match="multiple of 8"):
        data.generate_task("shapes", 0, 10, 10, image_size=12)


def test_colours_label_is_the_dominant_hue_bin_and_letters_differ():
    import colorsys

    parts = data.generate_task("colours", seed=5, num_eval=10, num_train=120)
    x, y = parts["train"]["pixel_values"].astype(np.float64) / 255.0, parts["train"]["labels"]
    bins = images.NUM_CLASSES["colours"]
    hits = 0
    for img, label in zip(x, y, strict=True):
        rgb = img.reshape(3, -1).T
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
        coloured = (hsv[:, 1] > 0.5) & (hsv[:, 2] > 0.6)  # ring and distractors, not the grey ground
        votes = np.bincount(np.floor(hsv[coloured, 0] * bins + 0.5).astype(int) % bins, minlength=bins)
        hits += int(np.argmax(votes) == label)  # the ring covers more pixels than both small squares
    assert hits >= 0.9 * len(y), hits
    glyphs = [images.glyph(c, "DejaVuSans.ttf", 0.0) for c in images.LETTERS]
    assert all(g.shape[0] > 30 for g in glyphs)  # 64 px font: capitals are about 47 px high
    resized = [
        np.asarray(np.round(g[:: max(1, g.shape[0] // 8), :: max(1, g.shape[1] // 8)][:8, :6]))
        for g in glyphs
    ]
    assert len({r.tobytes() for r in resized}) == len(images.LETTERS)
    fg, bg = images.contrasting_colours(np.random.default_rng(0))
    assert fg.mean() > bg.mean() + 0.2  # light figure on a dark ground


def test_counting_label_is_the_number_of_dots():
    from scipy import ndimage

    parts = data.generate_task("counting", seed=6, num_eval=10, num_train=100)
    x, y = parts["train"]["pixel_values"].astype(np.float64).mean(1), parts["train"]["labels"]
    hits = 0
    for img, label in zip(x, y, strict=True):
        ground = np.median(img)
        dots = img > ground + 0.3 * (img.max() - ground)  # dots are brighter than the ground
        components, _ = ndimage.label(dots, np.ones((3, 3)))
        found = int((np.bincount(components.ravel())[1:] >= 2).sum())  # blobs of 2+ pixels (not noise)
        hits += int(found == label + 1)  # label c means c + 1 dots
    assert hits >= 0.9 * len(y), hits


def test_init_encoder_uses_fan_in_scaled_kernels():
    from hm3_jax.tasks.tiny8 import train as train_lib

    config = _vit(num_layers=2, hidden=16).replace(intermediate_size=64)
    params = train_lib.init_encoder(config, jax.random.key(0))
    for name, (fan_in, fan_out) in {"q": (16, 16), "up": (16, 64), "down": (64, 16)}.items():
        k = np.asarray(params["blocks"][name]["kernel"])
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        assert k.shape == (2, fan_in, fan_out) and np.abs(k).max() <= limit
        assert np.std(k) == pytest.approx(
            limit / np.sqrt(3.0), rel=0.15
        )  # uniform(-a, a) has std a / sqrt(3)
    pos = np.asarray(params["embed"]["position"])
    np.testing.assert_allclose(pos[1:], train_lib.sincos_2d(4, 16), atol=1e-6)
    assert np.all(pos[0] == 0)


def _vit(num_layers=2, hidden=16):
    return ModelConfig(family="vit", hidden_size=hidden, intermediate_size=32, num_layers=num_layers, num_heads=2,
                       image_size=16, patch_size=4, attention_bias=True, hidden_act="gelu", norm_eps=1e-12)  # fmt: skip


def test_accuracy_objective_equals_numpy_reference():
    config = _vit()
    params = models.init(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(13, 3, 16, 16)).astype(np.float32)
    w, b = rng.normal(size=(16, 5)), rng.normal(size=5)
    feats = np.asarray(models.apply(config, params, x))[:, 0].astype(np.float64)  # CLS of the final LayerNorm
    pred = np.argmax(feats @ w + b, axis=1)
    labels = np.where(np.arange(13) < 8, pred, (pred + 1) % 5)  # 8 of 13 right by construction
    for pad in (9,):  # padded classes (bias -1e9) never win
        obj = accuracy.make_accuracy_objective(
            "t/search", x, labels, w, b, batch_size=4, num_classes_padded=pad
        )
        assert obj.metric == "accuracy" and obj.num_examples == 13
        assert scoring.score_model(config, params, obj) == pytest.approx(100.0 * 8 / 13)
    with pytest.raises(ValueError, match="labels must lie"):
        accuracy.make_accuracy_objective("t/search", x, labels + 5, w, b, batch_size=4)
    with pytest.raises(ValueError, match="hidden states"):
        logits_config = config.replace(num_labels=3)
        scoring.score_model(logits_config, models.init(logits_config, jax.random.key(0)), obj)


def test_engine_prefix_tree_equals_plain_for_vit_paths():
    config = _vit()
    ps = [models.init(config, jax.random.key(i)) for i in range(3)]
    rng = np.random.default_rng(2)
    objs = []
    for k, c in enumerate((3, 6)):
        x = rng.normal(size=(10, 3, 16, 16)).astype(np.float32)
        w, b = rng.normal(size=(16, c)), rng.normal(size=c)
        feats = np.asarray(models.apply(config, ps[0], x))[:, 0]
        y = np.where(np.arange(10) < 5 + k, np.argmax(feats @ w + b, 1), rng.integers(0, c, 10))
        objs.append(accuracy.make_accuracy_objective(f"t{k}/search", x, y, w, b, 4, 6))
    pool = models.make_pool([p["blocks"] for p in ps])
    shell = models.shell_of(ps[0])
    paths = np.array([[0, 1, -1, -1], [0, 1, 2, 3], [0, 1, 2, -1], [5, 4, 0, -1]], np.int32)
    tree = engine_lib.make_engine(config, shell, pool, objs, strategy="map", prefix_sharing=True)
    plain = engine_lib.make_engine(config, shell, pool, objs, strategy="map", prefix_sharing=False)
    a, b = tree.evaluate(paths), plain.evaluate(paths)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.cost.block_steps < b.cost.block_steps  # shared prefixes ran once
    assert a.scores[1, 1] == scoring.score_path(config, shell, pool, paths[1], objs[1])
    assert a.scores[0, 0] >= 50.0  # the identity path of model 0 gets the planted labels right


def test_smoke_zoo_builds_loads_and_identity_paths_score_the_experts(tiny8_smoke_zoo):
    from experiments.configs import tiny8
    from hm3_jax.tasks import zoo as zoo_lib
    from hm3_jax.tasks.tiny8 import zoo as tiny8_zoo

    zoo = tiny8_smoke_zoo
    m = zoo.manifest
    assert m["kind"] == "tiny8" and m["tasks"] == list(images.TASKS) and zoo.tasks == images.TASKS
    assert np.asarray(m["score_matrix"]["heldout"]).shape == (9, 8)
    assert zoo.tokenizer is None and zoo.base.config.family == "vit" and zoo.base.config.num_labels == 0
    # cache hit: same fingerprint, nothing rebuilt
    again = zoo_lib.build_or_load(tiny8.get_config("smoke").zoo, zoo.workdir, on_mismatch="error")
    assert again.manifest["build_time_s"] == m["build_time_s"]
    # stored data = freshly generated data (determinism through the zoo)
    cfg = tiny8.get_config("smoke").zoo
    fresh = data.generate_task("counting", cfg.seed, cfg.num_eval, cfg.num_train, cfg.image_size)
    for split in data.SPLITS:
        np.testing.assert_array_equal(
            zoo.data["counting"][split]["pixel_values"], fresh[split]["pixel_values"]
        )
    heads = tiny8_zoo.load_heads(zoo.workdir)
    config = zoo.base.config
    experts = [zoo.experts[t].params for t in zoo.tasks]
    pool = models.make_pool([e["blocks"] for e in experts] + [zoo.base.params["blocks"]])
    L = config.num_layers
    for k, task in list(enumerate(zoo.tasks))[::3]:  # three of the eight tasks (each check runs eagerly)
        assert heads[task]["kernel"].shape == (config.hidden_size, images.NUM_CLASSES[task])
        obj = zoo.objectives["heldout"][task]
        expert = zoo.experts[task].params
        # independent: numpy head on the expert's CLS features
        split = zoo.data[task]["heldout"]
        feats = np.asarray(models.apply(config, expert, data.to_model_inputs(split["pixel_values"])))[:, 0]
        ref = 100.0 * np.mean(
            np.argmax(feats @ heads[task]["kernel"] + heads[task]["bias"], 1) == split["labels"]
        )
        own = scoring.score_model(config, expert, obj)
        assert own == pytest.approx(ref) and own == pytest.approx(
            m["score_matrix"]["heldout"][k + 1][k], abs=1e-3
        )
        path = models.path_from_pairs([(k, l) for l in range(L)], L, L + 1)  # expert k's identity path
        assert scoring.score_path(config, models.shell_of(expert), pool, path, obj) == own
    engine = engine_lib.make_engine(config, models.shell_of(experts[2]), pool, list(zoo.objectives["heldout"].values()),
                                    strategy="map")  # fmt: skip
    got = engine.evaluate(np.array([[2 * L + l for l in range(L)]], np.int32)).scores[0]
    np.testing.assert_allclose(got, m["score_matrix"]["heldout"][3], atol=1e-3)


def test_smoke_zoo_heads_are_frozen_probes_fitted_on_the_base(tiny8_smoke_zoo):
    """The paper's protocol (Task Arithmetic's): head k is a converged L2 logistic regression on the BASE's CLS
    features of task k's train part (checked by its optimality conditions in float64 numpy, not by refitting
    with the same code), and it is the head of every objective; the base's row of the score matrix is that
    probe's accuracy computed directly."""
    from experiments.configs import tiny8
    from hm3_jax.tasks.tiny8 import zoo as tiny8_zoo

    zoo, m = tiny8_smoke_zoo, tiny8_smoke_zoo.manifest
    l2 = tiny8.get_config("smoke").zoo.probe.l2
    assert m["head_protocol"] == "frozen" and m["config"]["expert"]["head"] == "frozen"
    heads = tiny8_zoo.load_heads(zoo.workdir)
    config, base = zoo.base.config, zoo.base.params
    for k, task in enumerate(zoo.tasks):
        w, b = heads[task]["kernel"].astype(np.float64), heads[task]["bias"].astype(np.float64)
        c = images.NUM_CLASSES[task]
        assert w.shape == (config.hidden_size, c) and b.shape == (c,)
        train = zoo.data[task]["train"]
        h = np.asarray(models.apply(config, base, data.to_model_inputs(train["pixel_values"])))[:, 0]
        h = h.astype(np.float64)
        y = np.eye(c)[train["labels"]]
        for kernel, bias, optimal in ((w, b, True), (0 * w, 0 * b, False)):  # the zero head is not optimal
            z = h @ kernel + bias
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            grad_w = (h.T @ (p - y) + l2 * kernel) / len(y)  # of mean CE + l2 ||W||^2 / (2 N)
            grad_b = (p - y).mean(0)
            worst = max(np.abs(grad_w).max(), np.abs(grad_b).max())
            assert (worst < 1e-4) == optimal, (task, worst)
        for split in ("search", "heldout"):  # every objective reads task k by the frozen head k
            tree = zoo.objectives[split][task].arrays.tree
            np.testing.assert_array_equal(np.asarray(tree["head_kernel"])[:, :c], heads[task]["kernel"])
            np.testing.assert_array_equal(np.asarray(tree["head_bias"])[:c], heads[task]["bias"])
            assert np.all(np.asarray(tree["head_bias"])[c:] == -1e9)
            part = zoo.data[task][split]
            hs = np.asarray(models.apply(config, base, data.to_model_inputs(part["pixel_values"])))[:, 0]
            direct = 100.0 * np.mean(np.argmax(hs @ w + b, 1) == part["labels"])
            assert m["score_matrix"][split][0][k] == pytest.approx(direct, abs=1e-3), (split, task)
        assert m["base_linear_probe_heldout"][task] == pytest.approx(m["score_matrix"]["heldout"][0][k])


def test_data_aware_calibration_reads_search_images_through_the_frozen_heads(tiny8_smoke_zoo):
    """The data-aware merges' calibration of an image objective (hm3_jax/search/data_aware_menu.py): task k's first
    rows of the SEARCH split, no labels, and logits of the frozen head k on the merged model's CLS feature."""
    import types

    from hm3_jax.search import data_aware_menu
    from hm3_jax.tasks.tiny8 import zoo as tiny8_zoo

    zoo = tiny8_smoke_zoo
    heads = tiny8_zoo.load_heads(zoo.workdir)
    problem = types.SimpleNamespace(
        groups=None, num_tasks=len(zoo.tasks), tasks=zoo.tasks, config=zoo.base.config,
        objectives={"search": list(zoo.objectives["search"].values())},
    )  # fmt: skip
    calibration = data_aware_menu.search_calibration(problem, rows=5)
    for k in (1, 6):
        task, c = zoo.tasks[k], images.NUM_CLASSES[zoo.tasks[k]]
        pixels = data.to_model_inputs(zoo.data[task]["search"]["pixel_values"][:5])
        np.testing.assert_array_equal(calibration[k].inputs, pixels)
        assert calibration[k].token_weights is None
        logits = np.asarray(calibration[k].forward_fn(zoo.base.params, pixels))
        h = np.asarray(models.apply(zoo.base.config, zoo.base.params, pixels))[:, 0]
        np.testing.assert_allclose(
            logits[:, :c], h @ heads[task]["kernel"] + heads[task]["bias"], rtol=1e-5, atol=1e-5
        )
        assert np.all(logits[:, c:] < -1e8)  # padded classes never predicted


def test_fine_tuning_through_a_frozen_head_leaves_it_bit_for_bit(tmp_path):
    """`train_classifier(trainable=("encoder",))` (tiny8's experts) returns the head it was given, bit for bit, and
    a changed encoder; ("head",) the reverse; a bad `trainable` or head protocol is a clear error."""
    from experiments.configs import tiny8
    from hm3_jax.tasks.tiny8 import train as train_lib
    from hm3_jax.tasks.tiny8 import zoo as tiny8_zoo

    config = _vit()
    encoder = train_lib.init_encoder(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 3, 16, 16)).astype(np.float32), rng.integers(0, 4, 32)
    head = {
        "kernel": rng.normal(size=(16, 6)).astype(np.float32),
        "bias": rng.normal(size=6).astype(np.float32),
    }
    mask = np.arange(6) < 4
    kw = dict(num_steps=3, batch_size=8, learning_rate=1e-2, warmup_steps=1, progress=False)
    enc, out, _ = train_lib.train_classifier(jax.random.key(1), config, encoder, head, x, y, mask, trainable=("encoder",), **kw)  # fmt: skip
    assert all(np.array_equal(np.asarray(out[n]), head[n]) for n in head)
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), enc, encoder)
    assert changed["blocks"]["q"]["kernel"] and changed["embed"]["patch"]["kernel"]
    enc, out, _ = train_lib.train_classifier(jax.random.key(1), config, encoder, head, x, y, mask, trainable=("head",), **kw)  # fmt: skip
    assert all(
        jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), enc, encoder))
    )
    assert not np.array_equal(np.asarray(out["kernel"]), head["kernel"])
    with pytest.raises(ValueError, match="trainable must be"):
        train_lib.train_classifier(jax.random.key(1), config, encoder, head, x, y, mask, trainable=("decoder",), **kw)  # fmt: skip
    with pytest.raises(ValueError, match="missing \\[5\\]"):
        train_lib.fit_linear_probe(rng.normal(size=(10, 4)), np.arange(10) % 5, 6, l2=1.0)
    cfg = tiny8.get_config("smoke").zoo
    cfg.expert.head = "trained"
    with pytest.raises(ValueError, match="zoo.expert.head must be one of"):
        tiny8_zoo.build_into(cfg, str(tmp_path), progress=False)


def test_tiny8_spec_scores_what_the_zoo_scores(tiny8_smoke_zoo, tmp_path):
    """tiny8 is a producer of the spec format: its spec (image tasks, accuracy with the experts' fixed heads,
    preprocessed by transformers' image processor from the base's preprocessor_config.json) gives the zoo's own
    objective arrays, so the same scores."""
    import shutil

    import jax
    import yaml

    from hm3_jax.tasks import spec_zoo
    from hm3_jax.tasks import zoo as zoo_lib

    workdir = str(tmp_path / "zoo")  # write_spec adds files: work on a copy of the shared cached zoo
    shutil.copytree(tiny8_smoke_zoo.workdir, workdir)
    spec = yaml.safe_load(open(zoo_lib.write_spec(workdir)))
    assert spec["tasks"]["counting"] == {
        "data": "eval/counting.npz",
        "metric": "accuracy",
        "head": "heads/counting.npz",
    }
    new = spec_zoo.load(os.path.join(workdir, zoo_lib.SPEC))
    old = tiny8_smoke_zoo
    assert new.tasks == old.tasks and new.tokenizer is None
    for split in ("search", "heldout"):
        for task, o in old.objectives[split].items():
            n = new.objectives[split][task]
            same = jax.tree.map(
                lambda a, b: a.shape == b.shape and bool(np.array_equal(a, b)), o.arrays.tree, n.arrays.tree
            )
            assert all(jax.tree.leaves(same)), (split, task)
    capped = new.capped_search_objectives(5)
    assert capped["counting"].num_examples == 5
