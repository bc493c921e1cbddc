"""Exports of the front's merged models, in forms other tools can load.

Per preference i (`DIR/exports/pref_<i>/`):

* `merged/`: Theta(lambda_i) as a Hugging Face directory (transformers loads it), with `merged.mergekit.yml`:
  the same merge in mergekit's schema (`mergekit_merge_yaml`: method from the sign election and the drop
  rate, weight = scale * lambda_k * block weight, `normalize: false`), so a user can rebuild it on full-size
  models with mergekit or `python -m experiments.merge --config=merged.mergekit.yml`; exact at drop rate 0
  (DARE's random drop cannot match bit for bit across tools; the YAML's comments say what is not exact).
* `path_model/`: the HM3 path model. Without junction scalings (alignment "none") it is an ordinary stacked
  model — `config.num_hidden_layers = T`, block t = pool block `path[t]`, embeddings and head from
  Theta(lambda_i) — saved as a Hugging Face directory, with `path.mergekit.yml`: a passthrough merge whose
  `slices` list one layer range per path step (layer l of an expert, or of `merged/`), between empty slices
  of `merged/` so that the embeddings (first slice) and the final norm and head (last slice) are Theta's;
  `experiments.merge` on it rebuilds `path_model/` exactly. With junction
  scalings it is hm3_jax's own format: `path.json` (path, sources, preference) and `junction.npz`
  (scale, shift [T, D]) beside `merged/`, loadable with `load_path_model`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import yaml

from hm3_jax import models
from hm3_jax.io.atomic import atomic_directory
from hm3_jax.io.checkpoint import Model, load_pretrained, save_pretrained
from hm3_jax.merging.groups import layer_index
from hm3_jax.merging.safetensors_stream import Checkpoint
from hm3_jax.pipeline.workdir import atomic_write_text


def path_model_params(shell: dict, pool: dict, path) -> tuple[dict, int]:
    """Stacked params of the plain path model: blocks = pool[path[path >= 0]]."""
    steps = np.asarray(path, np.int64)
    steps = steps[steps >= 0]
    blocks = models.gather_blocks(pool, steps)  # a stacked pool's rows, or a parted pool's blocks
    return {**shell, "blocks": blocks}, int(len(steps))


def mergekit_merge_yaml(
    base_dir: str,
    expert_dirs: list[str],
    preference,
    hparams: dict,
    shell_names=(),
    tokenizer_source: str | None = None,
    dtype: str = "float32",
) -> str:
    """mergekit YAML of the parameter-level merge Theta(lambda) with hyperparameters `hparams`.

    The merge (`param_level.paper_merge`, `search.merge_genes.tuned_merge`), per tensor of block `l`:

        Theta = base + s * sum_k [sign_k agrees] w_{k,l} M_k DARE_p(delta_k),  w_{k,l} = lambda_k * b_l

    with `s` the global `scale` (default 1), `b` the per-block weights (`block_weights`, default 1; tensors
    outside the blocks use `mean(b)`), `M_k` the magnitude trim to `density` and the sign election of TIES
    only with `sign_election` (default True); no division by the weights. In mergekit's terms (its
    generalized task arithmetic, `normalize: false`): the per-model `weight` is `s * lambda_k * b_l`, a
    gradient over the blocks (its `L` anchors fall exactly on the blocks) after one `filter` condition per
    tensor outside the blocks (`shell_names`) giving `s * lambda_k * mean(b)`, or one number when `b` is
    constant; the method is

        sign election, p = 0: ties (density d)        sign election, p > 0: dare_ties (density 1 - p)
        no election,  p = 0, d = 1: task_arithmetic   no election,  p > 0: dare_linear (density 1 - p)

    `tokenizer_source` ("base" when the run mapped experts with other vocabularies onto the base's ids, a spec's
    `tokenizer_source: base`) is written as mergekit's key of the same name; `dtype` is the merged model's.

    Not expressible (said in the YAML's comment): a magnitude trim (d < 1) together with DARE (p > 0), or
    without sign election (mergekit has no magnitude-only method); and DARE's random drop itself (mergekit
    and `experiments.merge` draw their own masks). At p = 0 `experiments.merge` on this YAML rebuilds
    Theta to float rounding, except that `tuned_merge` trims at the (1 - d) quantile of |delta| (keeps
    1 + floor((n - 1) d) of n entries) where mergekit keeps the floor(d n) largest: the same entries when
    those counts agree (e.g. d = 0.5 on tensors of even size), else up to one entry per model, tensor and
    block is trimmed differently (measured: 45 of 29472 entries at d = 0.4 on the tiny Llama of the tests).
    """
    # A data-aware menu winner (param_level, issue 19): no mergekit method rebuilds it.
    if "method" in hparams:
        return (
            f"# NOT EXPRESSIBLE: this Theta(lambda) is hm3_jax's {hparams['method']!r} merge (the parameter "
            "level's data-aware menu), which mergekit has no method for; the merged weights are in merged/.\n"
        )
    density = float(hparams.get("density", 1.0))
    drop = float(hparams.get("drop_rate", 0.0))
    scale = float(hparams.get("scale", 1.0))
    elect = bool(hparams.get("sign_election", True))
    blocks = hparams.get("block_weights")
    blocks = None if blocks is None else np.asarray(blocks, np.float64)
    notes = []
    if elect:
        method = "dare_ties" if drop > 0 else "ties"
    elif drop > 0:
        method = "dare_linear"
    else:
        method = "task_arithmetic"
        if density < 1.0:
            notes.append(
                f"NOT EXACT: hm3_jax trims each task vector to density={density:.6g} without sign "
                "election; mergekit has no such method, so this task_arithmetic keeps every entry."
            )
    mk_density = 1.0 - drop if drop > 0 else (density if method == "ties" else 1.0)
    if drop > 0:
        notes.append(
            f"DARE drops at random (p={drop:.6g}): mergekit and experiments.merge draw their own masks, "
            "so this is the same merge in distribution, not bit for bit."
        )
        if density < 1.0:
            notes.append(
                f"NOT EXACT: hm3_jax also trims to density={density:.6g} before the sign election; "
                f"mergekit's {method} only drops (its density = 1 - p)."
            )
    elif method == "ties" and density < 1.0 and blocks is not None:
        notes.append(
            "hm3_jax's tuned merge trims at the (1 - density) quantile of |delta| (1 + floor((n-1) d) "
            "of n entries); mergekit keeps the floor(d n) largest (one entry may differ)."
        )

    def weight(lam: float):
        if blocks is None or np.all(blocks == blocks[0]):
            return float(scale * lam * (1.0 if blocks is None else blocks[0]))
        shell = float(scale * lam * blocks.mean())
        return [{"filter": name, "value": shell} for name in shell_names] + [
            {"value": [float(scale * lam * b) for b in blocks]}
        ]

    models_cfg = []
    for d, lam in zip(expert_dirs, np.asarray(preference, np.float64), strict=True):
        params = {"weight": weight(float(lam))}
        if mk_density < 1.0:
            params["density"] = float(mk_density)
        models_cfg.append({"model": d, "parameters": params})
    cfg = {
        "merge_method": method,
        "base_model": base_dir,
        "models": models_cfg,
        "parameters": {"normalize": False},
        "dtype": dtype,
    }
    if tokenizer_source:
        cfg["tokenizer_source"] = tokenizer_source
    header = (
        f"# HM3 parameter-level merge: density={density:.6g} drop_rate={drop:.6g} scale={scale:.6g} "
        f"sign_election={str(elect).lower()}; weight = scale * lambda_k * block weight.\n"
    )
    return header + "".join(f"# {n}\n" for n in notes) + yaml.safe_dump(cfg, sort_keys=False)


def mergekit_passthrough_yaml(
    source_dirs: list[str], path, num_layers: int, shell_dir: str | None = None
) -> str:
    """mergekit passthrough YAML: one slice per path step (`layer_range: [l, l + 1]` of its source).

    mergekit takes the embeddings from the first slice's model and the final norm and head from the last
    slice's. With `shell_dir` (the path model's shell, Theta's checkpoint), an empty slice `[0, 0]` of it is
    put first and/or last when the path does not start / end with one of its blocks, so the rebuilt model
    has the path model's shell; without it, the shell is whatever the first / last step's model has.
    """
    slices = []
    for p in np.asarray(path):
        if p < 0:
            continue
        m, l = divmod(int(p), num_layers)
        slices.append({"sources": [{"model": source_dirs[m], "layer_range": [l, l + 1]}]})
    if shell_dir is None:
        note = (
            "# mergekit's passthrough takes the embeddings from the first slice's model and the final norm and\n"
            "# head from the last slice's; hm3_jax's path model takes them from the parameter-merged model.\n"
        )
    else:
        bookend = {"sources": [{"model": shell_dir, "layer_range": [0, 0]}]}
        if not slices or slices[0]["sources"][0]["model"] != shell_dir:
            slices.insert(0, bookend)
        if slices[-1]["sources"][0]["model"] != shell_dir:
            slices.append(bookend)
        note = (
            "# mergekit's passthrough takes the embeddings from the first slice's model and the final norm and\n"
            f"# head from the last slice's: empty slices [0, 0] of {shell_dir} give the path model's shell.\n"
        )
    return note + yaml.safe_dump(
        {"merge_method": "passthrough", "slices": slices, "dtype": "float32"}, sort_keys=False
    )


def export_preference(
    out_dir: str,
    config,
    merged: dict,
    pool: dict,
    path,
    preference,
    zoo_dirs: dict,
    merge_hparams: dict,
    junction: dict | None = None,
    tokenizer_dir: str | None = None,
    tokenizer_source: str | None = None,
) -> dict:
    """Writes one preference's exports (module docstring); returns the written paths.

    `tokenizer_source`: "base" when the experts were mapped onto the base tokenizer's ids (a spec's
    `tokenizer_source`); merged.mergekit.yml then asks the same of the tool that rebuilds it.

    `merge_hparams` are the parameter-level merge's that made `merged`: `density`, `drop_rate` (the paper
    merge), plus `scale`, `block_weights` [L], `sign_election` (the tuned merge); see `mergekit_merge_yaml`.
    """
    os.makedirs(out_dir, exist_ok=True)
    merged_dir = os.path.join(out_dir, "merged")
    save_pretrained(Model(config, merged), merged_dir)
    _copy_tokenizer(tokenizer_dir, merged_dir)
    written = {"merged": merged_dir}
    with Checkpoint(merged_dir) as ckpt:
        shell_names = [n for n in ckpt.names if layer_index(n) is None]
    atomic_write_text(
        os.path.join(out_dir, "merged.mergekit.yml"),
        mergekit_merge_yaml(
            zoo_dirs["base"],
            zoo_dirs["experts"],
            preference,
            merge_hparams,
            shell_names,
            tokenizer_source,
            str(np.dtype(jax.tree.leaves(merged)[0].dtype)),
        ),
    )
    sources = list(zoo_dirs["experts"]) + [merged_dir]
    if junction is None:
        params, T = path_model_params(models.shell_of(merged), pool, path)
        pm_dir = os.path.join(out_dir, "path_model")
        save_pretrained(Model(dataclasses.replace(config, num_layers=T), params), pm_dir)
        _copy_tokenizer(tokenizer_dir, pm_dir)
        atomic_write_text(
            os.path.join(out_dir, "path.mergekit.yml"),
            mergekit_passthrough_yaml(sources, path, config.num_layers, shell_dir=merged_dir),
        )
        written["path_model"] = pm_dir
    else:
        with atomic_directory(os.path.join(out_dir, "path_model_hm3")) as tmp:
            np.savez(
                os.path.join(tmp, "junction.npz"),
                scale=np.asarray(junction["scale"]),
                shift=np.asarray(junction["shift"]),
            )
            with open(os.path.join(tmp, "path.json"), "w") as f:
                json.dump(
                    {
                        "path": np.asarray(path).tolist(),
                        "sources": sources,
                        "preference": list(map(float, preference)),
                        "num_layers": config.num_layers,
                    },
                    f,
                    indent=2,
                )
        written["path_model_hm3"] = os.path.join(out_dir, "path_model_hm3")
    return written


def _copy_tokenizer(tokenizer_dir: str | None, target: str) -> None:
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        return
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(target, name))


def load_path_model(directory: str, dtype=None):
    """Loads an hm3_jax path model export: returns (config, shell, pool, path, junction)."""
    with open(os.path.join(directory, "path.json")) as f:
        meta = json.load(f)
    srcs = [load_pretrained(s) if dtype is None else load_pretrained(s, dtype=dtype) for s in meta["sources"]]
    pool = models.make_pool([s.params["blocks"] for s in srcs])
    z = np.load(os.path.join(directory, "junction.npz"))
    return (
        srcs[-1].config,
        models.shell_of(srcs[-1].params),
        pool,
        np.asarray(meta["path"], np.int32),
        {"scale": z["scale"], "shift": z["shift"]},
    )
