"""Exact width changes of a compact model: zero-padding units, regrouping heads.

Every change here is exact (the padded model computes the same logits):
  * a padded query head has zero wq columns and zero wo rows, so it adds nothing;
  * a padded KV head has zero wk/wv and only padded (zero) query heads read it;
  * a padded FFN channel has zero gate/up columns and a zero w_down row;
  * a padded hidden channel has a zero embedding column and zero wo/w_down outputs, so it
    stays zero in the residual stream. RMSNorm averages over the width, so the padded
    model uses eps' = eps * d / d' and gains g' = g * sqrt(d / d'), which gives
    rsqrt(mean' + eps') * g' = rsqrt(mean + eps) * g (exact in real arithmetic; float32
    rounding differs at the 1e-7 level).
Widths are only ever padded up; nothing kept is dropped.

Tensors are handled lazily (name -> builder) so an exporter can build, write and free one
tensor at a time. Names are the compact params flattened with dots: `embed`,
`final_norm.scale`, `lm_head`, `layers.{i}.attn.wq`, `layers.{i}.mlp.w_down`, ...
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import numpy as np

from effllm_jax.arch import ArchSpec, LayerSpec

LazyTensors = dict[str, Callable[[], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """Where each unit of a relaid layer comes from (-1: a zero unit)."""

    q_src: tuple[int, ...]  # new query head -> old query head
    kv_src: tuple[int, ...]  # new KV head -> old KV head
    q_per_kv: tuple[int, ...]  # new contiguous grouping
    ffn_dim: int  # >= old width; old channels first, then zeros


def flatten(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested params -> {'layers.0.attn.wq': array, ...}."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of `flatten` (layer indices become ints again)."""
    out: dict = {}
    for name, value in flat.items():
        parts = name.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            key = int(part) if i == 1 and parts[0] == "layers" else part
            node = node.setdefault(key, {})
        node[parts[-1]] = value
    return out


def count_compact_params(spec: ArchSpec) -> int:
    """Parameter count of a compact model (embedding and head included)."""
    cfg = spec.model_config
    d = spec.hidden_dim
    total = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d
    for layer in spec.layers:
        total += 2 * d + d * cfg.head_dim * 2 * (layer.num_heads + layer.num_kv_heads)
        total += 3 * d * layer.ffn_dim
    return int(total)


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def identity_layout(layer: LayerSpec, ffn_dim: int | None = None) -> LayerLayout:
    """Keeps the heads as they are (optionally padding the FFN)."""
    return LayerLayout(tuple(range(layer.num_heads)), tuple(range(layer.num_kv_heads)),
                       layer.q_per_kv, layer.ffn_dim if ffn_dim is None else ffn_dim)


def grouped_layout(layer: LayerSpec, num_kv: int, group: int, ffn_dim: int) -> LayerLayout:
    """Pads every KV group to `group` query heads and the layer to `num_kv` KV heads."""
    q_src, start = [], 0
    for n in layer.q_per_kv:
        q_src += list(range(start, start + n)) + [-1] * (group - n)
        start += n
    q_src += [-1] * (group * (num_kv - layer.num_kv_heads))
    kv_src = list(range(layer.num_kv_heads)) + [-1] * (num_kv - layer.num_kv_heads)
    return LayerLayout(tuple(q_src), tuple(kv_src), (group,) * num_kv, ffn_dim)


def mha_layout(layer: LayerSpec, num_heads: int, ffn_dim: int) -> LayerLayout:
    """One KV head per query head (KV heads duplicated), padded to `num_heads`."""
    pad = num_heads - layer.num_heads
    q_src = tuple(range(layer.num_heads)) + (-1,) * pad
    kv_src = layer.kv_index + (-1,) * pad
    return LayerLayout(q_src, kv_src, (1,) * num_heads, ffn_dim)


def uniform_layouts(spec: ArchSpec, gqa: Literal["auto", "pad", "mha"] = "auto",
                    ffn_multiple: int = 1) -> tuple[list[LayerLayout], str]:
    """Layouts that give every layer the same widths and even GQA groups, plus a note."""
    # at least one unit each: stock Llama code cannot build zero-width projections
    ffn = round_up(max(1, max(l.ffn_dim for l in spec.layers)), ffn_multiple)
    num_kv = max(1, max(l.num_kv_heads for l in spec.layers))
    group = max(1, max(max(l.q_per_kv, default=0) for l in spec.layers))
    num_heads = max(1, max(l.num_heads for l in spec.layers))
    if gqa == "auto":  # whichever stores fewer attention weights (q+o per head, k+v per KV)
        gqa = "pad" if num_kv * group + num_kv <= 2 * num_heads else "mha"
    if gqa == "pad":
        layouts = [grouped_layout(l, num_kv, group, ffn) for l in spec.layers]
        heads = f"{num_kv * group} query heads in {num_kv} KV groups of {group} (zero heads pad)"
    elif gqa == "mha":
        layouts = [mha_layout(l, num_heads, ffn) for l in spec.layers]
        heads = f"{num_heads} query heads with one (duplicated) KV head each"
    else:
        raise ValueError(f"gqa={gqa!r}; expected 'auto', 'pad' or 'mha'")
    return layouts, f"non-uniform widths padded exactly to {heads}, FFN width {ffn}"


def _take(x: np.ndarray, axis: int, src: tuple[int, ...]) -> np.ndarray:
    """Units `src` of x along axis; -1 gives a zero unit."""
    src_arr = np.asarray(src, dtype=np.int64)
    if len(src_arr) == x.shape[axis] and np.array_equal(src_arr, np.arange(len(src_arr))):
        return x
    if x.shape[axis] == 0:  # a layer whose heads (or FFN) were all pruned: only zero units
        shape = list(x.shape)
        shape[axis] = len(src_arr)
        return np.zeros(shape, x.dtype)
    out = np.take(x, np.maximum(src_arr, 0), axis=axis)
    zero = np.asarray(src_arr < 0).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return np.where(zero, np.zeros((), x.dtype), out)


