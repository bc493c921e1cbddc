"""Exports of the front's merged models, in forms other tools can load.

Per preference i (`DIR/exports/pref_<i>/`):

* `merged/`: Theta(lambda_i) as a Hugging Face directory (transformers loads it), with `merged.mergekit.yml`:
  the same DARE-TIES merge in mergekit's schema, so a user can rebuild it on full-size models with mergekit
  (mergekit draws its own DARE masks, so it is the same merge up to the random drop pattern).
* `path_model/`: the HM3 path model. Without junction scalings (alignment "none") it is an ordinary stacked
  model — `config.num_hidden_layers = T`, block t = pool block `path[t]`, embeddings and head from
  Theta(lambda_i) — saved as a Hugging Face directory, with `path.mergekit.yml`: a passthrough merge whose
  `slices` list one layer range per path step (layer l of an expert, or of `merged/`). With junction
  scalings it is hm3_jax's own format: `path.json` (path, sources, preference) and `junction.npz`
  (scale, shift [T, D]) beside `merged/`, loadable with `load_path_model`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import yaml

from hm3_jax import models
from hm3_jax.hm3.workdir import atomic_directory, atomic_write_text
from hm3_jax.model_io import Model, save_pretrained


def path_model_params(shell: dict, pool: dict, path) -> tuple[dict, int]:
    """Stacked params of the plain path model: blocks = pool[path[path >= 0]]."""
    steps = np.asarray(path, np.int64)
    steps = steps[steps >= 0]
    blocks = jax.tree.map(lambda x: x[steps], pool)
    return {**shell, "blocks": blocks}, int(len(steps))


def mergekit_dare_ties_yaml(base_dir: str, expert_dirs: list[str], preference, density: float,
                            drop_rate: float) -> str:  # fmt: skip
    """mergekit YAML of Theta(lambda) (mergekit's dare_ties density = 1 - DARE drop rate; TIES trim = our density)."""
    if density < 1.0 and drop_rate > 0:
        note = f"# hm3_jax trims to density={density} then drops with p={drop_rate}; mergekit's dare_ties only drops: density=1-p\n"
    else:
        note = ""
    cfg = {
        "merge_method": "dare_ties",
        "base_model": base_dir,
        "models": [
            {
                "model": d,
                "parameters": {
                    "weight": float(w),
                    "density": float(1.0 - drop_rate) if drop_rate > 0 else float(density),
                },
            }
            for d, w in zip(expert_dirs, preference, strict=True)
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    return note + yaml.safe_dump(cfg, sort_keys=False)


def mergekit_passthrough_yaml(source_dirs: list[str], path, num_layers: int) -> str:
    """mergekit passthrough YAML: one slice per path step (`layer_range: [l, l + 1]` of its source)."""
    slices = []
    for p in np.asarray(path):
        if p < 0:
            continue
        m, l = divmod(int(p), num_layers)
        slices.append({"sources": [{"model": source_dirs[m], "layer_range": [l, l + 1]}]})
    note = (
        "# Embeddings, final norm and head come from the first slice's model in mergekit's passthrough;\n"
        "# hm3_jax takes them from the parameter-merged model (merged/). The exported path_model/ is exact.\n"
    )
    return note + yaml.safe_dump(
        {"merge_method": "passthrough", "slices": slices, "dtype": "float32"}, sort_keys=False
    )


def export_preference(out_dir: str, config, merged: dict, pool: dict, path, preference, zoo_dirs: dict,
                      merge_hparams: dict, junction: dict | None = None, tokenizer_dir: str | None = None) -> dict:  # fmt: skip
    """Writes one preference's exports (module docstring); returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    merged_dir = os.path.join(out_dir, "merged")
    save_pretrained(Model(config, merged), merged_dir)
    _copy_tokenizer(tokenizer_dir, merged_dir)
    written = {"merged": merged_dir}
    atomic_write_text(
        os.path.join(out_dir, "merged.mergekit.yml"),
        mergekit_dare_ties_yaml(zoo_dirs["base"], zoo_dirs["experts"], preference,
                                merge_hparams.get("density", 1.0), merge_hparams.get("drop_rate", 0.0)),
    )  # fmt: skip
    sources = list(zoo_dirs["experts"]) + [merged_dir]
    if junction is None:
        params, T = path_model_params(models.shell_of(merged), pool, path)
        pm_dir = os.path.join(out_dir, "path_model")
        save_pretrained(Model(dataclasses.replace(config, num_layers=T), params), pm_dir)
        _copy_tokenizer(tokenizer_dir, pm_dir)
        atomic_write_text(
            os.path.join(out_dir, "path.mergekit.yml"),
            mergekit_passthrough_yaml(sources, path, config.num_layers),
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
                json.dump({"path": np.asarray(path).tolist(), "sources": sources, "preference": list(map(float, preference)),
                           "num_layers": config.num_layers}, f, indent=2)  # fmt: skip
        written["path_model_hm3"] = os.path.join(out_dir, "path_model_hm3")
    return written


def _copy_tokenizer(tokenizer_dir: str | None, target: str) -> None:
    import shutil

    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        return
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(target, name))


def load_path_model(directory: str, dtype=None):
    """Loads an hm3_jax path model export: returns (config, shell, pool, path, junction)."""
    from hm3_jax.model_io import load_pretrained

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
