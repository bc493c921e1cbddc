"""What the path engine learns from its objectives before scoring anything: every `device_fn` is called once
eagerly with a recording forward, to learn its input batches (for the prefix tree and the FLOP count).

For a teacher-forced objective `forward(input_ids [B, S], positions=None) -> logits [B, S, V]`, or
`[B, P, V]` at `positions` [B, P] when the objective asks (exact match reads only its target positions, so the
LM head runs there only; the recorded P is what the head FLOPs count); for `DECODE_METRICS` `forward` is the
decode closure `forward(prompt_ids [B, P], prompt_mask [B, P], max_new_tokens) -> tokens [B, max_new_tokens]`
(greedy decoding with a KV cache along the path). A `device_fn` must therefore call `forward` with the same
concrete inputs every time (true of objectives over a fixed split).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hm3_jax import models
from hm3_jax.models.config import ModelConfig
from hm3_jax.paths import flops as flops_lib

# metrics whose objectives get the decode forward (greedy generation); every other metric is teacher-forced
DECODE_METRICS = ("chrf", "generated_exact_match")


class RecordingForward:
    """A forward that records its (concrete) inputs and returns zeros of the right shape."""

    def __init__(self, config: ModelConfig, decode: bool, name: str):
        self.config, self.decode, self.name, self.calls = config, decode, name, []
        self.head_positions = []  # per teacher-forced call: positions per row whose logits are computed

    def __call__(self, *args, positions=None):
        try:
            arrays = [np.asarray(a) for a in args]
            positions = None if positions is None else np.asarray(positions)
        except (TypeError, jax.errors.TracerArrayConversionError) as err:
            raise ValueError(
                f"objective {self.name!r}: device_fn must call forward with concrete arrays (its split); "
                "got a traced value"
            ) from err
        if self.decode:
            if len(arrays) != 3:
                raise ValueError(
                    f"objective {self.name!r}: the decode forward takes (prompt_ids, prompt_mask, "
                    f"max_new_tokens), got {len(arrays)} arguments"
                )
            ids, mask, new = arrays
            self.calls.append((ids, mask, int(new)))
            return jnp.zeros((ids.shape[0], int(new)), jnp.int32)
        if self.config.family == "vit":  # pixel_values [B, C, H, W] -> hidden states or class logits
            if len(arrays) != 1 or arrays[0].ndim != 4:
                raise ValueError(
                    f"objective {self.name!r}: a ViT forward takes one pixel_values [B, C, H, W]"
                )
            self.calls.append(arrays[0])
            b, c = arrays[0].shape[0], self.config
            shape = (b, c.num_labels) if c.num_labels else (b, c.num_patches + 1, c.hidden_size)
            return jnp.zeros(shape, jnp.float32)
        if len(arrays) != 1 or arrays[0].ndim != 2:
            raise ValueError(f"objective {self.name!r}: forward takes one input_ids [B, S] array")
        if positions is not None and (positions.ndim != 2 or positions.shape[0] != arrays[0].shape[0]):
            raise ValueError(
                f"objective {self.name!r}: positions must be [B, P] for input_ids {arrays[0].shape}, got "
                f"{positions.shape}"
            )
        self.calls.append(arrays[0])
        self.head_positions.append(arrays[0].shape[1] if positions is None else positions.shape[1])
        out_len = arrays[0].shape[1] if positions is None else positions.shape[1]
        return jnp.zeros((arrays[0].shape[0], out_len, self.config.vocab_size), jnp.float32)


def group_matrix(groups: Sequence[int] | None, num_objectives: int) -> np.ndarray | None:
    """[num_objectives, G] averaging matrix: column g holds 1 / |{k: groups[k] = g}| at the objectives of group
    g (None when `groups` is None). Every group 0..G-1 must have an objective."""
    if groups is None:
        return None
    groups = np.asarray(groups, np.int64)
    if groups.shape != (num_objectives,) or groups.min(initial=0) < 0:
        raise ValueError(f"groups must give a group index >= 0 for each of the {num_objectives} objectives")
    num_groups = int(groups.max()) + 1
    counts = np.bincount(groups, minlength=num_groups)
    if np.any(counts == 0):
        raise ValueError(
            f"groups {groups.tolist()} leave group(s) {np.nonzero(counts == 0)[0].tolist()} empty"
        )
    m = np.zeros((num_objectives, num_groups))
    m[np.arange(num_objectives), groups] = 1.0 / counts[groups]
    return m


def record_objectives(config: ModelConfig, objectives) -> dict:
    """Runs every device_fn once eagerly (jit disabled, so `lax.map` over batches is a Python loop) with a
    recording forward: its distinct input batches grouped by shape, and per-path FLOP counts."""
    groups: dict[tuple, list[np.ndarray]] = {}
    dec_flops_fns = []
    tf_block = tf_head = 0.0
    for o in objectives:
        decode = o.metric in DECODE_METRICS
        rec = RecordingForward(config, decode, o.name)
        with jax.disable_jit():
            o.device_fn(rec)
        if not rec.calls:
            raise ValueError(f"objective {o.name!r}: device_fn never called forward")
        if decode:
            for ids, _, new in rec.calls:
                dec_flops_fns.append(
                    functools.partial(flops_lib.decode_flops, config, ids.shape[0], ids.shape[1], new)
                )
            continue
        for ids, head_positions in zip(rec.calls, rec.head_positions or [None] * len(rec.calls), strict=True):
            # token ids [B, S], or ViT pixel_values [B, C, H, W] (N + 1 tokens, head on CLS only); an LM head
            # runs on every position, or on the `positions` the objective asked for (P per row)
            b, s = (ids.shape[0], config.num_patches + 1) if config.family == "vit" else ids.shape
            tf_block += b * s * flops_lib.block_flops_per_token(config, s)
            tf_head += (
                b * (1 if config.family == "vit" else head_positions) * flops_lib.head_flops_per_token(config)
            )
            known = groups.setdefault(tuple(ids.shape), [])
            if not any(np.array_equal(ids, k) for k in known):
                known.append(ids if config.family == "vit" else ids.astype(np.int32))
    tf_groups = {shape: np.stack(batches) for shape, batches in groups.items()}

    @jax.jit
    def embed_fn(shell):
        hs, ctxs = [], []
        for stacked in tf_groups.values():
            n, b = stacked.shape[:2]
            h, ctx = models.embed(config, shell, jnp.asarray(stacked.reshape((n * b,) + stacked.shape[2:])))
            hs.append(h.reshape((n, b) + h.shape[1:]))
            # without an attention mask the block context depends only on (B, S): take the first batch's
            ctxs.append(
                jax.tree.map(lambda x, b=b, nb=n * b: x[:b] if x.ndim and x.shape[0] == nb else x, ctx)
            )
        return tuple(hs), tuple(ctxs)

    return {
        "cache": {},
        "compiled": {},
        "traces": {},
        "strategy_timings": {},
        "tf_groups": tf_groups,
        "tf_block_flops": float(tf_block),
        "tf_head_flops": float(tf_head),
        "dec_flops_fns": dec_flops_fns,
        "embed_fn": embed_fn,
    }