def _pad(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Zero-pads x along axis up to `size`."""
    if x.shape[axis] == size:
        return x
    if x.shape[axis] > size:
        raise ValueError(f"cannot pad width {x.shape[axis]} down to {size}")
    widths = [(0, size - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)]
    return np.pad(x, widths)


def relayout(spec: ArchSpec, params: dict | LazyTensors, layouts: list[LayerLayout] | None = None,
             hidden_dim: int | None = None) -> tuple[ArchSpec, LazyTensors]:
    """New spec and lazy tensors for padded/regrouped layers and a padded hidden width."""
    cfg = spec.model_config
    d, d_new = spec.hidden_dim, hidden_dim or spec.hidden_dim
    layouts = layouts or [identity_layout(l) for l in spec.layers]
    if len(layouts) != len(spec.layers):
        raise ValueError(f"{len(layouts)} layouts for {len(spec.layers)} layers")
    model = dict(spec.model)
    if d_new != d:
        model["norm_eps"] = cfg.norm_eps * d / d_new
    get = _getter(params)

    def norm(name: str) -> np.ndarray:
        """An RMSNorm gain, rescaled and padded when the hidden width grows."""
        gain = get(name)
        return gain if d_new == d else _pad(gain * np.float32(math.sqrt(d / d_new)), 0, d_new)

    tensors: LazyTensors = {
        "embed": lambda: _pad(get("embed"), 1, d_new),
        "final_norm.scale": lambda: norm("final_norm.scale"),
    }
    if not cfg.tie_embeddings:
        tensors["lm_head"] = lambda: _pad(get("lm_head"), 0, d_new)
    new_layers = []
    for i, (layer, lay) in enumerate(zip(spec.layers, layouts)):
        _check_layout(i, layer, lay)
        new_layers.append(LayerSpec(lay.q_per_kv, lay.ffn_dim))
        p = f"layers.{i}."
        for block in ("attn_norm", "mlp_norm"):
            n = p + block + ".scale"
            tensors[n] = lambda n=n: norm(n)
        for w in ("wq", "wk", "wv"):
            src = lay.q_src if w == "wq" else lay.kv_src
            n = p + "attn." + w
            tensors[n] = lambda n=n, src=src: _pad(_take(get(n), 1, src), 0, d_new)
        n = p + "attn.wo"
        tensors[n] = lambda n=n, lay=lay: _pad(_take(get(n), 0, lay.q_src), 2, d_new)
        for w in ("w_gate", "w_up"):
            n = p + "mlp." + w
            tensors[n] = lambda n=n, lay=lay: _pad(_pad(get(n), 1, lay.ffn_dim), 0, d_new)
        n = p + "mlp.w_down"
        tensors[n] = lambda n=n, lay=lay: _pad(_pad(get(n), 0, lay.ffn_dim), 1, d_new)
    new_spec = ArchSpec(model=model, hidden_dim=d_new, layers=tuple(new_layers), live_params=0,
                        dense_params=spec.dense_params, step=spec.step,
                        tokens_seen=spec.tokens_seen)
    new_spec = dataclasses.replace(new_spec, live_params=count_compact_params(new_spec))
    return new_spec, tensors


def _getter(params: dict) -> Callable[[str], np.ndarray]:
    """Reads a tensor by flat name from nested params or from lazy tensors."""
    flat = flatten(params)

    def get(name: str) -> np.ndarray:
        if name not in flat:
            raise KeyError(f"tensor {name} is missing from the parameters")
        value = flat[name]
        return np.asarray(value() if callable(value) else value)

    return get


def _check_layout(i: int, layer: LayerSpec, lay: LayerLayout) -> None:
    """A layout must keep every unit and keep each query head with its own KV head."""
    kept_q = sorted(s for s in lay.q_src if s >= 0)
    kept_kv = sorted(s for s in lay.kv_src if s >= 0)
    if kept_q != list(range(layer.num_heads)) or sorted(set(kept_kv)) != list(
            range(layer.num_kv_heads)) or lay.ffn_dim < layer.ffn_dim:
        raise ValueError(f"layer {i}: layout {lay} drops units of {layer}")
    new_kv_index = LayerSpec(lay.q_per_kv, lay.ffn_dim).kv_index
    if len(new_kv_index) != len(lay.q_src) or len(lay.q_per_kv) != len(lay.kv_src):
        raise ValueError(f"layer {i}: layout {lay} is inconsistent")
    for h, src in enumerate(lay.q_src):
        if src >= 0 and lay.kv_src[new_kv_index[h]] != layer.kv_index[src]:
            raise ValueError(f"layer {i}: query head {src} would read the wrong KV head")


def round_widths(spec: ArchSpec, params: dict, multiple: int,
                 hidden: bool = True) -> tuple[ArchSpec, LazyTensors]:
    """Pads FFN widths (and the hidden width) up to multiples of `multiple`, exactly."""
    if multiple < 1:
        raise ValueError(f"round_to must be >= 1, got {multiple}")
    layouts = [identity_layout(l, round_up(l.ffn_dim, multiple)) for l in spec.layers]
    d = round_up(spec.hidden_dim, multiple) if hidden else spec.hidden_dim
    return relayout(spec, params, layouts, d)


def materialize(tensors: LazyTensors) -> dict:
    """Builds every lazy tensor into nested compact params."""
    return unflatten({name: make() for name, make in tensors.items()})
